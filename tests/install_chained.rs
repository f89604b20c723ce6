//! End to end without a cluster: install into a conf dir holding a real bridge + host-local
//! conflist, run the patched list like a runtime (cnirun), and check the pod netns got our table;
//! and a rolling upgrade of the installer while pods are created through the chain.

mod common;

use common::chain::cnirun::{self, Invocation};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tproxy_cni_policy::consts::{POD_ANNOTATIONS_CAPABILITY, TABLE_NAME};

/// Links the reference plugins into `bin`, as a node's single CNI bin dir holds them all.
fn link_reference_plugins(bin: &Path) {
    std::fs::create_dir_all(bin).unwrap();
    for p in ["bridge", "host-local", "portmap", "loopback"] {
        std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), bin.join(p)).unwrap();
    }
}

/// A node's CNI directories as a primary network left them, in a temp dir: `net.d` holds a
/// bridge + host-local + portmap conflist named `name` (bridge `bridge`, IPv4 `subnet`, and a
/// default route when `default_route`), and `bin` the reference plugins. Returns the temp dir
/// (the IPAM state lives there too), `net.d` and `bin`.
fn primary_network(
    name: &str,
    bridge: &str,
    subnet: &str,
    default_route: bool,
) -> (tempfile::TempDir, PathBuf, PathBuf) {
    assert!(
        Path::new("/usr/lib/cni/bridge").is_file(),
        "install containernetworking-plugins (bridge, host-local)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("net.d");
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&conf).unwrap();
    // A node's bin dir holds the primary's plugins too; the installer checks they are there.
    link_reference_plugins(&bin);
    let mut ipam = json!({
        "type": "host-local",
        "ranges": [[{"subnet": subnet}]],
        "dataDir": tmp.path().join("ipam")
    });
    if default_route {
        ipam["routes"] = json!([{"dst": "0.0.0.0/0"}]);
    }
    let primary = json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false, "ipam": ipam},
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    });
    std::fs::write(
        conf.join("10-bridge.conflist"),
        serde_json::to_vec_pretty(&primary).unwrap(),
    )
    .unwrap();
    (tmp, conf, bin)
}

#[test]
fn installed_conflist_runs_and_pod_gets_rules() {
    require_root!();
    let br = common::unique("tpbr");
    let octet = 100 + (std::process::id() % 100);
    let (_tmp, conf, bin) =
        primary_network("chained-test", &br, &format!("10.{octet}.9.0/24"), true);
    // The node is a netns of its own: the bridge and the host ends of the veths live there, never
    // in the host's root netns (deleting the netns removes them, also when an assertion fails).
    let node = common::Netns::new("tpnode");
    let in_node = |f: &(dyn Fn() -> Result<Value, String> + Sync)| {
        tproxy_cni_plugin::run_in(&node.path(), f).expect("enter the node netns")
    };

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
        cni_path: vec![bin.clone()],
    };
    let table = format!("nft list table inet {TABLE_NAME}");
    let result = match in_node(&|| cnirun::add(&list, &inv).map_err(|e| e.to_string())) {
        Ok(r) => r,
        Err(e) => {
            // Free the IP and the veth before failing, as a runtime would.
            let _ = in_node(&|| {
                cnirun::del(&list, &inv, None)
                    .map(|()| Value::Null)
                    .map_err(|e| e.to_string())
            });
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
    let check = in_node(&|| {
        cnirun::check(&list, &inv, &result)
            .map(|()| Value::Null)
            .map_err(|e| e.to_string())
    });
    let del = in_node(&|| {
        cnirun::del(&list, &inv, Some(&result))
            .map(|()| Value::Null)
            .map_err(|e| e.to_string())
    });
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
    let result =
        in_node(&|| cnirun::add(&list, &inv).map_err(|e| e.to_string())).unwrap_or_else(|e| {
            let _ = in_node(&|| {
                cnirun::del(&list, &inv, None)
                    .map(|()| Value::Null)
                    .map_err(|e| e.to_string())
            });
            panic!("chained ADD without annotation failed: {e}")
        });
    let listed = plain.try_sh(&table).status.success();
    in_node(&|| {
        cnirun::del(&list, &inv, Some(&result))
            .map(|()| Value::Null)
            .map_err(|e| e.to_string())
    })
    .unwrap();
    assert!(!listed, "unannotated pod got table {TABLE_NAME}");
}

const INSTALLER: &str = env!("CARGO_BIN_EXE_tproxy-cni-install");

/// An installer daemon (one DaemonSet pod's container) with its own log and health dir.
struct Installer {
    child: Option<Child>,
    log: PathBuf,
    health: PathBuf,
}

impl Installer {
    fn start(conf: &Path, bin: &Path, binary: &Path, dir: &Path, extra: &[&str]) -> Installer {
        let log = dir.join("installer.log");
        let health = dir.join("health");
        let child = Command::new(INSTALLER)
            .arg(format!("--conf-dir={}", conf.display()))
            .arg(format!("--bin-dir={}", bin.display()))
            .arg(format!("--binary={}", binary.display()))
            .arg(format!("--health-dir={}", health.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Installer {
            child: Some(child),
            log,
            health,
        }
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn ready(&self) -> bool {
        self.health.join("ready").exists()
    }
    fn wait_ready(&self) {
        let t = Instant::now();
        while !self.ready() {
            assert!(t.elapsed() < Duration::from_secs(5), "{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    /// SIGTERM (what the kubelet sends when a rolling update stops the pod), then wait.
    fn term(&mut self) {
        let mut c = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        assert!(c.wait().unwrap().success(), "{}", self.log());
    }
}

impl Drop for Installer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What happened to one pod created through the node's conflist.
#[derive(Debug)]
enum PodOutcome {
    /// ADD succeeded and the pod netns holds our table.
    Intercepted,
    /// ADD succeeded without our plugin (the conflist did not name us).
    Plain,
    /// ADD failed (e.g. the conflist names a binary the runtime cannot find).
    Failed(String),
}

/// Creates annotated pods one after another in `node` through the first conflist of `conf`,
/// re-reading it per pod as a runtime does, until `stop`; each pod is deleted again.
fn create_pods(node: &str, conf: &Path, bin: &Path, stop: &AtomicBool) -> Vec<PodOutcome> {
    let run = env!("CARGO_BIN_EXE_tproxy-cni-run");
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut names: Vec<PathBuf> = std::fs::read_dir(conf)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
            .collect();
        names.sort();
        let list = names[0].display().to_string();
        let pod = common::Netns::new("tpupod");
        let id = format!("upgrade-{}", pod.name);
        let base = format!(
            "ip netns exec {node} {run} {{}} --conflist {list} --netns {} --id {id} \
             --cni-path {} --arg IgnoreUnknown=1 --arg K8S_POD_NAMESPACE=default \
             --arg K8S_POD_NAME={id} \
             --annotation tproxy-cni.io/mode=tproxy",
            pod.path().display(),
            bin.display()
        );
        let add = common::try_sh(&base.replace("{}", "add"));
        let outcome = if add.status.success() {
            let table = pod.try_sh(&format!("nft list table inet {TABLE_NAME}"));
            if table.status.success() {
                PodOutcome::Intercepted
            } else {
                PodOutcome::Plain
            }
        } else {
            PodOutcome::Failed(String::from_utf8_lossy(&add.stderr).into_owned())
        };
        // DEL through the list as it is now (a runtime uses its cached config; ours DELs
        // cleanly whatever is there).
        let _ = common::try_sh(&base.replace("{}", "del"));
        out.push(outcome);
    }
    out
}

/// A rolling upgrade (new installer pod started, old one SIGTERMed) never leaves a
/// moment where pods are created without our entry or where the conflist names a binary the
/// runtime cannot find. The node is a netns; the installers are the real binary against temp
/// dirs (standing in for the host's /etc/cni/net.d and /opt/cni/bin); pods are created by
/// tproxy-cni-run, which runs the conflist the way libcni does.
#[test]
fn rolling_upgrade_has_no_window_and_uninstall_is_explicit() {
    require_root!();
    let (tmp, conf, bin) = primary_network("upgrade-test", "cni0", "10.77.0.0/16", false);
    let node = common::Netns::new("tpunode");
    // Two releases of the plugin: v2 is v1's ELF with bytes appended (still runs, differs).
    let v1 = PathBuf::from(env!("CARGO_BIN_EXE_tproxy-cni"));
    let v2_dir = tmp.path().join("image-v2");
    std::fs::create_dir_all(&v2_dir).unwrap();
    let v2 = v2_dir.join("tproxy-cni");
    let mut bytes = std::fs::read(&v1).unwrap();
    bytes.extend_from_slice(b"\0release-2");
    std::fs::write(&v2, &bytes).unwrap();
    let v3_dir = tmp.path().join("image-v3");
    std::fs::create_dir_all(&v3_dir).unwrap();
    let v3 = v3_dir.join("tproxy-cni");
    bytes.extend_from_slice(b"\0release-3");
    std::fs::write(&v3, &bytes).unwrap();
    let pod_dirs: Vec<PathBuf> = ["old", "new", "next", "last"]
        .iter()
        .map(|n| {
            let d = tmp.path().join(n);
            std::fs::create_dir_all(&d).unwrap();
            d
        })
        .collect();

    let mut old = Installer::start(&conf, &bin, &v1, &pod_dirs[0], &[]);
    old.wait_ready();

    let stop = Arc::new(AtomicBool::new(false));
    let pods = {
        let (node, conf, bin, stop) = (node.name.clone(), conf.clone(), bin.clone(), stop.clone());
        std::thread::spawn(move || create_pods(&node, &conf, &bin, &stop))
    };
    std::thread::sleep(Duration::from_millis(500));
    // A rollout with surge: the new pod starts while the old one runs, then the old one is
    // stopped (SIGTERM).
    let mut new = Installer::start(&conf, &bin, &v2, &pod_dirs[1], &[]);
    new.wait_ready();
    std::thread::sleep(Duration::from_millis(300));
    old.term();
    std::thread::sleep(Duration::from_millis(500));
    // The DaemonSet default (maxSurge 0): the old pod stops first, the next one starts later.
    new.term();
    std::thread::sleep(Duration::from_millis(700));
    let mut next = Installer::start(&conf, &bin, &v3, &pod_dirs[2], &[]);
    next.wait_ready();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let outcomes = pods.join().unwrap();
    let bad: Vec<String> = outcomes
        .iter()
        .filter_map(|o| match o {
            PodOutcome::Intercepted => None,
            PodOutcome::Plain => Some("ADD ok without our rules".to_string()),
            PodOutcome::Failed(e) => Some(format!("ADD failed: {e}")),
        })
        .collect();
    eprintln!(
        "upgrade: {} pods, {} not intercepted",
        outcomes.len(),
        bad.len()
    );
    assert!(
        outcomes.len() >= 6,
        "too few pods to say anything: {outcomes:?}"
    );
    assert!(
        bad.is_empty(),
        "{} of {} pods without our rules during the upgrade, e.g. {:?}",
        bad.len(),
        outcomes.len(),
        &bad[..bad.len().min(3)]
    );
    assert_eq!(std::fs::read(bin.join("tproxy-cni")).unwrap(), bytes);

    // Uninstall, as docs/install.md describes it: roll out --remove-on-exit (a rollout keeps
    // the entry like any other), then delete the DaemonSet (SIGTERM removes the entry, then
    // the binary). Pods created afterwards start fine, without interception.
    let mut last = Installer::start(&conf, &bin, &v3, &pod_dirs[3], &["--remove-on-exit"]);
    next.term();
    last.wait_ready();
    last.term();
    let log = last.log();
    let entry_gone = log.find("removed our entry").expect("entry removal logged");
    let bin_gone = log.find(&format!("removed {}", bin.join("tproxy-cni").display()));
    assert!(bin_gone.is_some_and(|b| b > entry_gone), "{log}");
    assert!(!bin.join("tproxy-cni").exists());
    let after = {
        let (n, c, b) = (node.name.clone(), conf.clone(), bin.clone());
        let stop2 = Arc::new(AtomicBool::new(false));
        let s = stop2.clone();
        let h = std::thread::spawn(move || create_pods(&n, &c, &b, &s));
        std::thread::sleep(Duration::from_millis(200));
        stop2.store(true, Ordering::Relaxed);
        h.join().unwrap()
    };
    assert!(
        after.iter().all(|o| matches!(o, PodOutcome::Plain)),
        "{after:?}"
    );
}
