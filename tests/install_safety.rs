//! The installer never breaks a node: it refuses configs the plugin cannot serve, leaves a
//! `.conf` primary's file alone (our chained copy sorts first and follows its source), sees
//! symlinks re-pointed anywhere on the conf dir's path, and orders file names as bytes, the way
//! containerd and CRI-O do (docs/install.md, "How the installer picks and chains a config").

#[macro_use]
mod common;
mod install_support;

use install_support::*;

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
        wait_for(Duration::from_secs(1), "ready after the fix", || d.ready());
        let chained = fs::read_to_string(d.health.join("ready")).unwrap();
        assert!(ours_in(&d, chained.trim()), "{chained}");
        assert!(daemon.term().success(), "{}", daemon.log());
    }
}
