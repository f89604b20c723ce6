//! Helpers shared by the installer's daemon tests: temp conf/bin/health dirs, the installer
//! binary run once or as a daemon, and polling.
#![allow(dead_code)]

use serde_json::Value;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tproxy-cni-install");

/// Every plugin type the fixtures' primaries use.
pub const PRIMARY_BINARIES: [&str; 13] = [
    "aws-cni",
    "bandwidth",
    "bridge",
    "calico",
    "cilium-cni",
    "egress-cni",
    "firewall",
    "flannel",
    "portmap",
    "ptp",
    "some-mesh-cni",
    "tuning",
    "loopback",
];

pub fn fake_binary(dir: &Path, name: &str) {
    let p = dir.join(name);
    fs::write(&p, b"#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
}

pub fn fixture(name: &str) -> Vec<u8> {
    fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/testdata/conflist")
            .join(name),
    )
    .unwrap()
}

pub struct Dirs {
    pub _tmp: tempfile::TempDir,
    pub conf: PathBuf,
    pub bin: PathBuf,
    pub health: PathBuf,
    pub plugin: PathBuf,
    pub log: PathBuf,
}

pub fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("net.d");
    let bin = tmp.path().join("bin");
    let health = tmp.path().join("health");
    let src = tmp.path().join("image");
    fs::create_dir_all(&conf).unwrap();
    fs::create_dir_all(&src).unwrap();
    // A stand-in for the plugin binary; only its bytes and mode matter here.
    let plugin = src.join("tproxy-cni");
    fs::write(&plugin, b"#!/bin/sh\necho fake plugin\n").unwrap();
    fs::set_permissions(&plugin, fs::Permissions::from_mode(0o700)).unwrap();
    let log = tmp.path().join("installer.log");
    // Stand-ins for the primaries' binaries: the installer chains only where the runtime would
    // find them. Only the names and the executable bit matter.
    fs::create_dir_all(&bin).unwrap();
    for name in PRIMARY_BINARIES {
        fake_binary(&bin, name);
    }
    Dirs {
        _tmp: tmp,
        conf,
        bin,
        health,
        plugin,
        log,
    }
}

impl Dirs {
    pub fn args(&self) -> Vec<String> {
        vec![
            format!("--conf-dir={}", self.conf.display()),
            format!("--bin-dir={}", self.bin.display()),
            format!("--binary={}", self.plugin.display()),
            format!("--health-dir={}", self.health.display()),
            "--log-level=debug".into(),
        ]
    }

    pub fn run(&self, extra: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(self.args())
            .args(extra)
            .output()
            .unwrap()
    }

    pub fn spawn(&self, extra: &[&str]) -> Daemon {
        self.spawn_logged(extra, &self.log)
    }

    pub fn spawn_logged(&self, extra: &[&str], log_path: &Path) -> Daemon {
        let log = fs::File::create(log_path).unwrap();
        // A long resync unless the test asks otherwise: repairs must come from inotify.
        let resync: &[&str] = if extra.iter().any(|a| a.starts_with("--resync")) {
            &[]
        } else {
            &["--resync", "30"]
        };
        let child = Command::new(BIN)
            .args(self.args())
            .args(resync)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        Daemon {
            child: Some(child),
            log: log_path.to_path_buf(),
        }
    }

    pub fn read(&self, name: &str) -> Value {
        serde_json::from_slice(&fs::read(self.conf.join(name)).unwrap()).unwrap()
    }

    pub fn ready(&self) -> bool {
        Command::new(BIN)
            .args(["--probe", "ready", "--health-dir"])
            .arg(&self.health)
            .status()
            .unwrap()
            .success()
    }

    /// Writes a file the way most primaries do: temp file + rename.
    pub fn write_atomic(&self, name: &str, bytes: &[u8]) {
        let tmp = self.conf.join(format!(".{name}.writing"));
        fs::write(&tmp, bytes).unwrap();
        fs::rename(&tmp, self.conf.join(name)).unwrap();
    }

    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = fs::read_dir(&self.conf)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    }
}

pub struct Daemon {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// SIGTERM, then the exit status (within 5 s).
    pub fn term(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "installer did not exit on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn has_ours(v: &Value) -> bool {
    v["plugins"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["type"] == "tproxy-cni"))
}

/// Polls `cond` until it holds or `within` passes; returns how long it took.
pub fn wait_for(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn ours_in(d: &Dirs, name: &str) -> bool {
    fs::read(d.conf.join(name))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| has_ours(&v))
}

/// Config names in `dir` as containerd's go-cni and CRI-O's ocicni list them: libcni
/// `ConfFiles` (extensions `.conf`, `.conflist`, `.json`, dot files included) sorted with Go's
/// `sort.Strings`, i.e. by bytes. A stand-in for the runtimes, written from their sources
/// (docs/install.md cites them), independent of the installer's code.
pub fn runtime_names(dir: &Path) -> Vec<std::ffi::OsString> {
    use std::os::unix::ffi::OsStrExt;
    let mut names: Vec<std::ffi::OsString> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| {
            let b = n.as_bytes();
            [&b".conf"[..], b".conflist", b".json"]
                .iter()
                .any(|ext| b.ends_with(ext))
        })
        .filter(|n| dir.join(n).is_file())
        .collect();
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    names
}

/// The file containerd uses: the first name (go-cni `loadFromConfDir`, one network).
pub fn containerd_pick(dir: &Path) -> Option<std::ffi::OsString> {
    runtime_names(dir).into_iter().next()
}

/// The file CRI-O uses (ocicni `loadNetworks`): invalid files skipped (here: JSON that is not a
/// list in a `.conflist`, or not a single config elsewhere; binaries are not checked), the
/// first file of each network name kept, the default network the first valid one's name or
/// `default_network`.
pub fn crio_pick(dir: &Path, default_network: Option<&str>) -> Option<std::ffi::OsString> {
    use std::os::unix::ffi::OsStrExt;
    let mut first_of_name: Vec<(String, std::ffi::OsString)> = Vec::new();
    for name in runtime_names(dir) {
        let Ok(v) = serde_json::from_slice::<Value>(&fs::read(dir.join(&name)).unwrap()) else {
            continue;
        };
        let valid = if name.as_bytes().ends_with(b".conflist") {
            v["plugins"].as_array().is_some_and(|p| !p.is_empty())
        } else {
            v["type"].is_string()
        };
        let Some(net) = v["name"].as_str().filter(|_| valid) else {
            continue;
        };
        if !first_of_name.iter().any(|(n, _)| n == net) {
            first_of_name.push((net.to_string(), name));
        }
    }
    let want = default_network
        .map(str::to_string)
        .or_else(|| first_of_name.first().map(|f| f.0.clone()))?;
    first_of_name
        .into_iter()
        .find(|(n, _)| *n == want)
        .map(|f| f.1)
}
