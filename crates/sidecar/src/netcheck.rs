//! Is this pod's network namespace programmed for our mode?
//!
//! A pod created before the plugin was chained into the node's CNI configuration runs with no
//! interception at all: TPROXY fails open (docs/ARCHITECTURE.md, pitfall 1), so the app is
//! reached directly and nothing looks wrong. The sidecar checks what it can read without
//! privileges over rtnetlink, at start and on `/ready`, and stays not-ready until it is there:
//!
//! - tproxy mode: for each family the pod has a global address in, a policy rule that sends
//!   our mark (under the rule's own mask) to a table holding `local default dev lo`. Without
//!   it the app's replies to our transparent upstreams never come back to us.
//! - redirect mode: the NAT rules live in nftables, which the kernel lets nobody read without
//!   CAP_NET_ADMIN. What the plugin also leaves in an IPv6 pod is `::6/128` on `lo` (the
//!   source the sidecar dials from), so a dual-stack or IPv6 pod is checked through that; an
//!   IPv4-only redirect pod cannot be checked, which is said once, and readiness does not
//!   depend on it.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::config::InboundMode;
use tproxy_cni_plugin::routing::{RoutingError, Rtnl};
use tproxy_cni_policy::consts::REDIRECT_SOURCE_V6;
use tproxy_cni_policy::Family;

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Programmed,
    /// Something the plugin puts there is missing (what, in words).
    Missing(String),
    /// Nothing readable tells (why).
    Unverifiable(String),
}

/// Reads the kernel state once.
pub(crate) fn verify(mode: InboundMode, mark: u32) -> Verdict {
    match read(mode, mark) {
        Ok(v) => v,
        Err(e) => Verdict::Unverifiable(format!("rtnetlink: {e}")),
    }
}

fn read(mode: InboundMode, mark: u32) -> Result<Verdict, RoutingError> {
    let mut nl = Rtnl::open()?;
    let addrs = dump_addresses(&mut nl)?;
    let lo = nix::net::if_::if_nametoindex("lo").unwrap_or(0);
    // Families of the pod's own addresses (global scope, not on lo); none known: IPv4.
    let mut fams: Vec<Family> = addrs
        .iter()
        .filter(|(idx, scope, _)| *idx != lo && *scope == AddressScope::Universe)
        .map(|(_, _, ip)| Family::of(ip))
        .collect();
    fams.sort();
    fams.dedup();
    if fams.is_empty() {
        fams.push(Family::V4);
    }
    match mode {
        InboundMode::Tproxy => {
            for fam in fams {
                if !mark_routes_locally(&mut nl, fam, mark, lo)? {
                    return Ok(Verdict::Missing(format!(
                        "no {fam} policy rule sends fwmark {mark:#x} to a table with \
                         `local default dev lo`"
                    )));
                }
            }
            Ok(Verdict::Programmed)
        }
        InboundMode::Redirect => {
            if !fams.contains(&Family::V6) {
                return Ok(Verdict::Unverifiable(
                    "redirect mode in an IPv4-only pod: the plugin's NAT rules cannot be read \
                     without CAP_NET_ADMIN"
                        .into(),
                ));
            }
            let six = IpAddr::V6(REDIRECT_SOURCE_V6);
            if addrs.iter().any(|(idx, _, ip)| *idx == lo && *ip == six) {
                Ok(Verdict::Programmed)
            } else {
                Ok(Verdict::Missing(format!(
                    "{six} is not on lo (the plugin adds it in redirect mode)"
                )))
            }
        }
    }
}

/// (interface index, scope, address) of every address in the netns.
fn dump_addresses(nl: &mut Rtnl) -> Result<Vec<(u32, AddressScope, IpAddr)>, RoutingError> {
    let mut out = Vec::new();
    for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut q = AddressMessage::default();
        q.header.family = fam;
        let replies = match nl.request(RouteNetlinkMessage::GetAddress(q), NLM_F_DUMP, "addrs") {
            Ok(r) => r,
            // No IPv6 in this kernel or netns.
            Err(RoutingError::Kernel { err, .. })
                if err.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        for m in replies {
            if let RouteNetlinkMessage::NewAddress(m) = m {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(ip) | AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                if let Some(ip) = ip {
                    out.push((m.header.index, m.header.scope, ip));
                }
            }
        }
    }
    Ok(out)
}

/// A `fwmark` rule matching `mark` under its own mask, pointing at a table that holds
/// `local default dev lo`. Loose on priority and mask on purpose: what matters is where
/// marked packets go.
fn mark_routes_locally(
    nl: &mut Rtnl,
    fam: Family,
    mark: u32,
    lo: u32,
) -> Result<bool, RoutingError> {
    let af = match fam {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    };
    let mut q = RuleMessage::default();
    q.header.family = af;
    let tables: Vec<u32> = nl
        .request(RouteNetlinkMessage::GetRule(q), NLM_F_DUMP, "listing rules")?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewRule(m) => rule_table_for(&m, mark),
            _ => None,
        })
        .collect();
    if tables.is_empty() {
        return Ok(false);
    }
    let mut q = RouteMessage::default();
    q.header.address_family = af;
    let found = nl
        .request(
            RouteNetlinkMessage::GetRoute(q),
            NLM_F_DUMP,
            "listing routes",
        )?
        .into_iter()
        .any(|m| match m {
            RouteNetlinkMessage::NewRoute(m) => {
                local_default_table(&m, lo).is_some_and(|t| tables.contains(&t))
            }
            _ => false,
        });
    Ok(found)
}

/// The table of a `fwmark M/K lookup T` rule that matches `mark`.
fn rule_table_for(m: &RuleMessage, mark: u32) -> Option<u32> {
    if m.header.action != RuleAction::ToTable {
        return None;
    }
    let mut table = u32::from(m.header.table);
    let (mut fwmark, mut mask) = (None, u32::MAX);
    for a in &m.attributes {
        match a {
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::FwMark(x) => fwmark = Some(*x),
            RuleAttribute::FwMask(x) => mask = *x,
            _ => {}
        }
    }
    let fwmark = fwmark?;
    (mask != 0 && fwmark & mask == mark & mask).then_some(table)
}

/// The table of a `local default dev lo` route.
fn local_default_table(m: &RouteMessage, lo: u32) -> Option<u32> {
    let mut table = u32::from(m.header.table);
    let (mut oif, mut default_dst) = (None, true);
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(o) => oif = Some(*o),
            RouteAttribute::Destination(RouteAddress::Inet(a)) => default_dst = a.is_unspecified(),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => default_dst = a.is_unspecified(),
            RouteAttribute::Destination(_) => default_dst = false,
            _ => {}
        }
    }
    (m.header.kind == RouteType::Local
        && m.header.destination_prefix_length == 0
        && default_dst
        && oif == Some(lo))
    .then_some(table)
}

/// How long a verdict is reused: `/ready` may be probed often, the kernel state changes
/// rarely, and a dump costs a few netlink round trips.
const CACHE: Duration = Duration::from_secs(1);

/// The check behind `/ready`, cached, logging each change of verdict once.
#[derive(Debug)]
pub(crate) struct Checker {
    mode: InboundMode,
    mark: u32,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    at: Option<Instant>,
    last: Option<Verdict>,
}

impl Checker {
    pub(crate) fn new(mode: InboundMode, mark: u32) -> Checker {
        Checker {
            mode,
            mark,
            state: Mutex::new(State::default()),
        }
    }

    /// `Err(reason)` while the netns is known not to be programmed.
    pub(crate) fn ready(&self) -> Result<(), String> {
        self.ready_with(|| verify(self.mode, self.mark))
    }

    fn ready_with(&self, read: impl FnOnce() -> Verdict) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = st.at.is_some_and(|t| t.elapsed() < CACHE);
        if !fresh {
            let v = read();
            if st.last.as_ref() != Some(&v) {
                match &v {
                    Verdict::Missing(what) => log::warn!(
                        "not ready: {what} in this pod's network namespace, so \
                         nothing is intercepted ({} mode). Likely cause: the pod started before \
                         tproxy-cni was chained into the node's CNI configuration; recreate the \
                         pod once the installer runs on its node",
                        self.mode.as_str()
                    ),
                    Verdict::Programmed if st.last.is_some() => {
                        log::info!("interception rules found; ready")
                    }
                    Verdict::Programmed => {}
                    Verdict::Unverifiable(why) => log::warn!(
                        "cannot verify the interception rules ({why}); \
                         readiness does not depend on them"
                    ),
                }
            }
            st.last = Some(v);
            st.at = Some(Instant::now());
        }
        match &st.last {
            Some(Verdict::Missing(what)) => Err(what.clone()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_matching_follows_the_rules_mask() {
        let rule = |mark: u32, mask: Option<u32>, action: RuleAction| {
            let mut m = RuleMessage::default();
            m.header.action = action;
            m.attributes.push(RuleAttribute::Table(29808));
            m.attributes.push(RuleAttribute::FwMark(mark));
            if let Some(k) = mask {
                m.attributes.push(RuleAttribute::FwMask(k));
            }
            m
        };
        assert_eq!(
            rule_table_for(&rule(0x7470, None, RuleAction::ToTable), 0x7470),
            Some(29808)
        );
        // Only our bits compared: a rule written with a narrower mask still routes us.
        assert_eq!(
            rule_table_for(&rule(0x7470, Some(0xffff), RuleAction::ToTable), 0x17470),
            Some(29808)
        );
        assert_eq!(
            rule_table_for(&rule(0x539, None, RuleAction::ToTable), 0x7470),
            None
        );
        assert_eq!(
            rule_table_for(&rule(0x7470, Some(0), RuleAction::ToTable), 0x7470),
            None
        );
        assert_eq!(
            rule_table_for(&rule(0x7470, None, RuleAction::Unreachable), 0x7470),
            None
        );
    }

    #[test]
    fn checker_caches_and_reports_missing() {
        let c = Checker::new(InboundMode::Tproxy, 0x7470);
        let missing = || Verdict::Missing("no rule".into());
        assert_eq!(c.ready_with(missing), Err("no rule".into()));
        // Within the cache time the kernel is not read again.
        assert_eq!(
            c.ready_with(|| panic!("read again within the cache time")),
            Err("no rule".into())
        );
        c.state.lock().unwrap().at = None;
        assert_eq!(c.ready_with(|| Verdict::Programmed), Ok(()));
        c.state.lock().unwrap().at = None;
        assert_eq!(c.ready_with(|| Verdict::Unverifiable("x".into())), Ok(()));
    }
}
