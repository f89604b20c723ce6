//! PROXY protocol v1 (text) and v2 (binary), as specified by HAProxy's PROXY protocol spec:
//! a strict, allocation-free parser and an encoder. Pure: no I/O, no clock.
//!
//! # Parsing contract (for the code that wires this into the accept path)
//! [`parse`] looks at the bytes received so far on a connection and answers:
//! - [`Parse::NeedMore`] `{ at_least }`: every byte so far is a valid prefix of a header; read
//!   more (the buffer must reach `at_least` bytes before the answer can change). `at_least` never
//!   exceeds the header length limit, so a peer cannot make us buffer more than the limit.
//! - [`Parse::Header`]: a complete header of `header_len` bytes. Bytes from `header_len` on
//!   belong to the application and were not looked at. `parse(&buf[..header_len])` gives the
//!   same answer, so the caller may read with `MSG_PEEK` and then consume exactly `header_len`.
//! - [`Parse::Error`]: not a (valid) header. Decided as early as possible: the first byte that
//!   cannot start either version, a bad token as soon as its terminating space arrives.
//!
//! The caller also needs a deadline (a slow peer stays in `NeedMore`): that is not our job here.
//!
//! # Strictness
//! - v1: at most 107 bytes including CRLF; exactly `PROXY SP proto SP src SP dst SP sport SP
//!   dport CRLF` with single spaces; `proto` is `TCP4`, `TCP6` or `UNKNOWN` (after `UNKNOWN`
//!   anything printable up to CRLF is ignored, as the spec requires); addresses must parse as
//!   the family the token names (so `TCP4` with an IPv6 address is an error); IPv4 addresses
//!   with leading zeros are rejected; ports are `0`..`65535` in decimal without sign or leading
//!   zeros. Only printable ASCII is allowed, and CR must be followed by LF.
//! - v2: 12-byte signature, version nibble 2, command `LOCAL` (0) or `PROXY` (1), one of the
//!   seven family/transport bytes the spec defines (others rejected), total length bounded by
//!   [`Limits::v2_max_len`]. `LOCAL` ignores the address block (the caller uses the TCP peer).
//!   `PROXY` with `AF_UNSPEC` or `AF_UNIX` carries no usable address: `addrs` is `None`, like
//!   `LOCAL`. `PROXY` over a `DGRAM` transport is rejected (this is a TCP proxy). TLVs after
//!   the address block are walked with bounds checks: a TLV that overruns the declared length
//!   is an error; their contents are never interpreted ([`tlvs`] lists them).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;

/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included (spec, section 2.1).
pub(crate) const V1_MAX_LEN: usize = 107;
/// Signature, version/command, family/transport and the 2-byte length.
pub(crate) const V2_FIXED_LEN: usize = 16;
/// The smallest accepted v2 limit: a TCP over IPv6 header without TLVs.
pub(crate) const V2_MIN_LIMIT: usize = V2_FIXED_LEN + 36;
/// Default bound on a whole v2 header (address block plus TLVs); configurable per port.
pub(crate) const DEFAULT_V2_MAX_LEN: usize = 4096;

const V1_PREFIX: &[u8] = b"PROXY ";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The connection was made by the balancer itself (health check): use the TCP peer.
    Local,
    /// Relayed on behalf of a client.
    Proxy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Unspec,
    Inet,
    Inet6,
    Unix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unspec,
    Stream,
    Dgram,
}

/// The client's connection as the balancer saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    /// The client.
    pub src: SocketAddr,
    /// The address the client connected to (the balancer's frontend).
    pub dst: SocketAddr,
}

/// A complete, valid header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    pub command: Command,
    pub family: Family,
    pub transport: Transport,
    /// `Some` only for `PROXY` over TCP/IPv4 or TCP/IPv6; `None` means "use the TCP peer".
    pub addrs: Option<Endpoints>,
    /// Bytes the header occupies at the start of the buffer.
    pub header_len: usize,
    /// Where the v2 TLVs are in the buffer (empty for v1 and `LOCAL`); see [`tlvs`].
    pub tlvs: Range<usize>,
}

impl Header {
    /// The effective client the header asserts, if any.
    pub fn client(&self) -> Option<SocketAddr> {
        self.addrs.map(|a| a.src)
    }
}

/// Why a buffer is not a valid header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("PROXY protocol {0:?} is not accepted here")]
    VersionNotAllowed(Version),
    #[error("v1 header has no CRLF within 107 bytes")]
    V1TooLong,
    #[error("v1 header: CR not followed by LF, or LF without CR")]
    V1BadLineEnd,
    #[error("v1 header: byte outside printable ASCII")]
    V1BadChar,
    #[error("v1 header: protocol must be TCP4, TCP6 or UNKNOWN")]
    V1BadProtocol,
    #[error("v1 header: wrong number of fields or spacing")]
    V1BadFields,
    #[error("v1 header: address invalid for the protocol's family")]
    V1BadAddress,
    #[error("v1 header: port must be 0..65535 in decimal without sign or leading zeros")]
    V1BadPort,
    #[error("v2 header: version is not 2")]
    V2BadVersion,
    #[error("v2 header: command is neither LOCAL nor PROXY")]
    V2BadCommand,
    #[error("v2 header: undefined family/transport byte {0:#04x}")]
    V2BadFamily(u8),
    #[error("v2 header: PROXY over a datagram transport on a stream connection")]
    V2NotStream,
    #[error("v2 header: {len} bytes exceed the limit of {max}")]
    V2TooLong { len: usize, max: usize },
    #[error("v2 header: address block shorter than its family needs")]
    V2ShortAddress,
    #[error("v2 header: TLV overruns the header")]
    V2BadTlv,
}

impl Error {
    /// A stable snake_case name for metrics labels and access-log fields.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Error::NotProxy => "not_proxy",
            Error::VersionNotAllowed(_) => "version_not_allowed",
            Error::V1TooLong => "v1_too_long",
            Error::V1BadLineEnd => "v1_bad_line_end",
            Error::V1BadChar => "v1_bad_char",
            Error::V1BadProtocol => "v1_bad_protocol",
            Error::V1BadFields => "v1_bad_fields",
            Error::V1BadAddress => "v1_bad_address",
            Error::V1BadPort => "v1_bad_port",
            Error::V2BadVersion => "v2_bad_version",
            Error::V2BadCommand => "v2_bad_command",
            Error::V2BadFamily(_) => "v2_bad_family",
            Error::V2NotStream => "v2_not_stream",
            Error::V2TooLong { .. } => "v2_too_long",
            Error::V2ShortAddress => "v2_short_address",
            Error::V2BadTlv => "v2_bad_tlv",
        }
    }
}

/// The answer of [`parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    NeedMore { at_least: usize },
    Header(Header),
    Error(Error),
}

/// What a port accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub accept_v1: bool,
    pub accept_v2: bool,
    /// Bound on a whole v2 header (fixed part + address block + TLVs); raised to
    /// [`V2_MIN_LIMIT`] if set lower, so any TCP header without TLVs fits.
    pub v2_max_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            accept_v1: true,
            accept_v2: true,
            v2_max_len: DEFAULT_V2_MAX_LEN,
        }
    }
}

/// Parses the header at the start of `buf` (see the module documentation for the contract).
pub fn parse(buf: &[u8], limits: &Limits) -> Parse {
    let Some(&first) = buf.first() else {
        return Parse::NeedMore { at_least: 1 };
    };
    if first == V1_PREFIX[0] {
        if !limits.accept_v1 {
            return Parse::Error(Error::VersionNotAllowed(Version::V1));
        }
        parse_v1(buf)
    } else if first == V2_SIGNATURE[0] {
        if !limits.accept_v2 {
            return Parse::Error(Error::VersionNotAllowed(Version::V2));
        }
        parse_v2(buf, limits.v2_max_len.max(V2_MIN_LIMIT))
    } else {
        Parse::Error(Error::NotProxy)
    }
}

// ---------------------------------------------------------------------------------------------
// v1

fn parse_v1(buf: &[u8]) -> Parse {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Parse::Error(Error::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    for (i, &b) in window.iter().enumerate() {
        match b {
            b'\r' => {
                if i + 2 > V1_MAX_LEN {
                    return Parse::Error(Error::V1TooLong);
                }
                return match buf.get(i + 1) {
                    None => Parse::NeedMore { at_least: i + 2 },
                    Some(b'\n') => match v1_line(&buf[..i]) {
                        Ok(addrs) => Parse::Header(Header {
                            version: Version::V1,
                            command: Command::Proxy,
                            family: match addrs {
                                Some(Endpoints {
                                    src: SocketAddr::V4(_),
                                    ..
                                }) => Family::Inet,
                                Some(_) => Family::Inet6,
                                None => Family::Unspec,
                            },
                            transport: if addrs.is_some() {
                                Transport::Stream
                            } else {
                                Transport::Unspec
                            },
                            addrs,
                            header_len: i + 2,
                            tlvs: i + 2..i + 2,
                        }),
                        Err(e) => Parse::Error(e),
                    },
                    Some(_) => Parse::Error(Error::V1BadLineEnd),
                };
            }
            b'\n' => return Parse::Error(Error::V1BadLineEnd),
            0x20..=0x7e => {}
            _ => return Parse::Error(Error::V1BadChar),
        }
    }
    if buf.len() >= V1_MAX_LEN {
        return Parse::Error(Error::V1TooLong);
    }
    match v1_partial(window) {
        Ok(()) => Parse::NeedMore {
            at_least: buf.len() + 1,
        },
        Err(e) => Parse::Error(e),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum V1Proto {
    Tcp4,
    Tcp6,
    Unknown,
}

fn v1_proto(tok: &[u8]) -> Result<V1Proto, Error> {
    match tok {
        b"TCP4" => Ok(V1Proto::Tcp4),
        b"TCP6" => Ok(V1Proto::Tcp6),
        b"UNKNOWN" => Ok(V1Proto::Unknown),
        _ => Err(Error::V1BadProtocol),
    }
}

fn v1_ip(tok: &[u8], proto: V1Proto) -> Result<IpAddr, Error> {
    let s = std::str::from_utf8(tok).map_err(|_| Error::V1BadAddress)?;
    match proto {
        V1Proto::Tcp4 => s.parse::<Ipv4Addr>().map(IpAddr::V4),
        _ => s.parse::<Ipv6Addr>().map(IpAddr::V6),
    }
    .map_err(|_| Error::V1BadAddress)
}

fn v1_port(tok: &[u8]) -> Result<u16, Error> {
    if tok.is_empty() || tok.len() > 5 || (tok.len() > 1 && tok[0] == b'0') {
        return Err(Error::V1BadPort);
    }
    let mut v: u32 = 0;
    for &b in tok {
        if !b.is_ascii_digit() {
            return Err(Error::V1BadPort);
        }
        v = v * 10 + u32::from(b - b'0');
    }
    u16::try_from(v).map_err(|_| Error::V1BadPort)
}

/// A complete line without CRLF.
fn v1_line(line: &[u8]) -> Result<Option<Endpoints>, Error> {
    let rest = line.get(V1_PREFIX.len()..).ok_or(Error::NotProxy)?;
    let mut toks = rest.split(|&b| b == b' ');
    let proto = v1_proto(toks.next().unwrap_or_default())?;
    if proto == V1Proto::Unknown {
        // "PROXY UNKNOWN" alone, or followed by a space and anything (ignored, per the spec).
        return Ok(None);
    }
    let mut f: [&[u8]; 4] = [&[]; 4];
    for slot in f.iter_mut() {
        *slot = toks.next().ok_or(Error::V1BadFields)?;
    }
    if toks.next().is_some() || f.iter().any(|t| t.is_empty()) {
        return Err(Error::V1BadFields);
    }
    let src_ip = v1_ip(f[0], proto)?;
    let dst_ip = v1_ip(f[1], proto)?;
    let sport = v1_port(f[2])?;
    let dport = v1_port(f[3])?;
    Ok(Some(Endpoints {
        src: SocketAddr::new(src_ip, sport),
        dst: SocketAddr::new(dst_ip, dport),
    }))
}

/// Checks a line without CR so far: complete tokens fully, the last one as a prefix.
fn v1_partial(line: &[u8]) -> Result<(), Error> {
    let Some(rest) = line.get(V1_PREFIX.len()..) else {
        return Ok(()); // still inside "PROXY ", already compared
    };
    // Every token but the last is complete (a space followed it).
    let mut toks = rest.split(|&b| b == b' ');
    let mut last = toks.next().unwrap_or_default();
    let mut done = 0usize;
    let mut proto = None;
    for next in toks {
        let tok = std::mem::replace(&mut last, next);
        if tok.is_empty() {
            return Err(Error::V1BadFields);
        }
        match done {
            0 => {
                let p = v1_proto(tok)?;
                if p == V1Proto::Unknown {
                    return Ok(()); // the rest is ignored
                }
                proto = Some(p);
            }
            1 | 2 => {
                v1_ip(tok, proto.unwrap_or(V1Proto::Tcp6))?;
            }
            3 => {
                v1_port(tok)?;
            }
            _ => return Err(Error::V1BadFields), // a sixth space
        }
        done += 1;
    }
    // The token being received.
    let ok = match (done, proto) {
        (0, _) => [&b"TCP4"[..], b"TCP6", b"UNKNOWN"]
            .iter()
            .any(|p| p.starts_with(last)),
        (1 | 2, Some(V1Proto::Tcp4)) => {
            last.len() <= 15 && last.iter().all(|b| b.is_ascii_digit() || *b == b'.')
        }
        (1 | 2, _) => {
            last.len() <= 45
                && last
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || *b == b':' || *b == b'.')
        }
        _ => {
            // A port: digits, no leading zero, at most 65535.
            if last.first() == Some(&b'0') && last.len() > 1 {
                return Err(Error::V1BadPort);
            }
            if last.is_empty() {
                true
            } else {
                v1_port(last).is_ok()
            }
        }
    };
    match (ok, done) {
        (true, _) => Ok(()),
        (false, 0) => Err(Error::V1BadProtocol),
        (false, 1 | 2) => Err(Error::V1BadAddress),
        (false, _) => Err(Error::V1BadPort),
    }
}

// ---------------------------------------------------------------------------------------------
// v2

fn v2_family(b: u8) -> Option<(Family, Transport)> {
    Some(match b {
        0x00 => (Family::Unspec, Transport::Unspec),
        0x11 => (Family::Inet, Transport::Stream),
        0x12 => (Family::Inet, Transport::Dgram),
        0x21 => (Family::Inet6, Transport::Stream),
        0x22 => (Family::Inet6, Transport::Dgram),
        0x31 => (Family::Unix, Transport::Stream),
        0x32 => (Family::Unix, Transport::Dgram),
        _ => return None,
    })
}

fn address_len(f: Family) -> usize {
    match f {
        Family::Unspec => 0,
        Family::Inet => 12,
        Family::Inet6 => 36,
        Family::Unix => 216,
    }
}

fn parse_v2(buf: &[u8], max: usize) -> Parse {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Parse::Error(Error::NotProxy);
    }
    let need_fixed = Parse::NeedMore {
        at_least: V2_FIXED_LEN,
    };
    let Some(&ver_cmd) = buf.get(12) else {
        return need_fixed;
    };
    if ver_cmd >> 4 != 2 {
        return Parse::Error(Error::V2BadVersion);
    }
    let command = match ver_cmd & 0x0f {
        0 => Command::Local,
        1 => Command::Proxy,
        _ => return Parse::Error(Error::V2BadCommand),
    };
    let Some(&fam) = buf.get(13) else {
        return need_fixed;
    };
    let Some((family, transport)) = v2_family(fam) else {
        return Parse::Error(Error::V2BadFamily(fam));
    };
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return need_fixed;
    };
    let total = V2_FIXED_LEN + usize::from(u16::from_be_bytes([hi, lo]));
    if total > max {
        return Parse::Error(Error::V2TooLong { len: total, max });
    }
    let Some(block) = buf.get(V2_FIXED_LEN..total) else {
        return Parse::NeedMore { at_least: total };
    };
    let header = |addrs, tlvs| {
        Parse::Header(Header {
            version: Version::V2,
            command,
            family,
            transport,
            addrs,
            header_len: total,
            tlvs,
        })
    };
    if command == Command::Local {
        // Spec: the receiver discards the whole block, family included, and uses the real
        // connection endpoints.
        return header(None, total..total);
    }
    let alen = address_len(family);
    if block.len() < alen {
        return Parse::Error(Error::V2ShortAddress);
    }
    if transport == Transport::Dgram {
        return Parse::Error(Error::V2NotStream);
    }
    let a = &block[..alen];
    let addrs = match family {
        Family::Inet => {
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            Some(Endpoints {
                src: SocketAddr::new(ip(0), u16::from_be_bytes([a[8], a[9]])),
                dst: SocketAddr::new(ip(4), u16::from_be_bytes([a[10], a[11]])),
            })
        }
        Family::Inet6 => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            Some(Endpoints {
                src: SocketAddr::new(ip(0), u16::from_be_bytes([a[32], a[33]])),
                dst: SocketAddr::new(ip(16), u16::from_be_bytes([a[34], a[35]])),
            })
        }
        Family::Unspec | Family::Unix => None,
    };
    let tlv_range = V2_FIXED_LEN + alen..total;
    if tlvs(&buf[tlv_range.clone()]).any(|t| t.is_err()) {
        return Parse::Error(Error::V2BadTlv);
    }
    header(addrs, tlv_range)
}

/// One TLV of a v2 header: its type and value (never interpreted here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    pub kind: u8,
    pub value: &'a [u8],
}

/// Walks the TLV area (`&buf[header.tlvs.clone()]`), bounds checked; stops after the first error.
pub fn tlvs(mut area: &[u8]) -> impl Iterator<Item = Result<Tlv<'_>, Error>> + '_ {
    std::iter::from_fn(move || {
        if area.is_empty() {
            return None;
        }
        let item = match area {
            [kind, hi, lo, rest @ ..] => {
                let len = usize::from(u16::from_be_bytes([*hi, *lo]));
                match (rest.get(..len), rest.get(len..)) {
                    (Some(value), Some(next)) => {
                        area = next;
                        Ok(Tlv { kind: *kind, value })
                    }
                    _ => Err(Error::V2BadTlv),
                }
            }
            _ => Err(Error::V2BadTlv),
        };
        if item.is_err() {
            area = &[];
        }
        Some(item)
    })
}

// ---------------------------------------------------------------------------------------------
// Encoder

/// Puts both addresses in one family: IPv4 when both are IPv4 (or IPv4-mapped IPv6), else IPv6
/// with any IPv4 address mapped (both versions of the protocol need one family per header).
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (s, d) = (src.ip().to_canonical(), dst.ip().to_canonical());
    let v6 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    };
    if s.is_ipv4() && d.is_ipv4() {
        (
            SocketAddr::new(s, src.port()),
            SocketAddr::new(d, dst.port()),
        )
    } else {
        (
            SocketAddr::new(v6(s), src.port()),
            SocketAddr::new(v6(d), dst.port()),
        )
    }
}

/// A v1 header for a TCP connection from `src` to `dst`.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (s, d) = same_family(src, dst);
    let proto = if s.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        s.ip(),
        d.ip(),
        s.port(),
        d.port()
    )
    .into_bytes()
}

/// The v1 header for a connection whose addresses are not to be passed on.
pub fn encode_v1_unknown() -> Vec<u8> {
    b"PROXY UNKNOWN\r\n".to_vec()
}

/// A v2 `PROXY` header (TCP) for a connection from `src` to `dst`, without TLVs.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (s, d) = same_family(src, dst);
    let mut out = Vec::with_capacity(V2_FIXED_LEN + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(0x21);
    match (s.ip(), d.ip()) {
        (IpAddr::V4(si), IpAddr::V4(di)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&si.octets());
            out.extend_from_slice(&di.octets());
        }
        (si, di) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V6(v6) => v6.octets(),
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(si));
            out.extend_from_slice(&v6(di));
        }
    }
    out.extend_from_slice(&s.port().to_be_bytes());
    out.extend_from_slice(&d.port().to_be_bytes());
    out
}

/// The v2 `LOCAL` header (no addresses), as a balancer sends for its own health checks.
pub fn encode_v2_local() -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    out
}

#[cfg(test)]
mod tests;
