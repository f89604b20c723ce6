//! The effective client: one decision, from the TCP peer, a trusted PROXY header or
//! X-Forwarded-For, used by the dial, PROXY-out, X-Forwarded-For, the access control and the
//! access log alike (docs/ARCHITECTURE.md, pitfall 65).
//!
//! A claimed address (PROXY header source, or the XFF element the trust rule picked) is believed
//! only if a remote client could have it: not loopback, not unspecified or `0.0.0.0/8` ("this
//! network"), not `240.0.0.0/4` (reserved, which holds the limited broadcast), not multicast,
//! not a directed broadcast of one of the pod's subnets and not one of the pod's own addresses.
//! A refused claim falls back to the address it was claimed over (the TCP peer, or the client
//! of the PROXY header), and the fallback is counted
//! (`tproxy_sidecar_effective_client_fallback_total`) and named in the access log's
//! `client_address_source`.

use std::net::{IpAddr, Ipv4Addr};

use super::xff::{Effective, Source};

/// The pod's own addresses and its IPv4 subnets' directed broadcasts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodAddrs {
    own: Vec<IpAddr>,
    broadcasts: Vec<Ipv4Addr>,
}

impl PodAddrs {
    pub(crate) fn new(own: Vec<IpAddr>, broadcasts: Vec<Ipv4Addr>) -> PodAddrs {
        PodAddrs {
            own: own.into_iter().map(|a| a.to_canonical()).collect(),
            broadcasts,
        }
    }

    /// The addresses of every interface of the current netns (the pod's, when the sidecar runs
    /// in it), and for each IPv4 subnet of /30 or wider its directed broadcast. Empty if the
    /// interfaces cannot be read; the destination of each connection is checked as well.
    pub(crate) fn from_interfaces() -> PodAddrs {
        let mut own = Vec::new();
        let mut broadcasts = Vec::new();
        if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
            for a in addrs {
                let Some(addr) = a.address else { continue };
                if let Some(v4) = addr.as_sockaddr_in() {
                    let ip = v4.ip();
                    own.push(IpAddr::V4(ip));
                    if let Some(mask) = a.netmask.as_ref().and_then(|m| m.as_sockaddr_in()) {
                        let m = u32::from(mask.ip());
                        if m.leading_ones() <= 30 {
                            broadcasts.push(Ipv4Addr::from(u32::from(ip) | !m));
                        }
                    }
                } else if let Some(v6) = addr.as_sockaddr_in6() {
                    own.push(IpAddr::V6(v6.ip()));
                }
            }
        }
        own.sort();
        own.dedup();
        broadcasts.sort();
        broadcasts.dedup();
        PodAddrs::new(own, broadcasts)
    }
}

/// What a claimed client address is checked against.
#[derive(Debug, Clone, Copy)]
pub struct ClientCheck<'a> {
    pub pod: &'a PodAddrs,
    /// The address the client connected to (the pod's own, in tproxy mode).
    pub local: Option<IpAddr>,
}

/// Why a claimed client address was not believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Loopback,
    /// `0.0.0.0/8` or `::`.
    Unspecified,
    Multicast,
    /// `240.0.0.0/4` (the limited broadcast 255.255.255.255 included).
    Reserved,
    /// The directed broadcast of one of the pod's subnets.
    Broadcast,
    /// One of the pod's own addresses.
    PodAddress,
}

impl Refused {
    /// A stable name for the metric label and the access log.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Refused::Loopback => "loopback",
            Refused::Unspecified => "unspecified",
            Refused::Multicast => "multicast",
            Refused::Reserved => "reserved",
            Refused::Broadcast => "broadcast",
            Refused::PodAddress => "pod_address",
        }
    }
}

impl ClientCheck<'_> {
    /// Whether a remote client can have `ip` (IPv4-mapped addresses are judged as IPv4).
    pub(crate) fn check(&self, ip: IpAddr) -> Result<IpAddr, Refused> {
        let ip = ip.to_canonical();
        match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                if o[0] == 127 {
                    return Err(Refused::Loopback);
                }
                if o[0] == 0 {
                    return Err(Refused::Unspecified);
                }
                if v4.is_multicast() {
                    return Err(Refused::Multicast);
                }
                if o[0] >= 240 {
                    return Err(Refused::Reserved);
                }
                if self.pod.broadcasts.contains(&v4) {
                    return Err(Refused::Broadcast);
                }
            }
            IpAddr::V6(v6) => {
                if v6.is_loopback() {
                    return Err(Refused::Loopback);
                }
                if v6.is_unspecified() {
                    return Err(Refused::Unspecified);
                }
                if v6.is_multicast() {
                    return Err(Refused::Multicast);
                }
            }
        }
        if self.pod.own.contains(&ip) || self.local.map(|l| l.to_canonical()) == Some(ip) {
            return Err(Refused::PodAddress);
        }
        Ok(ip)
    }
}

/// The effective client and how it was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decided {
    pub client: IpAddr,
    /// The access log's `client_address_source`.
    pub source: &'static str,
    /// Set when a claim was refused and the client fell back (count it).
    pub refused: Option<Refused>,
}

/// Where the claim came from.
#[derive(Debug, Clone, Copy)]
pub enum Claim {
    /// The source address of a trusted PROXY header.
    ProxyProtocol(IpAddr),
    /// What [`super::xff::effective_client`] found for one request.
    Xff(Effective),
}

/// The one decision: `base` is the address the claim was made over (the TCP peer, or the
/// client a PROXY header named, already decided by this function).
pub(crate) fn decide(
    base: IpAddr,
    base_source: &'static str,
    claim: Claim,
    ck: &ClientCheck<'_>,
) -> Decided {
    let base = base.to_canonical();
    let keep = |source, refused| Decided {
        client: base,
        source,
        refused,
    };
    match claim {
        Claim::ProxyProtocol(ip) => match ck.check(ip) {
            Ok(client) => Decided {
                client,
                source: "proxy_protocol",
                refused: None,
            },
            Err(r) => keep("peer_refused_proxy_protocol", Some(r)),
        },
        Claim::Xff(eff) => match eff.source {
            Source::Peer => keep(base_source, None),
            Source::PeerMalformedXff => keep("peer_malformed_xff", None),
            Source::Xff { .. } => match ck.check(eff.client) {
                Ok(client) => Decided {
                    client,
                    source: "xff",
                    refused: None,
                },
                Err(r) => keep("peer_refused_xff", Some(r)),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn pod() -> PodAddrs {
        PodAddrs::new(
            vec![ip("10.1.0.5"), ip("fd00:1::5")],
            vec!["10.1.0.255".parse().unwrap()],
        )
    }

    #[test]
    fn addresses_a_remote_client_cannot_have_are_refused() {
        let p = pod();
        let ck = ClientCheck {
            pod: &p,
            local: Some(ip("10.1.0.6")),
        };
        for (bad, why) in [
            ("127.0.0.1", Refused::Loopback),
            ("127.9.9.9", Refused::Loopback),
            ("::1", Refused::Loopback),
            ("::ffff:127.0.0.1", Refused::Loopback),
            ("0.0.0.0", Refused::Unspecified),
            ("0.1.2.3", Refused::Unspecified),
            ("::", Refused::Unspecified),
            ("224.0.0.1", Refused::Multicast),
            ("239.255.255.250", Refused::Multicast),
            ("ff02::1", Refused::Multicast),
            ("240.0.0.1", Refused::Reserved),
            ("255.255.255.255", Refused::Reserved),
            ("10.1.0.255", Refused::Broadcast),
            ("10.1.0.5", Refused::PodAddress),
            ("::ffff:10.1.0.5", Refused::PodAddress),
            ("fd00:1::5", Refused::PodAddress),
            ("10.1.0.6", Refused::PodAddress),
        ] {
            assert_eq!(ck.check(ip(bad)), Err(why), "{bad}");
        }
        for good in [
            "203.0.113.7",
            "10.1.0.7",
            "192.0.2.1",
            "2001:db8::7",
            "fd00:1::6",
        ] {
            assert_eq!(ck.check(ip(good)), Ok(ip(good)), "{good}");
        }
        assert_eq!(ck.check(ip("::ffff:203.0.113.7")), Ok(ip("203.0.113.7")));
    }

    #[test]
    fn refused_claims_fall_back_to_the_base_and_say_so() {
        let p = pod();
        let ck = ClientCheck {
            pod: &p,
            local: None,
        };
        let peer = ip("192.0.2.9");
        let d = decide(peer, "peer", Claim::ProxyProtocol(ip("127.0.0.1")), &ck);
        assert_eq!(
            (d.client, d.source, d.refused),
            (peer, "peer_refused_proxy_protocol", Some(Refused::Loopback))
        );
        let d = decide(peer, "peer", Claim::ProxyProtocol(ip("203.0.113.1")), &ck);
        assert_eq!(
            (d.client, d.source, d.refused),
            (ip("203.0.113.1"), "proxy_protocol", None)
        );
        let xff = |client: &str| {
            Claim::Xff(Effective {
                client: ip(client),
                source: Source::Xff { from_right: 1 },
            })
        };
        let d = decide(ip("203.0.113.1"), "proxy_protocol", xff("10.1.0.255"), &ck);
        assert_eq!(
            (d.client, d.source, d.refused),
            (
                ip("203.0.113.1"),
                "peer_refused_xff",
                Some(Refused::Broadcast)
            )
        );
        let d = decide(peer, "peer", xff("198.51.100.4"), &ck);
        assert_eq!((d.client, d.source), (ip("198.51.100.4"), "xff"));
        let peer_eff = Claim::Xff(Effective {
            client: peer,
            source: Source::Peer,
        });
        assert_eq!(decide(peer, "peer", peer_eff, &ck).source, "peer");
    }
}
