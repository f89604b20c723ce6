//! The node's own addresses (read in the host netns), where node-local connections to a pod
//! come from.

use super::msg::family;
use super::{is_no_family, RoutingError, Rtnl};
use std::net::IpAddr;

use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_route::address::{
    AddressAttribute, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::RouteNetlinkMessage;

use tproxy_cni_policy::Family;

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
