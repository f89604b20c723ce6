//! The request head the app receives on an X-Forwarded-For port: the sidecar is the edge, as an
//! Envoy with `use_remote_address: true` is, so every header that tells the app who the client
//! is, or how it connected, is the sidecar's own (docs/ARCHITECTURE.md, pitfalls 66-68).
//! Pure: no I/O.
//!
//! - `x-forwarded-for`: the incoming value with the peer appended (module `xff`).
//! - `x-envoy-external-address`: always the effective client (module `client`). No request is
//!   internal (pitfall 66), so it is always set.
//! - `x-envoy-internal`: always removed (Envoy removes it from external requests).
//! - `x-forwarded-proto`: the client's value (`http` or `https`) only from a trusted downstream
//!   (a hop count above 0, or a peer in the trusted CIDRs), else `http`: the sidecar's
//!   listener is plain TCP (Envoy trusts it only when `xff_num_trusted_hops` is non-zero).
//! - A field whose name equals one of those four once `_` is read as `-`
//!   (`X_Forwarded_For`) is dropped: WSGI and CGI servers fold both to the same variable
//!   (pitfall 67). Envoy's `headers_with_underscores_action: DROP_HEADER` does that to every
//!   such name; we drop only the aliases of the names we vouch for.
//! - `Upgrade: h2c` is removed with `HTTP2-Settings` and the matching `Connection` tokens, as
//!   Envoy's HTTP/1 codec does: the request goes on as HTTP/1.1 (pitfall 68).

use std::net::IpAddr;

use super::client::{self, Claim, ClientCheck, Decided};
use super::http1::{list_elements, RequestHead, Version};
use super::xff::{self, Effective};
use tproxy_cni_policy::XffTrust;

pub const XFF: &str = "x-forwarded-for";
pub const EXTERNAL_ADDRESS: &str = "x-envoy-external-address";
pub(crate) const INTERNAL: &str = "x-envoy-internal";
pub(crate) const PROTO: &str = "x-forwarded-proto";

/// The names whose values the sidecar sets itself.
pub(crate) const PROTECTED: [&str; 4] = [XFF, EXTERNAL_ADDRESS, INTERNAL, PROTO];

/// Whether `name` is a protected name, or one once `_` is read as `-` (ASCII case-insensitive).
pub(crate) fn is_protected(name: &[u8]) -> bool {
    PROTECTED.iter().any(|p| {
        p.len() == name.len()
            && name
                .iter()
                .zip(p.bytes())
                .all(|(&c, want)| c.to_ascii_lowercase() == want || (c == b'_' && want == b'-'))
    })
}

/// The head to send to the app and what was decided on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeRewrite {
    pub head: Vec<u8>,
    /// What the XFF rule alone found (before the client check).
    pub xff: Effective,
    /// The effective client of this request.
    pub decided: Decided,
    /// The request still asks to switch protocols (an `h2c` upgrade no longer does).
    pub upgrade: bool,
}

/// Rewrites one request head. `peer` is the connection's effective client (the TCP peer, or
/// the client a trusted PROXY header named) and `peer_source` how it was found.
pub fn rewrite(
    buf: &[u8],
    head: &RequestHead,
    peer: IpAddr,
    peer_source: &'static str,
    trust: &XffTrust,
    ck: &ClientCheck<'_>,
) -> EdgeRewrite {
    let named = |name: &'static str| {
        head.fields
            .iter()
            .filter(move |f| buf[f.name.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|f| &buf[f.value.clone()])
    };
    let incoming: Vec<&[u8]> = named(XFF).collect();
    let eff = xff::effective_client(&incoming, peer, trust);
    let decided = client::decide(peer, peer_source, Claim::Xff(eff), ck);
    let appended = xff::appended_xff(&incoming, peer);

    let trusted_downstream = match trust {
        XffTrust::Hops(n) => *n > 0,
        XffTrust::Cidrs(c) => c.iter().any(|c| c.contains(&peer.to_canonical())),
    };
    let protos: Vec<&[u8]> = named(PROTO).collect();
    let proto: &[u8] = match protos.as_slice() {
        [p] if trusted_downstream && p.eq_ignore_ascii_case(b"https") => b"https",
        _ => b"http",
    };

    // Also without `Connection: upgrade`: an app should ignore such a field, but need not.
    let h2c = list_elements(named("upgrade"))
        .iter()
        .any(|t| t.eq_ignore_ascii_case(b"h2c"));
    let connection = if h2c {
        let kept: Vec<&[u8]> = list_elements(named("connection"))
            .into_iter()
            .filter(|t| {
                !t.eq_ignore_ascii_case(b"upgrade") && !t.eq_ignore_ascii_case(b"http2-settings")
            })
            .collect();
        Some(kept.join(&b", "[..]))
    } else {
        None
    };
    let drop = |name: &[u8]| {
        is_protected(name)
            || (h2c
                && ["upgrade", "http2-settings", "connection"]
                    .iter()
                    .any(|n| name.eq_ignore_ascii_case(n.as_bytes())))
    };

    let external = decided.client.to_string().into_bytes();
    let mut add: Vec<(&str, &[u8])> = Vec::with_capacity(4);
    if let Some(c) = connection.as_deref().filter(|c| !c.is_empty()) {
        add.push(("connection", c));
    }
    add.push((XFF, &appended));
    add.push((EXTERNAL_ADDRESS, &external));
    add.push((PROTO, proto));
    EdgeRewrite {
        head: write_head(buf, head, drop, &add),
        xff: eff,
        decided,
        upgrade: head.upgrade && !h2c,
    }
}

/// The head with the fields `drop` names left out and `add` appended. Empty lines before the
/// request line are not copied.
fn write_head(
    buf: &[u8],
    head: &RequestHead,
    drop: impl Fn(&[u8]) -> bool,
    add: &[(&str, &[u8])],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.head_len - head.start + 128);
    out.extend_from_slice(&buf[head.start..head.target.end]);
    out.extend_from_slice(match head.version {
        Version::Http11 => b" HTTP/1.1\r\n",
        Version::Http10 => b" HTTP/1.0\r\n",
    });
    for f in &head.fields {
        if drop(&buf[f.name.clone()]) {
            continue;
        }
        out.extend_from_slice(&buf[f.line.clone()]);
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in add {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests;
