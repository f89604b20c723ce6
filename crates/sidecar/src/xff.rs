//! X-Forwarded-For: the effective client of an HTTP request, and the header values the sidecar
//! forwards. Pure: no I/O, no header parsing beyond the XFF value itself.
//!
//! # Which client is trusted
//! The sidecar plays the part of an Envoy edge proxy (`use_remote_address: true`), which is what
//! an Istio gateway with `gatewayTopology.numTrustedProxies: N` is: Envoy's
//! `xff_num_trusted_hops` is set to N. Envoy's documented rule (HTTP connection manager, header
//! `x-forwarded-for`, "trusted client address"), applied to the XFF the request arrives with,
//! before anything is appended:
//! - N = 0: the TCP peer; XFF is ignored.
//! - N > 0: the Nth address from the right of XFF; with fewer than N addresses, the TCP peer.
//!
//! Said another way: the (N+1)th address from the right of "XFF, then the peer". With peer `p`:
//!
//! | incoming XFF  | N = 0 | N = 1 | N = 2 |
//! |---------------|-------|-------|-------|
//! | (none)        | p     | p     | p     |
//! | `a`           | p     | a     | p     |
//! | `a, b`        | p     | b     | a     |
//! | `a, b, c`     | p     | c     | b     |
//!
//! Envoy's documented examples are a table test in `edge/tests.rs`.
//!
//! The trusted-CIDR alternative (Envoy's `xff_trusted_cidrs`): when the peer is in a trusted
//! CIDR, walk XFF from the right and take the first address that is not in a trusted CIDR; if
//! every address is trusted, the leftmost. An untrusted peer, or no XFF: the peer.
//!
//! # Parsing the header value
//! All `X-Forwarded-For` field lines of a request count, in order, as one comma-separated list
//! (RFC 9110 list semantics). Each element is trimmed of spaces and tabs and may be an IPv4
//! address, an IPv6 address, `[IPv6]`, `IPv4:port` or `[IPv6]:port` (some balancers append
//! ports; the port is dropped). IPv4-mapped IPv6 addresses count as IPv4. Anything else (empty
//! elements, zone ids, host names, RFC 7239 `unknown`) is malformed. Elements left of the one
//! the rule picks are never looked at. If the picked element, or any element the CIDR walk
//! passes, is malformed, the effective client is the peer (fail closed: a malformed value can
//! never become the client). Whatever is found is reported with how it was derived
//! ([`Source`]) for the access log.
//!
//! # What is forwarded
//! - `X-Forwarded-For`: the incoming value with the peer appended (`, ` separated), as Envoy
//!   does; incoming elements are kept, because the app may log them, and are not trusted here.
//! - The other forwarding headers, and the check of the client found here: modules `edge` and
//!   `client`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tproxy_cni_policy::XffTrust;

/// Where the effective client came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The TCP peer (no usable XFF, or XFF not trusted).
    Peer,
    /// The element `from_right` places from the right of the incoming XFF (1 = rightmost).
    Xff { from_right: usize },
    /// The peer, because the element the rule picked was malformed.
    PeerMalformedXff,
}

impl Source {
    /// A stable name for the access log.
    pub fn label(&self) -> &'static str {
        match self {
            Source::Peer => "peer",
            Source::Xff { .. } => "xff",
            Source::PeerMalformedXff => "peer_malformed_xff",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective {
    pub client: IpAddr,
    pub source: Source,
}

/// One element of an XFF list, parsed.
pub(crate) fn parse_element(raw: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(trim(raw)).ok()?;
    let ip = if let Some(rest) = s.strip_prefix('[') {
        // [v6] or [v6]:port
        let (inner, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(valid_port)) {
            return None;
        }
        IpAddr::V6(inner.parse::<Ipv6Addr>().ok()?)
    } else if let Ok(ip) = s.parse::<IpAddr>() {
        ip
    } else {
        // v4:port (a bare v6 address has more than one colon and parsed above, or is invalid)
        let (host, port) = s.split_once(':')?;
        if !valid_port(port) {
            return None;
        }
        IpAddr::V4(host.parse::<Ipv4Addr>().ok()?)
    };
    Some(ip.to_canonical())
}

fn valid_port(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 5
        && p.bytes().all(|b| b.is_ascii_digit())
        && p.parse::<u16>().is_ok()
}

fn trim(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// The elements of all XFF field lines, rightmost first (raw, untrimmed). A field line that is
/// empty or only whitespace contributes nothing.
fn elements_from_right<'a>(values: &'a [&'a [u8]]) -> impl Iterator<Item = &'a [u8]> + 'a {
    values
        .iter()
        .rev()
        .filter(|v| !trim(v).is_empty())
        .flat_map(|v| v.rsplit(|&b| b == b','))
}

/// The effective client of a request from `peer` carrying the XFF field lines `xff` (in order).
pub(crate) fn effective_client(xff: &[&[u8]], peer: IpAddr, trust: &XffTrust) -> Effective {
    let peer = peer.to_canonical();
    let from_peer = |source| Effective {
        client: peer,
        source,
    };
    match trust {
        XffTrust::Hops(0) => from_peer(Source::Peer),
        XffTrust::Hops(n) => {
            let n = *n as usize;
            match elements_from_right(xff).nth(n - 1) {
                None => from_peer(Source::Peer),
                Some(raw) => match parse_element(raw) {
                    Some(client) => Effective {
                        client,
                        source: Source::Xff { from_right: n },
                    },
                    None => from_peer(Source::PeerMalformedXff),
                },
            }
        }
        XffTrust::Cidrs(cidrs) => {
            let trusted = |ip: &IpAddr| cidrs.iter().any(|c| c.contains(ip));
            if !trusted(&peer) {
                return from_peer(Source::Peer);
            }
            let mut last = None;
            for (i, raw) in elements_from_right(xff).enumerate() {
                let Some(ip) = parse_element(raw) else {
                    return from_peer(Source::PeerMalformedXff);
                };
                let here = Effective {
                    client: ip,
                    source: Source::Xff { from_right: i + 1 },
                };
                if !trusted(&ip) {
                    return here;
                }
                last = Some(here);
            }
            last.unwrap_or(from_peer(Source::Peer))
        }
    }
}

/// The `X-Forwarded-For` value to forward: the incoming field lines joined with `, `, then the
/// peer (IPv4-mapped peers written as IPv4, IPv6 without brackets).
pub(crate) fn appended_xff(xff: &[&[u8]], peer: IpAddr) -> Vec<u8> {
    let mut out = Vec::new();
    for v in xff {
        let v = trim(v);
        if !v.is_empty() {
            out.extend_from_slice(v);
            out.extend_from_slice(b", ");
        }
    }
    out.extend_from_slice(peer.to_canonical().to_string().as_bytes());
    out
}

/// Convenience for callers holding a socket address.
pub(crate) fn peer_ip(peer: SocketAddr) -> IpAddr {
    peer.ip().to_canonical()
}

#[cfg(test)]
mod tests;
