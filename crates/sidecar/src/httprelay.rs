//! The HTTP/1.1 relay of the X-Forwarded-For ports. Ports not listed keep the
//! splice relay (`relay.rs`); this one reads each request head, rewrites it with
//! `http1::rewrite_xff`, checks the effective client against the access control, and relays
//! bodies by their framing, so every request of a keep-alive or pipelined connection is
//! rewritten.
//!
//! Two directions run concurrently and share a little state:
//! - client -> app: heads are parsed and rewritten; bodies (`Content-Length`, chunked) are
//!   copied as they arrive. A request that asks to leave HTTP (`Upgrade`, `CONNECT`) is sent,
//!   then no further client byte is read until the app's answer is known: after a `101` (or a
//!   2xx to `CONNECT`) both directions copy plain bytes; otherwise parsing goes on, so a
//!   declined upgrade cannot smuggle unrewritten requests past us.
//! - app -> client: response heads are found only to know where each response ends (`HEAD`,
//!   1xx interim responses such as `100 Continue`, `101`); bytes are passed unchanged.
//!
//! A request the sidecar refuses (`400`/`431`/`505` for a bad head, `403` for a denied client)
//! is answered after the responses to the requests before it have been relayed in full, with
//! `connection: close`; then the connection ends. A malformed body or response cannot be
//! answered cleanly any more (part of it was passed on): both sides are reset.

use std::collections::VecDeque;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::accesslog::EndReason;
use super::client::{ClientCheck, Decided};
use super::edge;
use super::http1::{self, Body, HeadParse, HeadReader, ResponseParse, ResponseReader, ResponseTo};
use super::sockopt;
use super::watchdog::{self, Clock, Cut};
use tproxy_cni_policy::XffTrust;
use tproxy_cni_policy::{Acl, Denied};

/// Envoy's RBAC answer.
pub(crate) const FORBIDDEN: &[u8] = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 19\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nRBAC: access denied";

/// What the relay needs to know about the connection.
pub(crate) struct HttpConn<'a> {
    /// The address appended to `X-Forwarded-For`: the TCP peer, or the client a trusted
    /// PROXY header named (as Envoy does after its PROXY protocol listener filter), already
    /// checked (module `client`).
    pub peer: IpAddr,
    /// How `peer` was found (`client_address_source` when XFF does not name the client).
    pub peer_source: &'static str,
    /// What a client named in X-Forwarded-For is checked against.
    pub check: ClientCheck<'a>,
    /// `CONNECT` is forwarded (this port opted in); else it is answered 403.
    pub connect: bool,
    pub trust: &'a XffTrust,
    pub acl: &'a Acl,
    pub limits: http1::Limits,
    pub idle: Duration,
    /// Where forwarded requests are counted as they go (`None` in unit tests).
    pub metrics: Option<&'a super::metrics::Metrics>,
}

/// How the HTTP relay ended.
#[derive(Debug, Clone)]
pub(crate) struct HttpOutcome {
    pub from_downstream: u64,
    pub to_downstream: u64,
    pub end: EndReason,
    pub requests: u64,
    /// The effective client of the first request.
    pub first_client: Option<Decided>,
    /// The effective client of the request the sidecar answered itself (a 403 names the
    /// denied request's client, not an earlier one's).
    pub answered_client: Option<Decided>,
    /// Requests whose claimed client was refused (module `client`), by reason.
    pub refused: Vec<&'static str>,
    /// A status the sidecar answered itself, with the reason.
    pub answered: Option<(u16, &'static str)>,
    /// Set when the access control refused a request.
    pub denied: Option<Denied>,
}

/// A request sent to the app whose response has not been relayed in full.
#[derive(Debug, Clone, Copy)]
struct Sent {
    to: ResponseTo,
    /// `Upgrade` or `CONNECT`: the client side waits for the app's answer.
    leaves_http: bool,
}

#[derive(Default)]
struct State {
    /// Requests whose final response head has not arrived yet, oldest first.
    awaiting_head: VecDeque<Sent>,
    /// Requests whose response has not been relayed in full (head and body).
    outstanding: usize,
    /// The app's answer to a request that leaves HTTP: `Some(true)` = tunnel.
    tunnel: Option<bool>,
    /// Requests forwarded, and the effective client of the first one.
    requests: u64,
    first: Option<Decided>,
    /// Why claimed clients were refused, one entry per request that fell back.
    refused: Vec<&'static str>,
}

struct Shared<'a> {
    st: Mutex<State>,
    changed: Notify,
    from_down: AtomicU64,
    to_down: AtomicU64,
    /// When bytes last moved (the watchdog's clock).
    clock: Clock,
    conn: HttpConn<'a>,
}

impl Shared<'_> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn touch(&self) {
        self.clock.touch();
    }
    /// Sends `b` to the client and counts it.
    async fn send_down(&self, down: &TcpStream, b: &[u8]) -> io::Result<()> {
        write_all(down, b).await?;
        self.to_down.fetch_add(b.len() as u64, Relaxed);
        Ok(())
    }
    /// Waits until `f` holds on the state.
    async fn wait_for(&self, f: impl Fn(&State) -> bool) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if f(&self.lock()) {
                return;
            }
            notified.await;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Down,
    Up,
}

/// How the client -> app direction ended.
enum ReqEnd {
    /// The client closed; the app was told (FIN).
    Eof,
    /// Plain bytes until both close.
    Tunnel,
    /// We answered and the connection ends.
    Answered {
        status: u16,
        details: &'static str,
        denied: Option<Denied>,
        effective: Option<Decided>,
    },
    Failed(Side, Option<&'static str>),
}

enum RespEnd {
    Eof,
    Tunnel,
    Failed(Side, Option<&'static str>),
}

/// Why a copy in one direction stopped before the message ended.
enum Stop {
    /// The sender closed; the receiver was told (FIN).
    Eof,
    Failed(Side, Option<&'static str>),
}

impl From<Stop> for ReqEnd {
    fn from(s: Stop) -> Self {
        match s {
            Stop::Eof => ReqEnd::Eof,
            Stop::Failed(side, why) => ReqEnd::Failed(side, why),
        }
    }
}

impl From<Stop> for RespEnd {
    fn from(s: Stop) -> Self {
        match s {
            Stop::Eof => RespEnd::Eof,
            Stop::Failed(side, why) => RespEnd::Failed(side, why),
        }
    }
}

/// A direction of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToApp,
    ToClient,
}

impl Dir {
    /// The socket this direction reads and the one it writes.
    fn ends<'s>(self, down: &'s TcpStream, up: &'s TcpStream) -> (&'s TcpStream, &'s TcpStream) {
        match self {
            Dir::ToApp => (down, up),
            Dir::ToClient => (up, down),
        }
    }
    /// Who failed when reading, and when writing.
    fn sides(self) -> (Side, Side) {
        match self {
            Dir::ToApp => (Side::Down, Side::Up),
            Dir::ToClient => (Side::Up, Side::Down),
        }
    }
}

/// The sender closed: passes the close on to `dst`, the socket `dir` writes.
fn pass_close(dst: &TcpStream, dir: Dir) -> Stop {
    match sockopt::shutdown_write(dst) {
        Ok(()) => Stop::Eof,
        Err(_) => Stop::Failed(dir.sides().1, None),
    }
}

/// Reads what is there (at least one byte, or EOF = 0) onto the end of `buf`.
///
/// Through the per-thread copy buffer, so `buf` grows only by what arrived; and an empty `buf`
/// gives its memory back before the wait, so a keep-alive connection idle between requests
/// holds no buffer. Reserving 16 KiB before each wait had kept two such buffers, about
/// 14 KiB of touched pages, in every idle connection (docs/ARCHITECTURE.md, pitfall 80).
pub(crate) async fn read_more(s: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    loop {
        let got = crate::relay::with_scratch(|scratch| {
            let n = s.try_read(scratch)?;
            buf.extend_from_slice(&scratch[..n]);
            Ok::<_, io::Error>(n)
        });
        match got {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if buf.is_empty() {
                    *buf = Vec::new();
                }
                s.readable().await?;
            }
            Err(e) => return Err(e),
        }
    }
}

pub(crate) async fn write_all(s: &TcpStream, mut b: &[u8]) -> io::Result<()> {
    while !b.is_empty() {
        s.writable().await?;
        match s.try_write(b) {
            Ok(n) => b = &b[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Plain bytes in direction `dir` until EOF (then FIN), counted as they are read.
async fn copy_raw(sh: &Shared<'_>, down: &TcpStream, up: &TcpStream, dir: Dir) -> Result<(), Side> {
    let (src, dst) = dir.ends(down, up);
    let sides = dir.sides();
    let count = match dir {
        Dir::ToApp => &sh.from_down,
        Dir::ToClient => &sh.to_down,
    };
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = read_more(src, &mut buf).await.map_err(|_| sides.0)?;
        if n == 0 {
            sockopt::shutdown_write(dst).map_err(|_| sides.1)?;
            return Ok(());
        }
        sh.touch();
        count.fetch_add(n as u64, Relaxed);
        write_all(dst, &buf).await.map_err(|_| sides.1)?;
    }
}

/// Relays the body of one message in direction `dir`, framed by `body`. `buf[..held]` is the
/// message's head, ready to go: it leaves with the body bytes already in `buf`, so a message
/// usually takes one send. What was sent is drained from `buf`; bytes after the body stay.
/// Client bytes are counted as they are read, bytes to the client as they are sent.
async fn copy_body(
    sh: &Shared<'_>,
    down: &TcpStream,
    up: &TcpStream,
    dir: Dir,
    buf: &mut Vec<u8>,
    mut held: usize,
    mut body: Body,
) -> Result<(), Stop> {
    let (src, dst) = dir.ends(down, up);
    let (src_side, dst_side) = dir.sides();
    let malformed = match dir {
        Dir::ToApp => "http_malformed_body",
        Dir::ToClient => "http_malformed_response",
    };
    loop {
        let fed = match dir {
            Dir::ToApp => body.feed_dropping_trailers(&buf[held..]),
            Dir::ToClient => body.feed(&buf[held..]).map(|n| (n, 0..0)),
        };
        let (n, dropped) = fed.map_err(|_| Stop::Failed(src_side, Some(malformed)))?;
        // Request trailers stay here (pitfall 67).
        buf.drain(held + dropped.start..held + dropped.end);
        let out = held + n - dropped.len();
        held = 0;
        if out > 0 {
            let sent = match dir {
                Dir::ToApp => write_all(dst, &buf[..out]).await,
                Dir::ToClient => sh.send_down(dst, &buf[..out]).await,
            };
            sent.map_err(|_| Stop::Failed(dst_side, None))?;
            buf.drain(..out);
        }
        if body.is_done() {
            return Ok(());
        }
        match read_more(src, buf).await {
            // The sender gave up mid-body: the receiver sees the same.
            Ok(0) => return Err(pass_close(dst, dir)),
            Ok(n) => {
                if dir == Dir::ToApp {
                    sh.from_down.fetch_add(n as u64, Relaxed);
                }
                sh.touch();
            }
            Err(_) => return Err(Stop::Failed(src_side, None)),
        }
    }
}

/// Client -> app.
async fn requests(sh: &Shared<'_>, down: &TcpStream, up: &TcpStream, early: Vec<u8>) -> ReqEnd {
    let c = &sh.conn;
    let mut buf = early;
    let mut reader = HeadReader::new(c.limits);
    loop {
        // Fed first with what is already buffered (pipelined requests, bytes after a header).
        let head = loop {
            match reader.feed(&buf) {
                HeadParse::Head(h) => break h,
                HeadParse::Error(e) => {
                    return ReqEnd::Answered {
                        status: e.status(),
                        details: e.label(),
                        denied: None,
                        effective: None,
                    }
                }
                HeadParse::NeedMore => {}
            }
            let n = match read_more(down, &mut buf).await {
                Ok(n) => n,
                Err(_) => return ReqEnd::Failed(Side::Down, None),
            };
            if n == 0 {
                // Between requests (or mid-head: nothing of it was sent): pass the close on.
                return pass_close(up, Dir::ToApp).into();
            }
            sh.from_down.fetch_add(n as u64, Relaxed);
            sh.touch();
        };
        let rw = edge::rewrite(&buf, &head, c.peer, c.peer_source, c.trust, &c.check);
        if let Some(r) = rw.decided.refused {
            sh.lock().refused.push(r.label());
        }
        if head.connect && !c.connect {
            // Envoy answers an upgrade its route does not allow with 403 (pitfall 68).
            return ReqEnd::Answered {
                status: 403,
                details: "connect_refused",
                denied: None,
                effective: Some(rw.decided),
            };
        }
        if let Err(d) = c.acl.check_client(rw.decided.client) {
            return ReqEnd::Answered {
                status: 403,
                details: d.label(),
                denied: Some(d),
                effective: Some(rw.decided),
            };
        }
        let leaves_http = rw.upgrade || head.connect;
        {
            let mut st = sh.lock();
            st.first.get_or_insert(rw.decided);
            st.requests += 1;
            if let Some(m) = c.metrics {
                m.count(super::metrics::NsCounter::HttpRequests, "forwarded");
            }
            st.awaiting_head.push_back(Sent {
                to: head.response_to(&buf),
                leaves_http,
            });
            st.outstanding += 1;
            st.tunnel = None;
        }
        sh.changed.notify_waiters();
        // The rewritten head takes the place of the client's and goes out with the body bytes
        // already here.
        let held = rw.head.len();
        buf.splice(..head.head_len, rw.head);
        reader.reset();
        let body = Body::new(head.framing, c.limits.max_head);
        if let Err(stop) = copy_body(sh, down, up, Dir::ToApp, &mut buf, held, body).await {
            return stop.into();
        }

        if leaves_http {
            sh.wait_for(|st| st.tunnel.is_some()).await;
            if sh.lock().tunnel == Some(true) {
                if write_all(up, &buf).await.is_err() {
                    return ReqEnd::Failed(Side::Up, None);
                }
                return match copy_raw(sh, down, up, Dir::ToApp).await {
                    Ok(()) => ReqEnd::Tunnel,
                    Err(s) => ReqEnd::Failed(s, None),
                };
            }
        }
    }
}

/// App -> client.
async fn responses(sh: &Shared<'_>, down: &TcpStream, up: &TcpStream) -> RespEnd {
    let c = &sh.conn;
    let mut buf = Vec::new();
    let mut reader = ResponseReader::new(c.limits);
    loop {
        let (head, front) = loop {
            // Read afresh each time: the request may be sent while we wait for bytes.
            let front = sh.lock().awaiting_head.front().copied();
            let to = front.map(|s| s.to).unwrap_or(ResponseTo {
                head_method: false,
                connect: false,
            });
            match reader.feed(&buf, to) {
                ResponseParse::Head(h) => break (h, front),
                ResponseParse::Error(_) => {
                    return RespEnd::Failed(Side::Up, Some("http_malformed_response"))
                }
                ResponseParse::NeedMore => {}
            }
            match read_more(up, &mut buf).await {
                Ok(0) => {
                    // The app closed: whatever partial response there is goes on, then FIN.
                    if sh.send_down(down, &buf).await.is_err() {
                        return RespEnd::Failed(Side::Down, None);
                    }
                    return pass_close(down, Dir::ToClient).into();
                }
                Ok(_) => sh.touch(),
                Err(_) => return RespEnd::Failed(Side::Up, None),
            }
        };
        if front.is_none() {
            // A response nobody asked for: the app does not speak HTTP/1.1 as we understand it.
            return RespEnd::Failed(Side::Up, Some("http_unsolicited_response"));
        }
        reader.reset();
        let hl = head.head_len;
        if head.interim {
            if sh.send_down(down, &buf[..hl]).await.is_err() {
                return RespEnd::Failed(Side::Down, None);
            }
            buf.drain(..hl);
            continue;
        }
        let sent = {
            let mut st = sh.lock();
            st.awaiting_head.pop_front()
        };
        let leaves_http = sent.is_some_and(|s| s.leaves_http);
        match Body::from_response(head.framing, c.limits.max_head) {
            None => {
                if !leaves_http {
                    return RespEnd::Failed(Side::Up, Some("http_unexpected_upgrade"));
                }
                sh.lock().tunnel = Some(true);
                sh.changed.notify_waiters();
                // The head and whatever followed it.
                if sh.send_down(down, &buf).await.is_err() {
                    return RespEnd::Failed(Side::Down, None);
                }
                return match copy_raw(sh, down, up, Dir::ToClient).await {
                    Ok(()) => RespEnd::Tunnel,
                    Err(s) => RespEnd::Failed(s, None),
                };
            }
            Some(body) => {
                if leaves_http {
                    sh.lock().tunnel = Some(false);
                    sh.changed.notify_waiters();
                }
                // The head goes out with the body bytes already here: one send per response
                // in the common case.
                if let Err(stop) = copy_body(sh, down, up, Dir::ToClient, &mut buf, hl, body).await
                {
                    return stop.into();
                }
                sh.lock().outstanding -= 1;
                sh.changed.notify_waiters();
            }
        }
    }
}

/// Relays one connection of an XFF port. `early` holds client bytes already read (after a
/// PROXY header). Ends like `relay::relay`: both closed, a failure (reset passed on), or by
/// the watchdog (idle, or `stop` cut at the drain deadline).
pub(crate) async fn relay_http(
    down: &TcpStream,
    up: &TcpStream,
    early: Vec<u8>,
    conn: HttpConn<'_>,
    stop: &Cut,
) -> HttpOutcome {
    sockopt::reset_on_close(down);
    sockopt::reset_on_close(up);
    let idle = conn.idle;
    let sh = Shared {
        st: Mutex::new(State::default()),
        changed: Notify::new(),
        from_down: AtomicU64::new(early.len() as u64),
        to_down: AtomicU64::new(0),
        clock: Clock::new(),
        conn,
    };
    let req = requests(&sh, down, up, early);
    let resp = responses(&sh, down, up);
    tokio::pin!(req, resp);
    let dog = watchdog::watch(&sh.clock, idle, stop, down, up);
    tokio::pin!(dog);

    let mut req_done: Option<ReqEnd> = None;
    let mut resp_done: Option<RespEnd> = None;
    let mut answered = None;
    let mut answered_client = None;
    let mut denied = None;
    let mut details = None;
    let end = loop {
        tokio::select! {
            r = &mut req, if req_done.is_none() => match r {
                ReqEnd::Answered { status, details: why, denied: d, effective } => {
                    answered_client = effective;
                    // Answer once the responses to earlier requests are through (or the app
                    // closed); a failure on the way ends the connection as a failure.
                    if resp_done.is_none() {
                        tokio::select! {
                            _ = sh.wait_for(|st| st.outstanding == 0) => {}
                            r = &mut resp => {
                                if let RespEnd::Failed(side, why) = r {
                                    details = why;
                                    break fail(down, up, side, false);
                                }
                            }
                        }
                    }
                    let reply = if d.is_some() { FORBIDDEN } else { reply_for(status) };
                    let _ = sh.send_down(down, reply).await;
                    // The answer must arrive whole: an orderly close, not a reset. Closing with
                    // unread client bytes would send a reset that can overtake the answer, so
                    // read and drop what the client still sends, briefly and boundedly.
                    sockopt::linger_normally(down);
                    let _ = sockopt::shutdown_write(down);
                    let discard = async {
                        let mut sink = Vec::new();
                        let mut total = 0usize;
                        while total < (1 << 20) {
                            sink.clear();
                            match read_more(down, &mut sink).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => total += n,
                            }
                        }
                    };
                    let _ = tokio::time::timeout(Duration::from_millis(500), discard).await;
                    answered = Some((status, why));
                    denied = d;
                    break if d.is_some() { EndReason::Rbac } else { EndReason::ProtocolError };
                }
                ReqEnd::Failed(side, why) => {
                    details = why;
                    break fail(down, up, side, why.is_some());
                }
                other => req_done = Some(other),
            },
            r = &mut resp, if resp_done.is_none() => match r {
                RespEnd::Failed(side, why) => {
                    details = why;
                    break fail(down, up, side, false);
                }
                other => {
                    // The app is done: a request waiting for its answer to an upgrade goes on
                    // as HTTP (and sees the client's close).
                    sh.lock().tunnel.get_or_insert(false);
                    sh.changed.notify_waiters();
                    resp_done = Some(other);
                }
            },
            // A reset on either socket while the directions wait elsewhere (pitfall 16).
            _ = failed(down) => break fail(down, up, Side::Down, false),
            _ = failed(up) => break fail(down, up, Side::Up, false),
            end = &mut dog => break end,
        }
        if req_done.is_some() && resp_done.is_some() {
            sockopt::linger_normally(down);
            sockopt::linger_normally(up);
            break EndReason::Normal;
        }
    };
    if answered.is_none() {
        answered = details.map(|d| (0, d));
    }
    let (requests, first_client, refused) = {
        let mut st = sh.lock();
        (st.requests, st.first, std::mem::take(&mut st.refused))
    };
    HttpOutcome {
        from_downstream: sh.from_down.load(Relaxed),
        to_downstream: sh.to_down.load(Relaxed),
        end,
        requests,
        first_client,
        answered_client,
        refused,
        answered,
        denied,
    }
}

/// Resolves when the kernel reports an error on `s` (a reset arrived): each direction reads
/// only one socket, so a reset on the other would otherwise wait for the next write
/// (docs/ARCHITECTURE.md, pitfall 16).
async fn failed(s: &TcpStream) {
    loop {
        match s.ready(tokio::io::Interest::ERROR).await {
            Ok(r) if r.is_error() => return,
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// The answer to a CONNECT on a port that did not opt in.
pub(crate) const CONNECT_FORBIDDEN: &[u8] =
    b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// The complete answer for a status the sidecar gives itself (403: the access control's
/// answer is chosen by the caller).
fn reply_for(status: u16) -> &'static [u8] {
    match status {
        403 => CONNECT_FORBIDDEN,
        431 => http1::HeadError::TooLarge(0).response(),
        505 => http1::HeadError::Version.response(),
        _ => http1::HeadError::Malformed("").response(),
    }
}

fn fail(down: &TcpStream, up: &TcpStream, side: Side, protocol: bool) -> EndReason {
    sockopt::reset_on_close(down);
    sockopt::reset_on_close(up);
    if protocol {
        return EndReason::ProtocolError;
    }
    match side {
        Side::Down => EndReason::DownstreamTermination,
        Side::Up => EndReason::UpstreamTermination,
    }
}

#[cfg(test)]
mod tests;
