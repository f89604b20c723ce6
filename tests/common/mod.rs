//! Helpers shared by the integration tests: root gating, throwaway network namespaces, commands.
#![allow(dead_code)]

pub mod chain;
pub mod tools;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// True when the tests may touch the kernel (root). Unprivileged: prints why and returns false,
/// except under `CI`, where a skipped root test would hide a failure, so it panics.
pub fn have_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root, and CI is set: root tests must run in CI");
    }
    eprintln!("SKIP {test}: needs root (network namespaces, nftables)");
    false
}

/// `require_root!()` at the top of a test: returns early (skip) when unprivileged, fails in CI.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::common::have_root(module_path!()) {
            return;
        }
    };
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique short name for netns/veth objects in this test process (veth names max 15 chars).
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{}x{n}", std::process::id() % 100000)
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        sh(&format!("ip netns add {name}"));
        sh(&format!("ip -n {name} link set lo up"));
        Netns { name }
    }
    /// Path a container runtime would pass as `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }
    /// Runs a shell command inside the namespace; panics on failure.
    pub fn sh(&self, cmd: &str) -> String {
        sh(&self.inside(cmd))
    }
    /// Runs a shell command inside the namespace; returns the raw output.
    pub fn try_sh(&self, cmd: &str) -> Output {
        try_sh(&self.inside(cmd))
    }
    /// The whole command line (lists, pipes and all) in a shell inside the namespace: a bare
    /// `ip netns exec NS a && b` would run `b` in the host's netns.
    fn inside(&self, cmd: &str) -> String {
        format!(
            "ip netns exec {} bash -c '{}'",
            self.name,
            cmd.replace('\'', "'\\''")
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = try_sh(&format!("ip netns del {}", self.name));
    }
}

/// Runs `bash -c CMD`, panics with its stderr when it fails, returns stdout.
pub fn sh(cmd: &str) -> String {
    let out = try_sh(cmd);
    if !out.status.success() {
        panic!(
            "command failed: {cmd}\nstatus: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn try_sh(cmd: &str) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("spawn bash")
}
