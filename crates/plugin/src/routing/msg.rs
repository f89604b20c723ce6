//! The rtnetlink messages for the plan's objects (tagged with our protocol id; the untagged
//! identities of releases from before the tag), and how errors describe them.

use super::RoutingError;
use std::io;

use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::AddressFamily;

use crate::plan::{FwmarkRule, LocalRoute};
use tproxy_cni_policy::consts::RT_PROTOCOL;
use tproxy_cni_policy::{Cidr, Family};

pub(super) fn family(f: Family) -> AddressFamily {
    match f {
        Family::V4 => AddressFamily::Inet,
        Family::V6 => AddressFamily::Inet6,
    }
}

pub(super) fn describe_rule(r: &FwmarkRule) -> String {
    format!(
        "{} rule fwmark {:#x}/{:#x} lookup {} priority {}",
        r.family, r.mark, r.mask, r.table, r.priority
    )
}

pub(super) fn describe_route(r: &LocalRoute) -> String {
    format!("{} route local default dev lo table {}", r.family, r.table)
}

/// The rule as we add it: with our protocol tag.
pub(super) fn rule_msg(r: &FwmarkRule) -> RuleMessage {
    let mut m = untagged_rule_msg(r);
    m.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(RT_PROTOCOL)));
    m
}

/// Without a protocol, a delete matches the rule whatever its protocol (rules of releases
/// from before the tag).
pub(super) fn untagged_rule_msg(r: &FwmarkRule) -> RuleMessage {
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

pub(super) fn lo_index() -> Result<u32, RoutingError> {
    nix::net::if_::if_nametoindex("lo").map_err(|e| RoutingError::Kernel {
        what: "looking up interface lo".into(),
        err: io::Error::from_raw_os_error(e as i32),
    })
}

pub(super) fn route_msg(r: &LocalRoute, lo: u32) -> RouteMessage {
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
pub(super) fn untagged_route_msg(r: &LocalRoute, lo: u32) -> RouteMessage {
    let mut m = route_msg(r, lo);
    m.header.protocol = RouteProtocol::Unspec;
    m
}

pub(super) fn addr_msg(c: &Cidr, lo: u32) -> AddressMessage {
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
