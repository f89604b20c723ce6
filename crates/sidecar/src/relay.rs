//! The data path: bytes move socket -> pipe -> socket with `splice(2)`, never through user
//! space (docs/ARCHITECTURE.md, "Choices of dependency": about half the CPU of a read/write
//! copy loop).
//!
//! Each direction starts by copying through a small per-thread buffer: most request/response
//! traffic is a few KiB, and a short `recv` reliably means "drained" (a short splice does not:
//! it also stops when the pipe runs out of slots), so readiness is cleared without the extra
//! EAGAIN call, and no pipes are used for connections that never need them. The first `recv`
//! that fills the buffer switches the direction to `splice` for good: a pipe from the
//! process's pool (`pipes.rs`), filled from the source socket when empty and drained into the
//! destination socket, and given back, empty, as soon as the source has nothing more for now.
//! An idle connection therefore holds its two sockets and nothing else (docs/ARCHITECTURE.md,
//! pitfall 81); with every pipe lent, a direction copies through the buffer instead. EOF from
//! the source becomes `shutdown(SHUT_WR)` on the destination (half-close passes through both
//! ways). A reset or error on one side resets the other (`SO_LINGER` 0), so a failure is
//! visible to both peers.
//!
//! Each direction only waits on the socket it reads from (or writes to), so it would miss a
//! reset on the other socket: a client that half-closed and then reset, a client that reset
//! while the app was not reading, an app that sent FIN and then reset (docs/ARCHITECTURE.md,
//! pitfall 16). So the relay also waits for `EPOLLERR` on both sockets, whatever the
//! directions are doing, and ends at the first one.
//!
//! Both legs carry `SO_LINGER` 0 for as long as the relay runs (the caller arms it as soon as
//! each socket exists, so no extra call is made here), and get the normal linger back only
//! once both directions ended with a FIN: if the process dies mid-transfer (SIGKILL, OOM
//! kill), the kernel then closes both legs with a reset instead of a FIN, and neither peer can
//! mistake a cut-off transfer for a complete one (docs/ARCHITECTURE.md, pitfall 16).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::futures::Notified;
use tokio::time::Sleep;

use super::accesslog::EndReason;
use super::pipes::PipePool;
use super::sockopt;
use super::watchdog::{self, Clock, Cut};

/// Bytes moved and how the relay ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    /// Downstream -> upstream.
    pub from_downstream: u64,
    /// Upstream -> downstream.
    pub to_downstream: u64,
    pub end: EndReason,
    /// The downstream's FIN came before the upstream's, so we sent the first FIN on the
    /// upstream leg: after an orderly end our upstream socket holds its tuple in TIME_WAIT.
    pub upstream_fin_first: bool,
    /// Pipes the kernel refused for lack of descriptors (EMFILE/ENFILE); those bursts were
    /// copied instead.
    pub pipes_refused: u64,
}

/// Which direction saw its EOF first (`EOF_NONE` until one did).
const EOF_NONE: u8 = 0;
const EOF_DOWNSTREAM: u8 = 1;
const EOF_UPSTREAM: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Side {
    Downstream,
    Upstream,
}

/// Relays until both directions reached EOF, one side failed, the connection idled for
/// `idle`, or `stop` was cut (drain deadline). Both sockets must already carry `SO_LINGER`
/// 0 (`sockopt::reset_on_close`).
///
/// Not an `async fn`: one would keep its five arguments twice for its whole life (as
/// arguments and as the locals they move into); the block below captures them once, in `Ctx`
/// (docs/ARCHITECTURE.md, pitfall 80).
pub(crate) fn relay<'a>(
    down: &'a TcpStream,
    up: &'a TcpStream,
    pipes: &'a PipePool,
    idle: Duration,
    stop: &'a Cut,
) -> impl Future<Output = Outcome> + Send + 'a {
    let cx = Ctx {
        down,
        up,
        pipes,
        idle,
        stop,
        moved: [AtomicU64::new(0), AtomicU64::new(0)],
        refused: AtomicU64::new(0),
        last: Activity {
            clock: Clock::new(),
            first_eof: AtomicU8::new(EOF_NONE),
        },
    };
    async move {
        let dirs = [
            Dir::new(&cx, Side::Downstream),
            Dir::new(&cx, Side::Upstream),
        ];
        let race = Race {
            // Made before the flag is first read (watchdog::poll_watch).
            cut: cx.stop.notified(),
            timer: watchdog::idle_timer(&cx.last.clock, cx.idle),
            to_up: pump(&dirs[0]),
            to_down: pump(&dirs[1]),
            dirs: &dirs,
            done: [false, false],
            watchers: [None, None],
        };
        let ended = race.await;
        // Through `cx`: each name the block used directly would be captured a second time.
        let (down, up) = (cx.down, cx.up);
        let end = match ended {
            Ended::Both => {
                // Both FINs passed on: an orderly close from here on.
                sockopt::linger_normally(down);
                sockopt::linger_normally(up);
                EndReason::Normal
            }
            Ended::Failed(side) => {
                // Pass the failure on: the healthy peer gets a RST, not a clean FIN that
                // would make a truncated transfer look complete.
                sockopt::reset_on_close(down);
                sockopt::reset_on_close(up);
                side.end_reason()
            }
            Ended::Watched(side) => {
                sockopt::reset_on_close(match side {
                    Side::Downstream => up,
                    Side::Upstream => down,
                });
                side.end_reason()
            }
            Ended::Dog(end) => {
                sockopt::reset_on_close(down);
                sockopt::reset_on_close(up);
                end
            }
        };
        Outcome {
            from_downstream: cx.moved[0].load(Relaxed),
            to_downstream: cx.moved[1].load(Relaxed),
            end,
            upstream_fin_first: cx.last.first_eof.load(Relaxed) == EOF_DOWNSTREAM,
            pipes_refused: cx.refused.load(Relaxed),
        }
    }
}

pin_project_lite::pin_project! {
    /// Everything the relay waits on, polled in one place: the two directions, the error
    /// watchers, the idle timer and the drain wait. Joined with `try_join!` and `select!`
    /// over async blocks, each was kept with copies and wrappers in every idle connection's
    /// task (docs/ARCHITECTURE.md, pitfall 80).
    struct Race<'a, P> {
        #[pin]
        to_up: P,
        #[pin]
        to_down: P,
        #[pin]
        timer: Sleep,
        #[pin]
        cut: Notified<'a>,
        dirs: &'a [Dir<'a>; 2],
        done: [bool; 2],
        // A reset (or any error) on a socket its reading direction does not wait on: that
        // direction saw EOF (pitfalls 16 and 24) or waits to write. Watched only then, from
        // a boxed future: an idle connection, both directions waiting to read, carries no
        // watcher (docs/ARCHITECTURE.md, pitfall 80).
        watchers: [Option<Failed<'a>>; 2],
    }
}

impl<'a, P: Future<Output = Result<(), Side>>> Future for Race<'a, P> {
    type Output = Ended;

    fn poll(self: Pin<&mut Self>, task: &mut Context<'_>) -> Poll<Ended> {
        let me = self.project();
        for (i, p) in [me.to_up, me.to_down].into_iter().enumerate() {
            if me.done[i] {
                continue;
            }
            match p.poll(task) {
                Poll::Ready(Ok(())) => me.done[i] = true,
                Poll::Ready(Err(side)) => return Poll::Ready(Ended::Failed(side)),
                Poll::Pending => {}
            }
        }
        if *me.done == [true, true] {
            return Poll::Ready(Ended::Both);
        }
        // After the directions, so a direction that just stopped reading is watched before
        // the task sleeps; an error that came earlier is still reported (tokio keeps the
        // readiness bit).
        for (d, w) in me.dirs.iter().zip(me.watchers.iter_mut()) {
            if !d.unwatched.load(Relaxed) {
                *w = None;
                continue;
            }
            let f = w.get_or_insert_with(|| Box::pin(failed(d.src())));
            if f.as_mut().poll(task).is_ready() {
                return Poll::Ready(Ended::Watched(d.src_side));
            }
        }
        let cx = me.dirs[0].cx;
        watchdog::poll_watch(task, &cx.last.clock, cx.idle, cx.stop, me.timer, me.cut)
            .map(Ended::Dog)
    }
}

/// Why the relay's poll loop ended.
enum Ended {
    /// Both directions passed their EOF on.
    Both,
    /// A direction failed on this side's socket.
    Failed(Side),
    /// An error on the source of a direction that was not reading it.
    Watched(Side),
    /// The idle timeout or the drain cut.
    Dog(EndReason),
}

impl Side {
    fn end_reason(self) -> EndReason {
        match self {
            Side::Downstream => EndReason::DownstreamTermination,
            Side::Upstream => EndReason::UpstreamTermination,
        }
    }
}

/// What both directions share, in one place each borrows: passed one by one, the sockets,
/// counters and pool were copied into every state of each direction's future
/// (docs/ARCHITECTURE.md, pitfall 80). Atomics rather than Cells only so the future stays
/// `Send` for `tokio::spawn`; everything runs on one task, so the orderings are moot.
struct Ctx<'a> {
    down: &'a TcpStream,
    up: &'a TcpStream,
    pipes: &'a PipePool,
    idle: Duration,
    stop: &'a Cut,
    /// Bytes written: `[0]` downstream -> upstream, `[1]` upstream -> downstream.
    moved: [AtomicU64; 2],
    /// Pipes the kernel refused (EMFILE/ENFILE), both directions.
    refused: AtomicU64,
    last: Activity,
}

/// A boxed `failed`.
type Failed<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// Resolves when the kernel reports an error on `s` (`EPOLLERR`: a reset arrived, or a send
/// failed). A pending error stays reported until read, which the directions do not do while
/// they wait on the other socket.
async fn failed(s: &TcpStream) {
    loop {
        match s.ready(Interest::ERROR).await {
            Ok(r) if r.is_error() => return,
            Ok(_) => {}
            // The registration is gone: nothing more will be reported; treat it as failed.
            Err(_) => return,
        }
    }
}

/// Size of the copy buffer; a `recv` that fills it marks the direction as bulk (-> splice).
const COPY_BUF: usize = 16 * 1024;

thread_local! {
    /// One copy buffer per thread, only ever borrowed between two awaits (the runtime is
    /// current-thread), so a thousand idle connections cost no buffer memory.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; COPY_BUF]);
}

/// `f` on this thread's copy buffer (`COPY_BUF` bytes), for a read that must not hold a
/// buffer of its own while it waits (httprelay.rs). Never call it from within `f`.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|cell| f(&mut cell.borrow_mut()[..]))
}

/// Outcome of one synchronous copy step.
enum Copied {
    /// `recv` would block: wait for readability.
    Again,
    Eof,
    /// Bytes received; `unsent` is what `send` could not take yet; `full` means the buffer
    /// filled (bulk: switch to splice).
    Data {
        n: usize,
        unsent: Vec<u8>,
        full: bool,
    },
}

fn copy_step(src: &TcpStream, dst: &TcpStream) -> Result<Copied, Side2> {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        let n = match src.try_read(&mut buf[..]) {
            Ok(0) => return Ok(Copied::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Copied::Again),
            Err(_) => return Err(Side2::Src),
        };
        let sent = match dst.try_write(&buf[..n]) {
            Ok(w) => w,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(_) => return Err(Side2::Dst),
        };
        Ok(Copied::Data {
            n,
            unsent: buf[sent..n].to_vec(),
            full: n == buf.len(),
        })
    })
}

enum Side2 {
    Src,
    Dst,
}

/// Clears cached read readiness without a syscall: after a short `recv` the socket is
/// drained, and new data raises a fresh edge-triggered event.
fn clear_readable(src: &TcpStream) {
    let _ = src.try_io(Interest::READABLE, || {
        Err::<(), _>(std::io::Error::from(std::io::ErrorKind::WouldBlock))
    });
}

/// Waits until `s` is readable (or closed). `poll_read_ready` keeps the waker in the socket's
/// own read slot, so the wait costs the connection's task no waiter node (docs/ARCHITECTURE.md,
/// pitfall 80); that slot holds one waker, which is enough: only this relay's task reads `s`.
/// A plain function returning the poll: an `async fn` would keep `s` twice.
fn read_ready(s: &TcpStream) -> impl Future<Output = std::io::Result<()>> + '_ {
    std::future::poll_fn(move |cx| s.poll_read_ready(cx))
}

/// `poll_write_ready` on the direction's destination (only this relay's task writes it), with
/// its source watched for errors meanwhile: marked now, unmarked once writable.
fn write_ready_watched<'a>(d: &'a Dir<'a>) -> impl Future<Output = std::io::Result<()>> + 'a {
    d.unwatched.store(true, Relaxed);
    std::future::poll_fn(move |cx| {
        let r = std::task::ready!(d.dst().poll_write_ready(cx));
        d.unwatched.store(false, Relaxed);
        Poll::Ready(r)
    })
}

/// What one direction does next after a copy step.
enum Step {
    Eof,
    /// The source has nothing more for now.
    Drained,
    /// A short read: drained too, once its readiness is cleared.
    Short,
    /// The buffer filled: more is probably waiting.
    Full,
}

/// One relay direction: from `src_side`'s socket to the other's.
struct Dir<'a> {
    cx: &'a Ctx<'a>,
    src_side: Side,
    /// The direction does not wait for `src` to be readable (it saw EOF, or waits to write),
    /// so it would miss a reset there: the relay watches `src` for errors meanwhile.
    unwatched: AtomicBool,
}

impl<'a> Dir<'a> {
    fn new(cx: &'a Ctx<'a>, src_side: Side) -> Dir<'a> {
        Dir {
            cx,
            src_side,
            unwatched: AtomicBool::new(false),
        }
    }
    fn src(&self) -> &'a TcpStream {
        match self.src_side {
            Side::Downstream => self.cx.down,
            Side::Upstream => self.cx.up,
        }
    }
    fn dst(&self) -> &'a TcpStream {
        match self.src_side {
            Side::Downstream => self.cx.up,
            Side::Upstream => self.cx.down,
        }
    }
    fn dst_side(&self) -> Side {
        match self.src_side {
            Side::Downstream => Side::Upstream,
            Side::Upstream => Side::Downstream,
        }
    }
    /// Bytes written to `dst`.
    fn moved(&self) -> &'a AtomicU64 {
        &self.cx.moved[self.src_side as usize]
    }
    fn last(&self) -> &'a Activity {
        &self.cx.last
    }
}

/// One `recv` into the per-thread buffer and its `send`. Returns what the direction does next
/// and, when the destination could not take everything at once, the send of the rest. Not `async`: its state
/// would sit in every connection's task (docs/ARCHITECTURE.md, pitfall 80).
fn copy_once<'a>(d: &'a Dir<'a>) -> Result<(Step, Option<Rest<'a>>), Side> {
    let step = copy_step(d.src(), d.dst()).map_err(|s| match s {
        Side2::Src => d.src_side,
        Side2::Dst => d.dst_side(),
    })?;
    match step {
        Copied::Again => Ok((Step::Drained, None)),
        Copied::Eof => Ok((Step::Eof, None)),
        Copied::Data { n, unsent, full } => {
            d.last().touch();
            d.moved().fetch_add((n - unsent.len()) as u64, Relaxed);
            let rest = (!unsent.is_empty()).then(|| send_rest(d, unsent));
            Ok((if full { Step::Full } else { Step::Short }, rest))
        }
    }
}

/// `copy_once`, then the rest sent (awaited by the caller, boxed), then a short read's
/// readiness cleared (after the send, as the copy loop always did).
macro_rules! copy_and_send {
    ($d:ident) => {{
        let (step, rest) = copy_once($d)?;
        if let Some(rest) = rest {
            rest.await?;
        }
        if let Step::Short = step {
            clear_readable($d.src());
            Step::Drained
        } else {
            step
        }
    }};
}

/// `send_rest`, boxed.
type Rest<'a> = Pin<Box<dyn Future<Output = Result<(), Side>> + Send + 'a>>;

/// Sends what the destination could not take at once, waiting for it to drain (rare: its
/// own future, boxed, so it does not size every idle connection's task).
fn send_rest<'a>(d: &'a Dir<'a>, unsent: Vec<u8>) -> Rest<'a> {
    Box::pin(async move {
        let mut rest = &unsent[..];
        while !rest.is_empty() {
            write_ready_watched(d).await.map_err(|_| d.dst_side())?;
            match d.dst().try_write(rest) {
                Ok(w) => {
                    rest = &rest[w..];
                    d.moved().fetch_add(w as u64, Relaxed);
                    d.last().touch();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(d.dst_side()),
            }
        }
        Ok(())
    })
}

/// A direction's EOF from its source. The first EOF passes a half-close on. At the second,
/// both directions are over: the relay ends and closing the socket (normal linger) sends the
/// FIN, so the shutdown call is saved. The source is no longer read: watched for a reset from
/// now on.
fn eof(d: &Dir<'_>) -> Result<(), Side> {
    let me = if d.src_side == Side::Downstream {
        EOF_DOWNSTREAM
    } else {
        EOF_UPSTREAM
    };
    d.unwatched.store(true, Relaxed);
    if d.last()
        .first_eof
        .compare_exchange(EOF_NONE, me, Relaxed, Relaxed)
        .is_ok()
    {
        sockopt::shutdown_write(d.dst()).map_err(|_| d.dst_side())?;
    }
    Ok(())
}

/// A pipe from the pool; `None` when every pipe is lent or the kernel refused one (counted
/// when for lack of descriptors): the burst is copied instead.
fn take_pipe<'a>(d: &Dir<'a>) -> Option<crate::pipes::Lease<'a>> {
    match d.cx.pipes.take() {
        Ok(l) => l,
        Err(e) => {
            if sockopt::is_fd_exhaustion(&e) {
                d.cx.refused.fetch_add(1, Relaxed);
            }
            None
        }
    }
}

/// One direction. `Err` names the side whose socket failed.
async fn pump(d: &Dir<'_>) -> Result<(), Side> {
    // Copy phase.
    loop {
        read_ready(d.src()).await.map_err(|_| d.src_side)?;
        match copy_and_send!(d) {
            Step::Eof => return eof(d),
            Step::Drained | Step::Short => {}
            Step::Full => break,
        }
    }

    // Splice phase (bulk): a pipe from the pool for as long as the source has bytes, given
    // back drained when it has none for now.
    loop {
        let Some(lease) = take_pipe(d) else {
            loop {
                match copy_and_send!(d) {
                    Step::Eof => return eof(d),
                    Step::Drained | Step::Short => break,
                    Step::Full => {}
                }
            }
            read_ready(d.src()).await.map_err(|_| d.src_side)?;
            continue;
        };
        let pipe = lease.pipe();
        loop {
            // The pipe is always empty here, so a full-capacity splice cannot block on the
            // pipe: EAGAIN can only mean "socket has no data", and clears its readiness.
            let n = match d.src().try_io(Interest::READABLE, || {
                sockopt::splice(d.src(), &pipe.w, pipe.cap)
            }) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // Nothing entered the pipe: it is still empty.
                Err(_) => {
                    lease.drained();
                    return Err(d.src_side);
                }
            };
            if n == 0 {
                lease.drained();
                return eof(d);
            }
            d.last().touch();
            let mut left = n;
            while left > 0 {
                // Symmetrically, the pipe holds `left` bytes, so EAGAIN means "socket buffer
                // full". A failure here leaves bytes in the pipe: the lease, dropped, closes it.
                write_ready_watched(d).await.map_err(|_| d.dst_side())?;
                match d.dst().try_io(Interest::WRITABLE, || {
                    sockopt::splice(&pipe.r, d.dst(), left)
                }) {
                    Ok(w) => {
                        left -= w;
                        d.moved().fetch_add(w as u64, Relaxed);
                        d.last().touch();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Err(d.dst_side()),
                }
            }
        }
        lease.drained();
        read_ready(d.src()).await.map_err(|_| d.src_side)?;
    }
}

/// When bytes last moved (the watchdog's clock), and which direction saw its EOF first.
struct Activity {
    first_eof: AtomicU8,
    clock: Clock,
}

impl Activity {
    fn touch(&self) {
        self.clock.touch();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::testutil::tcp_pair as pair;

    /// A pool of small pipes per relay, so a transfer refills them many times.
    fn pool() -> PipePool {
        PipePool::new(4096, 4)
    }

    /// client <-> [down | relay | up] <-> app
    async fn setup(idle: Duration) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Outcome>) {
        let (client, down) = pair().await;
        let (up, app) = pair().await;
        // As the sidecar does when it gets each socket.
        sockopt::reset_on_close(&down);
        sockopt::reset_on_close(&up);
        let h =
            tokio::spawn(async move { relay(&down, &up, &pool(), idle, &Cut::default()).await });
        (client, app, h)
    }

    #[tokio::test]
    async fn relays_both_ways_and_passes_half_close_on() {
        let (mut client, mut app, h) = setup(Duration::from_secs(5)).await;
        // More than the pipe holds, to exercise the refill loop.
        let big = vec![7u8; 300_000];
        client.write_all(&big).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        // The app can still answer after the client's half-close.
        app.write_all(b"pong!").await.unwrap();
        app.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong!");
        let o = h.await.unwrap();
        assert_eq!((o.from_downstream, o.to_downstream), (300_000, 5));
        assert_eq!(o.end, EndReason::Normal);
        assert!(o.upstream_fin_first, "the client's FIN came first");
    }

    #[tokio::test]
    async fn app_closing_first_is_not_an_upstream_fin_first() {
        let (mut client, mut app, h) = setup(Duration::from_secs(5)).await;
        app.write_all(b"bye").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        client.shutdown().await.unwrap();
        let o = h.await.unwrap();
        assert_eq!(o.end, EndReason::Normal);
        assert!(!o.upstream_fin_first, "the app's FIN came first");
    }

    #[tokio::test]
    async fn small_data_then_fin_is_not_lost_in_the_copy_phase() {
        // Data and FIN together: the short recv clears readiness, and the FIN must still be
        // seen (tokio keeps READ_CLOSED), or the relay would hang until the idle timeout.
        for _ in 0..50 {
            let (mut client, mut app, h) = setup(Duration::from_secs(5)).await;
            client.write_all(b"hello").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            app.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello");
            app.shutdown().await.unwrap();
            let o = h.await.unwrap();
            assert_eq!((o.from_downstream, o.end), (5, EndReason::Normal));
        }
    }

    #[tokio::test]
    async fn ping_pong_then_bulk_switches_to_splice_in_order() {
        let (mut client, mut app, h) = setup(Duration::from_secs(5)).await;
        for i in 0..200u32 {
            let msg = format!("request {i}\n");
            client.write_all(msg.as_bytes()).await.unwrap();
            let mut b = vec![0u8; msg.len()];
            app.read_exact(&mut b).await.unwrap();
            assert_eq!(b, msg.as_bytes());
            app.write_all(&b).await.unwrap();
            let mut c = vec![0u8; msg.len()];
            client.read_exact(&mut c).await.unwrap();
            assert_eq!(c, msg.as_bytes());
        }
        // Now bulk with a pattern, so reordering or loss at the copy->splice switch shows.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let w = {
            let big = big.clone();
            tokio::spawn(async move {
                client.write_all(&big).await.unwrap();
                client.shutdown().await.unwrap();
                client
            })
        };
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert!(got == big, "bulk bytes differ after the switch to splice");
        drop(app);
        let _client = w.await.unwrap();
        let o = h.await.unwrap();
        assert!(o.from_downstream >= 3_000_000);
    }

    #[tokio::test]
    async fn bulk_with_every_pipe_lent_is_copied_intact_and_the_pool_stays_empty() {
        // A pool with no pipe to lend: the bulk phase must copy through the buffer instead.
        let (client, down) = pair().await;
        let (up, mut app) = pair().await;
        sockopt::reset_on_close(&down);
        sockopt::reset_on_close(&up);
        let pool = std::sync::Arc::new(PipePool::new(4096, 0));
        let p = pool.clone();
        let h = tokio::spawn(async move {
            relay(&down, &up, &p, Duration::from_secs(5), &Cut::default()).await
        });
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let w = {
            let big = big.clone();
            let mut client = client;
            tokio::spawn(async move {
                client.write_all(&big).await.unwrap();
                client.shutdown().await.unwrap();
                client
            })
        };
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert!(got == big, "bytes differ when copied instead of spliced");
        app.write_all(b"done").await.unwrap();
        app.shutdown().await.unwrap();
        let mut client = w.await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"done");
        let o = ended(h).await;
        assert_eq!((o.from_downstream, o.end), (3_000_000, EndReason::Normal));
        assert_eq!(
            o.pipes_refused, 0,
            "at the limit is not refused by the kernel"
        );
        assert_eq!(pool.stats().open, 0);
    }

    #[tokio::test]
    async fn upstream_reset_reaches_the_client_as_a_reset() {
        let (mut client, app, h) = setup(Duration::from_secs(5)).await;
        sockopt::reset_on_close(&app);
        drop(app);
        let mut b = [0u8; 8];
        let r = client.read(&mut b).await;
        assert!(
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{r:?}"
        );
        assert_eq!(h.await.unwrap().end, EndReason::UpstreamTermination);
    }

    /// Closes `s` with a reset, as a crashing or aborting peer does.
    fn abort(s: TcpStream) {
        sockopt::reset_on_close(&s);
        drop(s);
    }

    /// The relay's outcome, or a failure if it did not end within 2 s.
    async fn ended(h: tokio::task::JoinHandle<Outcome>) -> Outcome {
        tokio::time::timeout(Duration::from_secs(2), h)
            .await
            .expect("the relay did not notice the reset within 2 s")
            .unwrap()
    }

    fn is_reset(r: &std::io::Result<usize>) -> bool {
        matches!(r, Err(e) if matches!(e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe))
    }

    /// Writes until the peer's error shows (it can take a write or two after the RST).
    async fn write_fails(s: &mut TcpStream) -> bool {
        for _ in 0..50 {
            let r = s.write(b"x").await;
            if is_reset(&r) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn client_half_close_then_reset_reaches_the_app() {
        // Pitfall 16: only the app -> client direction is still waiting (on the app), so
        // without an error watch the reset went unnoticed until the idle timeout.
        let (mut client, mut app, h) = setup(Duration::from_secs(30)).await;
        client.write_all(b"req").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"req");
        abort(client);
        let o = ended(h).await;
        assert_eq!(o.end, EndReason::DownstreamTermination);
        assert!(write_fails(&mut app).await, "the app was not reset");
    }

    #[tokio::test]
    async fn client_reset_while_the_app_is_not_reading_resets_the_app() {
        // Pitfall 16: client -> app is stuck writing to a full app socket; the client's reset
        // must still end the relay at once, flagged DC (the client ended it), not UC.
        let (client, mut app, h) = setup(Duration::from_secs(30)).await;
        let mut client = client;
        let chunk = vec![1u8; 64 * 1024];
        // Fill every buffer on the way (client send, relay pipe, app receive).
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(200), client.write(&chunk)).await
        {}
        abort(client);
        let o = ended(h).await;
        assert_eq!(o.end, EndReason::DownstreamTermination);
        // What was already queued may still be read; then the reset shows.
        let mut sink = vec![0u8; 1 << 20];
        let r = loop {
            match tokio::time::timeout(Duration::from_secs(2), app.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => continue,
                Ok(r) => break r,
                Err(_) => panic!("the app was neither reset nor closed"),
            }
        };
        assert!(is_reset(&r), "the app read {r:?}, not a reset");
    }

    #[tokio::test]
    async fn app_fin_then_reset_reaches_the_client() {
        // Pitfall 16: after the app's FIN only client -> app is waiting (on the client).
        let (mut client, mut app, h) = setup(Duration::from_secs(30)).await;
        app.write_all(b"resp").await.unwrap();
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"resp");
        abort(app);
        let o = ended(h).await;
        assert_eq!(o.end, EndReason::UpstreamTermination);
        assert!(write_fails(&mut client).await, "the client was not reset");
    }

    #[tokio::test]
    async fn legs_reset_while_relaying_and_close_normally_after_both_fins() {
        // Pitfall 16: SO_LINGER 0 while relaying (death = RST), normal linger after an
        // orderly end (the e2e test kills the process; this checks the socket state).
        let (client, down) = pair().await;
        let (up, app) = pair().await;
        sockopt::reset_on_close(&down);
        sockopt::reset_on_close(&up);
        let down = std::sync::Arc::new(down);
        let up = std::sync::Arc::new(up);
        let (d, u) = (down.clone(), up.clone());
        let h = tokio::spawn(async move {
            relay(&d, &u, &pool(), Duration::from_secs(5), &Cut::default()).await
        });
        let linger = |s: &TcpStream| socket2::SockRef::from(s).linger().unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(linger(&down), Some(Duration::ZERO));
        assert_eq!(linger(&up), Some(Duration::ZERO));
        let (mut client, mut app) = (client, app);
        client.shutdown().await.unwrap();
        app.shutdown().await.unwrap();
        assert_eq!(ended(h).await.end, EndReason::Normal);
        assert_eq!(linger(&down), None);
        assert_eq!(linger(&up), None);
        // The second FIN is sent by closing (the relay saves that shutdown), as the sidecar
        // does when the connection's task ends.
        drop((down, up));
        let mut b = [0u8; 1];
        assert_eq!(client.read(&mut b).await.unwrap(), 0);
        assert_eq!(app.read(&mut b).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn the_drain_deadline_cuts_running_and_later_relays() {
        let cut = std::sync::Arc::new(Cut::default());
        let start = |cut: std::sync::Arc<Cut>| async move {
            let (client, down) = pair().await;
            let (up, app) = pair().await;
            sockopt::reset_on_close(&down);
            sockopt::reset_on_close(&up);
            let h = tokio::spawn(async move {
                relay(&down, &up, &pool(), Duration::from_secs(30), &cut).await
            });
            (client, app, h)
        };
        let (mut client, _app, running) = start(cut.clone()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        cut.cut();
        assert_eq!(ended(running).await.end, EndReason::Drained);
        let mut b = [0u8; 8];
        assert!(client.read(&mut b).await.is_err(), "the client is reset");
        // A relay that starts after the cut ends at once too.
        let (_c, _a, later) = start(cut.clone()).await;
        assert_eq!(ended(later).await.end, EndReason::Drained);
    }

    #[tokio::test]
    async fn idle_connections_are_cut() {
        let (mut client, _app, h) = setup(Duration::from_millis(100)).await;
        let t = Instant::now();
        let mut b = [0u8; 8];
        let r = client.read(&mut b).await;
        assert!(r.is_err(), "{r:?}");
        assert!(t.elapsed() >= Duration::from_millis(90));
        assert_eq!(h.await.unwrap().end, EndReason::IdleTimeout);
    }
}
