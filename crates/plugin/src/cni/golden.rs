//! Golden plans: for each case of `tests/testdata/plan/cases.json` (conflist options,
//! annotations, pod IPs), the plan the plugin builds, as the rendered nftables table plus one
//! comment line per routing object, in `tests/testdata/plan/NAME.nft`. `UPDATE_GOLDEN=1`
//! rewrites the files. `tests/plugin_netns.rs` runs ADD, CHECK and DEL for every case, on a
//! node whose addresses are `NODE_IPS`.

use super::conf::NetConf;
use super::plan_with;
use crate::plan::Plan;
use serde_json::{json, Value};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/testdata/plan");

/// The node's addresses in every case; the root test gives its node netns exactly these.
pub(crate) const NODE_IPS: [&str; 2] = ["10.88.0.1", "fd00:88::1"];

/// The stdin the runtime would send our plugin for one case.
pub(crate) fn case_stdin(case: &Value) -> Value {
    let mut conf = json!({
        "cniVersion": "1.0.0",
        "name": "golden",
        "type": "tproxy-cni",
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": case["annotations"]},
        "prevResult": {
            "cniVersion": "1.0.0",
            "ips": case["ips"].as_array().into_iter().flatten()
                .map(|a| json!({"address": a})).collect::<Vec<_>>(),
        },
    });
    if let (Some(o), Some(extra)) = (conf.as_object_mut(), case["config"].as_object()) {
        for (k, v) in extra {
            o.insert(k.clone(), v.clone());
        }
    }
    conf
}

/// Routing objects, one line each, as `tests/plugin_netns.rs` reads them back from `ip -j`.
pub(crate) fn routing_lines(plan: &Plan) -> Vec<String> {
    let r = &plan.routing;
    let mut out = Vec::new();
    for x in &r.rules {
        out.push(format!(
            "{} rule fwmark {:#x}/{:#x} lookup {} priority {}",
            x.family, x.mark, x.mask, x.table, x.priority
        ));
    }
    for x in &r.local_routes {
        out.push(format!(
            "{} route local default dev lo table {}",
            x.family, x.table
        ));
    }
    for a in &r.lo_addresses {
        out.push(format!("lo address {a}"));
    }
    out
}

pub(crate) fn golden_text(name: &str, plan: &Plan) -> String {
    let mut s = format!(
        "# Plan of case {name:?} in cases.json (UPDATE_GOLDEN=1 cargo test --lib golden rewrites it).\n"
    );
    for l in routing_lines(plan) {
        s.push_str(&format!("# routing: {l}\n"));
    }
    match &plan.table {
        Some(t) => s.push_str(&crate::nft::render(t)),
        None => s.push_str("# no table\n"),
    }
    s
}

#[test]
fn plans_match_goldens() {
    let cases: Vec<Value> = serde_json::from_str(
        &std::fs::read_to_string(format!("{DIR}/cases.json")).expect("cases.json"),
    )
    .expect("cases.json parses");
    assert!(cases.len() >= 10);
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failed = Vec::new();
    for case in &cases {
        let name = case["name"].as_str().expect("case name");
        let stdin = case_stdin(case).to_string();
        let conf = NetConf::parse(stdin.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let node: Vec<std::net::IpAddr> = NODE_IPS.iter().map(|a| a.parse().unwrap()).collect();
        let plan = plan_with(&conf, &node).unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = golden_text(name, &plan);
        let path = format!("{DIR}/{name}.nft");
        if update {
            std::fs::write(&path, &got).expect("write golden");
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        if got != want {
            failed.push(format!("{path}:\n--- want\n{want}\n+++ got\n{got}"));
        }
    }
    assert!(
        failed.is_empty(),
        "plans differ from their goldens (UPDATE_GOLDEN=1 rewrites them):\n{}",
        failed.join("\n")
    );
}
