//! Every raw socket option, pipe and splice call of the sidecar, and its only `unsafe`.
//!
//! Keeping them here means the rest of the sidecar works with safe types, and a reviewer finds
//! every privileged or kernel-specific knob (`IP_TRANSPARENT`, `SO_MARK`, `SO_ORIGINAL_DST`)
//! in one file.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// Sets `IP_TRANSPARENT` (IPv4) or `IPV6_TRANSPARENT` (IPv6): lets a listener accept TPROXY'd
/// connections addressed to foreign IPs, and an upstream socket bind to the client's IP.
pub(crate) fn set_transparent(sock: &Socket, v6: bool) -> io::Result<()> {
    if !v6 {
        return sock.set_ip_transparent(true);
    }
    // socket2 0.5 has no IPv6 twin of `set_ip_transparent`.
    let one: libc::c_int = 1;
    // SAFETY: `sock` owns a valid open descriptor for the duration of the call; the option value
    // points at a live `c_int` and the length passed is exactly its size, as IPV6_TRANSPARENT
    // expects (see ipv6(7)). The kernel copies the value and keeps no pointer.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_IPV6,
            libc::IPV6_TRANSPARENT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Header and one 32-bit slice of the capability sets, as `capget(2)`/`capset(2)` take them
/// (version 3: two slices cover capabilities 0-63).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Makes capability `cap` (a number below 32, e.g. 13 for CAP_NET_RAW) effective when it is in
/// the permitted set; returns whether it is effective afterwards. Raising a permitted capability
/// into the effective set needs no privilege: the image ships the sidecar with the file
/// capability `cap_net_raw+p` (permitted only), so a container without NET_RAW in its bounding
/// set can still execute it (docs/ARCHITECTURE.md, pitfall 19) and tproxy mode turns it on here.
pub(crate) fn raise_effective(cap: u32) -> io::Result<bool> {
    let bit = 1u32
        .checked_shl(cap)
        .filter(|_| cap < 32)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "capability number above 31"))?;
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: `hdr` and `data` are live, properly laid out (`#[repr(C)]`) values of the sizes
    // capget(2) expects for version 3 (one header, two data slices); the kernel writes only
    // into them and keeps no pointer. pid 0 means the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if data[0].effective & bit != 0 {
        return Ok(true);
    }
    if data[0].permitted & bit == 0 {
        return Ok(false);
    }
    data[0].effective |= bit;
    // SAFETY: as above; capset(2) only reads `hdr` and the two slices. The sidecar calls this
    // once at start-up, before the runtime starts other threads, so every thread created later
    // inherits the raised set.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// What the start-up probe found missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Missing {
    Transparent,
    Mark,
}

/// Creates a throwaway socket and sets `IP_TRANSPARENT` (when `transparent`) and `SO_MARK`.
/// `Err((what, error))` names the first option the kernel refused (EPERM without CAP_NET_RAW).
pub(crate) fn probe(mark: u32, transparent: bool) -> Result<(), (Missing, io::Error)> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| (Missing::Transparent, e))?;
    if transparent {
        sock.set_ip_transparent(true)
            .map_err(|e| (Missing::Transparent, e))?;
    }
    sock.set_mark(mark).map_err(|e| (Missing::Mark, e))
}

/// A listening socket: `SO_REUSEADDR` (restarts while old connections linger), IPv6 listeners
/// `IPV6_V6ONLY` (the IPv4 listener is a separate socket, so each family's original
/// destination comes back in its own family), optional transparency for TPROXY, and
/// `SO_REUSEPORT` when several workers each listen on the same port (the kernel spreads new
/// connections over them by flow hash; the TPROXY listener lookup honours the group too).
pub(crate) fn listener(
    addr: SocketAddr,
    transparent: bool,
    reuse_port: bool,
    backlog: i32,
) -> io::Result<std::net::TcpListener> {
    let v6 = addr.is_ipv6();
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    if v6 {
        sock.set_only_v6(true)?;
    }
    if transparent {
        set_transparent(&sock, v6)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    Ok(sock.into())
}

/// How an upstream socket is prepared before `bind`/`connect`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UpstreamOpts {
    pub v6: bool,
    /// `SO_MARK`: routes the app's replies back to us (tproxy) and exempts us from outbound
    /// capture. `None` when the probe found we may not set it (redirect mode without NET_RAW).
    pub mark: Option<u32>,
    /// `IP_TRANSPARENT`: needed to bind to the client's (non-local) address.
    pub transparent: bool,
    /// `SO_REUSEADDR`: lets an explicitly chosen port be bound while an older connection of ours
    /// on it sits in TIME_WAIT; `connect` still refuses an identical 4-tuple (EADDRNOTAVAIL).
    pub reuse_addr: bool,
}

/// A fresh non-blocking TCP socket for an upstream connection (`SOCK_NONBLOCK` at creation:
/// no fcntl calls), armed with `SO_LINGER` 0 from the start: until the relay ends in order,
/// closing it (or dying) resets the app (relay.rs).
pub(crate) fn upstream_socket(o: UpstreamOpts) -> io::Result<Socket> {
    let domain = if o.v6 { Domain::IPV6 } else { Domain::IPV4 };
    let sock = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    if o.transparent {
        set_transparent(&sock, o.v6)?;
    }
    if let Some(m) = o.mark {
        sock.set_mark(m)?;
    }
    if o.reuse_addr {
        sock.set_reuse_address(true)?;
    }
    sock.set_nodelay(true)?;
    sock.set_linger(Some(Duration::ZERO))?;
    Ok(sock)
}

/// The pre-NAT destination of a REDIRECTed connection (`SO_ORIGINAL_DST` for IPv4,
/// `IP6T_SO_ORIGINAL_DST` for IPv6, chosen by the accepted socket's family).
pub(crate) fn original_dst<S: AsFd>(stream: &S, v6: bool) -> io::Result<SocketAddr> {
    let s = SockRef::from(stream);
    let sa = if v6 {
        s.original_dst_ipv6()?
    } else {
        s.original_dst()?
    };
    sa.as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "original dst is not IP"))
}

/// Makes the next close send a RST instead of a FIN (`SO_LINGER` 0): how a refused upstream or
/// a reset peer is passed on promptly.
pub(crate) fn reset_on_close<S: AsFd>(stream: &S) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Undoes `reset_on_close`: the next close sends a FIN after the queued bytes, as usual.
pub(crate) fn linger_normally<S: AsFd>(stream: &S) {
    let _ = SockRef::from(stream).set_linger(None);
}

/// Half-closes our sending side: the peer reads EOF but may still send.
pub(crate) fn shutdown_write<S: AsFd>(stream: &S) -> io::Result<()> {
    match SockRef::from(stream).shutdown(Shutdown::Write) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        r => r,
    }
}

/// `TCP_NODELAY` on an accepted socket: splice hands over whatever arrived, and Nagle would add
/// latency to small request/response exchanges.
pub(crate) fn set_nodelay<S: AsFd>(stream: &S) {
    let _ = SockRef::from(stream).set_nodelay(true);
}

/// One pipe used as the in-kernel buffer of one relay direction.
pub(crate) struct Pipe {
    pub r: OwnedFd,
    pub w: OwnedFd,
    pub cap: usize,
}

/// The kernel's default pipe capacity (16 pages); resizing to it would be a wasted syscall.
const DEFAULT_PIPE: usize = 65536;

impl Pipe {
    pub(crate) fn new(size: usize) -> io::Result<Pipe> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let mut cap = DEFAULT_PIPE;
        if size != DEFAULT_PIPE {
            let want = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
            // The kernel rounds up to a power-of-two number of pages and reports the result.
            cap = match nix::fcntl::fcntl(&w, FcntlArg::F_SETPIPE_SZ(want)) {
                Ok(n) => usize::try_from(n).unwrap_or(DEFAULT_PIPE),
                Err(_) => DEFAULT_PIPE,
            };
        }
        Ok(Pipe { r, w, cap })
    }
}

/// Moves up to `len` bytes between a socket and a pipe without copying them to user space.
/// `Ok(0)` from a socket is EOF. EAGAIN comes back as `WouldBlock`, which is what tokio's
/// readiness API expects.
pub(crate) fn splice<A: AsFd, B: AsFd>(from: A, to: B, len: usize) -> io::Result<usize> {
    nix::fcntl::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
    )
    .map_err(io::Error::from)
}

/// (connections in the accept queue, queue capacity) of a listening TCP socket: for a
/// listener, `TCP_INFO` reports the queue length in `tcpi_unacked` and the backlog in
/// `tcpi_sacked` (what `ss -lnt` shows as Recv-Q / Send-Q).
pub(crate) fn accept_queue<S: AsFd>(l: &S) -> io::Result<(u32, u32)> {
    let info = tcp_info(l)?;
    Ok((info.tcpi_unacked, info.tcpi_sacked))
}

/// `tcp_info` of a TCP socket.
fn tcp_info<S: AsFd>(s: &S) -> io::Result<libc::tcp_info> {
    // SAFETY: `tcp_info` is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the descriptor is borrowed and open for the call; `info` is writable for `len`
    // bytes and `len` tells the kernel so; it writes at most that much and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            s.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// `TCPI_OPT_TIMESTAMPS` of `linux/tcp.h` (not in the libc crate).
const TCPI_OPT_TIMESTAMPS: u8 = 1;

/// Whether the connection negotiated TCP timestamps (`None`: the kernel would not say). Without
/// them a tuple in TIME_WAIT cannot be connected from again for 60 s (ports.rs).
pub(crate) fn has_timestamps<S: AsFd>(s: &S) -> Option<bool> {
    tcp_info(s)
        .ok()
        .map(|i| i.tcpi_options & TCPI_OPT_TIMESTAMPS != 0)
}

/// True for "out of file descriptors" (per process or system-wide).
pub(crate) fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (each relayed connection holds two sockets;
/// the splice pipes come from a pool). Returns the new soft limit.
pub(crate) fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable `rlimit` that lives across the call; getrlimit only
    // writes into it.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let new = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `new` is a valid `rlimit` read by the kernel during the call only; raising the
        // soft limit up to the hard limit needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim = new;
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_splice_roundtrip_through_socketpair() {
        use std::io::{Read, Write};
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (c, mut d) = std::os::unix::net::UnixStream::pair().unwrap();
        let p = Pipe::new(4096).unwrap();
        assert!(p.cap >= 4096);
        a.write_all(b"hello").unwrap();
        assert_eq!(splice(&b, &p.w, p.cap).unwrap(), 5);
        assert_eq!(splice(&p.r, &c, 5).unwrap(), 5);
        let mut buf = [0u8; 5];
        d.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        // Nothing buffered: EAGAIN surfaces as WouldBlock.
        b.set_nonblocking(true).unwrap();
        let e = splice(&b, &p.w, p.cap).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }
}
