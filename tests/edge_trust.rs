//! The north-south edge treats client bytes as hostile, through the real chain (bridge +
//! host-local + tproxy-cni) and the real sidecar in `auto` mode, started as Kubernetes starts
//! it (uid 1337, NET_RAW from the binary's file capability, no ambient capabilities).
//!
//! The app is Python's standard library, standing in for an ordinary app:
//! - `http.server` (HTTP/1.1, keep-alive) answers CONNECT with 200 and stays in HTTP, as a Go
//!   `net/http` server with a `HandleFunc("/")` does (Go is not installed here; Go would also
//!   answer 200). It answers `Upgrade: h2c` with 101 as an h2c-capable server would (then it
//!   closes instead of speaking HTTP/2), and reports the head, the trailers and the peer it saw.
//! - `wsgiref` (the standard WSGI server) reports the WSGI environ, where `X_Forwarded_For` and
//!   `X-Forwarded-For` are the same variable.
//!
//! Each check here failed on the code before the edge rules (CONNECT got the app's 200 and the
//! next request reached it unrewritten; the app saw `Upgrade: h2c`, the client's
//! `X-Envoy-Internal`, `X-Forwarded-Proto: https`, the WSGI variable with the forged value, the
//! trailers; the log of a keep-alive 403 named the earlier request's client; a PROXY header's
//! loopback, pod or broadcast client went on in X-Forwarded-For; PROXY-out is checked the same
//! way).

mod common;
mod sidecar_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::chain::{Node, Pod};
use common::tools::have_tool;
use serde_json::{json, Value};
use sidecar_support::*;
use tproxy_cni_sidecar::proxy_protocol::{encode_v1, parse, Parse};

const NODE_V4: &str = "10.88.0.1";
const NODE_V6: &str = "fd00:88::1";
/// The pod network's directed broadcast (host-local's 10.88.0.0/16).
const POD_BROADCAST: &str = "10.88.255.255";
/// Ports of the server pod: the http.server app (XFF), the WSGI app (XFF), the http.server app
/// on a port that opted in to CONNECT, and a PROXY protocol + XFF port.
const APP: u16 = 8080;
const WSGI: u16 = 8081;
const CONNECT_OK: u16 = 8082;
const PP: u16 = 8443;

const APP_PY: &str = r#"
import json, socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from wsgiref.simple_server import make_server, WSGIRequestHandler

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def any(self):
        trailers, body = [], b""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
            while True:
                line = self.rfile.readline()
                if line in (b"\r\n", b""):
                    break
                trailers.append(line.decode("latin1").strip())
        elif self.headers.get("Content-Length"):
            body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Upgrade", "").lower() == "h2c":
            self.send_response(101)
            self.send_header("Connection", "Upgrade")
            self.send_header("Upgrade", "h2c")
            self.end_headers()
            self.close_connection = True
            return
        peer = self.client_address[0].removeprefix("::ffff:")
        out = json.dumps({"peer": peer, "method": self.command,
                          "path": self.path, "headers": [[k, v] for k, v in self.headers.items()],
                          "trailers": trailers, "body": body.decode("latin1")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    do_GET = do_POST = do_CONNECT = any
    def log_message(self, *a):
        pass

def wsgi(environ, start):
    out = json.dumps({k: environ.get(k) for k in (
        "REMOTE_ADDR", "HTTP_X_FORWARDED_FOR", "HTTP_X_ENVOY_EXTERNAL_ADDRESS",
        "HTTP_X_ENVOY_INTERNAL", "HTTP_X_FORWARDED_PROTO")}).encode()
    start("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))])
    return [out]

class Quiet(WSGIRequestHandler):
    def log_message(self, *a):
        pass

class Dual(ThreadingHTTPServer):
    address_family = socket.AF_INET6

for port in sys.argv[2:]:
    s = Dual(("::", int(port)), H)
    threading.Thread(target=s.serve_forever, daemon=True).start()
make_server("0.0.0.0", int(sys.argv[1]), wsgi, handler_class=Quiet).serve_forever()
"#;

/// The Python apps in `ns`; killed on drop (the script file lives as long).
struct PyApp {
    child: Child,
    _script: tempfile::NamedTempFile,
}

impl Drop for PyApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn py_app(ns: &str, addr: &str) -> PyApp {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(APP_PY.as_bytes()).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "python3"])
        .arg(f.path())
        .args([WSGI, APP, CONNECT_OK, PP].map(|p| p.to_string()))
        .stdout(Stdio::null())
        .spawn()
        .expect("python3");
    let app = PyApp { child, _script: f };
    let t = Instant::now();
    for port in [WSGI, APP, CONNECT_OK, PP] {
        let dst = sa(addr, port);
        while in_ns(ns, move || TcpStream::connect(dst).is_err()) {
            assert!(t.elapsed() < Duration::from_secs(10), "app on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    app
}

/// Sends `bytes` from `ns` to `dst` and reads until the peer closes (or 5 s pass).
fn send(ns: &str, dst: SocketAddr, bytes: Vec<u8>) -> String {
    in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&bytes).unwrap();
        let mut out = Vec::new();
        let mut chunk = [0u8; 8192];
        // A timeout ends the read: the app keeps an HTTP/1.1 connection open.
        while let Ok(n) = s.read(&mut chunk) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..n]);
            if String::from_utf8_lossy(&out).matches("\r\n\r\n").count() >= 8 {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    })
}

/// The JSON bodies of the responses in `raw`.
fn bodies(raw: &str) -> Vec<Value> {
    raw.split("\r\n\r\n")
        .skip(1)
        .filter_map(|b| {
            let end = b.find("HTTP/1.").unwrap_or(b.len());
            serde_json::from_str(&b[..end]).ok()
        })
        .collect()
}

/// The values of header `name` (case-insensitive) the http.server app saw.
fn seen(v: &Value, name: &str) -> Vec<String> {
    v["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h[0].as_str().unwrap_or("").eq_ignore_ascii_case(name))
        .map(|h| h[1].as_str().unwrap_or("").to_string())
        .collect()
}

fn server_pod(node: &Node, lb: &Pod) -> (Pod, Vec<(&'static str, String)>) {
    let ann: Vec<(&'static str, String)> = vec![
        ("tproxy-cni.io/mode", "tproxy".into()),
        (
            "tproxy-cni.io/xff-ports",
            format!("{APP},{WSGI},{CONNECT_OK},{PP}"),
        ),
        ("tproxy-cni.io/xff-connect-ports", CONNECT_OK.to_string()),
        // The balancer pod is the trusted proxy; the client pod is not.
        (
            "tproxy-cni.io/xff-trusted-cidrs",
            format!("{}/32", lb.addr(4)),
        ),
        ("tproxy-cni.io/deny-client-cidrs", "203.0.113.0/24".into()),
        (
            "tproxy-cni.io/proxy-protocol-ports",
            format!("{PP},{ECHO_PORT}"),
        ),
        (
            "tproxy-cni.io/proxy-protocol-out",
            format!("{ECHO_PORT}:v2"),
        ),
        (
            "tproxy-cni.io/proxy-protocol-trusted-cidrs",
            format!("{NODE_V4}/32,{NODE_V6}/128"),
        ),
    ];
    let refs: Vec<(&str, &str)> = ann.iter().map(|(k, v)| (*k, v.as_str())).collect();
    (node.add_pod(&refs).expect("server pod ADD"), ann)
}

#[test]
fn chain_edge_refuses_what_clients_forge() {
    require_root!();
    if !have_tool("python3", "--version") {
        return;
    }
    let node = Node::new(json!({}));
    let client = node.add_pod(&[]).expect("client pod ADD");
    let lb = node.add_pod(&[]).expect("balancer pod ADD");
    let (server, ann) = server_pod(&node, &lb);
    // Clients outside the pod network need the pod's default route (pitfall 50).
    server
        .ns
        .sh(&format!("ip route replace default via {NODE_V4}"));
    let s4 = server.addr(4);
    let c4 = client.addr(4);
    let _app = py_app(&server.ns.name, &s4);
    let _echo = App::start(&server.ns.name, &[], &[ECHO_PORT]);
    let refs: Vec<(&str, &str)> = ann.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let file = downward_api(&refs);
    let path = file.path().display().to_string();
    let sc = Sidecar::spawn_as_proxy(
        &server.ns.name,
        &["--mode", "auto", "--annotations-file", &path],
    );
    sc.wait_ready();
    let mut logged = 0;

    // CONNECT on a port that did not opt in: 403 from the sidecar; the request after it never
    // reaches the app (before: the app's 200, then raw relaying of a forged request).
    let out = send(
        &client.ns.name,
        sa(&s4, APP),
        b"CONNECT / HTTP/1.1\r\nHost: a\r\n\r\nGET /after HTTP/1.1\r\nHost: a\r\nx-envoy-external-address: 6.6.6.6\r\n\r\n"
            .to_vec(),
    );
    assert!(out.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{out}");
    assert!(!out.contains("6.6.6.6") && bodies(&out).is_empty(), "{out}");
    logged += 1;
    // On the port that opted in, the app gets it.
    let out = send(
        &client.ns.name,
        sa(&s4, CONNECT_OK),
        b"CONNECT / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".to_vec(),
    );
    let b = bodies(&out);
    assert_eq!(
        b.first().map(|v| v["method"].clone()),
        Some(json!("CONNECT")),
        "{out}"
    );
    logged += 1;

    // h2c: the app never sees the upgrade (before: 101 and a raw tunnel).
    let out = send(
        &client.ns.name,
        sa(&s4, APP),
        b"GET /h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nConnection: close\r\n\r\n"
            .to_vec(),
    );
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let v = &bodies(&out)[0];
    assert!(
        seen(v, "upgrade").is_empty() && seen(v, "http2-settings").is_empty(),
        "{v}"
    );
    logged += 1;

    // From an untrusted client: x-envoy-internal removed, x-forwarded-proto is http, trailers
    // dropped, and the underscore aliases gone.
    let out = send(
        &client.ns.name,
        sa(&s4, APP),
        b"POST /t HTTP/1.1\r\nHost: a\r\nX-Envoy-Internal: true\r\nX-Forwarded-Proto: https\r\nX_Envoy_External_Address: 6.6.6.6\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\nX-Forwarded-For: 6.6.6.7\r\nx-envoy-external-address: 6.6.6.8\r\n\r\n"
            .to_vec(),
    );
    let v = &bodies(&out)[0];
    assert_eq!(v["body"], "abc");
    assert_eq!(v["trailers"], json!([]), "{v}");
    assert!(seen(v, "x-envoy-internal").is_empty(), "{v}");
    assert_eq!(seen(v, "x-forwarded-proto"), vec!["http"]);
    assert_eq!(seen(v, "x-envoy-external-address"), vec![c4.clone()]);
    assert!(!v.to_string().contains("6.6.6."), "{v}");
    logged += 1;
    // A trusted balancer's https is kept.
    let out = send(
        &lb.ns.name,
        sa(&s4, APP),
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Proto: https\r\nX-Forwarded-For: 198.51.100.9\r\nConnection: close\r\n\r\n"
            .to_vec(),
    );
    let v = &bodies(&out)[0];
    assert_eq!(seen(v, "x-forwarded-proto"), vec!["https"]);
    assert_eq!(seen(v, "x-envoy-external-address"), vec!["198.51.100.9"]);
    logged += 1;

    // WSGI folds `_` into `-`: the app's variable holds only the sidecar's value.
    let out = send(
        &client.ns.name,
        sa(&s4, WSGI),
        b"GET / HTTP/1.1\r\nHost: a\r\nX_Envoy_External_Address: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.7\r\nX_Envoy_Internal: true\r\n\r\n"
            .to_vec(),
    );
    let v = &bodies(&out)[0];
    assert_eq!(v["HTTP_X_ENVOY_EXTERNAL_ADDRESS"], c4.as_str(), "{v}");
    assert_eq!(v["HTTP_X_FORWARDED_FOR"], c4.as_str(), "{v}");
    assert_eq!(v["HTTP_X_ENVOY_INTERNAL"], Value::Null, "{v}");
    logged += 1;

    // Keep-alive through the balancer: the second request's client is denied, and the log
    // line of the 403 names it (before: the first request's client).
    let out = send(
        &lb.ns.name,
        sa(&s4, APP),
        b"GET /1 HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 198.51.100.1\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 203.0.113.5\r\n\r\n"
            .to_vec(),
    );
    assert!(
        out.starts_with("HTTP/1.1 200") && out.contains("RBAC: access denied"),
        "{out}"
    );
    logged += 1;
    let log = sc.wait_log(logged, Duration::from_secs(5));
    let denied = log
        .iter()
        .find(|e| e["response_code"] == 403 && e["response_flags"] == "RBAC")
        .expect("403 logged");
    assert_eq!(
        addr_ip(&denied["downstream_remote_address"]),
        "203.0.113.5",
        "{denied}"
    );
    assert_eq!(denied["client_address_source"], "xff");
    let refused = log
        .iter()
        .find(|e| e["response_code"] == 403 && e["response_flags"] != "RBAC")
        .expect("CONNECT logged");
    assert_eq!(
        refused["response_code_details"], "http_connect_refused",
        "{refused}"
    );

    // A trusted balancer's PROXY header naming a client no remote client can have: the peer
    // (the node) stands in for the dial, X-Forwarded-For, x-envoy-external-address and the
    // log, which shows the address the upstream socket was actually bound to.
    let fallbacks = [
        ("127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("240.0.0.1", "reserved"),
        (POD_BROADCAST, "broadcast"),
        (s4.as_str(), "pod_address"),
    ];
    let dst = sa(&s4, PP);
    for (claimed, _) in fallbacks {
        let mut req = encode_v1(sa(claimed, 4444), dst);
        req.extend_from_slice(b"GET /pp HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let out = send(&node.ns.name, dst, req);
        let v = &bodies(&out)[0];
        assert_eq!(v["peer"], NODE_V4, "{claimed}: the app's peer");
        assert_eq!(seen(v, "x-forwarded-for"), vec![NODE_V4], "{claimed}");
        assert_eq!(
            seen(v, "x-envoy-external-address"),
            vec![NODE_V4],
            "{claimed}"
        );
        logged += 1;
    }
    // A believable claim is used (the control).
    let mut req = encode_v1(sa("198.51.100.50", 4444), dst);
    req.extend_from_slice(
        b"GET /pp HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n",
    );
    let out = send(&node.ns.name, dst, req);
    let v = &bodies(&out)
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("{out:?} {:?}", sc.log()));
    assert_eq!(v["peer"], "198.51.100.50");
    assert_eq!(seen(v, "x-forwarded-for"), vec!["6.6.6.6, 198.51.100.50"]);
    logged += 1;
    let log = sc.wait_log(logged, Duration::from_secs(5));
    let pp: Vec<&Value> = log
        .iter()
        .filter(|e| addr_port(&e["downstream_local_address"]) == PP)
        .collect();
    assert_eq!(pp.len(), fallbacks.len() + 1, "{log:?}");
    for e in &pp[..fallbacks.len()] {
        assert_eq!(
            e["client_address_source"], "peer_refused_proxy_protocol",
            "{e}"
        );
        assert_eq!(addr_ip(&e["downstream_remote_address"]), NODE_V4, "{e}");
        assert_eq!(addr_ip(&e["upstream_local_address"]), NODE_V4, "{e}");
    }
    assert_eq!(
        addr_ip(&pp[fallbacks.len()]["upstream_local_address"]),
        "198.51.100.50"
    );
    // The same over IPv6 (the node's address must have passed duplicate address detection).
    let t = Instant::now();
    while node.ns.sh("ip -6 addr show").contains("tentative")
        || !node.ns.sh("ip -6 addr show").contains(NODE_V6)
    {
        assert!(t.elapsed() < Duration::from_secs(10), "node IPv6");
        std::thread::sleep(Duration::from_millis(50));
    }
    let s6 = server.addr(6);
    let dst6 = sa(&s6, PP);
    for claimed in ["::1", "::", "ff02::1", "::ffff:127.0.0.1", s6.as_str()] {
        let mut req = encode_v1(sa(claimed, 4444), dst6);
        req.extend_from_slice(b"GET /pp6 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let out = send(&node.ns.name, dst6, req);
        let v = &bodies(&out)
            .first()
            .cloned()
            .unwrap_or_else(|| panic!("{claimed}: {out:?} {:?}", sc.log().last()));
        assert_eq!(v["peer"], NODE_V6, "{claimed}: the app's peer");
        assert_eq!(seen(v, "x-forwarded-for"), vec![NODE_V6], "{claimed}");
        assert_eq!(
            seen(v, "x-envoy-external-address"),
            vec![NODE_V6],
            "{claimed}"
        );
    }

    // PROXY-out carries the same fallback: the app's header names the node, not loopback.
    let dst = sa(&s4, ECHO_PORT);
    let mut pre = encode_v1(sa("127.0.0.1", 4444), dst);
    pre.extend_from_slice(b"payload");
    let got = in_ns(&node.ns.name, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&pre).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    });
    match parse(&got, &Default::default()) {
        Parse::Header(h) => {
            assert_eq!(
                h.client().map(|a| a.ip().to_string()),
                Some(NODE_V4.to_string())
            );
            assert_eq!(&got[h.header_len..], b"payload");
        }
        other => panic!("{other:?}: {got:?}"),
    }
    let (_, metrics) = admin_get(&server.ns.name, "/metrics").expect("metrics");
    for (_, reason) in fallbacks {
        let line = format!("tproxy_sidecar_effective_client_fallback_total{{reason=\"{reason}\"}}");
        assert!(metrics.contains(&line), "{line}: {metrics}");
    }
}
