//! nf_tables wire format: kernel constants, a tiny netlink attribute encoder/decoder, and the
//! NETLINK_NETFILTER socket that sends one batch and collects every ACK/error.
//!
//! Hand-written rather than `netlink-packet-netfilter`: that crate has no ct, tproxy, reject or
//! redir expressions, and what we need is small (nlmsghdr + nfgenmsg + nested TLVs), so a
//! ~200-line encoder we can test byte for byte against `nft --debug=mnl` is the simpler path.
//! Values come from the kernel's `include/uapi/linux/netfilter/nf_tables.h` / `nfnetlink.h`.

use std::io;

pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
pub(crate) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub(crate) const NFNL_MSG_BATCH_END: u16 = 0x11;

pub(crate) const NFT_MSG_NEWTABLE: u16 = 0;
pub(crate) const NFT_MSG_GETTABLE: u16 = 1;
pub(crate) const NFT_MSG_DELTABLE: u16 = 2;
pub(crate) const NFT_MSG_NEWCHAIN: u16 = 3;
pub(crate) const NFT_MSG_GETCHAIN: u16 = 4;
pub(crate) const NFT_MSG_NEWRULE: u16 = 6;
pub(crate) const NFT_MSG_GETRULE: u16 = 7;
pub(crate) const NFT_MSG_GETSET: u16 = 10;
pub(crate) const NFT_MSG_GETOBJ: u16 = 19;
pub(crate) const NFT_MSG_GETFLOWTABLE: u16 = 23;

pub(crate) const NFPROTO_UNSPEC: u8 = 0;
pub(crate) const NFPROTO_INET: u8 = 1;
pub(crate) const NFPROTO_IPV4: u8 = 2;
pub(crate) const NFPROTO_IPV6: u8 = 10;

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_MULTI: u16 = 0x2;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP_INTR: u16 = 0x10;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_APPEND: u16 = 0x800;
/// Set on an NLMSG_ERROR that carries extended-ACK TLVs after the (capped) request header.
pub(crate) const NLM_F_ACK_TLVS: u16 = 0x200;
pub(crate) const NLM_F_CAPPED: u16 = 0x100;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLMSGERR_ATTR_MSG: u16 = 1;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

pub(crate) const NFTA_TABLE_NAME: u16 = 1;
pub(crate) const NFTA_TABLE_FLAGS: u16 = 2;
pub(crate) const NFTA_TABLE_HANDLE: u16 = 4;
pub(crate) const NFTA_TABLE_USERDATA: u16 = 6;
/// `NFT_TABLE_F_DORMANT`: the table's base chains are unregistered, no rule runs.
pub(crate) const NFT_TABLE_F_DORMANT: u32 = 1;
/// The first attribute of sets, objects and flowtables is their table, the second their name.
pub(crate) const NFTA_SET_TABLE: u16 = 1;
pub(crate) const NFTA_SET_NAME: u16 = 2;
pub(crate) const NFTA_CHAIN_TABLE: u16 = 1;
pub(crate) const NFTA_CHAIN_NAME: u16 = 3;
pub(crate) const NFTA_CHAIN_HOOK: u16 = 4;
pub(crate) const NFTA_CHAIN_POLICY: u16 = 5;
pub(crate) const NFTA_CHAIN_TYPE: u16 = 7;
pub(crate) const NFTA_HOOK_HOOKNUM: u16 = 1;
pub(crate) const NFTA_HOOK_PRIORITY: u16 = 2;
pub(crate) const NFTA_RULE_TABLE: u16 = 1;
pub(crate) const NFTA_RULE_CHAIN: u16 = 2;
pub(crate) const NFTA_RULE_HANDLE: u16 = 3;
pub(crate) const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub(crate) const NFTA_RULE_USERDATA: u16 = 7;
pub(crate) const NFTA_LIST_ELEM: u16 = 1;
pub(crate) const NFTA_EXPR_NAME: u16 = 1;
pub(crate) const NFTA_EXPR_DATA: u16 = 2;
pub(crate) const NFTA_DATA_VALUE: u16 = 1;
pub(crate) const NFTA_DATA_VERDICT: u16 = 2;
pub(crate) const NFTA_VERDICT_CODE: u16 = 1;

pub(crate) const NF_ACCEPT: u32 = 1;
pub(crate) const NF_INET_PRE_ROUTING: u32 = 0;
pub(crate) const NF_INET_LOCAL_IN: u32 = 1;
pub(crate) const NF_INET_LOCAL_OUT: u32 = 3;
pub(crate) const NF_INET_POST_ROUTING: u32 = 4;

/// libnftnl's rule userdata TLV type for the comment (`NFTNL_UDATA_RULE_COMMENT`); the table
/// comment (`NFTNL_UDATA_TABLE_COMMENT`) has the same type and layout.
pub(crate) const NFTNL_UDATA_RULE_COMMENT: u8 = 0;

/// Builds one netlink message: nlmsghdr + nfgenmsg + attributes, with nesting.
pub(crate) struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    /// `kind` is the nf_tables message type (the subsystem is added here), or a batch type.
    pub(crate) fn new(ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.push(family);
        buf.push(0); // NFNETLINK_V0
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg {
            buf,
            nests: Vec::new(),
        }
    }
    pub(crate) fn nft(kind: u16, flags: u16, seq: u32, family: u8) -> Msg {
        Msg::new((NFNL_SUBSYS_NFTABLES << 8) | kind, flags, seq, family, 0)
    }
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
    pub(crate) fn put(&mut self, ty: u16, data: &[u8]) -> &mut Msg {
        put_attr(&mut self.buf, ty, data);
        self
    }
    pub(crate) fn put_str(&mut self, ty: u16, s: &str) -> &mut Msg {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.put(ty, &v)
    }
    pub(crate) fn put_be32(&mut self, ty: u16, v: u32) -> &mut Msg {
        self.put(ty, &v.to_be_bytes())
    }
    pub(crate) fn begin(&mut self, ty: u16) -> &mut Msg {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }
    pub(crate) fn end(&mut self) -> &mut Msg {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }
    /// Appends pre-encoded attribute bytes (already aligned).
    pub(crate) fn raw(&mut self, bytes: &[u8]) -> &mut Msg {
        self.buf.extend_from_slice(bytes);
        self
    }
}

/// Appends one TLV (4-byte aligned) to `buf`.
pub(crate) fn put_attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = (4 + data.len()) as u16;
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
}

/// Appends a nested TLV whose content is `inner` (already a sequence of aligned TLVs).
pub(crate) fn put_nested(buf: &mut Vec<u8>, ty: u16, inner: &[u8]) {
    put_attr(buf, ty | NLA_F_NESTED, inner);
}

/// Iterates the TLVs of `data`; stops silently at a truncated tail (kernel data is trusted
/// to be well formed, but a short read must not panic).
pub fn attrs(data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        let hdr = data.get(off..off + 4)?;
        let len = u16::from_ne_bytes([hdr[0], hdr[1]]) as usize;
        let ty = u16::from_ne_bytes([hdr[2], hdr[3]]) & NLA_TYPE_MASK;
        if len < 4 {
            return None;
        }
        let val = data.get(off + 4..off + len)?;
        off += (len + 3) & !3;
        Some((ty, val))
    })
}

pub(crate) fn find(data: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(data).find(|(t, _)| *t == ty).map(|(_, v)| v)
}

pub(crate) fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(0..4)?.try_into().ok()?))
}

pub(crate) fn be64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.get(0..8)?.try_into().ok()?))
}

pub(crate) fn cstr(v: &[u8]) -> String {
    let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// One netlink message received from the kernel.
pub(crate) struct Reply {
    pub ty: u16,
    pub flags: u16,
    /// Payload after the nlmsghdr.
    pub payload: Vec<u8>,
}

/// A kernel error for one request message.
pub(crate) struct NlErr {
    pub seq: u32,
    pub errno: i32,
    pub msg: Option<String>,
}

pub(crate) fn split_msgs(buf: &[u8], out: &mut Vec<Reply>) {
    let mut off = 0usize;
    while let Some(h) = buf.get(off..off + 16) {
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len < 16 {
            break;
        }
        let Some(body) = buf.get(off + 16..off + len) else {
            break;
        };
        out.push(Reply {
            ty: u16::from_ne_bytes([h[4], h[5]]),
            flags: u16::from_ne_bytes([h[6], h[7]]),
            payload: body.to_vec(),
        });
        off += (len + 3) & !3;
    }
}

/// Decodes an NLMSG_ERROR payload: errno (0 for an ACK), the request's seq, extack text.
pub(crate) fn parse_err(r: &Reply) -> Option<NlErr> {
    let p = &r.payload;
    let err = i32::from_ne_bytes(p.get(0..4)?.try_into().ok()?);
    let orig = p.get(4..20)?;
    let orig_len = u32::from_ne_bytes(orig[0..4].try_into().ok()?) as usize;
    let seq = u32::from_ne_bytes(orig[8..12].try_into().ok()?);
    let mut msg = None;
    if r.flags & NLM_F_ACK_TLVS != 0 {
        let tlv_off = if r.flags & NLM_F_CAPPED != 0 {
            20
        } else {
            4 + ((orig_len + 3) & !3)
        };
        if let Some(tlvs) = p.get(tlv_off..) {
            msg = find(tlvs, NLMSGERR_ATTR_MSG).map(cstr);
        }
    }
    Some(NlErr {
        seq,
        errno: -err,
        msg,
    })
}

/// A NETLINK_NETFILTER socket bound in the caller's current netns.
pub(crate) struct Sock {
    s: netlink_sys::Socket,
}

const RECV_BUF: usize = 256 * 1024;

impl Sock {
    pub(crate) fn open() -> io::Result<Sock> {
        let mut s = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_NETFILTER)?;
        s.bind_auto()?;
        // Errors echo only the request header, so many errors still fit the receive buffer;
        // extended ACKs give the kernel's reason text when it has one.
        let _ = s.set_cap_ack(true);
        let _ = s.set_ext_ack(true);
        // Dumps block for their replies; the kernel answers at once, so a long silence means
        // something is badly wrong and an error beats hanging the CNI call.
        let tv = nix::sys::time::TimeVal::new(5, 0);
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .map_err(io::Error::from)?;
        Ok(Sock { s })
    }

    pub(crate) fn send(&self, buf: &[u8]) -> io::Result<()> {
        let n = self.s.send(buf, 0)?;
        if n != buf.len() {
            return Err(io::Error::other(format!(
                "short netlink send ({n} of {} bytes)",
                buf.len()
            )));
        }
        Ok(())
    }

    /// Reads one datagram; `None` when nothing is queued and `block` is false.
    pub(crate) fn recv(&self, block: bool) -> io::Result<Option<Vec<Reply>>> {
        let mut buf: Vec<u8> = Vec::with_capacity(RECV_BUF);
        let flags = if block { 0 } else { libc::MSG_DONTWAIT };
        match self.s.recv(&mut buf, flags | libc::MSG_TRUNC) {
            Ok(n) => {
                if n > buf.len() {
                    return Err(io::Error::other(format!(
                        "netlink reply of {n} bytes truncated to {}",
                        buf.len()
                    )));
                }
                let mut out = Vec::new();
                split_msgs(&buf, &mut out);
                Ok(Some(out))
            }
            Err(e) if !block && e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes room for a batch of `len` bytes in one sendmsg() (the kernel refuses a message
    /// larger than the send buffer with EMSGSIZE, and a batch must be one message to be
    /// atomic) and for its replies. `*FORCE` needs CAP_NET_ADMIN, which the plugin has; the
    /// plain options are the fallback, capped by `net.core.[rw]mem_max`.
    pub(crate) fn size_for(&self, len: usize) {
        use nix::sys::socket::{setsockopt, sockopt};
        // The kernel doubles the value it is given; room for the batch plus skb overhead.
        let snd = (len + 64 * 1024) / 2;
        if setsockopt(&self.s, sockopt::SndBufForce, &snd).is_err() {
            let _ = setsockopt(&self.s, sockopt::SndBuf, &snd);
        }
        let rcv = RECV_BUF * 2;
        if setsockopt(&self.s, sockopt::RcvBufForce, &rcv).is_err() {
            let _ = setsockopt(&self.s, sockopt::RcvBuf, &rcv);
        }
    }

    /// Collects what the kernel queued for a batch already sent: the errors (errno != 0) and
    /// the number of ACKs (errno == 0). nfnetlink processes a batch synchronously inside
    /// sendmsg(), so every reply is queued when send returns: draining without blocking is
    /// complete (this is what `nft` does).
    pub(crate) fn drain(&self) -> io::Result<(Vec<NlErr>, usize)> {
        let mut errs = Vec::new();
        let mut acks = 0;
        while let Some(msgs) = self.recv(false)? {
            for m in msgs {
                if m.ty == NLMSG_ERROR {
                    if let Some(e) = parse_err(&m) {
                        if e.errno == 0 {
                            acks += 1;
                        } else {
                            errs.push(e);
                        }
                    }
                }
            }
        }
        Ok((errs, acks))
    }

    /// Sends one request and returns its reply messages (a dump until NLMSG_DONE, or the
    /// single answer). An error reply becomes `Err(errno)` in the inner result.
    pub(crate) fn request(&self, req: &[u8], dump: bool) -> io::Result<Result<Vec<Reply>, NlErr>> {
        self.send(req)?;
        let mut out = Vec::new();
        loop {
            let Some(msgs) = self.recv(true)? else {
                continue;
            };
            for m in msgs {
                match m.ty {
                    NLMSG_DONE => return Ok(Ok(out)),
                    NLMSG_ERROR => {
                        if let Some(e) = parse_err(&m) {
                            if e.errno != 0 {
                                return Ok(Err(e));
                            }
                        }
                        if !dump {
                            return Ok(Ok(out));
                        }
                    }
                    _ => {
                        let multi = m.flags & NLM_F_MULTI != 0;
                        if m.flags & NLM_F_DUMP_INTR != 0 {
                            return Err(io::Error::from_raw_os_error(libc::EINTR));
                        }
                        out.push(m);
                        if !dump && !multi {
                            return Ok(Ok(out));
                        }
                    }
                }
            }
        }
    }
}
