//! The families ADD programs come from the pod's own addresses only: a `prevResult` address
//! on a host-side interface (no `sandbox`), a link-local or an IPv4-mapped one must not add
//! IPv6 rules to an IPv4-only pod (docs/ARCHITECTURE.md, pitfall 74). The real plugin binary
//! runs as libcni runs it; the kernel (`ip rule`, `ip addr`) is the judge.

#[macro_use]
mod common;

use common::chain::Node;
use common::Netns;
use serde_json::{json, Value};

/// Our fwmark rules (priority 29808) of family `fam` (`-4` / `-6`) in `ns`.
fn our_rules(ns: &Netns, fam: &str) -> usize {
    let text = ns.sh(&format!("ip -j {fam} rule show"));
    let v: Value = serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text })
        .expect("ip -j rule");
    v.as_array()
        .map(|a| a.iter().filter(|r| r["priority"] == 29808).count())
        .unwrap_or(0)
}

fn has_v6_source_on_lo(ns: &Netns) -> bool {
    ns.sh("ip -6 addr show dev lo").contains("::6/128")
}

/// A bridge-style result: the host's bridge and veth without `sandbox`, the pod's eth0 with it.
fn prev(ns: &Netns, ips: Value) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "cni0", "mac": "0a:58:0a:58:00:01"},
            {"name": "veth1234", "mac": "0a:58:0a:58:00:02"},
            {"name": "eth0", "mac": "0a:58:0a:58:00:03", "sandbox": ns.path()}
        ],
        "ips": ips
    })
}

#[test]
fn host_side_link_local_and_mapped_addresses_do_not_add_a_family() {
    require_root!();
    let node = Node::new(json!({}));
    // IPv4 is the pod's; the IPv6 addresses are the bridge's, or link-local, or v4-mapped.
    let v4_only = json!([
        {"address": "10.88.9.9/16", "interface": 2, "gateway": "10.88.0.1"},
        {"address": "fd00:88::1/64", "interface": 0},
        {"address": "fd00:88::2/64", "interface": 1},
        {"address": "fe80::9/64", "interface": 2},
        {"address": "::ffff:10.88.9.9/128", "interface": 2}
    ]);
    // Control: the same pod with its own IPv6 address gets both families.
    let dual = json!([
        {"address": "10.88.9.9/16", "interface": 2},
        {"address": "fd00:88::9/64", "interface": 2}
    ]);
    for mode in ["tproxy", "redirect"] {
        for (ips, want_v6) in [(&v4_only, false), (&dual, true)] {
            let ns = Netns::new("fam");
            let prev = prev(&ns, ips.clone());
            let netns = ns.path().to_string_lossy().into_owned();
            let ann = json!({"tproxy-cni.io/mode": mode});
            node.exec(&node.ours(), "ADD", &netns, "fam", &ann, Some(&prev))
                .unwrap_or_else(|e| panic!("{mode} ADD: {e}"));
            match mode {
                "tproxy" => {
                    assert_eq!(our_rules(&ns, "-4"), 1, "{mode}");
                    assert_eq!(
                        our_rules(&ns, "-6"),
                        usize::from(want_v6),
                        "{mode} {ips}: {}",
                        ns.sh("ip -6 rule")
                    );
                }
                _ => assert_eq!(
                    has_v6_source_on_lo(&ns),
                    want_v6,
                    "{mode} {ips}: {}",
                    ns.sh("ip -6 addr show dev lo")
                ),
            }
            // CHECK agrees with what ADD made.
            node.exec(&node.ours(), "CHECK", &netns, "fam", &ann, Some(&prev))
                .unwrap_or_else(|e| panic!("{mode} CHECK: {e}"));
            node.exec(&node.ours(), "DEL", &netns, "fam", &ann, Some(&prev))
                .unwrap_or_else(|e| panic!("{mode} DEL: {e}"));
        }
    }
}

#[test]
fn an_interface_index_without_an_entry_is_refused_naming_the_key() {
    require_root!();
    let node = Node::new(json!({}));
    let ns = Netns::new("fam");
    let prev = prev(&ns, json!([{"address": "10.88.9.9/16", "interface": 7}]));
    let netns = ns.path().to_string_lossy().into_owned();
    let ann = json!({"tproxy-cni.io/mode": "tproxy"});
    let e = node
        .exec(&node.ours(), "ADD", &netns, "fam", &ann, Some(&prev))
        .expect_err("a dangling interface index");
    let e = common::chain::cni(&e);
    assert_eq!(e.code, 7, "{e:?}");
    assert!(e.msg.contains("prevResult.ips[0].interface"), "{}", e.msg);
    // Nothing was programmed.
    assert_eq!(our_rules(&ns, "-4") + our_rules(&ns, "-6"), 0);
    assert!(ns.sh("nft list tables").trim().is_empty());
}
