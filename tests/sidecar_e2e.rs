//! End-to-end tests of `tproxy-sidecar` (root): a client netns, a pod netns with the plugin's
//! rules, an app and the sidecar binary. Each test builds its own namespaces.

mod common;
mod sidecar_support;

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sidecar_support::*;

#[test]
fn tproxy_app_sees_client_ip_v4_v6_and_log_agrees() {
    require_root!();
    let t = Topo::with_rules(&Rules::default());
    let _app = App::start(&t.pod.name, &[HTTP_PORT, EXCLUDED_PORT], &[]);
    let sc = Sidecar::start(&t.pod.name, &["--mode", "tproxy"]);

    let r4 = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect("v4 via sidecar");
    assert_eq!(r4.origin, CLIENT_V4);
    assert_ne!(r4.port, r4.local_port, "went through the proxy, not direct");
    assert_eq!(r4.port % 2, 1, "upstream ports are odd");
    let r6 = get_ip(&t.client.name, sa(POD_V6, HTTP_PORT)).expect("v6 via sidecar");
    assert_eq!(r6.origin, CLIENT_V6);
    assert_ne!(r6.port, r6.local_port);

    let log = sc.wait_log(2, Duration::from_secs(5));
    assert_eq!(log.len(), 2, "{log:?}");
    for (e, (client, pod, reply)) in log
        .iter()
        .zip([(CLIENT_V4, POD_V4, &r4), (CLIENT_V6, POD_V6, &r6)])
    {
        assert_eq!(e["mode"], "tproxy");
        assert_eq!(e["response_flags"], "-");
        assert_eq!(addr_ip(&e["downstream_remote_address"]), client);
        assert_eq!(addr_port(&e["downstream_remote_address"]), reply.local_port);
        assert_eq!(addr_ip(&e["upstream_local_address"]), client);
        assert_eq!(addr_port(&e["upstream_local_address"]), reply.port);
        assert_eq!(e["upstream_host"], sa(pod, HTTP_PORT).to_string());
        assert_eq!(
            e["downstream_local_address"],
            sa(pod, HTTP_PORT).to_string()
        );
        assert!(e["bytes_received"].as_u64().unwrap_or(0) > 0);
        assert!(e["bytes_sent"].as_u64().unwrap_or(0) > 0);
        assert!(e["duration"].is_u64() && e["start_time"].is_string());
    }

    // Excluded port: straight to the app (its peer port is the client's own), not logged.
    let ex = get_ip(&t.client.name, sa(POD_V4, EXCLUDED_PORT)).expect("excluded port");
    assert_eq!(ex.origin, CLIENT_V4);
    assert_eq!(ex.port, ex.local_port, "excluded port bypasses the sidecar");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sc.log().len(), 2);

    // Admin endpoints.
    assert_eq!(admin_get(&t.pod.name, "/healthz").expect("healthz").0, 200);
    let (code, metrics) = admin_get(&t.pod.name, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("tproxy_sidecar_connections_total{direction=\"inbound\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tproxy_sidecar_upstream_connect_seconds_count{direction=\"inbound\"} 2")
    );
    assert_eq!(admin_get(&t.pod.name, "/nope").expect("404").0, 404);
}

#[test]
fn redirect_app_sees_127_0_0_6_and_v6() {
    require_root!();
    let t = Topo::with_rules(&Rules {
        redirect: true,
        ..Rules::default()
    });
    let _app = App::start(&t.pod.name, &[HTTP_PORT], &[]);
    let sc = Sidecar::start(&t.pod.name, &["--mode", "redirect"]);
    let r4 = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect("v4");
    assert_eq!(r4.origin, "127.0.0.6");
    let r6 = get_ip(&t.client.name, sa(POD_V6, HTTP_PORT)).expect("v6");
    assert_eq!(r6.origin, "::6");
    let log = sc.wait_log(2, Duration::from_secs(5));
    assert_eq!(log.len(), 2);
    assert_eq!(addr_ip(&log[0]["upstream_local_address"]), "127.0.0.6");
    assert_eq!(addr_ip(&log[1]["upstream_local_address"]), "::6");
    assert_eq!(addr_ip(&log[0]["downstream_remote_address"]), CLIENT_V4);
    assert_eq!(addr_ip(&log[1]["downstream_remote_address"]), CLIENT_V6);
    assert_eq!(log[0]["upstream_host"], sa(POD_V4, HTTP_PORT).to_string());
    assert_eq!(log[1]["upstream_host"], sa(POD_V6, HTTP_PORT).to_string());
    // The seed's Envoy log: downstream_local_address is the app's address, not :15006.
    assert_eq!(
        log[0]["downstream_local_address"],
        sa(POD_V4, HTTP_PORT).to_string()
    );
    assert_eq!(
        log[1]["downstream_local_address"],
        sa(POD_V6, HTTP_PORT).to_string()
    );
    assert!(log.iter().all(|e| e["mode"] == "redirect"));
}

#[test]
fn auto_mode_follows_annotations_file() {
    require_root!();
    let t = Topo::with_rules(&Rules {
        redirect: true,
        ..Rules::default()
    });
    let _app = App::start(&t.pod.name, &[HTTP_PORT], &[]);
    let ann = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(
        ann.path(),
        "kubernetes.io/config.seen=\"x\"\nsidecar.istio.io/interceptionMode=\"REDIRECT\"\n",
    )
    .expect("write");
    let path = ann.path().display().to_string();
    let sc = Sidecar::start(
        &t.pod.name,
        &["--mode", "auto", "--annotations-file", &path],
    );
    let r4 = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect("v4");
    assert_eq!(r4.origin, "127.0.0.6");
    assert_eq!(
        sc.wait_log(1, Duration::from_secs(5))[0]["mode"],
        "redirect"
    );

    // A bad annotation stops start-up with the key in the message.
    std::fs::write(ann.path(), "tproxy-cni.io/mode=\"sideways\"\n").expect("write");
    let mut bad = Sidecar::spawn(
        &t.pod.name,
        "",
        &[
            "--annotations-file",
            &path,
            "--admin-port",
            "0",
            "--inbound-port",
            "15106",
            "--outbound-port",
            "0",
        ],
    );
    assert!(!bad.wait_exit(Duration::from_secs(5)).success());
    assert!(
        bad.stderr().contains("tproxy-cni.io/mode"),
        "{}",
        bad.stderr()
    );
}

fn check_outbound(t: &Topo, sc: &Sidecar) {
    let r = get_ip(&t.pod.name, sa(CLIENT_V4, 7000)).expect("outbound v4");
    assert_eq!(r.origin, POD_V4);
    let r6 = get_ip(&t.pod.name, sa(CLIENT_V6, 7000)).expect("outbound v6");
    assert_eq!(r6.origin, POD_V6);
    let log = sc.wait_log(2, Duration::from_secs(5));
    assert_eq!(
        log.len(),
        2,
        "both went through the outbound listener: {log:?}"
    );
    assert!(log.iter().all(|e| e["mode"] == "outbound"), "{log:?}");
    assert_eq!(log[0]["upstream_host"], sa(CLIENT_V4, 7000).to_string());
    assert_eq!(log[1]["upstream_host"], sa(CLIENT_V6, 7000).to_string());
    // As Envoy logs it: the destination the app asked for, not the capture port 15001.
    assert_eq!(
        log[0]["downstream_local_address"],
        sa(CLIENT_V4, 7000).to_string()
    );
    assert_eq!(addr_ip(&log[0]["upstream_local_address"]), POD_V4);
}

#[test]
fn outbound_capture_passes_through() {
    require_root!();
    let t = Topo::with_rules(&Rules {
        outbound: true,
        ..Rules::default()
    });
    // The remote server lives in the client netns; the pod dials it and is captured.
    let _remote = App::start(&t.client.name, &[7000], &[]);

    // tproxy mode: the proxy's egress is exempt by uid (its mark would be routed to lo).
    let sc = Sidecar::spawn_as_proxy(&t.pod.name, &["--mode", "tproxy"]);
    sc.wait_ready();
    check_outbound(&t, &sc);
    drop(sc);

    // Run as a uid the plugin does not exempt, its own upstream is captured again: the loop is
    // recognised and cut (reset), instead of eating every port and descriptor.
    let root = Sidecar::start(&t.pod.name, &["--mode", "tproxy"]);
    let e = get_ip(&t.pod.name, sa(CLIENT_V4, 7000)).expect_err("loop is cut");
    assert!(
        matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
        ),
        "{e}"
    );
    let log = root.wait_log(2, Duration::from_secs(5));
    assert!(log.iter().any(|e| e["response_flags"] == "NR"), "{log:?}");
    assert!(root.stderr().contains("1337"), "{}", root.stderr());
    assert_eq!(admin_get(&t.pod.name, "/healthz").expect("alive").0, 200);
}

#[test]
fn outbound_capture_redirect_mode_exempt_by_mark() {
    require_root!();
    let t = Topo::with_rules(&Rules {
        redirect: true,
        outbound: true,
        ..Rules::default()
    });
    let _remote = App::start(&t.client.name, &[7000], &[]);
    // Root (not uid 1337): only SO_MARK keeps the sidecar's egress out of the capture.
    let sc = Sidecar::start(&t.pod.name, &["--mode", "redirect"]);
    check_outbound(&t, &sc);
}

#[test]
fn fail_open_vs_fail_closed_without_sidecar() {
    require_root!();
    let t = Topo::with_rules(&Rules::default());
    let _app = App::start(&t.pod.name, &[HTTP_PORT], &[]);
    let mut sc = Sidecar::start(&t.pod.name, &["--mode", "tproxy"]);
    let via = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect("via sidecar");
    assert_ne!(via.port, via.local_port);
    sc.term();
    assert!(sc.wait_exit(Duration::from_secs(5)).success());

    // Fail-open (TPROXY's nature): with no listener the packet reaches the app directly.
    let open = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect("fail-open reaches app");
    assert_eq!(open.origin, CLIENT_V4);
    assert_eq!(open.port, open.local_port, "direct, not proxied");

    // Fail-closed: a new connection is refused instead.
    program_rules(
        &t.pod,
        &Rules {
            fail_closed: true,
            ..Rules::default()
        },
    );
    let e = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect_err("fail-closed refuses");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    let e6 = get_ip(&t.client.name, sa(POD_V6, HTTP_PORT)).expect_err("fail-closed v6");
    assert_eq!(e6.kind(), ErrorKind::ConnectionRefused, "{e6}");

    // And with the sidecar back, fail-closed pods work again.
    let _sc2 = Sidecar::start(&t.pod.name, &["--mode", "tproxy"]);
    let back = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect("sidecar back");
    assert_eq!(back.origin, CLIENT_V4);
}

#[test]
fn app_down_resets_client_promptly_and_keeps_serving() {
    require_root!();
    let t = Topo::with_rules(&Rules::default());
    let _app = App::start(&t.pod.name, &[HTTP_PORT], &[]);
    let sc = Sidecar::start(&t.pod.name, &["--mode", "tproxy"]);
    for dst in [sa(POD_V4, DEAD_PORT), sa(POD_V6, DEAD_PORT)] {
        let (elapsed, err) = in_ns(&t.client.name, move || {
            let t0 = Instant::now();
            let r = TcpStream::connect_timeout(&dst, Duration::from_secs(3)).and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                let _ = s.write_all(b"hello");
                let mut b = [0u8; 16];
                s.read(&mut b)
            });
            (t0.elapsed(), r)
        });
        let e = err.expect_err("app down must not look like success");
        assert!(
            matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
            ),
            "{e}"
        );
        assert!(
            elapsed < Duration::from_secs(1),
            "reset from {dst} took {elapsed:?}"
        );
    }
    let ok = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect("still serving");
    assert_eq!(ok.origin, CLIENT_V4);
    let log = sc.wait_log(3, Duration::from_secs(5));
    assert_eq!(
        log.iter().filter(|e| e["response_flags"] == "UF").count(),
        2,
        "{log:?}"
    );
    let (_, m) = admin_get(&t.pod.name, "/metrics").expect("metrics");
    assert!(m.contains("tproxy_sidecar_upstream_connect_failures_total{direction=\"inbound\"} 2"));
}

#[test]
fn two_thousand_connections_checksummed_no_fd_growth_small_rss() {
    require_root!();
    let t = Topo::with_rules(&Rules::default());
    let _app = App::start(&t.pod.name, &[], &[ECHO_PORT]);
    let sc = Sidecar::start(&t.pod.name, &["--mode", "tproxy"]);
    std::thread::sleep(Duration::from_millis(200));
    let fds_before = sc.fds();
    let rss_idle = sc.rss_kib();

    // 2,000 connections, 200 at a time, 32 KiB each, half over IPv6.
    const WAVES: usize = 10;
    const PER_WAVE: usize = 200;
    let mut handles = Vec::new();
    for w in 0..PER_WAVE {
        handles.push(spawn_in_ns(&t.client.name, move || -> io::Result<usize> {
            let mut ok = 0;
            for i in 0..WAVES {
                let seed = (w * WAVES + i) as u64;
                let data = Arc::new(payload(32 * 1024 + (seed as usize % 977), seed));
                let want = fnv(&data);
                let dst = if seed % 2 == 0 {
                    sa(POD_V4, ECHO_PORT)
                } else {
                    sa(POD_V6, ECHO_PORT)
                };
                let s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                let back = echo_roundtrip(s, data.clone())?;
                if back.len() == data.len() && fnv(&back) == want {
                    ok += 1;
                }
            }
            Ok(ok)
        }));
    }
    let intact: usize = handles
        .into_iter()
        .map(|h| h.join().expect("client thread").expect("client io"))
        .sum();
    assert_eq!(intact, WAVES * PER_WAVE, "every byte intact");
    let log = sc.wait_log(WAVES * PER_WAVE, Duration::from_secs(10));
    assert_eq!(log.len(), WAVES * PER_WAVE);
    assert!(log.iter().all(|e| e["response_flags"] == "-"), "all clean");
    std::thread::sleep(Duration::from_millis(300));
    let fds_after = sc.fds();
    // Beyond the pipes the pool keeps for the next transfers (bounded, none lent: pitfall 81),
    // nothing stays open.
    let (_, m) = admin_get(&t.pod.name, "/metrics").expect("metrics");
    let pooled = metric(&m, "tproxy_sidecar_pipes_open").expect("pipes_open gauge") as usize;
    assert_eq!(metric(&m, "tproxy_sidecar_pipes_in_use"), Some(0.0), "{m}");
    assert!(
        pooled <= metric(&m, "tproxy_sidecar_pipes_limit").unwrap_or(0.0) as usize,
        "{m}"
    );
    assert!(
        fds_after <= fds_before + 2 * pooled,
        "fd growth: {fds_before} -> {fds_after}, {pooled} pipes in the pool"
    );

    // 1,000 connections held open at once.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (held_tx, held_rx) = std::sync::mpsc::channel::<usize>();
    let holder = spawn_in_ns(&t.client.name, move || {
        let mut conns = Vec::new();
        for i in 0..1000u32 {
            let dst = if i % 2 == 0 {
                sa(POD_V4, ECHO_PORT)
            } else {
                sa(POD_V6, ECHO_PORT)
            };
            if let Ok(mut s) = TcpStream::connect_timeout(&dst, Duration::from_secs(5)) {
                let mut b = [0u8; 1];
                if s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() {
                    conns.push(s);
                }
            }
        }
        let _ = held_tx.send(conns.len());
        let _ = rx.recv();
        drop(conns);
    });
    let held = held_rx.recv().expect("holder");
    assert_eq!(held, 1000);
    let rss_1000 = sc.rss_kib();
    let (_, m) = admin_get(&t.pod.name, "/metrics").expect("metrics");
    assert!(m.contains("tproxy_sidecar_connections_active{direction=\"inbound\"} 1000"));
    let _ = tx.send(());
    holder.join().expect("holder thread");
    eprintln!(
        "sidecar RSS: idle {rss_idle} KiB, 1000 open connections {rss_1000} KiB; fds {fds_before} -> {fds_after}"
    );
    // Goals are 8 / 32 MiB for a release build; the debug build under test gets some slack.
    assert!(rss_idle <= 12 * 1024, "idle RSS {rss_idle} KiB");
    assert!(
        rss_1000 <= 32 * 1024,
        "RSS with 1000 connections {rss_1000} KiB"
    );
}

#[test]
fn churn_10k_short_connections_all_proxied_none_stalls() {
    require_root!();
    let t = Topo::with_rules(&Rules::default());
    let app = App::start(&t.pod.name, &[HTTP_PORT], &[]);
    let sc = Sidecar::start(
        &t.pod.name,
        &["--mode", "tproxy", "--upstream-ports", CHURN_UPSTREAM_PORTS],
    );
    churn_check(&t.client.name, CLIENT_V4, sa(POD_V4, HTTP_PORT), &sc, &app);
}

/// The churn check with an upstream range of 100 odd ports starting at the fixed client ports:
/// the port cursor then sweeps the fixed ports many times, usually during the warm-up too, so
/// the check's "not yet used by the client" bookkeeping and the port book's
/// avoidance of used ones are both exercised in every run rather than in ~2% of them.
#[test]
fn churn_upstream_range_over_the_fixed_client_ports() {
    require_root!();
    let t = Topo::with_rules(&Rules::default());
    let app = App::start(&t.pod.name, &[HTTP_PORT], &[]);
    let sc = Sidecar::start(
        &t.pod.name,
        &[
            "--mode",
            "tproxy",
            "--upstream-ports",
            CHURN_NARROW_UPSTREAM_PORTS,
        ],
    );
    churn_check(&t.client.name, CLIENT_V4, sa(POD_V4, HTTP_PORT), &sc, &app);
}

/// Keep-alive `GET /ip` on an open connection: the upstream port the app saw.
fn upstream_port_keepalive(s: &mut TcpStream) -> io::Result<u16> {
    s.write_all(b"GET /ip HTTP/1.1\r\nHost: app\r\n\r\n")?;
    let mut got = Vec::new();
    let mut b = [0u8; 512];
    while !got.ends_with(b"}\n") {
        let n = s.read(&mut b)?;
        if n == 0 {
            return Err(io::Error::other("closed"));
        }
        got.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body.trim()).map_err(io::Error::other)?;
    Ok(v["port"].as_u64().unwrap_or(0) as u16)
}

#[test]
fn port_book_keeps_upstreams_off_live_client_ports() {
    require_root!();
    let t = Topo::with_rules(&Rules::default());
    let _app = App::start(&t.pod.name, &[HTTP_PORT], &[ECHO_PORT]);
    // Eight odd ports. The client holds three of them open to the same destination; each one
    // is picked among ports no live upstream of the sidecar uses (a *future* client port equal
    // to a live upstream is the inherent clash no proxy can see; see the report).
    let sc = Sidecar::start(
        &t.pod.name,
        &["--mode", "tproxy", "--upstream-ports", "41001-41015"],
    );
    let dst = sa(POD_V4, HTTP_PORT);
    let (held, client_ports) = in_ns(&t.client.name, move || -> io::Result<_> {
        let mut held = Vec::new();
        let mut used = std::collections::BTreeSet::new();
        let mut mine = Vec::new();
        for _ in 0..3 {
            let p = (41001u16..=41015)
                .step_by(2)
                .find(|p| !used.contains(p))
                .ok_or_else(|| io::Error::other("range exhausted"))?;
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            sock.bind(&sa(CLIENT_V4, p).into())?;
            sock.connect_timeout(&dst.into(), Duration::from_secs(3))?;
            let mut s = TcpStream::from(sock);
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let up = upstream_port_keepalive(&mut s)?;
            used.insert(p);
            used.insert(up);
            mine.push(p);
            held.push(s);
        }
        Ok((held, mine))
    })
    .expect("hold client ports");
    for _ in 0..6 {
        let t0 = Instant::now();
        let r = get_ip(&t.client.name, dst).expect("proxied");
        assert!(t0.elapsed() < Duration::from_millis(500), "stalled");
        assert!(
            !client_ports.contains(&r.port),
            "upstream took live client port {}",
            r.port
        );
        assert!((41001..=41015).contains(&r.port) && r.port % 2 == 1);
    }
    // Closed client ports linger (conntrack TIME_WAIT): still avoided.
    drop(held);
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..4 {
        let r = get_ip(&t.client.name, dst).expect("proxied");
        assert!(
            !client_ports.contains(&r.port),
            "upstream took lingering port {}",
            r.port
        );
    }
    // Other destinations are other tuples: the whole range is usable there.
    let mut echo_ports = std::collections::BTreeSet::new();
    for _ in 0..5 {
        in_ns(&t.client.name, || {
            let s = TcpStream::connect(sa(POD_V4, ECHO_PORT)).expect("echo");
            echo_roundtrip(s, Arc::new(b"x".to_vec())).expect("echo")
        });
    }
    for e in sc.wait_log(18, Duration::from_secs(5)) {
        if e["upstream_host"] == sa(POD_V4, ECHO_PORT).to_string() {
            echo_ports.insert(addr_port(&e["upstream_local_address"]));
        }
    }
    assert!(echo_ports.len() >= 3, "{echo_ports:?}");
}

#[test]
fn drain_completes_in_flight_transfer() {
    require_root!();
    let t = Topo::with_rules(&Rules::default());
    let _app = App::start(&t.pod.name, &[], &[ECHO_PORT]);
    let mut sc = Sidecar::start(&t.pod.name, &["--mode", "tproxy", "--drain-timeout", "15s"]);
    const CHUNK: usize = 256 * 1024;
    const CHUNKS: usize = 64; // 16 MiB, paced over ~1.3 s
    let data = Arc::new(payload(CHUNK * CHUNKS, 7));
    let want = fnv(&data);
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let d2 = data.clone();
    let client = spawn_in_ns(&t.client.name, move || -> io::Result<(Vec<u8>, Instant)> {
        let s = TcpStream::connect_timeout(&sa(POD_V4, ECHO_PORT), Duration::from_secs(3))?;
        let mut w = s.try_clone()?;
        let writer = std::thread::spawn(move || -> io::Result<()> {
            for (i, c) in d2.chunks(CHUNK).enumerate() {
                w.write_all(c)?;
                if i == 4 {
                    let _ = started_tx.send(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            w.shutdown(std::net::Shutdown::Write)
        });
        let mut r = s;
        r.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut back = Vec::new();
        r.read_to_end(&mut back)?;
        let done = Instant::now();
        writer.join().map_err(|_| io::Error::other("writer"))??;
        Ok((back, done))
    });
    started_rx.recv().expect("transfer started");
    sc.term();
    // While draining: alive (liveness 200) but not ready (503).
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(admin_get(&t.pod.name, "/ready").expect("admin up").0, 503);
    assert_eq!(admin_get(&t.pod.name, "/healthz").expect("admin up").0, 200);
    let (back, done) = client
        .join()
        .expect("client")
        .expect("transfer survived SIGTERM");
    let status = sc.wait_exit(Duration::from_secs(10));
    let exited = Instant::now();
    assert!(status.success(), "drain exits 0: {status}");
    assert_eq!(back.len(), data.len());
    assert_eq!(fnv(&back), want, "bytes intact");
    assert!(exited >= done, "exited only after the transfer finished");
    let log = sc.log();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["response_flags"], "-");
    assert_eq!(log[0]["bytes_received"].as_u64(), Some(data.len() as u64));
}

#[test]
fn runs_as_uid_1337_with_only_net_raw_and_fails_without() {
    require_root!();
    let t = Topo::with_rules(&Rules::default());
    let _app = App::start(&t.pod.name, &[HTTP_PORT], &[]);
    // As a pod runs it: bounding set NET_RAW, no ambient set, no_new_privs, and the binary
    // carries cap_net_raw+p (the image's binary does; see scripts/image.sh).
    let with = Sidecar::spawn_as_proxy(&t.pod.name, &["--mode", "tproxy"]);
    with.wait_ready();
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", with.pid())).unwrap_or_default();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains("1337")),
        "{status}"
    );
    // Exactly CAP_NET_RAW (bit 13) effective and permitted, nothing ambient, no_new_privs.
    for want in [
        "CapEff:\t0000000000002000",
        "CapPrm:\t0000000000002000",
        "CapAmb:\t0000000000000000",
        "NoNewPrivs:\t1",
    ] {
        assert!(status.lines().any(|l| l == want), "{want}: {status}");
    }
    let r = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect("proxied as uid 1337");
    assert_eq!(r.origin, CLIENT_V4);
    assert_ne!(r.port, r.local_port);
    drop(with);

    // Same process settings, binary without the file capability: NET_RAW is in the bounding set
    // but the exec cleared it. The message says so and how to fix it, instead of asking for
    // capabilities.add, which the container already has.
    let mut no_file_cap = Sidecar::spawn(&t.pod.name, AS_PROXY, &["--mode", "tproxy"]);
    let st = no_file_cap.wait_exit(Duration::from_secs(5));
    assert_eq!(st.code(), Some(1));
    let err = no_file_cap.stderr();
    for want in [
        "IP_TRANSPARENT",
        "in the bounding set",
        "non-root uid 1337 without ambient capabilities",
        "lacks its file capability cap_net_raw+p",
        "setcap cap_net_raw+p",
    ] {
        assert!(err.contains(want), "{want}: {err}");
    }
    assert!(!err.contains("Add it to the sidecar container"), "{err}");

    // NET_RAW not even in the bounding set (the container does not add it), with the image's
    // binary: it still executes (its file capability is permitted-only, docs/ARCHITECTURE.md,
    // pitfall 19) and says the container must add NET_RAW.
    let capped = capped_copy();
    let capped_bin = capped.path().join("tproxy-sidecar").display().to_string();
    const NO_CAPS: &str = "setpriv --reuid 1337 --regid 1337 --clear-groups --inh-caps=-all \
         --bounding-set=-all --no-new-privs";
    let mut without = Sidecar::spawn_bin(&t.pod.name, NO_CAPS, &capped_bin, &["--mode", "tproxy"]);
    let st = without.wait_exit(Duration::from_secs(5));
    assert_eq!(st.code(), Some(1));
    let err = without.stderr();
    assert!(
        err.contains("not in this container's bounding set")
            && err.contains("securityContext.capabilities.add: [\"NET_RAW\"]"),
        "{err}"
    );

    // Redirect mode needs no capability at all (like a stock mesh sidecar): the image's binary
    // runs in a container that drops ALL and adds nothing (with a `+ep` file capability the
    // kernel would refuse the exec), starts without SO_MARK, and the app sees 127.0.0.6.
    program_rules(
        &t.pod,
        &Rules {
            redirect: true,
            ..Rules::default()
        },
    );
    let plain = Sidecar::spawn_bin(&t.pod.name, NO_CAPS, &capped_bin, &["--mode", "redirect"]);
    plain.wait_ready();
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", plain.pid())).unwrap_or_default();
    assert!(
        status.lines().any(|l| l == "CapEff:\t0000000000000000"),
        "{status}"
    );
    let r = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect("redirect without caps");
    assert_eq!(r.origin, "127.0.0.6");
    assert!(
        plain.stderr().contains("SO_MARK unavailable"),
        "{}",
        plain.stderr()
    );
}

#[test]
fn half_close_from_app_idle_timeout_and_connection_limit() {
    require_root!();
    let t = Topo::with_rules(&Rules::default());
    let app = App::start_with(&t.pod.name, &[HTTP_PORT], &[ECHO_PORT], &[9100]);
    let sc = Sidecar::start(
        &t.pod.name,
        &[
            "--mode",
            "tproxy",
            "--idle-timeout",
            "500ms",
            "--max-connections",
            "2",
        ],
    );

    // The app half-closes first; the client still sends 1 MiB, which must all arrive.
    let sent = in_ns(&t.client.name, || -> io::Result<String> {
        let mut s = TcpStream::connect_timeout(&sa(POD_V4, 9100), Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut greeting = String::new();
        s.read_to_string(&mut greeting)?; // returns at the app's FIN
        s.write_all(&payload(1 << 20, 3))?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)?;
        Ok(greeting)
    })
    .expect("half-close from the app");
    assert_eq!(sent, "hello\n");
    let t0 = Instant::now();
    while app.sunk.load(std::sync::atomic::Ordering::SeqCst) < 1 << 20
        && t0.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(app.sunk.load(std::sync::atomic::Ordering::SeqCst), 1 << 20);

    // Two idle connections fill the limit; a third waits in the accept queue until the idle
    // timeout frees a slot, then is served.
    let idle: Vec<TcpStream> = in_ns(&t.client.name, || {
        (0..2)
            .map(|_| {
                let mut s = TcpStream::connect(sa(POD_V4, ECHO_PORT)).expect("idle conn");
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("timeout");
                let mut b = [0u8; 1];
                s.write_all(b"x").expect("w");
                s.read_exact(&mut b).expect("r");
                s
            })
            .collect()
    });
    let t0 = Instant::now();
    let third = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect("third is served later");
    let waited = t0.elapsed();
    assert_eq!(third.origin, CLIENT_V4);
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "waited {waited:?}"
    );
    // The idle ones were cut with a reset and logged as SI.
    for mut s in idle {
        let mut b = [0u8; 1];
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let r = s.read(&mut b);
        assert!(
            matches!(r, Err(ref e) if e.kind() == ErrorKind::ConnectionReset),
            "{r:?}"
        );
    }
    let log = sc.wait_log(4, Duration::from_secs(5));
    assert_eq!(
        log.iter().filter(|e| e["response_flags"] == "SI").count(),
        2,
        "{log:?}"
    );
}

/// `wrk` through the sidecar vs straight to the app (excluded port), same app, same run.
/// Manual: `SIDECAR_BIN=target/release/tproxy-sidecar cargo test --release --test sidecar_e2e
/// bench -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_wrk_direct_vs_sidecar() {
    require_root!();
    if common::try_sh("command -v wrk").stdout.is_empty() {
        eprintln!("SKIP: wrk not installed");
        return;
    }
    let t = Topo::with_rules(&Rules::default());
    let app = App::start_with(&t.pod.name, &[HTTP_PORT, EXCLUDED_PORT], &[], &[9100]);
    let mut sc = Sidecar::start(&t.pod.name, &["--mode", "tproxy"]);
    let run = |port: u16, extra: &str| {
        let out = t.client.sh(&format!(
            "wrk -t2 -c32 -d5s --latency {extra} http://{POD_V4}:{port}/ip"
        ));
        let rps = out
            .lines()
            .find(|l| l.starts_with("Requests/sec:"))
            .unwrap_or("")
            .to_string();
        let p99 = out
            .lines()
            .find(|l| l.trim_start().starts_with("99%"))
            .unwrap_or("")
            .trim()
            .to_string();
        (rps, p99)
    };
    for (name, extra) in [("keep-alive", ""), ("close", "-H 'Connection: close'")] {
        let direct = run(EXCLUDED_PORT, extra);
        let proxied = run(HTTP_PORT, extra);
        eprintln!("wrk {name}: direct {direct:?} | via sidecar {proxied:?}");
    }
    // One bulk stream into the greeter (a sink after its greeting): through the sidecar, then
    // directly (sidecar stopped: TPROXY fails open to the app).
    let bulk = |label: &str| {
        const LEN: usize = 2 << 30;
        let before = app.sunk.load(std::sync::atomic::Ordering::SeqCst);
        let t0 = Instant::now();
        in_ns(&t.client.name, || -> io::Result<()> {
            let mut s = TcpStream::connect(sa(POD_V4, 9100))?;
            let mut g = [0u8; 6];
            s.read_exact(&mut g)?;
            let chunk = vec![0x5au8; 1 << 20];
            for _ in 0..LEN / chunk.len() {
                s.write_all(&chunk)?;
            }
            s.shutdown(std::net::Shutdown::Write)?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest)?;
            Ok(())
        })
        .expect("bulk");
        while app.sunk.load(std::sync::atomic::Ordering::SeqCst) < before + LEN {
            std::thread::sleep(Duration::from_millis(1));
        }
        let secs = t0.elapsed().as_secs_f64();
        eprintln!("bulk {label}: {:.2} Gbit/s", (LEN * 8) as f64 / secs / 1e9);
    };
    bulk("via sidecar");
    sc.term();
    let _ = sc.wait_exit(Duration::from_secs(5));
    bulk("direct");
}

/// docs/ARCHITECTURE.md, pitfall 16: SIGKILL mid-transfer. Both peers must see a reset, never a clean EOF that makes
/// a cut-off upload or download look complete.
#[test]
fn killed_sidecar_resets_both_peers_mid_transfer() {
    require_root!();
    const PORT: u16 = 9200;
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 128; // 8 MiB each way, paced over ~2.5 s
    let t = Topo::with_rules(&Rules::default());
    let mut sc = Sidecar::start(&t.pod.name, &["--mode", "tproxy"]);

    /// Sends paced chunks while reading to the end; returns how reading ended.
    fn both_ways(s: TcpStream) -> io::Result<usize> {
        let mut w = s.try_clone()?;
        std::thread::spawn(move || {
            for _ in 0..CHUNKS {
                if w.write_all(&[5u8; CHUNK]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = w.shutdown(std::net::Shutdown::Write);
        });
        let mut r = s;
        r.set_read_timeout(Some(Duration::from_secs(10)))?;
        io::copy(&mut r, &mut io::sink()).map(|n| n as usize)
    }

    // The app: one upload + download per connection.
    let l = in_ns(&t.pod.name, || {
        std::net::TcpListener::bind(("0.0.0.0", PORT)).expect("app bind")
    });
    let app = std::thread::spawn(move || {
        let (s, _) = l.accept()?;
        both_ways(s)
    });
    let (flowing_tx, flowing_rx) = std::sync::mpsc::channel();
    let client = spawn_in_ns(&t.client.name, move || {
        let s = TcpStream::connect_timeout(&sa(POD_V4, PORT), Duration::from_secs(3))?;
        let mut first = [0u8; 1];
        let mut r = s.try_clone()?;
        r.read_exact(&mut first)?;
        let _ = flowing_tx.send(());
        both_ways(s).map(|n| n + 1)
    });
    flowing_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("bytes flowing");
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sc.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let _ = sc.wait_exit(Duration::from_secs(5));
    for (who, r) in [
        ("client", client.join().expect("client thread")),
        ("app", app.join().expect("app thread")),
    ] {
        assert!(
            matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "{who} saw {r:?} instead of a reset: a cut-off transfer looked complete"
        );
    }
}

/// A metric's value from a `/metrics` body (the line `NAME VALUE`, labels included in NAME).
fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// With `ulimit -n 256` and 1,000 idle clients the admin port keeps
/// answering, EMFILE never happens (slots fit the descriptors), and the saturation is visible:
/// /ready 503 "saturated", the slot gauges at the limit, the accept queue in /metrics.
#[test]
fn fd_limit_keeps_admin_answering_and_shows_saturation() {
    require_root!();
    let t = Topo::with_rules(&Rules::default());
    let _app = App::start(&t.pod.name, &[HTTP_PORT], &[ECHO_PORT]);
    // Stands in for a container runtime that sets RLIMIT_NOFILE to 256 (soft and hard).
    let sc = Sidecar::spawn(
        &t.pod.name,
        "prlimit --nofile=256:256",
        &["--mode", "tproxy"],
    );
    sc.wait_ready();
    let clients: Vec<TcpStream> = in_ns(&t.client.name, || {
        (0..1000)
            .map(|_| {
                TcpStream::connect_timeout(&sa(POD_V4, ECHO_PORT), Duration::from_secs(3))
                    .expect("handshake (the kernel completes it before accept)")
            })
            .collect()
    });
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < Duration::from_secs(2) {
        let (code, _) = admin_get(&t.pod.name, "/healthz").expect("/healthz answers at the limit");
        assert_eq!(code, 200);
        let (code, body) = admin_get(&t.pod.name, "/ready").expect("/ready answers at the limit");
        assert_eq!((code, body.as_str()), (503, "saturated\n"));
        let (code, m) = admin_get(&t.pod.name, "/metrics").expect("/metrics answers");
        assert_eq!(code, 200);
        last = m;
        std::thread::sleep(Duration::from_millis(200));
    }
    // 256 - 64 reserved = 192: 12 pipes (24 descriptors), (192 - 24) / 2 per connection.
    assert_eq!(
        metric(&last, "tproxy_sidecar_connections_limit"),
        Some(84.0),
        "{last}"
    );
    assert_eq!(
        metric(&last, "tproxy_sidecar_connections_in_use"),
        Some(84.0),
        "{last}"
    );
    let queued = metric(
        &last,
        "tproxy_sidecar_accept_queue{listener=\"inbound\",family=\"ipv4\"}",
    )
    .unwrap_or(0.0);
    assert!(queued >= 900.0, "accept queue {queued}: {last}");
    assert_eq!(
        metric(&last, "tproxy_sidecar_fd_exhausted_total"),
        Some(0.0)
    );
    let err = sc.stderr();
    assert!(
        err.lines().count() < 5 && !err.contains("Too many open files"),
        "{err}"
    );

    // Clients gone: the backlog drains and the sidecar is ready again.
    drop(clients);
    sc.wait_ready();
    let r = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect("serving again");
    assert_eq!(r.origin, CLIENT_V4);
}

/// `--max-connections-per-source` resets a client IP's connections beyond the cap
/// at once (flag RL, counted), instead of letting one IP take every slot.
#[test]
fn per_source_cap_resets_the_excess_and_counts_it() {
    require_root!();
    let t = Topo::with_rules(&Rules::default());
    let _app = App::start(&t.pod.name, &[HTTP_PORT], &[ECHO_PORT]);
    let sc = Sidecar::start(
        &t.pod.name,
        &["--mode", "tproxy", "--max-connections-per-source", "2"],
    );
    let (held, third) = in_ns(&t.client.name, || {
        let held: Vec<TcpStream> = (0..2)
            .map(|_| {
                let mut s = TcpStream::connect(sa(POD_V4, ECHO_PORT)).expect("conn");
                s.set_read_timeout(Some(Duration::from_secs(3)))
                    .expect("timeout");
                s.write_all(b"x").expect("w");
                let mut b = [0u8; 1];
                s.read_exact(&mut b).expect("echoed");
                s
            })
            .collect();
        let mut s = TcpStream::connect(sa(POD_V4, ECHO_PORT)).expect("third");
        // Generous: on a loaded machine the sidecar may take a while to get to this accept,
        // and a timeout here would say nothing about the cap.
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        // The reset may already be there when we write (an idle worker rejects at once): then
        // the write reports it, and a read after that only sees the closed socket.
        let w = s.write_all(b"x");
        let mut b = [0u8; 1];
        (held, w.and_then(|()| s.read(&mut b)))
    });
    assert!(
        matches!(&third, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "{third:?}"
    );
    let (_, m) = admin_get(&t.pod.name, "/metrics").expect("metrics");
    assert_eq!(
        metric(&m, "tproxy_sidecar_per_source_rejected_total"),
        Some(1.0),
        "{m}"
    );
    let log = sc.wait_log(1, Duration::from_secs(5));
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["response_flags"], "RL");
    // One closed: that IP may connect again.
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let r = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect("below the cap again");
    assert_eq!(r.origin, CLIENT_V4);
}

/// Polls `/ready` until it returns `code` (the admin port may not be up yet); returns the body.
fn wait_ready_code(ns: &str, code: u16, within: Duration) -> String {
    let t0 = Instant::now();
    let mut last = None;
    while t0.elapsed() < within {
        match admin_get(ns, "/ready") {
            Ok((c, body)) if c == code => return body,
            r => last = Some(r),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("/ready never returned {code}; last {last:?}");
}

/// A sidecar whose pod netns the plugin never programmed (the pod started before
/// the plugin was chained) stays not-ready and says why; once the rules appear it turns ready,
/// and it notices when they go away again. Tproxy mode (fwmark rule + local route, as uid 1337
/// with only NET_RAW: rtnetlink needs no privilege) and redirect mode (`::6` on lo).
#[test]
fn not_ready_until_the_netns_is_programmed_for_the_mode() {
    require_root!();
    let t = Topo::new();
    let _app = App::start(&t.pod.name, &[HTTP_PORT], &[]);
    let sc = Sidecar::spawn_as_proxy(&t.pod.name, &["--mode", "tproxy"]);
    let body = wait_ready_code(&t.pod.name, 503, Duration::from_secs(10));
    assert!(
        body.starts_with(&format!(
            "not intercepted: no ipv4 policy rule sends fwmark {:#x}",
            tproxy_cni_policy::consts::MARK
        )),
        "{body}"
    );
    // Not a start-up blip: still 503 a while later.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(admin_get(&t.pod.name, "/ready").expect("ready").0, 503);
    assert_eq!(admin_get(&t.pod.name, "/healthz").expect("healthz").0, 200);
    let err = sc.stderr();
    assert!(
        err.contains("not ready") && err.contains("started before tproxy-cni was chained"),
        "{err}"
    );
    program_rules(&t.pod, &Rules::default());
    wait_ready_code(&t.pod.name, 200, Duration::from_secs(5));
    let r = get_ip(&t.client.name, sa(POD_V4, HTTP_PORT)).expect("proxied");
    assert_eq!(
        (r.origin.as_str(), r.port != r.local_port),
        (CLIENT_V4, true)
    );
    assert!(sc.stderr().contains("interception rules found"));
    // The IPv6 rule is required too in this dual-stack pod.
    let m = tproxy_cni_policy::consts::MARK;
    t.pod
        .sh(&format!("ip -6 rule del fwmark {m:#x}/{m:#x} lookup 29808"));
    let body = wait_ready_code(&t.pod.name, 503, Duration::from_secs(5));
    assert!(body.contains("no ipv6 policy rule"), "{body}");
    drop(sc);

    // Redirect mode: `::6` on lo is what an unprivileged sidecar can see of the plugin's work.
    let t = Topo::new();
    let _sc = Sidecar::spawn(&t.pod.name, "", &["--mode", "redirect"]);
    let body = wait_ready_code(&t.pod.name, 503, Duration::from_secs(10));
    assert!(body.contains("::6 is not on lo"), "{body}");
    program_rules(
        &t.pod,
        &Rules {
            redirect: true,
            ..Rules::default()
        },
    );
    wait_ready_code(&t.pod.name, 200, Duration::from_secs(5));
}

/// docs/ARCHITECTURE.md, pitfall 54: the client closes first, so the sidecar sends the first FIN on the app leg and its
/// upstream socket keeps `client_ip:p -> app` in TIME_WAIT for 60 s. With
/// `net.ipv4.tcp_timestamps=0` in the pod a `connect()` from that explicitly bound port is
/// refused for the whole 60 s, so once every odd port of the range was used the sidecar must
/// skip them and dial from the even ones instead of resetting the client (before the fix: every
/// connection after the 20th was reset). With timestamps on the tuple is taken over at once,
/// so the sidecar stays on odd ports. Each phase uses tuples nothing used before: a tuple once
/// taken over with timestamps keeps the peer's timestamp stamp in its later TIME_WAITs and
/// stays reusable even without timestamps, which would hide the failure.
#[test]
fn client_closing_first_without_timestamps_moves_to_free_upstream_ports() {
    require_root!();
    let t = Topo::new();
    program_rules(&t.pod, &Rules::default());
    let _app = App::start(&t.pod.name, &[HTTP_PORT], &[]);
    // 20 odd and 20 even ports.
    let sc = Sidecar::start(
        &t.pod.name,
        &["--mode", "tproxy", "--upstream-ports", "43001-43040"],
    );
    // One keep-alive request per connection; the client closes first once it has the answer,
    // and the next connection starts only after the sidecar logged the previous one (its relay
    // is over, so its upstream socket is in TIME_WAIT).
    let run = |dst: SocketAddr, n: usize, logged: usize| -> Vec<Result<u16, String>> {
        let mut out = Vec::new();
        for i in 0..n {
            let r = in_ns(&t.client.name, move || -> io::Result<u16> {
                let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))?;
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                upstream_port_keepalive(&mut s)
            });
            out.push(r.map_err(|e| e.to_string()));
            sc.wait_log(logged + i + 1, Duration::from_secs(3));
        }
        out
    };
    // TIME_WAIT sockets of upstream tuples `client:* -> pod` in the pod netns.
    let tw_upstreams = |client: &str, pod: SocketAddr| {
        t.pod
            .sh(&format!(
                "ss -HtanO state time-wait dport = :{}",
                pod.port()
            ))
            .lines()
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let ip = |s: &str| {
                    s.rsplit_once(':')
                        .map(|(a, _)| a.trim_matches(['[', ']']).to_string())
                        .unwrap_or_default()
                };
                f.len() >= 4 && ip(f[2]) == client && ip(f[3]) == pod.ip().to_string()
            })
            .count()
    };

    // Timestamps off in the pod: the odd ports' tuples stay in TIME_WAIT; the even ones serve.
    t.pod.sh("sysctl -qw net.ipv4.tcp_timestamps=0");
    let v4 = sa(POD_V4, HTTP_PORT);
    let without = run(v4, 36, 0);
    let ok: Vec<u16> = without.iter().filter_map(|r| r.clone().ok()).collect();
    assert_eq!(ok.len(), 36, "connections failed: {without:?}");
    let even = ok.iter().filter(|p| *p % 2 == 0).count();
    assert!(even >= 16, "even ports used: {even} of {ok:?}");
    assert!(ok.iter().all(|p| (43001..=43040).contains(p)), "{ok:?}");
    // The kernel agrees: the upstream tuples are in TIME_WAIT.
    assert!(
        tw_upstreams(CLIENT_V4, v4) >= 36,
        "{}",
        tw_upstreams(CLIENT_V4, v4)
    );

    // Timestamps on (the default), fresh tuples (IPv6): TIME_WAIT tuples are taken over, the
    // sidecar stays on odd ports.
    t.pod.sh("sysctl -qw net.ipv4.tcp_timestamps=1");
    let v6 = sa(POD_V6, HTTP_PORT);
    let with_ts = run(v6, 30, 36);
    let ports: Vec<u16> = with_ts.iter().filter_map(|r| r.clone().ok()).collect();
    assert_eq!(ports.len(), 30, "{with_ts:?}");
    assert!(ports.iter().all(|p| p % 2 == 1), "{ports:?}");
    assert!(
        tw_upstreams(CLIENT_V6, v6) >= 20,
        "the upstreams closed first: TIME_WAIT"
    );

    let log = sc.log();
    let bad: Vec<_> = log.iter().filter(|e| e["response_flags"] != "-").collect();
    assert!(bad.is_empty(), "{bad:?}");
}

/// docs/ARCHITECTURE.md, pitfall 57: `--workers 3` runs three accept loops on `SO_REUSEPORT` listeners. The kernel
/// holds three listeners per family on the port, every connection (spread by flow hash, so a
/// worker that did not serve would leave about a third of them hanging) reaches the app from
/// the client's address, and SIGTERM still drains and stops every worker.
#[test]
fn workers_share_the_listening_port_and_all_serve() {
    require_root!();
    let t = Topo::new();
    program_rules(&t.pod, &Rules::default());
    let _app = App::start(&t.pod.name, &[HTTP_PORT], &[]);
    let mut sc = Sidecar::start(&t.pod.name, &["--mode", "tproxy", "--workers", "3"]);
    let listeners = t.pod.sh("ss -Hltn sport = :15006");
    assert_eq!(listeners.lines().count(), 6, "3 per family:\n{listeners}");
    assert_eq!(
        std::fs::read_dir(format!("/proc/{}/task", sc.pid()))
            .map(|d| d.count())
            .unwrap_or(0),
        3,
        "one thread per worker"
    );
    for (client, pod) in [(CLIENT_V4, POD_V4), (CLIENT_V6, POD_V6)] {
        for _ in 0..30 {
            let r = get_ip(&t.client.name, sa(pod, HTTP_PORT)).expect("served");
            assert_eq!(r.origin, client);
            assert_ne!(r.port, r.local_port, "through the sidecar");
        }
    }
    assert_eq!(sc.wait_log(60, Duration::from_secs(5)).len(), 60);
    sc.term();
    assert!(
        sc.wait_exit(Duration::from_secs(10)).success(),
        "{}",
        sc.stderr()
    );
    assert!(sc.stderr().contains("3 workers"), "{}", sc.stderr());
}
