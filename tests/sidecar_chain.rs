//! The sidecar behind the real chain: pods made by bridge + host-local + tproxy-cni from a
//! conflist (`common::chain`), the sidecar started in `auto` mode from the same annotations
//! (downward-API file), so plugin and sidecar follow one policy through one code path.

mod common;
mod sidecar_support;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use common::chain::Node;
use serde_json::json;
use sidecar_support::*;

/// `GET /ip`, retried briefly: a fresh bridge port may still be settling IPv6 neighbours.
fn get_ip_retry(ns: &str, dst: SocketAddr) -> std::io::Result<IpReply> {
    let mut last = None;
    for _ in 0..3 {
        match get_ip(ns, dst) {
            Ok(r) => return Ok(r),
            Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => {
                last = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no attempt")))
}

fn log_ips(sc: &Sidecar, n: usize) -> Vec<(String, String, String)> {
    sc.wait_log(n, Duration::from_secs(5))
        .iter()
        .map(|e| {
            (
                addr_ip(&e["downstream_remote_address"]),
                addr_ip(&e["upstream_local_address"]),
                e["mode"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn chain_tproxy_real_client_ip_excluded_port_and_fail_closed() {
    require_root!();
    let node = Node::new(json!({}));
    let ann = [
        ("tproxy-cni.io/mode", "tproxy"),
        ("tproxy-cni.io/exclude-inbound-ports", "9001"),
        ("tproxy-cni.io/fail-mode", "closed"),
    ];
    let server = node.add_pod(&ann).expect("server pod ADD");
    let client = node.add_pod(&[]).expect("client pod ADD");
    let _app = App::start(&server.ns.name, &[HTTP_PORT, EXCLUDED_PORT], &[]);
    let file = downward_api(&ann);
    let path = file.path().display().to_string();
    let mut sc = Sidecar::start(
        &server.ns.name,
        &["--mode", "auto", "--annotations-file", &path],
    );

    let (c4, c6, s4, s6) = (
        client.addr(4),
        client.addr(6),
        server.addr(4),
        server.addr(6),
    );
    let r4 = get_ip_retry(&client.ns.name, sa(&s4, HTTP_PORT)).expect("v4 through the chain");
    assert_eq!(r4.origin, c4, "the app sees the client pod's IPv4");
    assert_ne!(r4.port, r4.local_port);
    let r6 = get_ip_retry(&client.ns.name, sa(&s6, HTTP_PORT)).expect("v6 through the chain");
    assert_eq!(r6.origin, c6, "the app sees the client pod's IPv6");
    assert_eq!(
        log_ips(&sc, 2),
        vec![
            (c4.clone(), c4.clone(), "tproxy".to_string()),
            (c6.clone(), c6.clone(), "tproxy".to_string())
        ]
    );

    // The annotation's excluded port reaches the app directly.
    let ex = get_ip_retry(&client.ns.name, sa(&s4, EXCLUDED_PORT)).expect("excluded port");
    assert_eq!((ex.origin.as_str(), ex.port), (c4.as_str(), ex.local_port));

    // fail-mode closed: with the sidecar gone, new connections are refused.
    sc.term();
    assert!(sc.wait_exit(Duration::from_secs(5)).success());
    let e = get_ip(&client.ns.name, sa(&s4, HTTP_PORT)).expect_err("fail-closed");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    node.del_pod(&server).expect("DEL");
}

#[test]
fn chain_redirect_sees_127_0_0_6_and_tproxy_fails_open() {
    require_root!();
    let node = Node::new(json!({}));
    let client = node.add_pod(&[]).expect("client pod ADD");
    let (c4, _) = (client.addr(4), client.addr(6));

    // Istio's own annotation selects redirect: the app sees 127.0.0.6 / ::6.
    let ann = [("sidecar.istio.io/interceptionMode", "REDIRECT")];
    let server = node.add_pod(&ann).expect("redirect pod ADD");
    let _app = App::start(&server.ns.name, &[HTTP_PORT], &[]);
    let file = downward_api(&ann);
    let path = file.path().display().to_string();
    let sc = Sidecar::start(
        &server.ns.name,
        &["--mode", "auto", "--annotations-file", &path],
    );
    let r4 = get_ip_retry(&client.ns.name, sa(&server.addr(4), HTTP_PORT)).expect("v4");
    assert_eq!(r4.origin, "127.0.0.6");
    let r6 = get_ip_retry(&client.ns.name, sa(&server.addr(6), HTTP_PORT)).expect("v6");
    assert_eq!(r6.origin, "::6");
    let log = log_ips(&sc, 2);
    assert_eq!(log[0], (c4.clone(), "127.0.0.6".into(), "redirect".into()));
    assert_eq!(log[1].1, "::6");

    // A tproxy pod with the default fail-open: without the sidecar the app is reached directly.
    let ann = [("tproxy-cni.io/mode", "tproxy")];
    let open = node.add_pod(&ann).expect("tproxy pod ADD");
    let _app2 = App::start(&open.ns.name, &[HTTP_PORT], &[]);
    let r = get_ip_retry(&client.ns.name, sa(&open.addr(4), HTTP_PORT)).expect("fail-open");
    assert_eq!((r.origin.as_str(), r.port), (c4.as_str(), r.local_port));
}

#[test]
fn chain_outbound_capture_passes_through_as_proxy_uid() {
    require_root!();
    let node = Node::new(json!({}));
    let remote = node.add_pod(&[]).expect("remote pod ADD");
    let _remote_app = App::start(&remote.ns.name, &[7000], &[]);
    let ann = [
        ("tproxy-cni.io/mode", "tproxy"),
        ("tproxy-cni.io/include-outbound-ip-ranges", "*"),
    ];
    let pod = node.add_pod(&ann).expect("pod ADD");
    let file = downward_api(&ann);
    let path = file.path().display().to_string();
    let sc = Sidecar::spawn_as_proxy(
        &pod.ns.name,
        &["--mode", "auto", "--annotations-file", &path],
    );
    sc.wait_ready();
    let (p4, p6) = (pod.addr(4), pod.addr(6));
    let r4 = get_ip_retry(&pod.ns.name, sa(&remote.addr(4), 7000)).expect("egress v4");
    assert_eq!(r4.origin, p4);
    let r6 = get_ip_retry(&pod.ns.name, sa(&remote.addr(6), 7000)).expect("egress v6");
    assert_eq!(r6.origin, p6);
    let log = log_ips(&sc, 2);
    assert_eq!(log.len(), 2, "both captured: {log:?}");
    assert!(log.iter().all(|(_, _, m)| m == "outbound"), "{log:?}");
}

#[test]
fn chain_churn_10k_all_proxied_none_stalls() {
    require_root!();
    let node = Node::new(json!({}));
    let ann = [("tproxy-cni.io/mode", "tproxy")];
    let server = node.add_pod(&ann).expect("server pod ADD");
    let client = node.add_pod(&[]).expect("client pod ADD");
    let app = App::start(&server.ns.name, &[HTTP_PORT], &[]);
    let sc = Sidecar::start(
        &server.ns.name,
        &["--mode", "tproxy", "--upstream-ports", CHURN_UPSTREAM_PORTS],
    );
    churn_check(
        &client.ns.name,
        &client.addr(4),
        sa(&server.addr(4), HTTP_PORT),
        &sc,
        &app,
    );
}

/// docs/ARCHITECTURE.md, pitfall 59: the app resets a proxied connection, then the client opens
/// a new one from the very port the sidecar's upstream used (a client port inside the upstream
/// range). Conntrack keeps the reset leg's entry for that tuple, ct mark included; the plugin's
/// rules clear our mark for anything that did not come over lo, so the sidecar's SYN-ACK goes
/// back to the client instead of to lo. Before that rule the second connect timed out.
#[test]
fn chain_client_reusing_a_reset_upstream_tuple_connects() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    require_root!();
    const RESET_PORT: u16 = 9100;
    let node = Node::new(json!({}));
    let ann = [("tproxy-cni.io/mode", "tproxy")];
    let server = node.add_pod(&ann).expect("server pod ADD");
    let client = node.add_pod(&[]).expect("client pod ADD");
    // An app that resets every connection (SO_LINGER 0, then close).
    let l = in_ns(&server.ns.name, || {
        TcpListener::bind(("0.0.0.0", RESET_PORT)).expect("bind the resetting app")
    });
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let file = downward_api(&ann);
    let path = file.path().display().to_string();
    let sc = Sidecar::start(
        &server.ns.name,
        &["--mode", "auto", "--annotations-file", &path],
    );
    let dst = sa(&server.addr(4), RESET_PORT);
    let first = in_ns(&client.ns.name, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let _ = s.write_all(b"x");
        let mut b = [0u8; 8];
        s.read(&mut b)
    });
    assert!(
        matches!(&first, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the app's reset reaches the client: {first:?}"
    );
    let log = sc.wait_log(1, Duration::from_secs(5));
    let port = addr_port(&log[0]["upstream_local_address"]);
    let client_ip = client.addr(4);
    let again = in_ns(&client.ns.name, move || {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        sock.set_reuse_address(true)?;
        let ip: std::net::IpAddr = client_ip.parse().map_err(std::io::Error::other)?;
        sock.bind(&SocketAddr::new(ip, port).into())?;
        sock.connect_timeout(&dst.into(), Duration::from_secs(5))
    });
    assert!(
        again.is_ok(),
        "a new connection from the reset upstream's port {port}: {again:?}"
    );
}
