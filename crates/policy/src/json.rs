//! Reading a network config's JSON values: typed optional keys whose errors name the key and
//! show the value cut like [`echo_json`]. The plugin's CNI config and the host CLI's
//! `--config` both read the plan's numbers and the pods' defaults through these.

use serde_json::{Map, Value};

use crate::echo_json;

/// A config value that could not be used: the message names the key and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}")]
pub struct ConfigError {
    pub msg: String,
}

impl ConfigError {
    pub fn new(msg: impl Into<String>) -> ConfigError {
        ConfigError { msg: msg.into() }
    }
}

pub fn opt_str(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, ConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ConfigError::new(format!(
            "\"{key}\": must be a string, got {}",
            echo_json(other)
        ))),
    }
}

pub fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, ConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(ConfigError::new(format!(
            "\"{key}\": must be true or false, got {}",
            echo_json(other)
        ))),
    }
}

pub fn opt_u32(obj: &Map<String, Value>, key: &str) -> Result<Option<u32>, ConfigError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(x) if x <= u64::from(u32::MAX) => Ok(Some(x as u32)),
            _ => Err(ConfigError::new(format!(
                "\"{key}\": {n} must be an integer from 0 to 4294967295"
            ))),
        },
        Some(other) => Err(ConfigError::new(format!(
            "\"{key}\": must be an integer, got {}",
            echo_json(other)
        ))),
    }
}

pub fn opt_port(obj: &Map<String, Value>, key: &str) -> Result<Option<u16>, ConfigError> {
    match opt_u32(obj, key)? {
        None => Ok(None),
        Some(p) if (1..=65535).contains(&p) => Ok(Some(p as u16)),
        Some(p) => Err(ConfigError::new(format!(
            "\"{key}\": {p} is not a port (1-65535)"
        ))),
    }
}
