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
use super::client::PodAddrs;
use super::config::{Config, InboundMode};
use super::metrics::{Direction, Metrics};
use super::pipes::PipePool;
use super::ports::PortBook;
use super::sockopt::{self, UpstreamOpts};
use super::watchdog::Cut;
use tproxy_cni_policy::consts::{REDIRECT_SOURCE_V4, REDIRECT_SOURCE_V6};
use tproxy_cni_policy::NorthSouth;

mod serve;

/// What a listener does with its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
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
pub(crate) struct Shared {
    pub cfg: Config,
    pub metrics: Arc<Metrics>,
    pub log: AccessLog,
    pub ports: Arc<PortBook>,
    /// The splice pipes every connection borrows from (pipes.rs).
    pub pipes: Arc<PipePool>,
    pub permits: Arc<Semaphore>,
    /// `SO_MARK` value, if the probe found we may set it.
    pub mark: Option<u32>,
    /// Cut at the drain deadline: relays still running, plain or HTTP, end (watchdog.rs).
    pub cut: Cut,
    /// The inbound mode (decides whether outbound upstreams may carry the mark).
    pub mode: InboundMode,
    /// Source ports of our live outbound upstream sockets: a connection to the outbound
    /// listener *from* one of them is our own upstream captured again (loop).
    pub outbound_ports: Arc<OwnPorts>,
    /// Live connections per client IP, for `--max-connections-per-source`.
    pub sources: Arc<Sources>,
    /// Rate limit of the "out of descriptors" / accept-error lines on stderr.
    pub error_log: Mutex<RateLimit>,
    /// PROXY protocol, X-Forwarded-For and access control.
    pub ns: NorthSouthRt,
}

/// The north-south settings as the policy layer parsed them (access control and XFF trust
/// included: one definition, `annotations::acl` and `annotations::XffTrust`), with the pod's
/// own addresses the data path checks claimed clients against.
#[derive(Debug)]
pub(crate) struct NorthSouthRt {
    pub cfg: NorthSouth,
    /// What a claimed client may not be (module `client`).
    pub pod: PodAddrs,
}

impl NorthSouthRt {
    pub(crate) fn new(cfg: NorthSouth) -> NorthSouthRt {
        NorthSouthRt {
            cfg,
            pod: PodAddrs::from_interfaces(),
        }
    }
}

/// Prints at most one line per period and counts what it held back, so a condition that
/// repeats every few milliseconds (EMFILE under load) neither floods the log nor hides.
#[derive(Debug)]
pub(crate) struct RateLimit {
    period: Duration,
    last: Option<Instant>,
    held_back: u64,
}

impl RateLimit {
    pub(crate) fn new(period: Duration) -> RateLimit {
        RateLimit {
            period,
            last: None,
            held_back: 0,
        }
    }
    /// `Some(n)`: print now, mentioning the `n` occurrences held back since the last line.
    pub(crate) fn allow(&mut self, now: Instant) -> Option<u64> {
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
            log::warn!("{what}{more}");
        }
    }
}

/// Live connection count per client IP.
#[derive(Debug, Default)]
pub(crate) struct Sources(Mutex<HashMap<IpAddr, usize>>);

impl Sources {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Counts a connection from `ip` unless it already holds `cap`.
    pub(crate) fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<SourceGuard> {
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
pub(crate) struct SourceGuard {
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
pub(crate) enum Admission {
    Served {
        _permit: OwnedSemaphorePermit,
        _source: Option<SourceGuard>,
    },
    /// Its source IP held `--max-connections-per-source`.
    SourceLimited,
}

/// (IPv6?, port) of our live outbound upstream sockets.
#[derive(Debug, Default)]
pub(crate) struct OwnPorts(Mutex<HashSet<(bool, u16)>>);

impl OwnPorts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(bool, u16)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn contains(&self, a: SocketAddr) -> bool {
        self.lock().contains(&(a.is_ipv6(), a.port()))
    }
}

/// Removes its port from `OwnPorts` when the upstream socket is gone.
pub(crate) struct OwnPortGuard {
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
pub(crate) async fn accept_loop(
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
                    tokio::spawn(handle(Box::new(Accepted {
                        shared: shared.clone(),
                        down: stream,
                        peer,
                        role,
                        admit: Admission::SourceLimited,
                    })));
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
        tokio::spawn(handle(Box::new(Accepted {
            shared: shared.clone(),
            down: stream,
            peer,
            role,
            admit,
        })));
    }
}

/// Per-connection bookkeeping that ends in exactly one access-log line. It lives in every
/// connection's task, so it is kept small (docs/ARCHITECTURE.md, pitfall 80): one clock
/// reading, the connect time in microseconds, the details boxed.
struct Conn {
    t0: Instant,
    client: ClientAddr,
    local: DownstreamLocal,
    orig: Option<OrigDst>,
    upstream_local: Option<UpstreamLocal>,
    /// Microseconds the dial took.
    connect_us: Option<u32>,
    /// The client a trusted PROXY header or X-Forwarded-For named (`None`: the TCP peer).
    effective: Option<SocketAddr>,
    /// How the effective client was found (access log `client_address_source`).
    source: &'static str,
    response_code: Option<u16>,
    details: Option<Box<str>>,
    http_requests: Option<u64>,
}

/// An accepted connection, handed to `handle` in a box: an `async fn` keeps its arguments for
/// its whole life beside the locals they move into, so passed one by one they would take their
/// room twice in every connection's task (docs/ARCHITECTURE.md, pitfall 80).
struct Accepted {
    shared: Arc<Shared>,
    down: TcpStream,
    peer: SocketAddr,
    role: Role,
    admit: Admission,
}

#[allow(clippy::boxed_local)] // the point: the box is dropped when this returns
fn unbox(a: Box<Accepted>) -> Accepted {
    *a
}

async fn handle(a: Box<Accepted>) {
    // Moved out through a function, so the box is freed now, not when `handle` ends.
    let Accepted {
        shared,
        down,
        peer,
        role,
        admit,
    } = unbox(a);
    let dir = role.direction();
    let _slot = match admit {
        Admission::Served { .. } => Some(shared.metrics.slot_taken()),
        Admission::SourceLimited => None,
    };
    // `admit` (the permit, the source count) lives to the end: a drain waits for every permit,
    // so the access-log line below is written first.
    shared.metrics.conn_opened(dir);
    let mut c = Conn {
        t0: Instant::now(),
        client: ClientAddr(unmap(peer)),
        local: DownstreamLocal(down.local_addr().map(unmap).unwrap_or(peer)),
        orig: None,
        upstream_local: None,
        connect_us: None,
        effective: None,
        source: "peer",
        response_code: None,
        details: None,
        http_requests: None,
    };
    let (outcome_bytes, end) = match admit {
        Admission::Served { .. } => serve::serve(&shared, &down, role, &mut c).await,
        Admission::SourceLimited => serve::Stop::new(EndReason::SourceLimited).reset(&down),
    };
    shared
        .metrics
        .conn_closed(dir, outcome_bytes.0, outcome_bytes.1);
    shared.log.write(&Entry {
        // The wall clock at the start, from the monotonic one: what a clock step during the
        // connection moves is its start, never its duration.
        start_time: rfc3339(
            SystemTime::now()
                .checked_sub(c.t0.elapsed())
                .unwrap_or(SystemTime::UNIX_EPOCH),
        ),
        downstream_remote_address: c
            .effective
            .map(|a| a.to_string())
            .unwrap_or_else(|| c.client.to_string()),
        downstream_direct_remote_address: c.client.to_string(),
        client_address_source: c.source,
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
        upstream_connect_ms: c.connect_us.map(|us| f64::from(us) / 1000.0),
        response_flags: end.flag(),
        response_code: c.response_code,
        response_code_details: c.details.take().map(String::from),
        http_requests: c.http_requests,
        mode: role.log_mode(),
    });
}

/// Whether the app can be dialled from `client` to reach `dst`: same family, and an address
/// a remote client can have (module `client` already refused the others; this stays as a
/// second line for the dial).
fn usable_source(client: IpAddr, dst: IpAddr) -> bool {
    let ok = match client {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast())
        }
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_loopback() || v6.is_multicast()),
    };
    ok && client.is_ipv4() == dst.is_ipv4()
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
    // What the kernel bound, not what was asked for: binding a broadcast or another odd
    // address can give a different one (pitfall 65).
    let local = stream.local_addr().map(unmap)?;
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
    fn usable_source_refuses_addresses_a_client_cannot_have() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let v4 = ip("10.0.0.2");
        let v6 = ip("fd00::2");
        assert!(usable_source(ip("203.0.113.7"), v4));
        assert!(usable_source(ip("2001:db8::7"), v6));
        for bad in [
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "2001:db8::7",
        ] {
            assert!(!usable_source(ip(bad), v4), "{bad}");
        }
        for bad in ["::", "::1", "ff02::1", "203.0.113.7"] {
            assert!(!usable_source(ip(bad), v6), "{bad}");
        }
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
