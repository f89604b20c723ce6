//! Reading our table back from the kernel: table info, chains and rules (for CHECK and
//! `rule_status`).

use super::batch::{open, parse_comment, table_obj};
use super::expr::{self, Expr};
use super::validate::check_name;
use super::wire::{self, Msg, Sock};
use super::{sock_err, NftError};

/// What the kernel says about a table: its flags, comment and handle.
pub(super) struct KTable {
    pub(super) flags: u32,
    pub(super) comment: String,
    pub(super) handle: Option<u64>,
}

pub(super) fn ktable(payload: &[u8]) -> (String, KTable) {
    let a = payload.get(4..).unwrap_or(&[]);
    (
        wire::find(a, wire::NFTA_TABLE_NAME)
            .map(wire::cstr)
            .unwrap_or_default(),
        KTable {
            flags: wire::find(a, wire::NFTA_TABLE_FLAGS)
                .and_then(wire::be32)
                .unwrap_or(0),
            comment: wire::find(a, wire::NFTA_TABLE_USERDATA)
                .map(parse_comment)
                .unwrap_or_default(),
            handle: wire::find(a, wire::NFTA_TABLE_HANDLE).and_then(wire::be64),
        },
    )
}

pub(super) fn table_info(s: &Sock, name: &str) -> Result<Option<KTable>, NftError> {
    let mut m = Msg::nft(wire::NFT_MSG_GETTABLE, 0, 1, wire::NFPROTO_INET);
    m.put_str(wire::NFTA_TABLE_NAME, name);
    match s
        .request(&m.finish(), false)
        .map_err(sock_err("get table"))?
    {
        Ok(replies) => Ok(Some(
            replies
                .first()
                .map(|r| ktable(&r.payload).1)
                .unwrap_or(KTable {
                    flags: 0,
                    comment: String::new(),
                    handle: None,
                }),
        )),
        Err(e) if e.errno == libc::ENOENT => Ok(None),
        Err(e) => Err(NftError::Kernel {
            object: format!("get {}", table_obj(name)),
            errno: e.errno,
            detail: e.msg,
            more: 0,
        }),
    }
}

/// A chain as the kernel lists it.
pub(super) struct KChain {
    pub(super) name: String,
    pub(super) hook: Option<(u32, i32)>,
    pub(super) kind: String,
    pub(super) policy: Option<u32>,
}

pub(super) struct KRule {
    pub(super) chain: String,
    pub(super) handle: u64,
    pub(super) comment: String,
    pub(super) exprs: Vec<Expr>,
}

pub(super) fn dump(
    s: &Sock,
    kind: u16,
    table: &str,
    attr: u16,
) -> Result<Vec<wire::Reply>, NftError> {
    let object = || format!("list {}", table_obj(table));
    // A dump interrupted by a concurrent ruleset change is retried a few times.
    for _ in 0..3 {
        let mut m = Msg::nft(kind, wire::NLM_F_DUMP, 1, wire::NFPROTO_INET);
        m.put_str(attr, table);
        match s.request(&m.finish(), true) {
            Ok(Ok(v)) => {
                // Keep only this table's objects (older kernels ignore the filter).
                return Ok(v
                    .into_iter()
                    .filter(|r| {
                        wire::find(r.payload.get(4..).unwrap_or(&[]), attr)
                            .map(wire::cstr)
                            .as_deref()
                            == Some(table)
                    })
                    .collect());
            }
            Ok(Err(e)) => {
                return Err(NftError::Kernel {
                    object: object(),
                    errno: e.errno,
                    detail: e.msg,
                    more: 0,
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(err) => return Err(NftError::Socket { op: "dump", err }),
        }
    }
    Err(NftError::Protocol(format!(
        "{}: dump kept being interrupted",
        object()
    )))
}

/// The kernel's view of one table: flags and comment, chains, rules, and the names of
/// objects we never create (sets, stateful objects, flowtables).
pub(super) struct KState {
    pub(super) table: KTable,
    pub(super) chains: Vec<KChain>,
    pub(super) rules: Vec<KRule>,
    pub(super) others: Vec<String>,
}

pub(super) fn read_state(table: &str) -> Result<Option<KState>, NftError> {
    let s = open()?;
    let Some(info) = table_info(&s, table)? else {
        return Ok(None);
    };
    let mut chains = Vec::new();
    for r in dump(&s, wire::NFT_MSG_GETCHAIN, table, wire::NFTA_CHAIN_TABLE)? {
        let a = r.payload.get(4..).unwrap_or(&[]);
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
    let mut others = Vec::new();
    for (kind, what) in [
        (wire::NFT_MSG_GETSET, "set"),
        (wire::NFT_MSG_GETOBJ, "object"),
        (wire::NFT_MSG_GETFLOWTABLE, "flowtable"),
    ] {
        for r in dump(&s, kind, table, wire::NFTA_SET_TABLE)? {
            let a = r.payload.get(4..).unwrap_or(&[]);
            let name = wire::find(a, wire::NFTA_SET_NAME)
                .map(wire::cstr)
                .unwrap_or_default();
            others.push(format!("{what} {name}"));
        }
    }
    Ok(Some(KState {
        table: info,
        chains,
        rules,
        others,
    }))
}

/// One rule of our table as the kernel lists it, with what its `counter` saw (if it has one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleStatus {
    pub chain: String,
    pub handle: u64,
    pub comment: String,
    /// `(packets, bytes)`.
    pub counter: Option<(u64, u64)>,
}

/// Our table's rules in kernel order (chain by chain), for a status display; `None` when the
/// table is absent.
pub fn rule_status(name: &str) -> Result<Option<Vec<RuleStatus>>, NftError> {
    check_name("table", name)?;
    let Some(k) = read_state(name)? else {
        return Ok(None);
    };
    Ok(Some(
        k.rules
            .into_iter()
            .map(|r| RuleStatus {
                counter: r.exprs.iter().find_map(|e| match e {
                    Expr::Counter(c) => Some((c.packets, c.bytes)),
                    _ => None,
                }),
                chain: r.chain,
                handle: r.handle,
                comment: r.comment,
            })
            .collect(),
    ))
}
