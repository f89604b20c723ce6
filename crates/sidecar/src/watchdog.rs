//! The idle and drain watchdog of both relays (`relay.rs`, `httprelay.rs`): a connection
//! with no bytes either way for the idle timeout, or still running at the drain deadline, is
//! ended with a reset on both legs (docs/ARCHITECTURE.md, pitfall 16), flagged `SI` or `DR`.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;
use tokio::time::Sleep;

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

    /// A wait for `cut`, to be created before `poll_watch` first reads the flag:
    /// `notify_waiters` reaches every `Notified` already created, polled or not, so no cut is
    /// missed between the two.
    pub(crate) fn notified(&self) -> Notified<'_> {
        self.notify.notified()
    }

    fn is_cut(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }
}

/// The idle timer's first deadline, for `poll_watch`.
pub(crate) fn idle_timer(clock: &Clock, idle: Duration) -> Sleep {
    tokio::time::sleep_until(deadline(clock, idle))
}

/// An idle timeout too large for the clock never fires.
fn deadline(clock: &Clock, idle: Duration) -> tokio::time::Instant {
    let last = clock.last();
    last.checked_add(idle)
        .unwrap_or_else(|| last + Duration::from_secs(86_400 * 365 * 30))
        .into()
}

/// The watchdog as a poll function over a timer and a drain wait that the caller keeps pinned
/// in its own state: an async block around them, joined with `select!`, took twice their size
/// in every connection's task (docs/ARCHITECTURE.md, pitfall 80). `Ready` when the connection
/// idled for `idle` by `clock` (checked first), or `stop` was cut.
pub(crate) fn poll_watch<'c>(
    cx: &mut Context<'_>,
    clock: &Clock,
    idle: Duration,
    stop: &'c Cut,
    mut timer: Pin<&mut Sleep>,
    mut cut: Pin<&mut Notified<'c>>,
) -> Poll<EndReason> {
    // The timer fires at the deadline it was set for; bytes moved since push it further.
    while timer.as_mut().poll(cx).is_ready() {
        let at = deadline(clock, idle);
        if tokio::time::Instant::now() >= at {
            return Poll::Ready(EndReason::IdleTimeout);
        }
        timer.as_mut().reset(at);
    }
    loop {
        if stop.is_cut() {
            return Poll::Ready(EndReason::Drained);
        }
        if cut.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        // Only `cut` notifies, after setting the flag; a new wait is made before the flag is
        // read again, whatever woke this one.
        cut.set(stop.notified());
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
    let mut cut = pin!(stop.notified());
    let mut timer = pin!(idle_timer(clock, idle));
    let end = poll_fn(|cx| poll_watch(cx, clock, idle, stop, timer.as_mut(), cut.as_mut())).await;
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
