//! The plugin's network configuration (stdin): CNI fields, our options, annotations, prevResult.
//!
//! Parsed by hand from a `serde_json::Value` rather than derived, so that every wrong type or
//! value is reported with the key it came from (`"mark": must be a non-zero integer`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Map, Value};

use super::error::{code, echo_json, CniError};
use crate::plan::{check_table_name, PlanConfig};
use tproxy_cni_policy::consts::POD_ANNOTATIONS_CAPABILITY;
use tproxy_cni_policy::echo;
use tproxy_cni_policy::Defaults;
use tproxy_cni_policy::{opt_bool, opt_str};

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
pub(crate) fn version_has_check(v: &str) -> bool {
    !matches!(v, "0.3.0" | "0.3.1")
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
        let (plan, admin_port) = PlanConfig::from_json(obj)?;
        let sidecar_ports = [plan.inbound_port, plan.outbound_port, admin_port];
        let defaults = Defaults::from_json(obj, &sidecar_ports)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use tproxy_cni_policy::PortRange;
    use tproxy_cni_policy::{FailMode, Mode};

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
