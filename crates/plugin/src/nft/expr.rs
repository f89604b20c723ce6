//! Register-level nf_tables expressions: lowering of plan matches/actions (the same sequences
//! `nft --debug=netlink` prints for the equivalent rule text), their netlink encoding, and the
//! decoding of what the kernel lists back, so CHECK compares like with like.

use super::wire::{self, attrs, be32, find, put_attr, put_nested};
use crate::plan::{Action, MarkBits, Match};
use std::fmt;
use tproxy_cni_policy::{Cidr, Family, PortRange};

/// `NFT_REG_1`: nft addresses 32-bit registers through the 128-bit names when aligned, and the
/// kernel dumps them the same way, so everything we emit uses register 1.
const REG1: u32 = 1;
const REG_VERDICT: u32 = 0;

pub(crate) const META_MARK: u32 = 3;
pub(crate) const META_IIFNAME: u32 = 6;
pub(crate) const META_OIFNAME: u32 = 7;
pub(crate) const META_SKUID: u32 = 10;
pub(crate) const META_SKGID: u32 = 11;
pub(crate) const META_NFPROTO: u32 = 15;
pub(crate) const META_L4PROTO: u32 = 16;
pub(crate) const CT_STATE: u32 = 0;
pub(crate) const CT_DIRECTION: u32 = 1;
pub(crate) const CT_MARK: u32 = 3;
const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;
const CMP_LTE: u32 = 3;
const CMP_GTE: u32 = 5;
const PAYLOAD_NETWORK: u32 = 1;
const PAYLOAD_TRANSPORT: u32 = 2;
const NFT_REJECT_TCP_RST: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
const NFT_RETURN: i32 = -5;
/// `NF_CT_STATE_BIT(IP_CT_NEW)`, as nft's `ct state new` loads it.
const CT_STATE_NEW_BIT: u32 = 8;
const IP_CT_DIR_REPLY: u8 = 1;
const IPPROTO_TCP: u8 = 6;

// Expression attributes (linux/netfilter/nf_tables.h, `enum nft_*_attributes`).
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFTA_META_SREG: u16 = 3;
const NFTA_CT_DREG: u16 = 1;
const NFTA_CT_KEY: u16 = 2;
const NFTA_CT_DIRECTION: u16 = 3;
const NFTA_CT_SREG: u16 = 4;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFTA_PAYLOAD_SREG: u16 = 5;
const NFTA_BITWISE_SREG: u16 = 1;
const NFTA_BITWISE_DREG: u16 = 2;
const NFTA_BITWISE_LEN: u16 = 3;
const NFTA_BITWISE_MASK: u16 = 4;
const NFTA_BITWISE_XOR: u16 = 5;
const NFTA_BITWISE_OP: u16 = 6;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
/// A verdict naming a chain is a jump or goto: never one of ours.
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_TPROXY_FAMILY: u16 = 1;
const NFTA_TPROXY_REG_ADDR: u16 = 2;
const NFTA_TPROXY_REG_PORT: u16 = 3;
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_REG_PROTO_MAX: u16 = 2;
const NFTA_REDIR_FLAGS: u16 = 3;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NFTA_REJECT_TYPE: u16 = 1;
const NFTA_REJECT_ICMP_CODE: u16 = 2;

/// One expression. `Other` stands for anything we never emit (seen only when reading back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expr {
    MetaLoad {
        key: u32,
        dreg: u32,
    },
    MetaSet {
        key: u32,
        sreg: u32,
    },
    CtLoad {
        key: u32,
        dreg: u32,
    },
    CtSet {
        key: u32,
        sreg: u32,
    },
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    Bitwise {
        sreg: u32,
        dreg: u32,
        len: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    Cmp {
        sreg: u32,
        op: u32,
        data: Vec<u8>,
    },
    Immediate {
        dreg: u32,
        data: Vec<u8>,
    },
    Verdict {
        code: i32,
    },
    Tproxy {
        family: u32,
        reg_addr: Option<u32>,
        reg_port: Option<u32>,
    },
    Redir {
        reg_min: Option<u32>,
        flags: u32,
    },
    Reject {
        kind: u32,
        code: u8,
    },
    /// A `counter` statement; its values are read back, never compared (see [`Counts`]).
    Counter(Counts),
    Other {
        name: String,
    },
}

/// What a `counter` has seen. Any two compare equal: counters are state, not configuration,
/// so a rule with a counter matches its plan whatever traffic it counted.
#[derive(Debug, Clone, Copy, Default, Eq)]
pub(crate) struct Counts {
    pub packets: u64,
    pub bytes: u64,
}

impl PartialEq for Counts {
    fn eq(&self, _: &Counts) -> bool {
        true
    }
}

fn cmp_eq(data: Vec<u8>) -> Expr {
    Expr::Cmp {
        sreg: REG1,
        op: CMP_EQ,
        data,
    }
}
fn meta(key: u32) -> Expr {
    Expr::MetaLoad { key, dreg: REG1 }
}
fn ct(key: u32) -> Expr {
    Expr::CtLoad { key, dreg: REG1 }
}
fn imm(data: Vec<u8>) -> Expr {
    Expr::Immediate { dreg: REG1, data }
}

/// Interface names compare as the full IFNAMSIZ (16) zero-padded buffer: an exact match, as nft
/// does for a name without a trailing `*`. The caller has validated the length (<= 15).
pub(crate) fn ifname_bytes(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.resize(16, 0);
    v
}

/// The payload load + optional mask + compare nft emits for `ip[6] saddr|daddr CIDR`:
/// a byte-aligned prefix loads only the prefix bytes (no mask); any other prefix (including /0)
/// loads the whole address, masks it, and compares the whole address.
fn addr_match(c: &Cidr, src: bool) -> Vec<Expr> {
    let (full, offset) = match (c.family(), src) {
        (Family::V4, true) => (4u32, 12u32),
        (Family::V4, false) => (4, 16),
        (Family::V6, true) => (16, 8),
        (Family::V6, false) => (16, 24),
    };
    let prefix = u32::from(c.prefix());
    let addr = c.addr_bytes();
    if prefix % 8 == 0 && prefix > 0 {
        let n = prefix / 8;
        vec![
            Expr::Payload {
                base: PAYLOAD_NETWORK,
                offset,
                len: n,
                dreg: REG1,
            },
            cmp_eq(addr.get(..n as usize).unwrap_or(&addr).to_vec()),
        ]
    } else {
        vec![
            Expr::Payload {
                base: PAYLOAD_NETWORK,
                offset,
                len: full,
                dreg: REG1,
            },
            Expr::Bitwise {
                sreg: REG1,
                dreg: REG1,
                len: full,
                mask: c.mask_bytes(),
                xor: vec![0; full as usize],
            },
            cmp_eq(addr),
        ]
    }
}

fn nfproto(f: Family) -> u8 {
    match f {
        Family::V4 => wire::NFPROTO_IPV4,
        Family::V6 => wire::NFPROTO_IPV6,
    }
}

fn dport(r: &PortRange) -> Vec<Expr> {
    let mut v = vec![Expr::Payload {
        base: PAYLOAD_TRANSPORT,
        offset: 2,
        len: 2,
        dreg: REG1,
    }];
    if r.lo == r.hi {
        v.push(cmp_eq(r.lo.to_be_bytes().to_vec()));
    } else {
        // nft 1.0.x emits `cmp gte` + `cmp lte` for an `==` range (the `range` expression only
        // for `!=`); we follow the oracle so both listings are identical.
        v.push(Expr::Cmp {
            sreg: REG1,
            op: CMP_GTE,
            data: r.lo.to_be_bytes().to_vec(),
        });
        v.push(Expr::Cmp {
            sreg: REG1,
            op: CMP_LTE,
            data: r.hi.to_be_bytes().to_vec(),
        });
    }
    v
}

/// `mark & MASK == VALUE` as nft lowers it: load, mask (skipped when all ones), compare.
/// Marks are host order.
fn mark_match(load: Expr, b: &MarkBits) -> Vec<Expr> {
    let mut v = vec![load];
    if b.mask != u32::MAX {
        v.push(Expr::Bitwise {
            sreg: REG1,
            dreg: REG1,
            len: 4,
            mask: b.mask.to_ne_bytes().to_vec(),
            xor: vec![0; 4],
        });
    }
    v.push(cmp_eq((b.value & b.mask).to_ne_bytes().to_vec()));
    v
}

/// `mark set mark & ~MASK | VALUE` as nft lowers it (`( reg & ~MASK ) ^ VALUE`, the same for
/// VALUE within MASK); an all-ones mask is a plain immediate.
fn mark_set(load: Expr, b: &MarkBits, set: Expr) -> Vec<Expr> {
    if b.mask == u32::MAX {
        return vec![imm(b.value.to_ne_bytes().to_vec()), set];
    }
    vec![
        load,
        Expr::Bitwise {
            sreg: REG1,
            dreg: REG1,
            len: 4,
            mask: (!b.mask).to_ne_bytes().to_vec(),
            xor: (b.value & b.mask).to_ne_bytes().to_vec(),
        },
        set,
    ]
}

/// Lowers one match. Marks and ids compare in host order, ports and addresses in network order.
pub(crate) fn lower_match(m: &Match) -> Vec<Expr> {
    match m {
        Match::IifName(n) => vec![meta(META_IIFNAME), cmp_eq(ifname_bytes(n))],
        Match::OifName(n) => vec![meta(META_OIFNAME), cmp_eq(ifname_bytes(n))],
        Match::Nfproto(f) => vec![meta(META_NFPROTO), cmp_eq(vec![nfproto(*f)])],
        Match::L4ProtoTcp => vec![meta(META_L4PROTO), cmp_eq(vec![IPPROTO_TCP])],
        Match::TcpDport(r) => dport(r),
        Match::Saddr(c) => addr_match(c, true),
        Match::Daddr(c) => addr_match(c, false),
        Match::CtDirectionReply => vec![ct(CT_DIRECTION), cmp_eq(vec![IP_CT_DIR_REPLY])],
        Match::CtStateNew => vec![
            ct(CT_STATE),
            Expr::Bitwise {
                sreg: REG1,
                dreg: REG1,
                len: 4,
                mask: CT_STATE_NEW_BIT.to_ne_bytes().to_vec(),
                xor: vec![0; 4],
            },
            Expr::Cmp {
                sreg: REG1,
                op: CMP_NEQ,
                data: vec![0; 4],
            },
        ],
        Match::CtMark(b) => mark_match(ct(CT_MARK), b),
        Match::Mark(b) => mark_match(meta(META_MARK), b),
        Match::SkUid(v) => vec![meta(META_SKUID), cmp_eq(v.to_ne_bytes().to_vec())],
        Match::SkGid(v) => vec![meta(META_SKGID), cmp_eq(v.to_ne_bytes().to_vec())],
    }
}

pub(crate) fn lower_action(a: &Action) -> Vec<Expr> {
    match a {
        Action::SetMark(b) => mark_set(
            meta(META_MARK),
            b,
            Expr::MetaSet {
                key: META_MARK,
                sreg: REG1,
            },
        ),
        Action::SetCtMark(b) => mark_set(
            ct(CT_MARK),
            b,
            Expr::CtSet {
                key: CT_MARK,
                sreg: REG1,
            },
        ),
        // Family unspecified: in an inet table the statement follows the packet's family.
        Action::Tproxy { port } => vec![
            imm(port.to_be_bytes().to_vec()),
            Expr::Tproxy {
                family: u32::from(wire::NFPROTO_UNSPEC),
                reg_addr: None,
                reg_port: Some(REG1),
            },
        ],
        Action::Redirect { port } => vec![
            imm(port.to_be_bytes().to_vec()),
            Expr::Redir {
                reg_min: Some(REG1),
                flags: NF_NAT_RANGE_PROTO_SPECIFIED,
            },
        ],
        Action::RejectTcpReset => vec![Expr::Reject {
            kind: NFT_REJECT_TCP_RST,
            code: 0,
        }],
        Action::Accept => vec![Expr::Verdict {
            code: wire::NF_ACCEPT as i32,
        }],
        Action::Return => vec![Expr::Verdict { code: NFT_RETURN }],
        Action::Counter => vec![Expr::Counter(Counts::default())],
    }
}

pub(crate) fn lower_rule(r: &crate::plan::Rule) -> Vec<Expr> {
    let mut v: Vec<Expr> = r.matches.iter().flat_map(lower_match).collect();
    v.extend(r.actions.iter().flat_map(lower_action));
    v
}

fn data_value(v: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    put_attr(&mut b, wire::NFTA_DATA_VALUE, v);
    b
}

impl Expr {
    fn name(&self) -> &str {
        match self {
            Expr::MetaLoad { .. } | Expr::MetaSet { .. } => "meta",
            Expr::CtLoad { .. } | Expr::CtSet { .. } => "ct",
            Expr::Payload { .. } => "payload",
            Expr::Bitwise { .. } => "bitwise",
            Expr::Cmp { .. } => "cmp",
            Expr::Immediate { .. } | Expr::Verdict { .. } => "immediate",
            Expr::Tproxy { .. } => "tproxy",
            Expr::Redir { .. } => "redir",
            Expr::Reject { .. } => "reject",
            Expr::Counter(_) => "counter",
            Expr::Other { name } => name,
        }
    }

    /// The content of one NFTA_LIST_ELEM: NFTA_EXPR_NAME + nested NFTA_EXPR_DATA, with the
    /// attributes in the order libnftnl sends them (so bytes equal `nft --debug=mnl`).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut d = Vec::new();
        let be = |d: &mut Vec<u8>, t: u16, v: u32| put_attr(d, t, &v.to_be_bytes());
        match self {
            Expr::MetaLoad { key, dreg } => {
                be(&mut d, NFTA_META_KEY, *key);
                be(&mut d, NFTA_META_DREG, *dreg);
            }
            Expr::MetaSet { key, sreg } => {
                be(&mut d, NFTA_META_KEY, *key);
                be(&mut d, NFTA_META_SREG, *sreg);
            }
            Expr::CtLoad { key, dreg } => {
                be(&mut d, NFTA_CT_KEY, *key);
                be(&mut d, NFTA_CT_DREG, *dreg);
            }
            Expr::CtSet { key, sreg } => {
                be(&mut d, NFTA_CT_KEY, *key);
                be(&mut d, NFTA_CT_SREG, *sreg);
            }
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                be(&mut d, NFTA_PAYLOAD_DREG, *dreg);
                be(&mut d, NFTA_PAYLOAD_BASE, *base);
                be(&mut d, NFTA_PAYLOAD_OFFSET, *offset);
                be(&mut d, NFTA_PAYLOAD_LEN, *len);
            }
            Expr::Bitwise {
                sreg,
                dreg,
                len,
                mask,
                xor,
            } => {
                be(&mut d, NFTA_BITWISE_SREG, *sreg);
                be(&mut d, NFTA_BITWISE_DREG, *dreg);
                be(&mut d, NFTA_BITWISE_LEN, *len);
                put_nested(&mut d, NFTA_BITWISE_MASK, &data_value(mask));
                put_nested(&mut d, NFTA_BITWISE_XOR, &data_value(xor));
            }
            Expr::Cmp { sreg, op, data } => {
                be(&mut d, NFTA_CMP_SREG, *sreg);
                be(&mut d, NFTA_CMP_OP, *op);
                put_nested(&mut d, NFTA_CMP_DATA, &data_value(data));
            }
            Expr::Immediate { dreg, data } => {
                be(&mut d, NFTA_IMMEDIATE_DREG, *dreg);
                put_nested(&mut d, NFTA_IMMEDIATE_DATA, &data_value(data));
            }
            Expr::Verdict { code } => {
                be(&mut d, NFTA_IMMEDIATE_DREG, REG_VERDICT);
                let mut v = Vec::new();
                put_attr(&mut v, wire::NFTA_VERDICT_CODE, &code.to_be_bytes());
                let mut dv = Vec::new();
                put_nested(&mut dv, wire::NFTA_DATA_VERDICT, &v);
                put_nested(&mut d, NFTA_IMMEDIATE_DATA, &dv);
            }
            Expr::Tproxy {
                family,
                reg_addr,
                reg_port,
            } => {
                be(&mut d, NFTA_TPROXY_FAMILY, *family);
                if let Some(r) = reg_addr {
                    be(&mut d, NFTA_TPROXY_REG_ADDR, *r);
                }
                if let Some(r) = reg_port {
                    be(&mut d, NFTA_TPROXY_REG_PORT, *r);
                }
            }
            Expr::Redir { reg_min, flags } => {
                if let Some(r) = reg_min {
                    be(&mut d, NFTA_REDIR_REG_PROTO_MIN, *r);
                }
                be(&mut d, NFTA_REDIR_FLAGS, *flags);
            }
            Expr::Reject { kind, code } => {
                be(&mut d, NFTA_REJECT_TYPE, *kind);
                put_attr(&mut d, NFTA_REJECT_ICMP_CODE, &[*code]);
            }
            // nft 1.0.x sends a new `counter` with empty data (measured with --debug=mnl); the
            // kernel starts it at zero and dumps NFTA_COUNTER_BYTES and _PACKETS back.
            Expr::Counter(_) | Expr::Other { .. } => {}
        }
        let mut out = Vec::new();
        let mut name = self.name().as_bytes().to_vec();
        name.push(0);
        put_attr(&mut out, wire::NFTA_EXPR_NAME, &name);
        put_nested(&mut out, wire::NFTA_EXPR_DATA, &d);
        out
    }

    /// Decodes one NFTA_LIST_ELEM content as the kernel dumps it. Anything we would not emit
    /// (unknown expression, unexpected attribute values) becomes `Other`, which never equals
    /// an expression we planned, so CHECK reports it.
    pub(crate) fn decode(elem: &[u8]) -> Expr {
        let name = find(elem, wire::NFTA_EXPR_NAME)
            .map(wire::cstr)
            .unwrap_or_default();
        let d = find(elem, wire::NFTA_EXPR_DATA).unwrap_or(&[]);
        let u = |t: u16| find(d, t).and_then(be32);
        let val = |t: u16| {
            find(d, t)
                .and_then(|n| find(n, wire::NFTA_DATA_VALUE))
                .map(<[u8]>::to_vec)
        };
        let other = || Expr::Other { name: name.clone() };
        let e = match name.as_str() {
            // Same numbers for meta and ct keys and dregs; the sreg differs, and ct's 3 is
            // its direction.
            "meta" | "ct" => decode_load_set(&name, d),
            "payload" => match (
                u(NFTA_PAYLOAD_DREG),
                u(NFTA_PAYLOAD_BASE),
                u(NFTA_PAYLOAD_OFFSET),
                u(NFTA_PAYLOAD_LEN),
                u(NFTA_PAYLOAD_SREG),
            ) {
                (Some(dreg), Some(base), Some(offset), Some(len), None) => Some(Expr::Payload {
                    base,
                    offset,
                    len,
                    dreg,
                }),
                _ => None,
            },
            "bitwise" => match (
                u(NFTA_BITWISE_SREG),
                u(NFTA_BITWISE_DREG),
                u(NFTA_BITWISE_LEN),
                u(NFTA_BITWISE_OP).unwrap_or(0),
                val(NFTA_BITWISE_MASK),
                val(NFTA_BITWISE_XOR),
            ) {
                (Some(sreg), Some(dreg), Some(len), 0, Some(mask), Some(xor)) => {
                    Some(Expr::Bitwise {
                        sreg,
                        dreg,
                        len,
                        mask,
                        xor,
                    })
                }
                _ => None,
            },
            "cmp" => match (u(NFTA_CMP_SREG), u(NFTA_CMP_OP), val(NFTA_CMP_DATA)) {
                (Some(sreg), Some(op), Some(data)) => Some(Expr::Cmp { sreg, op, data }),
                _ => None,
            },
            "immediate" => decode_immediate(d),
            "tproxy" => u(NFTA_TPROXY_FAMILY).map(|family| Expr::Tproxy {
                family,
                reg_addr: u(NFTA_TPROXY_REG_ADDR),
                reg_port: u(NFTA_TPROXY_REG_PORT),
            }),
            "redir" => {
                // The kernel fills PROTO_MAX with PROTO_MIN and dumps both; equal means absent.
                let (min, max) = (u(NFTA_REDIR_REG_PROTO_MIN), u(NFTA_REDIR_REG_PROTO_MAX));
                if max.is_some() && max != min {
                    None
                } else {
                    Some(Expr::Redir {
                        reg_min: min,
                        flags: u(NFTA_REDIR_FLAGS).unwrap_or(0),
                    })
                }
            }
            // The kernel dumps the ICMP code only for ICMP reject types; nft sends 0 for RST.
            "reject" => u(NFTA_REJECT_TYPE).map(|kind| Expr::Reject {
                kind,
                code: find(d, NFTA_REJECT_ICMP_CODE)
                    .and_then(|c| c.first().copied())
                    .unwrap_or(0),
            }),
            "counter" => decode_counter(d),
            _ => None,
        };
        e.unwrap_or_else(other)
    }
}

/// One 32-bit attribute of an expression's data.
fn attr32(d: &[u8], t: u16) -> Option<u32> {
    find(d, t).and_then(be32)
}

/// `meta` / `ct` loads and sets. Same numbers for meta and ct keys and dregs; the sreg
/// differs, and ct's 3 is its direction.
fn decode_load_set(name: &str, d: &[u8]) -> Option<Expr> {
    let u = |t: u16| attr32(d, t);
    match (
        u(NFTA_META_KEY),
        u(NFTA_META_DREG),
        u(if name == "ct" {
            NFTA_CT_SREG
        } else {
            NFTA_META_SREG
        }),
    ) {
        (Some(key), Some(dreg), None) if name == "meta" => Some(Expr::MetaLoad { key, dreg }),
        (Some(key), Some(dreg), None) if find(d, NFTA_CT_DIRECTION).is_none() => {
            Some(Expr::CtLoad { key, dreg })
        }
        (Some(key), None, Some(sreg)) if name == "meta" => Some(Expr::MetaSet { key, sreg }),
        (Some(key), None, Some(sreg)) if find(d, NFTA_CT_DIRECTION).is_none() => {
            Some(Expr::CtSet { key, sreg })
        }
        _ => None,
    }
}

/// `immediate`: a verdict (register 0) or a value.
fn decode_immediate(d: &[u8]) -> Option<Expr> {
    let u = |t: u16| attr32(d, t);

    let dreg = u(NFTA_IMMEDIATE_DREG);
    let data = find(d, NFTA_IMMEDIATE_DATA);
    match (dreg, data) {
        (Some(0), Some(data)) => find(data, wire::NFTA_DATA_VERDICT)
            .and_then(|v| {
                if find(v, NFTA_VERDICT_CHAIN).is_some() {
                    return None;
                }
                find(v, wire::NFTA_VERDICT_CODE).and_then(be32)
            })
            .map(|c| Expr::Verdict { code: c as i32 }),
        (Some(dreg), Some(data)) => find(data, wire::NFTA_DATA_VALUE).map(|v| Expr::Immediate {
            dreg,
            data: v.to_vec(),
        }),
        _ => None,
    }
}

/// `counter`: packets and bytes.
fn decode_counter(d: &[u8]) -> Option<Expr> {
    let be64 = |t: u16| {
        find(d, t)
            .and_then(|v| v.get(..8))
            .and_then(|v| v.try_into().ok())
            .map(u64::from_be_bytes)
    };
    match (be64(NFTA_COUNTER_PACKETS), be64(NFTA_COUNTER_BYTES)) {
        (Some(packets), Some(bytes)) => Some(Expr::Counter(Counts { packets, bytes })),
        _ => None,
    }
}

/// Decodes NFTA_RULE_EXPRESSIONS.
pub(crate) fn decode_list(list: &[u8]) -> Vec<Expr> {
    attrs(list)
        .filter(|(t, _)| *t == wire::NFTA_LIST_ELEM)
        .map(|(_, e)| Expr::decode(e))
        .collect()
}

fn hex(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

/// Short register-level text, in the spirit of `nft --debug=netlink`, for CHECK messages.
impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::MetaLoad { key, dreg } => write!(f, "[meta load {key} => reg {dreg}]"),
            Expr::MetaSet { key, sreg } => write!(f, "[meta set {key} with reg {sreg}]"),
            Expr::CtLoad { key, dreg } => write!(f, "[ct load {key} => reg {dreg}]"),
            Expr::CtSet { key, sreg } => write!(f, "[ct set {key} with reg {sreg}]"),
            Expr::Payload {
                base,
                offset,
                len,
                dreg,
            } => {
                write!(
                    f,
                    "[payload load {len}b @ base {base} + {offset} => reg {dreg}]"
                )
            }
            Expr::Bitwise {
                sreg,
                dreg,
                mask,
                xor,
                ..
            } => {
                write!(
                    f,
                    "[bitwise reg {dreg} = (reg {sreg} & {}) ^ {}]",
                    hex(mask),
                    hex(xor)
                )
            }
            Expr::Cmp { sreg, op, data } => write!(f, "[cmp op{op} reg {sreg} {}]", hex(data)),
            Expr::Immediate { dreg, data } => write!(f, "[immediate reg {dreg} {}]", hex(data)),
            Expr::Verdict { code } => write!(f, "[immediate verdict {code}]"),
            Expr::Tproxy {
                family,
                reg_addr,
                reg_port,
            } => {
                write!(
                    f,
                    "[tproxy family {family} addr {reg_addr:?} port {reg_port:?}]"
                )
            }
            Expr::Redir { reg_min, flags } => {
                write!(f, "[redir proto_min {reg_min:?} flags {flags:#x}]")
            }
            Expr::Reject { kind, code } => write!(f, "[reject type {kind} code {code}]"),
            Expr::Counter(c) => write!(f, "[counter pkts {} bytes {}]", c.packets, c.bytes),
            Expr::Other { name } => write!(f, "[{name} (not one of ours)]"),
        }
    }
}
