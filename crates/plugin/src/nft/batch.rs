//! Plan -> one atomic nf_tables batch: the messages, and sending it (errors name the object
//! the kernel refused).

use std::io;

use super::wire::{self, Msg, Sock};
use super::{expr, owner, owner_comment, sock_err, NftError};
use crate::plan::{ChainKind, Hook, Table};

pub(super) fn hooknum(h: Hook) -> u32 {
    match h {
        Hook::Prerouting => wire::NF_INET_PRE_ROUTING,
        Hook::Input => wire::NF_INET_LOCAL_IN,
        Hook::Output => wire::NF_INET_LOCAL_OUT,
        Hook::Postrouting => wire::NF_INET_POST_ROUTING,
    }
}

pub(super) fn kind_name(k: ChainKind) -> &'static str {
    match k {
        ChainKind::Filter => "filter",
        ChainKind::Route => "route",
        ChainKind::Nat => "nat",
    }
}

/// libnftnl's rule userdata: TLV { type COMMENT, len incl. NUL, bytes, NUL }.
pub(super) fn comment_udata(c: &str) -> Vec<u8> {
    let mut v = vec![wire::NFTNL_UDATA_RULE_COMMENT, (c.len() + 1) as u8];
    v.extend_from_slice(c.as_bytes());
    v.push(0);
    v
}

pub(super) fn parse_comment(ud: &[u8]) -> String {
    let mut i = 0;
    while i + 2 <= ud.len() {
        let (t, l) = (ud[i], ud[i + 1] as usize);
        if let Some(v) = ud.get(i + 2..i + 2 + l) {
            if t == wire::NFTNL_UDATA_RULE_COMMENT {
                return wire::cstr(v);
            }
        }
        i += 2 + l;
    }
    String::new()
}

/// The batch messages and, for each seq, which object it creates/deletes (for errors).
///
/// Only the last object message asks for an ACK: the kernel reports every failing message
/// anyway, and one ACK per message overflows the socket's receive buffer past ~256 messages
/// after the batch is already committed (docs/ARCHITECTURE.md, pitfall 14).
pub(super) struct Batch {
    pub(super) buf: Vec<u8>,
    pub(super) objects: Vec<(u32, String)>,
    /// Offset of the flags field of the last object message, patched with NLM_F_ACK.
    pub(super) last_flags: Option<usize>,
    pub(super) seq: u32,
}

impl Batch {
    pub(super) fn new() -> Batch {
        let mut b = Batch {
            buf: Vec::new(),
            objects: Vec::new(),
            last_flags: None,
            seq: 1,
        };
        let begin = Msg::new(
            wire::NFNL_MSG_BATCH_BEGIN,
            0,
            b.next_seq(),
            wire::NFPROTO_UNSPEC,
            wire::NFNL_SUBSYS_NFTABLES,
        );
        b.buf.extend(begin.finish());
        b
    }
    pub(super) fn next_seq(&mut self) -> u32 {
        let s = self.seq;
        self.seq += 1;
        s
    }
    pub(super) fn add(
        &mut self,
        kind: u16,
        flags: u16,
        object: String,
        fill: impl FnOnce(&mut Msg),
    ) {
        let seq = self.next_seq();
        let mut m = Msg::nft(kind, flags, seq, wire::NFPROTO_INET);
        fill(&mut m);
        // nlmsghdr: len (4), type (2), flags (2).
        self.last_flags = Some(self.buf.len() + 6);
        self.buf.extend(m.finish());
        self.objects.push((seq, object));
    }
    pub(super) fn finish(mut self) -> (Vec<u8>, Vec<(u32, String)>, usize) {
        let mut acked = 0;
        if let Some(off) = self.last_flags {
            let f = u16::from_ne_bytes([self.buf[off], self.buf[off + 1]]) | wire::NLM_F_ACK;
            self.buf[off..off + 2].copy_from_slice(&f.to_ne_bytes());
            acked = 1;
        }
        let seq = self.next_seq();
        let end = Msg::new(
            wire::NFNL_MSG_BATCH_END,
            0,
            seq,
            wire::NFPROTO_UNSPEC,
            wire::NFNL_SUBSYS_NFTABLES,
        );
        self.buf.extend(end.finish());
        (self.buf, self.objects, acked)
    }
}

pub(super) fn table_obj(name: &str) -> String {
    format!("table inet {name}")
}

/// The batch that creates `t`; with `replace`, it first deletes the existing table of ours
/// (by its handle when known: `Some(handle)`).
pub(super) fn build_batch(t: &Table, replace: Option<Option<u64>>) -> Batch {
    let mut b = Batch::new();
    let tn = t.name.clone();
    if let Some(handle) = replace {
        b.add(
            wire::NFT_MSG_DELTABLE,
            0,
            format!("delete {}", table_obj(&tn)),
            |m| owner::put_table_ref(m, &tn, handle),
        );
    }
    // EXCL: if the table appeared since we looked, fail (and retry with a delete) rather than
    // append a second copy of every rule to it.
    b.add(
        wire::NFT_MSG_NEWTABLE,
        wire::NLM_F_CREATE | wire::NLM_F_EXCL,
        format!("add {}", table_obj(&tn)),
        |m| {
            m.put_str(wire::NFTA_TABLE_NAME, &tn)
                .put_be32(wire::NFTA_TABLE_FLAGS, 0)
                .put(wire::NFTA_TABLE_USERDATA, &comment_udata(&owner_comment()));
        },
    );
    for c in &t.chains {
        b.add(
            wire::NFT_MSG_NEWCHAIN,
            wire::NLM_F_CREATE,
            format!("add chain {} to {}", c.name, table_obj(&tn)),
            |m| {
                m.put_str(wire::NFTA_CHAIN_TABLE, &tn)
                    .put_str(wire::NFTA_CHAIN_NAME, &c.name)
                    .put_str(wire::NFTA_CHAIN_TYPE, kind_name(c.kind))
                    .put_be32(wire::NFTA_CHAIN_POLICY, wire::NF_ACCEPT)
                    .begin(wire::NFTA_CHAIN_HOOK)
                    .put_be32(wire::NFTA_HOOK_HOOKNUM, hooknum(c.hook))
                    .put_be32(wire::NFTA_HOOK_PRIORITY, c.priority as u32)
                    .end();
            },
        );
    }
    for c in &t.chains {
        for (i, r) in c.rules.iter().enumerate() {
            let obj = format!(
                "add rule {} ({:?}) to chain {} of {}",
                i + 1,
                r.comment,
                c.name,
                table_obj(&tn)
            );
            // APPEND: without it the kernel inserts each rule at the head (docs/ARCHITECTURE.md,
            // pitfall 5).
            b.add(
                wire::NFT_MSG_NEWRULE,
                wire::NLM_F_CREATE | wire::NLM_F_APPEND,
                obj,
                |m| {
                    m.put_str(wire::NFTA_RULE_TABLE, &tn)
                        .put_str(wire::NFTA_RULE_CHAIN, &c.name)
                        .begin(wire::NFTA_RULE_EXPRESSIONS);
                    for e in expr::lower_rule(r) {
                        let mut elem = Vec::new();
                        wire::put_nested(&mut elem, wire::NFTA_LIST_ELEM, &e.encode());
                        m.raw(&elem);
                    }
                    m.end();
                    if !r.comment.is_empty() {
                        m.put(wire::NFTA_RULE_USERDATA, &comment_udata(&r.comment));
                    }
                },
            );
        }
    }
    b
}

/// Sends a batch; `Ok(())` only when every message was acknowledged and none failed.
pub(super) fn send_batch(s: &Sock, b: Batch) -> Result<(), NftError> {
    let (buf, objects, want) = b.finish();
    s.size_for(buf.len());
    s.send(&buf).map_err(sock_err("send batch"))?;
    #[cfg(test)]
    if super::tests::LOSE_REPLIES.with(|f| f.replace(false)) {
        // Stands in for an ENOBUFS on the replies of a batch the kernel has committed.
        return Err(NftError::Uncertain(io::Error::from_raw_os_error(
            libc::ENOBUFS,
        )));
    }
    let (mut errs, acks) = s.drain().map_err(NftError::Uncertain)?;
    if errs.is_empty() {
        if acks < want {
            return Err(NftError::Uncertain(io::Error::other(format!(
                "kernel acknowledged {acks} of {want} messages"
            ))));
        }
        return Ok(());
    }
    errs.sort_by_key(|e| e.seq);
    let first = &errs[0];
    let object = objects
        .iter()
        .find(|(s, _)| *s == first.seq)
        .map(|(_, o)| o.clone())
        .unwrap_or_else(|| "the batch".to_string());
    Err(NftError::Kernel {
        object,
        errno: first.errno,
        detail: first.msg.clone(),
        more: errs.len() - 1,
    })
}

pub(super) fn open() -> Result<Sock, NftError> {
    Sock::open().map_err(sock_err("open NETLINK_NETFILTER"))
}
