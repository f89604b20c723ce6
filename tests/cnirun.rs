//! Tests for `cnirun`: what each plugin receives (fake recording plugins, no root) and a real
//! bridge + host-local run in a throwaway netns (root).

mod common;

use common::chain::cnirun::{self, Invocation, RunError};
use serde_json::{json, Map, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// A fake plugin: records stdin and the CNI_* environment in `log`, numbered by call order,
/// prints a result naming itself on ADD, and fails with a CNI error when its name starts "fail".
fn fake_plugin(bin: &Path, name: &str, log: &Path) {
    let script = format!(
        r#"#!/bin/sh
n=$(ls "{log}" | wc -l)
n=$(printf '%03d' "$n")
cat > "{log}/$n-{name}.stdin"
env | grep '^CNI_' | sort > "{log}/$n-{name}.env"
case "{name}" in fail*)
  printf '{{"cniVersion":"1.0.0","code":7,"msg":"boom","details":"from {name}"}}'
  echo oops >&2
  exit 3;;
esac
if [ "$CNI_COMMAND" = ADD ]; then printf '{{"cniVersion":"1.0.0","by":"{name}"}}'; fi
"#,
        log = log.display()
    );
    let path = bin.join(name);
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

struct Fakes {
    _dir: tempfile::TempDir,
    bin: PathBuf,
    log: PathBuf,
}

fn fakes(names: &[&str]) -> Fakes {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let log = dir.path().join("log");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&log).unwrap();
    for n in names {
        fake_plugin(&bin, n, &log);
    }
    Fakes {
        _dir: dir,
        bin,
        log,
    }
}

/// The recorded calls, in order: (plugin name, stdin JSON, env lines).
fn calls(log: &Path) -> Vec<(String, Value, String)> {
    let mut names: Vec<String> = std::fs::read_dir(log)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".stdin"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let stem = n.trim_end_matches(".stdin").to_string();
            let stdin = std::fs::read_to_string(log.join(&n)).unwrap();
            let env = std::fs::read_to_string(log.join(format!("{stem}.env"))).unwrap();
            let plugin = stem.split_once('-').unwrap().1.to_string();
            (plugin, serde_json::from_str(&stdin).unwrap(), env)
        })
        .collect()
}

fn clear(log: &Path) {
    for e in std::fs::read_dir(log).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
}

fn inv(bin: &Path) -> Invocation {
    let mut rc = Map::new();
    rc.insert(
        "io.kubernetes.cri.pod-annotations".into(),
        json!({"tproxy-cni.io/mode": "tproxy"}),
    );
    rc.insert("portMappings".into(), json!([{"hostPort": 8080}]));
    Invocation {
        container_id: "cid123".into(),
        netns: "/var/run/netns/fake".into(),
        ifname: "eth0".into(),
        cni_args: vec![
            ("IgnoreUnknown".into(), "1".into()),
            ("K8S_POD_NAMESPACE".into(), "default".into()),
            ("K8S_POD_NAME".into(), "sleep".into()),
        ],
        runtime_config: rc,
        cni_path: vec!["/nonexistent".into(), bin.to_path_buf()],
    }
}

fn list() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "testnet",
        "plugins": [
            {"type": "first", "capabilities": {"portMappings": true}, "knob": 1},
            {"type": "second"},
            {"type": "third", "capabilities": {"io.kubernetes.cri.pod-annotations": true, "portMappings": false}}
        ]
    })
}

#[test]
fn add_chains_prev_results_and_filters_capabilities() {
    let f = fakes(&["first", "second", "third"]);
    let inv = inv(&f.bin);
    let result = cnirun::add(&list(), &inv).unwrap();
    assert_eq!(result, json!({"cniVersion": "1.0.0", "by": "third"}));
    let c = calls(&f.log);
    let order: Vec<&str> = c.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(order, ["first", "second", "third"]);

    let (_, s0, e0) = &c[0];
    assert_eq!(s0["name"], "testnet");
    assert_eq!(s0["cniVersion"], "1.0.0");
    assert_eq!(s0["knob"], 1);
    assert!(
        s0.get("prevResult").is_none(),
        "first plugin has no prevResult"
    );
    assert_eq!(
        s0["runtimeConfig"],
        json!({"portMappings": [{"hostPort": 8080}]})
    );
    for line in [
        "CNI_COMMAND=ADD",
        "CNI_CONTAINERID=cid123",
        "CNI_NETNS=/var/run/netns/fake",
        "CNI_IFNAME=eth0",
        "CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=sleep",
    ] {
        assert!(e0.lines().any(|l| l == line), "missing {line} in\n{e0}");
    }
    let path_line = format!("CNI_PATH=/nonexistent:{}", f.bin.display());
    assert!(e0.lines().any(|l| l == path_line), "{e0}");

    let (_, s1, _) = &c[1];
    assert_eq!(
        s1["prevResult"],
        json!({"cniVersion": "1.0.0", "by": "first"})
    );
    assert!(
        s1.get("runtimeConfig").is_none(),
        "no capabilities, no runtimeConfig"
    );

    let (_, s2, _) = &c[2];
    assert_eq!(s2["prevResult"]["by"], "second");
    assert_eq!(
        s2["runtimeConfig"],
        json!({"io.kubernetes.cri.pod-annotations": {"tproxy-cni.io/mode": "tproxy"}})
    );
}

#[test]
fn del_runs_in_reverse_with_cached_result() {
    let f = fakes(&["first", "second", "third"]);
    let inv = inv(&f.bin);
    let cached = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.2/24"}]});
    cnirun::del(&list(), &inv, Some(&cached)).unwrap();
    let c = calls(&f.log);
    let order: Vec<&str> = c.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(order, ["third", "second", "first"]);
    for (_, stdin, env) in &c {
        assert_eq!(stdin["prevResult"], cached);
        assert!(env.lines().any(|l| l == "CNI_COMMAND=DEL"));
    }
    assert!(c[0].1["runtimeConfig"]["io.kubernetes.cri.pod-annotations"].is_object());

    // Below 0.4.0 libcni passes no prevResult on DEL.
    clear(&f.log);
    let mut old = list();
    old["cniVersion"] = json!("0.3.1");
    cnirun::del(&old, &inv, Some(&cached)).unwrap();
    for (_, stdin, _) in calls(&f.log) {
        assert!(stdin.get("prevResult").is_none());
        assert_eq!(stdin["cniVersion"], "0.3.1");
    }
}

#[test]
fn check_passes_cached_result_in_order_and_needs_0_4_0() {
    let f = fakes(&["first", "second", "third"]);
    let inv = inv(&f.bin);
    let cached = json!({"cniVersion": "1.0.0"});
    cnirun::check(&list(), &inv, &cached).unwrap();
    let c = calls(&f.log);
    let order: Vec<&str> = c.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(order, ["first", "second", "third"]);
    assert!(c
        .iter()
        .all(|(_, s, e)| s["prevResult"] == cached && e.lines().any(|l| l == "CNI_COMMAND=CHECK")));
    let mut old = list();
    old["cniVersion"] = json!("0.3.1");
    assert!(matches!(
        cnirun::check(&old, &inv, &cached),
        Err(RunError::Version { .. })
    ));
}

#[test]
fn failure_names_plugin_code_and_stops() {
    let f = fakes(&["first", "failing", "third"]);
    let inv = inv(&f.bin);
    let mut l = list();
    l["plugins"][1]["type"] = json!("failing");
    let err = cnirun::add(&l, &inv).unwrap_err();
    match &err {
        RunError::Plugin {
            index,
            plugin,
            exit_code,
            error,
            stderr,
            ..
        } => {
            assert_eq!(
                (*index, plugin.as_str(), *exit_code),
                (1, "failing", Some(3))
            );
            let e = error.as_ref().unwrap();
            assert_eq!(
                (e.code, e.msg.as_str(), e.details.as_str()),
                (7, "boom", "from failing")
            );
            assert!(stderr.contains("oops"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(err.plugin(), Some("failing"));
    assert!(err.to_string().contains("boom"), "{err}");
    // The third plugin never ran.
    assert_eq!(calls(&f.log).len(), 2);

    // DEL stops at the first failure too (reverse order: third, then failing).
    clear(&f.log);
    assert!(cnirun::del(&l, &inv, None).is_err());
    let order: Vec<String> = calls(&f.log).into_iter().map(|c| c.0).collect();
    assert_eq!(order, ["third", "failing"]);
}

#[test]
fn missing_binary_is_named() {
    let f = fakes(&["first"]);
    let inv = inv(&f.bin);
    let l = json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "first"}, {"type": "nope"}]});
    let err = cnirun::add(&l, &inv).unwrap_err();
    assert!(
        matches!(&err, RunError::NotFound { index: 1, plugin, .. } if plugin == "nope"),
        "{err:?}"
    );
}

#[test]
fn status_and_gc_send_no_attachment() {
    let f = fakes(&["first", "second", "third"]);
    let mut l = list();
    l["cniVersion"] = json!("1.1.0");
    cnirun::status(&l, std::slice::from_ref(&f.bin)).unwrap();
    cnirun::gc(
        &l,
        std::slice::from_ref(&f.bin),
        &[("c1".into(), "eth0".into())],
    )
    .unwrap();
    let c = calls(&f.log);
    assert_eq!(c.len(), 6);
    for (_, stdin, env) in &c[..3] {
        assert!(env.lines().any(|l| l == "CNI_COMMAND=STATUS"));
        assert!(env.lines().any(|l| l == "CNI_CONTAINERID="));
        assert!(stdin.get("runtimeConfig").is_none());
    }
    for (_, stdin, env) in &c[3..] {
        assert!(env.lines().any(|l| l == "CNI_COMMAND=GC"));
        assert_eq!(
            stdin["cni.dev/valid-attachments"],
            json!([{"containerID": "c1", "ifname": "eth0"}])
        );
    }
    assert!(matches!(
        cnirun::status(&list(), std::slice::from_ref(&f.bin)),
        Err(RunError::Version { .. })
    ));
}

#[test]
fn run_binary_add_and_del() {
    let f = fakes(&["first", "second", "third"]);
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("10-test.conflist");
    std::fs::write(&conf, serde_json::to_vec(&list()).unwrap()).unwrap();
    let bin = env!("CARGO_BIN_EXE_tproxy-cni-run");
    let out = std::process::Command::new(bin)
        .args(["add", "--conflist"])
        .arg(&conf)
        .args(["--netns", "/var/run/netns/x", "--id", "c9"])
        .args(["--annotation", "tproxy-cni.io/mode=tproxy"])
        .args(["--arg", "K8S_POD_NAME=p"])
        .arg("--cni-path")
        .arg(&f.bin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["by"], "third");
    let c = calls(&f.log);
    assert_eq!(
        c[2].1["runtimeConfig"]["io.kubernetes.cri.pod-annotations"],
        json!({"tproxy-cni.io/mode": "tproxy"})
    );
    assert!(c[0].2.lines().any(|l| l == "CNI_ARGS=K8S_POD_NAME=p"));
    assert!(c[0].2.lines().any(|l| l == "CNI_IFNAME=eth0"));

    let prev = dir.path().join("prev.json");
    std::fs::write(&prev, &out.stdout).unwrap();
    clear(&f.log);
    let out = std::process::Command::new(bin)
        .args(["del", "--conflist"])
        .arg(&conf)
        .args(["--netns", "/var/run/netns/x", "--id", "c9", "--prev-result"])
        .arg(&prev)
        .arg("--cni-path")
        .arg(&f.bin)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = calls(&f.log);
    assert_eq!(c[0].0, "third");
    assert_eq!(c[0].1["prevResult"], result);

    // A failing plugin: non-zero exit, the message names the plugin and its CNI error.
    let f2 = fakes(&["failx"]);
    std::fs::write(
        &conf,
        r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"failx"}]}"#,
    )
    .unwrap();
    let out = std::process::Command::new(bin)
        .args(["add", "--conflist"])
        .arg(&conf)
        .args(["--netns", "/x", "--id", "c9", "--cni-path"])
        .arg(&f2.bin)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("failx") && err.contains("boom"), "{err}");
}

/// `--flag=value` works like `--flag value`, as in the other command lines (Kubernetes args
/// and scripts write both); a value may itself hold `=`. An unknown flag and a flag without
/// its value are named, in the shared parser's words (crates/policy/src/flags.rs).
#[test]
fn run_binary_takes_flag_equals_value() {
    let f = fakes(&["first", "second", "third"]);
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("10-test.conflist");
    std::fs::write(&conf, serde_json::to_vec(&list()).unwrap()).unwrap();
    let bin = env!("CARGO_BIN_EXE_tproxy-cni-run");
    let out = std::process::Command::new(bin)
        .arg("add")
        .arg(format!("--conflist={}", conf.display()))
        .args(["--netns=/var/run/netns/x", "--id=c9"])
        .args([
            "--annotation=tproxy-cni.io/mode=tproxy",
            "--arg=K8S_POD_NAME=p",
        ])
        .arg(format!("--cni-path={}", f.bin.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["by"], "third");
    let c = calls(&f.log);
    assert_eq!(
        c[2].1["runtimeConfig"]["io.kubernetes.cri.pod-annotations"],
        json!({"tproxy-cni.io/mode": "tproxy"})
    );
    assert!(c[0].2.lines().any(|l| l == "CNI_ARGS=K8S_POD_NAME=p"));
    assert!(c[0].2.lines().any(|l| l == "CNI_CONTAINERID=c9"));
    assert!(c[0].2.lines().any(|l| l == "CNI_NETNS=/var/run/netns/x"));

    for (args, want) in [
        (&["add", "--bogus=1"][..], "unknown flag \"--bogus\""),
        (&["add", "--conflist"][..], "--conflist needs a value"),
    ] {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// The real reference plugins: bridge + host-local in a throwaway netns, ADD/CHECK/DEL.
#[test]
fn real_bridge_host_local() {
    require_root!();
    let plugins = Path::new("/usr/lib/cni");
    if !plugins.join("bridge").is_file() {
        panic!("install containernetworking-plugins (apt-get install containernetworking-plugins)");
    }
    let ns = common::Netns::new("cnirun");
    let br = common::unique("crbr");
    let data = tempfile::tempdir().unwrap();
    let subnet_octet = 100 + (std::process::id() % 100);
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": "cnirun-test",
        "plugins": [{
            "type": "bridge",
            "bridge": br,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": format!("10.{subnet_octet}.7.0/24")}]],
                "dataDir": data.path()
            }
        }]
    });
    let inv = Invocation {
        container_id: "cnirun-real-1".into(),
        netns: ns.path(),
        ifname: "eth0".into(),
        cni_args: vec![("IgnoreUnknown".into(), "1".into())],
        runtime_config: Map::new(),
        cni_path: vec![plugins.to_path_buf()],
    };
    let cleanup_bridge = Bridge(br.clone());
    let result = cnirun::add(&conflist, &inv).unwrap();
    let ip = result["ips"][0]["address"].as_str().unwrap().to_string();
    assert!(ip.starts_with(&format!("10.{subnet_octet}.7.")), "{result}");
    let addrs = ns.sh("ip -o addr show dev eth0");
    assert!(addrs.contains(&ip), "{addrs}");
    cnirun::check(&conflist, &inv, &result).unwrap();
    cnirun::del(&conflist, &inv, Some(&result)).unwrap();
    assert!(!ns.try_sh("ip link show dev eth0").status.success());
    // DEL twice is fine for the reference plugins (and must be for ours, docs/ARCHITECTURE.md,
    // pitfall 9).
    cnirun::del(&conflist, &inv, Some(&result)).unwrap();
    drop(cleanup_bridge);
}

/// Removes the test bridge from the host netns even when an assertion fails.
struct Bridge(String);
impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = common::try_sh(&format!("ip link del {}", self.0));
    }
}

// The emulator's pure parts (no plugin runs). Here, not in cnirun.rs: that file is also
// included by tests/common/chain.rs, which would repeat its unit tests in every test binary.
#[test]
fn stdin_filters_capabilities_and_chains() {
    let conf =
        json!({"type": "x", "capabilities": {"a": true, "b": false}, "runtimeConfig": {"z": 1}});
    let mut rc = Map::new();
    rc.insert("a".into(), json!({"k": "v"}));
    rc.insert("b".into(), json!(1));
    rc.insert("c".into(), json!(2));
    let prev = json!({"cniVersion": "1.0.0", "ips": []});
    let Value::Object(conf) = conf else { panic!() };
    let out = cnirun::plugin_stdin(&conf, &json!("net"), "1.0.0", &rc, Some(&prev));
    assert_eq!(out["runtimeConfig"], json!({"a": {"k": "v"}}));
    assert_eq!(out["prevResult"], prev);
    assert_eq!(out["name"], "net");
    let out = cnirun::plugin_stdin(&conf, &json!("net"), "1.0.0", &Map::new(), None);
    assert_eq!(out["runtimeConfig"], json!({"z": 1}));
    assert!(out.get("prevResult").is_none());
}

#[test]
fn versions_compare_numerically() {
    assert!(cnirun::version_at_least("0.4.0", "0.4.0"));
    assert!(cnirun::version_at_least("1.0.0", "0.4.0"));
    assert!(cnirun::version_at_least("0.10.0", "0.4.0"));
    assert!(!cnirun::version_at_least("0.3.1", "0.4.0"));
    assert!(!cnirun::version_at_least("1.0.0", "1.1.0"));
}

#[test]
fn rejects_bad_lists_without_panicking() {
    let inv = Invocation::default();
    for bad in [
        json!(1),
        json!({}),
        json!({"name": "n", "plugins": []}),
        json!({"name": "n", "plugins": [{"type": "../x"}]}),
        json!({"name": "n", "plugins": [1]}),
        json!({"name": "n", "cniVersion": 1, "plugins": [{"type": "x"}]}),
    ] {
        assert!(
            matches!(cnirun::add(&bad, &inv), Err(RunError::Conflist(_))),
            "{bad}"
        );
    }
}
