//! The conflist's defaults for pods without annotations (`defaultMode`, `failClosed`,
//! `proxyUid`, `proxyGid`, `excludeInboundPorts`), read from the network config's JSON.

use serde_json::{Map, Value};

use super::{Defaults, FailMode, Mode};
use crate::consts::PROXY_UID;
use crate::json::{opt_str, opt_u32, ConfigError};
use crate::netaddr::{ParseError, PortRange};
use crate::{echo, echo_json};

impl Defaults {
    /// What a pod without annotations gets: mode, fail mode, proxy ids, excluded inbound ports
    /// (the sidecar's own ports always among them).
    /// `sidecar_ports` (its inbound, outbound and admin ports) are always excluded.
    pub fn from_json(
        obj: &Map<String, Value>,
        sidecar_ports: &[u16],
    ) -> Result<Defaults, ConfigError> {
        let proxy_uid = opt_u32(obj, "proxyUid")?.unwrap_or(PROXY_UID);
        let proxy_gid = opt_u32(obj, "proxyGid")?;
        let fail = match obj.get("failClosed") {
            None | Some(Value::Null) => FailMode::Open,
            Some(Value::Bool(true)) => FailMode::Closed,
            Some(Value::Bool(false)) => FailMode::Open,
            Some(other) => {
                return Err(ConfigError::new(format!(
                    "\"failClosed\": must be true or false, got {}",
                    echo_json(other)
                )))
            }
        };
        let mode = match opt_str(obj, "defaultMode")? {
            None => Mode::None,
            Some(s) => Mode::parse(&s).ok_or_else(|| {
                ConfigError::new(format!(
                    "\"defaultMode\": {} must be tproxy, redirect or none",
                    echo(&s)
                ))
            })?,
        };
        let mut exclude_inbound_ports: Vec<PortRange> = sidecar_ports
            .iter()
            .map(|p| PortRange::single(*p))
            .collect();
        match obj.get("excludeInboundPorts") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for it in items {
                    let r = match it {
                        Value::Number(n) => n.to_string().parse::<PortRange>(),
                        Value::String(s) => s.parse::<PortRange>(),
                        other => Err(ParseError::BadPort(echo_json(other))),
                    };
                    exclude_inbound_ports.push(r.map_err(|_| {
                        ConfigError::new(format!(
                            "\"excludeInboundPorts\": {} is not a port (1-65535) or \"lo-hi\" range",
                            echo_json(it)
                        ))
                    })?);
                }
            }
            Some(other) => {
                return Err(ConfigError::new(format!(
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
}
