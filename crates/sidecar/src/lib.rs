//! The in-pod transparent proxy: accepts TPROXY'd (or REDIRECTed) connections and dials the app
//! from the client's own IP, so the app sees the real client behind the mesh sidecar.
//!
//! - `config`: flags + `TPROXY_SIDECAR_*` env -> `Config` (pure), `--help`.
//! - `addr`: address-role newtypes (`ClientAddr`, `OrigDst`, `UpstreamLocal`, ...).
//! - `sockopt`: every raw socket option, pipe and splice call; the only `unsafe`.
//! - `caps`: why CAP_NET_RAW is missing (bounding vs effective set), for the start-up error.
//! - `ports`: upstream source-port choice that never recreates a client's tuple
//!   (docs/ARCHITECTURE.md, pitfall 12).
//! - `proxy`: accept loops, original destination, upstream dial, per-connection log.
//! - `relay`: the splice(2) data path with half-close, idle timeout and reset propagation;
//!   `pipes`: the bounded pool of splice pipes it borrows from.
//! - `proxy_protocol`, `xff`, `http1`: north-south building blocks (pure; the access control
//!   and the XFF trust are the policy layer's `annotations::acl` and `annotations::XffTrust`);
//!   `httprelay`: the HTTP/1.1 relay of the XFF ports that uses them.
//! - `accesslog`: Envoy-named JSON lines. `metrics`: Prometheus counters. `admin`: probes.
//! - `alloc`: the binary's global allocator, so tokio's 128-byte-aligned blocks (a connection's
//!   task and socket registrations) cost their size and no more (docs/ARCHITECTURE.md,
//!   pitfall 82).
//!
//! Runtime: one current-thread tokio runtime per worker (`--workers`, by default as many as the
//! CPUs the process may use), each accepting on its own `SO_REUSEPORT` listeners; the admin
//! port, signals and the drain live on the first. Every connection is a task of about 1.1 KiB
//! and its two sockets, served by the worker that accepted it; a direction moving bulk bytes
//! borrows a splice pipe from the process's pool (`pipes`), so bulk bytes never enter user
//! space. State that must be per process (the port book, the connection slots, the pipe pool,
//! the per-source counts, our outbound ports) is shared by all workers behind short locks.

// Only the modules that allow it below may use `unsafe`.
#![deny(unsafe_code)]

pub(crate) mod accesslog;
pub(crate) mod addr;
// The global allocator's free lists are raw memory: each `unsafe` block has its SAFETY note.
pub(crate) mod admin;
#[allow(unsafe_code)]
pub(crate) mod alloc;
pub(crate) mod caps;
pub(crate) mod client;
pub(crate) mod config;
pub(crate) mod edge;
pub(crate) mod http1;
pub(crate) mod httprelay;
pub(crate) mod metrics;
pub(crate) mod netcheck;
pub(crate) mod pipes;
pub(crate) mod ports;
pub(crate) mod proxy;
// One whole module stays public: `proxy_protocol`, the pure PROXY v1/v2 codec, is a facade of one
// group (parse, encode, the header's types) that its callers use together, and its names
// (`parse`, `Header`, `Limits`, `Version`) read best qualified.
pub mod proxy_protocol;
pub(crate) mod relay;
// Raw setsockopt/getsockopt, pipe2, splice and rlimit calls neither std nor nix wrap (for
// IP_TRANSPARENT, SO_MARK, TCP_INFO, ...): each `unsafe` block has its SAFETY note.
#[allow(unsafe_code)]
pub(crate) mod sockopt;
#[cfg(test)]
mod testutil;
pub(crate) mod watchdog;
pub(crate) mod xff;

/// The binary's global allocator (tokio's over-aligned blocks without malloc's waste).
pub use alloc::Allocator;
/// The one effective-client decision.
pub use client::{ClientCheck, PodAddrs};
/// Flags + `TPROXY_SIDECAR_*` env -> `Config`, and `--help`, for the binary.
pub use config::{help, parse as parse_config, Config, ConfigError, Parsed};
/// The XFF edge rewrite built on that decision, and the header names it writes.
pub use edge::{rewrite as edge_rewrite, EdgeRewrite, EXTERNAL_ADDRESS, XFF};
/// The pure HTTP/1.1 head reader and body framing of the XFF ports.
pub use http1::{Body, HeadParse, HeadReader, Limits as HttpLimits};

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use config::{InboundMode, ModeFlag};
use proxy::{Role, Shared};
use tproxy_cni_policy::{Defaults, Mode, NorthSouth, PodPolicy};

/// Why the sidecar could not start (or stopped abnormally).
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("annotations file {path}: {reason}")]
    Annotations { path: String, reason: String },
    /// `hint` is `caps::diagnose`'s reading of the process's capability sets.
    #[error("cannot set {what} ({source}): {hint}")]
    Capability {
        what: &'static str,
        source: io::Error,
        hint: String,
    },
    #[error("listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("access log: {0}")]
    AccessLog(io::Error),
    #[error("--upstream-ports contains no odd port to use")]
    NoUpstreamPorts,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The inbound mode to serve, and whether the plugin diverts traffic to us at all (not in mode
/// `none`), i.e. whether readiness should check that the netns is programmed (`netcheck`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub mode: InboundMode,
    pub diverted: bool,
}

/// Decides the inbound mode. `auto` reads the pod's annotations (downward-API file) through the
/// plugin's own policy code, so sidecar and plugin cannot disagree; without a file, tproxy.
pub fn resolve_mode(
    cfg: &Config,
    read: impl Fn(&Path) -> io::Result<String>,
) -> Result<Resolved, SidecarError> {
    resolve(cfg, read).map(|(r, _)| r)
}

/// The inbound mode and the north-south settings. In `auto` mode with an annotations file
/// both come from the pod's annotations (north-south flags given explicitly override the
/// annotation of the same name); otherwise the north-south settings come from the flags.
pub(crate) fn resolve(
    cfg: &Config,
    read: impl Fn(&Path) -> io::Result<String>,
) -> Result<(Resolved, NorthSouth), SidecarError> {
    let diverted = |mode| Resolved {
        mode,
        diverted: true,
    };
    let from_flags = || {
        NorthSouth::from_annotations(&config::north_south_annotations(&cfg.north_south)).map_err(
            |e| SidecarError::Annotations {
                path: "(flags)".into(),
                reason: e.to_string(),
            },
        )
    };
    let ModeFlag::Fixed(m) = cfg.mode else {
        let Some(path) = &cfg.annotations_file else {
            return Ok((diverted(InboundMode::Tproxy), from_flags()?));
        };
        let bad = |reason: String| SidecarError::Annotations {
            path: path.display().to_string(),
            reason,
        };
        let text = read(path).map_err(|e| bad(e.to_string()))?;
        let mut ann =
            tproxy_cni_policy::parse_downward_api(&text).map_err(|e| bad(e.to_string()))?;
        ann.extend(config::north_south_annotations(&cfg.north_south));
        let defaults = Defaults {
            mode: Mode::Tproxy,
            ..Defaults::default()
        };
        let policy =
            PodPolicy::from_annotations(&ann, &defaults).map_err(|e| bad(e.to_string()))?;
        let ns = policy.north_south.clone();
        return Ok((
            match policy.mode {
                Mode::Tproxy => diverted(InboundMode::Tproxy),
                Mode::Redirect => diverted(InboundMode::Redirect),
                // Nothing is diverted to us; serve redirect, which needs no extra privilege.
                Mode::None => {
                    log::warn!(
                        "pod annotations say mode none: the plugin diverts nothing; \
                     serving redirect mode"
                    );
                    Resolved {
                        mode: InboundMode::Redirect,
                        diverted: false,
                    }
                }
            },
            ns,
        ));
    };
    Ok((diverted(m), from_flags()?))
}

/// Runs the sidecar until SIGTERM/SIGINT and the drain that follows.
pub fn run(cfg: Config) -> Result<(), SidecarError> {
    let (Resolved { mode, diverted }, north_south) = resolve(&cfg, |p| std::fs::read_to_string(p))?;

    // The image ships NET_RAW as a permitted-only file capability (docs/ARCHITECTURE.md,
    // pitfall 19): make it effective before anything needs it. Raised here, on the main thread
    // before the runtime exists, so every thread created later inherits it.
    if let Err(e) = sockopt::raise_effective(caps::CAP_NET_RAW) {
        log::warn!("cannot read or raise the capability sets: {e}");
    }
    // Fail early, with the fix in the message, instead of failing every connection later.
    let mark = match sockopt::probe(cfg.mark, mode == InboundMode::Tproxy) {
        Ok(()) => Some(cfg.mark),
        Err((what, e)) if mode == InboundMode::Tproxy => {
            return Err(SidecarError::Capability {
                what: match what {
                    sockopt::Missing::Transparent => "IP_TRANSPARENT",
                    sockopt::Missing::Mark => "SO_MARK",
                },
                source: e,
                hint: caps::diagnose(caps::CapState::current(), &current_exe()),
            })
        }
        Err((_, e)) => {
            // Redirect mode works without the mark as long as the plugin exempts our uid.
            log::warn!("SO_MARK unavailable ({e}); relying on the uid exemption");
            None
        }
    };
    let (slots, pipes, nofile) = match sockopt::raise_nofile() {
        Ok(n) => {
            let Budget { slots, pipes } = connection_budget(cfg.max_connections, n);
            if slots < cfg.max_connections {
                log::warn!(
                    "open-file limit {n} fits {slots} connections \
                     ({FDS_PER_CONNECTION} descriptors each, {pipes} splice pipes shared by all, \
                     {FD_RESERVE} descriptors kept for the admin port and housekeeping); \
                     serving at most {slots}, not --max-connections {}",
                    cfg.max_connections
                );
            }
            (slots, pipes, Some(n))
        }
        Err(e) => {
            log::warn!("cannot read or raise the open-file limit: {e}");
            (cfg.max_connections, pipes::MAX_PIPES, None)
        }
    };
    let log = accesslog::AccessLog::open(&cfg.access_log).map_err(SidecarError::AccessLog)?;
    let ports = ports::PortBook::new(cfg.upstream_ports, cfg.port_linger)
        .ok_or(SidecarError::NoUpstreamPorts)?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Checked with the configured mark even when SO_MARK is unavailable to us: it is the mark
    // the plugin was told to route.
    let checker = diverted.then(|| netcheck::Checker::new(mode, cfg.mark));
    rt.block_on(serve(
        cfg,
        mode,
        mark,
        log,
        ports,
        Budget { slots, pipes },
        nofile,
        checker,
        north_south,
    ))
}

/// Descriptors each relayed connection holds: its two sockets. Splice pipes come from a
/// pool shared by all connections, budgeted apart (docs/ARCHITECTURE.md, pitfall 81).
pub(crate) const FDS_PER_CONNECTION: u64 = 2;
/// Descriptors kept out of the connection budget: stdio, the access log, the listeners, one
/// accepted connection per listener waiting for a slot, the admin port's connections
/// (`admin::MAX_CONCURRENT`), a netlink socket for the readiness check, and slack.
pub(crate) const FD_RESERVE: u64 = 64;

/// How the open-file limit is shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    /// Connection slots.
    pub slots: usize,
    /// Splice pipes at most (`pipes::PipePool`), two descriptors each.
    pub pipes: usize,
}

/// Connection slots and pipes that fit the open-file limit `nofile`: with every slot in use
/// and every pipe open the process still has `FD_RESERVE` descriptors, so the admin port keeps
/// answering probes and accepts never fail with EMFILE. The pipes get an eighth
/// of the descriptors, at most `pipes::MAX_PIPES`, the sockets the rest. At least one slot
/// and one pipe.
pub(crate) fn connection_budget(max_connections: usize, nofile: u64) -> Budget {
    let free = nofile.saturating_sub(FD_RESERVE);
    let pipes = (free / 16).clamp(1, pipes::MAX_PIPES as u64);
    let fit = free.saturating_sub(2 * pipes) / FDS_PER_CONNECTION;
    Budget {
        slots: usize::try_from(fit)
            .unwrap_or(usize::MAX)
            .min(max_connections)
            .max(1),
        pipes: usize::try_from(pipes).unwrap_or(1),
    }
}

/// The running binary's path, for the `setcap` command in the capability hint.
fn current_exe() -> String {
    std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "tproxy-sidecar".to_string())
}

/// The number of workers when `--workers` is `auto`: the CPUs this process may run on, which the
/// standard library reads from the cgroup CPU quota and the affinity mask; 1 when unknown.
pub(crate) fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(config::MAX_WORKERS)
}

/// Binds `port` on 0.0.0.0 and [::]. IPv6 may be absent from the pod (disabled by sysctl): that
/// family is then skipped; IPv4 is required.
fn bind_pair(port: u16, transparent: bool) -> Result<Vec<TcpListener>, SidecarError> {
    bind_pair_std(port, transparent, false)?
        .into_iter()
        .map(|l| TcpListener::from_std(l).map_err(SidecarError::from))
        .collect()
}

/// `bind_pair` before a runtime exists: plain sockets, `SO_REUSEPORT` when several workers
/// share the port.
fn bind_pair_std(
    port: u16,
    transparent: bool,
    reuse_port: bool,
) -> Result<Vec<std::net::TcpListener>, SidecarError> {
    let mut out = Vec::new();
    for ip in [
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    ] {
        let addr = SocketAddr::new(ip, port);
        match sockopt::listener(addr, transparent, reuse_port, 4096) {
            Ok(l) => out.push(l),
            Err(e)
                if ip.is_ipv6()
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                    ) =>
            {
                log::info!("no IPv6 here ({e}); listening on IPv4 only");
            }
            Err(source) => return Err(SidecarError::Bind { addr, source }),
        }
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)] // one call site, in `run`
async fn serve(
    cfg: Config,
    mode: InboundMode,
    mark: Option<u32>,
    log: accesslog::AccessLog,
    ports: ports::PortBook,
    Budget { slots, pipes }: Budget,
    nofile: Option<u64>,
    checker: Option<netcheck::Checker>,
    north_south: NorthSouth,
) -> Result<(), SidecarError> {
    // Said at start (the log line names the likely cause); `/ready` asks again.
    if let Some(c) = &checker {
        let _ = c.ready();
    }
    let health = Arc::new(admin::Health {
        intercepted: checker,
        ..admin::Health::default()
    });
    let metrics = Arc::new(metrics::Metrics::default());
    metrics.set_limit(slots);
    metrics.set_nofile(nofile);
    let pipes = Arc::new(pipes::PipePool::new(cfg.pipe_size, pipes));
    metrics.set_pipes(&pipes);
    let (stop_tx, stop_rx) = watch::channel(false);
    // The admin port outlives the drain: liveness stays 200 and readiness says 503 meanwhile.
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);

    // Admin first, so /healthz answers (and /ready says "starting") while listeners come up.
    let mut admin_task = None;
    if let Some(p) = cfg.admin_port {
        let ls = bind_pair(p, false)?;
        admin_task = Some(tokio::spawn(admin::serve(
            ls,
            health.clone(),
            metrics.clone(),
            admin_stop_rx,
        )));
    }
    // One set of listeners per worker, all bound before any worker starts, so a port that is
    // taken fails the start-up rather than one worker.
    let workers = cfg.workers.unwrap_or_else(default_workers).max(1);
    let reuse = workers > 1;
    let sets = (0..workers)
        .map(|_| bind_worker_set(&cfg, mode, reuse))
        .collect::<Result<Vec<_>, _>>()?;

    let max = slots;
    let permits = Arc::new(Semaphore::new(max));
    let drain_timeout = cfg.drain_timeout;
    log::info!(
        "{} mode, {workers} worker{}; inbound :{}, outbound {}, admin {}, mark {}",
        mode.as_str(),
        if workers == 1 { "" } else { "s" },
        cfg.inbound_port,
        cfg.outbound_port.map_or("off".into(), |p| format!(":{p}")),
        cfg.admin_port.map_or("off".into(), |p| format!(":{p}")),
        mark.map_or("off".into(), |m| format!("{m:#x}")),
    );
    let shared = Arc::new(Shared {
        cfg,
        metrics,
        log,
        ports: Arc::new(ports),
        pipes,
        permits: permits.clone(),
        mark,
        cut: watchdog::Cut::default(),
        mode,
        outbound_ports: Arc::default(),
        sources: Arc::default(),
        error_log: std::sync::Mutex::new(proxy::RateLimit::new(Duration::from_secs(10))),
        ns: proxy::NorthSouthRt::new(north_south),
    });
    // Workers 2..n: their own thread and runtime. Connection tasks run on the runtime that
    // accepted them, so a worker's runtime lives until the process's drain is over (`done`).
    let (done_tx, done_rx) = watch::channel(false);
    let mut sets = sets.into_iter();
    let first = sets.next().unwrap_or_default();
    let threads = spawn_workers(sets, &shared, &stop_rx, &done_rx)?;
    let accept_tasks = spawn_accept_loops(&shared, first, &stop_rx);
    health.ready.store(true, Ordering::Relaxed);

    wait_for_signal().await?;
    log::info!("draining (up to {drain_timeout:?})");
    health.draining.store(true, Ordering::Relaxed);
    // Stop accepting: each accept loop returns and drops (closes) its listener.
    let _ = stop_tx.send(true);
    for t in accept_tasks {
        let _ = t.await;
    }
    drain(&shared, &permits, max, drain_timeout).await;
    let _ = done_tx.send(true);
    for t in threads {
        let _ = t.join();
    }
    let _ = admin_stop_tx.send(true);
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    log::info!("stopped");
    Ok(())
}

/// One worker's listeners: inbound, and outbound when configured.
fn bind_worker_set(
    cfg: &Config,
    mode: InboundMode,
    reuse: bool,
) -> Result<Vec<(std::net::TcpListener, Role)>, SidecarError> {
    let mut set = Vec::new();
    for l in bind_pair_std(cfg.inbound_port, mode == InboundMode::Tproxy, reuse)? {
        set.push((l, Role::Inbound(mode)));
    }
    if let Some(p) = cfg.outbound_port {
        for l in bind_pair_std(p, false, reuse)? {
            set.push((l, Role::Outbound));
        }
    }
    Ok(set)
}

/// Workers 2..n: each on its own thread and current-thread runtime, which lives until `done`
/// (its connection tasks run on it through the drain).
fn spawn_workers(
    sets: impl Iterator<Item = Vec<(std::net::TcpListener, Role)>>,
    shared: &Arc<Shared>,
    stop_rx: &watch::Receiver<bool>,
    done_rx: &watch::Receiver<bool>,
) -> Result<Vec<std::thread::JoinHandle<()>>, SidecarError> {
    let mut threads = Vec::new();
    for (i, set) in sets.enumerate() {
        let (shared, stop, mut done) = (shared.clone(), stop_rx.clone(), done_rx.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let t = std::thread::Builder::new()
            .name(format!("worker-{}", i + 1))
            .spawn(move || {
                rt.block_on(async move {
                    let tasks = spawn_accept_loops(&shared, set, &stop);
                    for t in tasks {
                        let _ = t.await;
                    }
                    let _ = done.wait_for(|v| *v).await;
                })
            })?;
        threads.push(t);
    }
    Ok(threads)
}

/// Waits for the in-flight connections up to `drain_timeout`, then cuts the rest.
async fn drain(shared: &Shared, permits: &Semaphore, max: usize, drain_timeout: Duration) {
    // Every in-flight connection holds a permit; all permits back = all connections done.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain_timeout, permits.acquire_many(all))
        .await
        .is_err()
    {
        log::warn!("drain deadline reached; cutting remaining connections");
        shared.cut.cut();
        // Let the cut connections write their access-log lines.
        let _ = tokio::time::timeout(Duration::from_secs(1), permits.acquire_many(all)).await;
    }
}

/// Registers one worker's listeners with the current runtime and starts their accept loops.
/// A listener the runtime cannot take is reported and skipped: the other workers serve.
fn spawn_accept_loops(
    shared: &Arc<Shared>,
    set: Vec<(std::net::TcpListener, Role)>,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (l, role) in set {
        let l = match TcpListener::from_std(l) {
            Ok(l) => Arc::new(l),
            Err(e) => {
                log::error!("listener: {e}");
                continue;
            }
        };
        let label = match role {
            Role::Inbound(_) => "inbound",
            Role::Outbound => "outbound",
        };
        shared.metrics.add_listener(label, &l);
        tasks.push(tokio::spawn(proxy::accept_loop(
            shared.clone(),
            l,
            role,
            stop.clone(),
        )));
    }
    tasks
}

async fn wait_for_signal() -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cfg(args: &[&str]) -> Config {
        let a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        match config::parse(&a, &BTreeMap::new()).unwrap() {
            config::Parsed::Run(c) => *c,
            config::Parsed::Help => unreachable!(),
        }
    }

    #[test]
    fn connection_budget_fits_the_open_file_limit() {
        let b = |slots, pipes| Budget { slots, pipes };
        assert_eq!(connection_budget(4096, 1 << 20), b(4096, 256));
        // `ulimit -n 256`: 192 free, 12 pipes (24 descriptors), (192 - 24) / 2 slots.
        assert_eq!(connection_budget(4096, 256), b(84, 12));
        assert_eq!(connection_budget(10, 256), b(10, 12));
        // This machine's hard limit: 3,322 slots at six descriptors each before.
        assert_eq!(connection_budget(100_000, 20_000), b(9712, 256));
        assert_eq!(connection_budget(4096, 10), b(1, 1));
    }

    #[test]
    fn north_south_from_annotations_and_flags() {
        use tproxy_cni_policy::XffTrust;
        // auto: the pod's annotations, a flag given overrides its own key only.
        let c = cfg(&["--annotations-file", "/x", "--xff-num-trusted-proxies", "2"]);
        let text =
            "tproxy-cni.io/xff-ports=\"8080\"\ntproxy-cni.io/xff-num-trusted-proxies=\"1\"\n\
                    tproxy-cni.io/deny-client-cidrs=\"203.0.113.0/24\"\n";
        let (r, ns) = resolve(&c, |_| Ok(text.to_string())).unwrap();
        assert_eq!(r.mode, InboundMode::Tproxy);
        assert!(ns.xff_on(8080));
        assert_eq!(ns.xff_trust, XffTrust::Hops(2), "the flag wins");
        assert_eq!(ns.acl.deny_client.len(), 1);
        // A flag that makes the pod's annotations inconsistent is refused, naming the key.
        let c = cfg(&[
            "--annotations-file",
            "/x",
            "--xff-trusted-cidrs",
            "10.0.0.0/8",
        ]);
        let e = resolve(&c, |_| Ok(text.to_string())).unwrap_err();
        assert!(e.to_string().contains("xff-trusted-cidrs"), "{e}");
        // Fixed mode: the flags alone.
        let c = cfg(&[
            "--mode",
            "tproxy",
            "--xff-ports",
            "80",
            "--allow-peer-cidrs",
            "10.0.0.0/8",
        ]);
        let (_, ns) = resolve(&c, |_| panic!("not read")).unwrap();
        assert!(ns.xff_on(80));
        assert_eq!(ns.acl.allow_peer.len(), 1);
        let (_, ns) = resolve(&cfg(&[]), |_| panic!()).unwrap();
        assert_eq!(ns, NorthSouth::default());
    }

    #[test]
    fn auto_mode_follows_annotations() {
        let c = cfg(&["--mode", "auto", "--annotations-file", "/x"]);
        let m = |text: &'static str| resolve_mode(&c, move |_| Ok(text.to_string()));
        let on = |mode| Resolved {
            mode,
            diverted: true,
        };
        assert_eq!(m("").unwrap(), on(InboundMode::Tproxy));
        assert_eq!(
            m("tproxy-cni.io/mode=\"redirect\"\n").unwrap(),
            on(InboundMode::Redirect)
        );
        assert_eq!(
            m("sidecar.istio.io/interceptionMode=\"TPROXY\"\n").unwrap(),
            on(InboundMode::Tproxy)
        );
        // Mode none: nothing diverted, so nothing to verify.
        assert_eq!(
            m("tproxy-cni.io/mode=\"none\"\n").unwrap(),
            Resolved {
                mode: InboundMode::Redirect,
                diverted: false
            }
        );
        let e = m("tproxy-cni.io/mode=\"sideways\"\n").unwrap_err();
        assert!(e.to_string().contains("tproxy-cni.io/mode"), "{e}");
        assert!(m("not a line").is_err());
        let missing = resolve_mode(&c, |_| Err(io::Error::from(io::ErrorKind::NotFound)));
        assert!(missing.is_err());
        let fixed = cfg(&["--mode", "redirect", "--annotations-file", "/x"]);
        assert_eq!(
            resolve_mode(&fixed, |_| panic!("not read")).unwrap(),
            on(InboundMode::Redirect)
        );
        assert_eq!(
            resolve_mode(&cfg(&[]), |_| panic!()).unwrap(),
            on(InboundMode::Tproxy)
        );
    }
}
