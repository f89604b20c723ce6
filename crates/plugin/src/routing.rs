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
//!
//! - `msg`: the messages for the plan's objects; `rtnl`: the socket (also the sidecar's);
//!   `check`: the kernel compared with the plan; `node`: the node's own addresses.
//!   This file: apply and delete, and the sweep of tagged objects the plan does not want.

mod check;
mod msg;
mod node;
mod rtnl;

pub use check::check;
pub use node::node_addresses;
pub use rtnl::Rtnl;

use check::{route_matches, rule_fields, rule_matches};
use msg::{
    addr_msg, describe_route, describe_rule, family, lo_index, route_msg, rule_msg,
    untagged_route_msg, untagged_rule_msg,
};

use std::io;

use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP};
use netlink_packet_route::link::{LinkFlags, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteMessage};
use netlink_packet_route::rule::{RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::plan::{FwmarkRule, LocalRoute, Routing};
use tproxy_cni_policy::consts::RT_PROTOCOL;
use tproxy_cni_policy::Family;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("{what}: {err}")]
    Kernel { what: String, err: io::Error },
    #[error("{what}: malformed netlink reply: {detail}")]
    Decode { what: String, detail: String },
}

pub(super) fn is_no_family(e: &RoutingError) -> bool {
    matches!(e, RoutingError::Kernel { err, .. } if err.raw_os_error() == Some(libc::EAFNOSUPPORT))
}

pub(super) fn is_ours_rule(m: &RuleMessage) -> bool {
    m.attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Protocol(p) if u8::from(*p) == RT_PROTOCOL))
}

pub(super) fn is_ours_route(m: &RouteMessage) -> bool {
    u8::from(m.header.protocol) == RT_PROTOCOL
}

/// Our tagged rules and routes of one family as the kernel lists them (routes of every
/// table), and every rule of the family (for duplicates). A kernel without the family has
/// none.
pub(super) struct Tagged {
    rules: Vec<RuleMessage>,
    routes: Vec<RouteMessage>,
    all_rules: Vec<RuleMessage>,
}

pub(super) fn tagged(nl: &mut Rtnl, f: Family) -> Result<Tagged, RoutingError> {
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
pub(super) fn describe_krule(m: &RuleMessage) -> String {
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

pub(super) fn describe_kroute(m: &RouteMessage) -> String {
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
pub(super) fn sweep(nl: &mut Rtnl, f: Family, keep: &Routing, lo: u32) -> Result<(), RoutingError> {
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
