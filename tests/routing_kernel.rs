//! rtnetlink routing against a real kernel: rules, local routes, lo addresses; CHECK and DEL.

mod common;

use common::Netns;
use tproxy_cni_plugin::plan::{FwmarkRule, LocalRoute, Routing};
use tproxy_cni_plugin::{routing, run_in, NetnsError};
use tproxy_cni_policy::Family;

fn plan(families: &[Family]) -> Routing {
    let mut r = Routing::default();
    for f in families {
        r.rules.push(FwmarkRule {
            family: *f,
            mark: 0x7470,
            mask: u32::MAX,
            table: 29808,
            priority: 29808,
        });
        r.local_routes.push(LocalRoute {
            family: *f,
            table: 29808,
        });
    }
    r
}

fn ip_json(ns: &Netns, args: &str) -> serde_json::Value {
    let out = ns.sh(&format!("ip -j {args}"));
    serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })
        .expect("ip -j output is JSON")
}

#[test]
fn apply_check_delete_dual_stack() {
    require_root!();
    let ns = Netns::new("rt");
    let r = plan(&[Family::V4, Family::V6]);
    run_in(&ns.path(), || routing::apply(&r)).unwrap().unwrap();
    // Twice is the same (idempotent ADD).
    run_in(&ns.path(), || routing::apply(&r)).unwrap().unwrap();

    for fam in ["-4", "-6"] {
        let rules = ip_json(&ns, &format!("{fam} rule show"));
        let ours: Vec<_> = rules
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["priority"] == 29808)
            .collect();
        assert_eq!(ours.len(), 1, "{fam}: exactly one rule of ours: {rules}");
        assert_eq!(ours[0]["fwmark"], "0x7470");
        assert_eq!(ours[0]["table"], "29808");
        let routes = ip_json(&ns, &format!("{fam} route show table 29808"));
        let routes = routes.as_array().unwrap();
        assert_eq!(routes.len(), 1, "{fam}: {routes:?}");
        assert_eq!(routes[0]["type"], "local");
        assert_eq!(routes[0]["dst"], "default");
        assert_eq!(routes[0]["dev"], "lo");
    }
    assert_eq!(
        run_in(&ns.path(), || routing::check(&r)).unwrap().unwrap(),
        Vec::<String>::new()
    );

    // CHECK notices a rule deleted behind our back.
    ns.sh("ip -6 rule del priority 29808");
    let diffs = run_in(&ns.path(), || routing::check(&r)).unwrap().unwrap();
    assert_eq!(diffs.len(), 1, "{diffs:?}");
    assert!(diffs[0].contains("ipv6 rule fwmark 0x7470"), "{diffs:?}");

    // DEL removes the rest, and again succeeds on nothing.
    run_in(&ns.path(), || routing::delete(&r)).unwrap().unwrap();
    run_in(&ns.path(), || routing::delete(&r)).unwrap().unwrap();
    for fam in ["-4", "-6"] {
        let rules = ip_json(&ns, &format!("{fam} rule show"));
        assert!(
            rules
                .as_array()
                .unwrap()
                .iter()
                .all(|x| x["priority"] != 29808),
            "{rules}"
        );
        assert!(ip_json(&ns, &format!("{fam} route show table 29808"))
            .as_array()
            .unwrap()
            .is_empty());
    }
    assert_eq!(
        run_in(&ns.path(), || routing::check(&r))
            .unwrap()
            .unwrap()
            .len(),
        4
    );
}

#[test]
fn delete_keeps_foreign_rules_and_routes() {
    require_root!();
    let ns = Netns::new("rt");
    ns.sh("ip rule add fwmark 0x539 lookup 133 priority 32000");
    ns.sh("ip route add local default dev lo table 133");
    let r = plan(&[Family::V4]);
    run_in(&ns.path(), || routing::apply(&r)).unwrap().unwrap();
    run_in(&ns.path(), || routing::delete(&r)).unwrap().unwrap();
    let rules = ns.sh("ip rule show");
    assert!(rules.contains("fwmark 0x539 lookup 133"), "{rules}");
    assert!(!rules.contains("0x7470"), "{rules}");
    assert!(ns
        .sh("ip route show table 133")
        .contains("local default dev lo"));
}

#[test]
fn lo_address_for_redirect_v6() {
    require_root!();
    let ns = Netns::new("rt");
    let mut r = Routing::default();
    r.lo_addresses.push("::6/128".parse().unwrap());
    run_in(&ns.path(), || routing::apply(&r)).unwrap().unwrap();
    assert!(ns.sh("ip -6 addr show dev lo").contains("::6/128"));
    assert!(run_in(&ns.path(), || routing::check(&r))
        .unwrap()
        .unwrap()
        .is_empty());
    run_in(&ns.path(), || routing::delete(&r)).unwrap().unwrap();
    assert!(!ns.sh("ip -6 addr show dev lo").contains("::6/128"));
}

#[test]
fn gone_netns_is_reported_as_gone() {
    let e = run_in(
        std::path::Path::new("/var/run/netns/definitely-not-here"),
        || (),
    )
    .unwrap_err();
    assert!(matches!(e, NetnsError::Gone(_)), "{e}");
    let e = run_in(std::path::Path::new(""), || ()).unwrap_err();
    assert!(matches!(e, NetnsError::Gone(_)), "{e}");
}

#[test]
fn works_while_lo_is_still_down() {
    require_root!();
    // `ip netns add` leaves lo down; a runtime may run us before its loopback plugin.
    let ns = Netns::new("rt");
    ns.sh("ip link set lo down");
    let r = plan(&[Family::V4, Family::V6]);
    run_in(&ns.path(), || routing::apply(&r)).unwrap().unwrap();
    assert!(run_in(&ns.path(), || routing::check(&r))
        .unwrap()
        .unwrap()
        .is_empty());
    assert!(ns.sh("ip link show lo").contains("UP"));
}

fn ours_of(ns: &Netns, fam: &str) -> Vec<serde_json::Value> {
    ip_json(ns, &format!("{fam} rule show"))
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["protocol"] == "116" || x["protocol"] == 116)
        .cloned()
        .collect()
}

/// A second copy of our fwmark rule is drift, and objects of ours that the plan
/// does not want (another mode) are reported as extra.
#[test]
fn check_reports_duplicates_and_unwanted_objects() {
    require_root!();
    let ns = Netns::new("rt");
    let r = plan(&[Family::V4]);
    run_in(&ns.path(), || routing::apply(&r)).unwrap().unwrap();
    let chk = |r: &Routing| {
        let r = r.clone();
        run_in(&ns.path(), move || routing::check(&r))
            .unwrap()
            .unwrap()
    };
    assert_eq!(chk(&r), Vec::<String>::new());
    // Tagged on every object (ip prints the protocol id it has no name for).
    assert_eq!(ours_of(&ns, "-4").len(), 1, "{}", ns.sh("ip -d rule show"));
    ns.sh("ip rule add fwmark 0x7470 lookup 29808 priority 29808");
    let d = chk(&r);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        d[0].starts_with("2 copies of ipv4 rule fwmark 0x7470"),
        "{d:?}"
    );
    // The pod's mode is now one without policy routing: what is ours is extra (the copy
    // without our tag is not ours).
    let d = chk(&Routing::default());
    assert_eq!(d.len(), 2, "{d:?}");
    assert!(d.iter().all(|x| x.starts_with("extra ")), "{d:?}");
}

/// Apply converges (tagged objects of another plan go, foreign ones stay),
/// and delete removes tagged objects whatever mark, table and priority made them.
#[test]
fn apply_and_delete_find_ours_by_tag() {
    require_root!();
    let ns = Netns::new("rt");
    ns.sh("ip rule add fwmark 0x539 lookup 133 priority 32000");
    ns.sh("ip route add local default dev lo table 133");
    // As a release with other defaults would leave it: other mark, table and priority.
    let mut old = plan(&[Family::V4, Family::V6]);
    for x in &mut old.rules {
        (x.mark, x.table, x.priority) = (0x100, 4242, 4242);
    }
    for x in &mut old.local_routes {
        x.table = 4242;
    }
    run_in(&ns.path(), || routing::apply(&old))
        .unwrap()
        .unwrap();
    let new = plan(&[Family::V4, Family::V6]);
    run_in(&ns.path(), || routing::apply(&new))
        .unwrap()
        .unwrap();
    let chk = run_in(&ns.path(), || routing::check(&new))
        .unwrap()
        .unwrap();
    assert_eq!(chk, Vec::<String>::new());
    for fam in ["-4", "-6"] {
        assert!(ip_json(&ns, &format!("{fam} route show table 4242"))
            .as_array()
            .unwrap()
            .is_empty());
        assert_eq!(ours_of(&ns, fam).len(), 1);
    }
    // Back to the old numbers, then a DEL that only knows the new ones removes them.
    run_in(&ns.path(), || routing::apply(&old))
        .unwrap()
        .unwrap();
    run_in(&ns.path(), || routing::delete(&new))
        .unwrap()
        .unwrap();
    for fam in ["-4", "-6"] {
        assert!(
            ours_of(&ns, fam).is_empty(),
            "{}",
            ns.sh(&format!("ip {fam} rule"))
        );
        assert!(ip_json(&ns, &format!("{fam} route show table 4242"))
            .as_array()
            .unwrap()
            .is_empty());
    }
    let rules = ns.sh("ip rule show");
    assert!(rules.contains("fwmark 0x539 lookup 133"), "{rules}");
    assert!(ns
        .sh("ip route show table 133")
        .contains("local default dev lo"));
}

/// The node's addresses that bypass interception (docs/ARCHITECTURE.md, pitfall 17): global ones only, IPv4
/// secondaries included; loopback, link-local, deprecated IPv6 and kube-ipvs0 left out.
#[test]
fn node_addresses_are_the_stable_global_ones() {
    require_root!();
    let ns = Netns::new("rt");
    ns.sh("ip link add n0 type veth peer name n1");
    ns.sh("ip link set n0 up");
    ns.sh("ip addr add 10.1.0.1/24 dev n0");
    ns.sh("ip addr add 10.1.0.2/24 dev n0");
    ns.sh("ip addr add fd00:1::1/64 dev n0 nodad");
    ns.sh("ip addr add fd00:1::2/64 dev n0 nodad preferred_lft 0");
    ns.sh("ip link add kube-ipvs0 type veth peer name k1");
    ns.sh("ip addr add 10.96.0.1/32 dev kube-ipvs0");
    let got = run_in(&ns.path(), routing::node_addresses)
        .unwrap()
        .unwrap();
    let want: Vec<std::net::IpAddr> = ["10.1.0.1", "10.1.0.2", "fd00:1::1"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    assert_eq!(got, want, "{}", ns.sh("ip addr"));
}
