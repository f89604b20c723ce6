//! One writer per netns: ADDs with different modes racing on one pod netns (the real plugin
//! binary, run concurrently as two runtimes' calls would be) always end in one caller's whole
//! policy, which CHECK confirms; and the lock leaves no file behind (docs/ARCHITECTURE.md,
//! pitfall 73).

#[macro_use]
mod common;

use common::chain::{cni, Node};
use common::Netns;
use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;

fn prev(ns: &Netns) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "0a:58:0a:58:00:03", "sandbox": ns.path()}],
        "ips": [{"address": "10.88.9.9/16", "interface": 0}]
    })
}

#[test]
fn racing_tproxy_and_redirect_adds_end_in_one_policy() {
    require_root!();
    let node = Node::new(json!({}));
    let ns = Netns::new("race");
    let netns = ns.path().to_string_lossy().into_owned();
    let prev = prev(&ns);
    let modes = ["tproxy", "redirect"];
    let mut winners = [0usize; 2];
    for round in 0..100 {
        std::thread::scope(|s| {
            let handles: Vec<_> = modes
                .iter()
                .map(|m| {
                    let (node, netns, prev) = (&node, &netns, &prev);
                    s.spawn(move || {
                        let ann = json!({"tproxy-cni.io/mode": m});
                        node.exec(&node.ours(), "ADD", netns, "race", &ann, Some(prev))
                    })
                })
                .collect();
            for (h, m) in handles.into_iter().zip(modes) {
                if let Err(e) = h.join().unwrap() {
                    panic!("round {round}: {m} ADD failed: {e}");
                }
            }
        });
        let passed: Vec<usize> = (0..2)
            .filter(|&i| {
                let ann = json!({"tproxy-cni.io/mode": modes[i]});
                match node.exec(&node.ours(), "CHECK", &netns, "race", &ann, Some(&prev)) {
                    Ok(_) => true,
                    Err(e) => {
                        assert_eq!(cni(&e).code, 101, "round {round}: {e}");
                        false
                    }
                }
            })
            .collect();
        assert_eq!(
            passed.len(),
            1,
            "round {round}: CHECK passed for {passed:?}; the netns holds a mix:\n{}\n{}",
            ns.sh("nft list ruleset"),
            ns.sh("ip rule")
        );
        winners[passed[0]] += 1;
    }
    eprintln!("winners: tproxy {} redirect {}", winners[0], winners[1]);
    // No lock file is left for this netns.
    let m = std::fs::metadata(ns.path()).unwrap();
    let file = std::path::Path::new(tproxy_cni_plugin::LOCK_DIR).join(format!(
        "{:x}-{}",
        m.dev(),
        m.ino()
    ));
    assert!(!file.exists(), "{} left behind", file.display());
}

#[test]
fn a_held_lock_makes_add_wait_and_del_follow() {
    require_root!();
    let node = Node::new(json!({}));
    let ns = Netns::new("held");
    let netns = ns.path().to_string_lossy().into_owned();
    let prev = prev(&ns);
    // Someone (here: the test, through the library's own lock) holds the netns for 300 ms.
    let file = std::fs::File::open(ns.path()).unwrap();
    let held = tproxy_cni_plugin::lock_namespace(&ns.path(), &file).unwrap();
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        let add = s.spawn(|| {
            let ann = json!({"tproxy-cni.io/mode": "tproxy"});
            let r = node.exec(&node.ours(), "ADD", &netns, "held", &ann, Some(&prev));
            (r, start.elapsed())
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        // Nothing was programmed while the lock was held.
        assert!(ns.sh("nft list tables").trim().is_empty());
        drop(held);
        let (r, took) = add.join().unwrap();
        r.expect("ADD after the lock was released");
        assert!(took >= std::time::Duration::from_millis(300), "{took:?}");
    });
    assert!(ns.sh("nft list tables").contains("tproxy_cni"));
    let ann = json!({"tproxy-cni.io/mode": "tproxy"});
    node.exec(&node.ours(), "DEL", &netns, "held", &ann, Some(&prev))
        .expect("DEL");
    assert!(ns.sh("nft list tables").trim().is_empty());
}

#[test]
fn host_cli_apply_and_plugin_add_racing_end_in_one_policy() {
    require_root!();
    let node = Node::new(json!({}));
    let ns = Netns::new("hrace");
    ns.sh("ip link add h0 type veth peer name h1 && ip addr add 10.88.9.9/16 dev h0 && ip link set h0 up");
    let netns = ns.path().to_string_lossy().into_owned();
    let prev = prev(&ns);
    let ann = json!({"tproxy-cni.io/mode": "tproxy"});
    let host = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tproxy-cni-host"))
            .args(args)
            .arg("--netns")
            .arg(ns.path())
            .output()
            .expect("run tproxy-cni-host")
    };
    let mut winners = [0usize; 2];
    for round in 0..30 {
        std::thread::scope(|s| {
            let plugin =
                s.spawn(|| node.exec(&node.ours(), "ADD", &netns, "hrace", &ann, Some(&prev)));
            // Staggered starts, so either may come second (the plugin's path through the
            // libcni emulator is longer than the CLI's).
            let cli = s.spawn(|| {
                std::thread::sleep(std::time::Duration::from_millis((round % 8) * 2));
                host(&["apply", "--mode", "redirect"])
            });
            plugin.join().unwrap().expect("plugin ADD");
            let out = cli.join().unwrap();
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        });
        let plugin_ok = node
            .exec(&node.ours(), "CHECK", &netns, "hrace", &ann, Some(&prev))
            .is_ok();
        let host_ok = host(&["check", "--mode", "redirect"]).status.code() == Some(0);
        assert!(
            plugin_ok != host_ok,
            "round {round}: plugin CHECK {plugin_ok}, host check {host_ok}:\n{}\n{}",
            ns.sh("nft list ruleset"),
            ns.sh("ip rule")
        );
        winners[usize::from(host_ok)] += 1;
    }
    eprintln!("winners: plugin {} host CLI {}", winners[0], winners[1]);
}
