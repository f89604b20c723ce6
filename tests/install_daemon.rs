//! The `tproxy-cni-install` binary against temp dirs: install, idempotence, waiting, repair after
//! rewrite and rename, malformed files, lone .conf, SIGTERM cleanup, --keep-on-exit, probes.

use serde_json::Value;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tproxy-cni-install");

fn fixture(name: &str) -> Vec<u8> {
    fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/testdata/conflist")
            .join(name),
    )
    .unwrap()
}

struct Dirs {
    _tmp: tempfile::TempDir,
    conf: PathBuf,
    bin: PathBuf,
    health: PathBuf,
    plugin: PathBuf,
    log: PathBuf,
}

fn dirs() -> Dirs {
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
    fn args(&self) -> Vec<String> {
        vec![
            format!("--conf-dir={}", self.conf.display()),
            format!("--bin-dir={}", self.bin.display()),
            format!("--binary={}", self.plugin.display()),
            format!("--health-dir={}", self.health.display()),
            "--log-level=debug".into(),
        ]
    }

    fn run(&self, extra: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(self.args())
            .args(extra)
            .output()
            .unwrap()
    }

    fn spawn(&self, extra: &[&str]) -> Daemon {
        let log = fs::File::create(&self.log).unwrap();
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
            log: self.log.clone(),
        }
    }

    fn read(&self, name: &str) -> Value {
        serde_json::from_slice(&fs::read(self.conf.join(name)).unwrap()).unwrap()
    }

    fn ready(&self) -> bool {
        Command::new(BIN)
            .args(["--probe", "ready", "--health-dir"])
            .arg(&self.health)
            .status()
            .unwrap()
            .success()
    }

    /// Writes a file the way most primaries do: temp file + rename.
    fn write_atomic(&self, name: &str, bytes: &[u8]) {
        let tmp = self.conf.join(format!(".{name}.writing"));
        fs::write(&tmp, bytes).unwrap();
        fs::rename(&tmp, self.conf.join(name)).unwrap();
    }

    fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = fs::read_dir(&self.conf)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    }
}

struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// SIGTERM, then the exit status (within 5 s).
    fn term(&mut self) -> std::process::ExitStatus {
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
    fn pid(&self) -> u32 {
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

fn has_ours(v: &Value) -> bool {
    v["plugins"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["type"] == "tproxy-cni"))
}

/// Polls `cond` until it holds or `within` passes; returns how long it took.
fn wait_for(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
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

fn ours_in(d: &Dirs, name: &str) -> bool {
    fs::read(d.conf.join(name))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| has_ours(&v))
}

#[test]
fn once_installs_and_second_run_changes_nothing() {
    let d = dirs();
    fs::write(
        d.conf.join("10-calico.conflist"),
        fixture("calico.before.conflist"),
    )
    .unwrap();
    fs::write(d.conf.join("calico-kubeconfig"), b"apiVersion: v1\n").unwrap();
    let out = d.run(&["--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = d.read("10-calico.conflist");
    assert!(has_ours(&v));
    assert_eq!(
        fs::read(d.conf.join("10-calico.conflist")).unwrap(),
        fixture("calico.after.conflist")
    );
    let bin = d.bin.join("tproxy-cni");
    assert_eq!(fs::read(&bin).unwrap(), fs::read(&d.plugin).unwrap());
    assert_eq!(
        fs::metadata(&bin).unwrap().permissions().mode() & 0o7777,
        0o755
    );

    let conf_meta = fs::metadata(d.conf.join("10-calico.conflist")).unwrap();
    let bin_meta = fs::metadata(&bin).unwrap();
    let out = d.run(&["--once"]);
    assert!(out.status.success());
    // Nothing rewritten: same inodes (every write of ours is a rename to a new inode).
    assert_eq!(
        fs::metadata(d.conf.join("10-calico.conflist"))
            .unwrap()
            .ino(),
        conf_meta.ino()
    );
    assert_eq!(fs::metadata(&bin).unwrap().ino(), bin_meta.ino());
    assert_eq!(d.names(), ["10-calico.conflist", "calico-kubeconfig"]);

    // --uninstall: entry removed (back to the original content), binary removed, rest kept.
    let out = d.run(&["--uninstall"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = d.read("10-calico.conflist");
    let orig: Value = serde_json::from_slice(&fixture("calico.before.conflist")).unwrap();
    assert_eq!(v, orig);
    assert!(!bin.exists());
    assert_eq!(
        fs::read(d.conf.join("calico-kubeconfig")).unwrap(),
        b"apiVersion: v1\n"
    );
}

#[test]
fn daemon_waits_repairs_and_cleans_up_on_sigterm() {
    let d = dirs();
    fs::write(d.conf.join("calico-kubeconfig"), b"kubeconfig\n").unwrap();
    let mut daemon = d.spawn(&[]);

    // No primary yet: waits, not ready.
    wait_for(Duration::from_secs(3), "binary copied", || {
        d.bin.join("tproxy-cni").exists()
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(!d.ready());
    assert!(
        daemon.log().contains("waiting for the primary CNI"),
        "{}",
        daemon.log()
    );

    // Not a busy wait: idle for a second costs (almost) no CPU.
    let cpu = |pid: u32| -> u64 {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = stat.rsplit_once(')').unwrap().1;
        let f: Vec<&str> = after.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let c0 = cpu(daemon.pid());
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        cpu(daemon.pid()) - c0 <= 2,
        "installer burns CPU while idle"
    );

    // The primary appears: entry within a second, ready.
    d.write_atomic("10-calico.conflist", &fixture("calico.before.conflist"));
    let t = wait_for(Duration::from_secs(1), "entry after create", || {
        ours_in(&d, "10-calico.conflist")
    });
    eprintln!("inserted after {t:?}");
    wait_for(Duration::from_secs(1), "ready", || d.ready());

    // The primary rewrites its file in place (truncate + write): repaired within a second.
    fs::write(
        d.conf.join("10-calico.conflist"),
        fixture("calico.before.conflist"),
    )
    .unwrap();
    let t = wait_for(
        Duration::from_secs(1),
        "entry after in-place rewrite",
        || ours_in(&d, "10-calico.conflist"),
    );
    eprintln!("repaired in-place rewrite after {t:?}");

    // ... and by rename over the old file.
    d.write_atomic("10-calico.conflist", &fixture("calico.before.conflist"));
    let t = wait_for(Duration::from_secs(1), "entry after rename rewrite", || {
        ours_in(&d, "10-calico.conflist")
    });
    eprintln!("repaired rename rewrite after {t:?}");

    // The primary renames its file: the new name gets the entry.
    fs::rename(
        d.conf.join("10-calico.conflist"),
        d.conf.join("11-calico.conflist"),
    )
    .unwrap();
    // Strip our entry during the rename, as a re-installing primary would.
    d.write_atomic("11-calico.conflist", &fixture("calico.before.conflist"));
    wait_for(Duration::from_secs(1), "entry after rename", || {
        ours_in(&d, "11-calico.conflist")
    });

    // A malformed file becomes the primary: named in the log, left untouched, not ready.
    let bad = b"{\"name\": \"broken\", \"plugins\": [";
    d.write_atomic("05-broken.conflist", bad);
    wait_for(Duration::from_secs(1), "malformed file logged", || {
        daemon.log().contains("05-broken.conflist: malformed JSON")
    });
    wait_for(Duration::from_secs(1), "not ready", || !d.ready());
    assert_eq!(fs::read(d.conf.join("05-broken.conflist")).unwrap(), bad);
    // Fixed by its owner: retried on change.
    d.write_atomic("05-broken.conflist", &fixture("flannel.before.conflist"));
    wait_for(Duration::from_secs(1), "entry after fix", || {
        ours_in(&d, "05-broken.conflist")
    });
    wait_for(Duration::from_secs(1), "ready again", || d.ready());

    // Our own writes do not make us loop: the log stays quiet while nothing changes.
    std::thread::sleep(Duration::from_millis(300));
    let lines = daemon.log().lines().count();
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(daemon.log().lines().count(), lines, "{}", daemon.log());

    // SIGTERM: every entry removed, then the binary; other files untouched.
    let st = daemon.term();
    assert!(st.success(), "{st:?}\n{}", daemon.log());
    for name in ["05-broken.conflist", "11-calico.conflist"] {
        assert!(!ours_in(&d, name), "{name} still has our entry");
    }
    assert_eq!(
        d.read("11-calico.conflist"),
        serde_json::from_slice::<Value>(&fixture("calico.before.conflist")).unwrap()
    );
    assert!(!d.bin.join("tproxy-cni").exists());
    assert!(!d.ready());
    assert_eq!(
        fs::read(d.conf.join("calico-kubeconfig")).unwrap(),
        b"kubeconfig\n"
    );
    let log = daemon.log();
    // Order matters: a runtime must never see our entry without our binary.
    let entry_gone = log
        .rfind("removed our entry")
        .expect("entry removal logged");
    let bin_line = format!("removed {}", d.bin.join("tproxy-cni").display());
    let bin_gone = log.find(&bin_line).expect("binary removal logged");
    assert!(entry_gone < bin_gone, "{log}");
}

#[test]
fn keep_on_exit_leaves_entry_and_binary() {
    let d = dirs();
    d.write_atomic("10-flannel.conflist", &fixture("flannel.before.conflist"));
    let mut daemon = d.spawn(&["--keep-on-exit"]);
    wait_for(Duration::from_secs(2), "entry", || {
        ours_in(&d, "10-flannel.conflist")
    });
    assert!(daemon.term().success());
    assert!(ours_in(&d, "10-flannel.conflist"));
    assert!(d.bin.join("tproxy-cni").exists());
    // Not ready any more: the pod is going away.
    assert!(!d.ready());
}

#[test]
fn deleted_binary_is_restored_on_resync() {
    let d = dirs();
    d.write_atomic("10-flannel.conflist", &fixture("flannel.before.conflist"));
    let mut daemon = d.spawn(&["--resync", "1"]);
    let bin = d.bin.join("tproxy-cni");
    wait_for(Duration::from_secs(2), "binary", || bin.exists());
    fs::remove_file(&bin).unwrap();
    wait_for(Duration::from_secs(3), "binary restored", || bin.exists());
    assert_eq!(fs::read(&bin).unwrap(), fs::read(&d.plugin).unwrap());
    assert!(daemon.log().contains("disappeared"), "{}", daemon.log());
    // The resync also refreshes the liveness file.
    assert!(Command::new(BIN)
        .args(["--probe", "alive", "--max-age", "2", "--health-dir"])
        .arg(&d.health)
        .status()
        .unwrap()
        .success());
    assert!(daemon.term().success());
}

#[test]
fn lone_conf_is_converted_without_clobbering() {
    let d = dirs();
    d.write_atomic("10-bridge.conf", &fixture("lone.before.conf"));
    let out = d.run(&["--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.names(), ["10-bridge.conflist"]);
    assert_eq!(
        fs::read(d.conf.join("10-bridge.conflist")).unwrap(),
        fixture("lone.after.conflist")
    );
    // The primary writes its .conf again: our earlier .conflist (it holds our entry) is replaced.
    d.write_atomic("10-bridge.conf", &fixture("lone.before.conf"));
    let out = d.run(&["--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.names(), ["10-bridge.conflist"]);
    assert_eq!(
        fs::read(d.conf.join("10-bridge.conflist")).unwrap(),
        fixture("lone.after.conflist")
    );

    // A foreign 20-x.conflist next to a lone 20-x.conf (and nothing earlier): never overwritten.
    let d = dirs();
    d.write_atomic("20-x.conf", &fixture("lone.before.conf"));
    d.write_atomic("20-x.conflist", &fixture("cilium.before.conflist"));
    let out = d.run(&["--once"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("20-x.conflist") && err.contains("not ours"),
        "{err}"
    );
    assert_eq!(
        fs::read(d.conf.join("20-x.conflist")).unwrap(),
        fixture("cilium.before.conflist")
    );
    assert_eq!(
        fs::read(d.conf.join("20-x.conf")).unwrap(),
        fixture("lone.before.conf")
    );
}

#[test]
fn settings_file_and_bad_settings() {
    let d = dirs();
    d.write_atomic("10-kindnet.conflist", &fixture("kindnet.before.conflist"));
    let settings = d.conf.parent().unwrap().join("settings.json");
    fs::write(&settings, br#"{"failClosed": true, "logLevel": "debug"}"#).unwrap();
    let out = d.run(&["--once", "--settings", settings.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = d.read("10-kindnet.conflist");
    let ours = v["plugins"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(ours["failClosed"], true);
    assert_eq!(ours["logLevel"], "debug");

    fs::write(&settings, b"[1,2]").unwrap();
    let out = d.run(&["--once", "--settings", settings.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("settings"));
    // Bad flags: a usage error, not a panic.
    let out = d.run(&["--frobnicate"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown flag"));
}

#[test]
fn probes() {
    let d = dirs();
    fs::create_dir_all(&d.health).unwrap();
    let probe = |what: &str| {
        Command::new(BIN)
            .args(["--probe", what, "--health-dir"])
            .arg(&d.health)
            .status()
            .unwrap()
            .success()
    };
    assert!(!probe("ready") && !probe("alive"));
    fs::write(d.health.join("ready"), b"x").unwrap();
    fs::write(d.health.join("alive"), b"").unwrap();
    assert!(probe("ready") && probe("alive"));
    assert!(!probe("bogus"));
}
