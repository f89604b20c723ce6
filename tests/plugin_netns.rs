//! tproxy-cni through the real chain (bridge + host-local + tproxy-cni) in fresh network
//! namespaces: the kernel state after ADD, CHECK, DEL, bad input, concurrency.

mod common;
mod sidecar_support;

use common::chain::{cni, Node};
use common::Netns;
use nftables::schema::{NfListObject, NfObject, Nftables};
use serde_json::{json, Value};

/// Our table as the kernel lists it (`nft -j`), parsed with the `nftables` crate; `None` if absent.
fn our_table(ns: &Netns) -> Option<Nftables<'static>> {
    let out = ns.try_sh("nft -j list table inet tproxy_cni");
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let parsed: Nftables =
        serde_json::from_str(Box::leak(text.into_boxed_str())).expect("nft -j parses");
    Some(parsed)
}

/// (chain name, hook, priority, type) and the rule count per chain.
fn chains(t: &Nftables) -> Vec<(String, String, i32, String, usize)> {
    let mut out = Vec::new();
    for o in t.objects.iter() {
        if let NfObject::ListObject(NfListObject::Chain(c)) = o {
            let rules = t
                .objects
                .iter()
                .filter(|o| matches!(o, NfObject::ListObject(NfListObject::Rule(r)) if r.chain == c.name))
                .count();
            out.push((
                c.name.to_string(),
                c.hook
                    .as_ref()
                    .map(|h| format!("{h:?}").to_lowercase())
                    .unwrap_or_default(),
                c.prio.unwrap_or_default(),
                c._type
                    .as_ref()
                    .map(|t| format!("{t:?}").to_lowercase())
                    .unwrap_or_default(),
                rules,
            ));
        }
    }
    out.sort();
    out
}

fn ip_json(ns: &Netns, args: &str) -> Vec<Value> {
    let out = ns.try_sh(&format!("ip -j {args}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // `ip route show table N` fails when the kernel has no such table: that is "empty".
    if !out.status.success() && stderr.contains("table does not exist") {
        return Vec::new();
    }
    assert!(out.status.success(), "ip -j {args}: {stderr}");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text })
        .expect("ip -j JSON");
    v.as_array().cloned().unwrap_or_default()
}

fn our_rules(ns: &Netns, fam: &str) -> Vec<Value> {
    ip_json(ns, &format!("{fam} rule show"))
        .into_iter()
        .filter(|r| r["priority"] == 29808)
        .collect()
}

/// Asserts nothing of ours is left in the netns (table, rules, routes, ::6).
fn assert_clean(ns: &Netns) {
    assert!(
        our_table(ns).is_none(),
        "table left behind:\n{}",
        ns.sh("nft list ruleset")
    );
    for fam in ["-4", "-6"] {
        assert!(
            our_rules(ns, fam).is_empty(),
            "{fam} rule left: {}",
            ns.sh(&format!("ip {fam} rule"))
        );
        assert!(
            ip_json(ns, &format!("{fam} route show table 29808")).is_empty(),
            "{fam} route left"
        );
    }
    assert!(
        !ns.sh("ip -6 addr show dev lo").contains("::6/128"),
        "::6 left on lo"
    );
}

#[test]
fn tproxy_pod_add_check_del() {
    require_root!();
    let node = Node::new(json!({}));
    // Another mesh's table in the pod must survive everything we do.
    let pod = node
        .add_pod(&[("tproxy-cni.io/mode", "tproxy")])
        .expect("ADD");
    assert!(
        pod.ip(4).is_some() && pod.ip(6).is_some(),
        "dual-stack pod: {}",
        pod.result
    );
    // prevResult passes through: the bridge's interfaces and IPs are all there.
    assert!(
        pod.result["interfaces"].as_array().unwrap().len() >= 2,
        "{}",
        pod.result
    );

    let t = our_table(&pod.ns).expect("table inet tproxy_cni after ADD");
    let c = chains(&t);
    assert_eq!(
        c,
        vec![
            ("output".into(), "output".into(), -150, "route".into(), 1),
            (
                "prerouting".into(),
                "prerouting".into(),
                -150,
                "filter".into(),
                10
            ),
        ],
        "{}",
        pod.ns.sh("nft list table inet tproxy_cni")
    );
    let text = pod.ns.sh("nft list table inet tproxy_cni");
    // The node's addresses on the pod network (the bridge's gateway) bypass interception.
    for needle in ["ip saddr 10.88.0.1 accept", "ip6 saddr fd00:88::1 accept"] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    for needle in [
        "iifname \"lo\" meta mark & 0x00001000 == 0x00001000 ct mark set ct mark | 0x00001000",
        "ct direction reply accept",
        "tcp dport 15006 accept",
        "tproxy to :15006 meta mark set meta mark | 0x00001000 accept",
        "ct mark & 0x00001000 == 0x00001000 meta mark set meta mark | 0x00001000",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    for fam in ["-4", "-6"] {
        let rules = our_rules(&pod.ns, fam);
        assert_eq!(rules.len(), 1, "{fam}: {rules:?}");
        assert_eq!(rules[0]["fwmark"], "0x1000");
        assert_eq!(rules[0]["fwmask"], "0x1000");
        assert_eq!(rules[0]["table"], "29808");
        let routes = ip_json(&pod.ns, &format!("{fam} route show table 29808"));
        assert_eq!(routes.len(), 1, "{fam}: {routes:?}");
        assert_eq!(
            (routes[0]["type"].as_str(), routes[0]["dev"].as_str()),
            (Some("local"), Some("lo"))
        );
    }

    // CHECK passes, then notices a rule deleted behind our back, and a deleted policy rule.
    node.check_pod(&pod).expect("CHECK on a fresh pod");
    let listing = pod.ns.sh("nft -a list chain inet tproxy_cni prerouting");
    let handle = listing
        .lines()
        .find(|l| l.contains("ct direction reply"))
        .and_then(|l| l.rsplit("# handle ").next())
        .expect("rule handle")
        .trim()
        .to_string();
    pod.ns.sh(&format!(
        "nft delete rule inet tproxy_cni prerouting handle {handle}"
    ));
    let e = node
        .check_pod(&pod)
        .expect_err("CHECK must notice the deleted rule");
    assert_eq!(e.plugin(), Some("tproxy-cni"), "{e}");
    assert_eq!(cni(&e).code, 101, "{e}");
    assert!(cni(&e).msg.contains("prerouting"), "{}", e);
    // ADD again repairs (idempotent, atomic replace) and CHECK is happy again.
    node.exec_on(&node.ours(), "ADD", &pod).expect("second ADD");
    node.check_pod(&pod).expect("CHECK after repair");
    assert_eq!(
        chains(&our_table(&pod.ns).unwrap()),
        c,
        "second ADD leaves the same state"
    );
    pod.ns.sh("ip -6 rule del priority 29808");
    let e = node
        .check_pod(&pod)
        .expect_err("CHECK must notice the missing IPv6 rule");
    assert!(cni(&e).msg.contains("ipv6 rule"), "{}", e);

    // A foreign table survives our DEL; DEL twice succeeds; nothing of ours remains.
    pod.ns.sh("nft add table inet other_mesh");
    pod.ns.sh("nft add chain inet other_mesh prerouting '{ type filter hook prerouting priority mangle; }'");
    node.del_pod(&pod).expect("DEL");
    node.del_pod(&pod).expect("second DEL");
    assert_clean(&pod.ns);
    assert!(pod.ns.sh("nft list tables").contains("other_mesh"));
}

#[test]
fn redirect_pod_gets_nat_chain_and_v6_loopback_source() {
    require_root!();
    let node = Node::new(json!({}));
    let pod = node
        .add_pod(&[
            ("sidecar.istio.io/interceptionMode", "REDIRECT"),
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "10.96.0.0/12",
            ),
        ])
        .expect("ADD");
    let c = chains(&our_table(&pod.ns).expect("table"));
    let names: Vec<&str> = c.iter().map(|x| x.0.as_str()).collect();
    assert_eq!(names, vec!["output_nat", "prerouting_nat"], "{c:?}");
    assert!(c.iter().all(|x| x.3 == "nat" && x.2 == -100), "{c:?}");
    assert!(pod.ns.sh("ip -6 addr show dev lo").contains("::6/128"));
    assert!(
        our_rules(&pod.ns, "-4").is_empty(),
        "redirect needs no policy routing"
    );
    node.check_pod(&pod).expect("CHECK");
    node.del_pod(&pod).expect("DEL");
    assert_clean(&pod.ns);
}

#[test]
fn mode_none_programs_nothing() {
    require_root!();
    let node = Node::new(json!({}));
    let pod = node
        .add_pod(&[("some.other/annotation", "x")])
        .expect("ADD");
    assert_clean(&pod.ns);
    node.check_pod(&pod).expect("CHECK");
    node.del_pod(&pod).expect("DEL");
}

#[test]
fn bad_annotations_fail_add_and_leave_nothing() {
    require_root!();
    let node = Node::new(json!({"failClosed": true}));
    for (k, v) in [
        ("tproxy-cni.io/mode", "tproxyy"),
        ("tproxy-cni.io/inbound-ports", "80,99999"),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "10.0.0.0/99",
        ),
        ("traffic.kuma.io/exclude-inbound-ports", "ssh"),
    ] {
        let ann = [("tproxy-cni.io/mode", "tproxy"), (k, v)];
        let ann: Vec<(&str, &str)> = if k == "tproxy-cni.io/mode" {
            vec![(k, v)]
        } else {
            ann.to_vec()
        };
        let e = match node.add_pod(&ann) {
            Ok(_) => panic!("{k}={v} must fail"),
            Err(e) => e,
        };
        assert_eq!(e.plugin(), Some("tproxy-cni"), "{e}");
        assert_eq!(cni(&e).code, 7, "{e}");
        let msg = cni(&e).msg.as_str();
        assert!(msg.contains(k) && msg.contains(v), "{msg}");
    }
    // Each failed pod was rolled back; check a fresh one directly with the plugin alone.
    let ns = Netns::new("pod");
    let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.88.9.9/16"}]});
    let e = node
        .exec(
            &node.ours(),
            "ADD",
            &ns.path().to_string_lossy(),
            "bad",
            &json!({"tproxy-cni.io/fail-mode": "maybe", "tproxy-cni.io/mode": "tproxy"}),
            Some(&prev),
        )
        .expect_err("bad fail-mode");
    assert!(cni(&e).msg.contains("tproxy-cni.io/fail-mode"));
    assert_clean(&ns);
}

#[test]
fn add_into_something_that_is_not_a_netns_fails_cleanly() {
    require_root!();
    let node = Node::new(json!({}));
    let file = node.dir.path().join("not-a-netns");
    std::fs::write(&file, b"").unwrap();
    let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.88.9.9/16"}]});
    let e = node
        .exec(
            &node.ours(),
            "ADD",
            &file.to_string_lossy(),
            "x",
            &json!({"tproxy-cni.io/mode": "tproxy"}),
            Some(&prev),
        )
        .expect_err("ADD into a plain file");
    assert_eq!(cni(&e).code, 100, "{e}");
    // DEL on the same path, and on a path that never existed, succeeds.
    node.exec(
        &node.ours(),
        "DEL",
        &file.to_string_lossy(),
        "x",
        &json!({}),
        None,
    )
    .expect("DEL plain file");
    node.exec(
        &node.ours(),
        "DEL",
        "/var/run/netns/never-was",
        "x",
        &json!({}),
        None,
    )
    .expect("DEL gone");
    // No table appeared in the node's own netns either.
    assert!(our_table(&node.ns).is_none());
}

#[test]
fn fail_closed_adds_reject_after_capture() {
    require_root!();
    let node = Node::new(json!({"failClosed": true}));
    let pod = node
        .add_pod(&[
            ("tproxy-cni.io/mode", "tproxy"),
            ("tproxy-cni.io/inbound-ports", "8000"),
        ])
        .expect("ADD");
    let text = pod.ns.sh("nft list chain inet tproxy_cni prerouting");
    let tp = text
        .find("tcp dport 8000 tproxy to :15006")
        .expect("tproxy rule");
    let rej = text
        .find("tcp dport 8000 ct state new reject with tcp reset")
        .expect("reject rule");
    assert!(tp < rej, "{text}");
    // Annotation overrides the conflist default.
    let open = node
        .add_pod(&[
            ("tproxy-cni.io/mode", "tproxy"),
            ("tproxy-cni.io/fail-mode", "open"),
        ])
        .expect("ADD");
    assert!(!open
        .ns
        .sh("nft list table inet tproxy_cni")
        .contains("reject"));
    node.del_pod(&pod).unwrap();
    node.del_pod(&open).unwrap();
    assert_clean(&pod.ns);
}

#[test]
fn twenty_pods_concurrently() {
    require_root!();
    let node = Node::new(json!({}));
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..20)
            .map(|i| {
                let node = &node;
                s.spawn(move || {
                    let mode = if i % 2 == 0 { "tproxy" } else { "redirect" };
                    let pod = node
                        .add_pod(&[("tproxy-cni.io/mode", mode)])
                        .map_err(|e| format!("{e:?}"))?;
                    if our_table(&pod.ns).is_none() {
                        return Err(format!("pod {i}: no table after ADD"));
                    }
                    node.check_ours(&pod)
                        .map_err(|e| format!("CHECK {i}: {e:?}"))?;
                    node.del_pod(&pod).map_err(|e| format!("DEL {i}: {e:?}"))?;
                    Ok::<Netns, String>(pod.ns)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    for r in results {
        let ns = r.unwrap_or_else(|e| panic!("{e}"));
        assert_clean(&ns);
    }
}

#[test]
fn ipv4_only_pod_with_ipv6_disabled() {
    require_root!();
    let node = Node::new(json!({}));
    let ns = Netns::new("pod");
    ns.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
    let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.88.9.9/16"}]});
    let path = ns.path().to_string_lossy().into_owned();
    let ann = json!({"tproxy-cni.io/mode": "tproxy"});
    let out = node
        .exec(&node.ours(), "ADD", &path, "v4only", &ann, Some(&prev))
        .expect("ADD");
    assert_eq!(out["ips"], prev["ips"]);
    assert_eq!(our_rules(&ns, "-4").len(), 1);
    assert!(
        our_rules(&ns, "-6").is_empty(),
        "no IPv6 rule for an IPv4-only pod"
    );
    node.exec(&node.ours(), "CHECK", &path, "v4only", &ann, Some(&prev))
        .expect("CHECK");
    node.exec(&node.ours(), "DEL", &path, "v4only", &ann, Some(&prev))
        .expect("DEL");
    assert!(our_table(&ns).is_none());
    assert!(our_rules(&ns, "-4").is_empty());
}

/// `n` distinct single ports from `start`, comma separated (annotation list syntax).
fn port_list(start: u16, n: u16) -> String {
    (start..start + n)
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// docs/ARCHITECTURE.md, pitfall 14: the largest policies the parser accepts apply
/// in one ADD, CHECK passes and DEL leaves nothing. Before the fix every batch message asked for
/// an ACK, the ACKs overflowed the receive buffer after the commit (ENOBUFS) and ~257 rules
/// stayed in the pod after a failed ADD.
#[test]
fn largest_allowed_policies_apply_check_and_delete() {
    require_root!();
    let excluded: Vec<u16> = (20000..20300).collect();
    type Case<'a> = (&'a str, Value, Vec<(&'a str, String)>, usize);
    // Each prerouting chain: 3 fixed rules, 2 for the node's addresses (the bridge's gateway,
    // both families), 3 excluded sidecar ports, then the policy's rules.
    let cases: Vec<Case> = vec![
        (
            "tproxy, 256 inbound ports",
            json!({}),
            vec![
                ("tproxy-cni.io/mode", "tproxy".into()),
                ("tproxy-cni.io/inbound-ports", port_list(1000, 256)),
            ],
            4 + 2 + 3 + 256,
        ),
        (
            "tproxy fail-closed, 256 inbound ports",
            json!({}),
            vec![
                ("tproxy-cni.io/mode", "tproxy".into()),
                ("tproxy-cni.io/fail-mode", "closed".into()),
                ("tproxy-cni.io/inbound-ports", port_list(1000, 256)),
            ],
            4 + 2 + 3 + 2 * 256,
        ),
        (
            "300 excludeInboundPorts in the conflist, fail-closed, 256 inbound ports",
            json!({"excludeInboundPorts": excluded, "failClosed": true}),
            vec![
                ("tproxy-cni.io/mode", "tproxy".into()),
                ("tproxy-cni.io/inbound-ports", port_list(1000, 256)),
            ],
            4 + 2 + 3 + 300 + 2 * 256,
        ),
    ];
    for (what, conf, ann, prerouting_rules) in cases {
        let node = Node::new(conf);
        let ann: Vec<(&str, &str)> = ann.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let pod = node
            .add_pod(&ann)
            .unwrap_or_else(|e| panic!("{what}: ADD failed: {}", e));
        let t = our_table(&pod.ns).unwrap_or_else(|| panic!("{what}: no table"));
        let c = chains(&t);
        let pre = c.iter().find(|c| c.0 == "prerouting").expect("prerouting");
        assert_eq!(pre.4, prerouting_rules, "{what}");
        node.check_ours(&pod)
            .unwrap_or_else(|e| panic!("{what}: CHECK failed: {}", e));
        node.del_pod(&pod)
            .unwrap_or_else(|e| panic!("{what}: DEL failed: {}", e));
        assert_clean(&pod.ns);
    }
}

/// Runs our plugin alone for `cmd` on `pod`, under `wrapper` (a command prefix run inside the
/// node's netns); returns (exit status, stdout).
fn run_ours_wrapped(
    node: &Node,
    wrapper: &[&str],
    cmd: &str,
    pod: &common::chain::Pod,
) -> (i32, String) {
    use std::io::Write;
    let mut conf = node.ours();
    conf["name"] = node.conflist["name"].clone();
    conf["cniVersion"] = node.conflist["cniVersion"].clone();
    conf["prevResult"] = pod.result.clone();
    conf["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": pod.annotations});
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &node.ns.name])
        .args(wrapper)
        .arg(env!("CARGO_BIN_EXE_tproxy-cni"))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", &pod.id)
        .env("CNI_NETNS", pod.ns.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn check_err(node: &Node, pod: &common::chain::Pod) -> (u64, String) {
    check_err_with(node, pod, &pod.annotations)
}

/// CHECK of our plugin on `pod` as if it had annotations `ann`; must fail.
fn check_err_with(node: &Node, pod: &common::chain::Pod, ann: &Value) -> (u64, String) {
    let e = node
        .exec(
            &node.ours(),
            "CHECK",
            &pod.ns.path().to_string_lossy(),
            &pod.id,
            ann,
            Some(&pod.result),
        )
        .expect_err("CHECK must report the difference");
    (u64::from(cni(&e).code), cni(&e).msg.clone())
}

/// CHECK fails with 101 naming the difference for a dormant table, an extra set
/// or chain in our table, a duplicate fwmark rule; a re-ADD from tproxy to redirect removes
/// the fwmark rules and routes and CHECK then passes. A read failure is 100.
#[test]
fn check_is_strict_and_readd_converges() {
    require_root!();
    let node = Node::new(json!({}));
    let mut pod = node
        .add_pod(&[("tproxy-cni.io/mode", "tproxy")])
        .expect("ADD");
    node.check_ours(&pod).expect("CHECK right after ADD");
    let readd = |pod: &common::chain::Pod| node.exec_on(&node.ours(), "ADD", pod).expect("re-ADD");

    for (what, cmd, needle) in [
        (
            "dormant",
            "nft add table inet tproxy_cni '{ flags dormant; }'",
            "dormant",
        ),
        (
            "extra set",
            "nft add set inet tproxy_cni s '{ type ipv4_addr; }'",
            "extra set s",
        ),
        (
            "extra chain",
            "nft add chain inet tproxy_cni c",
            "extra chain c",
        ),
        (
            "duplicate fwmark rule",
            "ip rule add fwmark 0x1000/0x1000 lookup 29808 priority 29808",
            "2 copies of ipv4 rule",
        ),
    ] {
        pod.ns.sh(cmd);
        let (code, msg) = check_err(&node, &pod);
        assert_eq!(code, 101, "{what}: {msg}");
        assert!(msg.contains(needle), "{what}: {msg}");
        // A re-ADD repairs each of them (the duplicate rule goes too).
        readd(&pod);
        node.check_ours(&pod)
            .unwrap_or_else(|e| panic!("{what}: CHECK after re-ADD: {}", e));
    }

    // A read failure is not drift: without CAP_NET_ADMIN every nf_tables request is refused.
    // (The kernel refuses the requests; a privilege is taken away, none is added.)
    let (status, out) = run_ours_wrapped(
        &node,
        &["setpriv", "--bounding-set", "-net_admin"],
        "CHECK",
        &pod,
    );
    assert_eq!(status, 1, "{out}");
    let j: Value = serde_json::from_str(&out).expect("error JSON");
    assert_eq!(j["code"], 100, "{out}");

    // tproxy -> redirect: the fwmark rules and routes go, CHECK passes.
    pod.annotations = json!({"tproxy-cni.io/mode": "redirect"});
    readd(&pod);
    for fam in ["-4", "-6"] {
        assert!(our_rules(&pod.ns, fam).is_empty(), "{fam} rule left");
        assert!(
            ip_json(&pod.ns, &format!("{fam} route show table 29808")).is_empty(),
            "{fam} route left"
        );
    }
    node.check_ours(&pod)
        .unwrap_or_else(|e| panic!("CHECK after tproxy -> redirect: {}", e));
    // And CHECK with the old mode's plan now reports what is missing.
    let (code, msg) = check_err_with(&node, &pod, &json!({"tproxy-cni.io/mode": "tproxy"}));
    assert_eq!(code, 101, "{msg}");
    node.del_pod(&pod).expect("DEL");
    assert_clean(&pod.ns);
}

/// DEL with a config that no longer parses (the conflist changed since ADD: here `mark: 0`,
/// and a `tableName` it never had) still removes what ADD made, by its owner tags, and
/// succeeds: a failing DEL would keep the primary plugin from freeing the pod's IP
/// (docs/ARCHITECTURE.md, pitfall 9). Foreign objects survive.
#[test]
fn del_with_a_config_that_no_longer_parses_removes_ours_by_tag() {
    require_root!();
    let node = Node::new(json!({"mark": 0x2000, "rulePriority": 5000}));
    let mut broken = node.ours();
    broken["mark"] = json!(0);
    broken["tableName"] = json!("other");
    for mode in ["tproxy", "redirect"] {
        let pod = node.add_pod(&[("tproxy-cni.io/mode", mode)]).expect("ADD");
        pod.ns
            .sh("ip rule add fwmark 0x539 lookup 133 priority 32000");
        pod.ns.sh("nft add table inet foreign");
        // What ADD made is there to be removed.
        assert!(our_table(&pod.ns).is_some(), "{mode}");
        if mode == "tproxy" {
            assert!(pod.ns.sh("ip rule show").contains("5000:"), "{mode}");
        } else {
            assert!(pod.ns.sh("ip -6 addr show dev lo").contains("::6/128"));
        }
        let e = node
            .exec_on(&broken, "ADD", &pod)
            .expect_err("ADD with mark 0");
        assert_eq!(cni(&e).code, 7, "{e}");
        node.exec_on(&broken, "DEL", &pod)
            .unwrap_or_else(|e| panic!("{mode}: DEL with an unreadable config: {e}"));
        assert!(our_table(&pod.ns).is_none(), "{mode}");
        assert_eq!(pod.ns.sh("nft list tables"), "table inet foreign\n");
        let rules = pod.ns.sh("ip rule show");
        assert!(rules.contains("fwmark 0x539 lookup 133"), "{rules}");
        assert!(!rules.contains("5000:"), "{mode}: {rules}");
        assert!(
            !pod.ns.sh("ip -6 addr show dev lo").contains("::6/128"),
            "{mode}: ::6 left on lo"
        );
    }
}

/// A pod programmed with other numbers (as a release with other defaults would
/// leave it: table name, mark, route table, rule priority) is drift for CHECK and is cleaned
/// by DEL of this configuration; rules without our tag survive.
#[test]
fn del_removes_our_objects_whatever_their_numbers() {
    require_root!();
    let node = Node::new(json!({}));
    let pod = node
        .add_pod(&[("tproxy-cni.io/mode", "tproxy")])
        .expect("ADD");
    let mut future = node.ours();
    for (k, v) in [
        ("mark", json!(0x100)),
        ("routeTable", json!(4000)),
        ("rulePriority", json!(4000)),
        ("tableName", json!("tproxy_cni_v9")),
    ] {
        future[k] = v;
    }
    node.exec_on(&future, "ADD", &pod)
        .expect("ADD with other numbers");
    // That ADD replaced our objects with its own.
    assert!(our_rules(&pod.ns, "-4").is_empty());
    assert!(our_table(&pod.ns).is_none());
    // Foreign rules, one of them with the very same numbers but no tag.
    pod.ns
        .sh("ip rule add fwmark 0x539 lookup 133 priority 32000");
    pod.ns
        .sh("ip rule add fwmark 0x100 lookup 4000 priority 4001");
    let (code, msg) = check_err(&node, &pod);
    assert_eq!(code, 101, "{msg}");
    assert!(msg.contains("tproxy_cni_v9"), "{msg}");
    node.del_pod(&pod).expect("DEL");
    assert_clean(&pod.ns);
    assert_eq!(pod.ns.sh("nft list tables"), "");
    let rules = pod.ns.sh("ip rule show");
    assert!(rules.contains("fwmark 0x539 lookup 133"), "{rules}");
    assert!(
        rules.contains("4001:\tfrom all fwmark 0x100 lookup 4000"),
        "{rules}"
    );
    assert!(!rules.contains("4000:"), "{rules}");
    for fam in ["-4", "-6"] {
        assert!(ip_json(&pod.ns, &format!("{fam} route show table 4000")).is_empty());
    }
}

/// Our routing objects as `ip -j` lists them, in the golden files' line format: tagged rules
/// and routes (protocol 116) of every table, and `::6` on lo.
fn tagged_routing_lines(ns: &Netns) -> Vec<String> {
    let mut out = Vec::new();
    for (fam, name) in [("-4", "ipv4"), ("-6", "ipv6")] {
        for r in ip_json(ns, &format!("{fam} rule show")) {
            if r["protocol"] == "116" {
                out.push(format!(
                    "{name} rule fwmark {}/{} lookup {} priority {}",
                    r["fwmark"].as_str().unwrap_or("?"),
                    r["fwmask"].as_str().unwrap_or("0xffffffff"),
                    r["table"].as_str().unwrap_or("?"),
                    r["priority"]
                ));
            }
        }
        for r in ip_json(ns, &format!("{fam} route show table all")) {
            if r["protocol"] == "116" {
                out.push(format!(
                    "{name} route {} {} dev {} table {}",
                    r["type"].as_str().unwrap_or("?"),
                    r["dst"].as_str().unwrap_or("?"),
                    r["dev"].as_str().unwrap_or("?"),
                    r["table"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    if ns.sh("ip -6 addr show dev lo").contains("::6/128") {
        out.push("lo address ::6/128".into());
    }
    out.sort();
    out
}

/// CRI-O runs CHECK right after every ADD, so for every golden plan ADD then CHECK
/// must pass; the kernel then holds exactly the golden table and routing objects, and DEL
/// leaves nothing.
#[test]
fn every_golden_plan_adds_checks_and_deletes() {
    require_root!();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/testdata/plan");
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/cases.json")).unwrap())
            .unwrap();
    let node = Node::new(json!({}));
    // The node's own addresses, as in crates/plugin/src/cni/golden.rs (NODE_IPS): their traffic bypasses
    // interception, so the plans hold them.
    node.ns.sh("ip link add gold0 type veth peer name gold1");
    node.ns.sh("ip link set gold0 up");
    node.ns.sh("ip addr add 10.88.0.1/16 dev gold0");
    node.ns.sh("ip addr add fd00:88::1/64 dev gold0 nodad");
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let golden = std::fs::read_to_string(format!("{dir}/{name}.nft")).unwrap();
        let mut want_routing: Vec<String> = golden
            .lines()
            .filter_map(|l| l.strip_prefix("# routing: "))
            .map(str::to_string)
            .collect();
        want_routing.sort();
        let want_table: String = golden
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let mut ours = node.ours();
        for (k, v) in case["config"].as_object().unwrap() {
            ours[k] = v.clone();
        }
        let table = ours["tableName"]
            .as_str()
            .unwrap_or("tproxy_cni")
            .to_string();
        let prev = json!({
            "cniVersion": "1.0.0",
            "ips": case["ips"].as_array().unwrap().iter()
                .map(|a| json!({"address": a})).collect::<Vec<_>>(),
        });
        let ns = Netns::new("gold");
        let path = ns.path().to_string_lossy().into_owned();
        let ann = &case["annotations"];
        let run = |cmd: &str| {
            node.exec(&ours, cmd, &path, name, ann, Some(&prev))
                .unwrap_or_else(|e| panic!("{name}: {cmd}: {}", e))
        };
        run("ADD");
        run("CHECK");
        let listed = ns.try_sh(&format!("nft list table inet {table}")).stdout;
        let listed = String::from_utf8_lossy(&listed).into_owned();
        assert_eq!(listed, want_table, "{name}: kernel listing vs golden");
        assert_eq!(
            tagged_routing_lines(&ns),
            want_routing,
            "{name}: routing objects vs golden"
        );
        run("DEL");
        assert_eq!(ns.sh("nft list tables"), "", "{name}: table left");
        assert!(tagged_routing_lines(&ns).is_empty(), "{name}: routing left");
        run("DEL");
    }
}

/// Foreign marks in the pod (Istio 0x539, kube-proxy 0x4000/0x8000, Calico
/// 0xffff0000, Cilium 0x0f00) set on every packet and conntrack entry before our chains run do
/// not break interception, and our rules leave their bits alone. Before, our rules matched
/// the whole mark (the proxy leg was never tagged, replies missed the proxy) and overwrote it.
#[test]
fn foreign_marks_coexist_with_ours() {
    use sidecar_support::{get_ip, sa, App, Sidecar, HTTP_PORT};
    require_root!();
    let node = Node::new(json!({}));
    let server = node
        .add_pod(&[("tproxy-cni.io/mode", "tproxy")])
        .expect("server ADD");
    let client = node.add_pod(&[]).expect("client ADD");
    // Stands in for the other meshes and CNIs: a table of theirs around ours.
    let foreign = "0xffffcf39";
    let set = format!("meta mark set meta mark | {foreign}\nct mark set ct mark | {foreign}\n");
    let count = format!(
        "meta mark & {foreign} == {foreign} counter\n\
         meta mark & {foreign} != {foreign} counter\n\
         ct mark & {foreign} != {foreign} counter\n"
    );
    let table = format!(
        "table inet foreign {{\n\
         chain pre {{\ntype filter hook prerouting priority mangle - 10; policy accept;\n{set}}}\n\
         chain out {{\ntype route hook output priority mangle - 10; policy accept;\n{set}}}\n\
         chain pre_after {{\ntype filter hook prerouting priority mangle + 10; policy accept;\n{count}}}\n\
         chain out_after {{\ntype route hook output priority mangle + 10; policy accept;\n{count}}}\n\
         }}\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("foreign.nft");
    std::fs::write(&f, table).unwrap();
    server.ns.sh(&format!("nft -f {}", f.display()));

    let _app = App::start(&server.ns.name, &[HTTP_PORT], &[]);
    let _sc = Sidecar::start(&server.ns.name, &["--mode", "tproxy"]);
    for fam in [4, 6] {
        let (c, s) = (client.ip(fam).unwrap(), server.ip(fam).unwrap());
        let mut last = None;
        let mut ok = None;
        for _ in 0..3 {
            match get_ip(&client.ns.name, sa(&s, HTTP_PORT)) {
                Ok(r) => {
                    ok = Some(r);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let r = ok.unwrap_or_else(|| panic!("IPv{fam} through the sidecar: {last:?}"));
        assert_eq!(r.origin, c, "IPv{fam}: the app sees the client's address");
        assert_ne!(r.port, r.local_port, "IPv{fam}: proxied, not direct");
    }
    // Counters: [kept, lost, ct lost] per chain, from `nft -j`.
    let js: Value = serde_json::from_str(&server.ns.sh("nft -j list table inet foreign")).unwrap();
    let mut counts: Vec<(String, u64)> = Vec::new();
    for o in js["nftables"].as_array().unwrap() {
        let Some(rule) = o.get("rule") else { continue };
        let packets = rule["expr"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|e| e.get("counter").map(|c| c["packets"].as_u64().unwrap_or(0)));
        if let Some(p) = packets {
            counts.push((rule["chain"].as_str().unwrap().to_string(), p));
        }
    }
    assert_eq!(counts.len(), 6, "{counts:?}");
    for chain in ["pre_after", "out_after"] {
        let c: Vec<u64> = counts
            .iter()
            .filter(|x| x.0 == chain)
            .map(|x| x.1)
            .collect();
        assert!(
            c[0] > 0,
            "{chain}: no packet seen, the test proves nothing: {counts:?}"
        );
        assert_eq!(
            c[1], 0,
            "{chain}: packets lost foreign mark bits: {counts:?}"
        );
        assert_eq!(
            c[2], 0,
            "{chain}: conntrack entries lost foreign bits: {counts:?}"
        );
    }
    node.del_pod(&server).expect("DEL");
    assert_clean(&server.ns);
    assert!(server.ns.sh("nft list tables").contains("foreign"));
}

/// A pod programmed by the release before owner tags (table without comment,
/// whole-mark fwmark 0x7470 rules and routes without protocol) is drift for CHECK and is
/// cleaned by DEL; a foreign rule survives.
#[test]
fn del_cleans_a_pod_of_the_previous_release() {
    require_root!();
    let node = Node::new(json!({}));
    let pod = node.add_pod(&[]).expect("ADD (mode none)");
    let old = "table inet tproxy_cni {\n\
               chain prerouting { type filter hook prerouting priority mangle; policy accept;\n\
                 iifname \"lo\" meta mark 0x00007470 ct mark set 0x00007470\n\
                 meta l4proto tcp tproxy to :15006 meta mark set 0x00007470 accept\n}\n\
               chain output { type route hook output priority mangle; policy accept;\n\
                 ct mark 0x00007470 meta mark set ct mark\n}\n}\n";
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("old.nft");
    std::fs::write(&f, old).unwrap();
    pod.ns.sh(&format!("nft -f {}", f.display()));
    for fam in ["-4", "-6"] {
        pod.ns.sh(&format!(
            "ip {fam} rule add fwmark 0x7470 lookup 29808 priority 29808"
        ));
        pod.ns.sh(&format!(
            "ip {fam} route add local default dev lo table 29808"
        ));
    }
    pod.ns
        .sh("ip rule add fwmark 0x539 lookup 133 priority 32000");
    let tproxy = json!({"tproxy-cni.io/mode": "tproxy"});
    let (code, msg) = check_err_with(&node, &pod, &tproxy);
    assert_eq!(code, 101, "{msg}");
    assert!(msg.contains("another release's layout"), "{msg}");
    node.del_pod(&pod).expect("DEL");
    assert_clean(&pod.ns);
    for fam in ["-4", "-6"] {
        assert!(
            !pod.ns.sh(&format!("ip {fam} rule")).contains("0x7470"),
            "{fam} legacy rule left"
        );
    }
    assert!(pod.ns.sh("ip rule").contains("fwmark 0x539 lookup 133"));
}

/// docs/ARCHITECTURE.md, pitfall 17: connections from the node's own addresses
/// (kubelet `tcpSocket` probes) are not intercepted, so with the app down and the sidecar up a
/// TCP connect from the node fails, while one from another pod is still taken by the sidecar.
/// Before, the sidecar completed every handshake and the probe saw a live app.
#[test]
fn node_traffic_reaches_the_app_directly() {
    use sidecar_support::{sa, Sidecar, DEAD_PORT};
    require_root!();
    let node = Node::new(json!({}));
    // The bridge (the node's address on the pod network) exists once a pod was added.
    let client = node.add_pod(&[]).expect("client ADD");
    let server = node
        .add_pod(&[("tproxy-cni.io/mode", "tproxy")])
        .expect("server ADD");
    node.check_ours(&server).expect("CHECK after ADD");
    let _sc = Sidecar::start(&server.ns.name, &["--mode", "tproxy"]);
    // The bridge's IPv6 address is tentative for a second or two (duplicate address detection,
    // docs/ARCHITECTURE.md, pitfall 52); until then the node's connections leave from its
    // link-local address, which is not one of the node addresses that bypass interception.
    let t0 = std::time::Instant::now();
    while !node.ns.sh("ip -6 addr show tentative").trim().is_empty() {
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "DAD");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for fam in [4, 6] {
        let dst = sa(&server.ip(fam).unwrap(), DEAD_PORT);
        let e = connect_from(&node.ns.name, dst)
            .expect_err("a probe from the node must see the app down");
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "IPv{fam}: {e}"
        );
        let from_pod = connect_from(&client.ns.name, dst);
        assert!(
            taken_by_sidecar(&from_pod),
            "IPv{fam}: another pod's connection is still taken by the sidecar: {from_pod:?}"
        );
    }
    node.del_pod(&server).expect("DEL");
    assert_clean(&server.ns);
}

/// A TCP connect from netns `ns`. A fresh bridge port may still be settling IPv6 neighbours:
/// a timeout is retried.
fn connect_from(ns: &str, dst: std::net::SocketAddr) -> std::io::Result<std::net::TcpStream> {
    use std::time::Duration;
    sidecar_support::in_ns(ns, move || {
        let mut r = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2));
        for _ in 0..3 {
            match &r {
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    r = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2))
                }
                _ => break,
            }
        }
        r
    })
}

/// With the app down, the sidecar completes the handshake, then resets when it cannot dial the
/// app (the reset may already be there when connect returns); the app's own answer would be a
/// refusal.
fn taken_by_sidecar(r: &std::io::Result<std::net::TcpStream>) -> bool {
    match r {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// `nodeBypass: false` in the conflist: no rule for the node's addresses, so a connection from
/// the node is taken by the sidecar like any other (and CHECK agrees with that plan).
#[test]
fn node_bypass_off_intercepts_the_node_too() {
    use sidecar_support::{sa, Sidecar, DEAD_PORT};
    require_root!();
    let node = Node::new(json!({"nodeBypass": false}));
    let _client = node.add_pod(&[]).expect("client ADD");
    let server = node
        .add_pod(&[("tproxy-cni.io/mode", "tproxy")])
        .expect("server ADD");
    node.check_ours(&server).expect("CHECK after ADD");
    let listing = server.ns.sh("nft list table inet tproxy_cni");
    assert!(!listing.contains("from the node"), "{listing}");
    let _sc = Sidecar::start(&server.ns.name, &["--mode", "tproxy"]);
    let from_node = connect_from(&node.ns.name, sa(&server.ip(4).unwrap(), DEAD_PORT));
    assert!(
        taken_by_sidecar(&from_node),
        "the node's connection is taken by the sidecar: {from_node:?}"
    );
    node.del_pod(&server).expect("DEL");
    assert_clean(&server.ns);
}

/// DEL side of docs/ARCHITECTURE.md, pitfall 36: a `tableName` the config accepts but nftables cannot take fails ADD
/// with nothing left, and DEL succeeds (a table we refuse to create cannot exist).
#[test]
fn unusable_table_name_fails_add_and_del_succeeds() {
    require_root!();
    let node = Node::new(json!({}));
    let ns = Netns::new("pod");
    let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.88.9.9/16"}]});
    let path = ns.path().to_string_lossy().into_owned();
    let ann = json!({"tproxy-cni.io/mode": "tproxy"});
    for name in ["1abc", "-"] {
        let mut ours = node.ours();
        ours["tableName"] = json!(name);
        let e = node
            .exec(&ours, "ADD", &path, "badname", &ann, Some(&prev))
            .expect_err("ADD with an unusable table name");
        assert!(cni(&e).msg.contains(name), "{}", e);
        assert_eq!(ns.sh("nft list tables"), "");
        assert!(our_rules(&ns, "-4").is_empty());
        node.exec(&ours, "DEL", &path, "badname", &ann, Some(&prev))
            .unwrap_or_else(|e| panic!("DEL with tableName {name:?}: {}", e));
    }
}
