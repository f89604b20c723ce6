//! Accept loops and per-connection handling: find the original destination, dial it from the
//! right source address, relay, log.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::accesslog::{rfc3339, AccessLog, EndReason, Entry};
use super::addr::{unmap, ClientAddr, DownstreamLocal, OrigDst, UpstreamLocal};
use super::config::{Config, InboundMode};
use super::metrics::{Direction, Metrics};
use super::ports::PortBook;
use super::relay;
use super::sockopt::{self, UpstreamOpts};
use crate::consts::{REDIRECT_SOURCE_V4, REDIRECT_SOURCE_V6};

/// What a listener does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Inbound(InboundMode),
    Outbound,
}

impl Role {
    fn direction(self) -> Direction {
        match self {
            Role::Inbound(_) => Direction::Inbound,
            Role::Outbound => Direction::Outbound,
        }
    }
    fn log_mode(self) -> &'static str {
        match self {
            Role::Inbound(m) => m.as_str(),
            Role::Outbound => "outbound",
        }
    }
}

/// State shared by every connection.
pub struct Shared {
    pub cfg: Config,
    pub metrics: Arc<Metrics>,
    pub log: AccessLog,
    pub ports: Arc<PortBook>,
    pub permits: Arc<Semaphore>,
    /// `SO_MARK` value, if the probe found we may set it.
    pub mark: Option<u32>,
    /// Turns true at the drain deadline: relays still running are cut.
    pub hard_stop: watch::Receiver<bool>,
    /// The inbound mode (decides whether outbound upstreams may carry the mark).
    pub mode: InboundMode,
    /// Source ports of our live outbound upstream sockets: a connection to the outbound
    /// listener *from* one of them is our own upstream captured again (loop).
    pub outbound_ports: Arc<OwnPorts>,
    /// Live connections per client IP, for `--max-connections-per-source`.
    pub sources: Arc<Sources>,
    /// Rate limit of the "out of descriptors" / accept-error lines on stderr.
    pub error_log: Mutex<RateLimit>,
}

/// Prints at most one line per period and counts what it held back, so a condition that
/// repeats every few milliseconds (EMFILE under load) neither floods the log nor hides.
#[derive(Debug)]
pub struct RateLimit {
    period: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl RateLimit {
    pub fn new(period: Duration) -> RateLimit {
        RateLimit {
            period,
            last: None,
            held_back: 0,
        }
    }
    /// `Some(n)`: print now, mentioning the `n` occurrences held back since the last line.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < self.period => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

impl Shared {
    /// Logs an error line through the rate limit.
    fn log_error(&self, what: std::fmt::Arguments<'_>) {
        let mut rl = self.error_log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = rl.allow(Instant::now()) {
            let more = if n > 0 {
                format!(" ({n} more like it since the last line)")
            } else {
                String::new()
            };
            eprintln!("tproxy-sidecar: {what}{more}");
        }
    }
}

/// Live connection count per client IP.
#[derive(Debug, Default)]
pub struct Sources(Mutex<HashMap<IpAddr, usize>>);

impl Sources {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Counts a connection from `ip` unless it already holds `cap`.
    pub fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<SourceGuard> {
        let mut m = self.lock();
        let n = m.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(SourceGuard {
            set: self.clone(),
            ip,
        })
    }
}

/// One live connection of a source IP; uncounted on drop.
#[derive(Debug)]
pub struct SourceGuard {
    set: Arc<Sources>,
    ip: IpAddr,
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        let mut m = self.set.lock();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Whether an accepted connection is served or turned away.
pub enum Admission {
    Served {
        _permit: OwnedSemaphorePermit,
        _source: Option<SourceGuard>,
    },
    /// Its source IP held `--max-connections-per-source`.
    SourceLimited,
}

/// (IPv6?, port) of our live outbound upstream sockets.
#[derive(Debug, Default)]
pub struct OwnPorts(Mutex<HashSet<(bool, u16)>>);

impl OwnPorts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(bool, u16)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn contains(&self, a: SocketAddr) -> bool {
        self.lock().contains(&(a.is_ipv6(), a.port()))
    }
}

/// Removes its port from `OwnPorts` when the upstream socket is gone.
pub struct OwnPortGuard {
    set: Arc<OwnPorts>,
    key: (bool, u16),
}

impl Drop for OwnPortGuard {
    fn drop(&mut self) {
        self.set.lock().remove(&self.key);
    }
}

/// Accepts until `stop` turns true. At the concurrency limit (`--max-connections`, lowered to
/// fit the open-file limit) excess connections wait: the loop holds at most one accepted
/// connection while it waits for a permit, and the rest stay in the kernel's accept queue (the
/// handshake is already done, so clients just see a slow first byte; beyond the backlog,
/// their SYNs are retried). A permit is taken only after accept, so idle listeners never hold
/// capacity. Because slots are sized to the descriptors, the data path does not run the
/// process out of them, and the admin port keeps answering (sidecar.rs, `connection_budget`).
pub async fn accept_loop(
    shared: Arc<Shared>,
    listener: Arc<TcpListener>,
    role: Role,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|v| *v) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning; the connection stays
                // queued in the kernel and is retried.
                if sockopt::is_fd_exhaustion(&e) {
                    shared.metrics.fd_exhausted();
                }
                let at = listener
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                shared.log_error(format_args!(
                    "accept on {at}: {e}; connections wait in the accept queue"
                ));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let source = match shared.cfg.max_connections_per_source {
            None => None,
            Some(cap) => match shared.sources.take(unmap(peer).ip(), cap) {
                Some(g) => Some(g),
                None => {
                    shared.metrics.per_source_rejected();
                    tokio::spawn(handle(
                        shared.clone(),
                        stream,
                        peer,
                        role,
                        Admission::SourceLimited,
                    ));
                    continue;
                }
            },
        };
        let permit = {
            let _waiting = shared.metrics.waiting_for_slot();
            tokio::select! {
                p = shared.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                // Draining: this one was never served; the client sees its connection close.
                _ = stop.wait_for(|v| *v) => return,
            }
        };
        let admit = Admission::Served {
            _permit: permit,
            _source: source,
        };
        tokio::spawn(handle(shared.clone(), stream, peer, role, admit));
    }
}

/// Per-connection bookkeeping that ends in exactly one access-log line.
struct Conn {
    start: SystemTime,
    t0: Instant,
    client: ClientAddr,
    local: DownstreamLocal,
    orig: Option<OrigDst>,
    upstream_local: Option<UpstreamLocal>,
    connect_ms: Option<f64>,
}

async fn handle(
    shared: Arc<Shared>,
    down: TcpStream,
    peer: SocketAddr,
    role: Role,
    admit: Admission,
) {
    let dir = role.direction();
    let _slot = match admit {
        Admission::Served { .. } => Some(shared.metrics.slot_taken()),
        Admission::SourceLimited => None,
    };
    // `admit` (the permit, the source count) lives to the end: a drain waits for every permit,
    // so the access-log line below is written first.
    shared.metrics.conn_opened(dir);
    let mut c = Conn {
        start: SystemTime::now(),
        t0: Instant::now(),
        client: ClientAddr(unmap(peer)),
        local: DownstreamLocal(down.local_addr().map(unmap).unwrap_or(peer)),
        orig: None,
        upstream_local: None,
        connect_ms: None,
    };
    let (outcome_bytes, end) = match admit {
        Admission::Served { .. } => serve(&shared, &down, role, &mut c).await,
        Admission::SourceLimited => {
            sockopt::reset_on_close(&down);
            ((0, 0), EndReason::SourceLimited)
        }
    };
    shared
        .metrics
        .conn_closed(dir, outcome_bytes.0, outcome_bytes.1);
    shared.log.write(&Entry {
        start_time: rfc3339(c.start),
        downstream_remote_address: c.client.to_string(),
        // Like Envoy with the original destination restored: with REDIRECT the socket's own
        // address is the sidecar's port, but the client connected to the original destination.
        downstream_local_address: match c.orig {
            Some(o) if role.log_mode() != "tproxy" => o.to_string(),
            _ => c.local.to_string(),
        },
        upstream_local_address: c.upstream_local.map(|u| u.to_string()),
        upstream_host: c.orig.map(|o| o.to_string()),
        bytes_received: outcome_bytes.0,
        bytes_sent: outcome_bytes.1,
        duration: u64::try_from(c.t0.elapsed().as_millis()).unwrap_or(u64::MAX),
        // Microsecond resolution: more digits are float noise, not information.
        upstream_connect_ms: c.connect_ms.map(|ms| (ms * 1000.0).round() / 1000.0),
        response_flags: end.flag(),
        mode: role.log_mode(),
    });
}

/// Returns ((bytes from downstream, bytes to downstream), end reason).
async fn serve(
    shared: &Shared,
    down: &TcpStream,
    role: Role,
    c: &mut Conn,
) -> ((u64, u64), EndReason) {
    sockopt::set_nodelay(down);
    // Dying before the relay ends must reset the client, not close it cleanly (relay.rs).
    sockopt::reset_on_close(down);
    let v6 = c.local.0.is_ipv6();
    let orig = match role {
        // TPROXY keeps the packet's destination: the accepted socket's own address.
        Role::Inbound(InboundMode::Tproxy) => Ok(OrigDst(c.local.0)),
        Role::Inbound(InboundMode::Redirect) | Role::Outbound => {
            sockopt::original_dst(down, v6).map(|a| OrigDst(unmap(a)))
        }
    };
    if role == Role::Outbound && shared.outbound_ports.contains(c.client.0) {
        // Our own upstream came back through the capture: the plugin exempts the proxy by uid
        // (and, in redirect mode, by mark); we run as neither. Said once; the access log has
        // every occurrence (NR).
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            eprintln!(
                "tproxy-sidecar: outbound loop from {}: run the sidecar as the proxy uid (1337) \
             that the plugin exempts from outbound capture",
                c.client
            );
        }
        sockopt::reset_on_close(down);
        return ((0, 0), EndReason::NoRoute);
    }
    let orig = match orig {
        Ok(o) if !is_own_port(&shared.cfg, o.port()) => o,
        // Addressed to the sidecar itself (not diverted), or no NAT record: dialing it would
        // loop back into us.
        _ => {
            sockopt::reset_on_close(down);
            return ((0, 0), EndReason::NoRoute);
        }
    };
    c.orig = Some(orig);

    // In tproxy mode the client's port is recorded for as long as the connection lives (and
    // the linger time after), so no upstream of ours reuses its tuple (ports.rs).
    let _guard = match role {
        Role::Inbound(InboundMode::Tproxy) => Some(shared.ports.inbound_open(c.client.0, orig.0)),
        _ => None,
    };

    let t = Instant::now();
    let dialed = tokio::time::timeout(
        shared.cfg.connect_timeout,
        dial(shared, role, c.client, orig),
    )
    .await;
    let dir = role.direction();
    // `_own_port` keeps an outbound upstream's port registered for loop detection until the
    // relay is over.
    let (up, _own_port) = match dialed {
        Ok(Ok((up, local, own))) => {
            shared.metrics.connect_latency(dir, t.elapsed());
            c.connect_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
            c.upstream_local = Some(local);
            (up, own)
        }
        Ok(Err(e)) if sockopt::is_fd_exhaustion(&e) => {
            // Our own shortage, not the app's: not UF, and said at a bounded rate.
            shared.metrics.fd_exhausted();
            shared.log_error(format_args!("upstream socket: {e}"));
            sockopt::reset_on_close(down);
            return ((0, 0), EndReason::Overloaded);
        }
        Ok(Err(_)) | Err(_) => {
            shared.metrics.connect_failed(dir);
            c.connect_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
            // The client sees what it would have seen without us: a reset.
            sockopt::reset_on_close(down);
            let end = if dialed.is_err() {
                EndReason::UpstreamConnectTimeout
            } else {
                EndReason::UpstreamConnectFailure
            };
            return ((0, 0), end);
        }
    };
    let o = relay::relay(
        down,
        &up,
        shared.cfg.pipe_size,
        shared.cfg.idle_timeout,
        shared.hard_stop.clone(),
    )
    .await;
    if o.end == EndReason::Overloaded {
        shared.metrics.fd_exhausted();
        shared.log_error(format_args!("relay pipe: out of file descriptors"));
    }
    // We sent the first FIN to the app, so our upstream socket now holds its tuple in
    // TIME_WAIT. Without TCP timestamps no connect() may take it over for 60 s: the port book
    // must not offer it (ports.rs).
    if role == Role::Inbound(InboundMode::Tproxy)
        && o.end == EndReason::Normal
        && o.upstream_fin_first
        && sockopt::has_timestamps(&up) != Some(true)
    {
        if let Some(local) = c.upstream_local {
            shared
                .ports
                .upstream_time_wait(c.client.ip(), orig.0, local.0.port());
        }
    }
    ((o.from_downstream, o.to_downstream), o.end)
}

fn is_own_port(cfg: &Config, port: u16) -> bool {
    port == cfg.inbound_port || Some(port) == cfg.outbound_port || Some(port) == cfg.admin_port
}

/// How many explicitly chosen source ports to try before giving up on a connection.
const BIND_ATTEMPTS: usize = 32;

type Dialed = (TcpStream, UpstreamLocal, Option<OwnPortGuard>);

async fn dial(
    shared: &Shared,
    role: Role,
    client: ClientAddr,
    orig: OrigDst,
) -> io::Result<Dialed> {
    let v6 = orig.0.is_ipv6();
    match role {
        Role::Inbound(InboundMode::Tproxy) => {
            let opts = UpstreamOpts {
                v6,
                mark: shared.mark,
                transparent: true,
                reuse_addr: true,
            };
            let mut last_err = io::Error::new(io::ErrorKind::AddrInUse, "no free upstream port");
            for _ in 0..BIND_ATTEMPTS {
                let Some(port) = shared.ports.pick(client.ip(), orig.0) else {
                    break;
                };
                let src = SocketAddr::new(client.ip(), port);
                match connect_from(opts, Some(src), orig, None).await {
                    Ok(ok) => return Ok(ok),
                    // Port still held by one of our own lingering sockets with this very tuple
                    // (bind: EADDRINUSE, connect: EADDRNOTAVAIL): take the next one.
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EADDRINUSE) | Some(libc::EADDRNOTAVAIL)
                        ) =>
                    {
                        // EADDRNOTAVAIL: a socket of ours (maybe of a previous process) holds
                        // this very tuple in TIME_WAIT; no need to try it again before it ends.
                        if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                            shared.ports.upstream_time_wait(client.ip(), orig.0, port);
                        }
                        last_err = e
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(last_err)
        }
        Role::Inbound(InboundMode::Redirect) => {
            // What meshes do: the app sees a fixed loopback source, not the client.
            let src_ip = if v6 {
                IpAddr::V6(REDIRECT_SOURCE_V6)
            } else {
                IpAddr::V4(REDIRECT_SOURCE_V4)
            };
            let opts = UpstreamOpts {
                v6,
                mark: shared.mark,
                transparent: false,
                reuse_addr: false,
            };
            connect_from(opts, Some(SocketAddr::new(src_ip, 0)), orig, None).await
        }
        Role::Outbound => {
            let opts = UpstreamOpts {
                v6,
                // In tproxy mode the plugin's `fwmark M lookup T` rule routes marked packets to
                // `lo` (T holds `local default`): a marked egress SYN would never leave the pod.
                // There the uid exemption alone keeps us out of the capture.
                mark: match shared.mode {
                    InboundMode::Redirect => shared.mark,
                    InboundMode::Tproxy => None,
                },
                transparent: false,
                reuse_addr: false,
            };
            // Bind first so the source port is known before the SYN leaves: a capture loop is
            // then recognised on accept, whichever task runs first.
            let any = if v6 {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            } else {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            };
            connect_from(
                opts,
                Some(SocketAddr::new(any, 0)),
                orig,
                Some(&shared.outbound_ports),
            )
            .await
        }
    }
}

async fn connect_from(
    opts: UpstreamOpts,
    src: Option<SocketAddr>,
    orig: OrigDst,
    own: Option<&Arc<OwnPorts>>,
) -> io::Result<Dialed> {
    let sock = sockopt::upstream_socket(opts)?;
    if let Some(src) = src {
        sock.bind(&src.into())?;
    }
    let guard = match own {
        Some(set) => {
            let port = sock
                .local_addr()?
                .as_socket()
                .map(|a| a.port())
                .unwrap_or(0);
            let key = (opts.v6, port);
            set.lock().insert(key);
            Some(OwnPortGuard {
                set: set.clone(),
                key,
            })
        }
        None => None,
    };
    let std_stream: std::net::TcpStream = sock.into();
    let stream = TcpSocket::from_std_stream(std_stream)
        .connect(orig.0)
        .await?;
    // An explicitly bound port (tproxy mode) is the local address already: no getsockname.
    let local = match src {
        Some(a) if a.port() != 0 && !a.ip().is_unspecified() => unmap(a),
        _ => stream.local_addr().map(unmap)?,
    };
    Ok((stream, UpstreamLocal(local), guard))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_holds_back_and_counts() {
        let mut rl = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(rl.allow(t0), Some(0));
        for i in 1..=200 {
            assert_eq!(rl.allow(t0 + Duration::from_millis(i * 25)), None);
        }
        assert_eq!(rl.allow(t0 + Duration::from_secs(10)), Some(200));
        assert_eq!(rl.allow(t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn per_source_cap_counts_live_connections() {
        let s = Arc::new(Sources::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let g1 = s.take(a, 2).unwrap();
        let g2 = s.take(a, 2).unwrap();
        assert!(s.take(a, 2).is_none());
        let g3 = s.take(b, 2).unwrap();
        drop(g1);
        let g4 = s.take(a, 2).unwrap();
        drop((g2, g3, g4));
        assert!(s.lock().is_empty(), "no entry left behind");
    }
}
