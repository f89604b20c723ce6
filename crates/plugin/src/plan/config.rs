//! The plan's numbers read from the network config's JSON (`tableName`, `inboundPort`,
//! `outboundPort`, `adminPort`, `mark`, `routeTable`, `rulePriority`), each checked. The CNI
//! frame and the host CLI's `--config` share this.

use serde_json::{Map, Value};
use tproxy_cni_policy::consts::ADMIN_PORT;
use tproxy_cni_policy::echo;
use tproxy_cni_policy::{opt_port, opt_str, opt_u32, ConfigError};

use super::PlanConfig;

/// Longest nftables table name: the kernel's `NFT_TABLE_MAXNAMELEN` (256) less the NUL.
pub(crate) const TABLE_NAME_MAX: usize = 255;

impl PlanConfig {
    /// The numbers of the plan (table, ports, mark, route table, rule priority) and the admin
    /// port, each checked.
    /// Returns the admin port with them: the defaults exclude it from capture.
    pub(crate) fn from_json(obj: &Map<String, Value>) -> Result<(PlanConfig, u16), ConfigError> {
        let d = PlanConfig::default();
        let table_name = opt_str(obj, "tableName")?.unwrap_or(d.table_name);
        if let Err(why) = check_table_name(&table_name) {
            return Err(ConfigError::new(format!(
                "\"tableName\": {} {why}",
                echo(&table_name)
            )));
        }
        let inbound_port = opt_port(obj, "inboundPort")?.unwrap_or(d.inbound_port);
        let outbound_port = opt_port(obj, "outboundPort")?.unwrap_or(d.outbound_port);
        let admin_port = opt_port(obj, "adminPort")?.unwrap_or(ADMIN_PORT);
        if inbound_port == outbound_port {
            return Err(ConfigError::new(format!(
                "\"outboundPort\": {outbound_port} must differ from \"inboundPort\""
            )));
        }
        let mark = opt_u32(obj, "mark")?.unwrap_or(d.mark);
        if mark == 0 {
            return Err(ConfigError::new(
                "\"mark\": must be non-zero (0 is every unmarked packet)",
            ));
        }
        let route_table = opt_u32(obj, "routeTable")?.unwrap_or(d.route_table);
        // 0 = unspec, 253 default, 254 main, 255 local: never ours to fill.
        if matches!(route_table, 0 | 253 | 254 | 255) {
            return Err(ConfigError::new(format!(
                "\"routeTable\": {route_table} is reserved (0, 253, 254, 255); pick another id"
            )));
        }
        let rule_priority = opt_u32(obj, "rulePriority")?.unwrap_or(d.rule_priority);
        if rule_priority == 0 || rule_priority >= 32766 {
            return Err(ConfigError::new(format!(
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
}

/// A table name the kernel and `nft` both take unquoted: a letter or `_` first, then letters,
/// digits, `_`, `-` and `.`, at most 255 bytes. nft's scanner also allows `/` and a leading
/// `.`, the kernel checks only the length; this is the part all three agree on, and what the
/// nftables encoder accepts, so a name passing here never fails later with code 100.
pub(crate) fn check_table_name(name: &str) -> Result<(), &'static str> {
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
