//! Runs a CNI network config list the way libcni (containerd, CRI-O) does, for the demo and tests.
//!
//! What we reproduce, because a chained plugin is only correct if it survives these rules:
//! - each plugin gets its own object from `plugins[]` plus the list's `name` and `cniVersion`;
//! - ADD runs plugins in order and hands each one the previous plugin's result as `prevResult`;
//! - CHECK runs them in order with the cached ADD result (only for cniVersion >= 0.4.0);
//! - DEL runs them in **reverse** order, each with the cached ADD result (>= 0.4.0; older lists
//!   get no `prevResult`), and stops at the first failure, exactly like libcni
//!   (docs/ARCHITECTURE.md, pitfall 9);
//! - `runtimeConfig` only carries the keys a plugin declares in `capabilities` with `true`;
//! - STATUS and GC (1.1.0 lists) get empty container id, netns and ifname.
//!
//! A library (this file: the emulator; `cli`: the command line) so that the `tproxy-cni-run`
//! binary and the tests' `tests/common/chain.rs` share one libcni emulator.

#![deny(unsafe_code)]

mod cache;
mod cli;

pub use cli::main;

use serde_json::{Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tproxy_cni_plugin::CniError;

/// Everything a runtime knows about one attachment besides the conflist itself.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// `CNI_ARGS` pairs, e.g. `K8S_POD_NAMESPACE`; joined as `K=V;K=V` in this order.
    pub cni_args: Vec<(String, String)>,
    /// Candidate `runtimeConfig` keys, e.g. `io.kubernetes.cri.pod-annotations`; filtered per
    /// plugin by its capabilities.
    pub runtime_config: Map<String, Value>,
    /// Directories searched for plugin binaries (by `type`), and passed on as `CNI_PATH`.
    pub cni_path: Vec<PathBuf>,
}

/// Why a conflist run failed; names the plugin (by index and `type`) whenever one is involved.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid conflist: {0}")]
    Conflist(String),
    #[error("{command} needs cniVersion {needed} or later, the list has {have}")]
    Version {
        command: &'static str,
        needed: &'static str,
        have: String,
    },
    #[error("plugin #{index} ({plugin}): binary not found in {searched:?}")]
    NotFound {
        index: usize,
        plugin: String,
        searched: Vec<PathBuf>,
    },
    #[error("plugin #{index} ({plugin}): cannot run {}: {source}", path.display())]
    Spawn {
        index: usize,
        plugin: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin #{index} ({plugin}) {command} failed, exit {}: {}{}",
        exit_code.map_or_else(|| "by signal".to_string(), |c| c.to_string()),
        error.as_ref().map_or_else(|| "no CNI error on stdout".to_string(), |e| e.to_string()),
        if stderr.trim().is_empty() { String::new() } else { format!("; stderr: {}", stderr.trim()) })]
    Plugin {
        index: usize,
        plugin: String,
        command: &'static str,
        exit_code: Option<i32>,
        /// The parsed CNI error, when the plugin printed one (boxed to keep `Result`s small).
        error: Option<Box<CniError>>,
        stdout: String,
        stderr: String,
    },
    #[error("plugin #{index} ({plugin}) {command}: stdout is not a JSON result: {reason}")]
    BadResult {
        index: usize,
        plugin: String,
        command: &'static str,
        reason: String,
    },
}

impl RunError {
    /// The `type` of the plugin that failed, if a plugin failed.
    pub fn plugin(&self) -> Option<&str> {
        match self {
            RunError::NotFound { plugin, .. }
            | RunError::Spawn { plugin, .. }
            | RunError::Plugin { plugin, .. }
            | RunError::BadResult { plugin, .. } => Some(plugin),
            _ => None,
        }
    }
    /// The CNI error the failing plugin printed, if any.
    pub fn plugin_error(&self) -> Option<&CniError> {
        match self {
            RunError::Plugin { error, .. } => error.as_deref(),
            _ => None,
        }
    }
}

/// The checked parts of a conflist we need to run it.
struct List<'a> {
    name: &'a Value,
    version: String,
    plugins: Vec<(&'a Map<String, Value>, String)>,
}

impl List<'_> {
    /// `plugin_stdin` for one of this list's plugins.
    fn stdin(
        &self,
        conf: &Map<String, Value>,
        runtime_config: &Map<String, Value>,
        prev_result: Option<&Value>,
    ) -> Value {
        plugin_stdin(conf, self.name, &self.version, runtime_config, prev_result)
    }
}

fn parse_list(conflist: &Value) -> Result<List<'_>, RunError> {
    let obj = conflist
        .as_object()
        .ok_or_else(|| RunError::Conflist("not a JSON object".into()))?;
    let name = obj
        .get("name")
        .filter(|v| v.as_str().is_some_and(|s| !s.is_empty()))
        .ok_or_else(|| RunError::Conflist("missing \"name\"".into()))?;
    let version = match obj.get("cniVersion") {
        Some(Value::String(s)) => s.clone(),
        // libcni defaults an absent version to 0.1.0 (the oldest), which behaves as "< 0.4.0".
        None => "0.1.0".into(),
        Some(_) => return Err(RunError::Conflist("\"cniVersion\" is not a string".into())),
    };
    let list = obj
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or_else(|| RunError::Conflist("missing \"plugins\" array".into()))?;
    if list.is_empty() {
        return Err(RunError::Conflist("\"plugins\" is empty".into()));
    }
    let mut plugins = Vec::with_capacity(list.len());
    for (i, p) in list.iter().enumerate() {
        let conf = p
            .as_object()
            .ok_or_else(|| RunError::Conflist(format!("plugins[{i}] is not an object")))?;
        let ty = conf
            .get("type")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty() && !t.contains('/'))
            .ok_or_else(|| RunError::Conflist(format!("plugins[{i}] has no valid \"type\"")))?;
        plugins.push((conf, ty.to_string()));
    }
    Ok(List {
        name,
        version,
        plugins,
    })
}

/// Compares dotted versions numerically ("0.10.0" > "0.4.0"); unparsable parts count as 0.
pub fn version_at_least(have: &str, want: &str) -> bool {
    let parse = |s: &str| -> Vec<u64> {
        s.split('.')
            .map(|p| p.trim().parse::<u64>().unwrap_or(0))
            .collect()
    };
    let (mut h, mut w) = (parse(have), parse(want));
    let n = h.len().max(w.len());
    h.resize(n, 0);
    w.resize(n, 0);
    h >= w
}

/// The stdin libcni builds for one plugin: its own keys, then name, cniVersion, runtimeConfig
/// (capability-filtered, only when non-empty) and prevResult.
pub fn plugin_stdin(
    conf: &Map<String, Value>,
    name: &Value,
    version: &str,
    runtime_config: &Map<String, Value>,
    prev_result: Option<&Value>,
) -> Value {
    let mut out = conf.clone();
    out.insert("name".into(), name.clone());
    out.insert("cniVersion".into(), Value::String(version.to_string()));
    let mut rc = Map::new();
    if let Some(Value::Object(caps)) = conf.get("capabilities") {
        for (key, on) in caps {
            if on == &Value::Bool(true) {
                if let Some(v) = runtime_config.get(key) {
                    rc.insert(key.clone(), v.clone());
                }
            }
        }
    }
    // Like libcni: replaced only when some capability matched; a static `runtimeConfig` in the
    // plugin's own conf survives otherwise.
    if !rc.is_empty() {
        out.insert("runtimeConfig".into(), Value::Object(rc));
    }
    match prev_result {
        Some(p) => {
            out.insert("prevResult".into(), p.clone());
        }
        None => {
            out.remove("prevResult");
        }
    }
    Value::Object(out)
}

fn find_binary(ty: &str, cni_path: &[PathBuf]) -> Option<PathBuf> {
    cni_path.iter().map(|d| d.join(ty)).find(|p| p.is_file())
}

fn join_path(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// The environment of one call; STATUS/GC pass empty ids, as libcni does.
struct CallEnv<'a> {
    command: &'static str,
    inv: &'a Invocation,
    attachment: bool,
}

/// Runs one plugin binary; returns its stdout when it exits 0.
fn exec(index: usize, ty: &str, stdin: &Value, env: &CallEnv<'_>) -> Result<Vec<u8>, RunError> {
    let inv = env.inv;
    let path = find_binary(ty, &inv.cni_path).ok_or_else(|| RunError::NotFound {
        index,
        plugin: ty.to_string(),
        searched: inv.cni_path.clone(),
    })?;
    let spawn_err = |source| RunError::Spawn {
        index,
        plugin: ty.to_string(),
        path: path.clone(),
        source,
    };
    let mut cmd = Command::new(&path);
    cmd.env("CNI_COMMAND", env.command)
        .env("CNI_PATH", join_path(&inv.cni_path))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if env.attachment {
        let args = inv
            .cni_args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";");
        cmd.env("CNI_CONTAINERID", &inv.container_id)
            .env("CNI_NETNS", &inv.netns)
            .env("CNI_IFNAME", &inv.ifname)
            .env("CNI_ARGS", args);
    } else {
        cmd.env("CNI_CONTAINERID", "")
            .env("CNI_NETNS", "")
            .env("CNI_IFNAME", "")
            .env_remove("CNI_ARGS");
    }
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let input = serde_json::to_vec(stdin).unwrap_or_default();
    // Write stdin from a thread so a plugin that prints before reading everything cannot
    // deadlock us on full pipes.
    let writer = child.stdin.take().map(|mut pipe| {
        std::thread::spawn(move || {
            // A plugin may exit without reading stdin (EPIPE); its exit status tells the story.
            let _ = pipe.write_all(&input);
        })
    });
    let out = child.wait_with_output().map_err(spawn_err)?;
    if let Some(w) = writer {
        let _ = w.join();
    }
    if out.status.success() {
        return Ok(out.stdout);
    }
    let error = serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| CniError::from_json(&v))
        .map(Box::new);
    Err(RunError::Plugin {
        index,
        plugin: ty.to_string(),
        command: env.command,
        exit_code: out.status.code(),
        error,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// ADD: every plugin in order, chaining results; returns the last plugin's result.
pub fn add(conflist: &Value, inv: &Invocation) -> Result<Value, RunError> {
    let list = parse_list(conflist)?;
    let env = CallEnv {
        command: "ADD",
        inv,
        attachment: true,
    };
    let mut prev: Option<Value> = None;
    for (index, (conf, ty)) in list.plugins.iter().enumerate() {
        let stdin = list.stdin(conf, &inv.runtime_config, prev.as_ref());
        let stdout = exec(index, ty, &stdin, &env)?;
        let result: Value = serde_json::from_slice(&stdout).map_err(|e| RunError::BadResult {
            index,
            plugin: ty.clone(),
            command: "ADD",
            reason: e.to_string(),
        })?;
        if !result.is_object() {
            return Err(RunError::BadResult {
                index,
                plugin: ty.clone(),
                command: "ADD",
                reason: "not an object".into(),
            });
        }
        prev = Some(result);
    }
    // parse_list guarantees at least one plugin, so prev is set; stay total anyway.
    prev.ok_or_else(|| RunError::Conflist("\"plugins\" is empty".into()))
}

/// CHECK: every plugin in order with the cached ADD result. libcni refuses it below 0.4.0.
pub fn check(conflist: &Value, inv: &Invocation, prev_result: &Value) -> Result<(), RunError> {
    let list = parse_list(conflist)?;
    if !version_at_least(&list.version, "0.4.0") {
        return Err(RunError::Version {
            command: "CHECK",
            needed: "0.4.0",
            have: list.version,
        });
    }
    let env = CallEnv {
        command: "CHECK",
        inv,
        attachment: true,
    };
    for (index, (conf, ty)) in list.plugins.iter().enumerate() {
        let stdin = list.stdin(conf, &inv.runtime_config, Some(prev_result));
        exec(index, ty, &stdin, &env)?;
    }
    Ok(())
}

/// DEL: every plugin in reverse order with the cached ADD result (dropped below 0.4.0, where
/// libcni does not pass it); stops at the first failure like libcni.
pub fn del(
    conflist: &Value,
    inv: &Invocation,
    prev_result: Option<&Value>,
) -> Result<(), RunError> {
    let list = parse_list(conflist)?;
    let prev = prev_result.filter(|_| version_at_least(&list.version, "0.4.0"));
    let env = CallEnv {
        command: "DEL",
        inv,
        attachment: true,
    };
    for (index, (conf, ty)) in list.plugins.iter().enumerate().rev() {
        let stdin = list.stdin(conf, &inv.runtime_config, prev);
        exec(index, ty, &stdin, &env)?;
    }
    Ok(())
}

/// One plugin of the list by itself (`index` into `plugins`), with the given `prevResult`, as
/// a runtime would call it in the middle of a chain; its result (`Null` when it printed
/// nothing). Tests use it to drive one plugin of a chain against a chosen `prevResult`.
pub fn one(
    conflist: &Value,
    index: usize,
    command: &'static str,
    inv: &Invocation,
    prev_result: Option<&Value>,
) -> Result<Value, RunError> {
    let list = parse_list(conflist)?;
    let (conf, ty) = list
        .plugins
        .get(index)
        .ok_or_else(|| RunError::Conflist(format!("no plugins[{index}]")))?;
    let stdin = list.stdin(conf, &inv.runtime_config, prev_result);
    let env = CallEnv {
        command,
        inv,
        attachment: true,
    };
    let stdout = exec(index, ty, &stdin, &env)?;
    if stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&stdout).map_err(|e| RunError::BadResult {
        index,
        plugin: ty.clone(),
        command,
        reason: e.to_string(),
    })
}

/// STATUS (1.1.0): every plugin in order, no attachment, no runtimeConfig.
pub fn status(conflist: &Value, cni_path: &[PathBuf]) -> Result<(), RunError> {
    each_plugin_without_attachment(conflist, cni_path, "STATUS", None)
}

/// GC (1.1.0): every plugin in order with `cni.dev/valid-attachments`, no attachment.
/// `valid` holds `(containerID, ifname)` pairs that must be kept.
pub fn gc(
    conflist: &Value,
    cni_path: &[PathBuf],
    valid: &[(String, String)],
) -> Result<(), RunError> {
    let attachments: Vec<Value> = valid
        .iter()
        .map(|(id, ifname)| serde_json::json!({"containerID": id, "ifname": ifname}))
        .collect();
    let extra = ("cni.dev/valid-attachments", Value::Array(attachments));
    each_plugin_without_attachment(conflist, cni_path, "GC", Some(extra))
}

/// The 1.1.0 commands that concern the network, not one attachment (STATUS, GC): empty
/// container id/netns/ifname, every plugin in order, `extra` added to each plugin's stdin.
fn each_plugin_without_attachment(
    conflist: &Value,
    cni_path: &[PathBuf],
    command: &'static str,
    extra: Option<(&str, Value)>,
) -> Result<(), RunError> {
    let list = parse_list(conflist)?;
    if !version_at_least(&list.version, "1.1.0") {
        return Err(RunError::Version {
            command,
            needed: "1.1.0",
            have: list.version,
        });
    }
    let inv = Invocation {
        cni_path: cni_path.to_vec(),
        ..Invocation::default()
    };
    let env = CallEnv {
        command,
        inv: &inv,
        attachment: false,
    };
    for (index, (conf, ty)) in list.plugins.iter().enumerate() {
        let mut stdin = list.stdin(conf, &Map::new(), None);
        if let (Some((k, v)), Value::Object(o)) = (&extra, &mut stdin) {
            o.insert((*k).to_string(), v.clone());
        }
        exec(index, ty, &stdin, &env)?;
    }
    Ok(())
}

/// Reads a conflist file, or a lone `.conf` wrapped into a one-plugin list as libcni does.
pub fn load(path: &Path) -> Result<Value, RunError> {
    let text =
        std::fs::read(path).map_err(|e| RunError::Conflist(format!("{}: {e}", path.display())))?;
    let v: Value = serde_json::from_slice(&text)
        .map_err(|e| RunError::Conflist(format!("{}: {e}", path.display())))?;
    if v.get("plugins").is_some() {
        return Ok(v);
    }
    // A single-plugin `.conf`: libcni's ConfListFromConf keeps name and cniVersion at the top.
    let mut list = Map::new();
    if let Some(ver) = v.get("cniVersion") {
        list.insert("cniVersion".into(), ver.clone());
    }
    if let Some(name) = v.get("name") {
        list.insert("name".into(), name.clone());
    }
    list.insert("plugins".into(), Value::Array(vec![v]));
    Ok(Value::Object(list))
}
