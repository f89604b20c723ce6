//! The parsing bounds of pod annotations (docs/ARCHITECTURE.md, pitfalls 60-62): what the
//! plugin reads for which mode, Kuma's merged config and its precedence, and hostile values
//! up to Kubernetes' own 256 KiB limit on a pod's annotations.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::yaml::tests::alias_bomb;
use super::*;

fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn plugin(pairs: &[(&str, &str)]) -> Result<PodPolicy, PolicyError> {
    PodPolicy::for_plugin(&ann(pairs), &Defaults::default())
}

/// Kubernetes refuses a pod whose annotations total more than 256 KiB (keys and values).
const K8S_ANNOTATIONS_MAX: usize = 256 * 1024;

/// Hostile values, each the worst of its kind we could build, filling the 256 KiB.
fn worst_values() -> Vec<String> {
    let bomb = alias_bomb();
    // 41 KB that made serde_yaml reach 890 MB: nine levels of ten aliases.
    let mut nine = String::from(
        "a0: &a0 [\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"]\n",
    );
    for i in 1..9 {
        nine += &format!(
            "a{i}: &a{i} [{}]\n",
            vec![format!("*a{}", i - 1); 10].join(",")
        );
    }
    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    let deep_block: String = (0..250)
        .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
        .collect();
    let wide = format!("[{}]", vec!["1"; 30_000].join(","));
    let keys: String = (0..6_000).map(|i| format!("k{i}: {i}\n")).collect();
    let quotes = format!("\"{}\"", "\\u00e9".repeat(10_000));
    let simple_keys = format!("{}: 1", "a ".repeat(30_000));
    vec![
        bomb,
        nine,
        deep,
        deep_block,
        wide,
        keys,
        quotes,
        simple_keys,
    ]
}

#[test]
fn mode_none_parses_nothing_but_the_mode() {
    let bomb = alias_bomb();
    // No mode (the default none), mode none said, another mesh's pod: the bomb and a bad
    // list are never read.
    for pairs in [
        vec![("proxy.istio.io/config", bomb.as_str())],
        vec![
            ("tproxy-cni.io/mode", "none"),
            ("proxy.istio.io/config", bomb.as_str()),
            ("tproxy-cni.io/inbound-ports", "not-a-port"),
        ],
        vec![
            ("sidecar.istio.io/interceptionMode", "NONE"),
            (kuma::KEY, bomb.as_str()),
        ],
        vec![
            ("kuma.io/sidecar-injected", "true"),
            (kuma::KEY, bomb.as_str()),
            ("traffic.sidecar.istio.io/excludeInboundPorts", "x"),
        ],
    ] {
        let p = plugin(&pairs).unwrap_or_else(|e| panic!("{pairs:?}: {e}"));
        assert_eq!(p.mode, Mode::None);
        assert_eq!(p.north_south, NorthSouth::default());
    }
    // A misspelt key of ours might be the mode: still an error.
    let e = plugin(&[("tproxy-cni.io/modee", "tproxy")]).unwrap_err();
    assert_eq!(e.key, "tproxy-cni.io/modee");
    let e = plugin(&[("tproxy-cni.io/mode", "tproxi")]).unwrap_err();
    assert_eq!(e.key, "tproxy-cni.io/mode");
    // With a mode, the bomb is read, refused at its first anchor, and named.
    for key in ["proxy.istio.io/config", kuma::KEY] {
        let e = plugin(&[("tproxy-cni.io/mode", "tproxy"), (key, bomb.as_str())]).unwrap_err();
        assert_eq!(e.key, key);
        assert!(e.reason.contains("anchors"), "{e}");
        assert!(e.to_string().len() < 400, "{e}");
    }
}

#[test]
fn kuma_merged_config_exclusions_and_precedence() {
    let cfg = "redirect:\n  inbound:\n    excludePorts: [9090]\n  outbound:\n    excludePorts: [5432]\n    excludePortsForIPs: [10.96.0.0/12]\n";
    let p = plugin(&[("tproxy-cni.io/mode", "redirect"), (kuma::KEY, cfg)]).unwrap();
    assert!(p.exclude_inbound_ports.contains(&PortRange::single(9090)));
    assert_eq!(p.outbound.exclude_ports, vec![PortRange::single(5432)]);
    assert_eq!(
        p.outbound.exclude_cidrs,
        vec!["10.96.0.0/12".parse().unwrap()]
    );
    // Ours, then Istio's, then the merged config, then Kuma's one-key annotations.
    let p = plugin(&[
        ("tproxy-cni.io/mode", "redirect"),
        (kuma::KEY, cfg),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "53"),
        ("traffic.kuma.io/exclude-inbound-ports", "7000"),
        ("tproxy-cni.io/exclude-outbound-ip-ranges", "192.168.0.0/16"),
    ])
    .unwrap();
    assert_eq!(p.outbound.exclude_ports, vec![PortRange::single(53)]);
    assert!(p.exclude_inbound_ports.contains(&PortRange::single(9090)));
    assert!(!p.exclude_inbound_ports.contains(&PortRange::single(7000)));
    assert_eq!(
        p.outbound.exclude_cidrs,
        vec!["192.168.0.0/16".parse().unwrap()]
    );
    // Without the merged field, the one-key annotation still counts.
    let p = plugin(&[
        ("tproxy-cni.io/mode", "redirect"),
        (kuma::KEY, "redirect: {dns: {enabled: true}}"),
        ("traffic.kuma.io/exclude-inbound-ports", "7000"),
    ])
    .unwrap();
    assert!(p.exclude_inbound_ports.contains(&PortRange::single(7000)));
    // Cross-key checks name the merged annotation.
    let e = plugin(&[
        ("tproxy-cni.io/mode", "redirect"),
        ("tproxy-cni.io/include-outbound-ports", "5432"),
        (kuma::KEY, cfg),
    ])
    .unwrap_err();
    assert_eq!(e.key, kuma::KEY);
    // Malformed: the error names the annotation and the field.
    let e = plugin(&[
        ("tproxy-cni.io/mode", "tproxy"),
        (kuma::KEY, "redirect: {inbound: {excludePorts: [http]}}"),
    ])
    .unwrap_err();
    assert_eq!(e.key, kuma::KEY);
    assert!(e.reason.contains("redirect.inbound.excludePorts"), "{e}");
    // Another mesh's pod (Kuma's own): its config is Kuma's business.
    let p = plugin(&[
        ("kuma.io/sidecar-injected", "true"),
        ("tproxy-cni.io/mode", "tproxy"),
        (kuma::KEY, "redirect: [not, ours]"),
    ])
    .unwrap();
    assert_eq!(p.mode, Mode::Tproxy);
}

/// The unit property: any annotation map within 256 KiB is decided quickly, refused with the
/// key named or accepted, in every mode.
#[test]
fn worst_values_within_the_kubernetes_limit_are_decided_fast() {
    let values = worst_values();
    for v in &values {
        for key in ["proxy.istio.io/config", kuma::KEY] {
            for mode in ["tproxy", "redirect", "none"] {
                let mut m = ann(&[("tproxy-cni.io/mode", mode)]);
                m.insert(key.to_string(), v.clone());
                assert!(m.values().map(String::len).sum::<usize>() < K8S_ANNOTATIONS_MAX);
                let t = Instant::now();
                let r = PodPolicy::for_plugin(&m, &Defaults::default());
                let full = PodPolicy::from_annotations(&m, &Defaults::default());
                let took = t.elapsed();
                assert!(
                    took < Duration::from_secs(1),
                    "{key} ({} bytes, starts {:?}) in mode {mode}: {took:?}",
                    v.len(),
                    &v[..v.len().min(20)]
                );
                if let Err(e) = full {
                    assert_eq!(e.key, key, "{e}");
                }
                if mode == "none" {
                    assert!(r.is_ok(), "mode none reads nothing: {r:?}");
                }
            }
        }
    }
    // All of them at once, under keys of both meshes and ours, up to the limit.
    let mut m = ann(&[
        ("tproxy-cni.io/mode", "tproxy"),
        ("proxy.istio.io/config", &alias_bomb()),
    ]);
    let size =
        |m: &BTreeMap<String, String>| -> usize { m.iter().map(|(k, v)| k.len() + v.len()).sum() };
    for (i, v) in values.iter().enumerate() {
        for key in [kuma::KEY.to_string(), format!("x.example/{i}")] {
            if size(&m) + key.len() + v.len() <= K8S_ANNOTATIONS_MAX && !m.contains_key(&key) {
                m.insert(key, v.clone());
            }
        }
    }
    assert!(size(&m) > 200 * 1024, "{}", size(&m));
    let t = Instant::now();
    let e = PodPolicy::for_plugin(&m, &Defaults::default()).unwrap_err();
    assert!(
        ["proxy.istio.io/config", kuma::KEY].contains(&e.key.as_str()),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(1));
}
