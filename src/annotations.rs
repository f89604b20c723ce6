//! Pod annotations (ours, Istio's, Kuma's) -> `PodPolicy`. Pure: no I/O; every error names the key.
//!
//! Precedence, field by field: `tproxy-cni.io/*` first, then Istio's, then Kuma's, then the
//! conflist defaults. So a pod migrated from Istio keeps working, and our key overrides it.

use std::collections::BTreeMap;
use std::fmt;

use crate::consts::ANNOTATION_PREFIX;
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

/// An annotation that could not be used. Displays as `annotation "KEY"="VALUE": REASON`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key:?}={value:?}: {reason}")]
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
];

const ISTIO_MODE: &str = "sidecar.istio.io/interceptionMode";
const ISTIO: &str = "traffic.sidecar.istio.io/";
const KUMA: &str = "traffic.kuma.io/";

/// Most entries one list may hold: each becomes a rule, and a pod should not be able to make
/// the plugin build an unbounded ruleset.
pub const MAX_LIST: usize = 256;

/// Annotation keys that can set one field, highest precedence first.
struct Sources(&'static [&'static str]);

const S_INBOUND: Sources = Sources(&[
    "tproxy-cni.io/inbound-ports",
    "traffic.sidecar.istio.io/includeInboundPorts",
]);
const S_EX_INBOUND: Sources = Sources(&[
    "tproxy-cni.io/exclude-inbound-ports",
    "traffic.sidecar.istio.io/excludeInboundPorts",
    "traffic.kuma.io/exclude-inbound-ports",
]);
const S_IN_OUT_CIDR: Sources = Sources(&[
    "tproxy-cni.io/include-outbound-ip-ranges",
    "traffic.sidecar.istio.io/includeOutboundIPRanges",
]);
const S_EX_OUT_CIDR: Sources = Sources(&[
    "tproxy-cni.io/exclude-outbound-ip-ranges",
    "traffic.sidecar.istio.io/excludeOutboundIPRanges",
    "traffic.kuma.io/exclude-outbound-ips",
]);
const S_IN_OUT_PORTS: Sources = Sources(&[
    "tproxy-cni.io/include-outbound-ports",
    "traffic.sidecar.istio.io/includeOutboundPorts",
]);
const S_EX_OUT_PORTS: Sources = Sources(&[
    "tproxy-cni.io/exclude-outbound-ports",
    "traffic.sidecar.istio.io/excludeOutboundPorts",
    "traffic.kuma.io/exclude-outbound-ports",
]);
const S_MODE: Sources = Sources(&["tproxy-cni.io/mode", ISTIO_MODE]);

impl Sources {
    /// The first key present, with its value.
    fn pick<'a>(&self, ann: &'a BTreeMap<String, String>) -> Option<(&'static str, &'a str)> {
        self.0
            .iter()
            .find_map(|k| ann.get(*k).map(|v| (*k, v.as_str())))
    }
}

impl PodPolicy {
    /// Validates the annotations that concern us and derives the pod's policy.
    /// Annotations of other tools are ignored; ours, Istio's and Kuma's traffic keys are checked.
    pub fn from_annotations(
        ann: &BTreeMap<String, String>,
        defaults: &Defaults,
    ) -> Result<PodPolicy, PolicyError> {
        for (k, v) in ann {
            if let Some(rest) = k.strip_prefix(ANNOTATION_PREFIX) {
                if !OUR_KEYS.contains(&rest) {
                    return Err(err(
                        k,
                        v,
                        format!(
                            "unknown key; known keys under {ANNOTATION_PREFIX}: {}",
                            OUR_KEYS.join(", ")
                        ),
                    ));
                }
            }
        }

        let mode = match S_MODE.pick(ann) {
            Some((k, v)) => Mode::parse(v).ok_or_else(|| {
                err(
                    k,
                    v,
                    "unknown mode; expected tproxy, redirect or none (any case)",
                )
            })?,
            None => defaults.mode,
        };

        let fail = match ann.get("tproxy-cni.io/fail-mode") {
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
            if let Some(c) = inc.iter().find(|c| exclude_cidrs.contains(c)) {
                let (ek, ev) = S_EX_OUT_CIDR.pick(ann).unwrap_or(("", ""));
                return Err(err(ek, ev, format!("{c} is both included and excluded")));
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

        let proxy_uid = match ann.get("tproxy-cni.io/proxy-uid") {
            Some(v) => id("tproxy-cni.io/proxy-uid", v)?,
            None => defaults.proxy_uid,
        };
        let proxy_gid = match ann.get("tproxy-cni.io/proxy-gid") {
            Some(v) => Some(id("tproxy-cni.io/proxy-gid", v)?),
            None => defaults.proxy_gid,
        };

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
        })
    }
}

/// True when any annotation concerns us (ours, Istio's traffic keys, Kuma's traffic keys).
pub fn mentions_us(ann: &BTreeMap<String, String>) -> bool {
    ann.keys().any(|k| {
        k.starts_with(ANNOTATION_PREFIX)
            || k == ISTIO_MODE
            || k.starts_with(ISTIO)
            || k.starts_with(KUMA)
    })
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
                .map_err(|e| err(key, value, e.to_string()))
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
            c.parse::<Cidr>()
                .map_err(|e| err(key, value, e.to_string()))
        })
        .collect()
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
        assert!(!mentions_us(&ann(&[("unrelated.io/x", "y")])));
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
}
