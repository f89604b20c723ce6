//! The plugin's network configuration (stdin): CNI fields, our options, annotations, prevResult.
//!
//! Parsed by hand from a `serde_json::Value` rather than derived, so that every wrong type or
//! value is reported with the key it came from (`"mark": must be a non-zero integer`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Map, Value};

use super::error::{code, echo_json, CniError};
use crate::plan::PlanConfig;
use tproxy_cni_policy::annotations::{Defaults, FailMode, Mode};
use tproxy_cni_policy::consts::{self, POD_ANNOTATIONS_CAPABILITY};
use tproxy_cni_policy::echo;
use tproxy_cni_policy::netaddr::PortRange;

/// CNI versions whose configs we accept; the newest first is what VERSION reports.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Everything from stdin the commands need.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plan: PlanConfig,
    pub defaults: Defaults,
    pub annotations: BTreeMap<String, String>,
    /// `prevResult` exactly as received (key order kept), if any.
    pub prev_result: Option<Value>,
    pub log_level: log::LevelFilter,
    pub log_file: Option<String>,
    /// `nodeBypass` (default true): connections from the node's own addresses reach the app
    /// directly, so kubelet probes test the app and not the proxy (docs/install.md, "Kubelet
    /// probes and the node's own traffic").
    pub node_bypass: bool,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

/// True for versions that know CHECK (0.4.0 and later).
pub fn version_has_check(v: &str) -> bool {
    !matches!(v, "0.3.0" | "0.3.1")
}

/// Longest nftables table name: the kernel's `NFT_TABLE_MAXNAMELEN` (256) less the NUL.
pub const TABLE_NAME_MAX: usize = 255;

/// A table name the kernel and `nft` both take unquoted: a letter or `_` first, then letters,
/// digits, `_`, `-` and `.`, at most 255 bytes. nft's scanner also allows `/` and a leading
/// `.`, the kernel checks only the length; this is the part all three agree on, and what the
/// nftables encoder accepts, so a name passing here never fails later with code 100.
pub fn check_table_name(name: &str) -> Result<(), &'static str> {
    let first_ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if name.len() > TABLE_NAME_MAX {
        return Err("is longer than 255 bytes (the kernel's limit)");
    }
    if !first_ok
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err(
            "must start with a letter or '_' and hold only letters, digits, '_', '-' and '.'",
        );
    }
    Ok(())
}

/// The config's `tableName` (as JSON text) when this plugin refuses it: a string that fails
/// [`check_table_name`], or not a string at all. DEL uses it: no table of ours can carry a name
/// ADD never accepted, so such a DEL has nothing to remove.
pub fn peek_bad_table_name(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    match v.get("tableName")? {
        Value::Null => None,
        Value::String(name) => check_table_name(name).err().map(|_| name.clone()),
        other => Some(other.to_string()),
    }
}

/// Reads `cniVersion` alone (for error objects and VERSION), without validating the rest.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_string)
}

impl NetConf {
    /// Reads the plugin's stdin: every key checked, errors naming the key and value.
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let root: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODE,
                format!("network config on stdin is not valid JSON: {e}"),
            )
        })?;
        let obj = root.as_object().ok_or_else(|| {
            CniError::new(
                code::DECODE,
                "network config on stdin must be a JSON object",
            )
        })?;
        let (cni_version, name) = parse_header(obj)?;
        let (plan, admin_port) = parse_plan_config(obj)?;
        let defaults = parse_defaults(obj, &plan, admin_port)?;
        let log_level = parse_log_level(obj)?;
        let log_file = opt_str(obj, "logFile")?;
        let node_bypass = opt_bool(obj, "nodeBypass")?.unwrap_or(true);
        let annotations = parse_annotations(obj)?;
        let prev_result = parse_prev_result(obj)?;
        Ok(NetConf {
            cni_version,
            name,
            plan,
            defaults,
            annotations,
            prev_result,
            log_level,
            log_file,
            node_bypass,
        })
    }

    /// The pod's own addresses from `prevResult.ips` (`address` is `IP/prefix`; rules in
    /// `podips`). Entries we cannot
    /// read are reported: a malformed prevResult is a broken chain, not something to guess at.
    pub fn pod_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        let Some(prev) = &self.prev_result else {
            return Ok(Vec::new());
        };
        super::podips::pod_addresses(prev)
    }
}

/// `cniVersion` (one we speak) and `name`.
fn parse_header(obj: &Map<String, Value>) -> Result<(String, String), CniError> {
    let cni_version = match obj.get("cniVersion") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(invalid(format!(
                "\"cniVersion\": must be a string, got {}",
                echo_json(other)
            )))
        }
        None => return Err(invalid("\"cniVersion\" is missing")),
    };
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "\"cniVersion\": {} is not supported (supported: {})",
                echo(&cni_version),
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let name = match obj.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(other) => {
            return Err(invalid(format!(
                "\"name\": must be a non-empty string, got {}",
                echo_json(other)
            )))
        }
        None => return Err(invalid("\"name\" is missing")),
    };
    Ok((cni_version, name))
}

/// The numbers of the plan (table, ports, mark, route table, rule priority) and the admin
/// port, each checked.
pub fn parse_plan_config(obj: &Map<String, Value>) -> Result<(PlanConfig, u16), CniError> {
    let d = PlanConfig::default();
    let table_name = opt_str(obj, "tableName")?.unwrap_or(d.table_name);
    if let Err(why) = check_table_name(&table_name) {
        return Err(invalid(format!(
            "\"tableName\": {} {why}",
            echo(&table_name)
        )));
    }
    let inbound_port = opt_port(obj, "inboundPort")?.unwrap_or(d.inbound_port);
    let outbound_port = opt_port(obj, "outboundPort")?.unwrap_or(d.outbound_port);
    let admin_port = opt_port(obj, "adminPort")?.unwrap_or(consts::ADMIN_PORT);
    if inbound_port == outbound_port {
        return Err(invalid(format!(
            "\"outboundPort\": {outbound_port} must differ from \"inboundPort\""
        )));
    }
    let mark = opt_u32(obj, "mark")?.unwrap_or(d.mark);
    if mark == 0 {
        return Err(invalid(
            "\"mark\": must be non-zero (0 is every unmarked packet)",
        ));
    }
    let route_table = opt_u32(obj, "routeTable")?.unwrap_or(d.route_table);
    // 0 = unspec, 253 default, 254 main, 255 local: never ours to fill.
    if matches!(route_table, 0 | 253 | 254 | 255) {
        return Err(invalid(format!(
            "\"routeTable\": {route_table} is reserved (0, 253, 254, 255); pick another id"
        )));
    }
    let rule_priority = opt_u32(obj, "rulePriority")?.unwrap_or(d.rule_priority);
    if rule_priority == 0 || rule_priority >= 32766 {
        return Err(invalid(format!(
            "\"rulePriority\": {rule_priority} must be between 1 and 32765 (before the main table)"
        )));
    }
    Ok((
        PlanConfig {
            table_name,
            inbound_port,
            outbound_port,
            mark,
            route_table,
            rule_priority,
        },
        admin_port,
    ))
}

/// What a pod without annotations gets: mode, fail mode, proxy ids, excluded inbound ports
/// (the sidecar's own ports always among them).
pub fn parse_defaults(
    obj: &Map<String, Value>,
    plan: &PlanConfig,
    admin_port: u16,
) -> Result<Defaults, CniError> {
    let proxy_uid = opt_u32(obj, "proxyUid")?.unwrap_or(consts::PROXY_UID);
    let proxy_gid = opt_u32(obj, "proxyGid")?;
    let fail = match obj.get("failClosed") {
        None | Some(Value::Null) => FailMode::Open,
        Some(Value::Bool(true)) => FailMode::Closed,
        Some(Value::Bool(false)) => FailMode::Open,
        Some(other) => {
            return Err(invalid(format!(
                "\"failClosed\": must be true or false, got {}",
                echo_json(other)
            )))
        }
    };
    let mode = match opt_str(obj, "defaultMode")? {
        None => Mode::None,
        Some(s) => Mode::parse(&s).ok_or_else(|| {
            invalid(format!(
                "\"defaultMode\": {} must be tproxy, redirect or none",
                echo(&s)
            ))
        })?,
    };
    let mut exclude_inbound_ports: Vec<PortRange> = vec![
        PortRange::single(plan.inbound_port),
        PortRange::single(plan.outbound_port),
        PortRange::single(admin_port),
    ];
    match obj.get("excludeInboundPorts") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for it in items {
                let r = match it {
                    Value::Number(n) => n.to_string().parse::<PortRange>(),
                    Value::String(s) => s.parse::<PortRange>(),
                    other => Err(tproxy_cni_policy::netaddr::ParseError::BadPort(echo_json(
                        other,
                    ))),
                };
                exclude_inbound_ports.push(r.map_err(|_| {
                    invalid(format!(
                        "\"excludeInboundPorts\": {} is not a port (1-65535) or \"lo-hi\" range",
                        echo_json(it)
                    ))
                })?);
            }
        }
        Some(other) => {
            return Err(invalid(format!(
                "\"excludeInboundPorts\": must be a list of ports or \"lo-hi\" ranges, got {}",
                echo_json(other)
            )))
        }
    }
    Ok(Defaults {
        mode,
        fail,
        proxy_uid,
        proxy_gid,
        exclude_inbound_ports,
    })
}

fn parse_log_level(obj: &Map<String, Value>) -> Result<log::LevelFilter, CniError> {
    Ok(match opt_str(obj, "logLevel")? {
        None => log::LevelFilter::Info,
        Some(s) => match s.to_ascii_lowercase().as_str() {
            "off" => log::LevelFilter::Off,
            "error" => log::LevelFilter::Error,
            "warn" | "warning" => log::LevelFilter::Warn,
            "info" => log::LevelFilter::Info,
            "debug" => log::LevelFilter::Debug,
            "trace" => log::LevelFilter::Trace,
            _ => {
                return Err(invalid(format!(
                    "\"logLevel\": {} must be off, error, warn, info, debug or trace",
                    echo(&s)
                )))
            }
        },
    })
}

fn parse_prev_result(obj: &Map<String, Value>) -> Result<Option<Value>, CniError> {
    Ok(match obj.get("prevResult") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(other) => {
            return Err(invalid(format!(
                "\"prevResult\": must be an object, got {}",
                echo_json(other)
            )))
        }
    })
}

fn parse_annotations(obj: &Map<String, Value>) -> Result<BTreeMap<String, String>, CniError> {
    let key = format!("runtimeConfig.{POD_ANNOTATIONS_CAPABILITY}");
    let rc = match obj.get("runtimeConfig") {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(invalid(format!(
                "\"runtimeConfig\": must be an object, got {}",
                echo_json(other)
            )))
        }
    };
    let ann = match rc.get(POD_ANNOTATIONS_CAPABILITY) {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(invalid(format!(
                "\"{key}\": must be an object of strings, got {}",
                echo_json(other)
            )))
        }
    };
    let mut out = BTreeMap::new();
    for (k, v) in ann {
        match v {
            Value::String(s) => {
                out.insert(k.clone(), s.clone());
            }
            other => {
                return Err(invalid(format!(
                    "\"{key}\".{}: must be a string, got {}",
                    echo(k),
                    echo_json(other)
                )))
            }
        }
    }
    Ok(out)
}

fn opt_str(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!(
            "\"{key}\": must be a string, got {}",
            echo_json(other)
        ))),
    }
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(invalid(format!(
            "\"{key}\": must be true or false, got {}",
            echo_json(other)
        ))),
    }
}

fn opt_u32(obj: &Map<String, Value>, key: &str) -> Result<Option<u32>, CniError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(x) if x <= u64::from(u32::MAX) => Ok(Some(x as u32)),
            _ => Err(invalid(format!(
                "\"{key}\": {n} must be an integer from 0 to 4294967295"
            ))),
        },
        Some(other) => Err(invalid(format!(
            "\"{key}\": must be an integer, got {}",
            echo_json(other)
        ))),
    }
}

fn opt_port(obj: &Map<String, Value>, key: &str) -> Result<Option<u16>, CniError> {
    match opt_u32(obj, key)? {
        None => Ok(None),
        Some(p) if (1..=65535).contains(&p) => Ok(Some(p as u16)),
        Some(p) => Err(invalid(format!("\"{key}\": {p} is not a port (1-65535)"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(extra: &str) -> Result<NetConf, CniError> {
        let s = format!(r#"{{"cniVersion":"1.0.0","name":"k8s","type":"tproxy-cni"{extra}}}"#);
        NetConf::parse(s.as_bytes())
    }

    #[test]
    fn defaults() {
        let c = conf("").unwrap();
        assert_eq!(c.plan, PlanConfig::default());
        assert_eq!(c.defaults.mode, Mode::None);
        assert_eq!(c.defaults.fail, FailMode::Open);
        assert!(c.annotations.is_empty());
        assert!(c.prev_result.is_none());
    }

    #[test]
    fn options_and_annotations() {
        let c = conf(r#","mark":4096,"routeTable":300,"rulePriority":100,"inboundPort":16000,"failClosed":true,"defaultMode":"tproxy","excludeInboundPorts":[22,"9000-9001"],"runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"tproxy-cni.io/mode":"redirect"}},"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24"},{"address":"fd00::5/64"}]}"#).unwrap();
        assert_eq!(c.plan.mark, 4096);
        assert_eq!(c.plan.route_table, 300);
        assert_eq!(c.plan.inbound_port, 16000);
        assert_eq!(c.defaults.fail, FailMode::Closed);
        assert_eq!(c.defaults.mode, Mode::Tproxy);
        assert!(c
            .defaults
            .exclude_inbound_ports
            .contains(&PortRange::single(16000)));
        assert!(c
            .defaults
            .exclude_inbound_ports
            .contains(&PortRange { lo: 9000, hi: 9001 }));
        assert_eq!(c.annotations["tproxy-cni.io/mode"], "redirect");
        assert_eq!(
            c.pod_ips().unwrap(),
            vec![
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn table_names_follow_what_the_kernel_and_nft_take() {
        for bad in ["1abc", "-", "", ".x", "a/b", "a b", "tä", &"a".repeat(256)] {
            let e = conf(&format!(r#","tableName":{}"#, serde_json::json!(bad))).expect_err(bad);
            assert_eq!(e.code, code::INVALID_CONFIG, "{bad:?}: {e}");
            assert!(e.msg.contains("\"tableName\""), "{e}");
            assert!(e.msg.len() < 250, "the value is cut: {e}");
            let stdin = format!(
                r#"{{"cniVersion":"1.0.0","name":"k8s","tableName":{}}}"#,
                serde_json::json!(bad)
            );
            assert_eq!(peek_bad_table_name(stdin.as_bytes()).as_deref(), Some(bad));
        }
        for good in ["tproxy_cni", "_x", "a.b-c_1", "T9", &"a".repeat(255)] {
            let c = conf(&format!(r#","tableName":"{good}""#)).expect(good);
            assert_eq!(c.plan.table_name, good);
        }
        assert_eq!(peek_bad_table_name(br#"{"tableName":"ok_name"}"#), None);
        assert_eq!(peek_bad_table_name(br#"{"tableName":null}"#), None);
        assert_eq!(
            peek_bad_table_name(br#"{"tableName":7}"#).as_deref(),
            Some("7")
        );
        assert_eq!(peek_bad_table_name(br#"{"cniVersion":"1.0.0"}"#), None);
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            (r#","mark":0"#, "mark", code::INVALID_CONFIG),
            (r#","mark":"x""#, "mark", code::INVALID_CONFIG),
            (r#","mark":-1"#, "mark", code::INVALID_CONFIG),
            (r#","routeTable":254"#, "routeTable", code::INVALID_CONFIG),
            (
                r#","rulePriority":40000"#,
                "rulePriority",
                code::INVALID_CONFIG,
            ),
            (
                r#","inboundPort":70000"#,
                "inboundPort",
                code::INVALID_CONFIG,
            ),
            (r#","inboundPort":0"#, "inboundPort", code::INVALID_CONFIG),
            (
                r#","outboundPort":15006"#,
                "outboundPort",
                code::INVALID_CONFIG,
            ),
            (r#","failClosed":"yes""#, "failClosed", code::INVALID_CONFIG),
            (r#","nodeBypass":1"#, "nodeBypass", code::INVALID_CONFIG),
            (
                r#","defaultMode":"magic""#,
                "defaultMode",
                code::INVALID_CONFIG,
            ),
            (
                r#","tableName":"bad name!""#,
                "tableName",
                code::INVALID_CONFIG,
            ),
            (
                r#","excludeInboundPorts":["x"]"#,
                "excludeInboundPorts",
                code::INVALID_CONFIG,
            ),
            (
                r#","excludeInboundPorts":[true]"#,
                "excludeInboundPorts",
                code::INVALID_CONFIG,
            ),
            (r#","logLevel":"loud""#, "logLevel", code::INVALID_CONFIG),
            (
                r#","runtimeConfig":[]"#,
                "runtimeConfig",
                code::INVALID_CONFIG,
            ),
            (
                r#","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"a":1}}"#,
                "pod-annotations",
                code::INVALID_CONFIG,
            ),
            (r#","prevResult":"x""#, "prevResult", code::INVALID_CONFIG),
        ];
        for (extra, key, want) in cases {
            let e = conf(extra).expect_err(extra);
            assert_eq!(e.code, want, "{extra}: {e}");
            assert!(
                e.msg.contains(key),
                "{extra}: message {:?} should name {key}",
                e.msg
            );
        }
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9","name":"x"}"#).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        assert!(e.msg.contains("9.9.9"));
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, code::DECODE);
        assert_eq!(NetConf::parse(b"[]").unwrap_err().code, code::DECODE);
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.0.0"}"#)
                .unwrap_err()
                .code,
            code::INVALID_CONFIG
        );
        let c = conf(r#","prevResult":{"ips":[{"address":"nope"}]}"#).unwrap();
        assert!(c
            .pod_ips()
            .unwrap_err()
            .msg
            .contains("prevResult.ips[0].address"));
    }
}
