//! Bodies: Content-Length and chunked framing, followed byte by byte.

use super::{Framing, Range, ResponseFraming, MAX_CHUNK_LINE};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("malformed chunk size line")]
    ChunkSize,
    #[error("chunk size line longer than {MAX_CHUNK_LINE} bytes")]
    ChunkLineTooLong,
    #[error("chunk data not followed by CRLF")]
    ChunkEnd,
    #[error("malformed trailer section")]
    Trailer,
    #[error("trailer section too large")]
    TrailerTooLarge,
}

/// Where a request body ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Length {
        remaining: u64,
    },
    Chunked(Chunked),
    /// Everything until the peer closes.
    UntilClose,
    Done,
}

impl Body {
    /// `max_trailers` bounds the chunked trailer section (use [`Limits::max_head`]).
    pub fn new(framing: Framing, max_trailers: usize) -> Body {
        match framing {
            Framing::None | Framing::Length(0) => Body::Done,
            Framing::Length(n) => Body::Length { remaining: n },
            Framing::Chunked => Body::Chunked(Chunked::new(max_trailers)),
        }
    }

    /// The body of a response; `None` for a tunnel (no more HTTP on this connection).
    pub(crate) fn from_response(framing: ResponseFraming, max_trailers: usize) -> Option<Body> {
        Some(match framing {
            ResponseFraming::None | ResponseFraming::Length(0) => Body::Done,
            ResponseFraming::Length(n) => Body::Length { remaining: n },
            ResponseFraming::Chunked => Body::Chunked(Chunked::new(max_trailers)),
            ResponseFraming::UntilClose => Body::UntilClose,
            ResponseFraming::Tunnel => return None,
        })
    }

    /// How many bytes at the start of `data` belong to the body. When [`Body::is_done`] is
    /// true afterwards, the bytes after those start the next request.
    pub fn feed(&mut self, data: &[u8]) -> Result<usize, BodyError> {
        match self {
            Body::Done => Ok(0),
            Body::UntilClose => Ok(data.len()),
            Body::Length { remaining } => {
                let n = usize::try_from(*remaining).map_or(data.len(), |r| r.min(data.len()));
                *remaining -= n as u64;
                if *remaining == 0 {
                    *self = Body::Done;
                }
                Ok(n)
            }
            Body::Chunked(c) => {
                let n = c.feed(data)?;
                if c.is_done() {
                    *self = Body::Done;
                }
                Ok(n)
            }
        }
    }

    /// [`Body::feed`] for a request to the app: chunked trailer fields are consumed but not
    /// forwarded, as Envoy's HTTP/1 codec drops proxied trailers unless `enable_trailers` is
    /// set (pitfall 67). Returns the bytes consumed and the range of them to leave out.
    pub(crate) fn feed_dropping_trailers(
        &mut self,
        data: &[u8],
    ) -> Result<(usize, Range<usize>), BodyError> {
        match self {
            Body::Chunked(c) => {
                c.drop_trailers = true;
                let n = c.feed(data)?;
                let dropped = c.dropped.clone();
                if c.is_done() {
                    *self = Body::Done;
                }
                Ok((n, dropped))
            }
            _ => Ok((self.feed(data)?, 0..0)),
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, Body::Done)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading hex digits of the size (`digits` so far).
    Size {
        digits: u8,
    },
    /// Whitespace after the size: only more of it or `;` may follow (RFC 9112 BWS).
    ExtWs,
    /// Chunk extensions after `;`, up to CR (not interpreted).
    Ext,
    /// Got CR of the size line.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer field line.
    Trailer,
    TrailerLf,
    FinalLf,
    Done,
}

/// The chunked transfer coding (RFC 9112 7.1), tracked byte by byte without buffering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunked {
    state: ChunkState,
    size: u64,
    line: usize,
    trailers: usize,
    max_trailers: usize,
    /// Trailer field lines are to be left out ([`Body::feed_dropping_trailers`]).
    drop_trailers: bool,
    /// The trailer bytes of the last [`Chunked::feed`] call (contiguous: only the final CRLF
    /// follows them).
    dropped: Range<usize>,
}

impl Chunked {
    pub(crate) fn new(max_trailers: usize) -> Chunked {
        Chunked {
            state: ChunkState::Size { digits: 0 },
            size: 0,
            line: 0,
            trailers: 0,
            max_trailers,
            drop_trailers: false,
            dropped: 0..0,
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consumes bytes of the chunked body; stops right after the final CRLF.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<usize, BodyError> {
        use ChunkState::*;
        let mut i = 0;
        self.dropped = 0..0;
        while i < data.len() {
            let b = data[i];
            let trailer_byte = match self.state {
                TrailerStart => b != b'\r',
                Trailer | TrailerLf => true,
                _ => false,
            };
            if trailer_byte && self.drop_trailers {
                if self.dropped.is_empty() {
                    self.dropped = i..i;
                }
                self.dropped.end = i + 1;
            }
            match self.state {
                Done => return Ok(i),
                Data => {
                    let avail = (data.len() - i) as u64;
                    let take = self.size.min(avail) as usize;
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                Size { digits } => {
                    self.line += 1;
                    if let Some(d) = (b as char).to_digit(16) {
                        if digits == 16 {
                            return Err(BodyError::ChunkSize); // over 64 bits
                        }
                        self.size = (self.size << 4) | u64::from(d);
                        self.state = Size { digits: digits + 1 };
                    } else if digits == 0 {
                        return Err(BodyError::ChunkSize);
                    } else {
                        match b {
                            b'\r' => self.state = SizeLf,
                            b';' => self.state = Ext,
                            b' ' | b'\t' => self.state = ExtWs,
                            _ => return Err(BodyError::ChunkSize),
                        }
                    }
                }
                ExtWs => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err(BodyError::ChunkLineTooLong);
                    }
                    match b {
                        b' ' | b'\t' => {}
                        b';' => self.state = Ext,
                        _ => return Err(BodyError::ChunkSize),
                    }
                }
                Ext => {
                    self.line += 1;
                    if self.line > MAX_CHUNK_LINE {
                        return Err(BodyError::ChunkLineTooLong);
                    }
                    match b {
                        b'\r' => self.state = SizeLf,
                        b'\t' | 0x20..=0x7e | 0x80..=0xff => {}
                        _ => return Err(BodyError::ChunkSize),
                    }
                }
                SizeLf => {
                    if b != b'\n' {
                        return Err(BodyError::ChunkSize);
                    }
                    self.line = 0;
                    self.state = if self.size == 0 { TrailerStart } else { Data };
                }
                DataCr => {
                    if b != b'\r' {
                        return Err(BodyError::ChunkEnd);
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        return Err(BodyError::ChunkEnd);
                    }
                    self.state = Size { digits: 0 };
                }
                TrailerStart | Trailer => {
                    self.trailers += 1;
                    if self.trailers > self.max_trailers {
                        return Err(BodyError::TrailerTooLarge);
                    }
                    match (self.state, b) {
                        (TrailerStart, b'\r') => self.state = FinalLf,
                        (TrailerStart, b' ' | b'\t' | b':') => return Err(BodyError::Trailer),
                        (Trailer, b'\r') => self.state = TrailerLf,
                        (_, b'\t' | 0x20..=0x7e | 0x80..=0xff) => self.state = Trailer,
                        _ => return Err(BodyError::Trailer),
                    }
                }
                TrailerLf => {
                    if b != b'\n' {
                        return Err(BodyError::Trailer);
                    }
                    self.state = TrailerStart;
                }
                FinalLf => {
                    if b != b'\n' {
                        return Err(BodyError::Trailer);
                    }
                    self.state = Done;
                    return Ok(i + 1);
                }
            }
            i += 1;
        }
        Ok(i)
    }
}
