//! CNI error object and the one place where failures become CNI codes.

use serde_json::{json, Value};

/// Codes from the CNI spec (1-99 reserved) and ours (100+), all listed in the README.
pub(crate) mod code {
    /// Incompatible CNI version.
    pub(crate) const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables.
    pub(crate) const INVALID_ENV: u32 = 4;
    /// Failed to decode content (stdin is not JSON).
    pub(crate) const DECODE: u32 = 6;
    /// Invalid network config (also: invalid pod annotations, missing prevResult).
    pub(crate) const INVALID_CONFIG: u32 = 7;
    /// Try again later (another caller holds the pod netns's lock too long).
    pub(crate) const TRY_AGAIN: u32 = 11;
    /// Ours: programming the kernel (nftables / rtnetlink / netns) failed; nothing was left.
    pub(crate) const KERNEL: u32 = 100;
    /// Ours: CHECK found the pod's kernel state differs from the plan.
    pub(crate) const CHECK_MISMATCH: u32 = 101;
}

pub(crate) use tproxy_cni_policy::echo_json;
use tproxy_cni_policy::ConfigError;

/// A CNI error: printed as the spec's JSON error object on stdout, exit code 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// A value of the network config that could not be used: the spec's "invalid network config".
impl From<ConfigError> for CniError {
    fn from(e: ConfigError) -> CniError {
        CniError::new(code::INVALID_CONFIG, e.msg)
    }
}

impl CniError {
    pub(crate) fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }
    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }
    /// Reads the spec's error object back (what a plugin printed); `None` when `v` is not one.
    pub fn from_json(v: &Value) -> Option<CniError> {
        let o = v.as_object()?;
        let text = |k: &str| o.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Some(CniError {
            code: u32::try_from(o.get("code")?.as_u64()?).ok()?,
            msg: text("msg"),
            details: text("details"),
        })
    }
    /// The spec's error object (`cniVersion`, `code`, `msg`, `details`).
    pub(crate) fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl From<tproxy_cni_policy::PolicyError> for CniError {
    fn from(e: tproxy_cni_policy::PolicyError) -> Self {
        CniError::new(code::INVALID_CONFIG, format!("invalid pod {e}"))
    }
}

impl From<crate::netns::NetnsError> for CniError {
    fn from(e: crate::netns::NetnsError) -> Self {
        let c = match &e {
            crate::netns::NetnsError::Lock {
                err: crate::nslock::LockError::Busy { .. },
                ..
            } => code::TRY_AGAIN,
            _ => code::KERNEL,
        };
        CniError::new(c, e.to_string())
    }
}

impl From<crate::routing::RoutingError> for CniError {
    fn from(e: crate::routing::RoutingError) -> Self {
        CniError::new(code::KERNEL, format!("policy routing: {e}"))
    }
}

impl From<crate::apply::Error> for CniError {
    fn from(e: crate::apply::Error) -> Self {
        // `tableName` names someone else's table: the config is wrong, the kernel is fine.
        let code = if e.has_foreign_table() {
            code::INVALID_CONFIG
        } else {
            code::KERNEL
        };
        CniError::new(code, e.to_string())
    }
}

impl CniError {
    /// CHECK's answer when the kernel differs from the plan: every difference, code 101.
    pub(crate) fn drift(pod: &str, drift: &[crate::apply::Drift]) -> CniError {
        let lines: Vec<String> = drift.iter().map(ToString::to_string).collect();
        CniError::new(
            code::CHECK_MISMATCH,
            format!(
                "{pod}: kernel state differs from the plan: {}",
                lines.join("; ")
            ),
        )
    }
}

impl From<crate::nft::NftError> for CniError {
    fn from(e: crate::nft::NftError) -> Self {
        CniError::new(code::KERNEL, format!("nftables: {e}"))
    }
}
