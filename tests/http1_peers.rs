//! The HTTP/1.1 framing and X-Forwarded-For modules against real clients: curl (keep-alive,
//! chunked upload, `Expect: 100-continue`) and HAProxy in `mode http` with `option forwardfor`
//! (a real trusted proxy that appends its own XFF line). The test server here stands in for the
//! sidecar's future XFF port: it frames requests with `http1`, derives the client with `xff`, and
//! answers with what it found. No root needed: loopback sockets only (127.0.0.0/8 is all local,
//! so distinct loopback addresses play client, proxy and peer).
//! A missing tool skips the test with a message, except under `CI`, where it fails.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::tools::{free_port, have_tool, Haproxy};
use tproxy_cni_policy::XffTrust;
use tproxy_cni_sidecar::{
    edge_rewrite, Body, ClientCheck, HeadParse, HeadReader, HttpLimits as Limits, PodAddrs,
    EXTERNAL_ADDRESS, XFF,
};

/// Serves every request of one connection; the response body describes what was parsed.
fn serve(mut s: TcpStream, peer: IpAddr, trust: XffTrust) -> Result<(), String> {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut read_more = |s: &mut TcpStream, buf: &mut Vec<u8>| -> Result<bool, String> {
        match s.read(&mut chunk) {
            Ok(0) => Ok(false),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e) => Err(e.to_string()),
        }
    };
    loop {
        let mut reader = HeadReader::new(Limits::default());
        let head = loop {
            match reader.feed(&buf) {
                HeadParse::Head(h) => break h,
                HeadParse::NeedMore => {
                    if !read_more(&mut s, &mut buf)? {
                        return Ok(()); // client closed between requests
                    }
                }
                HeadParse::Error(e) => {
                    let _ = s.write_all(e.response());
                    return Err(format!("{e}: {:?}", String::from_utf8_lossy(&buf)));
                }
            }
        };
        // `client=` and `source=` report what the XFF rule picked; `ext=` what the edge sends,
        // after the client check (module `client`): a loopback client named in XFF is
        // refused there, and the peer stands in.
        let pod = PodAddrs::default();
        let ck = ClientCheck {
            pod: &pod,
            local: None,
        };
        let rw = edge_rewrite(&buf, &head, peer, "peer", &trust, &ck);
        if head.expect_continue {
            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .map_err(|e| e.to_string())?;
        }
        buf.drain(..head.head_len);
        let mut body = Body::new(head.framing, Limits::default().max_head);
        let mut body_len = 0;
        while !body.is_done() {
            if buf.is_empty() && !read_more(&mut s, &mut buf)? {
                return Err("body truncated".into());
            }
            let n = body.feed(&buf).map_err(|e| e.to_string())?;
            body_len += n;
            buf.drain(..n);
        }
        // Report the rewritten head's forwarding fields as the app would see them.
        let again = match HeadReader::new(Limits::default()).feed(&rw.head) {
            HeadParse::Head(h) => h,
            other => return Err(format!("rewritten head: {other:?}")),
        };
        let field = |name| {
            again
                .values(&rw.head, name)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect::<Vec<_>>()
                .join("|")
        };
        let report = format!(
            "client={} source={} xff={} ext={} body={} target={}\n",
            rw.xff.client,
            rw.xff.source.label(),
            field(XFF),
            field(EXTERNAL_ADDRESS),
            body_len,
            String::from_utf8_lossy(again.target(&rw.head)),
        );
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{report}",
            report.len()
        );
        s.write_all(resp.as_bytes()).map_err(|e| e.to_string())?;
    }
}

/// A server on `addr` serving connections until the test ends; counts connections.
fn server(addr: &str, trust: XffTrust) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind(addr).unwrap();
    let local = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            c.fetch_add(1, Ordering::SeqCst);
            let peer = s.peer_addr().unwrap().ip();
            let trust = trust.clone();
            thread::spawn(move || {
                if let Err(e) = serve(s, peer, trust) {
                    eprintln!("server: {e}");
                }
            });
        }
    });
    (local, conns)
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--http1.1", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "curl {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn curl_keep_alive_chunked_and_expect_continue() {
    if !have_tool("curl", "--version") {
        return;
    }
    let (addr, conns) = server("127.0.0.1:0", XffTrust::Hops(1));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body");
    std::fs::write(&file, vec![b'x'; 100_000]).unwrap();
    let data = format!("@{}", file.display());
    let base = format!("http://{addr}");
    // Four requests on one connection: plain GET, chunked upload with 100-continue, a
    // Content-Length upload, and a GET carrying a client-supplied XFF and external address.
    let out = curl(&[
        &format!("{base}/one"),
        "--next",
        "-H",
        "Transfer-Encoding: chunked",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &data,
        &format!("{base}/two"),
        "--next",
        "--data-binary",
        &data,
        &format!("{base}/three"),
        "--next",
        "-H",
        "X-Forwarded-For: 203.0.113.9, 198.51.100.1",
        "-H",
        "x-envoy-external-address: 6.6.6.6",
        &format!("{base}/four"),
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    // No request is internal (Envoy since 1.33 without internal_address_config): the
    // external address is the peer.
    assert_eq!(
        lines[0],
        "client=127.0.0.1 source=peer xff=127.0.0.1 ext=127.0.0.1 body=0 target=/one"
    );
    // Chunked: the body's wire bytes are the payload plus chunk framing.
    let two: Vec<&str> = lines[1].split(' ').collect();
    assert_eq!(
        two[..4],
        [
            "client=127.0.0.1",
            "source=peer",
            "xff=127.0.0.1",
            "ext=127.0.0.1"
        ]
    );
    let wire: usize = two[4].strip_prefix("body=").unwrap().parse().unwrap();
    assert!((100_005..101_000).contains(&wire), "{}", lines[1]);
    assert_eq!(two[5], "target=/two");
    assert_eq!(
        lines[2],
        "client=127.0.0.1 source=peer xff=127.0.0.1 ext=127.0.0.1 body=100000 target=/three"
    );
    // A forged external address is stripped; with one trusted hop the XFF entry is the client.
    assert_eq!(
        lines[3],
        "client=198.51.100.1 source=xff xff=203.0.113.9, 198.51.100.1, 127.0.0.1 \
         ext=198.51.100.1 body=0 target=/four"
    );
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "curl reused one connection"
    );
}

#[test]
fn haproxy_forwardfor_is_one_trusted_hop() {
    if !have_tool("haproxy", "-v") || !have_tool("curl", "--version") {
        return;
    }
    // client 127.0.0.2 -> HAProxy (frontend 127.0.0.1) -> server, dialled from 127.0.0.3.
    let (be, _) = server("127.0.0.1:0", XffTrust::Hops(1));
    let (be0, _) = server("127.0.0.1:0", XffTrust::Hops(0));
    let (fe, fe0) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let _hap = Haproxy::start(
        None,
        "  mode http\n  option forwardfor\n",
        &format!(
            "frontend f1\n  bind {fe}\n  default_backend b1\n\
             backend b1\n  server s {be} source 127.0.0.3\n\
             frontend f0\n  bind {fe0}\n  default_backend b0\n\
             backend b0\n  server s {be0} source 127.0.0.3\n"
        ),
        &[fe, fe0],
    );
    // numTrustedProxies 1: the client HAProxy saw, even when the client forges XFF (HAProxy
    // appends its own XFF line; all lines form one list). That client is a loopback address
    // here, which no remote client can have: the edge falls back to the peer for `ext`.
    let out = curl(&[
        "--interface",
        "127.0.0.2",
        "-H",
        "X-Forwarded-For: 6.6.6.6",
        "-H",
        "x-envoy-external-address: 6.6.6.6",
        &format!("http://{fe}/a"),
    ]);
    assert_eq!(
        out.trim(),
        "client=127.0.0.2 source=xff xff=6.6.6.6, 127.0.0.2, 127.0.0.3 ext=127.0.0.3 body=0 target=/a"
    );
    // numTrustedProxies 0: the TCP peer (HAProxy's source address); XFF only appended.
    let out = curl(&["--interface", "127.0.0.2", &format!("http://{fe0}/b")]);
    assert_eq!(
        out.trim(),
        "client=127.0.0.3 source=peer xff=127.0.0.2, 127.0.0.3 ext=127.0.0.3 body=0 target=/b"
    );
    // A chunked upload through HAProxy (it may re-frame it) still ends where it should.
    let out = curl(&[
        "--interface",
        "127.0.0.2",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        "hello world",
        &format!("http://{fe}/c"),
    ]);
    assert!(out.contains(" body=") && out.contains("target=/c"), "{out}");
    let _ = TcpStream::connect(fe).map(|s| s.shutdown(Shutdown::Both));
}
