//! The process environment as a narrow trait, so the dispatcher is testable with a map.

use std::collections::HashMap;

use super::error::{code, CniError};

pub trait Env {
    fn var(&self, key: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

/// `CNI_COMMAND`, parsed once: the dispatcher matches on this, never on the string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    /// The spelling of the CNI specification; anything else is a code-4 error naming it.
    pub(crate) fn parse(s: &str) -> Result<Command, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!(
                        "CNI_COMMAND {} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION",
                        tproxy_cni_policy::echo(s)
                    ),
                ))
            }
        })
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `CNI_*` variables of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CniEnv {
    pub command: Command,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: Vec<(String, String)>,
}

impl CniEnv {
    /// Reads the variables the command needs; missing ones are a code-4 error naming them.
    pub(crate) fn read(env: &dyn Env) -> Result<CniEnv, CniError> {
        let command = env
            .var("CNI_COMMAND")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set"))?;
        let command = Command::parse(&command)?;
        let get = |k: &str| env.var(k).unwrap_or_default();
        let e = CniEnv {
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: parse_args(&get("CNI_ARGS")),
            command,
        };
        let required: &[&str] = match e.command {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            // DEL must work after the sandbox's netns is gone, so CNI_NETNS may be empty.
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME"],
            Command::Status | Command::Gc | Command::Version => &[],
        };
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|k| match *k {
                "CNI_CONTAINERID" => e.container_id.is_empty(),
                "CNI_NETNS" => e.netns.is_empty(),
                _ => e.ifname.is_empty(),
            })
            .collect();
        if !missing.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!(
                    "{} required for {} but not set",
                    missing.join(", "),
                    e.command
                ),
            ));
        }
        Ok(e)
    }

    pub(crate) fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `namespace/name (container ID)` of the pod, or the container alone when the runtime did
    /// not pass the pod's name, for logs.
    pub(crate) fn pod(&self) -> String {
        match (self.arg("K8S_POD_NAMESPACE"), self.arg("K8S_POD_NAME")) {
            (Some(ns), Some(n)) => format!("{ns}/{n} (container {})", self.container_id),
            _ => format!("container {}", self.container_id),
        }
    }
}

/// `K=V;K=V`; entries without `=` are ignored (runtimes add keys plugins don't know).
fn parse_args(s: &str) -> Vec<(String, String)> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn required_vars_per_command() {
        let e = CniEnv::read(&env(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")])).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(
            e.msg.contains("CNI_CONTAINERID") && e.msg.contains("CNI_NETNS"),
            "{}",
            e.msg
        );
        let ok = CniEnv::read(&env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=default;K8S_POD_NAME=httpbin;IgnoreUnknown=1;junk",
            ),
        ]))
        .unwrap();
        assert_eq!(ok.pod(), "default/httpbin (container abc)");
        assert_eq!(ok.command, Command::Del);
        let status = CniEnv::read(&env(&[("CNI_COMMAND", "STATUS")])).unwrap();
        assert_eq!(status.command, Command::Status);
        assert_eq!(CniEnv::read(&env(&[])).unwrap_err().code, code::INVALID_ENV);
    }

    #[test]
    fn command_parsed_once_and_unknown_named() {
        for c in [
            Command::Add,
            Command::Del,
            Command::Check,
            Command::Status,
            Command::Gc,
            Command::Version,
        ] {
            assert_eq!(Command::parse(c.as_str()).unwrap(), c);
            assert_eq!(c.to_string(), c.as_str());
        }
        // The specification's spelling only: lower case is not a command.
        for bad in ["add", "UPDATE", "ADD "] {
            let e = CniEnv::read(&env(&[("CNI_COMMAND", bad)])).unwrap_err();
            assert_eq!(e.code, code::INVALID_ENV);
            assert!(e.msg.starts_with("CNI_COMMAND "), "{}", e.msg);
            assert!(e.msg.contains("is not one of ADD, DEL"), "{}", e.msg);
        }
    }
}
