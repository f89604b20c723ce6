//! The plugin binary driven exactly as a runtime drives it (env + stdin), no kernel state needed:
//! VERSION, result passthrough for every version, errors and their codes, no panics.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_tproxy-cni");

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {:?}", self.stdout))
    }
    /// Asserts a CNI error object with `code` whose message mentions every `needle`.
    fn error(&self, code: u64, needles: &[&str]) {
        assert_eq!(
            self.code, 1,
            "exit code; stdout {:?} stderr {:?}",
            self.stdout, self.stderr
        );
        let v = self.json();
        assert_eq!(v["code"], code, "{v}");
        let msg = v["msg"].as_str().unwrap_or_default();
        for n in needles {
            assert!(msg.contains(n), "message {msg:?} should mention {n:?}");
        }
        assert!(v["cniVersion"].is_string(), "{v}");
    }
}

fn plugin(cmd: &str, netns: &str, stdin: &str) -> Out {
    plugin_env(
        &[
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ],
        stdin,
    )
}

fn plugin_env(env: &[(&str, &str)], stdin: &str) -> Out {
    let mut child = Command::new(BIN)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let o = child.wait_with_output().expect("wait");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn prev_result(version: &str) -> Value {
    // Shaped like the bridge plugin's result, plus a field this code has never heard of.
    json!({
        "cniVersion": version,
        "interfaces": [{"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"}, {"name": "eth0", "mac": "11:22:33:44:55:66", "sandbox": "/var/run/netns/x"}],
        "ips": [{"address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["10.96.0.10"]},
        "zz-vendor-extension": {"keep": ["me", 1, true]}
    })
}

fn conf(version: &str, annotations: Value, prev: Option<Value>) -> String {
    let mut c = json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "tproxy-cni",
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations},
    });
    if let Some(p) = prev {
        c["prevResult"] = p;
    }
    c.to_string()
}

#[test]
fn version_lists_every_supported_version() {
    let o = plugin_env(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let v = o.json();
    assert_eq!(v["cniVersion"], "1.1.0");
    for want in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(
            v["supportedVersions"]
                .as_array()
                .unwrap()
                .contains(&json!(want)),
            "{v}"
        );
    }
}

#[test]
fn add_passes_prev_result_through_unchanged_for_every_version() {
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let prev = prev_result(version);
        // Mode none: nothing to program, so no netns is touched and the path may be anything.
        let o = plugin(
            "ADD",
            "/var/run/netns/none",
            &conf(version, json!({}), Some(prev.clone())),
        );
        assert_eq!(o.code, 0, "{version}: {} {}", o.stdout, o.stderr);
        // Byte-for-byte: same keys, same order, same values.
        assert_eq!(o.stdout.trim(), prev.to_string(), "{version}");
    }
    // The result's version is the config's even when prevResult says otherwise.
    let o = plugin(
        "ADD",
        "/x",
        &conf("1.0.0", json!({}), Some(prev_result("0.4.0"))),
    );
    assert_eq!(o.json()["cniVersion"], "1.0.0");
}

#[test]
fn status_and_gc_succeed_silently() {
    for cmd in ["STATUS", "GC"] {
        let o = plugin_env(&[("CNI_COMMAND", cmd)], &conf("1.1.0", json!({}), None));
        assert_eq!(o.code, 0, "{cmd}: {} {}", o.stdout, o.stderr);
        assert!(
            o.stdout.is_empty(),
            "{cmd}: stdout must stay empty: {:?}",
            o.stdout
        );
    }
}

#[test]
fn del_succeeds_when_the_netns_is_gone_or_empty() {
    let c = conf(
        "1.0.0",
        json!({"tproxy-cni.io/mode": "tproxy"}),
        Some(prev_result("1.0.0")),
    );
    for netns in ["", "/var/run/netns/long-gone-pod"] {
        let o = plugin("DEL", netns, &c);
        assert_eq!(o.code, 0, "netns {netns:?}: {} {}", o.stdout, o.stderr);
        assert!(o.stdout.is_empty());
    }
    // DEL with annotations that no longer parse still succeeds (pitfall 9).
    let bad = conf("1.0.0", json!({"tproxy-cni.io/mode": "bogus"}), None);
    assert_eq!(plugin("DEL", "/var/run/netns/long-gone-pod", &bad).code, 0);
}

#[test]
fn bad_input_gets_the_right_code_and_names_the_key() {
    let prev = Some(prev_result("1.0.0"));
    plugin("ADD", "/x", "{not json").error(6, &["JSON"]);
    plugin("ADD", "/x", "").error(6, &[]);
    plugin(
        "ADD",
        "/x",
        r#"{"cniVersion":"0.2.0","name":"x","type":"tproxy-cni"}"#,
    )
    .error(1, &["0.2.0"]);
    plugin("ADD", "/x", &conf("1.0.0", json!({}), None)).error(7, &["prevResult"]);
    plugin(
        "ADD",
        "/x",
        &conf("1.0.0", json!({"tproxy-cni.io/mode": "fast"}), prev.clone()),
    )
    .error(7, &["tproxy-cni.io/mode", "fast"]);
    plugin(
        "ADD",
        "/x",
        &conf(
            "1.0.0",
            json!({"tproxy-cni.io/inbound-ports": "80,http"}),
            prev.clone(),
        ),
    )
    .error(7, &["tproxy-cni.io/inbound-ports", "http"]);
    plugin(
        "ADD",
        "/x",
        &conf(
            "1.0.0",
            json!({"traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/40"}),
            prev.clone(),
        ),
    )
    .error(7, &["excludeOutboundIPRanges", "10.0.0.0/40"]);
    plugin(
        "ADD",
        "/x",
        &conf("1.0.0", json!({"tproxy-cni.io/mode": 1}), prev.clone()),
    )
    .error(7, &["io.kubernetes.cri.pod-annotations"]);
    let mut c: Value = serde_json::from_str(&conf("1.0.0", json!({}), prev.clone())).unwrap();
    c["mark"] = json!("0x7470");
    plugin("ADD", "/x", &c.to_string()).error(7, &["mark"]);
    // CHECK does not exist before 0.4.0.
    plugin("CHECK", "/x", &conf("0.3.1", json!({}), prev.clone())).error(1, &["CHECK"]);
    // Missing or unknown environment.
    plugin_env(
        &[("CNI_COMMAND", "ADD")],
        &conf("1.0.0", json!({}), prev.clone()),
    )
    .error(4, &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"]);
    plugin_env(&[], "{}").error(4, &["CNI_COMMAND"]);
    plugin_env(&[("CNI_COMMAND", "FROB")], "{}").error(4, &["FROB"]);
}

#[test]
fn no_input_makes_it_panic() {
    // Mutations of a valid config: every one must end in a result or a CNI error, never a
    // panic (exit 101) or a second document on stdout.
    let base = conf(
        "1.0.0",
        json!({"tproxy-cni.io/mode": "none", "tproxy-cni.io/inbound-ports": "80"}),
        Some(prev_result("1.0.0")),
    );
    let junk = [
        "",
        "\"",
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "null",
        "-1",
        "1e999",
        "\\u0000",
        "\u{ff}",
        "99999999999999999999",
    ];
    let mut runs = 0;
    for (i, _) in base.char_indices().step_by(7) {
        for j in junk.iter().take(4 + i % 10) {
            let mut s = base.clone();
            s.insert_str(i, j);
            let o = plugin("ADD", "/var/run/netns/none", &s);
            runs += 1;
            assert!(
                o.code == 0 || o.code == 1,
                "exit {} for {s:?}: {}",
                o.code,
                o.stderr
            );
            let _ = o.json();
        }
    }
    assert!(runs > 100, "{runs}");
}
