//! Pod annotations (ours, Istio's, Kuma's) -> `PodPolicy`. Pure: no I/O; every error names the key.
//!
//! Precedence, field by field: `tproxy-cni.io/*` first, then Istio's, then Kuma's, then the
//! conflist defaults. So a pod migrated from Istio keeps working, and our key overrides it.
//!
//! No double interception: a pod that another mesh's injector manages (see [`MESH_MARKS`]) is
//! left alone unless our own `tproxy-cni.io/mode` says otherwise, and Istio's and Kuma's keys
//! are then ignored, since they configure that mesh's own interception of the same pod.

pub mod acl;
#[cfg(test)]
mod bounded_tests;
mod defaults;
mod downward;
pub(crate) mod kuma;
mod lists;
mod meshes;
mod mode;
mod north_south;
mod pod;
#[cfg(test)]
mod tests;
pub(crate) mod yaml;

pub use downward::parse_downward_api;
pub use meshes::{foreign_mesh, skip_reason, MESH_MARKS};
pub(crate) use mode::pod_mode;

use lists::{cidr_list, port_list, yaml_value};
use meshes::{ISTIO_MODE, OUR_MODE};

use std::fmt;

use crate::echo;
use crate::netaddr::{Cidr, PortRange};

/// How inbound TCP is diverted to the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// TPROXY: the sidecar sees the original packet and dials the app from the client's IP.
    Tproxy,
    /// NAT REDIRECT: what meshes do by default; the app sees 127.0.0.6.
    Redirect,
    /// Nothing is programmed; the result passes through.
    None,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Tproxy => "tproxy",
            Mode::Redirect => "redirect",
            Mode::None => "none",
        }
    }
    /// Parses `tproxy|redirect|none`, case-insensitively (Istio writes `TPROXY`).
    pub(crate) fn parse(s: &str) -> Option<Mode> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tproxy" => Some(Mode::Tproxy),
            "redirect" => Some(Mode::Redirect),
            "none" => Some(Mode::None),
            _ => None,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to inbound connections when no sidecar listens (TPROXY is fail-open by nature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// New connections reach the app directly (without the proxy).
    Open,
    /// New connections are reset.
    Closed,
}

/// `*` (everything) or an explicit list (possibly empty = nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector<T> {
    All,
    List(Vec<T>),
}

impl<T> Selector<T> {
    pub(crate) fn is_nothing(&self) -> bool {
        matches!(self, Selector::List(v) if v.is_empty())
    }
}

/// Outbound capture settings; capture is off when `include_cidrs` and `include_ports` are empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundPolicy {
    pub include_cidrs: Selector<Cidr>,
    pub exclude_cidrs: Vec<Cidr>,
    pub include_ports: Vec<PortRange>,
    pub exclude_ports: Vec<PortRange>,
}

impl OutboundPolicy {
    pub fn enabled(&self) -> bool {
        !self.include_cidrs.is_nothing() || !self.include_ports.is_empty()
    }
}

/// The validated policy for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPolicy {
    pub mode: Mode,
    pub fail: FailMode,
    pub inbound_ports: Selector<PortRange>,
    pub exclude_inbound_ports: Vec<PortRange>,
    pub outbound: OutboundPolicy,
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    /// PROXY protocol, X-Forwarded-For and IP access control (read by the sidecar; the plugin
    /// uses only `proxy_protocol_ports`, for the node-address bypass).
    pub north_south: NorthSouth,
}

/// Which PROXY protocol version the sidecar sends to the app on a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PpVersion {
    V1,
    V2,
}

/// How far `X-Forwarded-For` is trusted on the XFF ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XffTrust {
    /// Istio's `numTrustedProxies` (Envoy's `xff_num_trusted_hops`); 0 = the TCP peer.
    Hops(u32),
    /// Envoy's `xff_trusted_cidrs`.
    Cidrs(Vec<Cidr>),
}

/// North-south settings: where the real client comes from and who may connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NorthSouth {
    /// Inbound ports on which a trusted source must start with a PROXY protocol header.
    pub proxy_protocol_ports: Selector<PortRange>,
    /// Sources whose PROXY header is required and believed; others are never parsed.
    pub proxy_protocol_trusted: Vec<Cidr>,
    /// Ports on which the app is sent a PROXY header carrying the effective client.
    pub proxy_protocol_out: Vec<(PortRange, PpVersion)>,
    /// HTTP/1.1 ports whose requests get `X-Forwarded-For` / `x-envoy-external-address`.
    pub xff_ports: Vec<PortRange>,
    /// XFF ports on which `CONNECT` is forwarded to the app (refused with 403 elsewhere).
    pub xff_connect_ports: Vec<PortRange>,
    pub xff_trust: XffTrust,
    /// `ipBlocks` (TCP peer) and `remoteIpBlocks` (effective client) allow/deny lists.
    pub acl: acl::Acl,
}

impl Default for NorthSouth {
    fn default() -> Self {
        NorthSouth {
            proxy_protocol_ports: Selector::List(Vec::new()),
            proxy_protocol_trusted: Vec::new(),
            proxy_protocol_out: Vec::new(),
            xff_ports: Vec::new(),
            xff_connect_ports: Vec::new(),
            xff_trust: XffTrust::Hops(0),
            acl: acl::Acl::default(),
        }
    }
}

impl NorthSouth {
    /// Whether PROXY protocol is expected on `port`.
    pub fn proxy_protocol_on(&self, port: u16) -> bool {
        match &self.proxy_protocol_ports {
            Selector::All => true,
            Selector::List(l) => l.iter().any(|r| r.contains(port)),
        }
    }
    /// The PROXY header version to send to the app on `port`, if any.
    pub fn proxy_protocol_out_on(&self, port: u16) -> Option<PpVersion> {
        self.proxy_protocol_out
            .iter()
            .find(|(r, _)| r.contains(port))
            .map(|(_, v)| *v)
    }
    pub fn xff_on(&self, port: u16) -> bool {
        self.xff_ports.iter().any(|r| r.contains(port))
    }
    /// Whether `CONNECT` may reach the app on `port` (an XFF port that opted in).
    pub fn xff_connect_on(&self, port: u16) -> bool {
        self.xff_on(port) && self.xff_connect_ports.iter().any(|r| r.contains(port))
    }
}

/// Values used when no annotation says otherwise (from the conflist entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    pub mode: Mode,
    pub fail: FailMode,
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    /// Always excluded from inbound capture (the sidecar's own ports, kubelet probes to them).
    pub exclude_inbound_ports: Vec<PortRange>,
}

impl Default for Defaults {
    fn default() -> Self {
        use crate::consts::*;
        Defaults {
            mode: Mode::None,
            fail: FailMode::Open,
            proxy_uid: PROXY_UID,
            proxy_gid: None,
            exclude_inbound_ports: vec![
                PortRange::single(INBOUND_PORT),
                PortRange::single(OUTBOUND_PORT),
                PortRange::single(ADMIN_PORT),
            ],
        }
    }
}

/// An annotation that could not be used. Displays as `annotation "KEY"="VALUE": REASON`, key
/// and value cut to their first 64 characters (a 10 MB value is not echoed back whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {}={}: {reason}", echo(key), echo(value))]
pub struct PolicyError {
    pub key: String,
    pub value: String,
    pub reason: String,
}

fn err(key: &str, value: &str, reason: impl Into<String>) -> PolicyError {
    PolicyError {
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Our annotation keys (without the prefix). Unknown keys under our prefix are errors, so a
/// typo (`tproxy-cni.io/modee`) is reported instead of silently ignored.
pub const OUR_KEYS: &[&str] = &[
    "mode",
    "inbound-ports",
    "exclude-inbound-ports",
    "include-outbound-ip-ranges",
    "exclude-outbound-ip-ranges",
    "include-outbound-ports",
    "exclude-outbound-ports",
    "fail-mode",
    "proxy-uid",
    "proxy-gid",
    "proxy-protocol-ports",
    "proxy-protocol-trusted-cidrs",
    "proxy-protocol-out",
    "xff-ports",
    "xff-connect-ports",
    "xff-num-trusted-proxies",
    "xff-trusted-cidrs",
    "allow-peer-cidrs",
    "deny-peer-cidrs",
    "allow-client-cidrs",
    "deny-client-cidrs",
];

/// The north-south keys of [`OUR_KEYS`] (the sidecar has a flag of the same name for each).
pub const NORTH_SOUTH_KEYS: &[&str] = &[
    "proxy-protocol-ports",
    "proxy-protocol-trusted-cidrs",
    "proxy-protocol-out",
    "xff-ports",
    "xff-connect-ports",
    "xff-num-trusted-proxies",
    "xff-trusted-cidrs",
    "allow-peer-cidrs",
    "deny-peer-cidrs",
    "allow-client-cidrs",
    "deny-client-cidrs",
];

/// Istio's per-pod proxy configuration (a YAML or JSON `ProxyConfig`); we read
/// `gatewayTopology.numTrustedProxies` and `gatewayTopology.proxyProtocol` from it.
pub(crate) const ISTIO_PROXY_CONFIG: &str = "proxy.istio.io/config";

/// Most `numTrustedProxies` / `xff-num-trusted-proxies` accepted.
pub(crate) const MAX_TRUSTED_HOPS: u32 = 64;

/// Longest YAML value parsed (`proxy.istio.io/config`, Kuma's merged config): a pod should
/// not make the plugin parse megabytes of YAML. The reader bounds nodes and depth as well
/// (`yaml`, docs/ARCHITECTURE.md, pitfall 60).
pub(crate) const MAX_PROXY_CONFIG: usize = 64 * 1024;
