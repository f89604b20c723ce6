//! User-namespaced pods (`hostUsers: false`), as far as this machine can show them. Its
//! containerd (Debian's 1.6) cannot run such pods, so the runtime's part is stood in for with
//! util-linux, the way containerd ≥ 2.0 lays it out (docs/install.md, "User-namespaced pods"):
//! the pod's network namespace is created inside, and so owned by, the pod's user namespace
//! (ids 0-65535 mapped to host ids 300000-365535), before CNI runs; the plugins then run as
//! host root, as the runtime runs them. What differs from a real runtime: no OCI runtime and no
//! idmapped mounts (the sidecar binary and its file capability sit on a host filesystem, as an
//! image layer does without idmapping), and the app stand-in runs as host root.
//!
//! The sidecar runs as uid 1337 *inside* that user namespace with the restrictions a pod gets
//! (bounding set NET_RAW only, no ambient set, no_new_privs, the binary's file capability
//! `cap_net_raw+p`), and must get `IP_TRANSPARENT`, keep the client's address, and have its own
//! egress exempted by the plugin's `meta skuid 1337` rule although its host uid is 301337.

mod common;
mod sidecar_support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::chain::Node;
use common::{sh, unique, Netns};
use serde_json::json;
use sidecar_support::*;

/// Host ids the pod's ids 0.. map to (a range no other test uses).
const HOST_BASE: u32 = 300_000;
const RANGE: u32 = 65_536;

/// A process holding a new user namespace (ids mapped as a runtime maps them) and, if `net`,
/// a new network namespace created inside it, attached as `/var/run/netns/NAME`.
struct UserNs {
    holder: Child,
}

impl UserNs {
    /// `unshare --user [--net] sleep`, run from the netns named `in_netns` (if any), then the
    /// id maps written from outside as a runtime does.
    fn new(net: bool, in_netns: Option<&str>) -> UserNs {
        let mut cmd = match in_netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "unshare", "--user"]);
                c
            }
            None => {
                let mut c = Command::new("unshare");
                c.arg("--user");
                c
            }
        };
        if net {
            cmd.arg("--net");
        }
        let holder = cmd
            .args(["sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn unshare");
        let pid = holder.id();
        // `ip netns exec` forks nothing: the pid is unshare's, which execs sleep in place.
        let own = std::fs::read_link("/proc/self/ns/user").expect("own userns");
        let t0 = std::time::Instant::now();
        while std::fs::read_link(format!("/proc/{pid}/ns/user")).ok() == Some(own.clone()) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "unshare did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        for map in ["uid_map", "gid_map"] {
            std::fs::write(
                format!("/proc/{pid}/{map}"),
                format!("0 {HOST_BASE} {RANGE}\n"),
            )
            .unwrap_or_else(|e| panic!("writing {map}: {e}"));
        }
        UserNs { holder }
    }

    fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// Attaches the holder's netns as `/var/run/netns/NAME`, with lo up.
    fn attach_netns(&self) -> Netns {
        let name = unique("usp");
        sh(&format!("ip netns attach {name} {}", self.pid()));
        sh(&format!("ip -n {name} link set lo up"));
        Netns { name }
    }

    /// The prefix that runs a command as the pod's uid 1337 inside this user namespace, with a
    /// pod container's restrictions (`AS_PROXY`, applied by the namespace's root, as the OCI
    /// runtime does after entering it).
    fn as_proxy(&self) -> String {
        format!("nsenter --target {} --user -- {AS_PROXY}", self.pid())
    }
}

impl Drop for UserNs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

#[test]
fn sidecar_in_a_user_namespaced_pod_keeps_the_client_ip_and_its_egress_exemption() {
    require_root!();
    let node = Node::new(json!({}));
    let client = node.add_pod(&[]).expect("client pod ADD");
    let remote = node.add_pod(&[]).expect("remote pod ADD");
    let _remote_app = App::start(&remote.ns.name, &[7000], &[]);

    // The runtime: user namespace first, the pod's netns inside it, then CNI ADD as host root.
    let userns = UserNs::new(true, None);
    let ns = userns.attach_netns();
    let owner = std::fs::read_link(format!("/proc/{}/ns/user", userns.pid())).expect("userns");
    assert_ne!(
        Some(owner),
        std::fs::read_link("/proc/self/ns/user").ok(),
        "the pod runs in its own user namespace"
    );
    let ann = [
        ("tproxy-cni.io/mode", "tproxy"),
        ("tproxy-cni.io/include-outbound-ip-ranges", "*"),
    ];
    let pod = node
        .add_pod_in(ns, &ann)
        .expect("ADD into a userns-owned netns");
    let table = pod.ns.sh("nft -j list table inet tproxy_cni");
    assert!(
        table.contains("\"skuid\""),
        "outbound exemption by uid: {table}"
    );

    let _app = App::start(&pod.ns.name, &[HTTP_PORT], &[]);
    let file = downward_api(&ann);
    let path = file.path().display().to_string();
    let capped = capped_copy();
    let sc = Sidecar::spawn_bin(
        &pod.ns.name,
        &userns.as_proxy(),
        &capped.path().join("tproxy-sidecar").display().to_string(),
        &["--mode", "auto", "--annotations-file", &path],
    );
    sc.wait_ready();
    // The sidecar is uid 1337 in the pod, host uid 301337 outside.
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", sc_pid(&sc))).expect("sidecar status");
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap_or("");
    assert!(
        uid_line.contains(&(HOST_BASE + 1337).to_string()),
        "{uid_line}"
    );

    // Inbound: IP_TRANSPARENT worked (it listens, and dials from the client's address).
    for fam in [4, 6] {
        let r = get_ip(&client.ns.name, sa(&pod.addr(fam), HTTP_PORT))
            .unwrap_or_else(|e| panic!("IPv{fam} through the sidecar: {e}\n{}", sc.stderr()));
        assert_eq!(
            r.origin,
            client.addr(fam),
            "the app sees the client's own address"
        );
        assert_ne!(r.port, r.local_port, "went through the proxy");
    }
    // Outbound: the pod's own egress is captured, and the sidecar's upstream (socket uid 1337
    // as the pod's netns sees it) is not captured again.
    let r = get_ip(&pod.ns.name, sa(&remote.addr(4), 7000))
        .unwrap_or_else(|e| panic!("egress through the sidecar: {e}\n{}", sc.stderr()));
    assert_eq!(r.origin, pod.addr(4));
    let log = sc.wait_log(3, Duration::from_secs(5));
    let modes: Vec<&str> = log.iter().filter_map(|e| e["mode"].as_str()).collect();
    assert_eq!(modes, ["tproxy", "tproxy", "outbound"], "{log:?}");
    node.del_pod(&pod).expect("DEL");
}

#[test]
fn a_netns_not_owned_by_the_pods_user_namespace_denies_ip_transparent() {
    // The opposite order (netns made first, by the host, then the user namespace): the pod's
    // NET_RAW counts only in its own user namespace, so the sidecar cannot get IP_TRANSPARENT
    // and says so. This is why the runtime must create the netns inside the pod's user
    // namespace, and why this test suite's stand-in above does.
    require_root!();
    let host_ns = Netns::new("usn");
    let userns = UserNs::new(false, Some(&host_ns.name));
    let capped = capped_copy();
    let mut sc = Sidecar::spawn_bin(
        &host_ns.name,
        &userns.as_proxy(),
        &capped.path().join("tproxy-sidecar").display().to_string(),
        &["--mode", "tproxy"],
    );
    let status = sc.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "started without IP_TRANSPARENT");
    let err = sc.stderr();
    assert!(err.contains("IP_TRANSPARENT"), "{err}");
}

fn sc_pid(sc: &Sidecar) -> u32 {
    // `ip netns exec` and nsenter exec in place until setpriv forks nothing either: the child
    // is the sidecar itself, or nsenter's forked child below it.
    let pid = sc.pid();
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or(pid)
}
