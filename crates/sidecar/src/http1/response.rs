//! Responses (app -> client): where each response ends, and when the connection stops being
//! HTTP.

use super::{
    content_length, find_crlf, list_elements, parse_fields, Field, HeadError, Limits, RequestHead,
    Scan, Scanner, Version,
};

/// What the response answers, as far as its framing depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResponseTo {
    pub head_method: bool,
    pub connect: bool,
}

impl RequestHead {
    pub(crate) fn response_to(&self, buf: &[u8]) -> ResponseTo {
        ResponseTo {
            head_method: self.method(buf) == b"HEAD",
            connect: self.connect,
        }
    }
}

/// How a response body is delimited (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseFraming {
    None,
    Length(u64),
    Chunked,
    /// Until the app closes the connection.
    UntilClose,
    /// `101 Switching Protocols`, or a 2xx to CONNECT: raw bytes both ways from here on.
    Tunnel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResponseHead {
    pub status: u16,
    pub version: Version,
    pub fields: Vec<Field>,
    pub head_len: usize,
    pub framing: ResponseFraming,
    /// A 1xx other than 101 (e.g. `100 Continue`): the final response to the same request
    /// follows.
    pub interim: bool,
    /// Whether the connection may carry another request after this response.
    pub keep_alive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ResponseParse {
    NeedMore,
    Head(ResponseHead),
    /// The app's response cannot be framed: answer 502 if nothing was sent yet, and close.
    Error(HeadError),
}

/// Finds and validates one response head (same contract as [`HeadReader`]).
#[derive(Debug, Clone)]
pub(crate) struct ResponseReader {
    limits: Limits,
    scan: Scanner,
}

impl ResponseReader {
    pub(crate) fn new(limits: Limits) -> ResponseReader {
        ResponseReader {
            limits,
            scan: Scanner::default(),
        }
    }

    pub(crate) fn reset(&mut self) {
        self.scan = Scanner::default();
    }

    pub(crate) fn feed(&mut self, buf: &[u8], to: ResponseTo) -> ResponseParse {
        let (start, head_len) = match self.scan.scan(buf, self.limits.max_head) {
            Err(e) => return ResponseParse::Error(e),
            Ok(Scan::Empty | Scan::Partial { .. }) => return ResponseParse::NeedMore,
            Ok(Scan::Complete { start, head_len }) => (start, head_len),
        };
        match parse_response(buf, start, head_len, &self.limits, to) {
            Ok(h) => ResponseParse::Head(h),
            Err(e) => ResponseParse::Error(e),
        }
    }
}

fn status_line(line: &[u8]) -> Result<(Version, u16), HeadError> {
    let bad = HeadError::Malformed("status line");
    let (version, rest) = (line.get(..8).ok_or(bad)?, line.get(8..).ok_or(bad)?);
    let version = match version {
        b"HTTP/1.1" => Version::Http11,
        b"HTTP/1.0" => Version::Http10,
        _ => return Err(bad),
    };
    let (code, reason) = match rest {
        [b' ', a, b, c, tail @ ..] if [a, b, c].iter().all(|d| d.is_ascii_digit()) => (
            u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'),
            tail,
        ),
        _ => return Err(bad),
    };
    let reason_ok = match reason {
        [] => true,
        [b' ', r @ ..] => r
            .iter()
            .all(|&c| c == b'\t' || c == b' ' || (0x21..=0x7e).contains(&c) || c >= 0x80),
        _ => false,
    };
    if !reason_ok || code < 100 {
        return Err(bad);
    }
    Ok((version, code))
}

fn parse_response(
    buf: &[u8],
    start: usize,
    head_len: usize,
    limits: &Limits,
    to: ResponseTo,
) -> Result<ResponseHead, HeadError> {
    let body_end = head_len - 2;
    let eol = start + find_crlf(&buf[start..body_end]).ok_or(HeadError::Malformed("head"))?;
    let (version, status) = status_line(&buf[start..eol])?;
    let fields = parse_fields(buf, eol + 2, body_end, limits.max_headers)?;
    let values = |name: &'static str| {
        fields
            .iter()
            .filter(move |f| buf[f.name.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|f| &buf[f.value.clone()])
    };
    let conn = list_elements(values("connection"));
    let has = |tok: &[u8]| conn.iter().any(|c| c.eq_ignore_ascii_case(tok));
    let mut keep_alive = match version {
        Version::Http11 => !has(b"close"),
        Version::Http10 => has(b"keep-alive") && !has(b"close"),
    };
    let interim = (100..200).contains(&status) && status != 101;
    let framing = if status == 101 || (to.connect && (200..300).contains(&status)) {
        ResponseFraming::Tunnel
    } else if interim || to.head_method || status == 204 || status == 304 {
        ResponseFraming::None
    } else if values("transfer-encoding").next().is_some() {
        let te = list_elements(values("transfer-encoding"));
        let has_cl = values("content-length").next().is_some();
        if version == Version::Http11
            && !has_cl
            && te
                .last()
                .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
        {
            ResponseFraming::Chunked
        } else {
            // Faulty or unknown framing: read to the end and do not reuse (RFC 9112 6.1, 6.3).
            keep_alive = false;
            ResponseFraming::UntilClose
        }
    } else if values("content-length").next().is_some() {
        let cl = list_elements(values("content-length"));
        match content_length(&cl) {
            Some(0) => ResponseFraming::None,
            Some(n) => ResponseFraming::Length(n),
            None => return Err(HeadError::Malformed("Content-Length")),
        }
    } else {
        keep_alive = false;
        ResponseFraming::UntilClose
    };
    Ok(ResponseHead {
        status,
        version,
        head_len,
        framing,
        interim,
        keep_alive,
        fields,
    })
}
