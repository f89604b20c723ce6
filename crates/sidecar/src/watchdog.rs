//! The idle and drain watchdog of both relays (`relay.rs`, `httprelay.rs`): a connection
//! with no bytes either way for the idle timeout, or still running at the drain deadline, is
//! ended with a reset on both legs (docs/ARCHITECTURE.md, pitfall 16), flagged `SI` or `DR`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::accesslog::EndReason;
use super::sockopt;

/// When bytes last moved, as milliseconds since the relay started: one atomic the directions
/// touch, rather than a timer each resets.
#[derive(Debug)]
pub(crate) struct Clock {
    t0: Instant,
    ms: AtomicU64,
}

impl Clock {
    pub(crate) fn new() -> Clock {
        Clock {
            t0: Instant::now(),
            ms: AtomicU64::new(0),
        }
    }

    /// Bytes moved now.
    pub(crate) fn touch(&self) {
        let ms = u64::try_from(self.t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.ms.store(ms, Ordering::Relaxed);
    }

    /// When bytes last moved (the start, if none did).
    pub(crate) fn last(&self) -> Instant {
        self.t0 + Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// The drain deadline, for every relay of the process: a flag and a `Notify` rather than a
/// `watch` receiver per connection, whose clone and wait took about 170 bytes of every
/// connection's task (docs/ARCHITECTURE.md, pitfall 80).
#[derive(Debug, Default)]
pub(crate) struct Cut {
    on: AtomicBool,
    notify: Notify,
}

impl Cut {
    /// Ends every relay, running or yet to start, with `EndReason::Drained`.
    pub(crate) fn cut(&self) {
        self.on.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Resolves once `cut` was called. The `Notified` exists before the flag is read, and
    /// `notify_waiters` reaches every `Notified` already created, polled or not: no cut is
    /// missed between the two.
    async fn wait(&self) {
        loop {
            let n = self.notify.notified();
            if self.on.load(Ordering::SeqCst) {
                return;
            }
            n.await;
        }
    }
}

/// Resolves when the connection idled for `idle` (by `clock`) or `stop` was cut, after
/// setting both legs to reset on close; returns the end reason for the access log.
pub(crate) async fn watch(
    clock: &Clock,
    idle: Duration,
    stop: &Cut,
    down: &TcpStream,
    up: &TcpStream,
) -> EndReason {
    let idle_for = async {
        loop {
            let deadline = clock.last() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    };
    let end = tokio::select! {
        biased;
        _ = idle_for => EndReason::IdleTimeout,
        _ = stop.wait() => EndReason::Drained,
    };
    sockopt::reset_on_close(down);
    sockopt::reset_on_close(up);
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::tcp_pair as pair;

    #[tokio::test]
    async fn idles_out_after_the_last_activity_not_the_start() {
        let (down, _client) = pair().await;
        let (up, _app) = pair().await;
        let clock = Clock::new();
        let cut = Cut::default();
        let idle = Duration::from_millis(400);
        let t = Instant::now();
        let dog = watch(&clock, idle, &cut, &down, &up);
        tokio::pin!(dog);
        // Activity at 300 ms pushes the deadline to 700 ms.
        tokio::select! {
            _ = &mut dog => panic!("ended before any timeout"),
            _ = tokio::time::sleep(Duration::from_millis(300)) => clock.touch(),
        }
        assert_eq!(dog.await, EndReason::IdleTimeout);
        assert!(
            t.elapsed() >= Duration::from_millis(700),
            "{:?}",
            t.elapsed()
        );
        let linger = |s: &TcpStream| socket2::SockRef::from(s).linger().unwrap();
        assert_eq!(linger(&down), Some(Duration::ZERO));
        assert_eq!(linger(&up), Some(Duration::ZERO));
    }

    #[tokio::test]
    async fn a_cut_ends_running_and_later_watches() {
        let (down, _client) = pair().await;
        let (up, _app) = pair().await;
        let clock = Clock::new();
        let cut = Cut::default();
        let idle = Duration::from_secs(3600);
        let dog = watch(&clock, idle, &cut, &down, &up);
        tokio::pin!(dog);
        tokio::select! {
            _ = &mut dog => panic!("ended before the cut"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => cut.cut(),
        }
        assert_eq!(dog.await, EndReason::Drained);
        // A relay that starts after the deadline is cut at once.
        assert_eq!(
            watch(&clock, idle, &cut, &down, &up).await,
            EndReason::Drained
        );
    }
}
