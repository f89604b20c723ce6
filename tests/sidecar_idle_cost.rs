//! The per-connection cost of the sidecar (root): what 1,000 idle proxied connections add to
//! its resident memory and its descriptors (docs/ARCHITECTURE.md, pitfalls 80-82). A guard
//! against creep: each per-connection allocation added without need shows here first.

mod common;
mod sidecar_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use sidecar_support::*;

/// Idle connections held at once.
const IDLE: usize = 1000;
/// What they may add to the sidecar's RSS: 2 KiB each (docs/ARCHITECTURE.md, pitfalls 80 and
/// 82; 4.6 KiB each at first, 2.75 KiB after the first cuts, about 1.8 KiB now).
const MAX_GROWTH_KIB: u64 = 2 * IDLE as u64;
/// The same on an X-Forwarded-For port, where each connection also holds the HTTP relay's
/// state, boxed (docs/ARCHITECTURE.md, pitfall 80): about 5 KiB each, 13.9 KiB when every
/// idle connection kept two 16 KiB read buffers.
const MAX_XFF_GROWTH_KIB: u64 = 6 * IDLE as u64;
/// Bytes each "bulk" connection sends and gets back: more than the relay's copy buffer
/// (16 KiB), so that direction moves them with `splice` through a pipe.
const BULK: usize = 64 * 1024;

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// One keep-alive `GET /ip` whose response is read whole: the connection then went through
/// the sidecar both ways and sits idle.
fn one_request(s: &mut TcpStream) -> std::io::Result<()> {
    s.write_all(b"GET /ip HTTP/1.1\r\nHost: app\r\n\r\n")?;
    let mut got = Vec::new();
    let mut b = [0u8; 512];
    while !got.ends_with(b"}\n") {
        let n = s.read(&mut b)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&b[..n]);
    }
    Ok(())
}

/// `BULK` bytes there and back on an echo connection, which stays open.
fn one_bulk(s: &mut TcpStream, seed: u64) -> std::io::Result<()> {
    let data = payload(BULK, seed);
    let mut w = s.try_clone()?;
    let sent = data.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent));
    let mut back = vec![0u8; BULK];
    s.read_exact(&mut back)?;
    writer
        .join()
        .map_err(|_| std::io::Error::other("writer panicked"))??;
    if back != data {
        return Err(std::io::Error::other("echo differs"));
    }
    Ok(())
}

/// What `IDLE` idle connections added to the sidecar: RSS in KiB, and descriptors.
struct Cost {
    growth_kib: u64,
    fds0: usize,
    fds1: usize,
}

/// Holds `IDLE` idle connections through the sidecar in tproxy mode, as a pod runs it (uid
/// 1337, only NET_RAW, from the file capability), started with `args`; `bulk` makes every
/// other connection a 64 KiB echo (a direction that spliced) instead of one HTTP request.
fn idle_cost(args: &[&str], bulk: bool) -> Cost {
    let t = Topo::with_rules(&Rules::default());
    let _app = App::start(&t.pod.name, &[HTTP_PORT], &[ECHO_PORT]);
    let capped = capped_copy();
    // `prlimit` stands in for the container runtime's open-file limit (containerd's default
    // is far higher); `AS_PROXY` is the pod's security context.
    let mut all = vec!["--mode", "tproxy"];
    all.extend_from_slice(args);
    let mut sc = Sidecar::spawn_bin(
        &t.pod.name,
        &format!("prlimit --nofile=8192:8192 {AS_PROXY}"),
        &capped.path().join("tproxy-sidecar").display().to_string(),
        &all,
    );
    sc.capped = Some(capped);
    sc.wait_ready();
    // A first connection, so what only the first one allocates (the per-thread copy buffer,
    // the runtime's lazily made structures) is in the baseline, not in the growth.
    let warm = in_ns(&t.client.name, move || {
        let mut s = TcpStream::connect_timeout(&sa(POD_V4, HTTP_PORT), Duration::from_secs(5))?;
        one_request(&mut s)?;
        if !bulk {
            return Ok(());
        }
        let mut e = TcpStream::connect_timeout(&sa(POD_V4, ECHO_PORT), Duration::from_secs(5))?;
        one_bulk(&mut e, 0)
    });
    warm.expect("warm-up through the sidecar");
    std::thread::sleep(Duration::from_millis(300));
    let (rss0, fds0) = (sc.rss_kib(), sc.fds());

    let conns: Vec<TcpStream> = in_ns(&t.client.name, move || {
        (0..IDLE)
            .map(|i| {
                let echo = bulk && i % 2 == 1;
                let dst = if echo {
                    sa(POD_V4, ECHO_PORT)
                } else {
                    sa(POD_V4, HTTP_PORT)
                };
                let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))
                    .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let r = if echo {
                    one_bulk(&mut s, i as u64)
                } else {
                    one_request(&mut s)
                };
                r.unwrap_or_else(|e| panic!("connection {i}: {e}"));
                s
            })
            .collect()
    });
    // Every connection answered, so each is established on both legs; the sidecar's gauge
    // says the same once the warm-up connections (closed above) are logged as ended.
    let t0 = Instant::now();
    let m = loop {
        let (_, m) = admin_get(&t.pod.name, "/metrics").expect("metrics");
        let active = metric(
            &m,
            "tproxy_sidecar_connections_active{direction=\"inbound\"}",
        );
        if active == Some(IDLE as f64) || t0.elapsed() > Duration::from_secs(10) {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        metric(
            &m,
            "tproxy_sidecar_connections_active{direction=\"inbound\"}"
        ),
        Some(IDLE as f64),
        "{m}"
    );
    let (rss1, fds1) = (sc.rss_kib(), sc.fds());
    let growth_kib = rss1.saturating_sub(rss0);
    eprintln!(
        "sidecar {args:?} with {IDLE} idle connections: RSS {rss0} -> {rss1} KiB (+{growth_kib} KiB, \
         {:.2} KiB each), descriptors {fds0} -> {fds1}",
        growth_kib as f64 / IDLE as f64
    );
    drop(conns);
    Cost {
        growth_kib,
        fds0,
        fds1,
    }
}

/// 1,000 idle connections, half after one HTTP request, half after one 64 KiB echo: together
/// they may add at most 2 KiB each to the RSS, and each holds its two sockets only: no splice
/// pipe stays with an idle connection.
#[test]
fn thousand_idle_connections_cost_little_memory_and_two_descriptors_each() {
    require_root!();
    let Cost {
        growth_kib: growth,
        fds0,
        fds1,
    } = idle_cost(&[], true);
    assert!(
        growth <= MAX_GROWTH_KIB,
        "{IDLE} idle connections grew the RSS by {growth} KiB (at most {MAX_GROWTH_KIB})"
    );
    // Two sockets each; a few more for pipes the pool keeps (docs/ARCHITECTURE.md, pitfall 81).
    let extra = fds1.saturating_sub(fds0 + 2 * IDLE);
    assert!(
        extra <= 8,
        "{IDLE} idle connections hold {} descriptors ({fds0} -> {fds1}): {extra} beyond two each",
        fds1 - fds0
    );
}

/// The same on an X-Forwarded-For port, each connection idle after one keep-alive request:
/// the HTTP relay's state (boxed apart from the plain connections') is the difference.
#[test]
fn thousand_idle_xff_connections_cost_bounded_memory() {
    require_root!();
    let c = idle_cost(&["--xff-ports", &HTTP_PORT.to_string()], false);
    assert!(
        c.growth_kib <= MAX_XFF_GROWTH_KIB,
        "{IDLE} idle XFF connections grew the RSS by {} KiB (at most {MAX_XFF_GROWTH_KIB})",
        c.growth_kib
    );
}
