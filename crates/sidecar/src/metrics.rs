//! Prometheus counters of the sidecar, rendered as text exposition format for `/metrics`.
//!
//! Plain atomics: the hot path only does relaxed increments; rendering reads them lazily.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Which listener a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn idx(self) -> usize {
        match self {
            Direction::Inbound => 0,
            Direction::Outbound => 1,
        }
    }
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

const DIRS: [Direction; 2] = [Direction::Inbound, Direction::Outbound];

/// Upper bounds (seconds) of the upstream connect latency histogram. A SYN retransmit shows up
/// as >= 1 s, which is why the buckets reach past it.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default)]
struct PerDir {
    total: AtomicU64,
    active: AtomicI64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    connect_failures: AtomicU64,
    hist: [AtomicU64; BUCKETS.len()],
    hist_count: AtomicU64,
    hist_sum_us: AtomicU64,
}

/// All counters.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    dirs: [PerDir; 2],
    /// Connection slots: `--max-connections`, lowered to what the open-file limit allows.
    limit: AtomicU64,
    /// Slots taken (connections being served, whichever listener).
    in_use: AtomicI64,
    /// Accepted connections waiting for a slot (at most one per listener; the rest wait in
    /// the kernel's accept queue, reported by `listeners`).
    waiting: AtomicI64,
    /// Accepts, sockets or pipes refused for lack of descriptors (EMFILE/ENFILE).
    fd_exhausted: AtomicU64,
    /// Connections reset because their source IP held `--max-connections-per-source`.
    per_source_rejected: AtomicU64,
    /// The open-file limit (0: unknown).
    nofile: AtomicU64,
    /// The splice pipe pool, for its gauges.
    pipes: std::sync::OnceLock<std::sync::Arc<super::pipes::PipePool>>,
    /// The data listeners, for their accept queues. Weak: a listener closes when its accept
    /// loop drops it (drain), whatever the metrics hold.
    listeners: std::sync::Mutex<Vec<(&'static str, std::sync::Weak<tokio::net::TcpListener>)>>,
    /// North-south counters by (family, label value); labels come from fixed sets
    /// (`proxy_protocol::Error::label`, `annotations::acl::Denied::label`, HTTP statuses), never from input.
    labeled: std::sync::Mutex<std::collections::BTreeMap<(NsCounter, &'static str), u64>>,
}

/// The labelled north-south counter families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum NsCounter {
    /// PROXY protocol on the configured ports, by `result`: `proxy`, `local`, `untrusted`
    /// (source not trusted: bytes passed untouched), or why the header was refused.
    ProxyProtocol,
    /// Connections or requests refused by the IP access control, by `reason`.
    RbacDenied,
    /// HTTP requests on the XFF ports, by `result`: `forwarded`, or the status we answered.
    HttpRequests,
    /// Claimed clients (PROXY header, X-Forwarded-For) not believed, by `reason`.
    ClientFallback,
}

const NS_COUNTERS: [(NsCounter, &str, &str, &str); 4] = [
    (
        NsCounter::ProxyProtocol,
        "tproxy_sidecar_proxy_protocol_total",
        "result",
        "Connections on PROXY protocol ports: header accepted (proxy, local), source not trusted (untrusted: bytes passed untouched), or refused and reset (the reason).",
    ),
    (
        NsCounter::RbacDenied,
        "tproxy_sidecar_rbac_denied_total",
        "reason",
        "Connections reset or HTTP requests answered 403 by the IP access control.",
    ),
    (
        NsCounter::HttpRequests,
        "tproxy_sidecar_http_requests_total",
        "result",
        "HTTP requests on X-Forwarded-For ports: forwarded, or the status the sidecar answered.",
    ),
    (
        NsCounter::ClientFallback,
        "tproxy_sidecar_effective_client_fallback_total",
        "reason",
        "Clients named by a PROXY header or X-Forwarded-For that no remote client can have (loopback, unspecified, multicast, reserved, broadcast, the pod's own address): the peer was used instead.",
    ),
];

/// Descriptors open in this process, counted in `/proc/self/fd` (`None` without procfs).
fn open_descriptors() -> Option<usize> {
    // The directory handle itself is one entry of the listing.
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count().saturating_sub(1))
}

/// Slots held by one served connection; given back on drop.
#[derive(Debug)]
pub(crate) struct SlotGuard<'a>(&'a Metrics);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Relaxed);
    }
}

/// An accepted connection waiting for a slot; counted until dropped.
#[derive(Debug)]
pub(crate) struct WaitGuard<'a>(&'a Metrics);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    pub(crate) fn conn_opened(&self, d: Direction) {
        let m = &self.dirs[d.idx()];
        m.total.fetch_add(1, Relaxed);
        m.active.fetch_add(1, Relaxed);
    }
    pub(crate) fn conn_closed(&self, d: Direction, from_downstream: u64, to_downstream: u64) {
        let m = &self.dirs[d.idx()];
        m.active.fetch_sub(1, Relaxed);
        m.bytes_in.fetch_add(from_downstream, Relaxed);
        m.bytes_out.fetch_add(to_downstream, Relaxed);
    }
    pub(crate) fn connect_failed(&self, d: Direction) {
        self.dirs[d.idx()].connect_failures.fetch_add(1, Relaxed);
    }
    pub(crate) fn connect_latency(&self, d: Direction, t: Duration) {
        let m = &self.dirs[d.idx()];
        let secs = t.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            m.hist[i].fetch_add(1, Relaxed);
        }
        m.hist_count.fetch_add(1, Relaxed);
        m.hist_sum_us
            .fetch_add(u64::try_from(t.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }
    pub(crate) fn set_limit(&self, n: usize) {
        self.limit.store(n as u64, Relaxed);
    }
    pub(crate) fn set_nofile(&self, n: Option<u64>) {
        self.nofile.store(n.unwrap_or(0), Relaxed);
    }
    pub(crate) fn set_pipes(&self, pool: &std::sync::Arc<super::pipes::PipePool>) {
        let _ = self.pipes.set(pool.clone());
    }
    pub(crate) fn slot_taken(&self) -> SlotGuard<'_> {
        self.in_use.fetch_add(1, Relaxed);
        SlotGuard(self)
    }
    pub(crate) fn waiting_for_slot(&self) -> WaitGuard<'_> {
        self.waiting.fetch_add(1, Relaxed);
        WaitGuard(self)
    }
    pub(crate) fn fd_exhausted(&self) {
        self.fd_exhausted.fetch_add(1, Relaxed);
    }
    pub(crate) fn per_source_rejected(&self) {
        self.per_source_rejected.fetch_add(1, Relaxed);
    }
    /// Counts one event of a north-south family.
    pub(crate) fn count(&self, c: NsCounter, label: &'static str) {
        self.count_n(c, label, 1);
    }
    /// Counts `n` events of a north-south family.
    pub(crate) fn count_n(&self, c: NsCounter, label: &'static str, n: u64) {
        if n == 0 {
            return;
        }
        *self
            .labeled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((c, label))
            .or_insert(0) += n;
    }
    /// Every slot is taken: a new connection would wait (readiness says 503, admin.rs).
    pub(crate) fn saturated(&self) -> bool {
        let limit = self.limit.load(Relaxed);
        limit > 0 && self.in_use.load(Relaxed) >= i64::try_from(limit).unwrap_or(i64::MAX)
    }
    /// Registers a data listener under `label` (e.g. `inbound`, `outbound`) for the accept
    /// queue gauges.
    pub(crate) fn add_listener(
        &self,
        label: &'static str,
        l: &std::sync::Arc<tokio::net::TcpListener>,
    ) {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((label, std::sync::Arc::downgrade(l)));
    }
    /// (label, family, queued, backlog) per listener label and family, summed over the
    /// workers' `SO_REUSEPORT` listeners of that port (one series each, in registration order).
    fn accept_queues(&self) -> Vec<(&'static str, &'static str, u32, u32)> {
        let ls = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(&'static str, &'static str, u32, u32)> = Vec::new();
        for (label, w) in ls.iter() {
            let Some(l) = w.upgrade() else { continue };
            let fam = match l.local_addr() {
                Ok(std::net::SocketAddr::V4(_)) => "ipv4",
                Ok(std::net::SocketAddr::V6(_)) => "ipv6",
                Err(_) => continue,
            };
            let Ok((q, max)) = super::sockopt::accept_queue(&*l) else {
                continue;
            };
            match out.iter_mut().find(|e| e.0 == *label && e.1 == fam) {
                Some(e) => {
                    e.2 = e.2.saturating_add(q);
                    e.3 = e.3.saturating_add(max);
                }
                None => out.push((*label, fam, q, max)),
            }
        }
        out
    }

    /// Prometheus text exposition format 0.0.4.
    pub(crate) fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        self.render_per_direction(&mut s);
        self.render_gauges(&mut s);
        self.render_accept_queues(&mut s);
        self.render_labeled(&mut s);
        self.render_connect_seconds(&mut s);
        s
    }

    /// The per-direction connection and byte counters.
    fn render_per_direction(&self, s: &mut String) {
        let mut family = |name: &str, kind: &str, help: &str, get: &dyn Fn(&PerDir) -> String| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for d in DIRS {
                let _ = writeln!(
                    s,
                    "{name}{{direction=\"{}\"}} {}",
                    d.as_str(),
                    get(&self.dirs[d.idx()])
                );
            }
        };
        family(
            "tproxy_sidecar_connections_total",
            "counter",
            "Accepted downstream connections.",
            &|m| m.total.load(Relaxed).to_string(),
        );
        family(
            "tproxy_sidecar_connections_active",
            "gauge",
            "Connections being relayed now.",
            &|m| m.active.load(Relaxed).to_string(),
        );
        family(
            "tproxy_sidecar_received_bytes_total",
            "counter",
            "Bytes received from downstream (closed connections).",
            &|m| m.bytes_in.load(Relaxed).to_string(),
        );
        family(
            "tproxy_sidecar_sent_bytes_total",
            "counter",
            "Bytes sent to downstream (closed connections).",
            &|m| m.bytes_out.load(Relaxed).to_string(),
        );
        family(
            "tproxy_sidecar_upstream_connect_failures_total",
            "counter",
            "Upstream connects that failed or timed out.",
            &|m| m.connect_failures.load(Relaxed).to_string(),
        );
    }

    /// Slots, pipes, descriptors and the per-source refusals.
    fn render_gauges(&self, s: &mut String) {
        let mut gauge = |name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        gauge(
            "tproxy_sidecar_connections_limit",
            "gauge",
            "Connection slots (--max-connections, lowered to fit the open-file limit).",
            self.limit.load(Relaxed).to_string(),
        );
        gauge(
            "tproxy_sidecar_connections_in_use",
            "gauge",
            "Connection slots taken; at the limit new connections wait and /ready is 503.",
            self.in_use.load(Relaxed).to_string(),
        );
        gauge(
            "tproxy_sidecar_connections_waiting",
            "gauge",
            "Accepted connections waiting for a slot (more wait in the accept queue).",
            self.waiting.load(Relaxed).to_string(),
        );
        gauge(
            "tproxy_sidecar_fd_exhausted_total",
            "counter",
            "Accepts, sockets or pipes refused for lack of file descriptors (EMFILE/ENFILE).",
            self.fd_exhausted.load(Relaxed).to_string(),
        );
        if let Some(p) = self.pipes.get() {
            let st = p.stats();
            gauge(
                "tproxy_sidecar_pipes_limit",
                "gauge",
                "Splice pipes the pool may hold at once, idle or lent (a share of the open-file limit).",
                st.limit.to_string(),
            );
            gauge(
                "tproxy_sidecar_pipes_open",
                "gauge",
                "Splice pipes open: idle in the pool or lent (two descriptors each).",
                st.open.to_string(),
            );
            gauge(
                "tproxy_sidecar_pipes_in_use",
                "gauge",
                "Splice pipes lent to a relay direction that is moving bytes.",
                st.in_use.to_string(),
            );
        }
        if let Some(n) = open_descriptors() {
            gauge(
                "tproxy_sidecar_descriptors_open",
                "gauge",
                "File descriptors the process holds (sockets, pipes, listeners, log).",
                n.to_string(),
            );
        }
        let nofile = self.nofile.load(Relaxed);
        if nofile > 0 {
            gauge(
                "tproxy_sidecar_descriptors_limit",
                "gauge",
                "The open-file limit (RLIMIT_NOFILE) that connection slots and pipes are sized to.",
                nofile.to_string(),
            );
        }
        gauge(
            "tproxy_sidecar_per_source_rejected_total",
            "counter",
            "Connections reset because their source IP held --max-connections-per-source.",
            self.per_source_rejected.load(Relaxed).to_string(),
        );
    }

    /// The kernel accept queues of our listeners, and their capacity.
    fn render_accept_queues(&self, s: &mut String) {
        let queues = self.accept_queues();
        for (name, help, pick) in [
            (
                "tproxy_sidecar_accept_queue",
                "Handshaken connections waiting in the kernel's accept queue.",
                (|q: &(&str, &str, u32, u32)| q.2) as fn(&(&str, &str, u32, u32)) -> u32,
            ),
            (
                "tproxy_sidecar_accept_queue_limit",
                "Accept queue capacity (listen backlog, capped by net.core.somaxconn).",
                |q: &(&str, &str, u32, u32)| q.3,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge");
            for q in &queues {
                let _ = writeln!(
                    s,
                    "{name}{{listener=\"{}\",family=\"{}\"}} {}",
                    q.0,
                    q.1,
                    pick(q)
                );
            }
        }
    }

    /// The north-south counters, one series per label value.
    fn render_labeled(&self, s: &mut String) {
        let labeled = self.labeled.lock().unwrap_or_else(|p| p.into_inner());
        for (c, name, label, help) in NS_COUNTERS {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((_, value), n) in labeled.range((c, "")..).take_while(|((k, _), _)| *k == c) {
                let _ = writeln!(s, "{name}{{{label}=\"{value}\"}} {n}");
            }
        }
    }

    /// The upstream connect latency histogram, per direction.
    fn render_connect_seconds(&self, s: &mut String) {
        let name = "tproxy_sidecar_upstream_connect_seconds";
        let _ = writeln!(
            s,
            "# HELP {name} Upstream connect latency.\n# TYPE {name} histogram"
        );
        for d in DIRS {
            let m = &self.dirs[d.idx()];
            let dl = d.as_str();
            let mut cum = 0u64;
            for (i, b) in BUCKETS.iter().enumerate() {
                cum += m.hist[i].load(Relaxed);
                let _ = writeln!(s, "{name}_bucket{{direction=\"{dl}\",le=\"{b}\"}} {cum}");
            }
            let count = m.hist_count.load(Relaxed);
            let _ = writeln!(s, "{name}_bucket{{direction=\"{dl}\",le=\"+Inf\"}} {count}");
            let sum = m.hist_sum_us.load(Relaxed) as f64 / 1e6;
            let _ = writeln!(s, "{name}_sum{{direction=\"{dl}\"}} {sum}");
            let _ = writeln!(s, "{name}_count{{direction=\"{dl}\"}} {count}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_counts_and_histogram() {
        let m = Metrics::default();
        m.conn_opened(Direction::Inbound);
        m.connect_latency(Direction::Inbound, Duration::from_micros(800));
        m.connect_latency(Direction::Inbound, Duration::from_secs(3));
        m.conn_closed(Direction::Inbound, 10, 20);
        m.connect_failed(Direction::Outbound);
        let t = m.render();
        assert!(t.contains("tproxy_sidecar_connections_total{direction=\"inbound\"} 1"));
        assert!(t.contains("tproxy_sidecar_connections_active{direction=\"inbound\"} 0"));
        assert!(t.contains("tproxy_sidecar_received_bytes_total{direction=\"inbound\"} 10"));
        assert!(t.contains("tproxy_sidecar_sent_bytes_total{direction=\"inbound\"} 20"));
        assert!(
            t.contains("tproxy_sidecar_upstream_connect_failures_total{direction=\"outbound\"} 1")
        );
        assert!(t.contains(
            "tproxy_sidecar_upstream_connect_seconds_bucket{direction=\"inbound\",le=\"0.001\"} 1"
        ));
        assert!(t.contains(
            "tproxy_sidecar_upstream_connect_seconds_bucket{direction=\"inbound\",le=\"+Inf\"} 2"
        ));
    }

    #[test]
    fn north_south_counters() {
        let m = Metrics::default();
        m.count(NsCounter::ProxyProtocol, "proxy");
        m.count(NsCounter::ProxyProtocol, "proxy");
        m.count(NsCounter::ProxyProtocol, "timeout");
        m.count(NsCounter::RbacDenied, "peer_denied");
        m.count(NsCounter::HttpRequests, "431");
        let t = m.render();
        assert!(
            t.contains("tproxy_sidecar_proxy_protocol_total{result=\"proxy\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("tproxy_sidecar_proxy_protocol_total{result=\"timeout\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("tproxy_sidecar_rbac_denied_total{reason=\"peer_denied\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("tproxy_sidecar_http_requests_total{result=\"431\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("# TYPE tproxy_sidecar_http_requests_total counter"),
            "{t}"
        );
    }

    #[test]
    fn slots_saturation_and_accept_queue() {
        let m = Metrics::default();
        m.set_limit(2);
        let a = m.slot_taken();
        assert!(!m.saturated());
        let b = m.slot_taken();
        assert!(m.saturated());
        let w = m.waiting_for_slot();
        let t = m.render();
        assert!(t.contains("tproxy_sidecar_connections_limit 2\n"), "{t}");
        assert!(t.contains("tproxy_sidecar_connections_in_use 2\n"), "{t}");
        assert!(t.contains("tproxy_sidecar_connections_waiting 1\n"), "{t}");
        drop((a, w));
        assert!(!m.saturated());
        let t = m.render();
        assert!(t.contains("tproxy_sidecar_connections_in_use 1\n"), "{t}");
        assert!(t.contains("tproxy_sidecar_connections_waiting 0\n"), "{t}");
        drop(b);

        // A real listener with two handshaken, never accepted connections.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let std_l =
                super::super::sockopt::listener("127.0.0.1:0".parse().unwrap(), false, false, 16)
                    .unwrap();
            let l = std::sync::Arc::new(tokio::net::TcpListener::from_std(std_l).unwrap());
            m.add_listener("inbound", &l);
            let a = l.local_addr().unwrap();
            let _c1 = tokio::net::TcpStream::connect(a).await.unwrap();
            let _c2 = tokio::net::TcpStream::connect(a).await.unwrap();
            let t = m.render();
            assert!(
                t.contains("tproxy_sidecar_accept_queue{listener=\"inbound\",family=\"ipv4\"} 2"),
                "{t}"
            );
            assert!(t.contains(
                "tproxy_sidecar_accept_queue_limit{listener=\"inbound\",family=\"ipv4\"} 16"
            ));
            // Closed listener: gone from the metrics, not kept open by them.
            drop(l);
            assert!(!m.render().contains("tproxy_sidecar_accept_queue{"));
        });
    }

    #[test]
    fn pipe_pool_and_descriptor_gauges() {
        let m = Metrics::default();
        assert!(
            !m.render().contains("tproxy_sidecar_pipes_"),
            "no pool, no gauges"
        );
        let pool = std::sync::Arc::new(crate::pipes::PipePool::new(65536, 7));
        m.set_pipes(&pool);
        m.set_nofile(Some(20_000));
        let lease = pool.take().unwrap().expect("a pipe");
        let t = m.render();
        for line in [
            "tproxy_sidecar_pipes_limit 7\n",
            "tproxy_sidecar_pipes_open 1\n",
            "tproxy_sidecar_pipes_in_use 1\n",
            "tproxy_sidecar_descriptors_limit 20000\n",
        ] {
            assert!(t.contains(line), "{line}: {t}");
        }
        let open: usize = t
            .lines()
            .find_map(|l| l.strip_prefix("tproxy_sidecar_descriptors_open "))
            .and_then(|v| v.parse().ok())
            .expect("descriptors_open");
        assert!(open >= 3, "stdio and the pipe at least: {open}");
        lease.drained();
        let t = m.render();
        assert!(t.contains("tproxy_sidecar_pipes_open 1\n"), "{t}");
        assert!(t.contains("tproxy_sidecar_pipes_in_use 0\n"), "{t}");
    }
}
