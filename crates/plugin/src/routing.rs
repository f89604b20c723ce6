//! Plan -> rtnetlink: fwmark policy rules, `local default dev lo` routes, loopback addresses.
//!
//! Every rule and route we add carries our protocol id `consts::RT_PROTOCOL` (`FRA_PROTOCOL` on
//! rules, `rtm_protocol` on routes). That tag, not the mark, table or priority, is what makes
//! an object ours: `apply` removes tagged objects the plan does not want (a re-ADD in another
//! mode, an older release's numbers), `delete` removes all tagged objects, and `check` reports
//! tagged objects the plan lacks. Objects without the tag are never touched, except the exact
//! identities `delete` is given (objects of releases from before the tag).
//!
//! Synchronous netlink over one `netlink-sys` socket, no async runtime: the plugin runs a few
//! requests per pod, and a runtime's threads must never meet `setns` (docs/ARCHITECTURE.md,
//! pitfall 7). Call these
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

use crate::plan::{FwmarkRule, LocalRoute, Routing};
use tproxy_cni_policy::consts::RT_PROTOCOL;
use tproxy_cni_policy::netaddr::{Cidr, Family};

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("{what}: {err}")]
    Kernel { what: String, err: io::Error },
    #[error("{what}: malformed netlink reply: {detail}")]
    Decode { what: String, detail: String },
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

/// The rule as we add it: with our protocol tag.
fn rule_msg(r: &FwmarkRule) -> RuleMessage {
    let mut m = untagged_rule_msg(r);
    m.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(RT_PROTOCOL)));
    m
}

/// Without a protocol, a delete matches the rule whatever its protocol (rules of releases
/// from before the tag).
fn untagged_rule_msg(r: &FwmarkRule) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = family(r.family);
    // docs/ARCHITECTURE.md, pitfall 4: without an explicit action the kernel accepts the rule
    // and every lookup fails.
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
    m.header.protocol = RouteProtocol::from(RT_PROTOCOL);
    // docs/ARCHITECTURE.md, pitfall 4: a `local` route must be host-scoped or the kernel
    // refuses it.
    m.header.scope = RouteScope::Host;
    m.header.kind = RouteType::Local;
    m.attributes = vec![RouteAttribute::Table(r.table), RouteAttribute::Oif(lo)];
    m
}

/// With protocol unspecified, a delete matches the route whatever its protocol.
fn untagged_route_msg(r: &LocalRoute, lo: u32) -> RouteMessage {
    let mut m = route_msg(r, lo);
    m.header.protocol = RouteProtocol::Unspec;
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
    pub fn request(
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

fn is_ours_rule(m: &RuleMessage) -> bool {
    m.attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Protocol(p) if u8::from(*p) == RT_PROTOCOL))
}

fn is_ours_route(m: &RouteMessage) -> bool {
    u8::from(m.header.protocol) == RT_PROTOCOL
}

/// Our tagged rules and routes of one family as the kernel lists them (routes of every
/// table), and every rule of the family (for duplicates). A kernel without the family has
/// none.
struct Tagged {
    rules: Vec<RuleMessage>,
    routes: Vec<RouteMessage>,
    all_rules: Vec<RuleMessage>,
}

fn tagged(nl: &mut Rtnl, f: Family) -> Result<Tagged, RoutingError> {
    let mut q = RuleMessage::default();
    q.header.family = family(f);
    let rules = match nl.request(RouteNetlinkMessage::GetRule(q), NLM_F_DUMP, "listing rules") {
        Err(e) if is_no_family(&e) => Vec::new(),
        other => other?,
    };
    let mut q = RouteMessage::default();
    q.header.address_family = family(f);
    let routes = match nl.request(
        RouteNetlinkMessage::GetRoute(q),
        NLM_F_DUMP,
        "listing routes",
    ) {
        Err(e) if is_no_family(&e) => Vec::new(),
        other => other?,
    };
    let all_rules: Vec<RuleMessage> = rules
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRule(m) => Some(m),
            _ => None,
        })
        .collect();
    Ok(Tagged {
        rules: all_rules
            .iter()
            .filter(|m| is_ours_rule(m))
            .cloned()
            .collect(),
        all_rules,
        routes: routes
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(m) if is_ours_route(&m) => Some(m),
                _ => None,
            })
            .collect(),
    })
}

/// One line naming a rule as the kernel lists it.
fn describe_krule(m: &RuleMessage) -> String {
    let (table, prio, mark, mask) = rule_fields(m);
    let fam = if m.header.family == AddressFamily::Inet6 {
        "ipv6"
    } else {
        "ipv4"
    };
    format!(
        "{fam} rule fwmark {:#x}/{:#x} lookup {table} priority {}",
        mark.unwrap_or(0),
        mask.unwrap_or(u32::MAX),
        prio.unwrap_or(0)
    )
}

fn describe_kroute(m: &RouteMessage) -> String {
    let fam = if m.header.address_family == AddressFamily::Inet6 {
        "ipv6"
    } else {
        "ipv4"
    };
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    format!(
        "{fam} route {:?}/{} table {table}",
        m.header.kind, m.header.destination_prefix_length
    )
}

/// Removes the tagged rules and routes of `f` that `keep` does not want; a second copy of a
/// wanted rule or route counts as unwanted.
fn sweep(nl: &mut Rtnl, f: Family, keep: &Routing, lo: u32) -> Result<(), RoutingError> {
    let t = tagged(nl, f)?;
    let mut kept_rules: Vec<FwmarkRule> = Vec::new();
    for m in t.rules {
        let want = keep
            .rules
            .iter()
            .find(|r| r.family == f && rule_matches(&m, r) && !kept_rules.contains(r));
        match want {
            Some(r) => kept_rules.push(*r),
            None => {
                let what = format!("removing stale {}", describe_krule(&m));
                nl.remove(RouteNetlinkMessage::DelRule(m), &what)?;
            }
        }
    }
    let mut kept_routes: Vec<LocalRoute> = Vec::new();
    for m in t.routes {
        let want = keep
            .local_routes
            .iter()
            .find(|r| r.family == f && route_matches(&m, r, lo) && !kept_routes.contains(r));
        match want {
            Some(r) => kept_routes.push(*r),
            None => {
                let what = format!("removing stale {}", describe_kroute(&m));
                nl.remove(RouteNetlinkMessage::DelRoute(m), &what)?;
            }
        }
    }
    Ok(())
}

/// Makes the kernel's routing objects of ours equal to the plan: creates every rule, route
/// and address of the plan (existing identical ones are fine), then removes tagged rules and
/// routes the plan does not want (another mode's, or another release's numbers). On error,
/// removes what the plan wanted before returning it. A kernel without IPv6 (EAFNOSUPPORT)
/// gets the IPv4 half only.
pub fn apply(r: &Routing) -> Result<(), RoutingError> {
    let mut nl = Rtnl::open()?;
    let lo = lo_index()?;
    if r.rules.is_empty() && r.local_routes.is_empty() && r.lo_addresses.is_empty() {
        for f in [Family::V4, Family::V6] {
            sweep(&mut nl, f, r, lo)?;
        }
        return Ok(());
    }
    // Families skipped because the kernel has no IPv6.
    let mut skipped: Vec<Family> = Vec::new();
    // Local routes and addresses live on lo, and the kernel refuses IPv6 ones (ENETDOWN) while
    // lo is down. Runtimes bring lo up with the loopback plugin, but not always before us;
    // setting the flag is idempotent and every pod needs lo up anyway.
    let mut up = LinkMessage::default();
    up.header.index = lo;
    up.header.flags = LinkFlags::Up;
    up.header.change_mask = LinkFlags::Up;
    nl.request(RouteNetlinkMessage::SetLink(up), NLM_F_ACK, "setting lo up")?;
    let res = (|| {
        drop_untagged_copies(&mut nl, r)?;
        for route in &r.local_routes {
            if skipped.contains(&route.family) {
                continue;
            }
            match nl.create(
                RouteNetlinkMessage::NewRoute(route_msg(route, lo)),
                &describe_route(route),
            ) {
                Err(e) if route.family == Family::V6 && is_no_family(&e) => {
                    log::info!("IPv6 is not available in this netns; skipping IPv6 routing");
                    skipped.push(Family::V6);
                }
                other => other?,
            }
        }
        for rule in &r.rules {
            if skipped.contains(&rule.family) {
                continue;
            }
            match nl.create(
                RouteNetlinkMessage::NewRule(rule_msg(rule)),
                &describe_rule(rule),
            ) {
                Err(e) if rule.family == Family::V6 && is_no_family(&e) => {
                    skipped.push(Family::V6);
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
        for f in [Family::V4, Family::V6] {
            if !skipped.contains(&f) {
                sweep(&mut nl, f, r, lo)?;
            }
        }
        Ok(())
    })();
    match res {
        Ok(()) => Ok(()),
        Err(e) => {
            for undo in delete_with(&mut nl, r) {
                log::warn!("undoing partial routing after error: {undo}");
            }
            Err(e)
        }
    }
}

/// An untagged rule with the identity of a rule the plan wants (an older release's, or one
/// re-added by hand) would be a duplicate of ours. A delete without protocol matches either
/// copy, so all copies go and the creation that follows adds ours back.
fn drop_untagged_copies(nl: &mut Rtnl, r: &Routing) -> Result<(), RoutingError> {
    for f in [Family::V4, Family::V6] {
        let t = tagged(nl, f)?;
        for rule in r.rules.iter().filter(|x| x.family == f) {
            let untagged = t
                .all_rules
                .iter()
                .any(|m| !is_ours_rule(m) && rule_matches(m, rule));
            if !untagged {
                continue;
            }
            for _ in 0..16 {
                let what = format!("removing copies of {}", describe_rule(rule));
                if !nl.remove(RouteNetlinkMessage::DelRule(untagged_rule_msg(rule)), &what)? {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Removes every tagged rule and route of ours, whatever its mark, table or priority, plus
/// the objects of `r` by their exact identity (also untagged ones, as releases before the tag
/// made them) and its lo addresses; absent ones are not errors. Keeps going after a failure
/// and returns every failure it met (teardown removes all it can).
pub fn delete(r: &Routing) -> Result<(), Vec<RoutingError>> {
    let mut nl = Rtnl::open().map_err(|e| vec![e])?;
    let mut errs = delete_with(&mut nl, r);
    match lo_index() {
        Ok(lo) => {
            for f in [Family::V4, Family::V6] {
                if let Err(e) = sweep(&mut nl, f, &Routing::default(), lo) {
                    errs.push(e);
                }
            }
        }
        Err(e) => errs.push(e),
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs)
    }
}

/// Removes `r`'s objects by identity; returns every failure.
fn delete_with(nl: &mut Rtnl, r: &Routing) -> Vec<RoutingError> {
    let mut errs: Vec<RoutingError> = Vec::new();
    let mut keep = |res: Result<bool, RoutingError>| {
        if let Err(e) = res {
            errs.push(e);
        }
    };
    // Rules first: once the rule is gone, nothing can be routed by a half-removed table.
    for rule in &r.rules {
        // The kernel can hold several identical rules if something else added ours again
        // without NLM_F_EXCL; delete until none is left (bounded).
        for _ in 0..16 {
            match nl.remove(
                RouteNetlinkMessage::DelRule(untagged_rule_msg(rule)),
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
                    RouteNetlinkMessage::DelRoute(untagged_route_msg(route, lo)),
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
    errs
}

/// Compares the kernel's rules, routes and lo addresses with the plan: one line per missing,
/// duplicated or extra object (empty when they agree); `Err` when they could not be read.
/// Only tagged rules and routes count as ours (an untagged one is another release's layout
/// or someone else's, and the plan's object is then missing).
pub fn check(r: &Routing) -> Result<Vec<String>, RoutingError> {
    let mut diffs = Vec::new();
    let mut nl = Rtnl::open()?;
    let lo = lo_index()?;
    for f in [Family::V4, Family::V6] {
        let t = tagged(&mut nl, f)?;
        for rule in r.rules.iter().filter(|x| x.family == f) {
            // A copy without our tag (someone re-adding the rule by hand, an older release)
            // is still a duplicate; but the plan's rule is only there if it carries the tag.
            let copies = t.all_rules.iter().filter(|m| rule_matches(m, rule)).count();
            if !t.rules.iter().any(|m| rule_matches(m, rule)) {
                diffs.push(format!("missing {}", describe_rule(rule)));
            } else if copies > 1 {
                diffs.push(format!("{copies} copies of {}", describe_rule(rule)));
            }
        }
        for m in &t.rules {
            if !r.rules.iter().any(|x| x.family == f && rule_matches(m, x)) {
                diffs.push(format!("extra {} (not in the plan)", describe_krule(m)));
            }
        }
        for route in r.local_routes.iter().filter(|x| x.family == f) {
            match t
                .routes
                .iter()
                .filter(|m| route_matches(m, route, lo))
                .count()
            {
                0 => diffs.push(format!("missing {}", describe_route(route))),
                1 => {}
                n => diffs.push(format!("{n} copies of {}", describe_route(route))),
            }
        }
        for m in &t.routes {
            if !r
                .local_routes
                .iter()
                .any(|x| x.family == f && route_matches(m, x, lo))
            {
                diffs.push(format!("extra {} (not in the plan)", describe_kroute(m)));
            }
        }
    }
    for a in &r.lo_addresses {
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

fn rule_fields(m: &RuleMessage) -> (u32, Option<u32>, Option<u32>, Option<u32>) {
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
    (table, prio, mark, mask)
}

fn rule_matches(m: &RuleMessage, want: &FwmarkRule) -> bool {
    let (table, prio, mark, mask) = rule_fields(m);
    m.header.family == family(want.family)
        && m.header.action == RuleAction::ToTable
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
    m.header.address_family == family(want.family)
        && table == want.table
        && m.header.kind == RouteType::Local
        && m.header.destination_prefix_length == 0
        && default_dst
        && oif == Some(lo)
}

/// Interface that kube-proxy in IPVS mode fills with every Service IP: not the node's own
/// addresses in the sense of where its connections come from, and possibly thousands.
const IPVS_DUMMY: &str = "kube-ipvs0";

/// The node's own global addresses (call in the host netns): where kubelet probes and other
/// node-local connections to a pod come from. Loopback, link-local, kube-ipvs0, IPv6
/// temporary, deprecated and DAD-failed addresses are left out; sorted and deduplicated so the
/// plan built from them is stable.
pub fn node_addresses() -> Result<Vec<IpAddr>, RoutingError> {
    let mut nl = Rtnl::open()?;
    let skip: Vec<u32> = ["lo", IPVS_DUMMY]
        .iter()
        .filter_map(|n| nix::net::if_::if_nametoindex(*n).ok())
        .collect();
    let mut out = Vec::new();
    for f in [Family::V4, Family::V6] {
        let mut q = AddressMessage::default();
        q.header.family = family(f);
        let msgs = match nl.request(
            RouteNetlinkMessage::GetAddress(q),
            NLM_F_DUMP,
            "listing the node's addresses",
        ) {
            Err(e) if is_no_family(&e) => Vec::new(),
            other => other?,
        };
        for m in msgs {
            let RouteNetlinkMessage::NewAddress(m) = m else {
                continue;
            };
            if m.header.scope != AddressScope::Universe || skip.contains(&m.header.index) {
                continue;
            }
            // Addresses that come and go on their own (IPv6 privacy addresses, which share
            // the bit of IPv4's "secondary"; deprecated and failed ones) would make CHECK
            // report drift on long-lived pods.
            let fl = m.header.flags;
            if fl.intersects(AddressHeaderFlags::Deprecated | AddressHeaderFlags::Dadfailed)
                || (f == Family::V6 && fl.contains(AddressHeaderFlags::Secondary))
            {
                continue;
            }
            // IFA_LOCAL is the address itself (IFA_ADDRESS is the peer on point-to-point
            // links); IPv6 has only IFA_ADDRESS.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = addr {
                out.push(ip);
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}
