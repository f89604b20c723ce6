//! One JSON line per connection, with Envoy's access-log field names so existing log pipelines
//! and people who know Envoy read it without a mapping.

use std::fs::OpenOptions;
use std::io::{self, LineWriter, Write};
use std::sync::Mutex;

use serde::Serialize;

use super::config::AccessLogTarget;

/// Why a connection ended, as Envoy's `response_flags` spell it (plus two of our own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// `-`: both sides closed normally.
    Normal,
    /// `UF`: upstream connect failed (refused, unreachable, no usable source port).
    UpstreamConnectFailure,
    /// `UT`: upstream connect timed out.
    UpstreamConnectTimeout,
    /// `UC`: the upstream reset or failed mid-stream.
    UpstreamTermination,
    /// `DC`: the downstream reset or failed mid-stream.
    DownstreamTermination,
    /// `SI`: idle timeout (Envoy's stream idle timeout flag).
    IdleTimeout,
    /// `DR`: cut at the end of the drain deadline (ours).
    Drained,
    /// `NR`: no route: the connection was addressed to the sidecar itself, or its original
    /// destination could not be read (Envoy's "no route" flag).
    NoRoute,
    /// `OM`: out of file descriptors for the upstream socket or the relay's pipe (Envoy's
    /// "overload manager" flag: the proxy itself lacked resources).
    Overloaded,
    /// `RL`: the client's IP already held `--max-connections-per-source` (Envoy's "rate
    /// limited" flag).
    SourceLimited,
    /// `RBAC`: refused by the IP access control (a reset, or a 403 on an XFF port).
    Rbac,
    /// `DPE`: the downstream broke its protocol: a trusted source's PROXY header missing,
    /// malformed, oversized or late; an HTTP request answered 400/431/505 on an XFF port
    /// (Envoy's "downstream protocol error"). `response_code_details` says which.
    ProtocolError,
}

impl EndReason {
    pub(crate) fn flag(self) -> &'static str {
        match self {
            EndReason::Normal => "-",
            EndReason::UpstreamConnectFailure => "UF",
            EndReason::UpstreamConnectTimeout => "UT",
            EndReason::UpstreamTermination => "UC",
            EndReason::DownstreamTermination => "DC",
            EndReason::IdleTimeout => "SI",
            EndReason::Drained => "DR",
            EndReason::NoRoute => "NR",
            EndReason::Overloaded => "OM",
            EndReason::SourceLimited => "RL",
            EndReason::Rbac => "RBAC",
            EndReason::ProtocolError => "DPE",
        }
    }
}

/// One access-log record.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Entry {
    pub start_time: String,
    /// The client as Envoy reports it: the address a trusted PROXY header or X-Forwarded-For
    /// gave (the first request's, on an XFF port), else the TCP peer.
    pub downstream_remote_address: String,
    /// The TCP peer (Envoy's `DOWNSTREAM_DIRECT_REMOTE_ADDRESS`).
    pub downstream_direct_remote_address: String,
    /// How `downstream_remote_address` was found: `peer`, `proxy_protocol`,
    /// `proxy_protocol_local` (v2 LOCAL: the peer), `xff`, `peer_malformed_xff` (ours).
    pub client_address_source: &'static str,
    pub downstream_local_address: String,
    /// `null` when no upstream socket was bound.
    pub upstream_local_address: Option<String>,
    pub upstream_host: Option<String>,
    /// Bytes from downstream (relayed upstream).
    pub bytes_received: u64,
    /// Bytes to downstream.
    pub bytes_sent: u64,
    /// Milliseconds from accept to close.
    pub duration: u64,
    /// Milliseconds the upstream connect took (not an Envoy field; stalls show up here).
    pub upstream_connect_ms: Option<f64>,
    pub response_flags: &'static str,
    /// The status of an answer the sidecar itself gave (400, 403, 431, 505); `null` otherwise.
    pub response_code: Option<u16>,
    /// Why the sidecar refused or answered, e.g. `proxy_protocol_timeout`, `rbac_peer_denied`,
    /// `http_head_too_large` (Envoy's `RESPONSE_CODE_DETAILS`); `null` when nothing was refused.
    pub response_code_details: Option<String>,
    /// HTTP requests seen on an XFF port; `null` on byte-relay ports (ours).
    pub http_requests: Option<u64>,
    /// `tproxy`, `redirect` or `outbound`.
    pub mode: &'static str,
}

/// Where lines go; writes are serialised so lines never interleave.
pub(crate) struct AccessLog {
    out: Option<Mutex<Box<dyn Write + Send>>>,
}

impl AccessLog {
    pub(crate) fn open(target: &AccessLogTarget) -> io::Result<AccessLog> {
        let out: Option<Box<dyn Write + Send>> = match target {
            AccessLogTarget::Off => None,
            AccessLogTarget::Stdout => Some(Box::new(LineWriter::new(io::stdout()))),
            AccessLogTarget::File(p) => Some(Box::new(LineWriter::new(
                OpenOptions::new().create(true).append(true).open(p)?,
            ))),
        };
        Ok(AccessLog {
            out: out.map(Mutex::new),
        })
    }

    /// Writes one line. A failing log sink must not take connections down: errors are dropped.
    pub(crate) fn write(&self, e: &Entry) {
        let Some(out) = &self.out else { return };
        let Ok(mut line) = serde_json::to_vec(e) else {
            return;
        };
        line.push(b'\n');
        let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = w.write_all(&line);
    }
}

pub(crate) use tproxy_cni_policy::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_uses_envoy_names() {
        let e = Entry {
            start_time: rfc3339(std::time::UNIX_EPOCH),
            downstream_remote_address: "10.0.0.1:40000".into(),
            downstream_direct_remote_address: "10.0.0.1:40000".into(),
            client_address_source: "peer",
            downstream_local_address: "10.0.0.2:80".into(),
            upstream_local_address: Some("10.0.0.1:20001".into()),
            upstream_host: Some("10.0.0.2:80".into()),
            bytes_received: 1,
            bytes_sent: 2,
            duration: 3,
            upstream_connect_ms: Some(0.25),
            response_flags: EndReason::Normal.flag(),
            response_code: None,
            response_code_details: None,
            http_requests: None,
            mode: "tproxy",
        };
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        for k in [
            "start_time",
            "downstream_remote_address",
            "downstream_direct_remote_address",
            "client_address_source",
            "downstream_local_address",
            "upstream_local_address",
            "upstream_host",
            "bytes_received",
            "bytes_sent",
            "duration",
            "response_flags",
            "response_code",
            "response_code_details",
            "mode",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(v["response_flags"], "-");
    }
}
