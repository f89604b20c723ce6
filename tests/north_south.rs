//! North-south through the real chain: PROXY protocol from a real balancer, XFF on
//! HTTP/1.1 ports, and IP access control, with pods made by bridge + host-local + tproxy-cni
//! and the sidecar in `auto` mode reading the same annotations (downward-API file).
//!
//! The sidecar runs as uid 1337 and gets NET_RAW the way Kubernetes gives it: a file
//! capability `cap_net_raw+ep` on its binary (as the image ships it) within a bounding set of
//! NET_RAW alone; no ambient capabilities.
//!
//! The balancer (HAProxy, Debian's package) runs in the node's netns, as a hostNetwork ingress
//! or a node-local balancer would: its connections come from a node address, which the plugin
//! lets bypass the sidecar on every port except the PROXY-protocol ones.

mod common;
mod sidecar_support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::chain::{Node, Pod};
use common::tools::{have_tool, Haproxy};
use serde_json::json;
use sidecar_support::*;
use tproxy_cni_sidecar::proxy_protocol::{encode_v1, encode_v2, encode_v2_local};

/// The node's addresses on the pod network (the bridge's gateway addresses).
const NODE_V4: &str = "10.88.0.1";
const NODE_V6: &str = "fd00:88::1";
/// `NODE_V4` and `NODE_V6` as CIDRs: the trusted senders of PROXY headers.
const NODE_CIDRS: &str = "10.88.0.1/32,fd00:88::1/128";
/// Inbound app port that expects PROXY protocol from the node.
const PP_PORT: u16 = 8443;
/// A tproxy pod whose `PP_PORT` takes PROXY protocol from the node.
const PP_POD: [(&str, &str); 3] = [
    ("tproxy-cni.io/mode", "tproxy"),
    ("tproxy-cni.io/proxy-protocol-ports", "8443"),
    ("tproxy-cni.io/proxy-protocol-trusted-cidrs", NODE_CIDRS),
];

/// The default routes every Kubernetes pod has (the test conflist's IPAM sets none). The app
/// answers a client from outside the pod network only if it has a route to it: the SYN-ACK's
/// first route lookup happens before the output hook can steer it back to the sidecar.
fn default_routes(p: &Pod) {
    p.ns.sh(&format!(
        "sh -c 'ip route replace default via {NODE_V4} && ip -6 route replace default via {NODE_V6}'"
    ));
}

/// Waits until the node's IPv6 gateway address has passed duplicate address detection (until
/// then nothing can bind or connect from it).
fn wait_node_v6(node: &Node) {
    let t = Instant::now();
    loop {
        let out = node.ns.sh("ip -6 addr show");
        if out.contains(NODE_V6) && !out.contains("tentative") {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "node IPv6: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sidecar as Kubernetes runs it (see the module doc). Stands in for the container
/// runtime the way `sidecar_support::AS_PROXY` does: uid 1337, only NET_RAW in the bounding set,
/// no ambient set, no_new_privs, and a copy of the binary carrying the image's file capability.
struct K8sSidecar {
    sc: Sidecar,
    _ann: tempfile::NamedTempFile,
}

fn k8s_sidecar(ns: &str, ann: &[(&str, &str)], extra: &[&str]) -> K8sSidecar {
    let file = downward_api(ann);
    let path = file.path().display().to_string();
    let mut args = vec!["--mode", "auto", "--annotations-file", path.as_str()];
    args.extend_from_slice(extra);
    let sc = Sidecar::spawn_as_proxy(ns, &args);
    sc.wait_ready();
    K8sSidecar { sc, _ann: file }
}

/// Connects from `ns` to `dst`, sends `pre` then `GET /ip`, returns the origin the app saw.
fn get_ip_after(ns: &str, dst: SocketAddr, pre: Vec<u8>) -> std::io::Result<IpReply> {
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
        s.write_all(&pre)?;
        get_ip_on(s)
    })
}

/// What a connection from `ns` that sends `pre` (and then waits) gets: `Ok(bytes)` until EOF,
/// or the error (a reset), and how long that took.
fn outcome(
    ns: &str,
    dst: SocketAddr,
    pre: Vec<u8>,
    close_after: bool,
) -> (std::io::Result<Vec<u8>>, Duration) {
    in_ns(ns, move || {
        let t = Instant::now();
        let r = (|| {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(&pre)?;
            if close_after {
                s.shutdown(std::net::Shutdown::Write)?;
            }
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok(out)
        })();
        (r, t.elapsed())
    })
}

/// Counter `name{label="value"}` of the sidecar's `/metrics` in `ns` (0 when absent).
fn counter(ns: &str, name: &str, label: &str, value: &str) -> u64 {
    let (_, body) = admin_get(ns, "/metrics").expect("metrics");
    let line_prefix = format!("{name}{{{label}=\"{value}\"}}");
    body.lines()
        .find_map(|l| l.strip_prefix(&line_prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn log_field(e: &serde_json::Value, k: &str) -> String {
    e[k].as_str().unwrap_or_default().to_string()
}

fn log_ip(e: &serde_json::Value, k: &str) -> String {
    addr_ip(&e[k])
}

#[test]
fn chain_proxy_protocol_from_a_real_balancer_v4_v6() {
    require_root!();
    if !have_tool("haproxy", "-v") {
        return;
    }
    let node = Node::new(json!({}));
    let client = node.add_pod(&[]).expect("client pod ADD");
    let stranger = node.add_pod(&[]).expect("untrusted pod ADD");
    let ann = PP_POD;
    let server = node.add_pod(&ann).expect("server pod ADD");
    default_routes(&server);
    wait_node_v6(&node);
    let app = App::start(&server.ns.name, &[HTTP_PORT, PP_PORT], &[]);
    let sc = k8s_sidecar(
        &server.ns.name,
        &ann,
        &["--proxy-protocol-timeout", "400ms"],
    );
    let (s4, s6) = (server.addr(4), server.addr(6));
    let (c4, c6) = (client.addr(4), client.addr(6));

    // HAProxy on the node: v1 and v2, towards the pod's IPv4 and IPv6 address.
    let hp = Haproxy::start(
        Some(&node.ns.name),
        "",
        &format!(
            "listen v1_4\n  mode tcp\n  bind {NODE_V4}:10080\n  server s {s4}:{PP_PORT} send-proxy\n\
             listen v2_4\n  mode tcp\n  bind {NODE_V4}:10081\n  server s {s4}:{PP_PORT} send-proxy-v2 proxy-v2-options crc32c\n\
             listen v1_6\n  mode tcp\n  bind [{NODE_V6}]:10082\n  server s [{s6}]:{PP_PORT} send-proxy\n\
             listen v2_6\n  mode tcp\n  bind [{NODE_V6}]:10083\n  server s [{s6}]:{PP_PORT} send-proxy-v2\n"
        ),
        &[
            sa(NODE_V4, 10080),
            sa(NODE_V4, 10081),
            sa(NODE_V6, 10082),
            sa(NODE_V6, 10083),
        ],
    );
    for (lb, want) in [
        (sa(NODE_V4, 10080), &c4),
        (sa(NODE_V4, 10081), &c4),
        (sa(NODE_V6, 10082), &c6),
        (sa(NODE_V6, 10083), &c6),
    ] {
        let r = get_ip(&client.ns.name, lb).expect("through HAProxy");
        assert_eq!(
            &r.origin, want,
            "via {lb}: the app's TCP peer is the header's client"
        );
    }
    let log = sc.sc.wait_log(4, Duration::from_secs(5));
    assert_eq!(log.len(), 4, "{log:?}");
    for (e, want, node_ip) in [
        (&log[0], &c4, NODE_V4),
        (&log[1], &c4, NODE_V4),
        (&log[2], &c6, NODE_V6),
        (&log[3], &c6, NODE_V6),
    ] {
        assert_eq!(&log_ip(e, "downstream_remote_address"), want, "{e}");
        assert_eq!(
            log_ip(e, "downstream_direct_remote_address"),
            node_ip,
            "{e}"
        );
        assert_eq!(&log_ip(e, "upstream_local_address"), want, "{e}");
        assert_eq!(log_field(e, "client_address_source"), "proxy_protocol");
        assert_eq!(log_field(e, "response_flags"), "-");
    }
    drop(hp);

    // curl's own v1 header from the node: the app sees the node's address it carries.
    let out = node.ns.sh(&format!(
        "curl -sS --max-time 5 --haproxy-protocol http://{s4}:{PP_PORT}/ip"
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("curl body");
    assert_eq!(v["origin"], NODE_V4);
    let out = node.ns.sh(&format!(
        "curl -sS --max-time 5 --haproxy-protocol http://[{s6}]:{PP_PORT}/ip"
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("curl body");
    assert_eq!(v["origin"], NODE_V6);

    // v2 LOCAL (a balancer's health check): the TCP peer.
    let r = get_ip_after(&node.ns.name, sa(&s4, PP_PORT), encode_v2_local()).expect("LOCAL");
    assert_eq!(r.origin, NODE_V4);

    // Not a PROXY-protocol port: the node bypass holds (the app sees the node directly, the
    // sidecar never sees it).
    let before = sc.sc.log().len();
    let r = get_ip(&node.ns.name, sa(&s4, HTTP_PORT)).expect("node to a plain port");
    assert_eq!((r.origin.as_str(), r.port), (NODE_V4, r.local_port));

    // Spoofing: an untrusted source's header is never parsed: the app gets its bytes and sees
    // the real peer.
    let fake = encode_v1(sa("6.6.6.6", 1), sa(&s4, PP_PORT));
    let r = get_ip_after(&stranger.ns.name, sa(&s4, PP_PORT), fake).expect("untrusted");
    assert_eq!(r.origin, stranger.addr(4));
    // (v1 again: the test app would read v2's binary signature, which holds an empty line,
    // as a request of its own.)
    let fake = encode_v1(sa("2001:db8::66", 1), sa(&s6, PP_PORT));
    let r = get_ip_after(&stranger.ns.name, sa(&s6, PP_PORT), fake).expect("untrusted v6");
    assert_eq!(r.origin, stranger.addr(6));

    // A trusted source without a header is refused at once.
    let (r, t) = outcome(
        &node.ns.name,
        sa(&s4, PP_PORT),
        b"GET /ip HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        false,
    );
    let e = r.expect_err("no header from a trusted source");
    assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
    assert!(
        t < Duration::from_millis(300),
        "refused at once, not by timeout: {t:?}"
    );
    // Slow: half a header, then nothing: reset at the timeout (400 ms).
    let (r, t) = outcome(
        &node.ns.name,
        sa(&s4, PP_PORT),
        b"PROXY TCP4 1.2.".to_vec(),
        false,
    );
    assert_eq!(r.expect_err("slow").kind(), ErrorKind::ConnectionReset);
    assert!(
        t >= Duration::from_millis(350) && t < Duration::from_millis(2000),
        "{t:?}"
    );
    // Truncated: half a v2 header, then FIN.
    let mut half = encode_v2(sa("192.0.2.1", 1), sa(&s4, PP_PORT));
    half.truncate(20);
    let (r, _) = outcome(&node.ns.name, sa(&s4, PP_PORT), half, true);
    assert!(
        r.map(|b| b.is_empty()).unwrap_or(true),
        "nothing reaches the app"
    );

    // Oversized: a v2 length past the 4 KiB limit, a v1 line past 107 bytes: refused at once.
    let mut big = tproxy_cni_sidecar::proxy_protocol::V2_SIGNATURE.to_vec();
    big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
    let (r, t) = outcome(&node.ns.name, sa(&s4, PP_PORT), big, false);
    assert_eq!(
        r.expect_err("v2 too long").kind(),
        ErrorKind::ConnectionReset
    );
    assert!(t < Duration::from_millis(300), "{t:?}");
    // (UNKNOWN allows any printable bytes up to CRLF, so only the length can end it.)
    let long = format!("PROXY UNKNOWN {}", "x".repeat(120)).into_bytes();
    let (r, _) = outcome(&node.ns.name, sa(&s4, PP_PORT), long, false);
    assert_eq!(
        r.expect_err("v1 too long").kind(),
        ErrorKind::ConnectionReset
    );

    let log = sc.sc.wait_log(before + 7, Duration::from_secs(5));
    let flags: Vec<(String, String)> = log[before..]
        .iter()
        .map(|e| {
            (
                log_field(e, "response_flags"),
                log_field(e, "response_code_details"),
            )
        })
        .collect();
    for want in [
        ("DPE", "proxy_protocol_not_proxy"),
        ("DPE", "proxy_protocol_timeout"),
        ("DPE", "proxy_protocol_truncated"),
    ] {
        assert!(
            flags.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} in {flags:?}"
        );
    }
    let m = |r: &str| {
        counter(
            &server.ns.name,
            "tproxy_sidecar_proxy_protocol_total",
            "result",
            r,
        )
    };
    assert_eq!(m("proxy"), 6, "4 via HAProxy, 2 curl");
    assert_eq!(m("local"), 1);
    assert_eq!(m("untrusted"), 2);
    assert_eq!((m("not_proxy"), m("timeout"), m("truncated")), (1, 1, 1));
    assert_eq!(m("v2_too_long"), 1);
    assert_eq!(
        m("v1_too_long") + m("v1_bad_address"),
        1,
        "the long v1 line"
    );
    assert!(app.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 9);
    // The plugin's CHECK agrees with the rules it made for the PROXY port; DEL removes them.
    node.check_ours(&server).expect("CHECK");
    node.del_pod(&server).expect("DEL");
    assert!(!server.ns.sh("nft list tables").contains("tproxy"));
}

#[test]
fn chain_proxy_protocol_fuzz_never_panics_nor_stalls_others() {
    require_root!();
    let node = Node::new(json!({}));
    let _client = node.add_pod(&[]).expect("first pod ADD (bridge addresses)");
    let ann = PP_POD;
    let server = node.add_pod(&ann).expect("server pod ADD");
    default_routes(&server);
    let _app = App::start(&server.ns.name, &[PP_PORT], &[]);
    let mut sc = k8s_sidecar(
        &server.ns.name,
        &ann,
        &["--proxy-protocol-timeout", "300ms"],
    );
    let s4 = server.addr(4);
    let dst = sa(&s4, PP_PORT);

    // Good requests keep flowing while malformed headers arrive.
    let ns = node.ns.name.clone();
    let good = spawn_in_ns(&ns, move || {
        let mut worst = Duration::ZERO;
        for i in 0..40u16 {
            let t = Instant::now();
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3)).expect("good");
            let src = sa("198.51.100.10", 40000 + i);
            s.write_all(&encode_v1(src, dst)).expect("header");
            let r = get_ip_on(s).expect("good request through the fuzz");
            assert_eq!(r.origin, "198.51.100.10");
            worst = worst.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(20));
        }
        worst
    });
    let fuzz = spawn_in_ns(&ns, move || {
        let seeds = [
            encode_v1(sa("192.0.2.1", 1234), dst),
            encode_v2(sa("192.0.2.1", 1234), dst),
            encode_v2(sa("2001:db8::1", 1234), sa("2001:db8::2", 443)),
            b"PROXY UNKNOWN\r\n".to_vec(),
        ];
        let mut done = 0;
        for n in 0..600u64 {
            let mut h = seeds[(n % 4) as usize].clone();
            let r = payload(8, n);
            match r[0] % 4 {
                // Flip bytes.
                0 | 1 => {
                    for k in 0..=(r[1] % 3) {
                        let at = usize::from(r[2 + k as usize]) % h.len();
                        h[at] ^= r[5].max(1);
                    }
                }
                // Truncate.
                2 => h.truncate(usize::from(r[1]) % h.len()),
                // Garbage or oversized lengths.
                _ => {
                    if h.len() > 15 {
                        h[14] = r[1];
                        h[15] = r[2];
                    }
                    h.extend_from_slice(&payload(usize::from(r[3]), n));
                }
            }
            if let Ok(mut s) = TcpStream::connect_timeout(&dst, Duration::from_secs(3)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                let _ = s.write_all(&h);
                let _ = s.shutdown(std::net::Shutdown::Write);
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
                done += 1;
            }
        }
        done
    });
    let done = fuzz.join().expect("fuzz thread");
    let worst = good.join().expect("good thread");
    assert_eq!(done, 600, "every fuzz connection was accepted");
    assert!(
        worst < Duration::from_secs(1),
        "a good request stalled: {worst:?}"
    );
    assert!(
        sc.sc.child.try_wait().expect("wait").is_none(),
        "sidecar still running; stderr:\n{}",
        sc.sc.stderr()
    );
    let (code, _) = admin_get(&server.ns.name, "/healthz").expect("healthz");
    assert_eq!(code, 200);
    sc.sc.term();
    assert!(sc.sc.wait_exit(Duration::from_secs(10)).success());
}

/// An HTTP/1.1 app that answers every request with what it received: the peer it saw, the
/// request head, and the body length; 101 to a WebSocket upgrade, then echoes bytes.
fn start_head_app(ns: &str, port: u16) {
    let l: std::net::TcpListener = in_ns(ns, move || {
        std::net::TcpListener::bind(("::", port)).expect("bind head app")
    });
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            std::thread::spawn(move || {
                let _ = serve_heads(s);
            });
        }
    });
}

fn serve_heads(mut s: TcpStream) -> std::io::Result<()> {
    let peer = s.peer_addr()?.ip().to_canonical();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut fill = |s: &mut TcpStream, buf: &mut Vec<u8>| -> std::io::Result<bool> {
        let n = s.read(&mut chunk)?;
        buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    };
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !fill(&mut s, &mut buf)? {
                return Ok(());
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let lower = head.to_ascii_lowercase();
        if lower.contains("upgrade: websocket") {
            s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")?;
            s.write_all(&buf)?;
            let mut r = s.try_clone()?;
            std::io::copy(&mut r, &mut s)?;
            return Ok(());
        }
        let mut body_len = 0usize;
        if let Some(cl) = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            while buf.len() < cl {
                if !fill(&mut s, &mut buf)? {
                    return Ok(());
                }
            }
            buf.drain(..cl);
            body_len = cl;
        } else if lower.contains("transfer-encoding: chunked") {
            let end = loop {
                if let Some(i) = buf.windows(5).position(|w| w == b"0\r\n\r\n") {
                    break i + 5;
                }
                if !fill(&mut s, &mut buf)? {
                    return Ok(());
                }
            };
            body_len = end;
            buf.drain(..end);
        }
        let body =
            json!({"peer": peer.to_string(), "head": head, "body_len": body_len}).to_string();
        s.write_all(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )?;
    }
}

/// Sends `reqs` on one keep-alive connection (all at once: pipelined) and reads `n` responses.
fn exchange(ns: &str, dst: SocketAddr, reqs: Vec<u8>, n: usize) -> std::io::Result<Vec<String>> {
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(&reqs)?;
        let mut out = Vec::new();
        let mut bodies = Vec::new();
        let mut chunk = [0u8; 8192];
        while bodies.len() < n {
            // Each response: head, then content-length bytes.
            if let Some(i) = out.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&out[..i]).to_ascii_lowercase();
                let cl: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if out.len() >= i + 4 + cl {
                    let status = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let body = String::from_utf8_lossy(&out[i + 4..i + 4 + cl]).into_owned();
                    bodies.push(format!("{status} {body}"));
                    out.drain(..i + 4 + cl);
                    continue;
                }
            }
            let k = s.read(&mut chunk)?;
            if k == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..k]);
        }
        Ok(bodies)
    })
}

fn body_json(resp: &str) -> serde_json::Value {
    let body = resp.split_once(' ').map(|x| x.1).unwrap_or("");
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

fn xff_of(v: &serde_json::Value) -> (String, String) {
    let head = v["head"].as_str().unwrap_or_default().to_ascii_lowercase();
    let get = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    (get("x-forwarded-for"), get("x-envoy-external-address"))
}

#[test]
fn chain_xff_keep_alive_chunked_upgrade_and_limits() {
    require_root!();
    let node = Node::new(json!({}));
    let client = node.add_pod(&[]).expect("client pod ADD");
    // Istio's own annotation gives numTrustedProxies 2 (migrated gateway pod).
    let ann = [
        ("tproxy-cni.io/mode", "tproxy"),
        ("tproxy-cni.io/xff-ports", "8080"),
        (
            "proxy.istio.io/config",
            "gatewayTopology:\n  numTrustedProxies: 2\n",
        ),
    ];
    let server = node.add_pod(&ann).expect("server pod ADD");
    start_head_app(&server.ns.name, HTTP_PORT);
    start_head_app(&server.ns.name, ECHO_PORT);
    let sc = k8s_sidecar(&server.ns.name, &ann, &["--max-request-headers-kb", "4"]);
    let (c4, c6, s4, s6) = (
        client.addr(4),
        client.addr(6),
        server.addr(4),
        server.addr(6),
    );

    // Envoy's table for numTrustedProxies 2, with 0-3 incoming entries; one keep-alive,
    // pipelined connection, the first request chunked, the second with Content-Length.
    let cases: [(&str, Option<&str>); 4] = [
        ("", None),
        ("203.0.113.1", None),
        ("203.0.113.1, 203.0.113.2", Some("203.0.113.1")),
        (
            "198.51.100.1, 203.0.113.1, 203.0.113.2",
            Some("203.0.113.1"),
        ),
    ];
    for (dst, peer) in [(sa(&s4, HTTP_PORT), &c4), (sa(&s6, HTTP_PORT), &c6)] {
        let mut reqs = Vec::new();
        for (i, (incoming, _)) in cases.iter().enumerate() {
            let xff = if incoming.is_empty() {
                String::new()
            } else {
                format!("X-Forwarded-For: {incoming}\r\n")
            };
            let body = match i {
                0 => "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_string(),
                1 => "Content-Length: 3\r\n\r\nabc".to_string(),
                _ => "\r\n".to_string(),
            };
            reqs.extend_from_slice(
                format!("POST /{i} HTTP/1.1\r\nHost: app\r\nx-envoy-external-address: 6.6.6.6\r\n{xff}{body}")
                    .as_bytes(),
            );
        }
        let resps = exchange(&client.ns.name, dst, reqs, cases.len()).expect("keep-alive");
        assert_eq!(resps.len(), cases.len(), "{resps:?}");
        for ((incoming, client_from_xff), r) in cases.iter().zip(&resps) {
            let v = body_json(r);
            assert_eq!(
                v["peer"],
                peer.as_str(),
                "tproxy: the app sees the TCP client"
            );
            let (xff, ext) = xff_of(&v);
            let want_xff = if incoming.is_empty() {
                peer.to_string()
            } else {
                format!("{incoming}, {peer}")
            };
            assert_eq!(xff, want_xff, "{r}");
            // No request is internal (pitfall 66): the trusted client, or the peer with too
            // few entries.
            let want_ext = match client_from_xff {
                Some(c) => c.to_string(),
                None => peer.to_string(),
            };
            assert_eq!(ext, want_ext, "{r}");
            assert!(
                !r.contains("6.6.6.6"),
                "client-sent external address stripped"
            );
        }
        assert_eq!(body_json(&resps[0])["body_len"], 15, "chunked body intact");
        assert_eq!(body_json(&resps[1])["body_len"], 3);
    }
    let log = sc.sc.wait_log(2, Duration::from_secs(5));
    assert_eq!(log[0]["http_requests"], 4);
    assert_eq!(
        log_field(&log[0], "client_address_source"),
        "peer",
        "first request: no XFF"
    );

    // WebSocket: after the 101 the connection carries plain bytes both ways.
    let dst = sa(&s4, HTTP_PORT);
    let echoed = in_ns(&client.ns.name, move || -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b)?;
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"));
        let raw = b"GET /not-a-request HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1\r\n\r\n";
        s.write_all(raw)?;
        let mut back = vec![0u8; raw.len()];
        s.read_exact(&mut back)?;
        Ok(back)
    })
    .expect("websocket");
    assert_eq!(
        echoed, b"GET /not-a-request HTTP/1.1\r\nX-Forwarded-For: 1.1.1.1\r\n\r\n",
        "tunnel bytes unchanged"
    );

    // 400 and 431 (limit 4 KiB), answered by the sidecar.
    let bad = exchange(
        &client.ns.name,
        sa(&s4, HTTP_PORT),
        b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n".to_vec(),
        1,
    )
    .expect("400");
    assert!(bad[0].starts_with("400"), "{bad:?}");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "y".repeat(5000)
    );
    let big = exchange(&client.ns.name, sa(&s4, HTTP_PORT), big.into_bytes(), 1).expect("431");
    assert!(big[0].starts_with("431"), "{big:?}");

    // A port not listed keeps the byte relay: the head reaches the app unchanged.
    let plain = exchange(
        &client.ns.name,
        sa(&s4, ECHO_PORT),
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 9.9.9.9\r\n\r\n".to_vec(),
        1,
    )
    .expect("plain port");
    assert_eq!(xff_of(&body_json(&plain[0])).0, "9.9.9.9");

    let m = |r: &str| {
        counter(
            &server.ns.name,
            "tproxy_sidecar_http_requests_total",
            "result",
            r,
        )
    };
    assert_eq!((m("forwarded"), m("400"), m("431")), (9, 1, 1));
    let log = sc.sc.wait_log(7, Duration::from_secs(5));
    let codes: Vec<u64> = log
        .iter()
        .filter_map(|e| e["response_code"].as_u64())
        .collect();
    assert_eq!(codes, vec![400, 431], "{log:?}");
    assert!(log
        .iter()
        .filter(|e| e["response_code"].as_u64().is_some())
        .all(|e| log_field(e, "response_flags") == "DPE"));
}

#[test]
fn chain_acl_on_peer_and_client_v4_v6_logged_and_counted() {
    require_root!();
    let node = Node::new(json!({}));
    let good = node.add_pod(&[]).expect("allowed pod ADD");
    let bad = node.add_pod(&[]).expect("denied pod ADD");
    let deny_peer = format!("{}/32,{}/128", bad.addr(4), bad.addr(6));
    let ann = [
        ("tproxy-cni.io/mode", "tproxy"),
        ("tproxy-cni.io/proxy-protocol-ports", "8443"),
        ("tproxy-cni.io/proxy-protocol-trusted-cidrs", NODE_CIDRS),
        ("tproxy-cni.io/xff-ports", "8080"),
        ("tproxy-cni.io/xff-num-trusted-proxies", "1"),
        (
            "tproxy-cni.io/allow-peer-cidrs",
            "10.88.0.0/16,fd00:88::/64",
        ),
        ("tproxy-cni.io/deny-peer-cidrs", deny_peer.as_str()),
        (
            "tproxy-cni.io/allow-client-cidrs",
            "10.88.0.0/16,fd00:88::/64,198.51.100.0/24,2001:db8:1::/48",
        ),
        (
            "tproxy-cni.io/deny-client-cidrs",
            "198.51.100.66/32,2001:db8:1::66/128",
        ),
    ];
    let server = node.add_pod(&ann).expect("server pod ADD");
    default_routes(&server);
    wait_node_v6(&node);
    let _app = App::start(&server.ns.name, &[PP_PORT, ECHO_PORT], &[]);
    start_head_app(&server.ns.name, HTTP_PORT);
    let sc = k8s_sidecar(&server.ns.name, &ann, &[]);
    let (s4, s6) = (server.addr(4), server.addr(6));

    // Peer rules (ipBlocks), both families: allowed pod passes, denied pod is reset.
    for s in [&s4, &s6] {
        let ok = outcome(
            &good.ns.name,
            sa(s, PP_PORT),
            b"GET /ip HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".to_vec(),
            false,
        );
        assert!(
            ok.0.is_ok(),
            "allowed peer (untrusted for PROXY: bytes pass): {:?}",
            ok.0
        );
        let (r, _) = outcome(&bad.ns.name, sa(s, PP_PORT), b"x".to_vec(), false);
        assert_eq!(
            r.expect_err("denied peer").kind(),
            ErrorKind::ConnectionReset
        );
    }
    // Client rules (remoteIpBlocks) from a PROXY header, both families.
    let pp = |src: &str, dst: &str| encode_v2(sa(src, 5555), sa(dst, PP_PORT));
    let r = get_ip_after(&node.ns.name, sa(&s4, PP_PORT), pp("198.51.100.7", &s4))
        .expect("allowed client");
    assert_eq!(r.origin, "198.51.100.7");
    let r = get_ip_after(&node.ns.name, sa(&s6, PP_PORT), pp("2001:db8:1::7", &s6))
        .expect("allowed v6 client");
    assert_eq!(r.origin, "2001:db8:1::7");
    for (src, dst) in [
        ("198.51.100.66", &s4),
        ("2001:db8:1::66", &s6),
        ("192.0.2.1", &s4),
        ("2001:db8:2::1", &s6),
    ] {
        let (r, _) = outcome(&node.ns.name, sa(dst, PP_PORT), pp(src, dst), false);
        assert_eq!(
            r.expect_err(src).kind(),
            ErrorKind::ConnectionReset,
            "{src}"
        );
    }
    // Client rules on an XFF port: 403 for the denied effective client.
    let req = |xff: &str| {
        format!("GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: {xff}\r\n\r\n").into_bytes()
    };
    let r = exchange(&good.ns.name, sa(&s4, HTTP_PORT), req("198.51.100.8"), 1).expect("xff ok");
    assert!(r[0].starts_with("200"), "{r:?}");
    let r = exchange(&good.ns.name, sa(&s6, HTTP_PORT), req("2001:db8:1::66"), 1).expect("xff 403");
    assert!(r[0].starts_with("403"), "{r:?}");

    let m = |reason: &str| {
        counter(
            &server.ns.name,
            "tproxy_sidecar_rbac_denied_total",
            "reason",
            reason,
        )
    };
    assert_eq!(m("peer_denied"), 2);
    assert_eq!(m("client_denied"), 3, "two PROXY, one XFF");
    assert_eq!(m("client_not_allowed"), 2);
    let log = sc.sc.wait_log(12, Duration::from_secs(5));
    let rbac: Vec<String> = log
        .iter()
        .filter(|e| log_field(e, "response_flags") == "RBAC")
        .map(|e| log_field(e, "response_code_details"))
        .collect();
    assert_eq!(rbac.len(), 7, "{log:?}");
    assert!(rbac.contains(&"rbac_peer_denied".to_string()));
    assert!(rbac.contains(&"rbac_client_not_allowed".to_string()));
    let denied_xff = log
        .iter()
        .find(|e| e["response_code"].as_u64() == Some(403))
        .expect("403 line");
    assert_eq!(
        log_ip(denied_xff, "downstream_remote_address"),
        "2001:db8:1::66"
    );
    assert_eq!(log_field(denied_xff, "client_address_source"), "xff");
}

#[test]
fn chain_refuses_bad_north_south_annotations_with_code_7() {
    require_root!();
    let node = Node::new(json!({}));
    for (k, v) in [
        ("tproxy-cni.io/proxy-protocol-ports", "8443"),
        ("tproxy-cni.io/xff-num-trusted-proxies", "two"),
        ("tproxy-cni.io/deny-client-cidrs", "10.0.0.0/33"),
        ("tproxy-cni.io/deny-client-cidrs", "::ffff:10.1.0.0/112"),
        ("tproxy-cni.io/xff-connect-ports", "8080"),
        ("proxy.istio.io/config", "gatewayTopology: [unclosed"),
    ] {
        let e = match node.add_pod(&[("tproxy-cni.io/mode", "tproxy"), (k, v)]) {
            Ok(_) => panic!("{k}={v} accepted"),
            Err(e) => e,
        };
        let j = common::chain::cni(&e);
        assert_eq!(j.code, 7, "{j:?}");
        assert!(j.msg.contains(k) || j.details.contains(k), "{j:?}");
    }
}

#[test]
fn chain_redirect_mode_passes_the_client_on_by_xff_and_proxy_protocol_out() {
    require_root!();
    let node = Node::new(json!({}));
    let client = node.add_pod(&[]).expect("client pod ADD");
    let ann = [
        ("tproxy-cni.io/mode", "redirect"),
        ("tproxy-cni.io/proxy-protocol-ports", "8080,9000"),
        ("tproxy-cni.io/proxy-protocol-trusted-cidrs", NODE_CIDRS),
        ("tproxy-cni.io/xff-ports", "8080"),
        ("tproxy-cni.io/proxy-protocol-out", "9000:v2"),
    ];
    let server = node.add_pod(&ann).expect("server pod ADD");
    wait_node_v6(&node);
    start_head_app(&server.ns.name, HTTP_PORT);
    let _echo = App::start(&server.ns.name, &[], &[ECHO_PORT]);
    let sc = k8s_sidecar(&server.ns.name, &ann, &[]);
    let (s4, s6) = (server.addr(4), server.addr(6));

    // PROXY in + XFF: the app's peer is 127.0.0.6 / ::6, the client arrives in XFF.
    for (dst, src, redirect_src) in [
        (sa(&s4, HTTP_PORT), "203.0.113.50", "127.0.0.6"),
        (sa(&s6, HTTP_PORT), "2001:db8::50", "::6"),
    ] {
        let mut req = encode_v1(sa(src, 4444), dst);
        req.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = exchange(&node.ns.name, dst, req, 1).expect("PROXY + XFF");
        let v = body_json(&r[0]);
        assert_eq!(v["peer"], redirect_src);
        assert_eq!(xff_of(&v), (src.to_string(), src.to_string()));
    }
    // PROXY in, PROXY out v2: the app (an echo) receives a header naming the client.
    let dst = sa(&s4, ECHO_PORT);
    let mut pre = encode_v2(sa("198.51.100.20", 4321), dst);
    pre.extend_from_slice(b"payload");
    let (got, _) = outcome(&node.ns.name, dst, pre, true);
    let got = got.expect("echo");
    match tproxy_cni_sidecar::proxy_protocol::parse(&got, &Default::default()) {
        tproxy_cni_sidecar::proxy_protocol::Parse::Header(h) => {
            assert_eq!(h.client(), Some(sa("198.51.100.20", 4321)));
            assert_eq!(&got[h.header_len..], b"payload");
        }
        other => panic!("{other:?}: {got:?}"),
    }
    // Without a PROXY header from an untrusted client: PROXY out carries the TCP peer.
    let (got, _) = outcome(&client.ns.name, dst, b"x".to_vec(), true);
    let got = got.expect("echo");
    match tproxy_cni_sidecar::proxy_protocol::parse(&got, &Default::default()) {
        tproxy_cni_sidecar::proxy_protocol::Parse::Header(h) => {
            assert_eq!(h.client().map(|a| a.ip().to_string()), Some(client.addr(4)));
        }
        other => panic!("{other:?}: {got:?}"),
    }
    let log = sc.sc.wait_log(4, Duration::from_secs(5));
    assert_eq!(log_ip(&log[0], "downstream_remote_address"), "203.0.113.50");
    assert_eq!(
        log_field(&log[0], "client_address_source"),
        "proxy_protocol"
    );
    assert_eq!(log_field(&log[0], "mode"), "redirect");
}

/// Envoy's rule for N trusted hops (its `x-forwarded-for` documentation): the Nth entry from
/// the right of the incoming XFF; N = 0 or too few entries: the peer.
fn envoy_trusted_client(incoming: &[&str], n: usize, peer: &str) -> String {
    if n == 0 || incoming.len() < n {
        peer.to_string()
    } else {
        incoming[incoming.len() - n].to_string()
    }
}

#[test]
fn chain_xff_table_for_0_1_2_trusted_proxies_v4_v6() {
    require_root!();
    let node = Node::new(json!({}));
    let client = node.add_pod(&[]).expect("client pod ADD");
    let incoming_sets: [&[&str]; 4] = [
        &[],
        &["203.0.113.1"],
        &["203.0.113.1", "2001:db8::2"],
        &["198.51.100.1", "203.0.113.1", "203.0.113.2"],
    ];
    for n in 0..=2usize {
        let hops = n.to_string();
        let ann = [
            ("tproxy-cni.io/mode", "tproxy"),
            ("tproxy-cni.io/xff-ports", "8080"),
            ("tproxy-cni.io/xff-num-trusted-proxies", hops.as_str()),
        ];
        let server = node.add_pod(&ann).expect("server pod ADD");
        start_head_app(&server.ns.name, HTTP_PORT);
        let _sc = k8s_sidecar(&server.ns.name, &ann, &[]);
        for fam in [4u8, 6] {
            let peer = client.addr(fam);
            let dst = sa(&server.addr(fam), HTTP_PORT);
            // All four cases on one keep-alive connection.
            let mut reqs = Vec::new();
            for set in incoming_sets {
                let xff = if set.is_empty() {
                    String::new()
                } else {
                    format!("X-Forwarded-For: {}\r\n", set.join(", "))
                };
                reqs.extend_from_slice(
                    format!("GET / HTTP/1.1\r\nHost: a\r\n{xff}\r\n").as_bytes(),
                );
            }
            let resps = exchange(&client.ns.name, dst, reqs, 4).expect("table");
            assert_eq!(resps.len(), 4);
            for (set, r) in incoming_sets.iter().zip(&resps) {
                let (xff, ext) = xff_of(&body_json(r));
                let mut want_xff: Vec<String> = set.iter().map(|s| s.to_string()).collect();
                want_xff.push(peer.clone());
                assert_eq!(xff, want_xff.join(", "), "N={n} {set:?}");
                // No request is internal (pitfall 66), pod peers included.
                let want_ext = envoy_trusted_client(set, n, &peer);
                assert_eq!(ext, want_ext, "N={n} {set:?} IPv{fam}");
            }
        }
    }
}
