//! One client IP -> one app port, one request per connection, at a fixed rate (open loop): the
//! churn row of `scripts/bench.sh`. Not part of the product.
//!
//! ```text
//! churn --target IP:PORT --rate N --seconds S --close client|app [--timeout-ms MS]
//!       [--ports LO-HI]
//! ```
//!
//! `--close client`: an HTTP/1.1 keep-alive request; the client closes (FIN) once it has read
//! the whole response, so it closes first. `--close app`: `Connection: close`; the client reads
//! to EOF and closes after the app did. Connections are started on schedule whatever earlier
//! ones are doing, so a stall shows up as a slow connect, not as a lower rate. Prints one line
//! of `key=value` figures, then one line per second that had failures or slow connects.
//!
//! `--ports LO-HI` binds each connection to the next port of the range in turn (from a random
//! start) instead of letting `connect()` search for a free one: once most of the range sits in
//! TIME_WAIT (no timestamps), the kernel's search makes every `connect()` slow and the client
//! becomes the limit. A port the kernel refuses is skipped and counted (`client_port_busy`).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Default)]
struct Stats {
    started: u64,
    ok: u64,
    connect_failed: u64,
    reset: u64,
    bad: u64,
    timed_out: u64,
    max_connect: Duration,
    max_total: Duration,
    over_100ms: u64,
    start_lag: Duration,
    client_port_busy: u64,
    /// Failures per second of the run.
    per_sec: Vec<u64>,
    /// Connects over 100 ms per second of the run.
    slow_per_sec: Vec<u64>,
    t_start: Option<Instant>,
}

enum Fail {
    Connect,
    Reset,
    Bad,
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn usage() -> ! {
    eprintln!(
        "usage: churn --target IP:PORT --rate N --seconds S --close client|app [--timeout-ms MS] \
         [--ports LO-HI]"
    );
    std::process::exit(2)
}

/// The client's own port cycle (`--ports`).
struct Ports {
    lo: u16,
    hi: u16,
    next: std::cell::Cell<u16>,
}

impl Ports {
    fn take(&self) -> u16 {
        let p = self.next.get();
        self.next.set(if p >= self.hi { self.lo } else { p + 1 });
        p
    }
}

async fn connect(
    target: SocketAddr,
    ports: Option<&Ports>,
    stats: &RefCell<Stats>,
) -> std::io::Result<TcpStream> {
    let Some(ports) = ports else {
        return TcpStream::connect(target).await;
    };
    let span = usize::from(ports.hi - ports.lo) + 1;
    let mut last = std::io::Error::from(std::io::ErrorKind::AddrNotAvailable);
    for _ in 0..span.min(64) {
        let sock = if target.is_ipv6() {
            tokio::net::TcpSocket::new_v6()?
        } else {
            tokio::net::TcpSocket::new_v4()?
        };
        sock.set_reuseaddr(true)?;
        let any: std::net::IpAddr = if target.is_ipv6() {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        };
        let p = ports.take();
        let r = match sock.bind(SocketAddr::new(any, p)) {
            Ok(()) => sock.connect(target).await,
            Err(e) => Err(e),
        };
        match r {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EADDRINUSE) | Some(libc::EADDRNOTAVAIL)
                ) =>
            {
                stats.borrow_mut().client_port_busy += 1;
                last = e;
            }
            r => return r,
        }
    }
    Err(last)
}

async fn one(
    target: SocketAddr,
    app_closes: bool,
    ports: Option<Rc<Ports>>,
    stats: Rc<RefCell<Stats>>,
) -> Result<(), Fail> {
    let t0 = Instant::now();
    let mut s = connect(target, ports.as_deref(), &stats)
        .await
        .map_err(|_| Fail::Connect)?;
    let c = t0.elapsed();
    {
        let mut st = stats.borrow_mut();
        st.max_connect = st.max_connect.max(c);
        if c > Duration::from_millis(100) {
            st.over_100ms += 1;
            let sec = st
                .t_start
                .map(|t| t0.duration_since(t).as_secs() as usize)
                .unwrap_or(0)
                .min(st.slow_per_sec.len().saturating_sub(1));
            if let Some(n) = st.slow_per_sec.get_mut(sec) {
                *n += 1;
            }
        }
    }
    let req: &[u8] = if app_closes {
        b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    };
    s.write_all(req).await.map_err(|_| Fail::Reset)?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk).await.map_err(|_| Fail::Reset)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if !app_closes {
            // Keep-alive: the response is complete at its Content-Length; then we close first.
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if let Some(len) = len {
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
        }
    }
    if !buf.starts_with(b"HTTP/1.1 200") {
        return Err(if buf.is_empty() {
            Fail::Reset
        } else {
            Fail::Bad
        });
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let target: SocketAddr = arg(&args, "--target")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| usage());
    let rate: u64 = arg(&args, "--rate")
        .and_then(|v| v.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or_else(|| usage());
    let seconds: u64 = arg(&args, "--seconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| usage());
    let app_closes = match arg(&args, "--close").as_deref() {
        Some("app") => true,
        Some("client") => false,
        _ => usage(),
    };
    let ports = arg(&args, "--ports").map(|v| {
        let (lo, hi) = v
            .split_once('-')
            .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)))
            .filter(|(a, b)| a <= b && *a > 0)
            .unwrap_or_else(|| usage());
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let start = lo + (seed % (u32::from(hi - lo) + 1)) as u16;
        Rc::new(Ports {
            lo,
            hi,
            next: std::cell::Cell::new(start),
        })
    });
    let timeout = Duration::from_millis(
        arg(&args, "--timeout-ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(5000),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| {
            eprintln!("churn: runtime: {e}");
            std::process::exit(1)
        });
    let t_start = Instant::now();
    let stats = Rc::new(RefCell::new(Stats {
        per_sec: vec![0; seconds as usize + 1],
        slow_per_sec: vec![0; seconds as usize + 1],
        t_start: Some(t_start),
        ..Stats::default()
    }));
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, {
        let stats = stats.clone();
        async move {
            let total = rate * seconds;
            let period = Duration::from_nanos(1_000_000_000 / rate);
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut handles = Vec::with_capacity(total as usize);
            for _ in 0..total {
                tick.tick().await;
                stats.borrow_mut().started += 1;
                let st = stats.clone();
                let ports = ports.clone();
                handles.push(tokio::task::spawn_local(async move {
                    let t0 = Instant::now();
                    let r =
                        tokio::time::timeout(timeout, one(target, app_closes, ports, st.clone()))
                            .await;
                    let mut s = st.borrow_mut();
                    s.max_total = s.max_total.max(t0.elapsed());
                    let failed = match r {
                        Ok(Ok(())) => {
                            s.ok += 1;
                            false
                        }
                        Ok(Err(Fail::Connect)) => {
                            s.connect_failed += 1;
                            true
                        }
                        Ok(Err(Fail::Reset)) => {
                            s.reset += 1;
                            true
                        }
                        Ok(Err(Fail::Bad)) => {
                            s.bad += 1;
                            true
                        }
                        Err(_) => {
                            s.timed_out += 1;
                            true
                        }
                    };
                    if failed {
                        let sec = (t0.duration_since(t_start).as_secs() as usize)
                            .min(s.per_sec.len() - 1);
                        s.per_sec[sec] += 1;
                    }
                }));
            }
            // How far the last start fell behind its schedule: the client itself was the limit
            // if this grows.
            let lag = t_start
                .elapsed()
                .saturating_sub(period * (total.saturating_sub(1) as u32));
            stats.borrow_mut().start_lag = lag;
            for h in handles {
                let _ = h.await;
            }
        }
    });
    let wall = t_start.elapsed().as_secs_f64();
    let s = stats.borrow();
    let failed = s.connect_failed + s.reset + s.bad + s.timed_out;
    println!(
        "started={} ok={} failed={} connect_failed={} reset={} bad={} timed_out={} \
         rate={:.0} max_connect_ms={:.1} over_100ms={} max_total_ms={:.1} start_lag_ms={:.1} wall_s={:.1} \
         client_port_busy={}",
        s.started,
        s.ok,
        failed,
        s.connect_failed,
        s.reset,
        s.bad,
        s.timed_out,
        s.ok as f64 / seconds.max(1) as f64,
        s.max_connect.as_secs_f64() * 1000.0,
        s.over_100ms,
        s.max_total.as_secs_f64() * 1000.0,
        s.start_lag.as_secs_f64() * 1000.0,
        wall,
        s.client_port_busy,
    );
    for (sec, (n, slow)) in s.per_sec.iter().zip(&s.slow_per_sec).enumerate() {
        if *n > 0 || *slow > 0 {
            println!("second {sec}: {n} failed, {slow} connects over 100 ms");
        }
    }
}
