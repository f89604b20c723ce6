//! The installer never breaks a node: it refuses configs the plugin cannot serve, leaves a
//! `.conf` primary's file alone (our chained copy sorts first and follows its source), sees
//! symlinks re-pointed anywhere on the conf dir's path, and orders file names as bytes, the way
//! containerd and CRI-O do (docs/install.md, "How the installer picks and chains a config").

#[macro_use]
mod common;
mod install_support;

use install_support::*;

use serde_json::Value;

use std::fs;
use std::time::Duration;

/// A single-plugin primary config with `version` (`None`: the key is absent).
fn bridge_conf(version: Option<&str>) -> Vec<u8> {
    let mut v = serde_json::json!({"name": "k8s", "type": "bridge", "bridge": "cni0"});
    if let Some(ver) = version {
        v["cniVersion"] = ver.into();
    }
    serde_json::to_vec_pretty(&v).unwrap()
}

fn bridge_list(version: &str) -> Vec<u8> {
    serde_json::to_vec_pretty(&serde_json::json!({
        "cniVersion": version, "name": "k8s", "plugins": [{"type": "bridge"}]
    }))
    .unwrap()
}

#[test]
fn configs_the_plugin_cannot_serve_are_refused_not_ready() {
    for (file, bytes, version, says) in [
        (
            "10-a.conf",
            bridge_conf(Some("0.1.0")),
            "\"0.1.0\"",
            "older than 0.3.0",
        ),
        (
            "10-a.conf",
            bridge_conf(Some("0.2.0")),
            "\"0.2.0\"",
            "older than 0.3.0",
        ),
        (
            "10-a.conf",
            bridge_conf(None),
            "no \"cniVersion\"",
            "0.3.0 or later",
        ),
        (
            "10-a.conflist",
            bridge_list("0.2.0"),
            "\"0.2.0\"",
            "older than 0.3.0",
        ),
        (
            "10-a.conflist",
            bridge_list("1.2.0"),
            "\"1.2.0\"",
            "upgrade tproxy-cni",
        ),
    ] {
        let d = dirs();
        d.write_atomic(file, &bytes);
        // Once: fails with one line naming the file, the version and what to do.
        let out = d.run(&["--once"]);
        assert!(!out.status.success(), "{file} {version}");
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .find(|l| l.contains(version))
            .unwrap_or_else(|| panic!("{version}: {err}"));
        assert!(line.contains(file) && line.contains(says), "{line}");
        // Nothing written, nothing added.
        assert_eq!(d.names(), [file], "{err}");
        assert_eq!(fs::read(d.conf.join(file)).unwrap(), bytes);
        // The daemon stays not ready, and the probe says why.
        let mut daemon = d.spawn(&[]);
        wait_for(Duration::from_secs(3), "a reason", || {
            fs::read_to_string(d.health.join("reason")).is_ok_and(|r| r.contains(version))
        });
        assert!(!d.ready());
        let probe = std::process::Command::new(BIN)
            .args(["--probe", "ready", "--health-dir"])
            .arg(&d.health)
            .output()
            .unwrap();
        let why = String::from_utf8_lossy(&probe.stderr);
        assert!(why.contains(file) && why.contains(version), "{why}");
        // Fixed by the primary: chained within a second.
        let fixed = if file.ends_with(".conf") {
            bridge_conf(Some("1.0.0"))
        } else {
            bridge_list("1.0.0")
        };
        d.write_atomic(file, &fixed);
        // Ready, and the file the ready file names holds our entry (the ready file is
        // rewritten in place: an empty read is a write in progress).
        wait_for(Duration::from_secs(1), "ready after the fix", || {
            d.ready()
                && fs::read_to_string(d.health.join("ready"))
                    .is_ok_and(|n| !n.trim().is_empty() && ours_in(&d, n.trim()))
        });
        assert!(daemon.term().success(), "{}", daemon.log());
    }
}

/// The chained copy's name for the lone fixture at `10-bridge.conf`.
const CHAINED: &str = "10-bridge-tproxy-cni.conflist";

#[test]
fn a_conf_primary_keeps_its_file_and_our_chained_copy_is_loaded_first() {
    let d = dirs();
    let conf = fixture("lone.before.conf");
    d.write_atomic("10-bridge.conf", &conf);
    // A foreign list of the same stem, which the old converter would have refused to touch.
    let cilium = fixture("cilium.before.conflist");
    d.write_atomic("10-bridge.conflist", &cilium);
    let out = d.run(&["--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The primary's files are untouched; ours sorts first.
    assert_eq!(d.names(), [CHAINED, "10-bridge.conf", "10-bridge.conflist"]);
    assert_eq!(fs::read(d.conf.join("10-bridge.conf")).unwrap(), conf);
    assert_eq!(fs::read(d.conf.join("10-bridge.conflist")).unwrap(), cilium);
    // What each runtime loads: our copy, chaining the primary's plugin as written.
    assert_eq!(containerd_pick(&d.conf).unwrap(), CHAINED);
    let primary: Value = serde_json::from_slice(&conf).unwrap();
    assert_eq!(crio_pick(&d.conf, None).unwrap(), CHAINED);
    assert_eq!(
        crio_pick(&d.conf, primary["name"].as_str()).unwrap(),
        CHAINED
    );
    let v = d.read(CHAINED);
    assert_eq!(v["tproxyCniSource"], "10-bridge.conf");
    assert_eq!(v["name"], primary["name"]);
    assert_eq!(v["cniVersion"], primary["cniVersion"]);
    assert_eq!(v["plugins"][0], primary);
    assert_eq!(v["plugins"][1]["type"], "tproxy-cni");
    assert_eq!(v["plugins"].as_array().unwrap().len(), 2);
    // Idempotent: a second run writes nothing.
    let before = fs::metadata(d.conf.join(CHAINED))
        .unwrap()
        .modified()
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(d.run(&["--once"]).status.success());
    let after = fs::metadata(d.conf.join(CHAINED))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
    // Uninstall removes our copy whole; the primary's files stay as they were.
    assert!(d.run(&["--uninstall"]).status.success());
    assert_eq!(d.names(), ["10-bridge.conf", "10-bridge.conflist"]);
    assert_eq!(fs::read(d.conf.join("10-bridge.conf")).unwrap(), conf);
}

#[test]
fn the_chained_copy_follows_its_source_and_goes_with_it() {
    let d = dirs();
    let mut primary: Value = serde_json::from_slice(&fixture("lone.before.conf")).unwrap();
    d.write_atomic(
        "10-bridge.conf",
        &serde_json::to_vec_pretty(&primary).unwrap(),
    );
    let mut daemon = d.spawn(&[]);
    wait_for(Duration::from_secs(2), "ready", || d.ready());
    assert_eq!(d.read(CHAINED)["plugins"][0], primary);
    // The primary rewrites its .conf: our copy follows within a second.
    primary["mtu"] = 1410.into();
    d.write_atomic(
        "10-bridge.conf",
        &serde_json::to_vec_pretty(&primary).unwrap(),
    );
    wait_for(Duration::from_secs(1), "the copy follows", || {
        fs::read(d.conf.join(CHAINED))
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| v["plugins"][0] == primary)
    });
    // The primary uninstalls: our copy is gone within a second, and we are not ready.
    fs::remove_file(d.conf.join("10-bridge.conf")).unwrap();
    let took = wait_for(Duration::from_secs(1), "the copy removed", || {
        !d.conf.join(CHAINED).exists()
    });
    eprintln!("chained copy removed {took:?} after its source");
    assert!(d.names().is_empty(), "{:?}", d.names());
    wait_for(Duration::from_secs(1), "not ready", || !d.ready());
    // A list primary appears instead: patched in place as before.
    d.write_atomic("10-calico.conflist", &fixture("calico.before.conflist"));
    wait_for(Duration::from_secs(1), "ready on the list", || {
        ours_in(&d, "10-calico.conflist")
    });
    assert_eq!(d.names(), ["10-calico.conflist"]);
    // A .conf that now sorts first takes over: our copy for it, the list's entry stays.
    d.write_atomic(
        "05-bridge.conf",
        &serde_json::to_vec_pretty(&primary).unwrap(),
    );
    wait_for(Duration::from_secs(1), "a copy for the new first", || {
        d.conf.join("05-bridge-tproxy-cni.conflist").exists()
    });
    assert_eq!(
        containerd_pick(&d.conf).unwrap(),
        "05-bridge-tproxy-cni.conflist"
    );
    assert!(daemon.term().success(), "{}", daemon.log());
}

#[test]
fn a_layout_converted_by_an_older_installer_is_migrated() {
    let d = dirs();
    // An older installer turned 10-bridge.conf into 10-bridge.conflist and deleted the .conf.
    d.write_atomic("10-bridge.conflist", &fixture("lone.after.conflist"));
    assert!(d.run(&["--once"]).status.success());
    // Only the list exists: it is the primary now and keeps our entry.
    assert_eq!(d.names(), ["10-bridge.conflist"]);
    assert!(ours_in(&d, "10-bridge.conflist"));
    // The primary writes its .conf again: the old list goes, our copy stands in front.
    let conf = fixture("lone.before.conf");
    d.write_atomic("10-bridge.conf", &conf);
    let out = d.run(&["--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.names(), [CHAINED, "10-bridge.conf"]);
    assert_eq!(fs::read(d.conf.join("10-bridge.conf")).unwrap(), conf);
    assert!(String::from_utf8_lossy(&out.stderr).contains("older installer"));
}

#[test]
fn a_foreign_file_at_our_copys_name_is_never_replaced() {
    let d = dirs();
    d.write_atomic("10-bridge.conf", &fixture("lone.before.conf"));
    // Invalid for CRI-O (it skips it) and not ours.
    d.write_atomic(CHAINED, b"{\"name\": \"x\"");
    let out = d.run(&["--once", "--runtime", "crio"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(CHAINED) && err.contains("not ours"), "{err}");
    assert_eq!(fs::read(d.conf.join(CHAINED)).unwrap(), b"{\"name\": \"x\"");
}

/// `name` as raw bytes.
fn os(name: &[u8]) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(name).to_os_string()
}

fn has_ours_at(d: &Dirs, name: &std::ffi::OsStr) -> bool {
    fs::read(d.conf.join(name))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| has_ours(&v))
}

#[test]
fn file_names_are_bytes_ordered_as_the_runtimes_order_them() {
    let calico = fixture("calico.before.conflist");
    let flannel = fixture("flannel.before.conflist");
    // A non-UTF-8 name that sorts first: containerd loads it, so it is the one we patch.
    let d = dirs();
    let ff = os(b"10-\xff.conflist");
    fs::write(d.conf.join(&ff), &calico).unwrap();
    d.write_atomic("20-b.conflist", &flannel);
    assert_eq!(containerd_pick(&d.conf).unwrap(), ff);
    let out = d.run(&["--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(has_ours_at(&d, &ff));
    assert_eq!(fs::read(d.conf.join("20-b.conflist")).unwrap(), flannel);
    // The daemon sees a rewrite of it like any other.
    let mut daemon = d.spawn(&[]);
    wait_for(Duration::from_secs(2), "ready", || d.ready());
    fs::write(d.conf.join(&ff), &calico).unwrap();
    wait_for(
        Duration::from_secs(1),
        "entry back in the non-UTF-8 file",
        || has_ours_at(&d, &ff),
    );
    assert!(daemon.term().success(), "{}", daemon.log());
    // Uninstall cleans it too.
    assert!(d.run(&["--uninstall"]).status.success());
    assert_eq!(fs::read(d.conf.join(&ff)).unwrap(), calico);

    // Bytes, not characters or locale: 'z' (0x7a) sorts before 0xff, 'B' before 'a'.
    let d = dirs();
    fs::write(d.conf.join(os(b"10-\xff.conflist")), &calico).unwrap();
    d.write_atomic("10-z.conflist", &flannel);
    d.write_atomic("10-a.conflist", &flannel);
    d.write_atomic("10-B.conflist", &flannel);
    assert!(d.run(&["--once"]).status.success());
    assert_eq!(containerd_pick(&d.conf).unwrap(), "10-B.conflist");
    assert!(ours_in(&d, "10-B.conflist"));
    for other in ["10-a.conflist", "10-z.conflist"] {
        assert!(!ours_in(&d, other), "{other}");
    }
    assert!(!has_ours_at(&d, &os(b"10-\xff.conflist")));

    // CRI-O skips an invalid non-UTF-8 first file and takes the next valid one.
    let d = dirs();
    fs::write(d.conf.join(&ff), b"{").unwrap();
    d.write_atomic("20-b.conflist", &flannel);
    assert_eq!(crio_pick(&d.conf, None).unwrap(), "20-b.conflist");
    assert!(d.run(&["--once", "--runtime", "crio"]).status.success());
    assert!(ours_in(&d, "20-b.conflist"));
    // containerd would load the broken one: refused, nothing patched.
    let d = dirs();
    fs::write(d.conf.join(&ff), b"{").unwrap();
    d.write_atomic("20-b.conflist", &flannel);
    assert!(!d.run(&["--once"]).status.success());
    assert!(!ours_in(&d, "20-b.conflist"));

    // A non-UTF-8 single config: our copy could not record its source; refused, not ready.
    let d = dirs();
    let lone = os(b"10-\xff.conf");
    fs::write(d.conf.join(&lone), fixture("lone.before.conf")).unwrap();
    d.write_atomic("20-b.conflist", &flannel);
    let out = d.run(&["--once"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not UTF-8"), "{err}");
    assert_eq!(runtime_names(&d.conf).len(), 2);
    assert_eq!(fs::read(d.conf.join("20-b.conflist")).unwrap(), flannel);
}

/// Re-points the symlink `link` at `target` atomically, as `ln -sfn` and the kubelet's
/// ConfigMap writer do (a new link renamed over the old one).
fn repoint(link: &std::path::Path, target: &str) {
    let tmp = link.with_file_name(".repoint.tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    fs::rename(&tmp, link).unwrap();
}

/// `10-calico.conflist` in `dir` (created), without our entry.
fn calico_in(dir: &std::path::Path) -> std::path::PathBuf {
    fs::create_dir_all(dir).unwrap();
    let f = dir.join("10-calico.conflist");
    fs::write(&f, fixture("calico.before.conflist")).unwrap();
    f
}

fn ours_at(path: &std::path::Path) -> bool {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .is_some_and(|v| has_ours(&v))
}

/// A primary rewrite of `file` after the re-point is repaired within a second (the watch is on
/// the new directory), not at the resync (30 s here).
fn rewrite_is_repaired(file: &std::path::Path, daemon: &Daemon) {
    let mut v: Value = serde_json::from_slice(&fixture("calico.before.conflist")).unwrap();
    v["plugins"][0]["mtu"] = 1380.into();
    let tmp = file.with_file_name(".calico.writing");
    fs::write(&tmp, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    fs::rename(&tmp, file).unwrap();
    let start = std::time::Instant::now();
    while !ours_at(file) {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{}: not repaired within 1 s; installer log:\n{}",
            file.display(),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("{}: repaired in {:?}", file.display(), start.elapsed());
}

#[test]
fn a_conf_dir_symlink_repointed_is_followed_within_a_second() {
    let mut d = dirs();
    let base = d.conf.parent().unwrap().to_path_buf();
    fs::remove_dir(&d.conf).unwrap();
    let rev1 = calico_in(&base.join("rev1"));
    std::os::unix::fs::symlink("rev1", &d.conf).unwrap();
    let mut daemon = d.spawn(&[]);
    wait_for(Duration::from_secs(2), "ready on rev1", || ours_at(&rev1));
    let rev2 = calico_in(&base.join("rev2"));
    repoint(&d.conf, "rev2");
    let took = wait_for(Duration::from_secs(1), "chained in rev2", || ours_at(&rev2));
    eprintln!("conf dir link re-pointed: chained in {took:?}");
    rewrite_is_repaired(&rev2, &daemon);
    assert!(daemon.term().success(), "{}", daemon.log());

    // A parent of the conf dir re-pointed (MicroK8s' `current`).
    d = dirs();
    let base = d.conf.parent().unwrap().to_path_buf();
    let r1 = calico_in(&base.join("snap/r1/net.d"));
    let r2 = calico_in(&base.join("snap/r2/net.d"));
    std::os::unix::fs::symlink("r1", base.join("snap/current")).unwrap();
    d.conf = base.join("snap/current/net.d");
    let mut daemon = d.spawn(&[]);
    wait_for(Duration::from_secs(2), "ready on r1", || ours_at(&r1));
    repoint(&base.join("snap/current"), "r2");
    let took = wait_for(Duration::from_secs(1), "chained in r2", || ours_at(&r2));
    eprintln!("parent link re-pointed: chained in {took:?}");
    rewrite_is_repaired(&r2, &daemon);
    assert!(daemon.term().success(), "{}", daemon.log());
}

#[test]
fn a_configmap_data_swap_is_followed_even_when_the_old_dir_stays() {
    // The kubelet's ConfigMap volume: NAME -> ..data/NAME, ..data -> ..<timestamp>; an update
    // writes a new timestamped dir and renames a new ..data link over the old one. Here the
    // old dir is kept, so no event comes from its deletion.
    let d = dirs();
    let old = calico_in(&d.conf.join("..2026_01_01"));
    std::os::unix::fs::symlink("..2026_01_01", d.conf.join("..data")).unwrap();
    std::os::unix::fs::symlink(
        "..data/10-calico.conflist",
        d.conf.join("10-calico.conflist"),
    )
    .unwrap();
    let mut daemon = d.spawn(&[]);
    wait_for(Duration::from_secs(2), "ready", || ours_at(&old));
    let new = calico_in(&d.conf.join("..2026_01_02"));
    repoint(&d.conf.join("..data"), "..2026_01_02");
    let took = wait_for(Duration::from_secs(1), "chained in the new dir", || {
        ours_at(&new)
    });
    eprintln!("..data swapped: chained in {took:?}");
    assert!(old.exists());
    rewrite_is_repaired(&new, &daemon);
    assert!(daemon.term().success(), "{}", daemon.log());
}
