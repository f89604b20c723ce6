//! Root tests of the plugin's input side through the real chain (bridge + host-local +
//! tproxy-cni) in fresh network namespaces: pods of other meshes, config values the kernel
//! would refuse, DEL of what can never have been made.

mod common;

use std::os::unix::fs::OpenOptionsExt;

use common::chain::{cni, Node};
use common::Netns;
use serde_json::{json, Value};

/// Rule priority of our fwmark rule (the default `rulePriority`).
const PRIO: u64 = 29808;

fn table_listing(ns: &Netns, name: &str) -> Option<String> {
    let out = ns.try_sh(&format!("nft list table inet {name}"));
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn our_rules(ns: &Netns) -> Vec<Value> {
    let mut v = Vec::new();
    for fam in ["-4", "-6"] {
        let text = ns.sh(&format!("ip -j {fam} rule show"));
        let all: Value = serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text })
            .expect("ip -j rule JSON");
        v.extend(
            all.as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|r| r["priority"] == PRIO),
        );
    }
    v
}

/// Nothing of ours in the pod: no table, no fwmark rule, no ::6 on lo.
fn assert_nothing_of_ours(ns: &Netns, why: &str) {
    assert_eq!(
        table_listing(ns, "tproxy_cni"),
        None,
        "{why}: table present:\n{}",
        ns.sh("nft list ruleset")
    );
    assert!(our_rules(ns).is_empty(), "{why}: {:?}", our_rules(ns));
    assert!(
        !ns.sh("ip -6 addr show dev lo").contains("::6/128"),
        "{why}: ::6 on lo"
    );
}

const ISTIO_INJECTED: (&str, &str) = (
    "sidecar.istio.io/status",
    r#"{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["istio-envoy"],"imagePullSecrets":null,"revision":"default"}"#,
);

#[test]
fn pods_of_another_mesh_get_nothing_of_ours_unless_our_mode_says_so() {
    require_root!();
    // Even with a default mode that would intercept every pod.
    let node = Node::new(json!({"defaultMode": "tproxy"}));
    let istio_keys = [
        ("sidecar.istio.io/interceptionMode", "TPROXY"),
        ("traffic.sidecar.istio.io/includeInboundPorts", "8080"),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "169.254.169.254/32",
        ),
    ];

    // Injected by Istio: left alone, and the log says why.
    let mut ann = istio_keys.to_vec();
    ann.push(ISTIO_INJECTED);
    let injected = node.add_pod(&ann).expect("ADD of an Istio-injected pod");
    assert_nothing_of_ours(&injected.ns, "Istio-injected pod");
    node.check_ours(&injected).expect("CHECK: nothing expected");
    let log = node.plugin_log();
    let skip: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&injected.id) && l.contains("left alone"))
        .collect();
    assert_eq!(skip.len(), 1, "one line says why:\n{log}");
    assert!(
        skip[0].contains("Istio") && skip[0].contains("sidecar.istio.io/status"),
        "{}",
        skip[0]
    );
    node.del_pod(&injected).expect("DEL");

    // Every other injector's mark is honoured the same way.
    for mark in [
        ("ambient.istio.io/redirection", "enabled"),
        ("kuma.io/sidecar-injected", "true"),
        ("linkerd.io/proxy-version", "edge-24.5.1"),
        ("consul.hashicorp.com/connect-inject-status", "injected"),
    ] {
        let pod = node.add_pod(&[mark]).expect("ADD");
        assert_nothing_of_ours(&pod.ns, mark.0);
        node.del_pod(&pod).expect("DEL");
    }

    // The same Istio keys without the injector's mark (a pod migrated to us): our rules,
    // with Istio's settings (inbound port 8080 only).
    let migrated = node.add_pod(&istio_keys).expect("ADD of a migrated pod");
    let t = table_listing(&migrated.ns, "tproxy_cni").expect("our table");
    assert!(
        t.contains("tcp dport 8080 tproxy to :15006"),
        "Istio's includeInboundPorts honoured:\n{t}"
    );
    assert_eq!(our_rules(&migrated.ns).len(), 2, "IPv4 + IPv6 fwmark rules");
    node.check_ours(&migrated).expect("CHECK");
    node.del_pod(&migrated).expect("DEL");
    assert_nothing_of_ours(&migrated.ns, "after DEL");

    // Our own mode wins over the injector's mark; Istio's keys are then not ours to follow.
    let mut ann = istio_keys.to_vec();
    ann.push(ISTIO_INJECTED);
    ann.push(("tproxy-cni.io/mode", "tproxy"));
    let ours = node.add_pod(&ann).expect("ADD with our mode");
    let t = table_listing(&ours.ns, "tproxy_cni").expect("our table");
    assert!(
        t.contains("meta l4proto tcp tproxy to :15006") && !t.contains("dport 8080"),
        "all inbound ports, Istio's port list ignored:\n{t}"
    );
    node.check_ours(&ours).expect("CHECK");
    node.del_pod(&ours).expect("DEL");
    assert_nothing_of_ours(&ours.ns, "after DEL");
}

#[test]
fn a_table_name_the_kernel_refuses_is_a_config_error_and_del_succeeds() {
    require_root!();
    for name in ["1abc", "-"] {
        let node = Node::new(json!({"tableName": name}));
        let e = match node.add_pod(&[("tproxy-cni.io/mode", "tproxy")]) {
            Ok(_) => panic!("tableName {name:?} must be refused"),
            Err(e) => e,
        };
        assert_eq!(e.plugin(), Some("tproxy-cni"), "{e}");
        assert_eq!(cni(&e).code, 7, "{e}");
        assert!(cni(&e).msg.contains("tableName"), "{}", e);
        // DEL in a real pod netns (add_pod already ran the chain's DEL on failure; run ours
        // alone again with the netns present).
        let ns = Netns::new("pod");
        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.88.9.9/16"}]});
        node.exec(
            &node.ours(),
            "DEL",
            &ns.path().to_string_lossy(),
            "badtable",
            &json!({"tproxy-cni.io/mode": "tproxy"}),
            Some(&prev),
        )
        .unwrap_or_else(|e| panic!("DEL with tableName {name:?}: {e:?}"));
        assert_nothing_of_ours(&ns, name);
    }
}

#[test]
fn a_fifo_or_another_namespace_kind_as_cni_netns() {
    require_root!();
    let node = Node::new(json!({}));
    let fifo = node.dir.path().join("fifo");
    common::sh(&format!("mkfifo {}", fifo.display()));
    let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.88.9.9/16"}]});
    let ann = json!({"tproxy-cni.io/mode": "tproxy"});
    // A mount namespace is a namespace file (nsfs) but not a network namespace.
    for path in [
        fifo.to_string_lossy().into_owned(),
        "/proc/self/ns/mnt".into(),
    ] {
        let t = std::time::Instant::now();
        let res = std::thread::scope(|s| {
            let h = s.spawn(|| node.exec(&node.ours(), "ADD", &path, "x", &ann, Some(&prev)));
            while !h.is_finished() {
                if t.elapsed().as_secs() > 20 {
                    // A plugin blocked opening the FIFO for reading: a writer releases it, so
                    // the test fails instead of hanging.
                    let _ = std::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(&fifo);
                    let _ = h.join();
                    panic!("ADD with CNI_NETNS {path} blocked for 20 s");
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            h.join().expect("exec thread")
        });
        let e = res.expect_err("ADD");
        assert_eq!(cni(&e).code, 100, "{path}: {e}");
        assert!(cni(&e).msg.contains("CNI_NETNS"), "{path}: {}", e);
        node.exec(&node.ours(), "DEL", &path, "x", &ann, Some(&prev))
            .unwrap_or_else(|e| panic!("DEL {path}: {e:?}"));
        assert!(t.elapsed().as_secs() < 10, "{path}: {:?}", t.elapsed());
    }
    // Nothing landed in the node's own netns.
    assert_eq!(table_listing(&node.ns, "tproxy_cni"), None);
}

/// A firewall's table in the pod, as `nft -j` lists it (handles included, so a replaced
/// table with the same rules would differ).
fn foreign_firewall(ns: &Netns, name: &str) -> String {
    ns.sh(&format!(
        "nft add table inet {name} '{{ comment \"site firewall\"; }}'"
    ));
    ns.sh(&format!(
        "nft add chain inet {name} input '{{ type filter hook input priority 0; policy accept; }}'"
    ));
    ns.sh(&format!(
        "nft add rule inet {name} input tcp dport 22 counter accept comment \"ssh\""
    ));
    ns.sh(&format!("nft -j list table inet {name}"))
}

/// A `tableName` naming someone else's table (here a firewall's `inet filter`) never replaces,
/// flushes or deletes it: ADD is refused naming the table (code 7, nothing of this config
/// programmed), CHECK reports it as not ours, and DEL leaves it and still removes what is ours
/// (docs/ARCHITECTURE.md, pitfall 64). A foreign table under our default name is left by DEL
/// as well.
#[test]
fn a_table_name_naming_a_foreign_table_never_destroys_it() {
    require_root!();
    let node = Node::new(json!({}));
    let pod = node
        .add_pod(&[("tproxy-cni.io/mode", "tproxy")])
        .expect("ADD");
    let firewall = foreign_firewall(&pod.ns, "filter");
    let mut conf = node.ours();
    conf["tableName"] = json!("filter");

    let e = node
        .exec_on(&conf, "ADD", &pod)
        .expect_err("ADD onto inet filter");
    assert_eq!(cni(&e).code, 7, "{e}");
    assert!(
        cni(&e).msg.contains("table inet filter") && cni(&e).msg.contains("not ours"),
        "{}",
        cni(&e).msg
    );
    assert_eq!(pod.ns.sh("nft -j list table inet filter"), firewall);

    let e = node.exec_on(&conf, "CHECK", &pod).expect_err("CHECK");
    assert_eq!(cni(&e).code, 101, "{e}");
    assert!(cni(&e).msg.contains("not ours"), "{}", cni(&e).msg);
    assert_eq!(pod.ns.sh("nft -j list table inet filter"), firewall);

    // DEL: the firewall stays, our table (found by its owner comment) and rules go.
    assert!(table_listing(&pod.ns, "tproxy_cni").is_some());
    node.exec_on(&conf, "DEL", &pod)
        .unwrap_or_else(|e| panic!("DEL with tableName filter: {e}"));
    assert_eq!(pod.ns.sh("nft -j list table inet filter"), firewall);
    assert_nothing_of_ours(&pod.ns, "DEL with tableName filter");
    assert!(
        node.plugin_log().contains("not ours"),
        "{}",
        node.plugin_log()
    );

    // A foreign table under our own default name: DEL (default config) leaves it too.
    let squatter = foreign_firewall(&pod.ns, "tproxy_cni");
    node.exec_on(&node.ours(), "DEL", &pod).expect("DEL");
    assert_eq!(pod.ns.sh("nft -j list table inet tproxy_cni"), squatter);
    let e = node
        .exec_on(&node.ours(), "ADD", &pod)
        .expect_err("ADD onto a foreign tproxy_cni");
    assert_eq!(cni(&e).code, 7, "{e}");
    assert_eq!(pod.ns.sh("nft -j list table inet tproxy_cni"), squatter);
    assert_eq!(pod.ns.sh("nft -j list table inet filter"), firewall);
}
