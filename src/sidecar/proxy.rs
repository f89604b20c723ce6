//! Accept loops and per-connection handling: find the original destination, dial it from the
//! right source address, relay, log.

use std::collections::HashSet;
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

/// Accepts until `stop` turns true. At the concurrency limit (`--max-connections`) excess
/// connections wait: the loop holds at most one accepted connection while it waits for a
/// permit, and the rest stay in the kernel's accept queue (the handshake is already done, so
/// clients just see a slow first byte; beyond the backlog, their SYNs are retried). A permit
/// is taken only after accept, so idle listeners never hold capacity.
pub async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
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
                eprintln!("tproxy-sidecar: accept on {:?}: {e}", listener.local_addr());
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = tokio::select! {
            p = shared.permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            // Draining: this one was never served; the client sees its connection close.
            _ = stop.wait_for(|v| *v) => return,
        };
        tokio::spawn(handle(shared.clone(), stream, peer, role, permit));
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
    _permit: OwnedSemaphorePermit,
) {
    let dir = role.direction();
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
    let (outcome_bytes, end) = serve(&shared, &down, role, &mut c).await;
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
    let local = stream.local_addr().map(unmap)?;
    Ok((stream, UpstreamLocal(local), guard))
}
