//! Address newtypes: which address plays which role on a proxied connection is a type question.
//!
//! A transparent proxy juggles four socket addresses per connection; swapping two of them
//! (dialing the client, binding to the destination) compiles fine with bare `SocketAddr`s and
//! fails at runtime in confusing ways. Each role gets its own type.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The downstream peer: the client that opened the connection (the accepted socket's peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ClientAddr(pub SocketAddr);

/// Where the client meant to go: in tproxy mode the accepted socket's local address, in redirect
/// and outbound mode what `SO_ORIGINAL_DST` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct OrigDst(pub SocketAddr);

/// The local address of our upstream socket (what the app or remote server sees as its peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct UpstreamLocal(pub SocketAddr);

/// The address a listener accepted a connection on (the downstream local address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct DownstreamLocal(pub SocketAddr);

impl ClientAddr {
    pub(crate) fn ip(&self) -> IpAddr {
        self.0.ip()
    }
}

impl OrigDst {
    pub(crate) fn port(&self) -> u16 {
        self.0.port()
    }
}

/// Folds an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) back to IPv4, so a connection is
/// described the same way whichever listener family accepted it.
pub(crate) fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

macro_rules! display_inner {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    )*};
}
display_inner!(ClientAddr, OrigDst, UpstreamLocal, DownstreamLocal);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmap_folds_v4_mapped_only() {
        let m: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(unmap(m), "10.0.0.1:80".parse::<SocketAddr>().unwrap());
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(unmap(v6), v6);
        assert_eq!(ClientAddr(v6).to_string(), "[fd00::1]:80");
    }
}
