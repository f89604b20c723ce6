//! Plan -> rtnetlink: fwmark policy rules, `local default dev lo` routes, loopback addresses.
//!
//! Synchronous netlink over one `netlink-sys` socket, no async runtime: the plugin runs a few
//! requests per pod, and a runtime's threads must never meet `setns` (pitfall 7). Call these
//! from a thread already inside the pod netns (see `netns`).

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::netaddr::{Cidr, Family};
use crate::plan::{FwmarkRule, LocalRoute, Routing};

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("{what}: {err}")]
    Kernel { what: String, err: io::Error },
    #[error("{what}: malformed netlink reply: {detail}")]
    Decode { what: String, detail: String },
}

/// What `apply` did, so a failed ADD can undo exactly that.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Families skipped because the kernel has no IPv6 (EAFNOSUPPORT).
    pub skipped: Vec<Family>,
}

fn family(f: Family) -> AddressFamily {
    match f {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

fn describe_rule(r: &FwmarkRule) -> String {
    format!(
        "{} rule fwmark {:#x}/{:#x} lookup {} priority {}",
        r.family, r.mark, r.mask, r.table, r.priority
    )
}

fn describe_route(r: &LocalRoute) -> String {
    format!("{} route local default dev lo table {}", r.family, r.table)
}

fn rule_msg(r: &FwmarkRule) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = family(r.family);
    // Pitfall 4: without an explicit action the kernel accepts the rule and every lookup fails.
    m.header.action = RuleAction::ToTable;
    m.header.table = if r.table < 256 { r.table as u8 } else { 0 };
    m.attributes = vec![
        RuleAttribute::Priority(r.priority),
        RuleAttribute::FwMark(r.mark),
        RuleAttribute::FwMask(r.mask),
        RuleAttribute::Table(r.table),
    ];
    m
}

fn lo_index() -> Result<u32, RoutingError> {
    nix::net::if_::if_nametoindex("lo").map_err(|e| RoutingError::Kernel {
        what: "looking up interface lo".into(),
        err: io::Error::from_raw_os_error(e as i32),
    })
}

fn route_msg(r: &LocalRoute, lo: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family(r.family);
    m.header.destination_prefix_length = 0;
    m.header.table = if r.table < 256 { r.table as u8 } else { 0 };
    m.header.protocol = RouteProtocol::Boot;
    // Pitfall 4: a `local` route must be host-scoped or the kernel refuses it.
    m.header.scope = RouteScope::Host;
    m.header.kind = RouteType::Local;
    m.attributes = vec![RouteAttribute::Table(r.table), RouteAttribute::Oif(lo)];
    m
}

fn addr_msg(c: &Cidr, lo: u32) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = family(c.family());
    m.header.prefix_len = c.prefix();
    m.header.scope = AddressScope::Host;
    m.header.index = lo;
    // No duplicate address detection: the address only lives on lo.
    m.header.flags = AddressHeaderFlags::Nodad;
    m.attributes = vec![
        AddressAttribute::Local(c.addr()),
        AddressAttribute::Address(c.addr()),
        AddressAttribute::Flags(AddressFlags::Nodad),
    ];
    m
}

/// One rtnetlink socket in the current netns.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> Result<Rtnl, RoutingError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(RoutingError::Socket)?;
        sock.bind_auto().map_err(RoutingError::Socket)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(RoutingError::Socket)?;
        Ok(Rtnl { sock, seq: 0 })
    }

    /// Sends one request and collects replies until ACK/error (or DONE for dumps).
    pub(crate) fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        what: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, RoutingError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock.send(&buf, 0).map_err(RoutingError::Socket)?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        let mut rx = vec![0u8; 64 * 1024];
        loop {
            let n = self
                .sock
                .recv(&mut &mut rx[..], 0)
                .map_err(RoutingError::Socket)?;
            let mut off = 0;
            while off < n {
                let bytes = &rx[off..n];
                let reply =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).map_err(|e| {
                        RoutingError::Decode {
                            what: what.into(),
                            detail: e.to_string(),
                        }
                    })?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(RoutingError::Decode {
                        what: what.into(),
                        detail: "zero-length message".into(),
                    });
                }
                off += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(code) => Err(RoutingError::Kernel {
                                what: what.into(),
                                err: io::Error::from_raw_os_error(-code.get()),
                            }),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::InnerMessage(m) => {
                        out.push(m);
                        if !dump {
                            continue;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn create(&mut self, msg: RouteNetlinkMessage, what: &str) -> Result<(), RoutingError> {
        match self.request(msg, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, what) {
            Ok(_) => Ok(()),
            // Idempotent ADD: an identical object is already there.
            Err(RoutingError::Kernel { err, .. }) if err.raw_os_error() == Some(libc::EEXIST) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes; `Ok(false)` when the object was already absent.
    fn remove(&mut self, msg: RouteNetlinkMessage, what: &str) -> Result<bool, RoutingError> {
        match self.request(msg, NLM_F_ACK, what) {
            Ok(_) => Ok(true),
            Err(RoutingError::Kernel { err, .. })
                if matches!(
                    err.raw_os_error(),
                    Some(libc::ENOENT)
                        | Some(libc::ESRCH)
                        | Some(libc::EADDRNOTAVAIL)
                        | Some(libc::EAFNOSUPPORT)
                        | Some(libc::ENODEV)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }
}

fn is_no_family(e: &RoutingError) -> bool {
    matches!(e, RoutingError::Kernel { err, .. } if err.raw_os_error() == Some(libc::EAFNOSUPPORT))
}

/// Creates every rule, route and address of the plan (existing identical ones are fine).
/// On error, removes what this call added before returning it.
pub fn apply(r: &Routing) -> Result<Applied, RoutingError> {
    if r.rules.is_empty() && r.local_routes.is_empty() && r.lo_addresses.is_empty() {
        return Ok(Applied::default());
    }
    let mut nl = Rtnl::open()?;
    let lo = lo_index()?;
    let mut applied = Applied::default();
    // Local routes and addresses live on lo, and the kernel refuses IPv6 ones (ENETDOWN) while
    // lo is down. Runtimes bring lo up with the loopback plugin, but not always before us;
    // setting the flag is idempotent and every pod needs lo up anyway.
    let mut up = LinkMessage::default();
    up.header.index = lo;
    up.header.flags = LinkFlags::Up;
    up.header.change_mask = LinkFlags::Up;
    nl.request(RouteNetlinkMessage::SetLink(up), NLM_F_ACK, "setting lo up")?;
    let res = (|| {
        for route in &r.local_routes {
            if applied.skipped.contains(&route.family) {
                continue;
            }
            match nl.create(
                RouteNetlinkMessage::NewRoute(route_msg(route, lo)),
                &describe_route(route),
            ) {
                Err(e) if route.family == Family::V6 && is_no_family(&e) => {
                    log::info!("IPv6 is not available in this netns; skipping IPv6 routing");
                    applied.skipped.push(Family::V6);
                }
                other => other?,
            }
        }
        for rule in &r.rules {
            if applied.skipped.contains(&rule.family) {
                continue;
            }
            match nl.create(
                RouteNetlinkMessage::NewRule(rule_msg(rule)),
                &describe_rule(rule),
            ) {
                Err(e) if rule.family == Family::V6 && is_no_family(&e) => {
                    applied.skipped.push(Family::V6);
                }
                other => other?,
            }
        }
        for a in &r.lo_addresses {
            nl.create(
                RouteNetlinkMessage::NewAddress(addr_msg(a, lo)),
                &format!("address {a} on lo"),
            )?;
        }
        Ok(())
    })();
    match res {
        Ok(()) => Ok(applied),
        Err(e) => {
            if let Err(undo) = delete_with(&mut nl, r) {
                log::warn!("undoing partial routing after error: {undo}");
            }
            Err(e)
        }
    }
}

/// Removes every rule, route and address of the plan; absent ones are not errors.
/// Keeps going after a failure and reports the first one (teardown removes all it can).
pub fn delete(r: &Routing) -> Result<(), RoutingError> {
    if r.rules.is_empty() && r.local_routes.is_empty() && r.lo_addresses.is_empty() {
        return Ok(());
    }
    let mut nl = Rtnl::open()?;
    delete_with(&mut nl, r)
}

fn delete_with(nl: &mut Rtnl, r: &Routing) -> Result<(), RoutingError> {
    let mut first: Option<RoutingError> = None;
    let mut keep = |res: Result<bool, RoutingError>| {
        if let Err(e) = res {
            first.get_or_insert(e);
        }
    };
    // Rules first: once the rule is gone, nothing can be routed by a half-removed table.
    for rule in &r.rules {
        // The kernel can hold several identical rules if something else added ours again
        // without NLM_F_EXCL; delete until none is left (bounded).
        for _ in 0..16 {
            match nl.remove(
                RouteNetlinkMessage::DelRule(rule_msg(rule)),
                &describe_rule(rule),
            ) {
                Ok(true) => continue,
                other => {
                    keep(other);
                    break;
                }
            }
        }
    }
    match lo_index() {
        Ok(lo) => {
            for route in &r.local_routes {
                keep(nl.remove(
                    RouteNetlinkMessage::DelRoute(route_msg(route, lo)),
                    &describe_route(route),
                ));
            }
            for a in &r.lo_addresses {
                keep(nl.remove(
                    RouteNetlinkMessage::DelAddress(addr_msg(a, lo)),
                    &format!("address {a} on lo"),
                ));
            }
        }
        Err(e) => keep(Err(e)),
    }
    match first {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// Compares the kernel's rules, routes and lo addresses with the plan; one line per difference.
pub fn check(r: &Routing) -> Result<Vec<String>, RoutingError> {
    let mut diffs = Vec::new();
    if r.rules.is_empty() && r.local_routes.is_empty() && r.lo_addresses.is_empty() {
        return Ok(diffs);
    }
    let mut nl = Rtnl::open()?;
    for rule in &r.rules {
        let mut q = RuleMessage::default();
        q.header.family = family(rule.family);
        let found = nl
            .request(RouteNetlinkMessage::GetRule(q), NLM_F_DUMP, "listing rules")?
            .into_iter()
            .any(|m| match m {
                RouteNetlinkMessage::NewRule(m) => rule_matches(&m, rule),
                _ => false,
            });
        if !found {
            diffs.push(format!("missing {}", describe_rule(rule)));
        }
    }
    for route in &r.local_routes {
        let mut q = RouteMessage::default();
        q.header.address_family = family(route.family);
        let lo = lo_index()?;
        let found = nl
            .request(
                RouteNetlinkMessage::GetRoute(q),
                NLM_F_DUMP,
                "listing routes",
            )?
            .into_iter()
            .any(|m| match m {
                RouteNetlinkMessage::NewRoute(m) => route_matches(&m, route, lo),
                _ => false,
            });
        if !found {
            diffs.push(format!("missing {}", describe_route(route)));
        }
    }
    for a in &r.lo_addresses {
        let lo = lo_index()?;
        let mut q = AddressMessage::default();
        q.header.family = family(a.family());
        let found = nl
            .request(RouteNetlinkMessage::GetAddress(q), NLM_F_DUMP, "listing addresses")?
            .into_iter()
            .any(|m| match m {
                RouteNetlinkMessage::NewAddress(m) => {
                    m.header.index == lo
                        && m.header.prefix_len == a.prefix()
                        && m.attributes.iter().any(|x| {
                            matches!(x, AddressAttribute::Address(ip) | AddressAttribute::Local(ip) if *ip == a.addr())
                        })
                }
                _ => false,
            });
        if !found {
            diffs.push(format!("missing address {a} on lo"));
        }
    }
    Ok(diffs)
}

fn rule_matches(m: &RuleMessage, want: &FwmarkRule) -> bool {
    let mut table = u32::from(m.header.table);
    let (mut prio, mut mark, mut mask) = (None, None, None);
    for a in &m.attributes {
        match a {
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Priority(p) => prio = Some(*p),
            RuleAttribute::FwMark(x) => mark = Some(*x),
            RuleAttribute::FwMask(x) => mask = Some(*x),
            _ => {}
        }
    }
    m.header.action == RuleAction::ToTable
        && table == want.table
        && prio == Some(want.priority)
        && mark == Some(want.mark)
        && mask.unwrap_or(u32::MAX) == want.mask
}

fn route_matches(m: &RouteMessage, want: &LocalRoute, lo: u32) -> bool {
    let mut table = u32::from(m.header.table);
    let mut oif = None;
    let mut dst = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(o) => oif = Some(*o),
            RouteAttribute::Destination(d) => dst = Some(d.clone()),
            _ => {}
        }
    }
    let default_dst = match dst {
        None => true,
        Some(RouteAddress::Inet(a)) => a.is_unspecified(),
        Some(RouteAddress::Inet6(a)) => a.is_unspecified(),
        Some(_) => false,
    };
    table == want.table
        && m.header.kind == RouteType::Local
        && m.header.destination_prefix_length == 0
        && default_dst
        && oif == Some(lo)
}

/// True when `ip` is configured in this netns (used by tests and CHECK diagnostics).
pub fn has_address(ip: IpAddr) -> Result<bool, RoutingError> {
    let mut nl = Rtnl::open()?;
    let mut q = AddressMessage::default();
    q.header.family = family(Family::of(&ip));
    Ok(nl
        .request(RouteNetlinkMessage::GetAddress(q), NLM_F_DUMP, "listing addresses")?
        .into_iter()
        .any(|m| match m {
            RouteNetlinkMessage::NewAddress(m) => m
                .attributes
                .iter()
                .any(|x| matches!(x, AddressAttribute::Address(a) | AddressAttribute::Local(a) if *a == ip)),
            _ => false,
        }))
}
