//! NetConf + PodPolicy + pod IPs -> Plan: pure data describing every kernel object we own in a pod netns.
//!
//! The planner never reads kernel state. `nft.rs` turns `Plan::table` into one nf_tables batch,
//! `routing.rs` turns `Plan::routing` into rtnetlink rules/routes/addresses.

mod config;

pub(crate) use config::check_table_name;

use tproxy_cni_policy::{Cidr, Family, PortRange};

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
    /// `ct mark & MASK == VALUE` (`ct mark VALUE` when the mask is all ones)
    CtMark(MarkBits),
    /// `meta mark & MASK == VALUE` (`meta mark VALUE` when the mask is all ones)
    Mark(MarkBits),
    /// `meta skuid UID`
    SkUid(u32),
    /// `meta skgid GID`
    SkGid(u32),
}

/// A mark value within a mask: the bits of the mask are ours, the others belong to whoever
/// else marks packets in the pod (docs/ARCHITECTURE.md has the marks others use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkBits {
    pub value: u32,
    pub mask: u32,
}

impl MarkBits {
    /// Exactly `value` in all 32 bits.
    pub fn exact(value: u32) -> MarkBits {
        MarkBits {
            value,
            mask: u32::MAX,
        }
    }
    /// The bits set in `bits`, and only those.
    pub(crate) fn ours(bits: u32) -> MarkBits {
        MarkBits {
            value: bits,
            mask: bits,
        }
    }
}

/// Rule actions (statements and verdicts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `meta mark set meta mark & ~MASK | VALUE`: only our bits change (`meta mark set VALUE`
    /// when the mask is all ones)
    SetMark(MarkBits),
    /// `ct mark set ct mark & ~MASK | VALUE`, likewise
    SetCtMark(MarkBits),
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
    /// `counter`: packets and bytes that reached this point of the rule (state, not
    /// configuration: CHECK ignores the values). Only the host CLI's plans carry it, so a user
    /// sees traffic being intercepted; pod plans stay as lean as before.
    Counter,
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
    pub(crate) fn empty() -> Plan {
        Plan {
            table: None,
            routing: Routing::default(),
        }
    }
    pub(crate) fn is_empty(&self) -> bool {
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
        use tproxy_cni_policy::consts::*;
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
pub(crate) const PRIO_MANGLE: i32 = -150;
pub(crate) const PRIO_DSTNAT: i32 = -100;

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
fn capture_selectors(policy: &tproxy_cni_policy::PodPolicy) -> Vec<Vec<Match>> {
    use tproxy_cni_policy::Selector;
    match &policy.inbound_ports {
        Selector::All => vec![vec![Match::L4ProtoTcp]],
        Selector::List(ports) => ports
            .iter()
            .map(|p| vec![Match::L4ProtoTcp, Match::TcpDport(*p)])
            .collect(),
    }
}

/// Inbound rules letting the node's own connections reach the app directly: a kubelet
/// `tcpSocket` probe must fail when the app is down, and a transparent proxy would complete
/// every handshake itself (docs/ARCHITECTURE.md, pitfall 17). One rule per address of a
/// family the pod has.
fn node_rules(node_ips: &[std::net::IpAddr], fams: &[Family]) -> Vec<Rule> {
    node_ips
        .iter()
        .filter(|ip| fams.contains(&Family::of(ip)))
        .filter_map(|ip| Cidr::new(*ip, Family::of(ip).max_prefix()))
        .map(|c| {
            rule(
                vec![Match::Nfproto(c.family()), Match::Saddr(c)],
                vec![Action::Accept],
                "from the node: probes reach the app directly",
            )
        })
        .collect()
}

/// Builds the plan for one pod. Pure: the same inputs always give the same plan.
/// `node_ips` are the node's own addresses, whose connections are never intercepted.
pub fn build(
    cfg: &PlanConfig,
    policy: &tproxy_cni_policy::PodPolicy,
    pod_ips: &[std::net::IpAddr],
    node_ips: &[std::net::IpAddr],
) -> Plan {
    use tproxy_cni_policy::Mode;
    let fams = families(pod_ips);
    let (mut chains, routing) = match policy.mode {
        Mode::None => return Plan::empty(),
        Mode::Tproxy => (
            tproxy_chains(cfg, policy, &fams, node_ips),
            tproxy_routing(cfg, &fams),
        ),
        Mode::Redirect => (
            vec![redirect_chain(cfg, policy, &fams, node_ips)],
            redirect_routing(&fams),
        ),
    };
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

/// Capture matches for the PROXY-protocol ports that go before the node bypass: a balancer
/// or ingress on the node's own network (hostNetwork, or kube-proxy SNAT to a node address)
/// sends its PROXY header from a node address, and that header must reach the sidecar.
/// The annotation code guarantees these ports are captured and not excluded. With every port
/// a PROXY-protocol port (Istio's `gatewayTopology.proxyProtocol`), the general capture rules
/// do it, and [`node_bypass`] emits nothing.
fn proxy_protocol_selectors(policy: &tproxy_cni_policy::PodPolicy) -> Vec<Vec<Match>> {
    use tproxy_cni_policy::Selector;
    match &policy.north_south.proxy_protocol_ports {
        Selector::All => Vec::new(),
        Selector::List(ports) => ports
            .iter()
            .map(|p| vec![Match::L4ProtoTcp, Match::TcpDport(*p)])
            .collect(),
    }
}

/// The rules that capture the PROXY-protocol ports with the mode's `actions`, placed before
/// the node bypass.
fn proxy_protocol_captures(
    policy: &tproxy_cni_policy::PodPolicy,
    actions: Vec<Action>,
) -> Vec<Rule> {
    proxy_protocol_selectors(policy)
        .into_iter()
        .map(|sel| {
            rule(
                sel,
                actions.clone(),
                "PROXY protocol port: captured from the node too",
            )
        })
        .collect()
}

/// The node-address bypass, unless every inbound port expects PROXY protocol.
fn node_bypass(
    policy: &tproxy_cni_policy::PodPolicy,
    node_ips: &[std::net::IpAddr],
    fams: &[Family],
) -> Vec<Rule> {
    match policy.north_south.proxy_protocol_ports {
        tproxy_cni_policy::Selector::All => Vec::new(),
        tproxy_cni_policy::Selector::List(_) => node_rules(node_ips, fams),
    }
}

/// Inbound rules common to both modes, after the mode's own head rules: the node's addresses
/// and the excluded ports are accepted before any capture.
fn bypass_rules(
    policy: &tproxy_cni_policy::PodPolicy,
    fams: &[Family],
    node_ips: &[std::net::IpAddr],
) -> Vec<Rule> {
    let mut rules = node_bypass(policy, node_ips, fams);
    rules.extend(policy.exclude_inbound_ports.iter().map(|p| {
        rule(
            vec![Match::L4ProtoTcp, Match::TcpDport(*p)],
            vec![Action::Accept],
            "excluded inbound port",
        )
    }));
    rules
}

/// Tproxy mode: the mangle prerouting chain that sends inbound TCP to the sidecar and the
/// route output chain that sends the app's replies on the proxy leg back to it.
fn tproxy_chains(
    cfg: &PlanConfig,
    policy: &tproxy_cni_policy::PodPolicy,
    fams: &[Family],
    node_ips: &[std::net::IpAddr],
) -> Vec<Chain> {
    use tproxy_cni_policy::FailMode;
    // The bits set in the configured mark are ours: we match and set only them, so marks
    // others put on the same packets (Istio, kube-proxy, Calico, Cilium) survive.
    let m = MarkBits::ours(cfg.mark);
    let mut rules = vec![
        // docs/ARCHITECTURE.md, pitfall 2: tag only the proxy->app leg; tagging the
        // client->proxy leg would send the SYN-ACK to lo and black-hole it.
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
        // docs/ARCHITECTURE.md, pitfall 59: a client reusing the tuple of a proxy leg the app
        // reset gets that leg's conntrack entry back, mark and all; without this the
        // sidecar's SYN-ACK would be routed to lo.
        rule(
            vec![Match::CtMark(m)],
            vec![Action::SetCtMark(MarkBits {
                value: 0,
                mask: m.mask,
            })],
            "not from lo: never the proxy leg, clear our ct mark",
        ),
        // docs/ARCHITECTURE.md, pitfall 1: without this, fail-closed would reset the pod's
        // own outbound flows.
        rule(
            vec![Match::CtDirectionReply],
            vec![Action::Accept],
            "replies to the pod's own connections",
        ),
    ];
    // PROXY-protocol ports are captured before the node bypass (see `node_bypass`).
    rules.extend(proxy_protocol_captures(
        policy,
        vec![
            Action::Tproxy {
                port: cfg.inbound_port,
            },
            Action::SetMark(m),
            Action::Accept,
        ],
    ));
    rules.extend(bypass_rules(policy, fams, node_ips));
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
    vec![
        Chain {
            name: "prerouting".into(),
            kind: ChainKind::Filter,
            hook: Hook::Prerouting,
            priority: PRIO_MANGLE,
            rules,
        },
        Chain {
            name: "output".into(),
            kind: ChainKind::Route,
            hook: Hook::Output,
            priority: PRIO_MANGLE,
            // Only our bit goes from the ct mark to the packet: copying the whole ct mark
            // would overwrite the packet mark bits of others.
            rules: vec![rule(
                vec![Match::CtMark(m)],
                vec![Action::SetMark(m)],
                "app replies on the proxy leg go back to the proxy",
            )],
        },
    ]
}

/// Tproxy mode's return path: marked packets are delivered locally, one rule and route per
/// family the pod has.
fn tproxy_routing(cfg: &PlanConfig, fams: &[Family]) -> Routing {
    let m = MarkBits::ours(cfg.mark);
    let mut routing = Routing::default();
    for f in fams {
        routing.rules.push(FwmarkRule {
            family: *f,
            mark: m.value,
            mask: m.mask,
            table: cfg.route_table,
            priority: cfg.rule_priority,
        });
        routing.local_routes.push(LocalRoute {
            family: *f,
            table: cfg.route_table,
        });
    }
    routing
}

/// Redirect mode: the NAT prerouting chain redirecting inbound TCP to the sidecar.
fn redirect_chain(
    cfg: &PlanConfig,
    policy: &tproxy_cni_policy::PodPolicy,
    fams: &[Family],
    node_ips: &[std::net::IpAddr],
) -> Chain {
    let mut rules = vec![rule(
        vec![Match::IifName("lo".into())],
        vec![Action::Accept],
        "loopback is never intercepted",
    )];
    rules.extend(proxy_protocol_captures(
        policy,
        vec![Action::Redirect {
            port: cfg.inbound_port,
        }],
    ));
    rules.extend(bypass_rules(policy, fams, node_ips));
    for sel in capture_selectors(policy) {
        rules.push(rule(
            sel,
            vec![Action::Redirect {
                port: cfg.inbound_port,
            }],
            "inbound to the sidecar (redirect)",
        ));
    }
    Chain {
        name: "prerouting_nat".into(),
        kind: ChainKind::Nat,
        hook: Hook::Prerouting,
        priority: PRIO_DSTNAT,
        rules,
    }
}

/// Redirect mode's routing: ::6 is not a loopback address in IPv6 as 127.0.0.6 is in IPv4, so
/// IPv6 pods get it on lo, where the sidecar dials from it and the app's replies come back.
fn redirect_routing(fams: &[Family]) -> Routing {
    let mut routing = Routing::default();
    if fams.contains(&Family::V6) {
        if let Some(c) = Cidr::new(tproxy_cni_policy::consts::REDIRECT_SOURCE_V6.into(), 128) {
            routing.lo_addresses.push(c);
        }
    }
    routing
}

/// NAT output chain sending the pod's egress to the sidecar's outbound port.
fn outbound_chain(cfg: &PlanConfig, policy: &tproxy_cni_policy::PodPolicy) -> Chain {
    use tproxy_cni_policy::Selector;
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
        vec![Match::Mark(MarkBits::ours(cfg.mark))],
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::IpAddr;
    use tproxy_cni_policy::{Defaults, PodPolicy};

    fn plan(pairs: &[(&str, &str)], ips: &[&str]) -> Plan {
        let ann: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let policy = PodPolicy::from_annotations(&ann, &Defaults::default()).unwrap();
        let ips: Vec<IpAddr> = ips.iter().map(|s| s.parse().unwrap()).collect();
        build(&PlanConfig::default(), &policy, &ips, &[])
    }

    fn chain<'a>(p: &'a Plan, name: &str) -> &'a Chain {
        p.table
            .as_ref()
            .unwrap()
            .chains
            .iter()
            .find(|c| c.name == name)
            .unwrap()
    }

    #[test]
    fn none_owns_nothing() {
        assert!(plan(&[], &["10.0.0.5"]).is_empty());
        assert!(plan(&[("tproxy-cni.io/mode", "none")], &["10.0.0.5"]).is_empty());
    }

    #[test]
    fn tproxy_recipe_order_and_routing() {
        let p = plan(
            &[("tproxy-cni.io/mode", "tproxy")],
            &["10.0.0.5", "fd00::5"],
        );
        let pre = chain(&p, "prerouting");
        assert_eq!(
            (pre.kind, pre.hook, pre.priority),
            (ChainKind::Filter, Hook::Prerouting, -150)
        );
        // lo tag, lo accept, stale ct mark cleared, reply accept, 3 excluded sidecar ports,
        // tproxy.
        assert_eq!(pre.rules.len(), 8);
        let m = MarkBits::ours(tproxy_cni_policy::consts::MARK);
        assert_eq!(pre.rules[0].actions, vec![Action::SetCtMark(m)]);
        assert_eq!(
            pre.rules[0].matches,
            vec![Match::IifName("lo".into()), Match::Mark(m)]
        );
        assert_eq!(pre.rules[2].matches, vec![Match::CtMark(m)]);
        assert_eq!(
            pre.rules[2].actions,
            vec![Action::SetCtMark(MarkBits {
                value: 0,
                mask: m.mask
            })]
        );
        assert_eq!(pre.rules[3].matches, vec![Match::CtDirectionReply]);
        let last = pre.rules.last().unwrap();
        assert_eq!(last.matches, vec![Match::L4ProtoTcp]);
        assert_eq!(
            last.actions,
            vec![
                Action::Tproxy { port: 15006 },
                Action::SetMark(m),
                Action::Accept
            ]
        );
        let out = chain(&p, "output");
        assert_eq!((out.kind, out.hook), (ChainKind::Route, Hook::Output));
        assert_eq!(p.routing.rules.len(), 2, "one fwmark rule per family");
        assert_eq!(p.routing.local_routes.len(), 2);
        assert!(p.routing.lo_addresses.is_empty());
        // IPv4-only pod: no IPv6 routing.
        let p4 = plan(&[("tproxy-cni.io/mode", "tproxy")], &["10.0.0.5"]);
        assert_eq!(
            p4.routing
                .rules
                .iter()
                .map(|r| r.family)
                .collect::<Vec<_>>(),
            vec![Family::V4]
        );
    }

    #[test]
    fn fail_closed_rejects_after_each_capture_rule() {
        let p = plan(
            &[
                ("tproxy-cni.io/mode", "tproxy"),
                ("tproxy-cni.io/fail-mode", "closed"),
                ("tproxy-cni.io/inbound-ports", "80,9000-9100"),
            ],
            &["10.0.0.5"],
        );
        let pre = chain(&p, "prerouting");
        let n = pre.rules.len();
        let tail: Vec<_> = pre.rules[n - 4..].iter().collect();
        assert!(matches!(tail[0].actions[0], Action::Tproxy { .. }));
        assert!(matches!(tail[1].actions[0], Action::Tproxy { .. }));
        assert_eq!(tail[2].actions, vec![Action::RejectTcpReset]);
        assert_eq!(
            tail[3].matches,
            vec![
                Match::L4ProtoTcp,
                Match::TcpDport(PortRange { lo: 9000, hi: 9100 }),
                Match::CtStateNew
            ]
        );
        // Istio's "" (no inbound ports): nothing captured, and nothing to fail closed on.
        let p = plan(
            &[
                ("sidecar.istio.io/interceptionMode", "TPROXY"),
                ("traffic.sidecar.istio.io/includeInboundPorts", ""),
                ("tproxy-cni.io/fail-mode", "closed"),
            ],
            &["10.0.0.5"],
        );
        assert!(chain(&p, "prerouting")
            .rules
            .iter()
            .all(|r| !matches!(r.actions[0], Action::Tproxy { .. } | Action::RejectTcpReset)));
    }

    #[test]
    fn redirect_and_outbound() {
        let p = plan(
            &[
                ("tproxy-cni.io/mode", "redirect"),
                ("tproxy-cni.io/include-outbound-ip-ranges", "10.0.0.0/8"),
                ("tproxy-cni.io/exclude-outbound-ip-ranges", "10.96.0.0/12"),
                ("tproxy-cni.io/exclude-outbound-ports", "53"),
            ],
            &["10.0.0.5", "fd00::5"],
        );
        let pre = chain(&p, "prerouting_nat");
        assert_eq!((pre.kind, pre.priority), (ChainKind::Nat, -100));
        assert_eq!(
            pre.rules.last().unwrap().actions,
            vec![Action::Redirect { port: 15006 }]
        );
        assert!(
            p.routing.rules.is_empty(),
            "redirect needs no policy routing"
        );
        assert_eq!(p.routing.lo_addresses, vec!["::6/128".parse().unwrap()]);
        let out = chain(&p, "output_nat");
        assert_eq!(out.rules[0].matches, vec![Match::SkUid(1337)]);
        let last = out.rules.last().unwrap();
        assert_eq!(
            last.matches,
            vec![
                Match::Nfproto(Family::V4),
                Match::Daddr("10.0.0.0/8".parse().unwrap()),
                Match::L4ProtoTcp
            ]
        );
        assert_eq!(last.actions, vec![Action::Redirect { port: 15001 }]);
        // Exclusions come before the capture.
        let pos = |m: &Match| {
            out.rules
                .iter()
                .position(|r| r.matches.contains(m))
                .unwrap()
        };
        assert!(pos(&Match::Daddr("10.96.0.0/12".parse().unwrap())) < out.rules.len() - 1);
        assert!(pos(&Match::TcpDport(PortRange::single(53))) < out.rules.len() - 1);
    }

    #[test]
    fn node_addresses_bypass_before_any_capture() {
        let ann: BTreeMap<String, String> = [("tproxy-cni.io/mode", "tproxy")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let policy = PodPolicy::from_annotations(&ann, &Defaults::default()).unwrap();
        let node: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        let v4pod: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap()];
        let p = build(&PlanConfig::default(), &policy, &v4pod, &node);
        let pre = chain(&p, "prerouting");
        let from_node: Vec<usize> = (0..pre.rules.len())
            .filter(|i| pre.rules[*i].comment.starts_with("from the node"))
            .collect();
        // Only the pod's family; right after the reply rule, before exclusions and capture.
        assert_eq!(from_node, vec![4]);
        assert_eq!(
            pre.rules[4].matches,
            vec![
                Match::Nfproto(Family::V4),
                Match::Saddr("10.0.0.1/32".parse().unwrap())
            ]
        );
        assert_eq!(pre.rules[3].actions, vec![Action::Accept]);
    }

    #[test]
    fn proxy_protocol_ports_are_captured_from_the_node_too() {
        let node: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap()];
        let pod: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap()];
        for (mode, chain_name) in [("tproxy", "prerouting"), ("redirect", "prerouting_nat")] {
            let ann: BTreeMap<String, String> = [
                ("tproxy-cni.io/mode", mode),
                ("tproxy-cni.io/proxy-protocol-ports", "8443,9000-9001"),
                ("tproxy-cni.io/proxy-protocol-trusted-cidrs", "10.0.0.0/8"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
            let policy = PodPolicy::from_annotations(&ann, &Defaults::default()).unwrap();
            let p = build(&PlanConfig::default(), &policy, &pod, &node);
            let pre = chain(&p, chain_name);
            let pos = |pred: &dyn Fn(&Rule) -> bool| pre.rules.iter().position(pred);
            let node_at = pos(&|r| r.comment.starts_with("from the node")).expect(mode);
            for port in [PortRange::single(8443), PortRange { lo: 9000, hi: 9001 }] {
                let at = pos(&|r| {
                    r.matches == vec![Match::L4ProtoTcp, Match::TcpDport(port)]
                        && matches!(
                            r.actions[0],
                            Action::Tproxy { .. } | Action::Redirect { .. }
                        )
                })
                .expect("PROXY port captured");
                assert!(at < node_at, "{mode}: {port} before the node bypass");
            }
        }
        // Istio's gatewayTopology.proxyProtocol: every port expects the header; no bypass.
        let ann: BTreeMap<String, String> = [
            ("tproxy-cni.io/mode", "tproxy"),
            (
                "proxy.istio.io/config",
                "gatewayTopology:\n  proxyProtocol: {}\n",
            ),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let policy = PodPolicy::from_annotations(&ann, &Defaults::default()).unwrap();
        let p = build(&PlanConfig::default(), &policy, &pod, &node);
        assert!(chain(&p, "prerouting")
            .rules
            .iter()
            .all(|r| !r.comment.starts_with("from the node")));
    }

    #[test]
    fn comments_fit_nft_limit() {
        let p = plan(
            &[
                ("tproxy-cni.io/mode", "tproxy"),
                ("tproxy-cni.io/fail-mode", "closed"),
                ("tproxy-cni.io/include-outbound-ip-ranges", "*"),
                ("tproxy-cni.io/proxy-gid", "1337"),
                ("tproxy-cni.io/include-outbound-ports", "443"),
            ],
            &["10.0.0.5"],
        );
        for c in &p.table.as_ref().unwrap().chains {
            for r in &c.rules {
                assert!(
                    r.comment.len() <= 128 && !r.comment.is_empty(),
                    "{}",
                    r.comment
                );
            }
        }
    }
}
