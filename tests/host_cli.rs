//! Root tests of `tproxy-cni-host`: the "pod" netns of `sidecar_support::Topo` stands in for a
//! VM (a host with one interface and an app), the client netns for a machine reaching it.
//! The CLI runs as root, as its systemd unit does; the sidecar runs as root too, as a plain
//! system service on a VM may (no outbound capture here, so the proxy uid does not matter).

mod common;
mod sidecar_support;

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Duration;

use common::Netns;
use sidecar_support::*;
use tproxy_cni_policy::{Defaults, PodPolicy};

const BIN: &str = env!("CARGO_BIN_EXE_tproxy-cni-host");

/// Runs `tproxy-cni-host ARGS --netns <ns>`.
fn host(ns: &Netns, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--netns")
        .arg(ns.path())
        .output()
        .expect("run tproxy-cni-host")
}

/// Runs it and asserts the exit status; returns stdout.
fn host_ok(ns: &Netns, args: &[&str], want: i32) -> String {
    let out = host(ns, args);
    assert_eq!(
        out.status.code(),
        Some(want),
        "{args:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Everything of ours in the netns as the kernel tools print it: the ruleset, fwmark rules
/// and routes of both families, lo's addresses.
fn kernel_state(ns: &Netns) -> String {
    let mut s = ns.sh("nft list ruleset");
    for fam in ["-4", "-6"] {
        s += &ns.sh(&format!("ip {fam} rule show"));
        s += &ns.sh(&format!(
            "ip {fam} route show table all type local dev lo proto 116"
        ));
        // An absent table 29808 is an error for `ip route show table`: the output counts.
        let routes = ns.try_sh(&format!("ip {fam} route show table 29808"));
        s += &String::from_utf8_lossy(&routes.stdout);
    }
    s += &ns.sh("ip addr show dev lo");
    s
}

/// Nothing of ours is left: no table, no tagged or numbered rule or route, no ::6 on lo.
fn assert_nothing_left(ns: &Netns) {
    assert!(
        !ns.sh("nft list tables").contains("tproxy_cni"),
        "{}",
        ns.sh("nft list ruleset")
    );
    for fam in ["-4", "-6"] {
        let rules = ns.sh(&format!("ip {fam} rule show"));
        assert!(
            !rules.contains("29808") && !rules.contains("proto 116"),
            "{fam}: {rules}"
        );
        let routes = ns.try_sh(&format!("ip {fam} route show table 29808"));
        let routes = String::from_utf8_lossy(&routes.stdout);
        assert!(routes.trim().is_empty(), "{fam}: {routes}");
    }
    assert!(!ns.sh("ip -6 addr show dev lo").contains("::6/128"));
}

/// The packets counted by the rule with `comment` (first match) in `status` output.
fn counted(status: &str, comment: &str) -> u64 {
    status
        .lines()
        .find(|l| l.ends_with(comment))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no counter for {comment:?} in\n{status}"))
}

#[test]
fn apply_intercepts_keeping_the_client_ip_and_remove_leaves_nothing() {
    require_root!();
    let t = Topo::new();
    let before = kernel_state(&t.pod);
    let _app = App::start(&t.pod.name, &[HTTP_PORT], &[]);
    host_ok(&t.pod, &["apply", "--exclude-inbound-ports", "22"], 0);
    let sc = Sidecar::start(&t.pod.name, &["--mode", "tproxy"]);

    for (client, pod) in [(CLIENT_V4, POD_V4), (CLIENT_V6, POD_V6)] {
        let r = get_ip(&t.client.name, sa(pod, HTTP_PORT)).expect("through the proxy");
        assert_eq!(r.origin, client, "the app sees the client's own address");
        assert_ne!(r.port, r.local_port, "went through the proxy, not direct");
    }
    let log = sc.wait_log(2, Duration::from_secs(5));
    assert_eq!(log.len(), 2, "the proxy saw both connections: {log:?}");
    let status = host_ok(&t.pod, &["status", "--exclude-inbound-ports", "22"], 0);
    assert!(
        counted(&status, "inbound to the sidecar (tproxy)") >= 2,
        "{status}"
    );
    assert!(
        status.contains("in sync with the options given"),
        "{status}"
    );
    host_ok(&t.pod, &["check", "--exclude-inbound-ports", "22"], 0);

    host_ok(&t.pod, &["remove"], 0);
    assert_nothing_left(&t.pod);
    assert_eq!(
        kernel_state(&t.pod),
        before,
        "remove restores the netns exactly"
    );
    // Removing again is fine, and the app is now reached directly.
    host_ok(&t.pod, &["remove"], 0);
    let r = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect("direct");
    assert_eq!(r.port, r.local_port, "no proxy in between any more");
    assert_eq!(sc.log().len(), 2);
}

#[test]
fn apply_twice_is_the_same_and_check_reports_drift_by_exit_status() {
    require_root!();
    let t = Topo::new();
    let opts = ["--mode", "redirect", "--inbound-ports", "8080,9000-9100"];
    let apply: Vec<&str> = ["apply"].iter().chain(&opts).copied().collect();
    let check: Vec<&str> = ["check"].iter().chain(&opts).copied().collect();
    host_ok(&t.pod, &apply, 0);
    let once = kernel_state(&t.pod);
    host_ok(&t.pod, &apply, 0);
    assert_eq!(kernel_state(&t.pod), once, "a second apply changes nothing");
    assert!(
        t.pod.sh("ip -6 addr show dev lo").contains("::6/128"),
        "redirect mode dials from ::6"
    );
    host_ok(&t.pod, &check, 0);
    // The same namespace named by a process in it (--pid).
    let mut sleeper = Command::new("ip")
        .args(["netns", "exec", &t.pod.name, "sleep", "30"])
        .spawn()
        .expect("spawn a process in the netns");
    let pid = sleeper.id().to_string();
    let ino = |p: &str| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let t0 = std::time::Instant::now();
    while ino(&format!("/proc/{pid}/ns/net")).ok() != ino(&t.pod.path().to_string_lossy()).ok()
        && t0.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let by_pid: Vec<&str> = check.iter().copied().chain(["--pid", &pid]).collect();
    let out = Command::new(BIN).args(&by_pid).output().expect("run");
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    // Other options are drift (101), not an error.
    let out = host_ok(&t.pod, &["check", "--mode", "redirect"], 101);
    assert!(out.contains("drift:"), "{out}");

    // A rule deleted behind our back is drift; apply puts it back.
    let handle = t
        .pod
        .sh("nft -a list chain inet tproxy_cni prerouting_nat")
        .lines()
        .find(|l| l.contains("9000-9100"))
        .and_then(|l| l.rsplit("handle ").next())
        .expect("rule handle")
        .trim()
        .to_string();
    t.pod.sh(&format!(
        "nft delete rule inet tproxy_cni prerouting_nat handle {handle}"
    ));
    let out = host_ok(&t.pod, &check, 101);
    assert!(out.contains("missing"), "{out}");
    host_ok(&t.pod, &apply, 0);
    host_ok(&t.pod, &check, 0);

    // Mode none removes everything; so does remove after it (nothing to do).
    host_ok(&t.pod, &["apply", "--mode", "none"], 0);
    assert_nothing_left(&t.pod);
    host_ok(&t.pod, &["remove"], 0);

    // A target that cannot be read is a failure (100), not drift.
    let out = Command::new(BIN)
        .args(["check", "--netns", "/nonexistent/netns"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(100));
}

/// The pod side's veth (the host's one interface in these tests).
fn host_if(ns: &Netns) -> String {
    ns.sh("ip -o link show type veth")
        .split(':')
        .nth(1)
        .and_then(|n| n.trim().split('@').next())
        .expect("a veth in the netns")
        .to_string()
}

/// Waits until `dev`'s IPv6 link-local address is usable (neighbour discovery answers).
fn wait_ipv6_ready(ns: &Netns, dev: &str) {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        let out = ns.sh(&format!("ip -6 addr show dev {dev} scope link"));
        if out.contains("inet6") && !out.contains("tentative") {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{dev}: no usable IPv6 link-local address after 5 s");
}

#[test]
fn ipv6_configured_after_apply_is_intercepted_without_a_second_apply() {
    // A host whose IPv6 comes up after the unit ran (SLAAC, DHCPv6, a late network manager):
    // at apply time its interface has IPv6 disabled and no IPv6 address at all.
    require_root!();
    let t = Topo::new();
    let dev = host_if(&t.pod);
    t.pod
        .sh(&format!("sysctl -qw net.ipv6.conf.{dev}.disable_ipv6=1"));
    assert!(
        !t.pod.sh("ip -6 addr show").contains(POD_V6),
        "disabling IPv6 removes the address"
    );
    let _app = App::start(&t.pod.name, &[HTTP_PORT], &[]);
    host_ok(&t.pod, &["apply"], 0);
    let sc = Sidecar::start(&t.pod.name, &["--mode", "tproxy"]);

    // The network comes up: IPv6 enabled, the address configured. No second apply.
    t.pod.sh(&format!(
        "sh -c 'sysctl -qw net.ipv6.conf.{dev}.disable_ipv6=0 && sysctl -qw net.ipv6.conf.{dev}.accept_dad=0 && ip addr add {POD_V6}/64 dev {dev} nodad'"
    ));
    wait_ipv6_ready(&t.pod, &dev);
    for (client, pod) in [(CLIENT_V6, POD_V6), (CLIENT_V4, POD_V4)] {
        let r = get_ip(&t.client.name, sa(pod, HTTP_PORT))
            .unwrap_or_else(|e| panic!("{pod}: through the proxy: {e}"));
        assert_eq!(r.origin, client, "the app sees the client's own address");
        assert_ne!(
            r.port, r.local_port,
            "{pod}: went through the proxy, not direct"
        );
    }
    assert_eq!(sc.wait_log(2, Duration::from_secs(5)).len(), 2);
    // What is programmed does not depend on the addresses: no drift now that IPv6 exists.
    host_ok(&t.pod, &["check"], 0);
    host_ok(&t.pod, &["remove"], 0);
    assert_nothing_left(&t.pod);
}

#[test]
fn ipv6_disabled_on_lo_gets_ipv4_interception_and_a_warning() {
    // `net.ipv6.conf.all.disable_ipv6=1` at boot disables IPv6 on lo too, where the kernel then
    // refuses IPv6 local routes: apply must still succeed, with the IPv4 half.
    require_root!();
    let t = Topo::new();
    t.pod.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1");
    let _app = App::start(&t.pod.name, &[HTTP_PORT], &[]);
    let out = host(&t.pod, &["apply"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("IPv6 is disabled on lo"), "{err}");
    assert!(t.pod.sh("ip -4 rule show").contains("lookup 29808"));
    assert!(!t.pod.sh("ip -6 rule show").contains("lookup 29808"));
    let _sc = Sidecar::start(&t.pod.name, &["--mode", "tproxy"]);
    let r = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect("IPv4 through the proxy");
    assert_eq!(r.origin, CLIENT_V4);
    assert_ne!(r.port, r.local_port);
    host_ok(&t.pod, &["check"], 0);
    host_ok(&t.pod, &["remove"], 0);
    assert_nothing_left(&t.pod);
}

#[test]
fn an_excluded_port_reaches_the_app_while_the_proxy_is_down() {
    require_root!();
    let t = Topo::new();
    let _app = App::start(&t.pod.name, &[HTTP_PORT, EXCLUDED_PORT], &[]);
    let excluded = EXCLUDED_PORT.to_string();
    // Fail closed, so the contrast is sharp: the intercepted port is reset without a proxy.
    let opts = [
        "--exclude-inbound-ports",
        excluded.as_str(),
        "--fail-mode",
        "closed",
    ];
    let apply: Vec<&str> = ["apply"].iter().chain(&opts).copied().collect();
    host_ok(&t.pod, &apply, 0);

    // The SSH-style port: straight to the app, which sees the client.
    for (client, pod) in [(CLIENT_V4, POD_V4), (CLIENT_V6, POD_V6)] {
        let r = get_ip(&t.client.name, sa(pod, EXCLUDED_PORT)).expect("excluded port");
        assert_eq!(r.origin, client);
        assert_eq!(r.port, r.local_port, "direct, no proxy");
    }
    let e = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect_err("no proxy: reset");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");

    let status: Vec<&str> = ["status"].iter().chain(&opts).copied().collect();
    let out = host_ok(&t.pod, &status, 0);
    assert!(
        counted(&out, "fail-closed: no sidecar listening") >= 1,
        "{out}"
    );
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.ends_with("excluded inbound port"))
        .collect();
    let passed: u64 = lines
        .iter()
        .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok())
        .sum();
    assert!(
        passed >= 2,
        "the excluded port's rule counted the SYNs: {out}"
    );
    host_ok(&t.pod, &["remove"], 0);
    assert_nothing_left(&t.pod);
}

#[test]
fn other_tables_are_untouched_and_bad_input_changes_nothing() {
    require_root!();
    let t = Topo::new();
    // One command per call: `Netns::sh` runs only the first command of a list in the netns.
    t.pod.sh("nft add table inet other_mesh");
    t.pod.sh("nft add chain inet other_mesh pre \
         '{ type filter hook prerouting priority -150; policy accept; }'");
    t.pod
        .sh("nft add rule inet other_mesh pre tcp dport 15006 counter accept");
    t.pod.sh("ip rule add fwmark 0x539 lookup 133 priority 133");
    let theirs = |ns: &Netns| {
        (
            ns.sh("nft list table inet other_mesh"),
            ns.sh("ip rule show"),
        )
    };
    let before = theirs(&t.pod);

    // Bad input: refused with the plugin's message for that annotation, nothing programmed.
    let mut ann = BTreeMap::new();
    ann.insert(
        "tproxy-cni.io/exclude-inbound-ports".to_string(),
        "22,99999".to_string(),
    );
    let plugin_says = PodPolicy::from_annotations(&ann, &Defaults::default())
        .expect_err("bad port")
        .to_string();
    let out = host(&t.pod, &["apply", "--exclude-inbound-ports", "22,99999"]);
    assert_eq!(out.status.code(), Some(7));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&plugin_says),
        "{stderr}\nwant: {plugin_says}"
    );
    assert!(!t.pod.sh("nft list tables").contains("tproxy_cni"));

    host_ok(&t.pod, &["apply"], 0);
    host_ok(&t.pod, &["apply", "--mode", "redirect"], 0);
    host_ok(&t.pod, &["remove"], 0);
    assert_eq!(
        theirs(&t.pod),
        before,
        "another mesh's table and rule are untouched"
    );
    assert_nothing_left(&t.pod);
}

/// The systemd example applies at start and removes at stop, with one set of options, and the
/// commands it runs are ones the binary takes (no root needed).
#[test]
fn systemd_unit_applies_at_start_and_removes_at_stop() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/install/systemd/tproxy-cni-host.service"
    ))
    .expect("unit file");
    let line = |key: &str| -> String {
        let found: Vec<&str> = unit
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .collect();
        assert_eq!(found.len(), 1, "{key} once in the unit");
        found[0].to_string()
    };
    assert_eq!(line("Type"), "oneshot");
    // Ordered after the network is online (pitfall 75), so not part of early boot: an
    // early-boot unit (DefaultDependencies=no, WantedBy=sysinit.target) ordered after
    // network-online.target would be an ordering cycle.
    assert_eq!(line("Wants"), "network-online.target");
    assert!(line("After")
        .split_whitespace()
        .any(|u| u == "network-online.target"));
    assert!(line("After")
        .split_whitespace()
        .any(|u| u == "nftables.service"));
    assert_eq!(line("WantedBy"), "multi-user.target");
    assert!(!unit.contains("DefaultDependencies=no"));
    assert_eq!(line("RemainAfterExit"), "yes");
    let opts = "$TPROXY_CNI_HOST_OPTS";
    assert_eq!(
        line("ExecStart"),
        format!("/usr/local/bin/tproxy-cni-host apply {opts}")
    );
    assert_eq!(
        line("ExecStop"),
        format!("/usr/local/bin/tproxy-cni-host remove {opts}")
    );
    for cmd in ["apply", "remove"] {
        let out = Command::new(BIN)
            .args([cmd, "--exclude-inbound-ports", "22", "--help"])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(0), "{cmd} takes the unit's options");
    }
}

/// `--config` takes a regular file of bounded size: a FIFO nobody writes must not hang the
/// CLI, `/dev/zero` must not be read until memory runs out, a directory or a huge file is
/// refused (docs/ARCHITECTURE.md, pitfall 63). Each run has a deadline; exit 7 names the path.
/// No root needed: `--config` is read before any netns is touched.
#[test]
fn config_file_must_be_a_regular_bounded_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let big = dir.path().join("big.json");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(64 * 1024 * 1024))
        .expect("sparse file");
    let run = |config: &std::path::Path| -> (i32, String) {
        let mut child = Command::new(BIN)
            .args(["check", "--config"])
            .arg(config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn tproxy-cni-host");
        let start = std::time::Instant::now();
        loop {
            if child.try_wait().expect("wait").is_some() {
                let out = child.wait_with_output().expect("output");
                return (
                    out.status.code().unwrap_or(-1),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                );
            }
            if start.elapsed() > Duration::from_secs(5) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("--config {}: still running after 5 s", config.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for (path, want) in [
        (fifo.as_path(), "a FIFO"),
        (std::path::Path::new("/dev/zero"), "a character device"),
        (dir.path(), "a directory"),
        (big.as_path(), "at most 1048576"),
    ] {
        let (code, stderr) = run(path);
        assert_eq!(code, 7, "{}: {stderr}", path.display());
        assert!(
            stderr.contains("--config")
                && stderr.contains(&path.display().to_string())
                && stderr.contains(want),
            "{}: {stderr}",
            path.display()
        );
    }
}

/// `--config` with a `tableName` naming a firewall's table: `apply` and `remove` refuse with
/// exit 7 naming it and leave it as it was (same handles, same rules); `remove` still removes
/// what is ours (docs/ARCHITECTURE.md, pitfall 64).
#[test]
fn a_table_name_naming_a_foreign_table_is_never_replaced_or_removed() {
    require_root!();
    let ns = Netns::new("fw");
    ns.sh("nft add table inet filter '{ comment \"site firewall\"; }'");
    ns.sh(
        "nft add chain inet filter input '{ type filter hook input priority 0; policy accept; }'",
    );
    ns.sh("nft add rule inet filter input tcp dport 22 counter accept");
    let firewall = ns.sh("nft -j list table inet filter");
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("filter.json");
    std::fs::write(&cfg, r#"{"tableName": "filter"}"#).expect("config");
    let cfg = cfg.to_string_lossy().into_owned();
    for cmd in ["apply", "remove"] {
        let out = host(&ns, &[cmd, "--config", &cfg]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(7), "{cmd}: {stderr}");
        assert!(
            stderr.contains("table inet filter") && stderr.contains("not ours"),
            "{cmd}: {stderr}"
        );
        assert_eq!(ns.sh("nft -j list table inet filter"), firewall, "{cmd}");
    }
    // Ours under the default name is applied and then removed despite the firewall.
    host_ok(&ns, &["apply"], 0);
    let out = host(&ns, &["remove", "--config", &cfg]);
    assert_eq!(out.status.code(), Some(7));
    assert!(!ns.sh("nft list tables").contains("tproxy_cni"));
    assert_eq!(ns.sh("nft -j list table inet filter"), firewall);
}
