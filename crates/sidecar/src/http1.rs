//! HTTP/1.1 request framing for the X-Forwarded-For ports: find each request head on a
//! keep-alive connection, validate it, learn how its body is framed, and rewrite the head with
//! the forwarding headers. Pure: no I/O; the caller owns the buffer and the sockets.
//!
//! # How the pieces fit (client -> app direction)
//! 1. [`HeadReader::feed`] with the unconsumed bytes until it returns [`HeadParse::Head`]
//!    (or an error: answer [`HeadError::response`] and close; 431 past [`Limits::max_head`] or
//!    [`Limits::max_headers`], 505 for an HTTP version other than 1.0/1.1, 400 otherwise).
//! 2. Send the head `edge::rewrite` makes to the app instead of `buf[..head_len]`.
//! 3. Relay the body: [`Body::new`] from [`RequestHead::framing`], then [`Body::feed`] with the
//!    bytes after the head; it says how many belong to this request. What follows is the next
//!    pipelined request: back to 1.
//! 4. `expect_continue`: nothing special for the framing (the client waits for the app's
//!    `100 Continue` or final response; the body, if sent, follows the head as usual).
//!    `upgrade` or `connect`: hold further client bytes until the app's answer to this request
//!    is known. After a `101` (or a 2xx to CONNECT) the connection carries other bytes: relay
//!    raw both ways. If the app declines, requests continue and are parsed as before, so a
//!    declined upgrade cannot smuggle unrewritten requests past the sidecar.
//!
//! App -> client: [`ResponseReader::feed`] with the [`ResponseTo`] of the oldest unanswered
//! request finds each response head; [`Body::from_response`] its end (`None`: tunnel). A 1xx
//! other than 101 is `interim`: the final response to the same request follows. Responses
//! are relayed unchanged; this side only tells where one ends and whether a tunnel starts.
//!
//! # Strictness (request smuggling is the risk of a proxy that frames requests)
//! Lines end in CRLF (a bare LF or CR is a 400); no obsolete line folding; no whitespace
//! between a field name and its colon; field values free of control characters; exactly one
//! `Host` in HTTP/1.1; `Transfer-Encoding` must end in `chunked` (once), is refused in HTTP/1.0
//! and together with `Content-Length`; several `Content-Length` values must be equal; chunk
//! sizes fit in 64 bits; chunk lines and trailers are bounded.

use std::ops::Range;

/// Envoy's default `max_request_headers_kb` (60 KiB).
pub(crate) const DEFAULT_MAX_HEAD: usize = 60 * 1024;
/// Envoy's default `max_headers_count`.
pub(crate) const DEFAULT_MAX_HEADERS: usize = 100;
/// Longest chunk-size line (size and extensions) accepted.
pub(crate) const MAX_CHUNK_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bound on a request head, request line to the empty line included.
    pub max_head: usize,
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: DEFAULT_MAX_HEAD,
            max_headers: DEFAULT_MAX_HEADERS,
        }
    }
}

/// Why a request head is refused; [`HeadError::status`] is the answer to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("request head exceeds {0} bytes")]
    TooLarge(usize),
    #[error("request has more than {0} header fields")]
    TooManyFields(usize),
    #[error("HTTP version not supported")]
    Version,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
}

impl HeadError {
    pub(crate) fn status(&self) -> u16 {
        match self {
            HeadError::TooLarge(_) | HeadError::TooManyFields(_) => 431,
            HeadError::Version => 505,
            HeadError::Malformed(_) => 400,
        }
    }

    /// A complete response that closes the connection.
    pub fn response(&self) -> &'static [u8] {
        match self.status() {
            431 => {
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            }
            505 => {
                b"HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            }
            _ => b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        }
    }

    /// A stable name for metrics and the access log.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            HeadError::TooLarge(_) => "head_too_large",
            HeadError::TooManyFields(_) => "too_many_fields",
            HeadError::Version => "http_version",
            HeadError::Malformed(_) => "malformed_head",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    Length(u64),
    Chunked,
}

/// One header field; ranges index the caller's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The whole line without its CRLF.
    pub line: Range<usize>,
    pub name: Range<usize>,
    /// Without surrounding spaces and tabs.
    pub value: Range<usize>,
}

/// A validated request head; ranges index the buffer given to [`HeadReader::feed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Where the request line starts (empty lines before it are skipped, RFC 9112 2.2).
    pub start: usize,
    pub method: Range<usize>,
    pub target: Range<usize>,
    pub version: Version,
    pub fields: Vec<Field>,
    /// Bytes up to and including the empty line.
    pub head_len: usize,
    pub framing: Framing,
    /// `Expect: 100-continue` on HTTP/1.1 (HTTP/1.0 expectations are ignored, RFC 9110 10.1.1).
    pub expect_continue: bool,
    /// `Upgrade` with `Connection: upgrade`: raw bytes follow if the app answers 101.
    pub upgrade: bool,
    /// `CONNECT`: raw bytes follow if the app answers 2xx.
    pub connect: bool,
    /// Whether the client expects the connection to stay open after this request.
    pub keep_alive: bool,
}

impl RequestHead {
    pub(crate) fn method<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.method.clone()]
    }
    pub fn target<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.target.clone()]
    }
    /// The values of every field named `name` (ASCII case-insensitive), in order.
    pub fn values<'a>(&'a self, buf: &'a [u8], name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        self.fields
            .iter()
            .filter(move |f| buf[f.name.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(move |f| &buf[f.value.clone()])
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadParse {
    NeedMore,
    Head(RequestHead),
    Error(HeadError),
}

/// Finds and validates one request head; remembers how far it scanned, so feeding a growing
/// buffer costs O(total bytes).
#[derive(Debug, Clone)]
pub struct HeadReader {
    limits: Limits,
    scan: Scanner,
    line: LineCheck,
}

impl HeadReader {
    /// Bytes examined so far for the current head (the linearity tests read it).
    pub fn bytes_scanned(&self) -> usize {
        self.scan.work
    }
}

impl HeadReader {
    pub fn new(limits: Limits) -> HeadReader {
        HeadReader {
            limits,
            scan: Scanner::default(),
            line: LineCheck::default(),
        }
    }

    /// `buf` holds the connection's unconsumed bytes, starting where this request starts; pass
    /// the same buffer, grown, on each call. After a `Head`, consume `head_len` bytes (and the
    /// body) and call [`HeadReader::reset`] before the next request.
    pub fn feed(&mut self, buf: &[u8]) -> HeadParse {
        let (start, head_len) = match self.scan.scan(buf, self.limits.max_head) {
            Err(e) => return HeadParse::Error(e),
            Ok(Scan::Empty) => return HeadParse::NeedMore,
            Ok(Scan::Complete { start, head_len }) => (start, head_len),
            Ok(Scan::Partial { start }) => {
                // Fail fast on a bad request line (TLS, PROXY header, binary), resuming where
                // the last read stopped: each byte is looked at once.
                return match self.check_line(buf, start) {
                    Ok(()) => HeadParse::NeedMore,
                    Err(e) => HeadParse::Error(e),
                };
            }
        };
        match parse_head(buf, start, head_len, &self.limits) {
            Ok(h) => HeadParse::Head(h),
            Err(e) => HeadParse::Error(e),
        }
    }

    /// Checks the request line as far as it has arrived: the method's characters as they come,
    /// the whole line once, when its CRLF arrives.
    fn check_line(&mut self, buf: &[u8], start: usize) -> Result<(), HeadError> {
        let line = &mut self.line;
        if line.complete {
            return Ok(());
        }
        let mut i = line.pos.max(start);
        while i < buf.len() {
            self.scan.work += 1;
            match buf[i] {
                b'\r' => match buf.get(i + 1) {
                    // Looked at again with the next byte.
                    None => break,
                    Some(b'\n') => {
                        self.scan.work += i - start;
                        request_line(buf, start, i)?;
                        line.complete = true;
                        return Ok(());
                    }
                    // The scanner refuses a bare CR.
                    Some(_) => {}
                },
                b' ' => line.method_done = true,
                c if !line.method_done && !is_tchar(c) => {
                    return Err(HeadError::Malformed("request line"))
                }
                _ => {}
            }
            i += 1;
        }
        line.pos = i;
        Ok(())
    }

    /// Ready for the next request on the connection.
    pub(crate) fn reset(&mut self) {
        self.scan = Scanner::default();
        self.line = LineCheck::default();
    }
}

/// How far [`HeadReader::check_line`] got with a request line still arriving.
#[derive(Debug, Clone, Default)]
struct LineCheck {
    /// The next byte to look at.
    pos: usize,
    /// The space after the method was seen.
    method_done: bool,
    /// The whole line arrived and is valid.
    complete: bool,
}

enum Scan {
    /// Nothing but (part of) empty lines so far.
    Empty,
    Partial {
        start: usize,
    },
    Complete {
        start: usize,
        head_len: usize,
    },
}

/// Finds the end of a message head: skips empty lines before the start line, requires CRLF
/// line ends, enforces the size limit, resumes where the last call stopped.
#[derive(Debug, Clone, Default)]
struct Scanner {
    scanned: usize,
    /// Where the start line begins, once known.
    start: Option<usize>,
    /// Bytes examined, for the linearity tests.
    work: usize,
}

impl Scanner {
    fn scan(&mut self, buf: &[u8], max: usize) -> Result<Scan, HeadError> {
        let start = match self.start {
            Some(s) => s,
            None => {
                // Empty lines before the start line, resumed where the last call stopped.
                let mut s = self.scanned;
                loop {
                    match &buf[s..] {
                        [b'\r', b'\n', ..] => {
                            s += 2;
                            self.work += 2;
                        }
                        [b'\r'] | [] => {
                            self.scanned = s;
                            return if buf.len() >= max {
                                Err(HeadError::TooLarge(max))
                            } else {
                                Ok(Scan::Empty)
                            };
                        }
                        [b'\n', ..] => return Err(HeadError::Malformed("bare LF")),
                        _ => break,
                    }
                    if s >= max {
                        return Err(HeadError::TooLarge(max));
                    }
                }
                self.start = Some(s);
                self.scanned = s;
                s
            }
        };
        let from = self.scanned.max(start);
        for i in from..buf.len() {
            self.work += 1;
            match buf[i] {
                b'\r' => match buf.get(i + 1) {
                    None => break,
                    Some(b'\n') => {
                        // An empty line: this CRLF right after the previous line's CRLF.
                        if i >= start + 2 && &buf[i - 2..i] == b"\r\n" {
                            let head_len = i + 2;
                            if head_len > max {
                                return Err(HeadError::TooLarge(max));
                            }
                            return Ok(Scan::Complete { start, head_len });
                        }
                    }
                    Some(_) => return Err(HeadError::Malformed("bare CR")),
                },
                b'\n' if i == 0 || buf[i - 1] != b'\r' => {
                    return Err(HeadError::Malformed("bare LF"));
                }
                _ => {}
            }
            self.scanned = i + 1;
        }
        if buf.len() >= max {
            return Err(HeadError::TooLarge(max));
        }
        Ok(Scan::Partial { start })
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// RFC 9110 tchar.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(b: &[u8]) -> bool {
    !b.is_empty() && b.iter().all(|&c| is_tchar(c))
}

type Line = (Range<usize>, Range<usize>, Version);

fn request_line(buf: &[u8], start: usize, end: usize) -> Result<Line, HeadError> {
    let line = &buf[start..end];
    let bad = HeadError::Malformed("request line");
    let sp1 = line.iter().position(|&c| c == b' ').ok_or(bad)?;
    let rest = &line[sp1 + 1..];
    let sp2 = rest.iter().position(|&c| c == b' ').ok_or(bad)?;
    let (method, target, version) = (&line[..sp1], &rest[..sp2], &rest[sp2 + 1..]);
    if !is_token(method) || target.is_empty() || !target.iter().all(|c| (0x21..=0x7e).contains(c)) {
        return Err(bad);
    }
    let version = match version {
        b"HTTP/1.1" => Version::Http11,
        b"HTTP/1.0" => Version::Http10,
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            return Err(HeadError::Version)
        }
        _ => return Err(bad),
    };
    let m = start..start + sp1;
    let t = start + sp1 + 1..start + sp1 + 1 + sp2;
    Ok((m, t, version))
}

fn trim_range(buf: &[u8], mut r: Range<usize>) -> Range<usize> {
    while r.start < r.end && matches!(buf[r.start], b' ' | b'\t') {
        r.start += 1;
    }
    while r.end > r.start && matches!(buf[r.end - 1], b' ' | b'\t') {
        r.end -= 1;
    }
    r
}

/// The comma-separated elements of all `values`, trimmed, empty ones dropped (RFC 9110 5.6.1).
pub(crate) fn list_elements<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<&'a [u8]> {
    values
        .flat_map(|v| v.split(|&c| c == b','))
        .map(|e| {
            let s = e.iter().position(|c| !matches!(c, b' ' | b'\t'));
            let t = e.iter().rposition(|c| !matches!(c, b' ' | b'\t'));
            match (s, t) {
                (Some(s), Some(t)) => &e[s..=t],
                _ => &e[..0],
            }
        })
        .filter(|e| !e.is_empty())
        .collect()
}

/// The field lines between `pos` and `body_end` (each ending in CRLF).
fn parse_fields(
    buf: &[u8],
    mut pos: usize,
    body_end: usize,
    max_headers: usize,
) -> Result<Vec<Field>, HeadError> {
    let mut fields = Vec::new();
    while pos < body_end {
        let eol = pos + find_crlf(&buf[pos..body_end]).ok_or(HeadError::Malformed("field"))?;
        let line = &buf[pos..eol];
        if matches!(line.first(), Some(b' ' | b'\t')) {
            return Err(HeadError::Malformed("obsolete line folding"));
        }
        let colon = line
            .iter()
            .position(|&c| c == b':')
            .ok_or(HeadError::Malformed("field without colon"))?;
        if !is_token(&line[..colon]) {
            return Err(HeadError::Malformed("field name"));
        }
        if !line[colon + 1..]
            .iter()
            .all(|&c| c == b'\t' || c == b' ' || (0x21..=0x7e).contains(&c) || c >= 0x80)
        {
            return Err(HeadError::Malformed("control character in field value"));
        }
        if fields.len() == max_headers {
            return Err(HeadError::TooManyFields(max_headers));
        }
        fields.push(Field {
            line: pos..eol,
            name: pos..pos + colon,
            value: trim_range(buf, pos + colon + 1..eol),
        });
        pos = eol + 2;
    }
    Ok(fields)
}

fn parse_head(
    buf: &[u8],
    start: usize,
    head_len: usize,
    limits: &Limits,
) -> Result<RequestHead, HeadError> {
    let body_end = head_len - 2; // the final CRLF: lines below each end in CRLF
    let first_eol = start + find_crlf(&buf[start..body_end]).ok_or(HeadError::Malformed("head"))?;
    let (method, target, version) = request_line(buf, start, first_eol)?;
    let fields = parse_fields(buf, first_eol + 2, body_end, limits.max_headers)?;
    let mut head = RequestHead {
        start,
        method,
        target,
        version,
        fields,
        head_len,
        framing: Framing::None,
        expect_continue: false,
        upgrade: false,
        connect: false,
        keep_alive: false,
    };
    semantics(buf, &mut head)?;
    Ok(head)
}

/// One Content-Length from its list elements: all equal, digits only, fits in 64 bits.
fn content_length(elements: &[&[u8]]) -> Option<u64> {
    let first = elements.first()?;
    if elements.iter().any(|v| v != first) {
        return None;
    }
    let mut n: u64 = 0;
    for &c in first.iter() {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    Some(n)
}

fn semantics(buf: &[u8], h: &mut RequestHead) -> Result<(), HeadError> {
    let hosts = h.values(buf, "host").count();
    if hosts > 1 || (h.version == Version::Http11 && hosts == 0) {
        return Err(HeadError::Malformed("Host"));
    }
    let te = list_elements(h.values(buf, "transfer-encoding"));
    let has_te = h.values(buf, "transfer-encoding").next().is_some();
    let cl = list_elements(h.values(buf, "content-length"));
    let has_cl = h.values(buf, "content-length").next().is_some();
    h.framing = if has_te {
        if h.version == Version::Http10 {
            return Err(HeadError::Malformed("Transfer-Encoding in HTTP/1.0"));
        }
        if has_cl {
            return Err(HeadError::Malformed(
                "both Transfer-Encoding and Content-Length",
            ));
        }
        let chunked = |c: &[u8]| c.eq_ignore_ascii_case(b"chunked");
        let last_chunked = te.last().is_some_and(|c| chunked(c));
        if !last_chunked
            || te.iter().filter(|c| chunked(c)).count() != 1
            || !te.iter().all(|c| is_token(c))
        {
            return Err(HeadError::Malformed(
                "Transfer-Encoding must end in chunked",
            ));
        }
        Framing::Chunked
    } else if has_cl {
        let n = content_length(&cl).ok_or(HeadError::Malformed("Content-Length"))?;
        if n == 0 {
            Framing::None
        } else {
            Framing::Length(n)
        }
    } else {
        Framing::None
    };
    let (upgrade, connect, expect_continue, keep_alive) = {
        let conn = list_elements(h.values(buf, "connection"));
        let has = |tok: &[u8]| conn.iter().any(|c| c.eq_ignore_ascii_case(tok));
        let upgrade_field = h.values(buf, "upgrade").any(|v| !v.is_empty());
        (
            upgrade_field && has(b"upgrade"),
            h.method(buf) == b"CONNECT",
            h.version == Version::Http11
                && h.values(buf, "expect")
                    .any(|v| v.eq_ignore_ascii_case(b"100-continue")),
            match h.version {
                Version::Http11 => !has(b"close"),
                Version::Http10 => has(b"keep-alive") && !has(b"close"),
            },
        )
    };
    h.upgrade = upgrade;
    h.connect = connect;
    h.expect_continue = expect_continue;
    h.keep_alive = keep_alive;
    Ok(())
}

mod body;
mod response;

pub use body::Body;
#[cfg(test)]
pub(crate) use body::BodyError;
#[cfg(test)]
use response::ResponseHead;
pub(crate) use response::{ResponseFraming, ResponseParse, ResponseReader, ResponseTo};

#[cfg(test)]
mod tests;
