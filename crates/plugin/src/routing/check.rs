//! CHECK: the kernel's rules, routes and lo addresses compared with the plan.

use super::msg::{describe_route, describe_rule, family, lo_index};
use super::{describe_kroute, describe_krule, tagged, RoutingError, Rtnl};

use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::RouteNetlinkMessage;

use crate::plan::{FwmarkRule, LocalRoute, Routing};
use tproxy_cni_policy::Family;

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

pub(super) fn rule_fields(m: &RuleMessage) -> (u32, Option<u32>, Option<u32>, Option<u32>) {
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

pub(super) fn rule_matches(m: &RuleMessage, want: &FwmarkRule) -> bool {
    let (table, prio, mark, mask) = rule_fields(m);
    m.header.family == family(want.family)
        && m.header.action == RuleAction::ToTable
        && table == want.table
        && prio == Some(want.priority)
        && mark == Some(want.mark)
        && mask.unwrap_or(u32::MAX) == want.mask
}

pub(super) fn route_matches(m: &RouteMessage, want: &LocalRoute, lo: u32) -> bool {
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
