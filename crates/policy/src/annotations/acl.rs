//! IP access control on the TCP peer and on the effective client, with the meaning Istio's
//! AuthorizationPolicy gives its source fields: `ipBlocks` match the TCP peer (the last hop);
//! `remoteIpBlocks` match the effective client found by the PROXY protocol or X-Forwarded-For
//! (the TCP peer when neither applies). Pure: no I/O.
//!
//! Evaluation, as Istio orders its actions: deny lists first (peer, then client); then, for each
//! non-empty allow list, the address must be in it. Empty lists impose nothing, so an empty
//! [`Acl`] allows everything.
//!
//! Timing for the wiring: [`Acl::check_peer`] needs only the accepted socket, so it runs before
//! any byte is read (and, being about the peer alone, could also be enforced in the plugin's
//! nftables table: [`Acl::peer_only`]); [`Acl::check_client`] runs once the PROXY header or
//! each HTTP request's XFF has given the effective client.

use std::net::IpAddr;

use crate::netaddr::Cidr;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// `ipBlocks` of ALLOW: the TCP peer must be in one (when not empty).
    pub allow_peer: Vec<Cidr>,
    /// `ipBlocks` of DENY.
    pub deny_peer: Vec<Cidr>,
    /// `remoteIpBlocks` of ALLOW: the effective client must be in one (when not empty).
    pub allow_client: Vec<Cidr>,
    /// `remoteIpBlocks` of DENY.
    pub deny_client: Vec<Cidr>,
}

/// Why a connection or request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    PeerDenied,
    PeerNotAllowed,
    ClientDenied,
    ClientNotAllowed,
}

impl Denied {
    /// A stable name for metrics labels and the access log.
    pub fn label(&self) -> &'static str {
        match self {
            Denied::PeerDenied => "peer_denied",
            Denied::PeerNotAllowed => "peer_not_allowed",
            Denied::ClientDenied => "client_denied",
            Denied::ClientNotAllowed => "client_not_allowed",
        }
    }
}

fn any(list: &[Cidr], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    list.iter().any(|c| c.contains(&ip))
}

fn decide(allow: &[Cidr], deny: &[Cidr], ip: IpAddr, d: Denied, na: Denied) -> Result<(), Denied> {
    if any(deny, ip) {
        Err(d)
    } else if !allow.is_empty() && !any(allow, ip) {
        Err(na)
    } else {
        Ok(())
    }
}

impl Acl {
    pub fn is_empty(&self) -> bool {
        self.allow_peer.is_empty()
            && self.deny_peer.is_empty()
            && self.allow_client.is_empty()
            && self.deny_client.is_empty()
    }

    /// True when every rule is about the TCP peer (nothing to wait for after accept).
    pub fn peer_only(&self) -> bool {
        self.allow_client.is_empty() && self.deny_client.is_empty()
    }

    /// The peer rules (`ipBlocks`).
    pub fn check_peer(&self, peer: IpAddr) -> Result<(), Denied> {
        decide(
            &self.allow_peer,
            &self.deny_peer,
            peer,
            Denied::PeerDenied,
            Denied::PeerNotAllowed,
        )
    }

    /// The client rules (`remoteIpBlocks`); pass the TCP peer when there is no PROXY header
    /// or XFF-derived client.
    pub fn check_client(&self, client: IpAddr) -> Result<(), Denied> {
        decide(
            &self.allow_client,
            &self.deny_client,
            client,
            Denied::ClientDenied,
            Denied::ClientNotAllowed,
        )
    }

    /// Both, denials first (a denied client is reported as such even if the peer is also not
    /// allowed).
    pub fn check(&self, peer: IpAddr, client: IpAddr) -> Result<(), Denied> {
        if any(&self.deny_peer, peer) {
            return Err(Denied::PeerDenied);
        }
        if any(&self.deny_client, client) {
            return Err(Denied::ClientDenied);
        }
        self.check_peer(peer)?;
        self.check_client(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    #[test]
    fn empty_acl_allows_everything() {
        let acl = Acl::default();
        assert!(acl.is_empty() && acl.peer_only());
        for a in ["0.0.0.0", "203.0.113.1", "::", "2001:db8::1"] {
            assert_eq!(acl.check(ip(a), ip(a)), Ok(()));
        }
    }

    #[test]
    fn table() {
        let acl = Acl {
            allow_peer: cidrs(&["10.0.0.0/8", "fd00::/8"]),
            deny_peer: cidrs(&["10.66.0.0/16"]),
            allow_client: cidrs(&["198.51.100.0/24", "2001:db8:1::/48"]),
            deny_client: cidrs(&["198.51.100.66/32", "2001:db8:1:66::/64"]),
        };
        assert!(!acl.peer_only());
        let cases: &[(&str, &str, Result<(), Denied>)] = &[
            // (peer, effective client, verdict)
            ("10.1.1.1", "198.51.100.1", Ok(())),
            ("fd00::5", "2001:db8:1::7", Ok(())),
            ("::ffff:10.1.1.1", "::ffff:198.51.100.1", Ok(())),
            ("10.66.1.1", "198.51.100.1", Err(Denied::PeerDenied)),
            ("192.0.2.1", "198.51.100.1", Err(Denied::PeerNotAllowed)),
            ("10.1.1.1", "198.51.100.66", Err(Denied::ClientDenied)),
            ("10.1.1.1", "2001:db8:1:66::1", Err(Denied::ClientDenied)),
            ("10.1.1.1", "203.0.113.1", Err(Denied::ClientNotAllowed)),
            ("fd00::5", "198.51.100.0", Ok(())),
            // Families do not cross: an IPv6 client is not in an IPv4 allow list.
            ("10.1.1.1", "2001:db8:2::1", Err(Denied::ClientNotAllowed)),
            // Denials come first: the denied client is reported, not the unallowed peer.
            ("192.0.2.1", "198.51.100.66", Err(Denied::ClientDenied)),
        ];
        for (peer, client, want) in cases {
            assert_eq!(acl.check(ip(peer), ip(client)), *want, "{peer} {client}");
        }
        assert_eq!(acl.check_peer(ip("10.66.0.1")), Err(Denied::PeerDenied));
        assert_eq!(
            acl.check_client(ip("203.0.113.1")),
            Err(Denied::ClientNotAllowed)
        );
    }

    #[test]
    fn deny_only_and_allow_only() {
        let deny = Acl {
            deny_client: cidrs(&["0.0.0.0/0"]),
            ..Acl::default()
        };
        assert_eq!(deny.check_client(ip("1.2.3.4")), Err(Denied::ClientDenied));
        assert_eq!(deny.check_client(ip("2001:db8::1")), Ok(()));
        let allow = Acl {
            allow_peer: cidrs(&["192.0.2.7/32"]),
            ..Acl::default()
        };
        assert!(allow.peer_only());
        assert_eq!(allow.check_peer(ip("192.0.2.7")), Ok(()));
        assert_eq!(
            allow.check_peer(ip("192.0.2.8")),
            Err(Denied::PeerNotAllowed)
        );
        let labels: std::collections::HashSet<_> = [
            Denied::PeerDenied,
            Denied::PeerNotAllowed,
            Denied::ClientDenied,
            Denied::ClientNotAllowed,
        ]
        .iter()
        .map(Denied::label)
        .collect();
        assert_eq!(labels.len(), 4);
    }
}
