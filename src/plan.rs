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

/// The numbers a plan needs from the conflist entry (defaults in `consts`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanConfig {
    pub table_name: String,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub mark: u32,
    pub route_table: u32,
    pub rule_priority: u32,
}

impl Default for PlanConfig {
    fn default() -> Self {
        use crate::consts::*;
        PlanConfig {
            table_name: TABLE_NAME.to_string(),
            inbound_port: INBOUND_PORT,
            outbound_port: OUTBOUND_PORT,
            mark: MARK,
            route_table: ROUTE_TABLE,
            rule_priority: RULE_PRIORITY,
        }
    }
}

/// nftables' named priorities, as numbers.
pub const PRIO_MANGLE: i32 = -150;
pub const PRIO_DSTNAT: i32 = -100;

fn rule(matches: Vec<Match>, actions: Vec<Action>, comment: &str) -> Rule {
    Rule {
        matches,
        actions,
        comment: comment.to_string(),
    }
}

/// The families the pod has addresses in; with none known, IPv4 (the common single stack).
fn families(pod_ips: &[std::net::IpAddr]) -> Vec<Family> {
    let mut f: Vec<Family> = pod_ips.iter().map(Family::of).collect();
    f.sort();
    f.dedup();
    if f.is_empty() {
        f.push(Family::V4);
    }
    f
}

/// Matches selecting the captured inbound ports: one entry per rule to emit.
fn capture_selectors(policy: &crate::annotations::PodPolicy) -> Vec<Vec<Match>> {
    use crate::annotations::Selector;
    match &policy.inbound_ports {
        Selector::All => vec![vec![Match::L4ProtoTcp]],
        Selector::List(ports) => ports
            .iter()
            .map(|p| vec![Match::L4ProtoTcp, Match::TcpDport(*p)])
            .collect(),
    }
}

/// Builds the plan for one pod. Pure: the same inputs always give the same plan.
pub fn build(
    cfg: &PlanConfig,
    policy: &crate::annotations::PodPolicy,
    pod_ips: &[std::net::IpAddr],
) -> Plan {
    use crate::annotations::{FailMode, Mode};
    let m = cfg.mark;
    let fams = families(pod_ips);
    let mut chains = Vec::new();
    let mut routing = Routing::default();

    let excluded: Vec<Rule> = policy
        .exclude_inbound_ports
        .iter()
        .map(|p| {
            rule(
                vec![Match::L4ProtoTcp, Match::TcpDport(*p)],
                vec![Action::Accept],
                "excluded inbound port",
            )
        })
        .collect();

    match policy.mode {
        Mode::None => return Plan::empty(),
        Mode::Tproxy => {
            let mut rules = vec![
                // Pitfall 2: tag only the proxy->app leg; tagging the client->proxy leg
                // would send the SYN-ACK to lo and black-hole it.
                rule(
                    vec![Match::IifName("lo".into()), Match::Mark(m)],
                    vec![Action::SetCtMark(m)],
                    "proxy to app leg: replies must return to the proxy",
                ),
                rule(
                    vec![Match::IifName("lo".into())],
                    vec![Action::Accept],
                    "loopback is never intercepted",
                ),
                // Pitfall 1: without this, fail-closed would reset the pod's own outbound flows.
                rule(
                    vec![Match::CtDirectionReply],
                    vec![Action::Accept],
                    "replies to the pod's own connections",
                ),
            ];
            rules.extend(excluded);
            let selectors = capture_selectors(policy);
            for sel in &selectors {
                rules.push(rule(
                    sel.clone(),
                    vec![
                        Action::Tproxy {
                            port: cfg.inbound_port,
                        },
                        Action::SetMark(m),
                        Action::Accept,
                    ],
                    "inbound to the sidecar (tproxy)",
                ));
            }
            if policy.fail == FailMode::Closed {
                for sel in &selectors {
                    let mut mm = sel.clone();
                    mm.push(Match::CtStateNew);
                    rules.push(rule(
                        mm,
                        vec![Action::RejectTcpReset],
                        "fail-closed: no sidecar listening",
                    ));
                }
            }
            chains.push(Chain {
                name: "prerouting".into(),
                kind: ChainKind::Filter,
                hook: Hook::Prerouting,
                priority: PRIO_MANGLE,
                rules,
            });
            chains.push(Chain {
                name: "output".into(),
                kind: ChainKind::Route,
                hook: Hook::Output,
                priority: PRIO_MANGLE,
                rules: vec![rule(
                    vec![Match::CtMark(m)],
                    vec![Action::MarkFromCtMark],
                    "app replies on the proxy leg go back to the proxy",
                )],
            });
            for f in &fams {
                routing.rules.push(FwmarkRule {
                    family: *f,
                    mark: m,
                    mask: u32::MAX,
                    table: cfg.route_table,
                    priority: cfg.rule_priority,
                });
                routing.local_routes.push(LocalRoute {
                    family: *f,
                    table: cfg.route_table,
                });
            }
        }
        Mode::Redirect => {
            let mut rules = vec![rule(
                vec![Match::IifName("lo".into())],
                vec![Action::Accept],
                "loopback is never intercepted",
            )];
            rules.extend(excluded);
            for sel in capture_selectors(policy) {
                rules.push(rule(
                    sel,
                    vec![Action::Redirect {
                        port: cfg.inbound_port,
                    }],
                    "inbound to the sidecar (redirect)",
                ));
            }
            chains.push(Chain {
                name: "prerouting_nat".into(),
                kind: ChainKind::Nat,
                hook: Hook::Prerouting,
                priority: PRIO_DSTNAT,
                rules,
            });
            if fams.contains(&Family::V6) {
                // ::6 is not a loopback address in IPv6 as 127.0.0.6 is in IPv4: add it to lo
                // so the sidecar can dial from it and the app's replies come back.
                if let Some(c) = Cidr::new(crate::consts::REDIRECT_SOURCE_V6.into(), 128) {
                    routing.lo_addresses.push(c);
                }
            }
        }
    }

    if policy.outbound.enabled() {
        chains.push(outbound_chain(cfg, policy));
    }

    Plan {
        table: Some(Table {
            name: cfg.table_name.clone(),
            chains,
        }),
        routing,
    }
}

/// NAT output chain sending the pod's egress to the sidecar's outbound port.
fn outbound_chain(cfg: &PlanConfig, policy: &crate::annotations::PodPolicy) -> Chain {
    use crate::annotations::Selector;
    let o = &policy.outbound;
    let mut rules = vec![rule(
        vec![Match::SkUid(policy.proxy_uid)],
        vec![Action::Accept],
        "the proxy's own traffic is never captured",
    )];
    if let Some(g) = policy.proxy_gid {
        rules.push(rule(
            vec![Match::SkGid(g)],
            vec![Action::Accept],
            "the proxy's own traffic is never captured (gid)",
        ));
    }
    rules.push(rule(
        vec![Match::Mark(cfg.mark)],
        vec![Action::Accept],
        "marked proxy sockets are never captured",
    ));
    rules.push(rule(
        vec![Match::OifName("lo".into())],
        vec![Action::Accept],
        "loopback and the pod's own addresses",
    ));
    for c in &o.exclude_cidrs {
        rules.push(rule(
            vec![Match::Nfproto(c.family()), Match::Daddr(*c)],
            vec![Action::Accept],
            "excluded outbound range",
        ));
    }
    for p in &o.exclude_ports {
        rules.push(rule(
            vec![Match::L4ProtoTcp, Match::TcpDport(*p)],
            vec![Action::Accept],
            "excluded outbound port",
        ));
    }
    let redirect = vec![Action::Redirect {
        port: cfg.outbound_port,
    }];
    for p in &o.include_ports {
        rules.push(rule(
            vec![Match::L4ProtoTcp, Match::TcpDport(*p)],
            redirect.clone(),
            "outbound port to the sidecar",
        ));
    }
    match &o.include_cidrs {
        Selector::All => rules.push(rule(
            vec![Match::L4ProtoTcp],
            redirect.clone(),
            "outbound to the sidecar",
        )),
        Selector::List(cidrs) => {
            for c in cidrs {
                rules.push(rule(
                    vec![
                        Match::Nfproto(c.family()),
                        Match::Daddr(*c),
                        Match::L4ProtoTcp,
                    ],
                    redirect.clone(),
                    "outbound range to the sidecar",
                ));
            }
        }
    }
    Chain {
        name: "output_nat".into(),
        kind: ChainKind::Nat,
        hook: Hook::Output,
        priority: PRIO_DSTNAT,
        rules,
    }
}
