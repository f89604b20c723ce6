//! The PROXY protocol parser against real senders: curl (`--haproxy-protocol`, v1) and HAProxy
//! (`send-proxy`, `send-proxy-v2` with a CRC32C TLV, and the v2 `LOCAL` of its health checks).
//! Each sender connects to a plain listener on loopback; we capture what arrives and parse it.
//! No root needed: nothing but loopback sockets in the test's own network namespace.
//! A missing tool skips the test with a message, except under `CI`, where it fails.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::tools::{free_port, have_tool, Haproxy};
use tproxy_cni_sidecar::proxy_protocol::{
    parse, tlvs, Command as PpCommand, Endpoints, Family, Header, Limits, Parse, Version,
};

/// What one accepted connection delivered.
struct Capture {
    peer: SocketAddr,
    header: Header,
    rest: Vec<u8>,
    raw: Vec<u8>,
}

/// Accepts one connection on `l` and reads until a header is complete and `done(rest)` holds (or
/// EOF); then writes `reply`. Everything is bounded by 10 s so a broken sender fails the test.
fn capture(
    l: TcpListener,
    done: fn(&[u8]) -> bool,
    reply: &'static [u8],
) -> JoinHandle<Result<Capture, String>> {
    thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        l.set_nonblocking(true).map_err(|e| e.to_string())?;
        let (mut s, peer) = loop {
            match l.accept() {
                Ok(x) => break x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err("no connection within 10 s".into());
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.to_string()),
            }
        };
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Parse::Header(h) = parse(&buf, &Limits::default()) {
                if done(&buf[h.header_len..]) {
                    break;
                }
            }
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read after {buf:?}: {e}")),
            }
        }
        let _ = s.write_all(reply);
        let _ = s.shutdown(Shutdown::Write);
        match parse(&buf, &Limits::default()) {
            Parse::Header(header) => Ok(Capture {
                peer,
                rest: buf[header.header_len..].to_vec(),
                raw: buf[..header.header_len].to_vec(),
                header,
            }),
            other => Err(format!("{other:?} for {:?}", String::from_utf8_lossy(&buf))),
        }
    })
}

fn http_head_done(rest: &[u8]) -> bool {
    rest.windows(4).any(|w| w == b"\r\n\r\n")
}

const HTTP_204: &[u8] =
    b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

#[test]
fn curl_haproxy_protocol_sends_v1_we_parse() {
    if !have_tool("curl", "--version") {
        return;
    }
    for host in ["127.0.0.1", "[::1]"] {
        let l = TcpListener::bind(format!("{host}:0")).unwrap();
        let listen = l.local_addr().unwrap();
        let cap = capture(l, http_head_done, HTTP_204);
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "--haproxy-protocol",
                "-o",
                "/dev/null",
            ])
            .arg(format!("http://{listen}/pp"))
            .output()
            .unwrap();
        let c = cap.join().unwrap().unwrap();
        assert!(out.status.success(), "curl: {out:?}");
        // curl sends the connection's own endpoints: itself and the listener.
        assert_eq!(c.header.version, Version::V1);
        assert_eq!(c.header.command, PpCommand::Proxy);
        let fam = if listen.is_ipv4() {
            Family::Inet
        } else {
            Family::Inet6
        };
        assert_eq!(
            c.header.family,
            fam,
            "{:?}",
            String::from_utf8_lossy(&c.raw)
        );
        assert_eq!(
            c.header.addrs,
            Some(Endpoints {
                src: c.peer,
                dst: listen
            })
        );
        assert!(c.raw.starts_with(if listen.is_ipv4() {
            b"PROXY TCP4 "
        } else {
            b"PROXY TCP6 "
        }));
        // The request itself is untouched, right after the header.
        assert!(c.rest.starts_with(b"GET /pp HTTP/1.1\r\n"), "{:?}", c.rest);
    }
}

/// CRC-32C (Castagnoli, reflected), bitwise: enough for one header.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

const PAYLOAD: &[u8] = b"hello from the client\r\n\r\n";

fn payload_done(rest: &[u8]) -> bool {
    rest.len() >= PAYLOAD.len()
}

#[test]
fn haproxy_send_proxy_v1_and_v2_we_parse() {
    if !have_tool("haproxy", "-v") {
        return;
    }
    // (name, frontend host, server options)
    let cases = [
        ("v1_4", "127.0.0.1", "send-proxy"),
        ("v2_4", "127.0.0.1", "send-proxy-v2 proxy-v2-options crc32c"),
        ("v1_6", "::1", "send-proxy"),
        ("v2_6", "::1", "send-proxy-v2 proxy-v2-options crc32c"),
    ];
    let mut cfg = String::new();
    let mut runs = Vec::new();
    for (name, host, opts) in cases {
        let fe = free_port(host);
        let be = TcpListener::bind("127.0.0.1:0").unwrap();
        let be_addr = be.local_addr().unwrap();
        cfg += &format!(
            "frontend fe_{name}\n  bind {fe}\n  default_backend be_{name}\n\
             backend be_{name}\n  server s {be_addr} {opts}\n"
        );
        runs.push((name, fe, be));
    }
    // Health checks with the PROXY header: HAProxy sends v2 LOCAL (no client behind them).
    let chk = TcpListener::bind("127.0.0.1:0").unwrap();
    cfg += &format!(
        "backend be_check\n  server c {} send-proxy-v2 check check-send-proxy inter 200\n",
        chk.local_addr().unwrap()
    );
    let chk_cap = capture(chk, |_| true, b"");
    let fronts: Vec<SocketAddr> = runs.iter().map(|(_, fe, _)| *fe).collect();
    let _hap = Haproxy::start(None, "  mode tcp\n", &cfg, &fronts);

    for (name, fe, be) in runs {
        let cap = capture(be, payload_done, b"bye");
        let mut client = TcpStream::connect(fe).unwrap_or_else(|e| panic!("{name}: {fe}: {e}"));
        client.write_all(PAYLOAD).unwrap();
        let c = cap
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want_version = if name.starts_with("v1") {
            Version::V1
        } else {
            Version::V2
        };
        assert_eq!(c.header.version, want_version, "{name}");
        assert_eq!(c.header.command, PpCommand::Proxy, "{name}");
        // HAProxy reports the client's connection to its frontend.
        assert_eq!(
            c.header.addrs,
            Some(Endpoints {
                src: client.local_addr().unwrap(),
                dst: fe
            }),
            "{name}: {:?}",
            c.raw
        );
        assert_eq!(c.rest, PAYLOAD, "{name}: app bytes changed");
        if want_version == Version::V2 {
            // The CRC32C TLV is found where the parser says the TLVs are, and its checksum over
            // the whole header (checksum field zeroed) matches: our framing is HAProxy's.
            let area = &c.raw[c.header.tlvs.clone()];
            let crc: Vec<_> = tlvs(area)
                .map(|t| t.unwrap())
                .filter(|t| t.kind == 0x03)
                .collect();
            assert_eq!(crc.len(), 1, "{name}: TLVs {area:?}");
            let got = u32::from_be_bytes(crc[0].value.try_into().unwrap());
            let off =
                c.header.tlvs.start + (crc[0].value.as_ptr() as usize - area.as_ptr() as usize);
            let mut zeroed = c.raw.clone();
            zeroed[off..off + 4].fill(0);
            assert_eq!(crc32c(&zeroed), got, "{name}: CRC32C");
        }
        let mut answer = Vec::new();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = client.read_to_end(&mut answer);
        assert_eq!(answer, b"bye", "{name}");
    }

    let c = chk_cap.join().unwrap().unwrap();
    assert_eq!(c.header.version, Version::V2);
    assert_eq!(c.header.command, PpCommand::Local, "{:?}", c.raw);
    assert_eq!(c.header.addrs, None);
}
