//! Root test: hostile pod annotations against the built plugin binary, run the way a container
//! runtime runs it (`CNI_*` environment, config on stdin, from the node's netns) but inside
//! `ulimit -v` (64 MiB of address space, which also caps its peak memory). The worst values
//! we could build, up to Kubernetes' 256 KiB limit on a pod's annotations, must make ADD,
//! CHECK and DEL end within 1 s with a CNI result or a CNI error naming the key, never an
//! abort (docs/ARCHITECTURE.md, pitfalls 60 and 61). What differs from a runtime: the
//! address-space limit, and `ip netns exec` (which remounts /sys) to start in the node netns.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::chain::{Node, Pod};
use serde_json::{json, Map, Value};
use tproxy_cni_policy::consts::POD_ANNOTATIONS_CAPABILITY;

const PLUGIN: &str = env!("CARGO_BIN_EXE_tproxy-cni");
/// `ulimit -v` counts KiB: 64 MiB.
const AS_LIMIT_KIB: u64 = 64 * 1024;
/// Kubernetes refuses a pod whose annotations total more than this (keys and values).
const K8S_ANNOTATIONS_MAX: usize = 256 * 1024;
/// The unit property's time bound.
const WITHIN: Duration = Duration::from_secs(1);

/// The 62 KB bomb: an anchored 32,000-character scalar, 1,000 aliases of it in a
/// list, 1,000 aliases of that list, and 8,010 padding aliases (about 30 GB expanded).
fn bomb_62k() -> String {
    let mut s = format!("a: &a \"{}\"\n", "x".repeat(32_000));
    s += &format!("b: &b [{}]\n", vec!["*a"; 1000].join(","));
    s += &format!("c: [{}]\n", vec!["*b"; 1000].join(","));
    s += &format!("d: [{}]\n", vec!["*a"; 8010].join(","));
    s
}

/// Nine levels of ten aliases (the shape of the 41 KB, 890 MB value).
fn bomb_levels() -> String {
    let mut s = format!("l0: &l0 [\"{}\"]\n", "x".repeat(4_000));
    for i in 1..9 {
        s += &format!(
            "l{i}: &l{i} [{}]\n",
            vec![format!("*l{}", i - 1); 10].join(",")
        );
    }
    s
}

/// Legal YAML at the reader's limits and beyond: deep, wide, many keys.
fn heavy_values() -> Vec<String> {
    vec![
        format!("{}{}", "[".repeat(30_000), "]".repeat(30_000)),
        format!("[{}]", vec!["1"; 30_000].join(",")),
        (0..5_000).map(|i| format!("k{i}: {i}\n")).collect(),
        format!("{}: 1", "a ".repeat(30_000)),
    ]
}

/// Adds `values` under `keys` in turn while the map stays within Kubernetes' limit.
fn fill(mut m: Map<String, Value>, values: &[String]) -> Value {
    let size = |m: &Map<String, Value>| -> usize {
        m.iter()
            .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
            .sum()
    };
    for (i, v) in values.iter().enumerate() {
        let key = format!("example.com/filler-{i}");
        if size(&m) + key.len() + v.len() <= K8S_ANNOTATIONS_MAX {
            m.insert(key, json!(v));
        }
    }
    assert!(size(&m) > 200 * 1024, "only {} bytes", size(&m));
    Value::Object(m)
}

fn map(pairs: &[(&str, &str)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect()
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs our plugin alone for `cmd` on `pod` with `annotations`, in the node's netns, under the
/// address-space limit; killed (and the test failed) after 10 s.
fn run_limited(node: &Node, pod: &Pod, cmd: &str, annotations: &Value) -> Run {
    let mut conf = node.ours();
    conf["cniVersion"] = node.conflist["cniVersion"].clone();
    conf["name"] = node.conflist["name"].clone();
    conf["runtimeConfig"] = json!({ POD_ANNOTATIONS_CAPABILITY: annotations });
    conf["prevResult"] = pod.result.clone();
    let stdin = serde_json::to_vec(&conf).expect("config JSON");
    let script = format!("ulimit -v {AS_LIMIT_KIB} && exec \"$0\"");
    let start = Instant::now();
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.ns.name,
            "bash",
            "-c",
            &script,
            PLUGIN,
        ])
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", &pod.id)
        .env("CNI_NETNS", pod.ns.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={}",
                pod.id
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the plugin");
    // Our stdin pipe: the plugin may exit before reading it all (a broken pipe is fine).
    let _ = child.stdin.take().expect("stdin").write_all(&stdin);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd}: still running after 10 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = start.elapsed();
    let out = child.wait_with_output().expect("output");
    eprintln!("{cmd}: {} in {took:?}", out.status);
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took,
    }
}

impl Run {
    fn what(&self) -> String {
        format!(
            "exit {:?} in {:?}\nstdout: {}\nstderr: {}",
            self.code,
            self.took,
            self.stdout.chars().take(2000).collect::<String>(),
            self.stderr.chars().take(2000).collect::<String>()
        )
    }
    /// Exit 0 within the bound.
    fn ok(&self, what: &str) {
        assert_eq!(self.code, Some(0), "{what}: {}", self.what());
        assert!(self.took < WITHIN, "{what}: {}", self.what());
    }
    /// Exit 1 with a CNI error of `code` naming `key`, within the bound.
    fn refused(&self, what: &str, code: u64, key: &str) {
        assert_eq!(self.code, Some(1), "{what}: {}", self.what());
        let e: Value = serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|_| panic!("{what}: no CNI error JSON: {}", self.what()));
        assert_eq!(e["code"], json!(code), "{what}: {}", self.what());
        let msg = e["msg"].as_str().unwrap_or("");
        assert!(msg.contains(key), "{what}: msg names no {key}: {msg}");
        assert!(msg.len() < 1000, "{what}: {} bytes of message", msg.len());
        assert!(self.took < WITHIN, "{what}: {}", self.what());
    }
}

fn nft_ruleset(pod: &Pod) -> String {
    pod.ns.sh("nft list ruleset")
}

#[test]
fn hostile_annotations_within_the_kubernetes_limit_end_fast_under_64_mib() {
    require_root!();
    let node = Node::new(json!({}));
    let istio = "proxy.istio.io/config";
    let kuma = "traffic.kuma.io/transparent-proxy-config";
    let mut hostile = vec![bomb_62k(), bomb_levels()];
    hostile.extend(heavy_values());

    // The limit leaves room for real work: a plain ADD, CHECK and DEL under it succeed.
    let pod = node.add_pod(&[]).expect("ADD");
    let plain = Value::Object(map(&[("tproxy-cni.io/mode", "tproxy")]));
    run_limited(&node, &pod, "ADD", &plain).ok("plain ADD");
    assert!(nft_ruleset(&pod).contains("table inet tproxy_cni"));
    run_limited(&node, &pod, "CHECK", &plain).ok("plain CHECK");
    let programmed = nft_ruleset(&pod);

    // Intercepted pods: each worst value under Istio's key and Kuma's, the map filled to the
    // limit. ADD and CHECK refuse naming the key and change nothing; DEL never reads them.
    for (i, v) in hostile.iter().enumerate() {
        for key in [istio, kuma] {
            let what = format!("value {i} under {key}");
            let mut m = map(&[("tproxy-cni.io/mode", "tproxy")]);
            m.insert(key.into(), json!(v));
            let others: Vec<String> = hostile.iter().filter(|o| *o != v).cloned().collect();
            let ann = fill(m, &others);
            let add = run_limited(&node, &pod, "ADD", &ann);
            let check = run_limited(&node, &pod, "CHECK", &ann);
            // The bombs are refused; legal YAML past the reader's bounds (deep, wide) is
            // refused too, and legal YAML within them (many keys, a long key) is accepted:
            // none of it sets a field we read, so the ruleset stays the same.
            if i < 2 || add.code != Some(0) {
                add.refused(&format!("ADD {what}"), 7, key);
                check.refused(&format!("CHECK {what}"), 7, key);
            } else {
                add.ok(&format!("ADD {what}"));
                check.ok(&format!("CHECK {what}"));
            }
            assert_eq!(
                nft_ruleset(&pod),
                programmed,
                "ADD {what} changed the ruleset"
            );
        }
    }
    let mut m = map(&[("tproxy-cni.io/mode", "tproxy"), (istio, &bomb_62k())]);
    m.insert(kuma.into(), json!(bomb_62k()));
    let worst = fill(m, &hostile);
    run_limited(&node, &pod, "DEL", &worst).ok("DEL with both bombs");
    assert!(
        !nft_ruleset(&pod).contains("tproxy_cni"),
        "DEL left our table:\n{}",
        nft_ruleset(&pod)
    );
    assert!(!pod.ns.sh("ip rule show").contains("29808"));

    // Pods in mode none (no mode, `none`, another mesh's pod): nothing but the mode is read,
    // so ADD, CHECK and DEL succeed with the same values.
    let quiet = node.add_pod(&[]).expect("ADD");
    for extra in [
        vec![],
        vec![("tproxy-cni.io/mode", "none")],
        vec![
            ("sidecar.istio.io/status", "{}"),
            ("tproxy-cni.io/mode", "none"),
        ],
        vec![("kuma.io/sidecar-injected", "true")],
    ] {
        let mut m = map(&extra);
        m.insert(istio.into(), json!(bomb_62k()));
        m.insert(kuma.into(), json!(bomb_levels()));
        m.insert("tproxy-cni.io/inbound-ports".into(), json!("not,a,port"));
        let ann = fill(m, &hostile);
        let what = format!("mode none {extra:?}");
        let add = run_limited(&node, &quiet, "ADD", &ann);
        add.ok(&format!("ADD {what}"));
        let result: Value = serde_json::from_str(add.stdout.trim()).expect("ADD result JSON");
        assert_eq!(result["ips"], quiet.result["ips"], "{what}");
        run_limited(&node, &quiet, "CHECK", &ann).ok(&format!("CHECK {what}"));
        run_limited(&node, &quiet, "DEL", &ann).ok(&format!("DEL {what}"));
        assert!(!nft_ruleset(&quiet).contains("tproxy_cni"), "{what}");
    }
    node.del_pod(&pod).expect("DEL");
    node.del_pod(&quiet).expect("DEL");
}
