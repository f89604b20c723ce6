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

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

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
enum Side {
    Downstream,
    Upstream,
}

/// Relays until both directions reached EOF, one side failed, the connection idled for
/// `idle`, or `stop` was cut (drain deadline). Both sockets must already carry `SO_LINGER`
/// 0 (`sockopt::reset_on_close`).
pub(crate) async fn relay(
    down: &TcpStream,
    up: &TcpStream,
    pipes: &PipePool,
    idle: Duration,
    stop: &Cut,
) -> Outcome {
    // Atomics rather than Cells only so the future stays `Send` for `tokio::spawn`; everything
    // runs on one task, so the orderings are moot.
    let sent_up = AtomicU64::new(0);
    let sent_down = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    let last = Activity {
        clock: Clock::new(),
        first_eof: AtomicU8::new(EOF_NONE),
    };

    // Each direction's parameters in one place the pump borrows: passed one by one they were
    // copied into every state of the pump's future (docs/ARCHITECTURE.md, pitfall 80).
    let to_up = Dir {
        src: down,
        dst: up,
        src_side: Side::Downstream,
        dst_side: Side::Upstream,
        moved: &sent_up,
        pipes,
        last: &last,
        refused: &refused,
        unwatched: AtomicBool::new(false),
    };
    let to_down = Dir {
        src: up,
        dst: down,
        src_side: Side::Upstream,
        dst_side: Side::Downstream,
        moved: &sent_down,
        pipes,
        last: &last,
        refused: &refused,
        unwatched: AtomicBool::new(false),
    };
    let both = async { tokio::try_join!(pump(&to_up), pump(&to_down)) };
    let dog = watchdog::watch(&last.clock, idle, stop, down, up);
    // A reset (or any error) on a socket its reading direction does not wait on: that
    // direction saw EOF (pitfalls 16 and 24) or waits to write. Watched only then, from a
    // boxed future: an idle connection, both directions waiting to read, carries no watcher
    // (docs/ARCHITECTURE.md, pitfall 80). Polled after `both` (`biased`), so a direction that
    // just stopped reading is watched before the task sleeps; an error that came earlier is
    // still reported (tokio keeps the readiness bit).
    let mut watchers: [Option<Failed<'_>>; 2] = [None, None];
    let watch = std::future::poll_fn(|cx| {
        for (d, w) in [&to_up, &to_down].into_iter().zip(watchers.iter_mut()) {
            if !d.unwatched.load(Relaxed) {
                *w = None;
                continue;
            }
            let f = w.get_or_insert_with(|| Box::pin(failed(d.src)));
            if f.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(d.src_side);
            }
        }
        std::task::Poll::Pending
    });

    let end = tokio::select! {
        biased;
        r = both => match r {
            Ok(_) => {
                // Both FINs passed on: an orderly close from here on.
                sockopt::linger_normally(down);
                sockopt::linger_normally(up);
                EndReason::Normal
            }
            Err(side) => {
                // Pass the failure on: the healthy peer gets a RST, not a clean FIN that would
                // make a truncated transfer look complete.
                sockopt::reset_on_close(down);
                sockopt::reset_on_close(up);
                match side {
                    Side::Downstream => EndReason::DownstreamTermination,
                    Side::Upstream => EndReason::UpstreamTermination,
                }
            }
        },
        side = watch => match side {
            Side::Downstream => {
                sockopt::reset_on_close(up);
                EndReason::DownstreamTermination
            }
            Side::Upstream => {
                sockopt::reset_on_close(down);
                EndReason::UpstreamTermination
            }
        },
        end = dog => end,
    };
    Outcome {
        from_downstream: sent_up.load(Relaxed),
        to_downstream: sent_down.load(Relaxed),
        end,
        upstream_fin_first: last.first_eof.load(Relaxed) == EOF_DOWNSTREAM,
        pipes_refused: refused.load(Relaxed),
    }
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
async fn read_ready(s: &TcpStream) -> std::io::Result<()> {
    std::future::poll_fn(|cx| s.poll_read_ready(cx)).await
}

/// The write-side twin of `read_ready`: only this relay's task writes `s`.
async fn write_ready(s: &TcpStream) -> std::io::Result<()> {
    std::future::poll_fn(|cx| s.poll_write_ready(cx)).await
}

/// `write_ready` on the direction's destination, with its source watched for errors
/// meanwhile.
async fn write_ready_watched(d: &Dir<'_>) -> std::io::Result<()> {
    d.unwatched.store(true, Relaxed);
    let r = write_ready(d.dst).await;
    d.unwatched.store(false, Relaxed);
    r
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

/// One relay direction.
struct Dir<'a> {
    src: &'a TcpStream,
    dst: &'a TcpStream,
    src_side: Side,
    dst_side: Side,
    /// Bytes written to `dst`.
    moved: &'a AtomicU64,
    pipes: &'a PipePool,
    last: &'a Activity,
    /// Pipes the kernel refused (EMFILE/ENFILE), both directions.
    refused: &'a AtomicU64,
    /// The direction does not wait for `src` to be readable (it saw EOF, or waits to write),
    /// so it would miss a reset there: the relay watches `src` for errors meanwhile.
    unwatched: AtomicBool,
}

/// One `recv` into the per-thread buffer and its `send`. Returns what the direction does next
/// and what the destination could not take at once, for `send_rest`. Not `async`: its state
/// would sit in every connection's task (docs/ARCHITECTURE.md, pitfall 80).
fn copy_once(d: &Dir<'_>) -> Result<(Step, Vec<u8>), Side> {
    let step = copy_step(d.src, d.dst).map_err(|s| match s {
        Side2::Src => d.src_side,
        Side2::Dst => d.dst_side,
    })?;
    match step {
        Copied::Again => Ok((Step::Drained, Vec::new())),
        Copied::Eof => Ok((Step::Eof, Vec::new())),
        Copied::Data { n, unsent, full } => {
            d.last.touch();
            d.moved.fetch_add((n - unsent.len()) as u64, Relaxed);
            Ok((if full { Step::Full } else { Step::Short }, unsent))
        }
    }
}

/// `copy_once`, then the rest sent, then a short read's readiness cleared (after the send, as
/// the copy loop always did).
macro_rules! copy_and_send {
    ($d:expr) => {{
        let d = $d;
        let (step, unsent) = copy_once(d)?;
        if !unsent.is_empty() {
            send_rest(d, unsent).await?;
        }
        if let Step::Short = step {
            clear_readable(d.src);
            Step::Drained
        } else {
            step
        }
    }};
}

/// Sends what the destination could not take at once, waiting for it to drain (rare: its
/// own future, boxed, so it does not size every idle connection's task).
fn send_rest<'a>(
    d: &'a Dir<'a>,
    unsent: Vec<u8>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Side>> + Send + 'a>> {
    Box::pin(async move {
        let mut rest = &unsent[..];
        while !rest.is_empty() {
            write_ready_watched(d).await.map_err(|_| d.dst_side)?;
            match d.dst.try_write(rest) {
                Ok(w) => {
                    rest = &rest[w..];
                    d.moved.fetch_add(w as u64, Relaxed);
                    d.last.touch();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(d.dst_side),
            }
        }
        Ok(())
    })
}

/// One direction. `Err` names the side whose socket failed.
async fn pump(d: &Dir<'_>) -> Result<(), Side> {
    let eof = || {
        let me = if d.src_side == Side::Downstream {
            EOF_DOWNSTREAM
        } else {
            EOF_UPSTREAM
        };
        // The first EOF passes a half-close on. At the second, both directions are over: the
        // relay ends and closing the socket (normal linger) sends the FIN, so the shutdown
        // call is saved.
        // Its source is no longer read: watched for a reset from now on.
        d.unwatched.store(true, Relaxed);
        if d.last
            .first_eof
            .compare_exchange(EOF_NONE, me, Relaxed, Relaxed)
            .is_ok()
        {
            sockopt::shutdown_write(d.dst).map_err(|_| d.dst_side)?;
        }
        Ok(())
    };
    // Copy phase.
    loop {
        read_ready(d.src).await.map_err(|_| d.src_side)?;
        match copy_and_send!(d) {
            Step::Eof => return eof(),
            Step::Drained | Step::Short => {}
            Step::Full => break,
        }
    }

    // Splice phase (bulk): a pipe from the pool for as long as the source has bytes, given
    // back drained when it has none for now.
    loop {
        let lease = match d.pipes.take() {
            Ok(Some(l)) => Some(l),
            // Every pipe is lent, or the kernel refused one: copy this burst instead.
            Ok(None) => None,
            Err(e) => {
                if sockopt::is_fd_exhaustion(&e) {
                    d.refused.fetch_add(1, Relaxed);
                }
                None
            }
        };
        let Some(lease) = lease else {
            loop {
                match copy_and_send!(d) {
                    Step::Eof => return eof(),
                    Step::Drained | Step::Short => break,
                    Step::Full => {}
                }
            }
            read_ready(d.src).await.map_err(|_| d.src_side)?;
            continue;
        };
        let pipe = lease.pipe();
        loop {
            // The pipe is always empty here, so a full-capacity splice cannot block on the
            // pipe: EAGAIN can only mean "socket has no data", and clears its readiness.
            let n = match d.src.try_io(Interest::READABLE, || {
                sockopt::splice(d.src, &pipe.w, pipe.cap)
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
                return eof();
            }
            d.last.touch();
            let mut left = n;
            while left > 0 {
                // Symmetrically, the pipe holds `left` bytes, so EAGAIN means "socket buffer
                // full". A failure here leaves bytes in the pipe: the lease, dropped, closes it.
                write_ready_watched(d).await.map_err(|_| d.dst_side)?;
                match d
                    .dst
                    .try_io(Interest::WRITABLE, || sockopt::splice(&pipe.r, d.dst, left))
                {
                    Ok(w) => {
                        left -= w;
                        d.moved.fetch_add(w as u64, Relaxed);
                        d.last.touch();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Err(d.dst_side),
                }
            }
        }
        lease.drained();
        read_ready(d.src).await.map_err(|_| d.src_side)?;
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
