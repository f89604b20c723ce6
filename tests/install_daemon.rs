//! The `tproxy-cni-install` binary against temp dirs: install, idempotence, waiting, repair after
//! rewrite and rename, malformed files, SIGTERM (keep by default, --remove-on-exit),
//! probes, missing primary binaries, lost updates, invalid first files, symlinks, back-off and
//! two installers with different settings.

#[macro_use]
mod common;
mod install_support;

use install_support::*;

use serde_json::Value;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

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
    let mut daemon = d.spawn(&["--remove-on-exit"]);

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

    // SIGTERM with --remove-on-exit: every entry removed, then the binary; other files untouched.
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
fn sigterm_keeps_entry_and_binary_by_default() {
    for extra in [&[][..], &["--keep-on-exit"][..]] {
        let d = dirs();
        d.write_atomic("10-flannel.conflist", &fixture("flannel.before.conflist"));
        let mut daemon = d.spawn(extra);
        wait_for(Duration::from_secs(2), "entry", || {
            ours_in(&d, "10-flannel.conflist")
        });
        assert!(daemon.term().success());
        assert!(ours_in(&d, "10-flannel.conflist"), "{extra:?}");
        assert!(d.bin.join("tproxy-cni").exists(), "{extra:?}");
        // Not ready any more: the pod is going away.
        assert!(!d.ready());
        assert!(
            daemon.log().contains("leaving our entry"),
            "{}",
            daemon.log()
        );
    }
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

/// Lines of `log` at level ERROR or WARN that contain `needle`.
fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn missing_primary_binary_blocks_chaining_until_it_appears() {
    let d = dirs();
    // The bin dir we were given is not where this primary's binaries live (as on GKE when
    // --bin-dir says /opt/cni/bin): calico and portmap are missing, bandwidth is there.
    fs::remove_file(d.bin.join("calico")).unwrap();
    fs::remove_file(d.bin.join("portmap")).unwrap();
    // An absolute symlink resolves on the host, not in the installer's container: it counts as
    // present (the runtime may find it), so bandwidth is not reported.
    fs::remove_file(d.bin.join("bandwidth")).unwrap();
    std::os::unix::fs::symlink("/host-only/cni/bandwidth", d.bin.join("bandwidth")).unwrap();
    let original = fixture("calico.before.conflist");
    d.write_atomic("10-calico.conflist", &original);

    // --once: refused with the message, nothing written.
    let out = d.run(&["--once"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        d.conf.display().to_string(),
        d.bin.display().to_string(),
        "plugin(s) \"calico\", \"portmap\" but".into(),
        "/home/kubernetes/bin".into(),
    ] {
        assert!(err.contains(&want), "{want:?} not in {err}");
    }
    assert_eq!(
        fs::read(d.conf.join("10-calico.conflist")).unwrap(),
        original
    );

    // The daemon: no entry, not ready, one line however many resyncs pass.
    let mut daemon = d.spawn(&["--resync", "1"]);
    wait_for(Duration::from_secs(2), "refusal logged", || {
        daemon.log().contains("has no such executable")
    });
    std::thread::sleep(Duration::from_millis(2500));
    let log = daemon.log();
    assert_eq!(lines_with(&log, "has no such executable"), 1, "{log}");
    assert!(!d.ready());
    // The readiness probe says why (kubectl describe pod shows a failing probe's output).
    let probe = Command::new(BIN)
        .args(["--probe", "ready", "--health-dir"])
        .arg(&d.health)
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&probe.stderr);
    assert!(
        why.contains("not ready: ") && why.contains("\"calico\", \"portmap\""),
        "{why}"
    );
    assert_eq!(
        fs::read(d.conf.join("10-calico.conflist")).unwrap(),
        original
    );
    // Our own binary is installed already (it must be in place before any entry names it).
    assert!(d.bin.join("tproxy-cni").is_file());

    // One of the two appears: what is missing changed, so one new line naming only portmap.
    fake_binary(&d.bin, "calico");
    wait_for(Duration::from_secs(3), "second refusal", || {
        lines_with(&daemon.log(), "has no such executable") == 2
    });
    let log = daemon.log();
    let last = log
        .lines()
        .rfind(|l| l.contains("has no such executable"))
        .unwrap();
    assert!(
        last.contains("\"portmap\"") && !last.contains("\"calico\""),
        "{last}"
    );
    // A binary that is there but not executable does not count.
    fs::write(d.bin.join("portmap"), b"not executable").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!ours_in(&d, "10-calico.conflist"));
    assert_eq!(
        lines_with(&daemon.log(), "has no such executable"),
        2,
        "{}",
        daemon.log()
    );

    // The last one becomes executable: chained within the resync period (1 s), ready.
    fs::set_permissions(d.bin.join("portmap"), fs::Permissions::from_mode(0o755)).unwrap();
    let t = wait_for(Duration::from_millis(2500), "chained after binary", || {
        ours_in(&d, "10-calico.conflist")
    });
    eprintln!("chained {t:?} after the binary appeared");
    wait_for(Duration::from_secs(1), "ready", || d.ready());

    // A primary binary disappears later: our entry stays (the node is broken regardless,
    // removing it would not help), not ready, said once.
    fs::remove_file(d.bin.join("bandwidth")).unwrap();
    wait_for(
        Duration::from_secs(3),
        "not ready after binary vanished",
        || !d.ready(),
    );
    std::thread::sleep(Duration::from_millis(2000));
    let log = daemon.log();
    assert_eq!(lines_with(&log, "our entry stays"), 1, "{log}");
    assert!(ours_in(&d, "10-calico.conflist"));
    assert!(daemon.term().success());
}

/// Writes `bytes` under `name` via a temp file and rename, as primaries do (unique temp name).
fn write_renamed(conf: &Path, name: &str, bytes: &[u8], n: usize) {
    let tmp = conf.join(format!(".writer.{n}"));
    fs::write(&tmp, bytes).unwrap();
    fs::rename(&tmp, conf.join(name)).unwrap();
}

#[test]
fn primary_write_during_patch_is_never_lost() {
    let d = dirs();
    let base: Value = serde_json::from_slice(&fixture("calico.before.conflist")).unwrap();
    let version = |mtu: u64| {
        let mut v = base.clone();
        v["plugins"][0]["mtu"] = mtu.into();
        serde_json::to_vec_pretty(&v).unwrap()
    };
    d.write_atomic("10-calico.conflist", &version(1));
    let _daemon = d.spawn(&[]);
    wait_for(Duration::from_secs(2), "entry", || {
        ours_in(&d, "10-calico.conflist")
    });
    let mtu = || -> Option<(u64, bool)> {
        let v: Value =
            serde_json::from_slice(&fs::read(d.conf.join("10-calico.conflist")).ok()?).ok()?;
        Some((v["plugins"][0]["mtu"].as_u64()?, has_ours(&v)))
    };
    let mut lost = Vec::new();
    // The primary writes v1, then v2 a little later, landing while the installer (which
    // reacts to v1 after its 30 ms settle) reads, patches and writes. Sweep the gap.
    for trial in 0..60u64 {
        let (v1, v2) = (1000 + trial, 5000 + trial);
        write_renamed(&d.conf, "10-calico.conflist", &version(v1), 1);
        std::thread::sleep(Duration::from_micros(25_000 + (trial % 20) * 1_000));
        write_renamed(&d.conf, "10-calico.conflist", &version(v2), 2);
        // Settled: v2's content with our entry (repaired within a second).
        let ok = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            mtu() == Some((v2, true))
        });
        if !ok {
            lost.push((trial, mtu()));
        }
    }
    assert!(
        lost.is_empty(),
        "the primary's newer write was lost: {lost:?}"
    );
}

#[test]
fn invalid_first_file_containerd_refuses_crio_skips() {
    for (first, bytes, why) in [
        (
            "00-broken.conflist",
            &b"{\"name\": \"x\", \"plugins\": ["[..],
            "malformed JSON",
        ),
        (
            "00-nobin.conflist",
            &br#"{"cniVersion":"1.0.0","name":"old","plugins":[{"type":"weave-net"}]}"#[..],
            "\"weave-net\"",
        ),
    ] {
        let d = dirs();
        d.write_atomic(first, bytes);
        let calico = fixture("calico.before.conflist");
        d.write_atomic("10-calico.conflist", &calico);

        // containerd loads the first file only: the node is broken; refuse, touch nothing.
        let out = d.run(&["--once"]);
        assert!(!out.status.success(), "{first}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(first) && err.contains(why) && err.contains("containerd"),
            "{err}"
        );
        assert_eq!(fs::read(d.conf.join(first)).unwrap(), bytes);
        assert_eq!(fs::read(d.conf.join("10-calico.conflist")).unwrap(), calico);

        // CRI-O skips it and uses the first valid one: that one gets the entry.
        let out = d.run(&["--once", "--runtime", "crio"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(ours_in(&d, "10-calico.conflist"));
        assert_eq!(fs::read(d.conf.join(first)).unwrap(), bytes);
    }

    // CRI-O with cni_default_network: the valid config with that name, not the first.
    let d = dirs();
    d.write_atomic("10-flannel.conflist", &fixture("flannel.before.conflist"));
    d.write_atomic("20-calico.conflist", &fixture("calico.before.conflist"));
    let calico_name = d.read("20-calico.conflist")["name"]
        .as_str()
        .unwrap()
        .to_string();
    let out = d.run(&[
        "--once",
        "--runtime=crio",
        "--default-network",
        &calico_name,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ours_in(&d, "20-calico.conflist"));
    assert!(!ours_in(&d, "10-flannel.conflist"));
    // No config by that name: refused, named.
    let out = d.run(&["--once", "--runtime=crio", "--default-network", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"nope\""));
}

#[test]
fn symlinked_conflist_is_written_through_the_link() {
    let d = dirs();
    let real_dir = d.conf.parent().unwrap().join("calico-etc");
    fs::create_dir_all(&real_dir).unwrap();
    let real = real_dir.join("calico.conflist");
    fs::write(&real, fixture("calico.before.conflist")).unwrap();
    std::os::unix::fs::symlink(
        "../calico-etc/calico.conflist",
        d.conf.join("10-calico.conflist"),
    )
    .unwrap();
    let link_is_link = || {
        fs::symlink_metadata(d.conf.join("10-calico.conflist"))
            .unwrap()
            .file_type()
            .is_symlink()
    };
    let out = d.run(&["--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(link_is_link());
    assert!(ours_in(&d, "10-calico.conflist"));
    assert_eq!(d.names(), ["10-calico.conflist"]);
    // The owner updates the target: what the runtime reads through the link is that update;
    // the daemon puts our entry back into it (the target's directory is watched too: well
    // within the 30 s resync), the link stays a link.
    let mut daemon = d.spawn(&["--remove-on-exit"]);
    wait_for(Duration::from_secs(2), "ready", || d.ready());
    let mut v: Value = serde_json::from_slice(&fixture("calico.before.conflist")).unwrap();
    v["plugins"][0]["mtu"] = 1440.into();
    fs::write(&real, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    wait_for(Duration::from_secs(1), "entry back in the target", || {
        ours_in(&d, "10-calico.conflist")
    });
    assert_eq!(d.read("10-calico.conflist")["plugins"][0]["mtu"], 1440);
    // Again, by rename inside the target's directory.
    v["plugins"][0]["mtu"] = 1400.into();
    write_renamed(
        &real_dir,
        "calico.conflist",
        &serde_json::to_vec_pretty(&v).unwrap(),
        0,
    );
    wait_for(Duration::from_secs(1), "entry back after rename", || {
        ours_in(&d, "10-calico.conflist")
    });
    assert!(link_is_link());
    assert_eq!(d.read("10-calico.conflist")["plugins"][0]["mtu"], 1400);
    // Uninstall cleans the target; nothing is left in the conf dir but the link.
    assert!(daemon.term().success(), "{}", daemon.log());
    assert!(link_is_link());
    assert!(!ours_in(&d, "10-calico.conflist"));
    assert_eq!(d.read("10-calico.conflist"), v);
    let mut others: Vec<_> = fs::read_dir(&real_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    others.sort();
    assert_eq!(others, ["calico.conflist"]);
}

#[test]
fn failing_write_backs_off_instead_of_triggering_itself() {
    require_root!();
    let d = dirs();
    let calico = fixture("calico.before.conflist");
    d.write_atomic("10-calico.conflist", &calico);
    let file = d.conf.join("10-calico.conflist");
    // The conflist is a bind mount of itself (as when a file is mounted into place): every
    // rename or exchange over it fails with EBUSY. A private mount namespace of the installer
    // keeps the mount away from the host; the installer itself runs unchanged.
    let log = fs::File::create(&d.log).unwrap();
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$0" "$0" && exec "$@""#)
        .arg(&file)
        .arg(BIN)
        .args(d.args())
        .args(["--resync", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    let mut daemon = Daemon {
        child: Some(child),
        log: d.log.clone(),
    };
    wait_for(Duration::from_secs(3), "first failure", || {
        daemon.log().contains("ERROR")
    });
    std::thread::sleep(Duration::from_millis(3500));
    let log = daemon.log();
    let errors = lines_with(&log, "ERROR");
    eprintln!("{errors} ERROR lines in 3.5 s");
    // Back-off 0.5, 1, 2 s: 3 or 4 attempts (the old installer logged one every ~30 ms).
    assert!((2..=5).contains(&errors), "{log}");
    assert!(log.contains("Device or resource busy"), "{log}");
    assert_eq!(fs::read(&file).unwrap(), calico);
    assert!(!d.ready());
    // No temp file of ours is left behind once the attempt in flight has ended (the 3.5 s mark
    // is also when the back-off schedule makes its fourth attempt, whose temp file exists
    // for that instant): stop the installer, then look.
    assert!(daemon.term().success(), "{}", daemon.log());
    assert_eq!(d.names(), ["10-calico.conflist"]);
}

#[test]
fn primary_bytes_survive_install_and_uninstall() {
    let d = dirs();
    let original = fixture("numbers.before.conflist");
    d.write_atomic("10-numbers.conflist", &original);
    let out = d.run(&["--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read(d.conf.join("10-numbers.conflist")).unwrap(),
        fixture("numbers.after.conflist")
    );
    let out = d.run(&["--uninstall"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Byte for byte: `1e3`, the big integer and the long fraction as the primary wrote them.
    assert_eq!(
        String::from_utf8(fs::read(d.conf.join("10-numbers.conflist")).unwrap()).unwrap(),
        String::from_utf8(original).unwrap()
    );
}

#[test]
fn two_installers_with_different_settings_settle() {
    let d = dirs();
    d.write_atomic("10-calico.conflist", &fixture("calico.before.conflist"));
    let root = d.conf.parent().unwrap().to_path_buf();
    let spawn = |n: &str, settings: &str| {
        d.spawn_logged(
            &[
                &format!("--settings-json={settings}"),
                &format!("--health-dir={}", root.join(n).display()),
            ],
            &root.join(format!("{n}.log")),
        )
    };
    let writes = |logs: &[&Daemon]| -> usize {
        logs.iter()
            .map(|l| lines_with(&l.log(), "added our entry"))
            .sum()
    };
    let a = spawn("a", r#"{"logLevel":"debug"}"#);
    wait_for(Duration::from_secs(2), "a's entry", || {
        ours_in(&d, "10-calico.conflist")
    });
    let b = spawn("b", r#"{"logLevel":"info"}"#);
    std::thread::sleep(Duration::from_secs(2));
    // A asserted its entry, B (newer) asserted its own once, A left it: two writes in all.
    let n = writes(&[&a, &b]);
    assert!(n <= 2, "{n} writes:\n{}\n{}", a.log(), b.log());
    assert_eq!(
        d.read("10-calico.conflist")["plugins"][3]["logLevel"],
        "info"
    );
    assert!(a.log().contains("other settings"), "{}", a.log());
    // The primary rewrites its file without our entry: one of them puts it back, the other
    // leaves it; then quiet (same inode for a second).
    d.write_atomic("10-calico.conflist", &fixture("calico.before.conflist"));
    wait_for(Duration::from_secs(2), "entry back", || {
        ours_in(&d, "10-calico.conflist")
    });
    std::thread::sleep(Duration::from_millis(500));
    let ino = fs::metadata(d.conf.join("10-calico.conflist"))
        .unwrap()
        .ino();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        fs::metadata(d.conf.join("10-calico.conflist"))
            .unwrap()
            .ino(),
        ino,
        "{}\n{}",
        a.log(),
        b.log()
    );
    let m = writes(&[&a, &b]);
    assert!(m - n <= 2, "{} writes after the rewrite", m - n);
}
