//! End to end without a cluster: install into a conf dir holding a real bridge + host-local
//! conflist, run the patched list like a runtime (cnirun), and check the pod netns got our table.

mod common;

use serde_json::{json, Map, Value};
use std::path::Path;
use std::process::Command;
use tproxy_cni::cnirun::{self, Invocation};
use tproxy_cni::consts::{POD_ANNOTATIONS_CAPABILITY, TABLE_NAME};

/// Removes the test bridge from the host netns even when an assertion fails.
struct Bridge(String);
impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = common::try_sh(&format!("ip link del {}", self.0));
    }
}

#[test]
fn installed_conflist_runs_and_pod_gets_rules() {
    require_root!();
    let reference = Path::new("/usr/lib/cni");
    assert!(
        reference.join("bridge").is_file(),
        "install containernetworking-plugins (bridge, host-local)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("net.d");
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&conf).unwrap();
    let br = common::unique("tpbr");
    let _bridge = Bridge(br.clone());
    let octet = 100 + (std::process::id() % 100);
    let primary = json!({
        "cniVersion": "1.0.0",
        "name": "chained-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": br,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("10.{octet}.9.0/24")}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": tmp.path().join("ipam")
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    });
    std::fs::write(
        conf.join("10-bridge.conflist"),
        serde_json::to_vec_pretty(&primary).unwrap(),
    )
    .unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_tproxy-cni-install"))
        .arg("--once")
        .arg(format!("--conf-dir={}", conf.display()))
        .arg(format!("--bin-dir={}", bin.display()))
        .arg(format!("--binary={}", env!("CARGO_BIN_EXE_tproxy-cni")))
        .arg("--health-dir=")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "installer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = cnirun::load(&conf.join("10-bridge.conflist")).unwrap();
    let types: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["type"].as_str())
        .collect();
    assert_eq!(types, ["bridge", "portmap", "tproxy-cni"]);

    let ns = common::Netns::new("tpchain");
    let mut rc = Map::new();
    rc.insert(
        POD_ANNOTATIONS_CAPABILITY.into(),
        json!({"tproxy-cni.io/mode": "tproxy"}),
    );
    rc.insert("portMappings".into(), Value::Array(vec![]));
    let inv = Invocation {
        container_id: format!("chained-{}", ns.name),
        netns: ns.path(),
        ifname: "eth0".into(),
        cni_args: vec![
            ("IgnoreUnknown".into(), "1".into()),
            ("K8S_POD_NAMESPACE".into(), "default".into()),
            ("K8S_POD_NAME".into(), "httpbin-0".into()),
            (
                "K8S_POD_INFRA_CONTAINER_ID".into(),
                format!("chained-{}", ns.name),
            ),
        ],
        runtime_config: rc,
        // Our bin dir first, like a node's /opt/cni/bin holding both.
        cni_path: vec![bin.clone(), reference.to_path_buf()],
    };
    let table = format!("nft list table inet {TABLE_NAME}");
    let result = match cnirun::add(&list, &inv) {
        Ok(r) => r,
        Err(e) => {
            // Free the IP and the veth before failing, as a runtime would.
            let _ = cnirun::del(&list, &inv, None);
            panic!("chained ADD failed: {e}");
        }
    };
    // The plugin passes the primary's result through.
    assert!(
        result["ips"][0]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("10.{octet}.9."))),
        "{result}"
    );
    let listed = ns.try_sh(&table);
    let ok = listed.status.success();
    let check = cnirun::check(&list, &inv, &result);
    let del = cnirun::del(&list, &inv, Some(&result));
    assert!(
        ok,
        "table {TABLE_NAME} missing after ADD: {}",
        String::from_utf8_lossy(&listed.stderr)
    );
    check.unwrap();
    del.unwrap();
    assert!(
        !ns.try_sh(&table).status.success(),
        "table {TABLE_NAME} still there after DEL"
    );
    assert!(!ns.try_sh("ip link show dev eth0").status.success());

    // A pod without the annotation goes through the same chain and gets nothing of ours.
    let plain = common::Netns::new("tpplain");
    let inv = Invocation {
        container_id: format!("chained-{}", plain.name),
        netns: plain.path(),
        runtime_config: Map::new(),
        ..inv
    };
    let result = cnirun::add(&list, &inv).unwrap_or_else(|e| {
        let _ = cnirun::del(&list, &inv, None);
        panic!("chained ADD without annotation failed: {e}")
    });
    let listed = plain.try_sh(&table).status.success();
    cnirun::del(&list, &inv, Some(&result)).unwrap();
    assert!(!listed, "unannotated pod got table {TABLE_NAME}");
}
