//! Prometheus counters of the sidecar, rendered as text exposition format for `/metrics`.
//!
//! Plain atomics: the hot path only does relaxed increments; rendering reads them lazily.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Which listener a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
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
    pub fn as_str(self) -> &'static str {
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
pub struct Metrics {
    dirs: [PerDir; 2],
}

impl Metrics {
    pub fn conn_opened(&self, d: Direction) {
        let m = &self.dirs[d.idx()];
        m.total.fetch_add(1, Relaxed);
        m.active.fetch_add(1, Relaxed);
    }
    pub fn conn_closed(&self, d: Direction, from_downstream: u64, to_downstream: u64) {
        let m = &self.dirs[d.idx()];
        m.active.fetch_sub(1, Relaxed);
        m.bytes_in.fetch_add(from_downstream, Relaxed);
        m.bytes_out.fetch_add(to_downstream, Relaxed);
    }
    pub fn connect_failed(&self, d: Direction) {
        self.dirs[d.idx()].connect_failures.fetch_add(1, Relaxed);
    }
    pub fn connect_latency(&self, d: Direction, t: Duration) {
        let m = &self.dirs[d.idx()];
        let secs = t.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            m.hist[i].fetch_add(1, Relaxed);
        }
        m.hist_count.fetch_add(1, Relaxed);
        m.hist_sum_us
            .fetch_add(u64::try_from(t.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }
    pub fn active(&self, d: Direction) -> i64 {
        self.dirs[d.idx()].active.load(Relaxed)
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
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
        s
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
}
