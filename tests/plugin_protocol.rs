//! The plugin binary driven exactly as a runtime drives it (env + stdin), no kernel state needed:
//! VERSION, result passthrough for every version, errors and their codes, no panics.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

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
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.as_bytes().to_vec();
    // Fed from a thread: a plugin that stops reading (or blocks) must not block the test.
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    // A runtime gives up on a plugin eventually; a plugin that hangs is a failure, not a hang.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    });
    let o = child.wait_with_output().expect("wait");
    let _ = tx.send(());
    let _ = watchdog.join();
    let _ = feeder.join();
    let out = Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    assert!(
        o.status.code().is_some(),
        "the plugin hung (killed after 20 s) or died by a signal: {:?}; stdout {:?}",
        o.status,
        out.stdout
    );
    out
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
    // DEL with annotations that no longer parse still succeeds (docs/ARCHITECTURE.md, pitfall 9).
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
            json!({"tproxy-cni.io/mode": "tproxy", "tproxy-cni.io/inbound-ports": "80,http"}),
            prev.clone(),
        ),
    )
    .error(7, &["tproxy-cni.io/inbound-ports", "http"]);
    // Values are read only when the pod's mode needs them (docs/ARCHITECTURE.md, pitfall
    // 61): the same bad list on a pod in mode none programs nothing and is not an error.
    let none = plugin(
        "ADD",
        "/x",
        &conf(
            "1.0.0",
            json!({"tproxy-cni.io/inbound-ports": "80,http"}),
            prev.clone(),
        ),
    );
    assert_eq!(none.code, 0, "{} {}", none.stdout, none.stderr);
    plugin(
        "ADD",
        "/x",
        &conf(
            "1.0.0",
            json!({
                "sidecar.istio.io/interceptionMode": "REDIRECT",
                "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.0.0.0/40",
            }),
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
    // An include that a wider exclude covers could never match (README: refused).
    plugin(
        "ADD",
        "/x",
        &conf(
            "1.0.0",
            json!({
                "tproxy-cni.io/mode": "tproxy",
                "tproxy-cni.io/include-outbound-ip-ranges": "10.1.0.0/16",
                "tproxy-cni.io/exclude-outbound-ip-ranges": "10.0.0.0/8",
            }),
            prev.clone(),
        ),
    )
    .error(
        7,
        &["exclude-outbound-ip-ranges", "10.0.0.0/8", "10.1.0.0/16"],
    );
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

/// The standard CNI_* environment of `plugin()` plus the pod's name in CNI_ARGS.
fn pod_env<'a>(cmd: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0",
        ),
    ]
}

fn with(conf: &str, extra: Value) -> String {
    let mut c: Value = serde_json::from_str(conf).unwrap();
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c.to_string()
}

#[test]
fn table_names_netlink_refuses_are_config_errors_and_del_succeeds() {
    let tproxy = conf(
        "1.0.0",
        json!({"tproxy-cni.io/mode": "tproxy"}),
        Some(prev_result("1.0.0")),
    );
    for name in ["1abc", "-", "a/b", ""] {
        let c = with(&tproxy, json!({"tableName": name}));
        plugin("ADD", "/var/run/netns/none", &c).error(7, &["tableName"]);
        plugin("CHECK", "/var/run/netns/none", &c).error(7, &["tableName"]);
    }
    // The kernel's limit is NFT_TABLE_MAXNAMELEN - 1 = 255 bytes.
    let long = "t".repeat(256);
    plugin("ADD", "/x", &with(&tproxy, json!({"tableName": long}))).error(7, &["tableName"]);
    // DEL of such a config has nothing to remove (the root test runs it in a real netns).
    for name in [json!("1abc"), json!(7), json!(["x"])] {
        let o = plugin(
            "DEL",
            "/var/run/netns/none",
            &with(&tproxy, json!({ "tableName": name })),
        );
        assert_eq!((o.code, o.stdout.as_str()), (0, ""), "{name}: {}", o.stderr);
    }
}

#[test]
fn a_fifo_as_cni_netns_neither_blocks_add_nor_del() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("netns-fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let fifo = fifo.to_string_lossy().into_owned();
    let c = conf(
        "1.0.0",
        json!({"tproxy-cni.io/mode": "tproxy"}),
        Some(prev_result("1.0.0")),
    );
    let t = std::time::Instant::now();
    plugin("ADD", &fifo, &c).error(100, &["CNI_NETNS", "FIFO", "not a network namespace"]);
    plugin("CHECK", &fifo, &c).error(100, &["CNI_NETNS", "FIFO"]);
    // DEL: ADD refuses anything that is not a namespace file, so nothing of ours can be there.
    let o = plugin("DEL", &fifo, &c);
    assert_eq!((o.code, o.stdout.as_str()), (0, ""), "{}", o.stderr);
    // A directory and a plain file are refused the same way.
    plugin("ADD", &dir.path().to_string_lossy(), &c).error(100, &["CNI_NETNS", "directory"]);
    let file = dir.path().join("plain");
    std::fs::write(&file, b"").unwrap();
    plugin("ADD", &file.to_string_lossy(), &c).error(100, &["CNI_NETNS", "regular file"]);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn a_log_file_that_is_our_stdout_never_gets_log_lines() {
    let prev = prev_result("1.0.0");
    for path in ["/proc/self/fd/1", "/dev/stdout"] {
        let log = json!({"logFile": path, "logLevel": "debug"});
        // Success: stdout is exactly the result.
        let c = with(&conf("1.0.0", json!({}), Some(prev.clone())), log.clone());
        let o = plugin_env(&pod_env("ADD", "/var/run/netns/none"), &c);
        assert_eq!(o.code, 0, "{path}: {} {}", o.stdout, o.stderr);
        assert_eq!(o.stdout.trim(), prev.to_string(), "{path}");
        assert!(
            o.stderr.contains("logFile"),
            "{path}: the fallback says why: {}",
            o.stderr
        );
        // Failure: stdout is exactly the error object.
        let c = with(
            &conf(
                "1.0.0",
                json!({"tproxy-cni.io/mode": "x"}),
                Some(prev.clone()),
            ),
            log.clone(),
        );
        let o = plugin_env(&pod_env("ADD", "/var/run/netns/none"), &c);
        o.error(7, &["tproxy-cni.io/mode"]);
        assert_eq!(o.stdout.lines().count(), 1, "{path}: {:?}", o.stdout);
        assert!(
            o.stderr.contains("ADD failed"),
            "{path}: logged to stderr: {}",
            o.stderr
        );
        // DEL prints nothing at all on success.
        let o = plugin_env(&pod_env("DEL", ""), &c);
        assert_eq!((o.code, o.stdout.as_str()), (0, ""), "{path}: {}", o.stderr);
    }
    // A FIFO nobody reads as logFile does not block either: the log goes to stderr.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("log-fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let c = with(
        &conf("1.0.0", json!({}), Some(prev.clone())),
        json!({"logFile": fifo, "logLevel": "debug"}),
    );
    let o = plugin_env(&pod_env("ADD", "/var/run/netns/none"), &c);
    assert_eq!(o.code, 0, "{} {}", o.stdout, o.stderr);
    assert_eq!(o.stdout.trim(), prev.to_string());
}

#[test]
fn a_huge_value_is_not_echoed_whole() {
    const BIG: usize = 10 << 20;
    let prev = Some(prev_result("1.0.0"));
    let huge_ports = format!("80,{}", "9".repeat(BIG));
    let huge_str = "x".repeat(BIG);
    let cases: Vec<(String, &str)> = vec![
        (
            conf(
                "1.0.0",
                json!({"tproxy-cni.io/mode": "tproxy", "tproxy-cni.io/inbound-ports": huge_ports}),
                prev.clone(),
            ),
            "tproxy-cni.io/inbound-ports",
        ),
        (
            conf(
                "1.0.0",
                json!({
                    "sidecar.istio.io/interceptionMode": "REDIRECT",
                    "traffic.sidecar.istio.io/excludeOutboundIPRanges": huge_str,
                }),
                prev.clone(),
            ),
            "excludeOutboundIPRanges",
        ),
        (
            conf(
                "1.0.0",
                json!({ format!("tproxy-cni.io/{huge_str}"): "x" }),
                prev.clone(),
            ),
            "tproxy-cni.io/",
        ),
        (
            with(
                &conf("1.0.0", json!({}), prev.clone()),
                json!({"mark": huge_str}),
            ),
            "mark",
        ),
        (
            with(
                &conf("1.0.0", json!({}), prev.clone()),
                json!({"tableName": huge_str}),
            ),
            "tableName",
        ),
        (
            with(
                &conf("1.0.0", json!({}), prev.clone()),
                json!({"excludeInboundPorts": [huge_str]}),
            ),
            "excludeInboundPorts",
        ),
        (
            with(
                &conf("1.0.0", json!({}), prev.clone()),
                json!({"logLevel": huge_str}),
            ),
            "logLevel",
        ),
        (
            with(
                &conf("1.0.0", json!({}), prev.clone()),
                json!({"cniVersion": huge_str}),
            ),
            "cniVersion",
        ),
    ];
    for (stdin, key) in cases {
        let o = plugin("ADD", "/var/run/netns/none", &stdin);
        assert_eq!(o.code, 1, "{key}: {}", o.stderr);
        let msg = o.json()["msg"].as_str().unwrap_or_default().to_string();
        assert!(msg.contains(key), "{key}: {msg}");
        assert!(
            o.stdout.len() < 1024,
            "{key}: {} bytes of error for a {BIG}-byte value: {}…",
            o.stdout.len(),
            &o.stdout[..200]
        );
        assert!(msg.contains("bytes)"), "{key}: the size is given: {msg}");
    }
}

#[test]
fn failed_add_and_del_log_lines_name_the_pod() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("plugin.log");
    let lines = || -> Vec<String> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    let logging = json!({"logFile": log, "logLevel": "info"});
    let bad = with(
        &conf(
            "1.0.0",
            json!({"tproxy-cni.io/mode": "tproxy", "tproxy-cni.io/inbound-ports": "80,http"}),
            Some(prev_result("1.0.0")),
        ),
        logging.clone(),
    );
    plugin_env(&pod_env("ADD", "/var/run/netns/none"), &bad)
        .error(7, &["tproxy-cni.io/inbound-ports"]);
    let l = lines();
    assert_eq!(l.len(), 1, "{l:?}");
    for needle in [
        "ERROR",
        "shop/web-0",
        "c0ffee",
        "ADD failed",
        "inbound-ports",
    ] {
        assert!(l[0].contains(needle), "{needle:?} missing in {:?}", l[0]);
    }
    // A successful DEL logs exactly one line, at info, naming the pod.
    let ok = with(&conf("1.0.0", json!({}), None), logging);
    let o = plugin_env(&pod_env("DEL", ""), &ok);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let l = lines();
    assert_eq!(l.len(), 2, "{l:?}");
    for needle in ["INFO", "shop/web-0", "c0ffee", "DEL"] {
        assert!(l[1].contains(needle), "{needle:?} missing in {:?}", l[1]);
    }
}
