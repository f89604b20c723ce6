//! Plan -> one atomic nf_tables netlink batch in the current netns; read-back for CHECK;
//! delete/exists; a canonical `nft -f` text render for golden tests. No `nft` binary at run time.
//!
//! Every call opens its own NETLINK_NETFILTER socket, so it acts on the netns of the calling
//! thread (callers enter the pod netns on a short-lived thread first, pitfall 7).

mod expr;
mod render;
mod wire;

use crate::plan::{ChainKind, Hook, Table};
use expr::Expr;
use std::io;
use wire::{Msg, Sock};

/// Longest table/chain name the kernel takes (`NFT_NAME_MAXLEN` 256 includes the NUL).
const NAME_MAX: usize = 255;
/// `IFNAMSIZ` 16 includes the NUL.
const IFNAME_MAX: usize = 15;
/// nft's (libnftnl's) comment limit, `NFTNL_UDATA_COMMENT_MAXLEN`.
const COMMENT_MAX: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The plan holds something we refuse to send (the kernel or `nft list` could not take it).
    #[error("invalid {object}: {reason}")]
    Invalid { object: String, reason: String },
    #[error("netlink socket ({op}): {err}")]
    Socket { op: &'static str, err: io::Error },
    /// The kernel refused a message; `object` names what that message created or deleted.
    #[error("kernel refused {object}: {}{}{}", io::Error::from_raw_os_error(*.errno), .detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default(), if *.more > 0 { format!(" [+{} follow-on errors]", .more) } else { String::new() })]
    Kernel {
        object: String,
        errno: i32,
        detail: Option<String>,
        more: usize,
    },
    #[error("unexpected netlink reply: {0}")]
    Protocol(String),
}

fn sock_err(op: &'static str) -> impl FnOnce(io::Error) -> NftError {
    move |err| NftError::Socket { op, err }
}

fn invalid(object: impl Into<String>, reason: impl Into<String>) -> NftError {
    NftError::Invalid {
        object: object.into(),
        reason: reason.into(),
    }
}

/// Names must fit the kernel and be plain `nft` identifiers, so `render()` stays loadable.
fn check_name(what: &str, name: &str) -> Result<(), NftError> {
    let obj = || format!("{what} name {name:?}");
    if name.is_empty() {
        return Err(invalid(obj(), "empty"));
    }
    if name.len() > NAME_MAX {
        return Err(invalid(
            obj(),
            format!("{} bytes, at most {NAME_MAX}", name.len()),
        ));
    }
    let ok_first = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !ok_first
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(invalid(
            obj(),
            "use letters, digits, '_', '-', '.', starting with a letter or '_'",
        ));
    }
    Ok(())
}

fn check_table(t: &Table) -> Result<(), NftError> {
    check_name("table", &t.name)?;
    for c in &t.chains {
        check_name("chain", &c.name)?;
        for (i, r) in c.rules.iter().enumerate() {
            let obj = || format!("chain {} rule {}", c.name, i + 1);
            if r.comment.len() > COMMENT_MAX {
                return Err(invalid(
                    obj(),
                    format!(
                        "comment is {} bytes, at most {COMMENT_MAX}",
                        r.comment.len()
                    ),
                ));
            }
            if r.comment.chars().any(|ch| ch == '"' || ch.is_control()) {
                return Err(invalid(obj(), "comment holds '\"' or a control character"));
            }
            for m in &r.matches {
                if let crate::plan::Match::IifName(n) | crate::plan::Match::OifName(n) = m {
                    if n.is_empty() || n.len() > IFNAME_MAX {
                        return Err(invalid(
                            obj(),
                            format!("interface name {n:?} must be 1-{IFNAME_MAX} bytes"),
                        ));
                    }
                    // `*` would be a wildcard in nft text and `"`/`\` break quoting: the
                    // rendered rule would no longer be the rule we programmed.
                    if n.chars()
                        .any(|ch| matches!(ch, '"' | '*' | '\\' | '/') || ch.is_control())
                    {
                        return Err(invalid(
                            obj(),
                            format!("interface name {n:?} has a character nft cannot quote"),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

fn hooknum(h: Hook) -> u32 {
    match h {
        Hook::Prerouting => wire::NF_INET_PRE_ROUTING,
        Hook::Input => wire::NF_INET_LOCAL_IN,
        Hook::Output => wire::NF_INET_LOCAL_OUT,
        Hook::Postrouting => wire::NF_INET_POST_ROUTING,
    }
}

fn kind_name(k: ChainKind) -> &'static str {
    match k {
        ChainKind::Filter => "filter",
        ChainKind::Route => "route",
        ChainKind::Nat => "nat",
    }
}

/// libnftnl's rule userdata: TLV { type COMMENT, len incl. NUL, bytes, NUL }.
fn comment_udata(c: &str) -> Vec<u8> {
    let mut v = vec![wire::NFTNL_UDATA_RULE_COMMENT, (c.len() + 1) as u8];
    v.extend_from_slice(c.as_bytes());
    v.push(0);
    v
}

fn parse_comment(ud: &[u8]) -> String {
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
struct Batch {
    buf: Vec<u8>,
    objects: Vec<(u32, String)>,
    acked: usize,
    seq: u32,
}

impl Batch {
    fn new() -> Batch {
        let mut b = Batch {
            buf: Vec::new(),
            objects: Vec::new(),
            acked: 0,
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
    fn next_seq(&mut self) -> u32 {
        let s = self.seq;
        self.seq += 1;
        s
    }
    fn add(&mut self, kind: u16, flags: u16, object: String, fill: impl FnOnce(&mut Msg)) {
        let seq = self.next_seq();
        let mut m = Msg::nft(kind, flags | wire::NLM_F_ACK, seq, wire::NFPROTO_INET);
        fill(&mut m);
        self.buf.extend(m.finish());
        self.objects.push((seq, object));
        self.acked += 1;
    }
    fn finish(mut self) -> (Vec<u8>, Vec<(u32, String)>, usize) {
        let seq = self.next_seq();
        let end = Msg::new(
            wire::NFNL_MSG_BATCH_END,
            0,
            seq,
            wire::NFPROTO_UNSPEC,
            wire::NFNL_SUBSYS_NFTABLES,
        );
        self.buf.extend(end.finish());
        (self.buf, self.objects, self.acked)
    }
}

fn table_obj(name: &str) -> String {
    format!("table inet {name}")
}

fn build_batch(t: &Table, delete_first: bool) -> Batch {
    let mut b = Batch::new();
    let tn = t.name.clone();
    if delete_first {
        b.add(
            wire::NFT_MSG_DELTABLE,
            0,
            format!("delete {}", table_obj(&tn)),
            |m| {
                m.put_str(wire::NFTA_TABLE_NAME, &tn);
            },
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
                .put_be32(wire::NFTA_TABLE_FLAGS, 0);
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
            // APPEND: without it the kernel inserts each rule at the head (pitfall 5).
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
fn send_batch(s: &Sock, b: Batch) -> Result<(), NftError> {
    let (buf, objects, want) = b.finish();
    let (mut errs, acks) = s.transact(&buf).map_err(sock_err("send batch"))?;
    if errs.is_empty() {
        if acks < want {
            return Err(NftError::Protocol(format!(
                "kernel acknowledged {acks} of {want} messages"
            )));
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

fn open() -> Result<Sock, NftError> {
    Sock::open().map_err(sock_err("open NETLINK_NETFILTER"))
}

fn table_exists(s: &Sock, name: &str) -> Result<bool, NftError> {
    let mut m = Msg::nft(wire::NFT_MSG_GETTABLE, 0, 1, wire::NFPROTO_INET);
    m.put_str(wire::NFTA_TABLE_NAME, name);
    match s
        .request(&m.finish(), false)
        .map_err(sock_err("get table"))?
    {
        Ok(_) => Ok(true),
        Err(e) if e.errno == libc::ENOENT => Ok(false),
        Err(e) => Err(NftError::Kernel {
            object: format!("get {}", table_obj(name)),
            errno: e.errno,
            detail: e.msg,
            more: 0,
        }),
    }
}

/// Creates our inet table with exactly `table`'s content, or atomically replaces it, in one
/// batch. The delete is only in the batch when the table exists (pitfall 6).
pub fn apply(table: &Table) -> Result<(), NftError> {
    check_table(table)?;
    let s = open()?;
    let mut exists = table_exists(&s, &table.name)?;
    // One retry covers a table that appeared or vanished between the look and the batch.
    for attempt in 0..2 {
        match send_batch(&s, build_batch(table, exists)) {
            Err(NftError::Kernel { errno, .. })
                if attempt == 0
                    && ((exists && errno == libc::ENOENT)
                        || (!exists && errno == libc::EEXIST)) =>
            {
                exists = !exists;
            }
            r => return r,
        }
    }
    Err(NftError::Protocol(format!(
        "{} kept changing while we replaced it",
        table_obj(&table.name)
    )))
}

/// Deletes our table (with its chains and rules). `Ok(false)` when it was absent.
pub fn delete(name: &str) -> Result<bool, NftError> {
    check_name("table", name)?;
    let s = open()?;
    let mut b = Batch::new();
    b.add(
        wire::NFT_MSG_DELTABLE,
        0,
        format!("delete {}", table_obj(name)),
        |m| {
            m.put_str(wire::NFTA_TABLE_NAME, name);
        },
    );
    match send_batch(&s, b) {
        Ok(()) => Ok(true),
        Err(NftError::Kernel { errno, .. }) if errno == libc::ENOENT => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn exists(name: &str) -> Result<bool, NftError> {
    check_name("table", name)?;
    table_exists(&open()?, name)
}

/// A chain as the kernel lists it.
struct KChain {
    name: String,
    hook: Option<(u32, i32)>,
    kind: String,
    policy: Option<u32>,
}

struct KRule {
    chain: String,
    handle: u64,
    comment: String,
    exprs: Vec<Expr>,
}

fn dump(s: &Sock, kind: u16, table: &str, attr: u16) -> Result<Vec<wire::Reply>, String> {
    // A dump interrupted by a concurrent ruleset change is retried a few times.
    for _ in 0..3 {
        let mut m = Msg::nft(kind, wire::NLM_F_DUMP, 1, wire::NFPROTO_INET);
        m.put_str(attr, table);
        match s.request(&m.finish(), true) {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => {
                return Err(format!(
                    "cannot list {}: {}",
                    table_obj(table),
                    io::Error::from_raw_os_error(e.errno)
                ))
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(format!("cannot list {}: {e}", table_obj(table))),
        }
    }
    Err(format!(
        "cannot list {}: dump kept being interrupted",
        table_obj(table)
    ))
}

fn read_state(table: &str) -> Result<Option<(Vec<KChain>, Vec<KRule>)>, String> {
    let s = Sock::open().map_err(|e| format!("cannot open NETLINK_NETFILTER socket: {e}"))?;
    match table_exists(&s, table) {
        Ok(false) => return Ok(None),
        Ok(true) => {}
        Err(e) => return Err(e.to_string()),
    }
    let mut chains = Vec::new();
    for r in dump(&s, wire::NFT_MSG_GETCHAIN, table, wire::NFTA_CHAIN_TABLE)? {
        let a = r.payload.get(4..).unwrap_or(&[]);
        if wire::find(a, wire::NFTA_CHAIN_TABLE)
            .map(wire::cstr)
            .as_deref()
            != Some(table)
        {
            continue;
        }
        let hook = wire::find(a, wire::NFTA_CHAIN_HOOK).and_then(|h| {
            let n = wire::find(h, wire::NFTA_HOOK_HOOKNUM).and_then(wire::be32)?;
            let p = wire::find(h, wire::NFTA_HOOK_PRIORITY).and_then(wire::be32)?;
            Some((n, p as i32))
        });
        chains.push(KChain {
            name: wire::find(a, wire::NFTA_CHAIN_NAME)
                .map(wire::cstr)
                .unwrap_or_default(),
            hook,
            kind: wire::find(a, wire::NFTA_CHAIN_TYPE)
                .map(wire::cstr)
                .unwrap_or_default(),
            policy: wire::find(a, wire::NFTA_CHAIN_POLICY).and_then(wire::be32),
        });
    }
    let mut rules = Vec::new();
    for r in dump(&s, wire::NFT_MSG_GETRULE, table, wire::NFTA_RULE_TABLE)? {
        let a = r.payload.get(4..).unwrap_or(&[]);
        if wire::find(a, wire::NFTA_RULE_TABLE)
            .map(wire::cstr)
            .as_deref()
            != Some(table)
        {
            continue;
        }
        rules.push(KRule {
            chain: wire::find(a, wire::NFTA_RULE_CHAIN)
                .map(wire::cstr)
                .unwrap_or_default(),
            handle: wire::find(a, wire::NFTA_RULE_HANDLE)
                .and_then(|h| Some(u64::from_be_bytes(h.get(0..8)?.try_into().ok()?)))
                .unwrap_or(0),
            comment: wire::find(a, wire::NFTA_RULE_USERDATA)
                .map(parse_comment)
                .unwrap_or_default(),
            exprs: wire::find(a, wire::NFTA_RULE_EXPRESSIONS)
                .map(expr::decode_list)
                .unwrap_or_default(),
        });
    }
    Ok(Some((chains, rules)))
}

fn exprs_text(v: &[Expr]) -> String {
    v.iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Compares the kernel's table with the plan. Each string names one missing or different
/// object; rules are numbered from 1 in plan order and matched in order by comment and
/// expressions, so a reordered rule shows up as missing plus extra.
pub fn check(table: &Table) -> Result<(), Vec<String>> {
    if let Err(e) = check_table(table) {
        return Err(vec![e.to_string()]);
    }
    let (kchains, krules) = match read_state(&table.name) {
        Ok(Some(s)) => s,
        Ok(None) => return Err(vec![format!("{} absent", table_obj(&table.name))]),
        Err(e) => return Err(vec![e]),
    };
    let mut problems = Vec::new();
    for c in &table.chains {
        let Some(k) = kchains.iter().find(|k| k.name == c.name) else {
            problems.push(format!("chain {} missing", c.name));
            continue;
        };
        let want_hook = (hooknum(c.hook), c.priority);
        if k.hook != Some(want_hook) {
            problems.push(format!(
                "chain {}: hook/priority {:?} (hooknum, priority), want {:?}",
                c.name, k.hook, want_hook
            ));
        }
        if k.kind != kind_name(c.kind) {
            problems.push(format!(
                "chain {}: type {:?}, want {:?}",
                c.name,
                k.kind,
                kind_name(c.kind)
            ));
        }
        if k.policy != Some(wire::NF_ACCEPT) {
            problems.push(format!(
                "chain {}: policy {:?}, want accept",
                c.name, k.policy
            ));
        }
        let have: Vec<&KRule> = krules.iter().filter(|r| r.chain == c.name).collect();
        let mut pos = 0;
        for (i, r) in c.rules.iter().enumerate() {
            let want = expr::lower_rule(r);
            let found = have[pos..]
                .iter()
                .position(|k| k.comment == r.comment && k.exprs == want);
            match found {
                Some(off) => {
                    for extra in &have[pos..pos + off] {
                        problems.push(format!(
                            "chain {}: extra rule handle {} ({:?}) before rule {}",
                            c.name,
                            extra.handle,
                            extra.comment,
                            i + 1
                        ));
                    }
                    pos += off + 1;
                }
                None => {
                    let same = have[pos..].iter().find(|k| k.comment == r.comment);
                    match same {
                        Some(k) => problems.push(format!(
                            "chain {}: rule {} ({:?}) differs: want {}, kernel has {}",
                            c.name,
                            i + 1,
                            r.comment,
                            exprs_text(&want),
                            exprs_text(&k.exprs)
                        )),
                        None => problems.push(format!(
                            "chain {}: rule {} ({:?}) missing",
                            c.name,
                            i + 1,
                            r.comment
                        )),
                    }
                }
            }
        }
        for extra in &have[pos.min(have.len())..] {
            problems.push(format!(
                "chain {}: extra rule handle {} ({:?}) at the end",
                c.name, extra.handle, extra.comment
            ));
        }
    }
    for k in &kchains {
        if !table.chains.iter().any(|c| c.name == k.name) {
            problems.push(format!("extra chain {}", k.name));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Canonical `nft -f` text of the table, laid out like `nft list table inet NAME`.
pub fn render(table: &Table) -> String {
    render::render(table)
}
