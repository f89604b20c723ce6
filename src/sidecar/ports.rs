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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::netaddr::PortRange;

type Key = (IpAddr, SocketAddr);

#[derive(Debug, Clone, Copy)]
struct Seen {
    live: u32,
    last: Instant,
}

#[derive(Debug)]
struct Inner {
    keys: HashMap<Key, HashMap<u16, Seen>>,
    /// Next candidate (always odd, inside the range).
    cursor: u16,
    last_sweep: Instant,
}

/// The record of recent inbound client ports and the upstream port cursor.
#[derive(Debug)]
pub struct PortBook {
    inner: Mutex<Inner>,
    /// Odd ports of the configured range (`first..=last`, both odd).
    first: u16,
    last: u16,
    linger: Duration,
}

/// Marks an inbound connection live until dropped; then it lingers for the configured time.
#[derive(Debug)]
pub struct InboundGuard {
    book: Arc<PortBook>,
    key: Key,
    port: u16,
}

const SWEEP_EVERY: Duration = Duration::from_secs(5);

impl PortBook {
    /// `None` when the range holds no odd port.
    pub fn new(range: PortRange, linger: Duration) -> Option<PortBook> {
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
        // Start somewhere different on every run, so a restart does not replay the ports of
        // the previous process, whose connections may still linger.
        let span = u32::from((last - first) / 2) + 1;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ std::process::id())
            .unwrap_or(0);
        let cursor = first + ((seed % span) as u16) * 2;
        Some(PortBook {
            inner: Mutex::new(Inner {
                keys: HashMap::new(),
                cursor,
                last_sweep: Instant::now(),
            }),
            first,
            last,
            linger,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another task panicked mid-update of plain counters.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an inbound connection `client -> dst` as live.
    pub fn inbound_open(self: &Arc<Self>, client: SocketAddr, dst: SocketAddr) -> InboundGuard {
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

    /// The next odd port for an upstream `client_ip:p -> dst` that no live or lingering inbound
    /// connection from that client to that destination uses. `None` if every port is taken.
    pub fn pick(&self, client_ip: IpAddr, dst: SocketAddr) -> Option<u16> {
        let now = Instant::now();
        let mut g = self.lock();
        let span = usize::from((self.last - self.first) / 2) + 1;
        for _ in 0..span {
            let p = g.cursor;
            g.cursor = if p >= self.last - 1 {
                self.first
            } else {
                p + 2
            };
            let busy = g
                .keys
                .get(&(client_ip, dst))
                .and_then(|m| m.get(&p))
                .is_some_and(|s| s.live > 0 || now.duration_since(s.last) < self.linger);
            if !busy {
                return Some(p);
            }
        }
        None
    }

    /// Number of (client, destination) keys held; for tests and metrics.
    pub fn keys(&self) -> usize {
        self.lock().keys.len()
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
        let g3 = b.inbound_open(SocketAddr::new(ip, 1005), dst);
        assert_eq!(b.pick(ip, dst), None);
        drop((g1, g2, g3));
        // Closed but lingering: still avoided.
        assert_eq!(b.pick(ip, dst), None);
        std::thread::sleep(Duration::from_millis(250));
        assert!(b.pick(ip, dst).is_some());
    }
}
