//! The installer's reconcile loop over libcni's cache (docs/install.md, "Late join and drift
//! repair"), as on a node: pods set up through the primary-only conflist by `tproxy-cni-run`
//! (which writes libcni's cache as libcni does) in a node netns, then the real installer binary
//! started in that netns (like the DaemonSet's host network) with the cache and netns dirs.
//! Checked in the kernel: our table in each pod's netns, its comment, the policy rules, what a
//! client sees on an established and on a new connection.

#[macro_use]
mod common;

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Netns;
use tproxy_cni_policy::consts::TABLE_NAME;

const INSTALL: &str = env!("CARGO_BIN_EXE_tproxy-cni-install");
const RUN: &str = env!("CARGO_BIN_EXE_tproxy-cni-run");
const PLUGIN: &str = env!("CARGO_BIN_EXE_tproxy-cni");

/// A node: its netns, a primary-only conflist (bridge + host-local + portmap), the bin dir
/// with the reference plugins, libcni's cache dir.
struct Node {
    ns: Netns,
    tmp: tempfile::TempDir,
    network: String,
}

impl Node {
    fn new() -> Node {
        assert!(
            Path::new("/usr/lib/cni/bridge").is_file(),
            "install containernetworking-plugins (bridge, host-local)"
        );
        let ns = Netns::new("rcnode");
        let tmp = tempfile::tempdir().unwrap();
        let network = common::unique("rcnet");
        let bin = tmp.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for p in ["bridge", "host-local", "portmap", "loopback"] {
            std::os::unix::fs::symlink(Path::new("/usr/lib/cni").join(p), bin.join(p)).unwrap();
        }
        std::fs::create_dir_all(tmp.path().join("net.d")).unwrap();
        let octet = 100 + (std::process::id() % 100);
        let primary = json!({
            "cniVersion": "1.0.0",
            "name": network,
            "plugins": [
                {"type": "bridge", "bridge": common::unique("rcbr"), "isGateway": true,
                 "ipMasq": false,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": format!("10.{octet}.33.0/24")}]],
                          "routes": [{"dst": "0.0.0.0/0"}],
                          "dataDir": tmp.path().join("ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        });
        std::fs::write(
            tmp.path().join("net.d/10-bridge.conflist"),
            serde_json::to_vec_pretty(&primary).unwrap(),
        )
        .unwrap();
        Node { ns, tmp, network }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    /// `tproxy-cni-run CMD` for `pod` in the node netns, as a runtime runs the conflist.
    fn run(&self, cmd: &str, pod: &Pod) -> std::process::Output {
        self.run_list(cmd, pod, &self.path("net.d/10-bridge.conflist"))
    }

    fn run_list(&self, cmd: &str, pod: &Pod, list: &Path) -> std::process::Output {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.ns.path().display()))
            .arg(RUN)
            .arg(cmd)
            .arg("--conflist")
            .arg(list)
            .arg("--netns")
            .arg(pod.ns.path())
            .args(["--id", &pod.id, "--ifname", "eth0"])
            .arg("--cni-path")
            .arg(self.path("bin"))
            .arg("--cache-dir")
            .arg(self.path("cache"))
            .args([
                "--arg",
                "IgnoreUnknown=1",
                "--arg",
                "K8S_POD_NAMESPACE=default",
            ])
            .args(["--arg", &format!("K8S_POD_NAME={}", pod.name)])
            .args(["--runtime-config", "portMappings=[]"]);
        for (k, v) in &pod.annotations {
            c.args(["--annotation", &format!("{k}={v}")]);
        }
        c.output().unwrap()
    }

    /// A pod set up through the conflist as it is now; `annotations: None` is a runtime that
    /// caches none (the pod-annotations capability argument absent).
    fn pod(&self, name: &str, annotations: Option<&[(&str, &str)]>) -> Pod {
        self.pod_via(name, annotations, &self.path("net.d/10-bridge.conflist"))
    }

    fn pod_via(&self, name: &str, annotations: Option<&[(&str, &str)]>, list: &Path) -> Pod {
        let ns = Netns::new("rcpod");
        let mut pod = Pod {
            id: format!("{name}-{}", ns.name),
            ns,
            name: name.to_string(),
            annotations: Vec::new(),
            ip: String::new(),
        };
        if let Some(a) = annotations {
            pod.annotations = a
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        }
        let out = self.run_list("add", &pod, list);
        assert!(
            out.status.success(),
            "add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let result: Value = serde_json::from_slice(&out.stdout).unwrap();
        pod.ip = result["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .to_string();
        pod
    }

    fn installer(&self, extra: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.ns.path().display()))
            .arg(INSTALL)
            .arg(format!("--conf-dir={}", self.path("net.d").display()))
            .arg(format!("--bin-dir={}", self.path("bin").display()))
            .arg(format!("--binary={PLUGIN}"))
            .arg(format!("--cni-cache-dir={}", self.path("cache").display()))
            .arg("--netns-dir=/var/run/netns")
            .args(extra);
        c
    }

    fn status(&self) -> Value {
        let out = self.installer(&["--status", "--json"]).output().unwrap();
        assert!(
            out.status.success(),
            "--status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

struct Pod {
    ns: Netns,
    id: String,
    name: String,
    annotations: Vec<(String, String)>,
    ip: String,
}

impl Pod {
    /// Our table's comment in the pod's netns (`nft list`: nft 1.0.6's JSON leaves table
    /// comments out); `None` when the table is absent.
    fn table_comment(&self) -> Option<String> {
        let out = self.ns.try_sh(&format!("nft list table inet {TABLE_NAME}"));
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let comment = text
            .lines()
            .nth(1)
            .and_then(|l| l.trim().strip_prefix("comment \""))
            .and_then(|c| c.strip_suffix('"'))
            .unwrap_or("");
        Some(comment.to_string())
    }

    /// Tables and tagged policy rules in the pod's netns (anything of ours, or anybody's table).
    fn anything(&self) -> String {
        format!(
            "{}{}",
            self.ns.sh("nft list ruleset"),
            self.ns.sh("ip rule list | grep -v -e 'lookup local' -e 'lookup main' -e 'lookup default' || true")
        )
    }

    fn cache_file(&self, node: &Node) -> PathBuf {
        node.path(&format!("cache/results/{}-{}-eth0", node.network, self.id))
    }
}

/// The installer daemon; SIGKILLed on drop if the test did not stop it.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

/// The states `--status --json` reports, by pod name.
fn states(v: &Value) -> Vec<(String, String)> {
    let mut s: Vec<(String, String)> = v["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["pod"].as_str().unwrap().to_string(),
                p["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    s.sort();
    s
}

fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    tproxy_cni_plugin::run_in(&ns.path(), f).expect("enter netns")
}

/// Echoes every connection it accepts; the count of accepted connections is the app's view.
fn echo_app(ns: &Netns, addr: SocketAddr) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let l = in_netns(ns, || TcpListener::bind(addr)).unwrap();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    n
}

fn roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

#[test]
fn late_pods_are_programmed_drift_repaired_old_layout_migrated_others_untouched() {
    require_root!();
    let node = Node::new();
    let tproxy: &[(&str, &str)] = &[("tproxy-cni.io/mode", "tproxy")];
    // Set up while our entry is not in the conflist: nothing of ours anywhere.
    let web = node.pod("web", Some(tproxy));
    let old = node.pod("old", Some(tproxy));
    let client = node.pod("client", Some(&[("tproxy-cni.io/mode", "none")]));
    let istio = node.pod(
        "istio",
        Some(&[
            ("sidecar.istio.io/status", "{\"initContainers\":null}"),
            ("traffic.sidecar.istio.io/includeInboundPorts", "*"),
        ]),
    );
    let bare = node.pod("bare", None);
    // The pod of an older release: our table name, another layout's owner tag.
    old.ns.sh(&format!(
        "nft add table inet {TABLE_NAME} \"{{ comment \\\"tproxy-cni layout 0\\\"; }}\" && \
         nft add chain inet {TABLE_NAME} prerouting \"{{ type filter hook prerouting priority mangle; }}\""
    ));
    // Two cache entries the loop must not act on: a netns that is gone, and a netns that
    // exists but does not hold the cached address (the client's netns named for web's IP).
    let web_cache: Value =
        serde_json::from_slice(&std::fs::read(web.cache_file(&node)).unwrap()).unwrap();
    let forge = |id: &str, sandbox: &str| {
        let mut v = web_cache.clone();
        v["containerId"] = json!(id);
        v["netns"] = json!(sandbox);
        v["cniArgs"] = json!([["K8S_POD_NAMESPACE", "default"], ["K8S_POD_NAME", id]]);
        for i in v["result"]["interfaces"].as_array_mut().unwrap() {
            if i.get("sandbox").is_some() {
                i["sandbox"] = json!(sandbox);
            }
        }
        std::fs::write(
            node.path(&format!("cache/results/{}-{id}-eth0", node.network)),
            serde_json::to_vec(&v).unwrap(),
        )
        .unwrap();
    };
    forge("gone", "/var/run/netns/rc-no-such-netns");
    forge("wrongns", &client.ns.path().display().to_string());
    assert_eq!(web.table_comment(), None);
    // Somebody else's objects in the late pod: a repair removes only ours.
    web.ns
        .sh("nft add table inet someone_else && ip rule add fwmark 0x5 lookup 105 priority 105");

    // Operators can see it before anything is chained: read-only.
    let before = node.status();
    assert_eq!(before["chained"], false);
    assert_eq!(
        states(&before),
        [
            ("default/bare", "no-annotations"),
            ("default/client", "none"),
            ("default/gone", "unmatched"),
            ("default/istio", "other-mesh"),
            ("default/old", "older-layout"),
            ("default/web", "missing"),
            ("default/wrongns", "unmatched"),
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert_eq!(web.table_comment(), None, "--status wrote");

    // An app in web, and a connection to it established before the installer starts.
    let app_addr: SocketAddr = format!("{}:8080", web.ip).parse().unwrap();
    let accepted = echo_app(&web.ns, app_addr);
    let mut established = in_netns(&client.ns, || TcpStream::connect(app_addr)).unwrap();
    established
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    roundtrip(&mut established, b"before");

    // The installer starts: chains, then programs the late pod within a second.
    let t0 = Instant::now();
    let mut daemon = Daemon(
        node.installer(&[
            &format!("--health-dir={}", node.path("health").display()),
            "--resync=1",
        ])
        .stderr(Stdio::from(
            std::fs::File::create(node.path("installer.log")).unwrap(),
        ))
        .spawn()
        .unwrap(),
    );
    let log = || std::fs::read_to_string(node.path("installer.log")).unwrap_or_default();
    wait_for(Duration::from_secs(5), "web programmed", || {
        web.table_comment().is_some()
    });
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "programmed after {took:?}\n{}",
        log()
    );
    assert_eq!(web.table_comment().as_deref(), Some("tproxy-cni layout 1"));
    wait_for(Duration::from_secs(3), "old migrated", || {
        old.table_comment().as_deref() == Some("tproxy-cni layout 1")
    });

    // The established connection survives; a new one is intercepted (the stand-in sidecar
    // is a transparent listener on 15006, as tproxy-sidecar opens it, without the proxying).
    roundtrip(&mut established, b"after the repair");
    let sidecar = in_netns(&web.ns, || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_ip_transparent(true)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::from(([0, 0, 0, 0], 15006)).into())?;
        s.listen(16)?;
        std::io::Result::Ok(TcpListener::from(s))
    })
    .unwrap();
    let _new = in_netns(&client.ns, || {
        TcpStream::connect_timeout(&app_addr, Duration::from_secs(3))
    })
    .unwrap();
    let (conn, peer) = sidecar.accept().unwrap();
    assert_eq!(conn.local_addr().unwrap(), app_addr, "original destination");
    assert_eq!(peer.ip().to_string(), client.ip);
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the app saw the new connection directly"
    );

    // Untouched: mode none, Istio's pod, the pod without cached annotations, and the netns
    // named by an entry whose address it does not hold.
    for p in [&client, &istio, &bare] {
        let all = p.anything();
        assert!(!all.contains("table"), "{}: {all}", p.name);
        assert!(!all.contains("fwmark"), "{}: {all}", p.name);
    }

    let kept = web.anything();
    assert!(
        kept.contains("table inet someone_else")
            && kept.contains("lookup 105")
            && kept.contains("lookup 29808"),
        "{kept}"
    );
    // CHECK through the now chained list passes.
    let check = node.run("check", &web);
    assert!(
        check.status.success(),
        "CHECK: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Someone deletes our table: repaired at the next resync (no cache event for that).
    web.ns.sh(&format!("nft delete table inet {TABLE_NAME}"));
    wait_for(Duration::from_secs(4), "web repaired", || {
        web.table_comment().is_some()
    });
    // The counters are written once the pass is over.
    let metrics =
        || std::fs::read_to_string(node.path("health/reconcile.prom")).unwrap_or_default();
    wait_for(Duration::from_secs(2), "three repairs counted", || {
        metrics().contains("\ntproxy_cni_reconcile_repairs_total 3\n")
    });
    assert!(
        metrics().contains("tproxy_cni_reconcile_pods{state=\"programmed\"} 2\n"),
        "{}",
        metrics()
    );
    let lines = log();
    assert!(lines.contains("reconcile: default/web ("), "{lines}");
    assert!(lines.contains("repaired (missing"), "{lines}");
    assert!(lines.contains("repaired (older-layout"), "{lines}");

    // A new pod while chained is the plugin's own ADD; the loop finds it programmed.
    let after = node.status();
    assert_eq!(after["chained"], true);
    let web_status = after["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pod"] == "default/web")
        .unwrap()
        .clone();
    assert_eq!(web_status["state"], "programmed", "{web_status}");
    assert!(!web_status["rules"].as_array().unwrap().is_empty());
    // The table view: a line per pod with its policy, state and our rules' packets.
    let t = Instant::now();
    let table = node.installer(&["--status"]).output().unwrap();
    let took = t.elapsed();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    eprintln!("--status ({} ms):\n{table}", took.as_millis());
    let web_line = table
        .lines()
        .find(|l| l.starts_with("default/web "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        web_line.contains(" tproxy ") && web_line.contains(" programmed "),
        "{table}"
    );
    assert!(table
        .lines()
        .any(|l| l.starts_with("default/istio ") && l.contains(" other-mesh ")));
    let stop = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    stop.unwrap();
    daemon.0.wait().unwrap();

    // DEL leaves nothing, and libcni's entry goes with it.
    let del = node.run("del", &web);
    assert!(
        del.status.success(),
        "DEL: {}",
        String::from_utf8_lossy(&del.stderr)
    );
    // (Only someone else's table and rule are left.)
    let all = web.anything();
    assert!(
        !all.contains(TABLE_NAME) && !all.contains("lookup 29808"),
        "{all}"
    );
    assert!(
        all.contains("table inet someone_else") && all.contains("lookup 105"),
        "{all}"
    );
    assert!(!web.cache_file(&node).exists());
    for p in [&old, &client, &istio, &bare] {
        let _ = node.run("del", p);
    }
}

/// The window the loop exists for, while the installer runs: the primary rewrote its config
/// (our entry gone) and a pod is set up through it before the entry is back. libcni's cache
/// write is what tells the loop, long before the next resync.
#[test]
fn a_pod_set_up_without_our_entry_while_the_installer_runs_is_programmed_on_the_cache_event() {
    require_root!();
    let node = Node::new();
    // The primary's config as it was before the installer chained us: the runtime's view
    // during the window (same network name, no entry of ours).
    // The DaemonSet's hostPath (DirectoryOrCreate) makes the cache dir exist; its `results`
    // appears with the node's first pod, which is this one.
    std::fs::create_dir_all(node.path("cache")).unwrap();
    let primary_only = node.path("primary-only.conflist");
    std::fs::copy(node.path("net.d/10-bridge.conflist"), &primary_only).unwrap();
    let mut daemon = Daemon(
        node.installer(&[
            &format!("--health-dir={}", node.path("health").display()),
            "--resync=60",
        ])
        .stderr(Stdio::from(
            std::fs::File::create(node.path("installer.log")).unwrap(),
        ))
        .spawn()
        .unwrap(),
    );
    let log = || std::fs::read_to_string(node.path("installer.log")).unwrap_or_default();
    wait_for(Duration::from_secs(5), "chained", || {
        node.path("health/ready").exists()
    });
    let t0 = Instant::now();
    let pod = node.pod_via(
        "window",
        Some(&[("tproxy-cni.io/mode", "redirect")]),
        &primary_only,
    );
    let added = t0.elapsed();
    wait_for(
        Duration::from_secs(3),
        "programmed after the cache write",
        || pod.table_comment().is_some(),
    );
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "programmed {took:?} after the ADD began (the ADD took {added:?}); the next resync was \
         60 s away\n{}",
        log()
    );
    assert!(log().contains("reconcile: default/window ("), "{}", log());
    // The next one finds `results` there and watched.
    let t1 = Instant::now();
    let second = node.pod_via(
        "window2",
        Some(&[("tproxy-cni.io/mode", "tproxy")]),
        &primary_only,
    );
    wait_for(Duration::from_secs(3), "second programmed", || {
        second.table_comment().is_some()
    });
    let took2 = t1.elapsed();
    assert!(took2 < Duration::from_secs(2), "{took2:?}\n{}", log());
    eprintln!("programmed {took:?} and {took2:?} after the ADD began");
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    for p in [&pod, &second] {
        let del = node.run("del", p);
        assert!(
            del.status.success(),
            "DEL: {}",
            String::from_utf8_lossy(&del.stderr)
        );
        let all = p.anything();
        assert!(!all.contains("table") && !all.contains("fwmark"), "{all}");
    }
}

/// `--reconcile report` looks and logs, and never writes.
#[test]
fn report_mode_logs_the_late_pod_and_leaves_it_alone() {
    require_root!();
    let node = Node::new();
    let web = node.pod("web", Some(&[("tproxy-cni.io/mode", "tproxy")]));
    let mut daemon = Daemon(
        node.installer(&[
            &format!("--health-dir={}", node.path("health").display()),
            "--resync=1",
            "--reconcile=report",
        ])
        .stderr(Stdio::from(
            std::fs::File::create(node.path("installer.log")).unwrap(),
        ))
        .spawn()
        .unwrap(),
    );
    let log = || std::fs::read_to_string(node.path("installer.log")).unwrap_or_default();
    wait_for(Duration::from_secs(5), "the pod's line", || {
        log().contains("reconcile: default/web (")
    });
    // Two resyncs later: still nothing of ours, one line (its state did not change).
    std::thread::sleep(Duration::from_millis(2200));
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    let lines: Vec<String> = log()
        .lines()
        .filter(|l| l.contains("reconcile: default/web ("))
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 1, "{}", log());
    assert!(lines[0].contains("policy tproxy, missing"), "{}", lines[0]);
    assert_eq!(web.table_comment(), None);
    let metrics = std::fs::read_to_string(node.path("health/reconcile.prom")).unwrap();
    assert!(
        metrics.contains("\ntproxy_cni_reconcile_repairs_total 0\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tproxy_cni_reconcile_pods{state=\"missing\"} 1\n"),
        "{metrics}"
    );
    let _ = node.run("del", &web);
}
