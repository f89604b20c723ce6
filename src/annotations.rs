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
pub mod kuma;
mod mode;
pub mod yaml;

pub use mode::pod_mode;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use crate::cni::error::echo;
use crate::consts::ANNOTATION_PREFIX;
use crate::netaddr::{Cidr, ParseError, PortRange};

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
    pub fn parse(s: &str) -> Option<Mode> {
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
    pub fn is_nothing(&self) -> bool {
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
pub const ISTIO_PROXY_CONFIG: &str = "proxy.istio.io/config";

/// Most `numTrustedProxies` / `xff-num-trusted-proxies` accepted.
pub const MAX_TRUSTED_HOPS: u32 = 64;

/// Longest YAML value parsed (`proxy.istio.io/config`, Kuma's merged config): a pod should
/// not make the plugin parse megabytes of YAML. The reader bounds nodes and depth as well
/// (`yaml`, docs/ARCHITECTURE.md, pitfall 60).
pub const MAX_PROXY_CONFIG: usize = 64 * 1024;

/// Parses a YAML or JSON annotation value within [`MAX_PROXY_CONFIG`] and the reader's
/// bounds; errors name `key`.
fn yaml_value(key: &str, value: &str) -> Result<yaml::Node, PolicyError> {
    if value.len() > MAX_PROXY_CONFIG {
        return Err(err(
            key,
            value,
            format!("longer than {MAX_PROXY_CONFIG} bytes"),
        ));
    }
    yaml::parse(value).map_err(|e| err(key, value, e))
}

const ISTIO_MODE: &str = "sidecar.istio.io/interceptionMode";

/// A mark another mesh's injector leaves on a pod it manages: `key` present (with `value`, when
/// one is given) means that mesh intercepts the pod's traffic itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshMark {
    pub mesh: &'static str,
    pub key: &'static str,
    /// The value that marks the pod (compared case-insensitively); `None`: any value.
    pub value: Option<&'static str>,
}

/// The signals of a pod managed by another mesh (README, "Pods of other meshes").
pub const MESH_MARKS: &[MeshMark] = &[
    // Written by Istio's sidecar injector on every pod it injects.
    MeshMark {
        mesh: "Istio (sidecar)",
        key: "sidecar.istio.io/status",
        value: None,
    },
    // Written by istio-cni in ambient mode on pods whose traffic ztunnel captures.
    MeshMark {
        mesh: "Istio (ambient)",
        key: "ambient.istio.io/redirection",
        value: Some("enabled"),
    },
    // Written by istio-cni on a partly enrolled pod: its redirection rules are already in the
    // pod's netns, ztunnel does not have the pod yet (README, "Pods of other meshes").
    MeshMark {
        mesh: "Istio (ambient)",
        key: "ambient.istio.io/redirection",
        value: Some("pending"),
    },
    // Written by Kuma's injector on the pods it injects.
    MeshMark {
        mesh: "Kuma",
        key: "kuma.io/sidecar-injected",
        value: Some("true"),
    },
    // Written by Linkerd's proxy injector (the version of the proxy it added).
    MeshMark {
        mesh: "Linkerd",
        key: "linkerd.io/proxy-version",
        value: None,
    },
    // Written by Consul's connect injector.
    MeshMark {
        mesh: "Consul",
        key: "consul.hashicorp.com/connect-inject-status",
        value: Some("injected"),
    },
];

/// The first mark of another mesh's injector on the pod, if any.
pub fn foreign_mesh(ann: &BTreeMap<String, String>) -> Option<(&'static MeshMark, &str)> {
    MESH_MARKS.iter().find_map(|m| {
        let v = ann.get(m.key)?;
        let hit = match m.value {
            None => !v.trim().is_empty(),
            Some(want) => v.trim().eq_ignore_ascii_case(want),
        };
        hit.then_some((m, v.as_str()))
    })
}

/// Why the plugin leaves this pod alone although the config or annotations might ask for
/// interception: another mesh manages it and our own `tproxy-cni.io/mode` is not set.
pub fn skip_reason(ann: &BTreeMap<String, String>) -> Option<String> {
    if ann.contains_key(OUR_MODE) {
        return None;
    }
    foreign_mesh(ann).map(|(m, v)| {
        format!(
            "managed by {} ({}={}); left alone (set {} to intercept it anyway)",
            m.mesh,
            m.key,
            echo(v),
            OUR_MODE
        )
    })
}

/// Most entries one list may hold: each becomes a rule, and a pod should not be able to make
/// the plugin build an unbounded ruleset.
pub const MAX_LIST: usize = 256;

/// Our mode key.
const OUR_MODE: &str = "tproxy-cni.io/mode";

/// Where one field can come from.
enum Src {
    /// An annotation of its own.
    Key(&'static str),
    /// A field of Kuma's merged annotation ([`kuma::KEY`]).
    Kuma(&'static str),
}

/// The places that can set one field, highest precedence first.
struct Sources(&'static [Src]);

const S_INBOUND: Sources = Sources(&[
    Src::Key("tproxy-cni.io/inbound-ports"),
    Src::Key("traffic.sidecar.istio.io/includeInboundPorts"),
]);
const S_EX_INBOUND: Sources = Sources(&[
    Src::Key("tproxy-cni.io/exclude-inbound-ports"),
    Src::Key("traffic.sidecar.istio.io/excludeInboundPorts"),
    Src::Kuma(kuma::INBOUND_PORTS),
    Src::Key("traffic.kuma.io/exclude-inbound-ports"),
]);
const S_IN_OUT_CIDR: Sources = Sources(&[
    Src::Key("tproxy-cni.io/include-outbound-ip-ranges"),
    Src::Key("traffic.sidecar.istio.io/includeOutboundIPRanges"),
]);
const S_EX_OUT_CIDR: Sources = Sources(&[
    Src::Key("tproxy-cni.io/exclude-outbound-ip-ranges"),
    Src::Key("traffic.sidecar.istio.io/excludeOutboundIPRanges"),
    Src::Kuma(kuma::OUTBOUND_IPS),
    Src::Key("traffic.kuma.io/exclude-outbound-ips"),
]);
const S_IN_OUT_PORTS: Sources = Sources(&[
    Src::Key("tproxy-cni.io/include-outbound-ports"),
    Src::Key("traffic.sidecar.istio.io/includeOutboundPorts"),
]);
const S_EX_OUT_PORTS: Sources = Sources(&[
    Src::Key("tproxy-cni.io/exclude-outbound-ports"),
    Src::Key("traffic.sidecar.istio.io/excludeOutboundPorts"),
    Src::Kuma(kuma::OUTBOUND_PORTS),
    Src::Key("traffic.kuma.io/exclude-outbound-ports"),
]);

/// The pod's annotations with Kuma's merged config read (once, and only when a field of
/// the pod's mode needs it).
struct Ann<'a> {
    map: &'a BTreeMap<String, String>,
    kuma: kuma::Exclusions,
}

impl Sources {
    /// The first source present: the annotation key to name in errors, and the value.
    fn pick<'a>(&self, ann: &'a Ann<'_>) -> Option<(&'static str, &'a str)> {
        self.0.iter().find_map(|s| match s {
            Src::Key(k) => ann.map.get(*k).map(|v| (*k, v.as_str())),
            Src::Kuma(field) => ann.kuma.get(field).map(|v| (kuma::KEY, v)),
        })
    }
}

impl PodPolicy {
    /// Validates the annotations that concern us and derives the pod's policy.
    /// Annotations of other tools are ignored; ours, Istio's and Kuma's traffic keys are checked.
    pub fn from_annotations(
        ann: &BTreeMap<String, String>,
        defaults: &Defaults,
    ) -> Result<PodPolicy, PolicyError> {
        let mode = pod_mode(ann, defaults)?;
        // Another mesh's pod: its Istio/Kuma keys configure that mesh, not us; only ours count,
        // and without our mode key the pod is left alone.
        let foreign = foreign_mesh(ann).is_some();
        let own_only: BTreeMap<String, String>;
        let ann = if foreign {
            own_only = ann
                .iter()
                .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            &own_only
        } else {
            ann
        };
        // Kuma's merged config counts only for pods without another mesh's mark (it was
        // filtered out above otherwise), and only its exclusions are read.
        let kuma = match ann.get(kuma::KEY) {
            Some(v) => kuma::exclusions(v)?,
            None => kuma::Exclusions::default(),
        };
        let map = ann;
        let ann = &Ann { map, kuma };

        let fail = match map.get("tproxy-cni.io/fail-mode") {
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "closed" => FailMode::Closed,
                "open" => FailMode::Open,
                _ => return Err(err("tproxy-cni.io/fail-mode", v, "expected closed or open")),
            },
            None => defaults.fail,
        };

        let inbound_ports = match S_INBOUND.pick(ann) {
            Some((k, v)) => port_selector(k, v)?,
            None => Selector::All,
        };
        let mut exclude_inbound_ports = defaults.exclude_inbound_ports.clone();
        let ex_in_key = S_EX_INBOUND.pick(ann);
        if let Some((k, v)) = ex_in_key {
            exclude_inbound_ports.extend(port_list(k, v)?);
        }
        if let (Selector::List(inc), Some((ek, ev))) = (&inbound_ports, ex_in_key) {
            let user_ex = port_list(ek, ev)?;
            if let Some((i, e)) = first_covered(inc, &user_ex) {
                let (ik, _) = S_INBOUND.pick(ann).unwrap_or(("", ""));
                return Err(err(
                    ek,
                    ev,
                    format!("{e} excludes all of {i} in {ik:?}: the include could never match"),
                ));
            }
        }

        let include_cidrs = match S_IN_OUT_CIDR.pick(ann) {
            Some((k, v)) => cidr_selector(k, v)?,
            None => Selector::List(Vec::new()),
        };
        let exclude_cidrs = match S_EX_OUT_CIDR.pick(ann) {
            Some((k, v)) => cidr_list(k, v)?,
            None => Vec::new(),
        };
        if let Selector::List(inc) = &include_cidrs {
            if let Some((i, e)) = first_covered_cidr(inc, &exclude_cidrs) {
                let (ek, ev) = S_EX_OUT_CIDR.pick(ann).unwrap_or(("", ""));
                let (ik, _) = S_IN_OUT_CIDR.pick(ann).unwrap_or(("", ""));
                let why = if i == e {
                    format!("{i} is both included and excluded")
                } else {
                    format!("{e} excludes all of {i} in {ik:?}: the include could never match")
                };
                return Err(err(ek, ev, why));
            }
        }
        let include_ports = match S_IN_OUT_PORTS.pick(ann) {
            Some((k, v)) => port_list(k, v)?,
            None => Vec::new(),
        };
        let exclude_ports = match S_EX_OUT_PORTS.pick(ann) {
            Some((k, v)) => port_list(k, v)?,
            None => Vec::new(),
        };
        if let Some((i, e)) = first_covered(&include_ports, &exclude_ports) {
            let (ek, ev) = S_EX_OUT_PORTS.pick(ann).unwrap_or(("", ""));
            return Err(err(
                ek,
                ev,
                format!("{e} excludes all of included outbound port {i}"),
            ));
        }

        let proxy_uid = match map.get("tproxy-cni.io/proxy-uid") {
            Some(v) => id("tproxy-cni.io/proxy-uid", v)?,
            None => defaults.proxy_uid,
        };
        let proxy_gid = match map.get("tproxy-cni.io/proxy-gid") {
            Some(v) => Some(id("tproxy-cni.io/proxy-gid", v)?),
            None => defaults.proxy_gid,
        };

        let north_south = NorthSouth::from_annotations(map)?;
        let covered = |key: &str, ranges: &[PortRange]| -> Result<(), PolicyError> {
            let value = map.get(key).map(String::as_str).unwrap_or("");
            for r in ranges {
                if let Some(e) = exclude_inbound_ports.iter().find(|e| e.overlaps(r)) {
                    return Err(err(
                        key,
                        value,
                        format!("{r} overlaps the excluded inbound port(s) {e}: the sidecar never sees it"),
                    ));
                }
                if let Selector::List(inc) = &inbound_ports {
                    if !inc.iter().any(|i| i.lo <= r.lo && r.hi <= i.hi) {
                        return Err(err(
                            key,
                            value,
                            format!("{r} is not within the captured inbound ports"),
                        ));
                    }
                }
            }
            Ok(())
        };
        if let Selector::List(l) = &north_south.proxy_protocol_ports {
            covered("tproxy-cni.io/proxy-protocol-ports", l)?;
        }
        covered("tproxy-cni.io/xff-ports", &north_south.xff_ports)?;
        let out: Vec<PortRange> = north_south
            .proxy_protocol_out
            .iter()
            .map(|(r, _)| *r)
            .collect();
        covered("tproxy-cni.io/proxy-protocol-out", &out)?;

        Ok(PodPolicy {
            mode,
            fail,
            inbound_ports,
            exclude_inbound_ports,
            outbound: OutboundPolicy {
                include_cidrs,
                exclude_cidrs,
                include_ports,
                exclude_ports,
            },
            proxy_uid,
            proxy_gid,
            north_south,
        })
    }
}

/// What Istio's `proxy.istio.io/config` says about the gateway topology.
#[derive(Debug, Default, PartialEq, Eq)]
struct IstioTopology {
    num_trusted_proxies: Option<u32>,
    proxy_protocol: bool,
}

fn istio_topology(value: &str) -> Result<IstioTopology, PolicyError> {
    let key = ISTIO_PROXY_CONFIG;
    let doc = yaml_value(key, value)?;
    if doc.is_null() {
        return Ok(IstioTopology::default());
    }
    if !matches!(doc, yaml::Node::Map(_)) {
        return Err(err(key, value, "expected a mapping (a ProxyConfig)"));
    }
    let gt = match doc.get("gatewayTopology") {
        None => return Ok(IstioTopology::default()),
        Some(gt) if gt.is_null() => return Ok(IstioTopology::default()),
        Some(gt @ yaml::Node::Map(_)) => gt,
        Some(_) => return Err(err(key, value, "gatewayTopology must be a mapping")),
    };
    let num_trusted_proxies = match gt.get("numTrustedProxies") {
        None => None,
        Some(v) if v.is_null() => None,
        Some(v) => match v.as_u64() {
            Some(n) if n <= u64::from(MAX_TRUSTED_HOPS) => Some(n as u32),
            _ => {
                return Err(err(
                    key,
                    value,
                    format!(
                        "gatewayTopology.numTrustedProxies must be a number 0-{MAX_TRUSTED_HOPS}"
                    ),
                ))
            }
        },
    };
    let proxy_protocol = match gt.get("proxyProtocol") {
        None => false,
        Some(v) if v.is_null() => false,
        Some(yaml::Node::Map(_)) => true,
        Some(_) => {
            return Err(err(
                key,
                value,
                "gatewayTopology.proxyProtocol must be a mapping (e.g. {})",
            ))
        }
    };
    Ok(IstioTopology {
        num_trusted_proxies,
        proxy_protocol,
    })
}

fn pp_out_list(key: &str, value: &str) -> Result<Vec<(PortRange, PpVersion)>, PolicyError> {
    items(key, value)?
        .into_iter()
        .map(|item| {
            let (p, v) = item.rsplit_once(':').ok_or_else(|| {
                err(
                    key,
                    value,
                    format!("{} is not PORT:v1 or PORT:v2", echo(item)),
                )
            })?;
            let version = match v.trim().to_ascii_lowercase().as_str() {
                "v1" | "1" => PpVersion::V1,
                "v2" | "2" => PpVersion::V2,
                _ => {
                    return Err(err(
                        key,
                        value,
                        format!("{} is not PORT:v1 or PORT:v2", echo(item)),
                    ))
                }
            };
            let range = p
                .trim()
                .parse::<PortRange>()
                .map_err(|e| err(key, value, reason(&e)))?;
            Ok((range, version))
        })
        .collect()
}

impl NorthSouth {
    /// Reads the north-south keys (ours, then Istio's `proxy.istio.io/config`). Checks the keys
    /// among themselves; [`PodPolicy::from_annotations`] also checks them against the captured
    /// ports. The sidecar calls this with its flags under the same key names.
    pub fn from_annotations(ann: &BTreeMap<String, String>) -> Result<NorthSouth, PolicyError> {
        let k = |name: &str| format!("{ANNOTATION_PREFIX}{name}");
        let get = |name: &str| {
            let key = k(name);
            ann.get(&key).map(|v| (key, v.as_str()))
        };
        let istio = match ann.get(ISTIO_PROXY_CONFIG) {
            Some(v) => istio_topology(v)?,
            None => IstioTopology::default(),
        };
        let mut ns = NorthSouth::default();

        let pp_ports = get("proxy-protocol-ports");
        let pp_trusted = get("proxy-protocol-trusted-cidrs");
        match &pp_ports {
            Some((key, v)) => ns.proxy_protocol_ports = port_selector(key, v)?,
            // Istio's gateway: every listener expects the header (from everyone, unless our
            // trusted-CIDR key narrows it).
            None if istio.proxy_protocol => ns.proxy_protocol_ports = Selector::All,
            None => {}
        }
        match &pp_trusted {
            Some((key, v)) => ns.proxy_protocol_trusted = cidr_list(key, v)?,
            None if istio.proxy_protocol => {
                ns.proxy_protocol_trusted = ["0.0.0.0/0", "::/0"]
                    .iter()
                    .filter_map(|c| c.parse().ok())
                    .collect()
            }
            None => {}
        }
        let pp_on = !ns.proxy_protocol_ports.is_nothing();
        if pp_on && ns.proxy_protocol_trusted.is_empty() {
            let (key, v) = pp_ports.clone().unwrap_or_default();
            return Err(err(
                &key,
                v,
                format!(
                    "needs {} (the balancers' addresses; 0.0.0.0/0,::/0 requires the header from everyone)",
                    k("proxy-protocol-trusted-cidrs")
                ),
            ));
        }
        if !pp_on && !ns.proxy_protocol_trusted.is_empty() {
            let (key, v) = pp_trusted.clone().unwrap_or_default();
            return Err(err(
                &key,
                v,
                format!("has no effect without {}", k("proxy-protocol-ports")),
            ));
        }
        if let Some((key, v)) = get("proxy-protocol-out") {
            ns.proxy_protocol_out = pp_out_list(&key, v)?;
        }

        if let Some((key, v)) = get("xff-ports") {
            ns.xff_ports = port_list(&key, v)?;
        }
        if let Some((key, v)) = get("xff-connect-ports") {
            ns.xff_connect_ports = port_list(&key, v)?;
            if let Some(r) = ns
                .xff_connect_ports
                .iter()
                .find(|r| (r.lo..=r.hi).any(|p| !ns.xff_on(p)))
            {
                return Err(err(&key, v, format!("{r} is not in {}", k("xff-ports"))));
            }
        }
        let hops = get("xff-num-trusted-proxies");
        let cidrs = get("xff-trusted-cidrs");
        ns.xff_trust = match (&hops, &cidrs) {
            (Some(_), Some((key, v))) => {
                return Err(err(
                    key,
                    v,
                    format!(
                        "use either this or {}, not both",
                        k("xff-num-trusted-proxies")
                    ),
                ))
            }
            (Some((key, v)), None) => {
                let t = v.trim();
                match t.parse::<u32>() {
                    Ok(n) if n <= MAX_TRUSTED_HOPS && t.bytes().all(|b| b.is_ascii_digit()) => {
                        XffTrust::Hops(n)
                    }
                    _ => {
                        return Err(err(
                            key,
                            v,
                            format!("expected a number 0-{MAX_TRUSTED_HOPS}"),
                        ))
                    }
                }
            }
            (None, Some((key, v))) => XffTrust::Cidrs(cidr_list(key, v)?),
            (None, None) => XffTrust::Hops(istio.num_trusted_proxies.unwrap_or(0)),
        };
        if ns.xff_ports.is_empty() {
            if let Some((key, v)) = hops.as_ref().or(cidrs.as_ref()) {
                return Err(err(
                    key,
                    v,
                    format!("has no effect without {}", k("xff-ports")),
                ));
            }
        }

        for (name, list) in [
            ("allow-peer-cidrs", &mut ns.acl.allow_peer),
            ("deny-peer-cidrs", &mut ns.acl.deny_peer),
            ("allow-client-cidrs", &mut ns.acl.allow_client),
            ("deny-client-cidrs", &mut ns.acl.deny_client),
        ] {
            if let Some((key, v)) = get(name) {
                *list = cidr_list(&key, v)?;
            }
        }
        Ok(ns)
    }
}

/// An included entry that an excluded one covers entirely: the include could never match, so
/// the pair is a mistake. (An exclude inside a wider include is fine: "9000-9100 but not 9090".)
fn first_covered(inc: &[PortRange], ex: &[PortRange]) -> Option<(PortRange, PortRange)> {
    inc.iter().find_map(|i| {
        ex.iter()
            .find(|e| e.lo <= i.lo && i.hi <= e.hi)
            .map(|e| (*i, *e))
    })
}

/// The CIDR version of [`first_covered`]: an included range inside an excluded one.
fn first_covered_cidr(inc: &[Cidr], ex: &[Cidr]) -> Option<(Cidr, Cidr)> {
    inc.iter().find_map(|i| {
        ex.iter()
            .find(|e| e.family() == i.family() && e.prefix() <= i.prefix() && e.contains(&i.addr()))
            .map(|e| (*i, *e))
    })
}

/// A parse error with the offending entry cut like every echoed value.
fn reason(e: &ParseError) -> String {
    match e {
        ParseError::BadCidr(s) => format!("{} is not an IP address or CIDR", echo(s)),
        ParseError::HostBits(s, c) => {
            format!("{} has host bits set (did you mean {c}?)", echo(s))
        }
        ParseError::BadPort(s) => {
            format!("{} is not a port (1-65535) or port range (lo-hi)", echo(s))
        }
    }
}

fn items<'a>(key: &str, value: &'a str) -> Result<Vec<&'a str>, PolicyError> {
    let t = value.trim();
    if t.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = t.split(',').map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err(key, value, "empty entry in comma-separated list"));
    }
    if parts.len() > MAX_LIST {
        return Err(err(key, value, format!("more than {MAX_LIST} entries")));
    }
    Ok(parts)
}

fn port_list(key: &str, value: &str) -> Result<Vec<PortRange>, PolicyError> {
    items(key, value)?
        .into_iter()
        .map(|p| {
            if p == "*" {
                return Err(err(key, value, "\"*\" is not allowed in this list"));
            }
            p.parse::<PortRange>()
                .map_err(|e| err(key, value, reason(&e)))
        })
        .collect()
}

fn port_selector(key: &str, value: &str) -> Result<Selector<PortRange>, PolicyError> {
    if value.trim() == "*" {
        return Ok(Selector::All);
    }
    Ok(Selector::List(port_list(key, value)?))
}

fn cidr_list(key: &str, value: &str) -> Result<Vec<Cidr>, PolicyError> {
    items(key, value)?
        .into_iter()
        .map(|c| {
            if c == "*" {
                return Err(err(key, value, "\"*\" is not allowed in this list"));
            }
            let cidr = c.parse::<Cidr>().map_err(|e| err(key, value, reason(&e)))?;
            refuse_v4_mapped(key, value, c, cidr)
        })
        .collect()
}

/// Clients and peers are compared as IPv4 once IPv4-mapped, so a range written in the mapped
/// form (`::ffff:10.1.0.0/112`) would never match anything: refused, with the IPv4 spelling
/// (docs/ARCHITECTURE.md, pitfall 69).
fn refuse_v4_mapped(key: &str, value: &str, entry: &str, cidr: Cidr) -> Result<Cidr, PolicyError> {
    let IpAddr::V6(v6) = cidr.addr() else {
        return Ok(cidr);
    };
    match v6.to_ipv4_mapped() {
        Some(v4) if cidr.prefix() >= 96 => Err(err(
            key,
            value,
            format!(
                "{} is an IPv4-mapped IPv6 range, which never matches (addresses are compared as IPv4): write {v4}/{}",
                echo(entry),
                cidr.prefix() - 96
            ),
        )),
        _ => Ok(cidr),
    }
}

fn cidr_selector(key: &str, value: &str) -> Result<Selector<Cidr>, PolicyError> {
    if value.trim() == "*" {
        return Ok(Selector::All);
    }
    Ok(Selector::List(cidr_list(key, value)?))
}

fn id(key: &str, value: &str) -> Result<u32, PolicyError> {
    let t = value.trim();
    if t.is_empty() || t.len() > 10 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(key, value, "expected a numeric id (0-4294967294)"));
    }
    match t.parse::<u64>() {
        // 4294967295 is (uid_t)-1, "no id" to the kernel.
        Ok(n) if n < u64::from(u32::MAX) => Ok(n as u32),
        _ => Err(err(key, value, "expected a numeric id (0-4294967294)")),
    }
}

/// Parses the Kubernetes downward-API annotations file: one `key="value"` per line, the value
/// quoted the way Go's `%q` does (escapes such as `\n`, `\"`, `\\`, `\u00e9`).
pub fn parse_downward_api(text: &str) -> Result<BTreeMap<String, String>, PolicyError> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| err(&format!("line {}", n + 1), line, why.to_string());
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| bad("expected key=\"value\""))?;
        let k = k.trim();
        if k.is_empty() {
            return Err(bad("empty key"));
        }
        let v = unquote_go(v.trim()).ok_or_else(|| bad("value is not a Go-quoted string"))?;
        out.insert(k.to_string(), v);
    }
    Ok(out)
}

/// Undoes Go's `strconv.Quote`. `None` on anything malformed.
fn unquote_go(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return None,
            '\\' => {
                let e = chars.next()?;
                match e {
                    'a' => out.push('\x07'),
                    'b' => out.push('\x08'),
                    'f' => out.push('\x0c'),
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    'v' => out.push('\x0b'),
                    '\\' => out.push('\\'),
                    '"' => out.push('"'),
                    '\'' => out.push('\''),
                    'x' | 'u' | 'U' => {
                        let n = match e {
                            'x' => 2,
                            'u' => 4,
                            _ => 8,
                        };
                        let hex: String = chars.by_ref().take(n).collect();
                        if hex.len() != n {
                            return None;
                        }
                        let v = u32::from_str_radix(&hex, 16).ok()?;
                        out.push(char::from_u32(v)?);
                    }
                    '0'..='7' => {
                        let rest: String = chars.by_ref().take(2).collect();
                        let oct = format!("{e}{rest}");
                        if oct.len() != 3 {
                            return None;
                        }
                        let v = u32::from_str_radix(&oct, 8).ok()?;
                        out.push(char::from_u32(v)?);
                    }
                    _ => return None,
                }
            }
            c => out.push(c),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn policy(pairs: &[(&str, &str)]) -> Result<PodPolicy, PolicyError> {
        PodPolicy::from_annotations(&ann(pairs), &Defaults::default())
    }

    #[test]
    fn no_annotations_means_default_mode_none() {
        let p = policy(&[("unrelated.io/x", "y")]).unwrap();
        assert_eq!(p.mode, Mode::None);
        assert_eq!(p.inbound_ports, Selector::All);
        assert!(!p.outbound.enabled());
        assert_eq!(p.proxy_uid, 1337);
    }

    #[test]
    fn our_family() {
        let p = policy(&[
            ("tproxy-cni.io/mode", "tproxy"),
            ("tproxy-cni.io/inbound-ports", "80, 8080,9000-9100"),
            ("tproxy-cni.io/exclude-inbound-ports", "9090"),
            (
                "tproxy-cni.io/include-outbound-ip-ranges",
                "10.0.0.0/8,fd00::/8",
            ),
            ("tproxy-cni.io/exclude-outbound-ip-ranges", "10.96.0.1"),
            ("tproxy-cni.io/include-outbound-ports", "5432"),
            ("tproxy-cni.io/exclude-outbound-ports", "53"),
            ("tproxy-cni.io/fail-mode", "closed"),
            ("tproxy-cni.io/proxy-uid", "1000"),
            ("tproxy-cni.io/proxy-gid", "2000"),
        ])
        .unwrap();
        assert_eq!(p.mode, Mode::Tproxy);
        assert_eq!(p.fail, FailMode::Closed);
        assert_eq!(
            p.inbound_ports,
            Selector::List(vec![
                PortRange::single(80),
                PortRange::single(8080),
                PortRange { lo: 9000, hi: 9100 }
            ])
        );
        assert_eq!(
            p.exclude_inbound_ports.last(),
            Some(&PortRange::single(9090))
        );
        assert_eq!(p.exclude_inbound_ports.len(), 4, "sidecar ports + user's");
        assert_eq!(
            p.outbound.include_cidrs,
            Selector::List(vec![
                "10.0.0.0/8".parse().unwrap(),
                "fd00::/8".parse().unwrap()
            ])
        );
        assert_eq!(
            p.outbound.exclude_cidrs,
            vec!["10.96.0.1/32".parse().unwrap()]
        );
        assert_eq!(p.outbound.include_ports, vec![PortRange::single(5432)]);
        assert_eq!(p.outbound.exclude_ports, vec![PortRange::single(53)]);
        assert_eq!((p.proxy_uid, p.proxy_gid), (1000, Some(2000)));
        assert!(p.outbound.enabled());
    }

    #[test]
    fn istio_family() {
        let p = policy(&[
            ("sidecar.istio.io/interceptionMode", "TPROXY"),
            ("traffic.sidecar.istio.io/includeInboundPorts", "*"),
            ("traffic.sidecar.istio.io/excludeInboundPorts", "15020"),
            ("traffic.sidecar.istio.io/includeOutboundIPRanges", "*"),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "169.254.169.254/32",
            ),
            ("traffic.sidecar.istio.io/includeOutboundPorts", ""),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "443"),
        ])
        .unwrap();
        assert_eq!(p.mode, Mode::Tproxy);
        assert_eq!(p.inbound_ports, Selector::All);
        assert_eq!(p.outbound.include_cidrs, Selector::All);
        assert_eq!(
            p.outbound.exclude_cidrs,
            vec!["169.254.169.254/32".parse().unwrap()]
        );
        assert_eq!(p.outbound.exclude_ports, vec![PortRange::single(443)]);
        assert_eq!(
            policy(&[("sidecar.istio.io/interceptionMode", "REDIRECT")])
                .unwrap()
                .mode,
            Mode::Redirect
        );
        assert_eq!(
            policy(&[("sidecar.istio.io/interceptionMode", "NONE")])
                .unwrap()
                .mode,
            Mode::None
        );
        // Istio's "" for includeInboundPorts means: capture no inbound port.
        let p = policy(&[
            ("sidecar.istio.io/interceptionMode", "TPROXY"),
            ("traffic.sidecar.istio.io/includeInboundPorts", ""),
        ])
        .unwrap();
        assert!(p.inbound_ports.is_nothing());
    }

    #[test]
    fn kuma_family_and_precedence() {
        let p = policy(&[
            ("tproxy-cni.io/mode", "redirect"),
            ("sidecar.istio.io/interceptionMode", "TPROXY"),
            ("traffic.kuma.io/exclude-inbound-ports", "7000"),
            ("traffic.kuma.io/exclude-outbound-ports", "25"),
            ("traffic.kuma.io/exclude-outbound-ips", "10.1.0.0/16"),
        ])
        .unwrap();
        assert_eq!(p.mode, Mode::Redirect, "ours beats Istio's");
        assert!(p.exclude_inbound_ports.contains(&PortRange::single(7000)));
        assert_eq!(p.outbound.exclude_ports, vec![PortRange::single(25)]);
        assert_eq!(
            p.outbound.exclude_cidrs,
            vec!["10.1.0.0/16".parse().unwrap()]
        );
        // Ours beats Kuma's for the same field.
        let p = policy(&[
            ("tproxy-cni.io/exclude-inbound-ports", "1"),
            ("traffic.kuma.io/exclude-inbound-ports", "2"),
        ])
        .unwrap();
        assert!(p.exclude_inbound_ports.contains(&PortRange::single(1)));
        assert!(!p.exclude_inbound_ports.contains(&PortRange::single(2)));
    }

    #[test]
    fn every_bad_value_names_its_key() {
        let cases: &[(&str, &str)] = &[
            ("tproxy-cni.io/mode", "bogus"),
            ("sidecar.istio.io/interceptionMode", "TPROXYY"),
            ("tproxy-cni.io/modee", "tproxy"),
            ("tproxy-cni.io/inbound-ports", "80,x"),
            ("tproxy-cni.io/inbound-ports", "0"),
            ("tproxy-cni.io/inbound-ports", "70000"),
            ("tproxy-cni.io/inbound-ports", "90-80"),
            ("tproxy-cni.io/inbound-ports", "80,,90"),
            ("tproxy-cni.io/exclude-inbound-ports", "*"),
            ("traffic.sidecar.istio.io/excludeInboundPorts", "abc"),
            ("traffic.kuma.io/exclude-inbound-ports", "-5"),
            ("tproxy-cni.io/include-outbound-ip-ranges", "10.0.0.0/33"),
            ("tproxy-cni.io/include-outbound-ip-ranges", "10.0.0.1/8"),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "not-a-cidr",
            ),
            ("traffic.kuma.io/exclude-outbound-ips", "1.2.3"),
            ("tproxy-cni.io/include-outbound-ports", "http"),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "1-2-3"),
            ("tproxy-cni.io/fail-mode", "sometimes"),
            ("tproxy-cni.io/proxy-uid", "-1"),
            ("tproxy-cni.io/proxy-uid", "4294967295"),
            ("tproxy-cni.io/proxy-gid", "root"),
        ];
        for (k, v) in cases {
            let e = policy(&[(k, v)]).expect_err(&format!("{k}={v} should fail"));
            assert_eq!(&e.key, k, "{e}");
            assert_eq!(&e.value, v);
            assert!(e.to_string().contains(k), "{e}");
        }
    }

    #[test]
    fn too_long_lists_are_refused() {
        let long = (1..=300)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let e = policy(&[("tproxy-cni.io/inbound-ports", &long)]).unwrap_err();
        assert!(e.reason.contains("more than"), "{e}");
    }

    #[test]
    fn conflicting_include_exclude() {
        let e = policy(&[
            ("tproxy-cni.io/inbound-ports", "8080"),
            ("tproxy-cni.io/exclude-inbound-ports", "8000-8100"),
        ])
        .unwrap_err();
        assert_eq!(e.key, "tproxy-cni.io/exclude-inbound-ports");
        assert!(
            e.reason.contains("8000-8100") && e.reason.contains("tproxy-cni.io/inbound-ports"),
            "{e}"
        );
        let e = policy(&[
            ("tproxy-cni.io/include-outbound-ip-ranges", "10.0.0.0/8"),
            ("tproxy-cni.io/exclude-outbound-ip-ranges", "10.0.0.0/8"),
        ])
        .unwrap_err();
        assert_eq!(e.key, "tproxy-cni.io/exclude-outbound-ip-ranges");
        let e = policy(&[
            ("tproxy-cni.io/include-outbound-ports", "443"),
            ("traffic.kuma.io/exclude-outbound-ports", "443"),
        ])
        .unwrap_err();
        assert_eq!(e.key, "traffic.kuma.io/exclude-outbound-ports");
        // A narrower exclude inside a wider include is legitimate.
        policy(&[
            ("tproxy-cni.io/inbound-ports", "8000-8100"),
            ("tproxy-cni.io/exclude-inbound-ports", "8080"),
        ])
        .unwrap();
        policy(&[
            ("tproxy-cni.io/include-outbound-ip-ranges", "10.0.0.0/8"),
            ("tproxy-cni.io/exclude-outbound-ip-ranges", "10.1.0.0/16"),
        ])
        .unwrap();
    }

    #[test]
    fn cidr_include_inside_a_wider_exclude_is_refused() {
        for (inc, ex) in [
            ("10.1.0.0/16", "10.0.0.0/8"),
            ("10.1.2.3", "10.0.0.0/8"),
            ("192.168.0.0/24,10.1.0.0/16", "10.1.0.0/16"),
            ("fd00:1::/64", "fd00::/16"),
            ("10.0.0.0/8", "0.0.0.0/0"),
        ] {
            let e = policy(&[
                ("tproxy-cni.io/include-outbound-ip-ranges", inc),
                ("tproxy-cni.io/exclude-outbound-ip-ranges", ex),
            ])
            .expect_err(inc);
            assert_eq!(e.key, "tproxy-cni.io/exclude-outbound-ip-ranges", "{e}");
            assert!(
                e.reason.contains("could never match") || e.reason.contains("both"),
                "{e}"
            );
        }
        let e = policy(&[
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "10.1.0.0/16",
            ),
            ("traffic.kuma.io/exclude-outbound-ips", "10.0.0.0/8"),
        ])
        .unwrap_err();
        assert_eq!(e.key, "traffic.kuma.io/exclude-outbound-ips");
        assert!(e.reason.contains("includeOutboundIPRanges"), "{e}");
        // Other families, disjoint and narrower excludes are fine.
        for (inc, ex) in [
            ("10.0.0.0/8", "10.1.0.0/16"),
            ("10.1.0.0/16", "10.2.0.0/16"),
            ("::/0", "0.0.0.0/0"),
            ("10.0.0.0/8", "::/0"),
        ] {
            policy(&[
                ("tproxy-cni.io/include-outbound-ip-ranges", inc),
                ("tproxy-cni.io/exclude-outbound-ip-ranges", ex),
            ])
            .unwrap_or_else(|e| panic!("{inc} / {ex}: {e}"));
        }
    }

    #[test]
    fn long_values_are_not_echoed_whole() {
        let big = format!("80,{}", "9".repeat(1_000_000));
        let e = policy(&[("tproxy-cni.io/inbound-ports", &big)]).unwrap_err();
        let text = e.to_string();
        assert!(text.len() < 400, "{} bytes", text.len());
        assert!(text.contains("(1000003 bytes)"), "{text}");
        let key = format!("tproxy-cni.io/{}", "k".repeat(100_000));
        let e = policy(&[(&key, "x")]).unwrap_err();
        assert!(e.to_string().len() < 800, "{}", e.to_string().len());
    }

    #[test]
    fn pods_of_other_meshes_are_left_alone() {
        let istio = [
            ("sidecar.istio.io/interceptionMode", "TPROXY"),
            ("traffic.sidecar.istio.io/includeInboundPorts", "*"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut v = istio.to_vec();
            v.extend_from_slice(extra);
            v
        };
        // Migrated pod (no injector mark): Istio's keys are honoured.
        assert_eq!(policy(&istio).unwrap().mode, Mode::Tproxy);
        assert_eq!(skip_reason(&ann(&istio)), None);
        for (k, v) in [
            (
                "sidecar.istio.io/status",
                r#"{"containers":["istio-proxy"]}"#,
            ),
            ("ambient.istio.io/redirection", "enabled"),
            ("ambient.istio.io/redirection", "pending"),
            ("kuma.io/sidecar-injected", "true"),
            ("linkerd.io/proxy-version", "stable-2.14.10"),
            ("consul.hashicorp.com/connect-inject-status", "injected"),
        ] {
            let a = with(&[(k, v)]);
            assert_eq!(policy(&a).unwrap().mode, Mode::None, "{k}");
            let why = skip_reason(&ann(&a)).expect(k);
            assert!(
                why.contains(k) && why.contains("tproxy-cni.io/mode"),
                "{why}"
            );
            // Even a conflist default mode does not apply to another mesh's pod.
            let d = Defaults {
                mode: Mode::Tproxy,
                ..Defaults::default()
            };
            assert_eq!(
                PodPolicy::from_annotations(&ann(&a), &d).unwrap().mode,
                Mode::None
            );
            // Our mode wins over the mark, and then only our keys count.
            let mut ours = a.clone();
            ours.push(("tproxy-cni.io/mode", "redirect"));
            ours.push(("traffic.sidecar.istio.io/excludeInboundPorts", "not-a-port"));
            let p = policy(&ours).unwrap();
            assert_eq!(p.mode, Mode::Redirect, "{k}");
            assert_eq!(
                p.exclude_inbound_ports,
                Defaults::default().exclude_inbound_ports
            );
            assert_eq!(skip_reason(&ann(&ours)), None);
        }
        // Values that do not mark a managed pod.
        for (k, v) in [
            ("kuma.io/sidecar-injected", "false"),
            ("ambient.istio.io/redirection", "disabled"),
            ("sidecar.istio.io/status", ""),
            ("sidecar.istio.io/inject", "true"),
        ] {
            assert_eq!(
                policy(&with(&[(k, v)])).unwrap().mode,
                Mode::Tproxy,
                "{k}={v}"
            );
        }
        // Our own keys are still checked on another mesh's pod.
        let e = policy(&[
            ("sidecar.istio.io/status", "{}"),
            ("tproxy-cni.io/modee", "x"),
        ])
        .unwrap_err();
        assert_eq!(e.key, "tproxy-cni.io/modee");
    }

    #[test]
    fn north_south_keys() {
        let p = policy(&[
            ("tproxy-cni.io/mode", "tproxy"),
            ("tproxy-cni.io/proxy-protocol-ports", "8443, 9000-9010"),
            (
                "tproxy-cni.io/proxy-protocol-trusted-cidrs",
                "10.0.0.0/8,fd00::/8",
            ),
            ("tproxy-cni.io/proxy-protocol-out", "9000:v1,9001-9002:V2"),
            ("tproxy-cni.io/xff-ports", "8080"),
            ("tproxy-cni.io/xff-num-trusted-proxies", "2"),
            ("tproxy-cni.io/allow-peer-cidrs", "10.0.0.0/8"),
            ("tproxy-cni.io/deny-peer-cidrs", "10.9.0.0/16"),
            ("tproxy-cni.io/allow-client-cidrs", "0.0.0.0/0,::/0"),
            (
                "tproxy-cni.io/deny-client-cidrs",
                "203.0.113.0/24,2001:db8::/32",
            ),
        ])
        .unwrap();
        let ns = &p.north_south;
        assert!(ns.proxy_protocol_on(8443) && ns.proxy_protocol_on(9005));
        assert!(!ns.proxy_protocol_on(8080));
        assert_eq!(ns.proxy_protocol_trusted.len(), 2);
        assert_eq!(ns.proxy_protocol_out_on(9000), Some(PpVersion::V1));
        assert_eq!(ns.proxy_protocol_out_on(9002), Some(PpVersion::V2));
        assert_eq!(ns.proxy_protocol_out_on(8443), None);
        assert!(ns.xff_on(8080) && !ns.xff_on(8443));
        assert_eq!(ns.xff_trust, XffTrust::Hops(2));
        assert_eq!(ns.acl.deny_client.len(), 2);
        assert_eq!(ns.acl.deny_peer, vec!["10.9.0.0/16".parse().unwrap()]);
        let p = policy(&[
            ("tproxy-cni.io/xff-ports", "8080"),
            ("tproxy-cni.io/xff-trusted-cidrs", "10.0.0.0/8"),
        ])
        .unwrap();
        assert_eq!(
            p.north_south.xff_trust,
            XffTrust::Cidrs(vec!["10.0.0.0/8".parse().unwrap()])
        );
        assert_eq!(policy(&[]).unwrap().north_south, NorthSouth::default());
    }

    #[test]
    fn north_south_bad_values_name_their_key() {
        let cases: &[&[(&str, &str)]] = &[
            &[("tproxy-cni.io/proxy-protocol-ports", "80,x")],
            // Ports without trusted sources, trusted sources without ports.
            &[("tproxy-cni.io/proxy-protocol-ports", "8443")],
            &[("tproxy-cni.io/proxy-protocol-trusted-cidrs", "10.0.0.0/8")],
            &[
                ("tproxy-cni.io/proxy-protocol-ports", "8443"),
                ("tproxy-cni.io/proxy-protocol-trusted-cidrs", "10.0.0.1/8"),
            ],
            // Not captured: an excluded port, the sidecar's own port, outside the include list.
            &[
                ("tproxy-cni.io/proxy-protocol-ports", "9000-9100"),
                ("tproxy-cni.io/proxy-protocol-trusted-cidrs", "10.0.0.0/8"),
                ("tproxy-cni.io/exclude-inbound-ports", "9050"),
            ],
            &[
                ("tproxy-cni.io/proxy-protocol-ports", "15006"),
                ("tproxy-cni.io/proxy-protocol-trusted-cidrs", "10.0.0.0/8"),
            ],
            &[
                ("tproxy-cni.io/proxy-protocol-ports", "8443"),
                ("tproxy-cni.io/proxy-protocol-trusted-cidrs", "10.0.0.0/8"),
                ("tproxy-cni.io/inbound-ports", "80"),
            ],
            &[("tproxy-cni.io/proxy-protocol-out", "9000")],
            &[("tproxy-cni.io/proxy-protocol-out", "9000:v3")],
            &[("tproxy-cni.io/proxy-protocol-out", "x:v1")],
            &[("tproxy-cni.io/proxy-protocol-out", "15021:v1")],
            &[("tproxy-cni.io/xff-ports", "http")],
            &[("tproxy-cni.io/xff-ports", "15001")],
            &[
                ("tproxy-cni.io/xff-ports", "80"),
                ("tproxy-cni.io/xff-num-trusted-proxies", "-1"),
            ],
            &[
                ("tproxy-cni.io/xff-ports", "80"),
                ("tproxy-cni.io/xff-num-trusted-proxies", "65"),
            ],
            &[("tproxy-cni.io/xff-num-trusted-proxies", "1")],
            &[
                ("tproxy-cni.io/xff-ports", "80"),
                ("tproxy-cni.io/xff-num-trusted-proxies", "1"),
                ("tproxy-cni.io/xff-trusted-cidrs", "10.0.0.0/8"),
            ],
            &[("tproxy-cni.io/allow-peer-cidrs", "10.0.0.300")],
            &[("tproxy-cni.io/deny-peer-cidrs", "*")],
            &[("tproxy-cni.io/allow-client-cidrs", "fd00::/129")],
            &[("tproxy-cni.io/deny-client-cidrs", "a,,b")],
            &[("proxy.istio.io/config", "gatewayTopology: [1, 2")],
            &[("proxy.istio.io/config", "- a list")],
            &[(
                "proxy.istio.io/config",
                "gatewayTopology:\n  numTrustedProxies: many\n",
            )],
            &[(
                "proxy.istio.io/config",
                "{\"gatewayTopology\": {\"numTrustedProxies\": -2}}",
            )],
            &[(
                "proxy.istio.io/config",
                "gatewayTopology:\n  proxyProtocol: true\n",
            )],
        ];
        for case in cases {
            let e = policy(case).expect_err(&format!("{case:?} should fail"));
            // The last key of each case is the offending one, except where a missing partner
            // is reported on the key that is present.
            assert!(
                case.iter().any(|(k, _)| *k == e.key),
                "{case:?}: error names {:?}: {e}",
                e.key
            );
            assert!(e.to_string().contains(&e.key), "{e}");
        }
        // The error for a key that needs a partner names the partner too.
        let e = policy(&[("tproxy-cni.io/proxy-protocol-ports", "8443")]).unwrap_err();
        assert!(e.reason.contains("proxy-protocol-trusted-cidrs"), "{e}");
        let e = policy(&[
            ("tproxy-cni.io/xff-ports", "80"),
            ("tproxy-cni.io/xff-num-trusted-proxies", "1"),
            ("tproxy-cni.io/xff-trusted-cidrs", "10.0.0.0/8"),
        ])
        .unwrap_err();
        assert_eq!(e.key, "tproxy-cni.io/xff-trusted-cidrs");
        let big = format!("a: \"{}\"", "x".repeat(MAX_PROXY_CONFIG));
        let e = policy(&[("proxy.istio.io/config", &big)]).unwrap_err();
        assert_eq!(e.key, "proxy.istio.io/config");
    }

    #[test]
    fn istio_proxy_config_gateway_topology() {
        let yaml =
            "concurrency: 2\ngatewayTopology:\n  numTrustedProxies: 2\n  proxyProtocol: {}\n";
        let p = policy(&[
            ("sidecar.istio.io/interceptionMode", "TPROXY"),
            ("proxy.istio.io/config", yaml),
            ("tproxy-cni.io/xff-ports", "8080"),
        ])
        .unwrap();
        let ns = &p.north_south;
        assert_eq!(ns.xff_trust, XffTrust::Hops(2));
        assert_eq!(ns.proxy_protocol_ports, Selector::All);
        // Istio's gateway requires the header from every source.
        for ip in ["198.51.100.7", "2001:db8::7"] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert!(ns.proxy_protocol_trusted.iter().any(|c| c.contains(&ip)));
        }
        // JSON spelling; our keys win over Istio's.
        let json = r#"{"gatewayTopology": {"numTrustedProxies": 3, "proxyProtocol": {}}}"#;
        let p = policy(&[
            ("proxy.istio.io/config", json),
            ("tproxy-cni.io/xff-ports", "8080"),
            ("tproxy-cni.io/xff-num-trusted-proxies", "1"),
            ("tproxy-cni.io/proxy-protocol-trusted-cidrs", "10.1.0.0/16"),
        ])
        .unwrap();
        assert_eq!(p.north_south.xff_trust, XffTrust::Hops(1));
        assert_eq!(
            p.north_south.proxy_protocol_trusted,
            vec!["10.1.0.0/16".parse().unwrap()]
        );
        // Other ProxyConfig fields, and an empty topology, change nothing.
        let p = policy(&[(
            "proxy.istio.io/config",
            "holdApplicationUntilProxyStarts: true\n",
        )])
        .unwrap();
        assert_eq!(p.north_south, NorthSouth::default());
        // Another mesh's pod: Istio's config belongs to that mesh and is ignored.
        let p = policy(&[
            ("sidecar.istio.io/status", "{}"),
            ("proxy.istio.io/config", yaml),
        ])
        .unwrap();
        assert_eq!(p.north_south, NorthSouth::default());
        let p = policy(&[
            ("sidecar.istio.io/status", "{}"),
            ("proxy.istio.io/config", "not: [valid"),
        ]);
        assert!(p.is_ok(), "another mesh's config is not ours to check");
    }

    #[test]
    fn downward_api_file() {
        let text = "kubernetes.io/config.seen=\"2024-01-01T00:00:00Z\"\ntproxy-cni.io/mode=\"tproxy\"\nodd=\"a\\\"b\\\\c\\nd\\u00e9\\x41\\101\"\n\n";
        let m = parse_downward_api(text).unwrap();
        assert_eq!(m["tproxy-cni.io/mode"], "tproxy");
        assert_eq!(m["odd"], "a\"b\\c\ndéAA");
        for bad in [
            "novalue",
            "k=unquoted",
            "k=\"open",
            "k=\"bad\\q\"",
            "=\"v\"",
            "k=\"a\"b\"",
        ] {
            assert!(parse_downward_api(bad).is_err(), "{bad:?}");
        }
        let p = PodPolicy::from_annotations(&m, &Defaults::default()).unwrap();
        assert_eq!(p.mode, Mode::Tproxy);
    }

    #[test]
    fn ipv4_mapped_cidrs_are_refused_with_the_ipv4_spelling() {
        let e = policy(&[(
            "tproxy-cni.io/deny-client-cidrs",
            "10.2.0.0/16, ::ffff:10.1.0.0/112",
        )])
        .unwrap_err();
        assert_eq!(e.key, "tproxy-cni.io/deny-client-cidrs");
        assert!(e.reason.contains("write 10.1.0.0/16"), "{e}");
        let e = policy(&[(
            "tproxy-cni.io/exclude-outbound-ip-ranges",
            "::ffff:192.0.2.7",
        )])
        .unwrap_err();
        assert!(e.reason.contains("write 192.0.2.7/32"), "{e}");
        // Plain IPv6 ranges, even ones that contain the mapped block, stay.
        let p = policy(&[("tproxy-cni.io/deny-client-cidrs", "::/0, 2001:db8::/32")]).unwrap();
        assert_eq!(p.north_south.acl.deny_client.len(), 2);
    }

    #[test]
    fn connect_ports_must_be_xff_ports() {
        let p = policy(&[
            ("tproxy-cni.io/xff-ports", "8080-8090"),
            ("tproxy-cni.io/xff-connect-ports", "8081"),
        ])
        .unwrap();
        assert!(p.north_south.xff_connect_on(8081));
        assert!(!p.north_south.xff_connect_on(8080));
        let e = policy(&[
            ("tproxy-cni.io/xff-ports", "8080"),
            ("tproxy-cni.io/xff-connect-ports", "8080-8081"),
        ])
        .unwrap_err();
        assert_eq!(e.key, "tproxy-cni.io/xff-connect-ports");
        assert!(e.reason.contains("not in tproxy-cni.io/xff-ports"), "{e}");
    }
}
