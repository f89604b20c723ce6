//! NetConf + PodPolicy + pod IPs -> Plan: pure data describing every kernel object we own in a pod netns.
//!
//! The planner never reads kernel state. `nft.rs` turns `Plan::table` into one nf_tables batch,
//! `routing.rs` turns `Plan::routing` into rtnetlink rules/routes/addresses.

use crate::netaddr::{Cidr, Family, PortRange};

/// Everything tproxy-cni owns in one pod netns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Our `inet` table; `None` when the pod's mode is `none` (nothing to program).
    pub table: Option<Table>,
    pub routing: Routing,
}

/// One nftables table of family `inet`, created and deleted as a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    pub chains: Vec<Chain>,
}

/// A base chain (all of ours are base chains with policy accept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub kind: ChainKind,
    pub hook: Hook,
    /// nftables priority number (mangle = -150, dstnat = -100, raw = -300).
    pub priority: i32,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainKind {
    Filter,
    /// `type route`: re-routes output packets whose mark changed.
    Route,
    Nat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Input,
    Output,
    Postrouting,
}

/// One rule: all matches must hold, then the actions run in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub actions: Vec<Action>,
    /// Short human text stored as the rule's nft comment (`comment "..."`, at most 128 bytes).
    pub comment: String,
}

/// Rule matches. The planner emits the dependencies nft would add implicitly:
/// `L4ProtoTcp` before `TcpDport`, `Nfproto` before `Saddr`/`Daddr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// `meta iifname "NAME"`
    IifName(String),
    /// `meta oifname "NAME"`
    OifName(String),
    /// `meta nfproto ipv4|ipv6`
    Nfproto(Family),
    /// `meta l4proto tcp`
    L4ProtoTcp,
    /// `tcp dport P` or `tcp dport LO-HI`
    TcpDport(PortRange),
    /// `ip saddr CIDR` / `ip6 saddr CIDR` (family from the CIDR)
    Saddr(Cidr),
    /// `ip daddr CIDR` / `ip6 daddr CIDR`
    Daddr(Cidr),
    /// `ct direction reply`
    CtDirectionReply,
    /// `ct state new`
    CtStateNew,
    /// `ct mark M`
    CtMark(u32),
    /// `meta mark M`
    Mark(u32),
    /// `meta skuid UID`
    SkUid(u32),
    /// `meta skgid GID`
    SkGid(u32),
}

/// Rule actions (statements and verdicts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `meta mark set M`
    SetMark(u32),
    /// `ct mark set M`
    SetCtMark(u32),
    /// `meta mark set ct mark`
    MarkFromCtMark,
    /// `tproxy to :PORT` (family-agnostic in an inet table; not a verdict: falls through when no
    /// transparent socket listens, which is why fail-closed adds a reject after it)
    Tproxy {
        port: u16,
    },
    /// `redirect to :PORT` (nat chains only)
    Redirect {
        port: u16,
    },
    /// `reject with tcp reset`
    RejectTcpReset,
    Accept,
    Return,
}

/// Policy routing for the TPROXY return path, plus loopback addresses redirect mode needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    /// `ip [-6] rule add fwmark MARK/MASK lookup TABLE priority PRIO`, one per family.
    pub rules: Vec<FwmarkRule>,
    /// `ip [-6] route add local default dev lo table TABLE`, one per family.
    pub local_routes: Vec<LocalRoute>,
    /// Addresses to add to `lo` (e.g. `::6/128` so redirect mode can dial from `::6`).
    pub lo_addresses: Vec<Cidr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FwmarkRule {
    pub family: Family,
    pub mark: u32,
    pub mask: u32,
    pub table: u32,
    pub priority: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalRoute {
    pub family: Family,
    pub table: u32,
}

impl Plan {
    /// A plan that owns nothing (mode `none`).
    pub fn empty() -> Plan {
        Plan {
            table: None,
            routing: Routing::default(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.table.is_none()
            && self.routing.rules.is_empty()
            && self.routing.local_routes.is_empty()
            && self.routing.lo_addresses.is_empty()
    }
}
