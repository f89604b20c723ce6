//! Upstream source-port choice for tproxy mode (docs/ARCHITECTURE.md, pitfall 12).
//!
//! The upstream leg `client_ip:p -> orig_dst` lives in the same netns, conntrack table and
//! socket table as the client's own inbound legs `client_ip:c -> orig_dst`. If `p` equals a
//! live inbound `c` (or one that closed recently and still lingers in conntrack/TIME_WAIT),
//! our SYN is matched to the wrong flow and swallowed: a 1-3 s stall. Letting the kernel pick
//! (`IP_BIND_ADDRESS_NO_PORT`, or port 0) cannot help, because the kernel does not know the
//! inbound tuples (their local address is the pod's, not the client's). We do: every inbound
//! connection is TPROXY'd to us. So we keep, per (client IP, original destination), the client
//! ports seen live or within the linger time, and choose odd ports outside that set. Odd,
//! because Linux clients' `connect()` prefers even ports: their *future* ports then do not
//! land on our live upstreams either.
//!
//! The book also holds the upstream tuples our own sockets keep in TIME_WAIT. When the client
//! closes first, the sidecar sends the first FIN on the app leg, so its upstream socket holds
//! `client_ip:p -> dst` in TIME_WAIT for 60 s. With TCP timestamps on, a `connect()` from an
//! explicitly bound port takes such a tuple over at once; without them (`net.ipv4.tcp_timestamps
//! = 0` in the pod) it fails with `EADDRNOTAVAIL` for the whole 60 s (docs/ARCHITECTURE.md,
//! pitfall 12). Odd ports alone then carry at most (odd ports in the range) / 60 s new
//! connections per client IP and destination: 264/s with the default range. So `pick` skips
//! tuples known to be in TIME_WAIT without trying them, and when the odd ports near the cursor
//! are all taken it uses the even ports of the range too, which doubles that ceiling (529/s),
//! above what one Linux client with the default ephemeral range can open without timestamps
//! itself (its own TIME_WAIT caps it at 28,232 ports / 60 s = 470/s).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tproxy_cni_policy::PortRange;

type Key = (IpAddr, SocketAddr);

#[derive(Debug, Clone, Copy)]
struct Seen {
    live: u32,
    last: Instant,
}

#[derive(Debug)]
struct Inner {
    keys: HashMap<Key, HashMap<u16, Seen>>,
    /// Upstream ports whose tuple one of our sockets holds in TIME_WAIT, with the time it ends.
    time_wait: HashMap<Key, HashMap<u16, Instant>>,
    /// Next candidates: odd (preferred) and even ports of the range.
    cursor: [u16; 2],
    last_sweep: Instant,
}

/// The record of recent inbound client ports and the upstream port cursor.
#[derive(Debug)]
pub(crate) struct PortBook {
    inner: Mutex<Inner>,
    /// Odd ports of the configured range (`first[0]..=last[0]`, both odd), then even ones
    /// (`first[1]..=last[1]`; `None` when the range holds no even port).
    first: [u16; 2],
    last: [u16; 2],
    has_even: bool,
    linger: Duration,
}

/// Marks an inbound connection live until dropped; then it lingers for the configured time.
#[derive(Debug)]
pub(crate) struct InboundGuard {
    book: Arc<PortBook>,
    key: Key,
    port: u16,
}

const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// How long Linux keeps a socket in TIME_WAIT (`TCP_TIMEWAIT_LEN`, not tunable).
pub(crate) const TIME_WAIT: Duration = Duration::from_secs(60);

/// Candidates looked at per parity and pick: bounds the work of one pick when most ports are
/// taken (ports enter TIME_WAIT in cursor order, so the cursor meets the oldest ones first).
const SCAN: usize = 512;

impl PortBook {
    /// `None` when the range holds no odd port.
    pub(crate) fn new(range: PortRange, linger: Duration) -> Option<PortBook> {
        let first = if range.lo % 2 == 1 {
            range.lo
        } else {
            range.lo.checked_add(1)?
        };
        let last = if range.hi % 2 == 1 {
            range.hi
        } else {
            range.hi.checked_sub(1)?
        };
        if first > last {
            return None;
        }
        // Even ports: the range's first and last even port, if it holds any.
        let first_even = if range.lo % 2 == 0 {
            Some(range.lo)
        } else {
            range.lo.checked_add(1)
        };
        let last_even = if range.hi % 2 == 0 {
            Some(range.hi)
        } else {
            range.hi.checked_sub(1)
        };
        let (first_even, last_even, has_even) = match (first_even, last_even) {
            (Some(f), Some(l)) if f <= l => (f, l, true),
            _ => (first, last, false),
        };
        // Start somewhere different on every run, so a restart does not replay the ports of
        // the previous process, whose connections may still linger.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ std::process::id())
            .unwrap_or(0);
        let start = |lo: u16, hi: u16| lo + ((seed % (u32::from((hi - lo) / 2) + 1)) as u16) * 2;
        Some(PortBook {
            inner: Mutex::new(Inner {
                keys: HashMap::new(),
                time_wait: HashMap::new(),
                cursor: [start(first, last), start(first_even, last_even)],
                last_sweep: Instant::now(),
            }),
            first: [first, first_even],
            last: [last, last_even],
            has_even,
            linger,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another task panicked mid-update of plain counters.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an inbound connection `client -> dst` as live.
    pub(crate) fn inbound_open(
        self: &Arc<Self>,
        client: SocketAddr,
        dst: SocketAddr,
    ) -> InboundGuard {
        let now = Instant::now();
        let key = (client.ip(), dst);
        let mut g = self.lock();
        if now.duration_since(g.last_sweep) >= SWEEP_EVERY {
            g.last_sweep = now;
            let linger = self.linger;
            g.keys.retain(|_, ports| {
                ports.retain(|_, s| s.live > 0 || now.duration_since(s.last) < linger);
                !ports.is_empty()
            });
            g.time_wait.retain(|_, ports| {
                ports.retain(|_, until| *until > now);
                !ports.is_empty()
            });
        }
        let s = g
            .keys
            .entry(key)
            .or_default()
            .entry(client.port())
            .or_insert(Seen { live: 0, last: now });
        s.live += 1;
        s.last = now;
        drop(g);
        InboundGuard {
            book: Arc::clone(self),
            key,
            port: client.port(),
        }
    }

    /// The next port for an upstream `client_ip:p -> dst` that no live or lingering inbound
    /// connection from that client to that destination uses and that no socket of ours holds
    /// in TIME_WAIT: an odd one if one of the next candidates is free, else an even one.
    /// `None` if every candidate is taken.
    pub(crate) fn pick(&self, client_ip: IpAddr, dst: SocketAddr) -> Option<u16> {
        let now = Instant::now();
        let mut g = self.lock();
        let g = &mut *g;
        let key = (client_ip, dst);
        let seen = g.keys.get(&key);
        let tw = g.time_wait.get(&key);
        let parities = if self.has_even { 2 } else { 1 };
        for k in 0..parities {
            let (first, last) = (self.first[k], self.last[k]);
            let span = usize::from((last - first) / 2) + 1;
            for _ in 0..span.min(SCAN) {
                let p = g.cursor[k];
                g.cursor[k] = if p >= last.saturating_sub(1) {
                    first
                } else {
                    p + 2
                };
                let busy = seen
                    .and_then(|m| m.get(&p))
                    .is_some_and(|s| s.live > 0 || now.duration_since(s.last) < self.linger);
                let waiting = tw.and_then(|m| m.get(&p)).is_some_and(|until| *until > now);
                if !busy && !waiting {
                    return Some(p);
                }
            }
        }
        None
    }

    /// Records that one of our sockets holds `client_ip:port -> dst` in TIME_WAIT for the
    /// next `TIME_WAIT` (we sent the first FIN and the connection had no TCP timestamps, or a
    /// `connect()` from that port was refused with `EADDRNOTAVAIL`).
    pub(crate) fn upstream_time_wait(&self, client_ip: IpAddr, dst: SocketAddr, port: u16) {
        let until = Instant::now() + TIME_WAIT;
        self.lock()
            .time_wait
            .entry((client_ip, dst))
            .or_default()
            .insert(port, until);
    }
}

impl Drop for InboundGuard {
    fn drop(&mut self) {
        let mut g = self.book.lock();
        if let Some(s) = g
            .keys
            .get_mut(&self.key)
            .and_then(|m| m.get_mut(&self.port))
        {
            s.live = s.live.saturating_sub(1);
            s.last = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(lo: u16, hi: u16, linger_ms: u64) -> Arc<PortBook> {
        Arc::new(PortBook::new(PortRange { lo, hi }, Duration::from_millis(linger_ms)).unwrap())
    }

    #[test]
    fn picks_only_odd_ports_in_range() {
        let b = book(1000, 1010, 1000);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let p = b.pick(ip, dst).unwrap();
            assert!(p % 2 == 1 && (1001..=1009).contains(&p), "{p}");
            seen.insert(p);
        }
        assert_eq!(seen.len(), 5, "cycles through every odd port");
        assert!(PortBook::new(PortRange { lo: 4, hi: 4 }, Duration::ZERO).is_none());
        assert!(PortBook::new(
            PortRange {
                lo: 65535,
                hi: 65535
            },
            Duration::ZERO
        )
        .is_some());
    }

    #[test]
    fn avoids_live_and_lingering_client_ports_per_key() {
        let b = book(1001, 1005, 200);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let other: SocketAddr = "10.0.0.2:81".parse().unwrap();
        let g1 = b.inbound_open(SocketAddr::new(ip, 1001), dst);
        let g2 = b.inbound_open(SocketAddr::new(ip, 1003), dst);
        for _ in 0..6 {
            assert_eq!(b.pick(ip, dst), Some(1005));
        }
        // Another destination is a different tuple: all ports usable.
        let mut any = std::collections::BTreeSet::new();
        for _ in 0..3 {
            any.insert(b.pick(ip, other).unwrap());
        }
        assert_eq!(any.len(), 3);
        // Every odd port taken: the even ones of the range serve.
        let g3 = b.inbound_open(SocketAddr::new(ip, 1005), dst);
        let mut even = std::collections::BTreeSet::new();
        for _ in 0..4 {
            even.insert(b.pick(ip, dst).unwrap());
        }
        assert_eq!(even.into_iter().collect::<Vec<_>>(), vec![1002, 1004]);
        let g4 = b.inbound_open(SocketAddr::new(ip, 1002), dst);
        let g5 = b.inbound_open(SocketAddr::new(ip, 1004), dst);
        assert_eq!(b.pick(ip, dst), None);
        drop((g1, g2, g3, g4, g5));
        // Closed but lingering: still avoided.
        assert_eq!(b.pick(ip, dst), None);
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            b.pick(ip, dst).is_some_and(|p| p % 2 == 1),
            "odd ports first again"
        );
    }

    #[test]
    fn skips_upstream_time_wait_and_falls_back_to_even_ports() {
        // Pitfall 54: without TCP timestamps, a tuple our socket holds in TIME_WAIT cannot be
        // connected from for 60 s; a pick must not offer it, and must not run dry while even
        // ports are free.
        let b = book(2001, 2010, 10);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:80".parse().unwrap();
        for p in [2001, 2003, 2005, 2007, 2009] {
            b.upstream_time_wait(ip, dst, p);
        }
        let mut got = std::collections::BTreeSet::new();
        for _ in 0..10 {
            got.insert(b.pick(ip, dst).unwrap());
        }
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec![2002, 2004, 2006, 2008, 2010]
        );
        // Another client IP or destination is another tuple: its odd ports are free.
        let other: SocketAddr = "10.0.0.2:81".parse().unwrap();
        assert!(b.pick(ip, other).is_some_and(|p| p % 2 == 1));
        for p in [2002, 2004, 2006, 2008, 2010] {
            b.upstream_time_wait(ip, dst, p);
        }
        assert_eq!(b.pick(ip, dst), None, "every tuple in TIME_WAIT");
    }

    #[test]
    fn odd_single_port_range_has_no_even_fallback() {
        let b = book(3001, 3001, 10);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let dst: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert_eq!(b.pick(ip, dst), Some(3001));
        b.upstream_time_wait(ip, dst, 3001);
        assert_eq!(b.pick(ip, dst), None);
    }
}
