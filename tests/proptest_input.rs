//! Property tests of the plugin's input side: the annotation and config parsers never panic,
//! every accepted policy plans exclusions before captures, values survive their round trips,
//! and a sample of random accepted policies loads into a real pod netns (root).

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Value};

use tproxy_cni_plugin::plan::{self, Action, Match, Plan, PlanConfig};
use tproxy_cni_plugin::NetConf;
use tproxy_cni_policy::{
    parse_downward_api, Defaults, FailMode, Mode, PodPolicy, Selector, MESH_MARKS,
};
use tproxy_cni_policy::{Cidr, PortRange};

/// Enough cases to find edge cases, few enough that the file runs in seconds.
const CASES: u32 = 256;

// ---------------------------------------------------------------------------------------------
// Strategies

fn port_range() -> impl Strategy<Value = PortRange> {
    prop_oneof![
        (1u16..=65535).prop_map(PortRange::single),
        (1u16..=65535, 0u16..2000).prop_map(|(lo, d)| PortRange {
            lo,
            hi: lo.saturating_add(d)
        }),
    ]
}

fn cidr() -> impl Strategy<Value = Cidr> {
    prop_oneof![
        (any::<u32>(), 0u8..=32)
            .prop_filter_map("v4", |(a, p)| Cidr::new(IpAddr::V4(Ipv4Addr::from(a)), p)),
        (any::<u128>(), 0u8..=128)
            .prop_filter_map("v6", |(a, p)| Cidr::new(IpAddr::V6(Ipv6Addr::from(a)), p)),
    ]
}

fn join<T: ToString>(v: &[T]) -> String {
    v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

/// Weight of noise (arbitrary text) against well-formed values: `Noise(0)` gives values the
/// parser accepts one by one (combinations may still conflict), for properties of accepted
/// policies; more noise explores the refusals.
#[derive(Clone, Copy)]
struct Noise(u32);

/// A value for a list key: well-formed, sometimes `*` (valid for include keys only) or noise.
fn port_list_value(max: usize, n: Noise) -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::collection::vec(port_range(), 0..max).prop_map(|v| join(&v)),
        n.0 => Just("*".to_string()),
        n.0 => "[0-9, *-]{0,12}",
        n.0 => any::<String>(),
    ]
}

fn cidr_list_value(max: usize, n: Noise) -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::collection::vec(cidr(), 0..max).prop_map(|v| join(&v)),
        n.0 => Just("*".to_string()),
        n.0 => "[0-9a-f:./, *]{0,20}",
        n.0 => any::<String>(),
    ]
}

/// An include list: `*` is valid here.
fn selector_value<S: Strategy<Value = String>>(list: S) -> impl Strategy<Value = String> {
    prop_oneof![4 => list, 1 => Just("*".to_string())]
}

fn mode_value(n: Noise) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["tproxy", "redirect", "none", "TPROXY", "REDIRECT"])
            .prop_map(str::to_string),
        n.0 => any::<String>(),
    ]
}

fn fail_value(n: Noise) -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(vec!["open", "closed", "Closed"]).prop_map(str::to_string),
        n.0 => any::<String>(),
    ]
}

fn id_value(n: Noise) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (0u32..=70000).prop_map(|n| n.to_string()),
        n.0 => any::<String>(),
    ]
}

/// Every key the parser knows (ours, Istio's, Kuma's), each present or not, plus the marks of
/// other meshes and unrelated keys. Lists stay at most `max` entries long.
fn annotations(max: usize, n: Noise) -> impl Strategy<Value = BTreeMap<String, String>> {
    let mode = move || prop::option::of(mode_value(n)).boxed();
    let ports = move || prop::option::of(port_list_value(max, n)).boxed();
    let cidrs = move || prop::option::of(cidr_list_value(max, n)).boxed();
    let inc_ports = move || prop::option::of(selector_value(port_list_value(max, n))).boxed();
    let inc_cidrs = move || prop::option::of(selector_value(cidr_list_value(max, n))).boxed();
    let fail = move || prop::option::of(fail_value(n)).boxed();
    let id = move || prop::option::of(id_value(n)).boxed();
    let keys: Vec<(&str, BoxedStrategy<Option<String>>)> = vec![
        ("tproxy-cni.io/mode", mode()),
        ("tproxy-cni.io/inbound-ports", inc_ports()),
        ("tproxy-cni.io/exclude-inbound-ports", ports()),
        ("tproxy-cni.io/include-outbound-ip-ranges", inc_cidrs()),
        ("tproxy-cni.io/exclude-outbound-ip-ranges", cidrs()),
        ("tproxy-cni.io/include-outbound-ports", ports()),
        ("tproxy-cni.io/exclude-outbound-ports", ports()),
        ("tproxy-cni.io/fail-mode", fail()),
        ("tproxy-cni.io/proxy-uid", id()),
        ("tproxy-cni.io/proxy-gid", id()),
        ("sidecar.istio.io/interceptionMode", mode()),
        ("traffic.sidecar.istio.io/includeInboundPorts", inc_ports()),
        ("traffic.sidecar.istio.io/excludeInboundPorts", ports()),
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            inc_cidrs(),
        ),
        ("traffic.sidecar.istio.io/excludeOutboundIPRanges", cidrs()),
        ("traffic.sidecar.istio.io/includeOutboundPorts", ports()),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", ports()),
        ("traffic.kuma.io/exclude-inbound-ports", ports()),
        ("traffic.kuma.io/exclude-outbound-ips", cidrs()),
        ("traffic.kuma.io/exclude-outbound-ports", ports()),
    ];
    let (names, values): (Vec<&str>, Vec<_>) = keys.into_iter().unzip();
    let extra = (
        prop::option::of((0..MESH_MARKS.len(), any::<bool>())),
        prop::collection::btree_map("[a-z][a-z./-]{0,23}", any::<String>(), 0..3),
    );
    (values, extra).prop_map(move |(values, (mark, junk))| {
        let mut m = junk;
        for (k, v) in names.iter().zip(values) {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        }
        if let Some((i, on)) = mark {
            let mk = &MESH_MARKS[i];
            let v = match (mk.value, on) {
                (Some(v), true) => v.to_string(),
                (Some(_), false) => "no".to_string(),
                (None, true) => "x".to_string(),
                (None, false) => String::new(),
            };
            m.insert(mk.key.to_string(), v);
        }
        m
    })
}

fn defaults() -> impl Strategy<Value = Defaults> {
    (
        prop::sample::select(vec![Mode::None, Mode::Tproxy, Mode::Redirect]),
        any::<bool>(),
        0u32..70000,
        prop::option::of(0u32..70000),
        prop::collection::vec(port_range(), 0..4),
    )
        .prop_map(|(mode, closed, uid, gid, extra)| {
            let mut d = Defaults {
                mode,
                fail: if closed {
                    FailMode::Closed
                } else {
                    FailMode::Open
                },
                proxy_uid: uid,
                proxy_gid: gid,
                ..Defaults::default()
            };
            d.exclude_inbound_ports.extend(extra);
            d
        })
}

fn pod_ips() -> impl Strategy<Value = Vec<IpAddr>> {
    prop::sample::select(vec![
        vec![],
        vec!["10.88.0.5".parse().unwrap()],
        vec!["fd00:88::5".parse().unwrap()],
        vec!["10.88.0.5".parse().unwrap(), "fd00:88::5".parse().unwrap()],
    ])
}

/// Arbitrary JSON, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::String),
        "[0-9]{1,6}(-[0-9]{1,6})?".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(any::<String>(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

const CONF_KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "tableName",
    "inboundPort",
    "outboundPort",
    "adminPort",
    "mark",
    "routeTable",
    "rulePriority",
    "proxyUid",
    "proxyGid",
    "failClosed",
    "defaultMode",
    "excludeInboundPorts",
    "logLevel",
    "logFile",
    "runtimeConfig",
    "prevResult",
];

// ---------------------------------------------------------------------------------------------
// Invariants

fn is_capture(r: &plan::Rule) -> bool {
    r.actions
        .iter()
        .any(|a| matches!(a, Action::Tproxy { .. } | Action::Redirect { .. }))
}

fn is_bypass(r: &plan::Rule) -> bool {
    r.actions == [Action::Accept]
}

/// In every chain, each rule that lets traffic bypass the sidecar comes before the first rule
/// that captures, and every exclusion of the policy is such a rule.
fn exclusions_precede_captures(p: &Plan, policy: &PodPolicy) -> Result<(), String> {
    let Some(t) = &p.table else {
        return if policy.mode == Mode::None {
            Ok(())
        } else {
            Err(format!("mode {} without a table", policy.mode))
        };
    };
    for c in &t.chains {
        let first_capture = c.rules.iter().position(is_capture);
        if let Some(fc) = first_capture {
            if let Some(late) = c.rules[fc..].iter().position(is_bypass) {
                return Err(format!(
                    "chain {}: accept rule {} after the first capture {fc}",
                    c.name,
                    fc + late
                ));
            }
        }
        let before = &c.rules[..first_capture.unwrap_or(c.rules.len())];
        let accepted = |m: &Match| before.iter().any(|r| is_bypass(r) && r.matches.contains(m));
        let inbound = c.name.starts_with("prerouting");
        if inbound {
            for e in &policy.exclude_inbound_ports {
                if !accepted(&Match::TcpDport(*e)) {
                    return Err(format!(
                        "chain {}: excluded port {e} not before captures",
                        c.name
                    ));
                }
            }
        }
        if c.name == "output_nat" {
            for e in &policy.outbound.exclude_cidrs {
                if !accepted(&Match::Daddr(*e)) {
                    return Err(format!(
                        "output_nat: excluded range {e} not before captures"
                    ));
                }
            }
            for e in &policy.outbound.exclude_ports {
                if !accepted(&Match::TcpDport(*e)) {
                    return Err(format!("output_nat: excluded port {e} not before captures"));
                }
            }
            if !accepted(&Match::SkUid(policy.proxy_uid)) {
                return Err("output_nat: proxy uid not exempt before captures".into());
            }
        }
    }
    Ok(())
}

/// Our own annotations that say exactly what `p` says (defaults: the stock ones).
fn to_annotations(p: &PodPolicy) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(format!("tproxy-cni.io/{k}"), v);
    };
    put("mode", p.mode.as_str().to_string());
    put(
        "fail-mode",
        match p.fail {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        }
        .to_string(),
    );
    put(
        "inbound-ports",
        match &p.inbound_ports {
            Selector::All => "*".to_string(),
            Selector::List(v) => join(v),
        },
    );
    let stock = Defaults::default().exclude_inbound_ports;
    put(
        "exclude-inbound-ports",
        join(&p.exclude_inbound_ports[stock.len()..]),
    );
    put(
        "include-outbound-ip-ranges",
        match &p.outbound.include_cidrs {
            Selector::All => "*".to_string(),
            Selector::List(v) => join(v),
        },
    );
    put(
        "exclude-outbound-ip-ranges",
        join(&p.outbound.exclude_cidrs),
    );
    put("include-outbound-ports", join(&p.outbound.include_ports));
    put("exclude-outbound-ports", join(&p.outbound.exclude_ports));
    put("proxy-uid", p.proxy_uid.to_string());
    if let Some(g) = p.proxy_gid {
        put("proxy-gid", g.to_string());
    }
    m
}

/// Go's `%q` as the kubelet writes the downward-API annotations file.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\x7f' => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------------------------
// Pure properties

proptest! {
    #![proptest_config(Config { cases: CASES, failure_persistence: None, ..Config::default() })]

    #[test]
    fn annotation_parser_never_panics(ann in annotations(12, Noise(1)), d in defaults()) {
        if let Err(e) = PodPolicy::from_annotations(&ann, &d) {
            // Every refusal names an annotation key it was given, and stays short.
            prop_assert!(ann.contains_key(&e.key), "{e} names no given key");
            prop_assert!(e.to_string().len() < 1200, "{} bytes", e.to_string().len());
        }
    }

    #[test]
    fn accepted_policies_plan_exclusions_before_captures(
        ann in annotations(12, Noise(0)),
        d in defaults(),
        ips in pod_ips(),
    ) {
        // Only conflicting pairs (an include inside an exclude) are refused here.
        let policy = match PodPolicy::from_annotations(&ann, &d) {
            Ok(p) => p,
            Err(e) => {
                prop_assert!(
                    e.reason.contains("excludes all of") || e.reason.contains("both"),
                    "{e}"
                );
                return Ok(());
            }
        };
        let p = plan::build(&PlanConfig::default(), &policy, &ips, &[]);
        if let Err(e) = exclusions_precede_captures(&p, &policy) {
            return Err(TestCaseError::fail(format!("{e}\n{ann:?}\n{p:#?}")));
        }
    }

    #[test]
    fn arbitrary_annotation_text_never_panics(
        ann in prop::collection::btree_map(
            prop_oneof![
                prop::sample::select(vec![
                    "tproxy-cni.io/mode", "tproxy-cni.io/inbound-ports",
                    "tproxy-cni.io/include-outbound-ip-ranges",
                    "tproxy-cni.io/exclude-outbound-ip-ranges", "tproxy-cni.io/proxy-uid",
                    "sidecar.istio.io/interceptionMode", "sidecar.istio.io/status",
                    "traffic.kuma.io/exclude-outbound-ips",
                ]).prop_map(str::to_string),
                any::<String>(),
            ],
            any::<String>(),
            0..6,
        ),
    ) {
        let _ = PodPolicy::from_annotations(&ann, &Defaults::default());
        let _ = tproxy_cni_policy::skip_reason(&ann);
    }

    #[test]
    fn accepted_policies_round_trip_through_our_annotations(ann in annotations(8, Noise(0))) {
        let Ok(p) = PodPolicy::from_annotations(&ann, &Defaults::default()) else {
            return Ok(());
        };
        // Another mesh's pod without our mode is skipped: nothing to round-trip.
        prop_assume!(tproxy_cni_policy::skip_reason(&ann).is_none());
        let back = PodPolicy::from_annotations(&to_annotations(&p), &Defaults::default())
            .map_err(|e| TestCaseError::fail(format!("re-parse: {e}")))?;
        prop_assert_eq!(back, p);
    }

    #[test]
    fn cidrs_and_port_ranges_round_trip(c in cidr(), r in port_range()) {
        prop_assert_eq!(c.to_string().parse::<Cidr>().ok(), Some(c));
        prop_assert_eq!(r.to_string().parse::<PortRange>().ok(), Some(r));
    }

    #[test]
    fn downward_api_file_round_trips(
        m in prop::collection::btree_map("[!-<>-~]([ -<>-~]{0,30}[!-<>-~])?", any::<String>(), 0..8),
    ) {
        let text: String = m.iter().map(|(k, v)| format!("{k}={}\n", go_quote(v))).collect();
        prop_assert_eq!(parse_downward_api(&text).ok(), Some(m));
    }

    #[test]
    fn config_parser_never_panics(
        fields in prop::collection::vec((prop::sample::select(CONF_KEYS), json_value()), 0..6),
        ann in annotations(4, Noise(1)),
    ) {
        let mut c = json!({
            "cniVersion": "1.0.0", "name": "k8s", "type": "tproxy-cni",
            "runtimeConfig": {"io.kubernetes.cri.pod-annotations": ann},
            "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.88.0.5/16"}]},
        });
        for (k, v) in fields {
            c[k] = v;
        }
        let stdin = c.to_string();
        if let Ok(conf) = NetConf::parse(stdin.as_bytes()) {
            // Whatever the config accepts plans without a panic.
            if let (Ok(policy), Ok(ips)) = (
                PodPolicy::from_annotations(&conf.annotations, &conf.defaults),
                conf.pod_ips(),
            ) {
                let p = plan::build(&conf.plan, &policy, &ips, &[]);
                if let Err(e) = exclusions_precede_captures(&p, &policy) {
                    return Err(TestCaseError::fail(e));
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_as_config_never_panic(b in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = NetConf::parse(&b);
        let _ = tproxy_cni_plugin::peek_version(&b);
        let _ = tproxy_cni_plugin::peek_bad_table_name(&b);
    }
}

// ---------------------------------------------------------------------------------------------
// Root: a sample of random accepted policies in the kernel

/// Up to `n` annotation maps that the parser accepts and that program something, drawn with a
/// fixed seed so every run loads the same sample.
fn accepted_sample(n: usize) -> Vec<BTreeMap<String, String>> {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    // Lists of up to 16 entries: the sample checks that every kind of rule loads; the size
    // limit (256 entries) is tested on its own.
    let strat = annotations(16, Noise(0));
    let mut out = Vec::new();
    for _ in 0..100_000 {
        if out.len() == n {
            break;
        }
        let ann = strat.new_tree(&mut runner).expect("strategy").current();
        match PodPolicy::from_annotations(&ann, &Defaults::default()) {
            Ok(p) if p.mode != Mode::None => out.push(ann),
            _ => {}
        }
    }
    out
}

#[test]
fn a_sample_of_random_accepted_policies_loads_checks_and_deletes_cleanly() {
    require_root!();
    let sample = accepted_sample(20);
    assert_eq!(sample.len(), 20, "the generator finds accepted policies");
    let modes: Vec<Mode> = sample
        .iter()
        .map(|a| {
            PodPolicy::from_annotations(a, &Defaults::default())
                .unwrap()
                .mode
        })
        .collect();
    assert!(
        modes.contains(&Mode::Tproxy) && modes.contains(&Mode::Redirect),
        "{modes:?}"
    );

    let node = common::chain::Node::new(json!({}));
    let prev = json!({"cniVersion": "1.0.0", "ips": [
        {"address": "10.88.0.5/16"}, {"address": "fd00:88::5/64"}
    ]});
    let ips: Vec<IpAddr> = vec!["10.88.0.5".parse().unwrap(), "fd00:88::5".parse().unwrap()];
    for (i, ann) in sample.iter().enumerate() {
        let ns = common::Netns::new("prop");
        let path = ns.path().to_string_lossy().into_owned();
        let a = Value::Object(ann.iter().map(|(k, v)| (k.clone(), json!(v))).collect());
        let what = format!("policy {i}: {ann:?}");
        node.exec(&node.ours(), "ADD", &path, &ns.name, &a, Some(&prev))
            .unwrap_or_else(|e| panic!("ADD {what}: {e:?}"));
        // The kernel holds exactly the planned rules.
        let policy = PodPolicy::from_annotations(ann, &Defaults::default()).unwrap();
        // The plugin runs in the chain's own node netns, which holds no global address here, so
        // no node-address bypass rule is planned.
        let p = plan::build(&PlanConfig::default(), &policy, &ips, &[]);
        let planned: usize = p
            .table
            .iter()
            .flat_map(|t| &t.chains)
            .map(|c| c.rules.len())
            .sum();
        let listed: Value =
            serde_json::from_str(&ns.sh("nft -j list table inet tproxy_cni")).expect("nft -j");
        let rules = listed["nftables"]
            .as_array()
            .map(|a| a.iter().filter(|o| o.get("rule").is_some()).count())
            .unwrap_or(0);
        assert_eq!(rules, planned, "{what}");
        node.exec(&node.ours(), "CHECK", &path, &ns.name, &a, Some(&prev))
            .unwrap_or_else(|e| panic!("CHECK {what}: {e:?}"));
        node.exec(&node.ours(), "DEL", &path, &ns.name, &a, Some(&prev))
            .unwrap_or_else(|e| panic!("DEL {what}: {e:?}"));
        assert!(
            !ns.try_sh("nft list table inet tproxy_cni").status.success(),
            "{what}: table left"
        );
        for fam in ["-4", "-6"] {
            let r = ns.sh(&format!("ip {fam} rule show"));
            assert!(!r.contains("29808"), "{what}: {fam} rule left: {r}");
        }
        assert!(
            !ns.sh("ip -6 addr show dev lo").contains("::6/128"),
            "{what}: ::6 left"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Bounded YAML values (docs/ARCHITECTURE.md, pitfall 60)

/// YAML made of the pieces that make readers work hard: anchors, aliases, flow and block
/// nesting, keys, quotes, repeated up to a 64 KiB value.
fn yaml_soup() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "&a ",
        "*a",
        "&b ",
        "*b",
        "[",
        "]",
        "{",
        "}",
        ", ",
        ": ",
        "- ",
        "\n",
        "  ",
        "? ",
        "\"",
        "'",
        "x",
        "gatewayTopology",
        "numTrustedProxies: 3",
        "proxyProtocol: {}",
        "redirect",
        "inbound",
        "excludePorts: [22, 80]",
        "!!str ",
        "|\n  ",
        "#c\n",
        "---\n",
        "~",
        "1",
    ]);
    (prop::collection::vec(piece, 0..400), 1usize..200).prop_map(|(pieces, times)| {
        let one: String = pieces.concat();
        let mut s = String::new();
        while s.len() + one.len() <= 64 * 1024 && times > 0 && !one.is_empty() {
            s.push_str(&one);
            if s.len() > one.len() * times {
                break;
            }
        }
        s
    })
}

proptest! {
    #![proptest_config(Config { cases: 64, failure_persistence: None, ..Config::default() })]

    /// Any value under Istio's or Kuma's YAML key is decided quickly: accepted, or refused
    /// naming that key; mode none never reads it.
    #[test]
    fn yaml_values_are_decided_in_bounded_time(v in yaml_soup(), kuma in any::<bool>()) {
        let key = if kuma {
            "traffic.kuma.io/transparent-proxy-config"
        } else {
            "proxy.istio.io/config"
        };
        for mode in ["tproxy", "none"] {
            let ann: BTreeMap<String, String> = [
                ("tproxy-cni.io/mode".to_string(), mode.to_string()),
                (key.to_string(), v.clone()),
            ]
            .into_iter()
            .collect();
            let t = std::time::Instant::now();
            let r = PodPolicy::for_plugin(&ann, &Defaults::default());
            let took = t.elapsed();
            prop_assert!(took < std::time::Duration::from_secs(1), "{} bytes: {took:?}", v.len());
            match (mode, r) {
                ("none", r) => prop_assert!(r.is_ok(), "mode none: {r:?}"),
                (_, Err(e)) => prop_assert_eq!(e.key.as_str(), key),
                (_, Ok(_)) => {}
            }
        }
    }
}
