//! Tests of the annotation parsing: precedence, errors naming the key, bounds.

use super::*;
use std::collections::BTreeMap;

fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn policy(pairs: &[(&str, &str)]) -> Result<PodPolicy, PolicyError> {
    PodPolicy::from_annotations(&ann(pairs), &Defaults::default())
}

#[test]
fn no_annotations_means_default_mode_none() {
    let p = policy(&[("unrelated.io/x", "y")]).unwrap();
    assert_eq!(p.mode, Mode::None);
    assert_eq!(p.inbound_ports, Selector::All);
    assert!(!p.outbound.enabled());
    assert_eq!(p.proxy_uid, 1337);
}

#[test]
fn our_family() {
    let p = policy(&[
        ("tproxy-cni.io/mode", "tproxy"),
        ("tproxy-cni.io/inbound-ports", "80, 8080,9000-9100"),
        ("tproxy-cni.io/exclude-inbound-ports", "9090"),
        (
            "tproxy-cni.io/include-outbound-ip-ranges",
            "10.0.0.0/8,fd00::/8",
        ),
        ("tproxy-cni.io/exclude-outbound-ip-ranges", "10.96.0.1"),
        ("tproxy-cni.io/include-outbound-ports", "5432"),
        ("tproxy-cni.io/exclude-outbound-ports", "53"),
        ("tproxy-cni.io/fail-mode", "closed"),
        ("tproxy-cni.io/proxy-uid", "1000"),
        ("tproxy-cni.io/proxy-gid", "2000"),
    ])
    .unwrap();
    assert_eq!(p.mode, Mode::Tproxy);
    assert_eq!(p.fail, FailMode::Closed);
    assert_eq!(
        p.inbound_ports,
        Selector::List(vec![
            PortRange::single(80),
            PortRange::single(8080),
            PortRange { lo: 9000, hi: 9100 }
        ])
    );
    assert_eq!(
        p.exclude_inbound_ports.last(),
        Some(&PortRange::single(9090))
    );
    assert_eq!(p.exclude_inbound_ports.len(), 4, "sidecar ports + user's");
    assert_eq!(
        p.outbound.include_cidrs,
        Selector::List(vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00::/8".parse().unwrap()
        ])
    );
    assert_eq!(
        p.outbound.exclude_cidrs,
        vec!["10.96.0.1/32".parse().unwrap()]
    );
    assert_eq!(p.outbound.include_ports, vec![PortRange::single(5432)]);
    assert_eq!(p.outbound.exclude_ports, vec![PortRange::single(53)]);
    assert_eq!((p.proxy_uid, p.proxy_gid), (1000, Some(2000)));
    assert!(p.outbound.enabled());
}

#[test]
fn istio_family() {
    let p = policy(&[
        ("sidecar.istio.io/interceptionMode", "TPROXY"),
        ("traffic.sidecar.istio.io/includeInboundPorts", "*"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "15020"),
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", "*"),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "169.254.169.254/32",
        ),
        ("traffic.sidecar.istio.io/includeOutboundPorts", ""),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "443"),
    ])
    .unwrap();
    assert_eq!(p.mode, Mode::Tproxy);
    assert_eq!(p.inbound_ports, Selector::All);
    assert_eq!(p.outbound.include_cidrs, Selector::All);
    assert_eq!(
        p.outbound.exclude_cidrs,
        vec!["169.254.169.254/32".parse().unwrap()]
    );
    assert_eq!(p.outbound.exclude_ports, vec![PortRange::single(443)]);
    assert_eq!(
        policy(&[("sidecar.istio.io/interceptionMode", "REDIRECT")])
            .unwrap()
            .mode,
        Mode::Redirect
    );
    assert_eq!(
        policy(&[("sidecar.istio.io/interceptionMode", "NONE")])
            .unwrap()
            .mode,
        Mode::None
    );
    // Istio's "" for includeInboundPorts means: capture no inbound port.
    let p = policy(&[
        ("sidecar.istio.io/interceptionMode", "TPROXY"),
        ("traffic.sidecar.istio.io/includeInboundPorts", ""),
    ])
    .unwrap();
    assert!(p.inbound_ports.is_nothing());
}

#[test]
fn kuma_family_and_precedence() {
    let p = policy(&[
        ("tproxy-cni.io/mode", "redirect"),
        ("sidecar.istio.io/interceptionMode", "TPROXY"),
        ("traffic.kuma.io/exclude-inbound-ports", "7000"),
        ("traffic.kuma.io/exclude-outbound-ports", "25"),
        ("traffic.kuma.io/exclude-outbound-ips", "10.1.0.0/16"),
    ])
    .unwrap();
    assert_eq!(p.mode, Mode::Redirect, "ours beats Istio's");
    assert!(p.exclude_inbound_ports.contains(&PortRange::single(7000)));
    assert_eq!(p.outbound.exclude_ports, vec![PortRange::single(25)]);
    assert_eq!(
        p.outbound.exclude_cidrs,
        vec!["10.1.0.0/16".parse().unwrap()]
    );
    // Ours beats Kuma's for the same field.
    let p = policy(&[
        ("tproxy-cni.io/exclude-inbound-ports", "1"),
        ("traffic.kuma.io/exclude-inbound-ports", "2"),
    ])
    .unwrap();
    assert!(p.exclude_inbound_ports.contains(&PortRange::single(1)));
    assert!(!p.exclude_inbound_ports.contains(&PortRange::single(2)));
}

#[test]
fn every_bad_value_names_its_key() {
    let cases: &[(&str, &str)] = &[
        ("tproxy-cni.io/mode", "bogus"),
        ("sidecar.istio.io/interceptionMode", "TPROXYY"),
        ("tproxy-cni.io/modee", "tproxy"),
        ("tproxy-cni.io/inbound-ports", "80,x"),
        ("tproxy-cni.io/inbound-ports", "0"),
        ("tproxy-cni.io/inbound-ports", "70000"),
        ("tproxy-cni.io/inbound-ports", "90-80"),
        ("tproxy-cni.io/inbound-ports", "80,,90"),
        ("tproxy-cni.io/exclude-inbound-ports", "*"),
        ("traffic.sidecar.istio.io/excludeInboundPorts", "abc"),
        ("traffic.kuma.io/exclude-inbound-ports", "-5"),
        ("tproxy-cni.io/include-outbound-ip-ranges", "10.0.0.0/33"),
        ("tproxy-cni.io/include-outbound-ip-ranges", "10.0.0.1/8"),
        (
            "traffic.sidecar.istio.io/excludeOutboundIPRanges",
            "not-a-cidr",
        ),
        ("traffic.kuma.io/exclude-outbound-ips", "1.2.3"),
        ("tproxy-cni.io/include-outbound-ports", "http"),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "1-2-3"),
        ("tproxy-cni.io/fail-mode", "sometimes"),
        ("tproxy-cni.io/proxy-uid", "-1"),
        ("tproxy-cni.io/proxy-uid", "4294967295"),
        ("tproxy-cni.io/proxy-gid", "root"),
    ];
    for (k, v) in cases {
        let e = policy(&[(k, v)]).expect_err(&format!("{k}={v} should fail"));
        assert_eq!(&e.key, k, "{e}");
        assert_eq!(&e.value, v);
        assert!(e.to_string().contains(k), "{e}");
    }
}

#[test]
fn too_long_lists_are_refused() {
    let long = (1..=300)
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let e = policy(&[("tproxy-cni.io/inbound-ports", &long)]).unwrap_err();
    assert!(e.reason.contains("more than"), "{e}");
}

#[test]
fn conflicting_include_exclude() {
    let e = policy(&[
        ("tproxy-cni.io/inbound-ports", "8080"),
        ("tproxy-cni.io/exclude-inbound-ports", "8000-8100"),
    ])
    .unwrap_err();
    assert_eq!(e.key, "tproxy-cni.io/exclude-inbound-ports");
    assert!(
        e.reason.contains("8000-8100") && e.reason.contains("tproxy-cni.io/inbound-ports"),
        "{e}"
    );
    let e = policy(&[
        ("tproxy-cni.io/include-outbound-ip-ranges", "10.0.0.0/8"),
        ("tproxy-cni.io/exclude-outbound-ip-ranges", "10.0.0.0/8"),
    ])
    .unwrap_err();
    assert_eq!(e.key, "tproxy-cni.io/exclude-outbound-ip-ranges");
    let e = policy(&[
        ("tproxy-cni.io/include-outbound-ports", "443"),
        ("traffic.kuma.io/exclude-outbound-ports", "443"),
    ])
    .unwrap_err();
    assert_eq!(e.key, "traffic.kuma.io/exclude-outbound-ports");
    // A narrower exclude inside a wider include is legitimate.
    policy(&[
        ("tproxy-cni.io/inbound-ports", "8000-8100"),
        ("tproxy-cni.io/exclude-inbound-ports", "8080"),
    ])
    .unwrap();
    policy(&[
        ("tproxy-cni.io/include-outbound-ip-ranges", "10.0.0.0/8"),
        ("tproxy-cni.io/exclude-outbound-ip-ranges", "10.1.0.0/16"),
    ])
    .unwrap();
}

#[test]
fn cidr_include_inside_a_wider_exclude_is_refused() {
    for (inc, ex) in [
        ("10.1.0.0/16", "10.0.0.0/8"),
        ("10.1.2.3", "10.0.0.0/8"),
        ("192.168.0.0/24,10.1.0.0/16", "10.1.0.0/16"),
        ("fd00:1::/64", "fd00::/16"),
        ("10.0.0.0/8", "0.0.0.0/0"),
    ] {
        let e = policy(&[
            ("tproxy-cni.io/include-outbound-ip-ranges", inc),
            ("tproxy-cni.io/exclude-outbound-ip-ranges", ex),
        ])
        .expect_err(inc);
        assert_eq!(e.key, "tproxy-cni.io/exclude-outbound-ip-ranges", "{e}");
        assert!(
            e.reason.contains("could never match") || e.reason.contains("both"),
            "{e}"
        );
    }
    let e = policy(&[
        (
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "10.1.0.0/16",
        ),
        ("traffic.kuma.io/exclude-outbound-ips", "10.0.0.0/8"),
    ])
    .unwrap_err();
    assert_eq!(e.key, "traffic.kuma.io/exclude-outbound-ips");
    assert!(e.reason.contains("includeOutboundIPRanges"), "{e}");
    // Other families, disjoint and narrower excludes are fine.
    for (inc, ex) in [
        ("10.0.0.0/8", "10.1.0.0/16"),
        ("10.1.0.0/16", "10.2.0.0/16"),
        ("::/0", "0.0.0.0/0"),
        ("10.0.0.0/8", "::/0"),
    ] {
        policy(&[
            ("tproxy-cni.io/include-outbound-ip-ranges", inc),
            ("tproxy-cni.io/exclude-outbound-ip-ranges", ex),
        ])
        .unwrap_or_else(|e| panic!("{inc} / {ex}: {e}"));
    }
}

#[test]
fn long_values_are_not_echoed_whole() {
    let big = format!("80,{}", "9".repeat(1_000_000));
    let e = policy(&[("tproxy-cni.io/inbound-ports", &big)]).unwrap_err();
    let text = e.to_string();
    assert!(text.len() < 400, "{} bytes", text.len());
    assert!(text.contains("(1000003 bytes)"), "{text}");
    let key = format!("tproxy-cni.io/{}", "k".repeat(100_000));
    let e = policy(&[(&key, "x")]).unwrap_err();
    assert!(e.to_string().len() < 800, "{}", e.to_string().len());
}

#[test]
fn pods_of_other_meshes_are_left_alone() {
    let istio = [
        ("sidecar.istio.io/interceptionMode", "TPROXY"),
        ("traffic.sidecar.istio.io/includeInboundPorts", "*"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v = istio.to_vec();
        v.extend_from_slice(extra);
        v
    };
    // Migrated pod (no injector mark): Istio's keys are honoured.
    assert_eq!(policy(&istio).unwrap().mode, Mode::Tproxy);
    assert_eq!(skip_reason(&ann(&istio)), None);
    for (k, v) in [
        (
            "sidecar.istio.io/status",
            r#"{"containers":["istio-proxy"]}"#,
        ),
        ("ambient.istio.io/redirection", "enabled"),
        ("ambient.istio.io/redirection", "pending"),
        ("kuma.io/sidecar-injected", "true"),
        ("linkerd.io/proxy-version", "stable-2.14.10"),
        ("consul.hashicorp.com/connect-inject-status", "injected"),
    ] {
        let a = with(&[(k, v)]);
        assert_eq!(policy(&a).unwrap().mode, Mode::None, "{k}");
        let why = skip_reason(&ann(&a)).expect(k);
        assert!(
            why.contains(k) && why.contains("tproxy-cni.io/mode"),
            "{why}"
        );
        // Even a conflist default mode does not apply to another mesh's pod.
        let d = Defaults {
            mode: Mode::Tproxy,
            ..Defaults::default()
        };
        assert_eq!(
            PodPolicy::from_annotations(&ann(&a), &d).unwrap().mode,
            Mode::None
        );
        // Our mode wins over the mark, and then only our keys count.
        let mut ours = a.clone();
        ours.push(("tproxy-cni.io/mode", "redirect"));
        ours.push(("traffic.sidecar.istio.io/excludeInboundPorts", "not-a-port"));
        let p = policy(&ours).unwrap();
        assert_eq!(p.mode, Mode::Redirect, "{k}");
        assert_eq!(
            p.exclude_inbound_ports,
            Defaults::default().exclude_inbound_ports
        );
        assert_eq!(skip_reason(&ann(&ours)), None);
    }
    // Values that do not mark a managed pod.
    for (k, v) in [
        ("kuma.io/sidecar-injected", "false"),
        ("ambient.istio.io/redirection", "disabled"),
        ("sidecar.istio.io/status", ""),
        ("sidecar.istio.io/inject", "true"),
    ] {
        assert_eq!(
            policy(&with(&[(k, v)])).unwrap().mode,
            Mode::Tproxy,
            "{k}={v}"
        );
    }
    // Our own keys are still checked on another mesh's pod.
    let e = policy(&[
        ("sidecar.istio.io/status", "{}"),
        ("tproxy-cni.io/modee", "x"),
    ])
    .unwrap_err();
    assert_eq!(e.key, "tproxy-cni.io/modee");
}

#[test]
fn north_south_keys() {
    let p = policy(&[
        ("tproxy-cni.io/mode", "tproxy"),
        ("tproxy-cni.io/proxy-protocol-ports", "8443, 9000-9010"),
        (
            "tproxy-cni.io/proxy-protocol-trusted-cidrs",
            "10.0.0.0/8,fd00::/8",
        ),
        ("tproxy-cni.io/proxy-protocol-out", "9000:v1,9001-9002:V2"),
        ("tproxy-cni.io/xff-ports", "8080"),
        ("tproxy-cni.io/xff-num-trusted-proxies", "2"),
        ("tproxy-cni.io/allow-peer-cidrs", "10.0.0.0/8"),
        ("tproxy-cni.io/deny-peer-cidrs", "10.9.0.0/16"),
        ("tproxy-cni.io/allow-client-cidrs", "0.0.0.0/0,::/0"),
        (
            "tproxy-cni.io/deny-client-cidrs",
            "203.0.113.0/24,2001:db8::/32",
        ),
    ])
    .unwrap();
    let ns = &p.north_south;
    assert!(ns.proxy_protocol_on(8443) && ns.proxy_protocol_on(9005));
    assert!(!ns.proxy_protocol_on(8080));
    assert_eq!(ns.proxy_protocol_trusted.len(), 2);
    assert_eq!(ns.proxy_protocol_out_on(9000), Some(PpVersion::V1));
    assert_eq!(ns.proxy_protocol_out_on(9002), Some(PpVersion::V2));
    assert_eq!(ns.proxy_protocol_out_on(8443), None);
    assert!(ns.xff_on(8080) && !ns.xff_on(8443));
    assert_eq!(ns.xff_trust, XffTrust::Hops(2));
    assert_eq!(ns.acl.deny_client.len(), 2);
    assert_eq!(ns.acl.deny_peer, vec!["10.9.0.0/16".parse().unwrap()]);
    let p = policy(&[
        ("tproxy-cni.io/xff-ports", "8080"),
        ("tproxy-cni.io/xff-trusted-cidrs", "10.0.0.0/8"),
    ])
    .unwrap();
    assert_eq!(
        p.north_south.xff_trust,
        XffTrust::Cidrs(vec!["10.0.0.0/8".parse().unwrap()])
    );
    assert_eq!(policy(&[]).unwrap().north_south, NorthSouth::default());
}

#[test]
fn north_south_bad_values_name_their_key() {
    let cases: &[&[(&str, &str)]] = &[
        &[("tproxy-cni.io/proxy-protocol-ports", "80,x")],
        // Ports without trusted sources, trusted sources without ports.
        &[("tproxy-cni.io/proxy-protocol-ports", "8443")],
        &[("tproxy-cni.io/proxy-protocol-trusted-cidrs", "10.0.0.0/8")],
        &[
            ("tproxy-cni.io/proxy-protocol-ports", "8443"),
            ("tproxy-cni.io/proxy-protocol-trusted-cidrs", "10.0.0.1/8"),
        ],
        // Not captured: an excluded port, the sidecar's own port, outside the include list.
        &[
            ("tproxy-cni.io/proxy-protocol-ports", "9000-9100"),
            ("tproxy-cni.io/proxy-protocol-trusted-cidrs", "10.0.0.0/8"),
            ("tproxy-cni.io/exclude-inbound-ports", "9050"),
        ],
        &[
            ("tproxy-cni.io/proxy-protocol-ports", "15006"),
            ("tproxy-cni.io/proxy-protocol-trusted-cidrs", "10.0.0.0/8"),
        ],
        &[
            ("tproxy-cni.io/proxy-protocol-ports", "8443"),
            ("tproxy-cni.io/proxy-protocol-trusted-cidrs", "10.0.0.0/8"),
            ("tproxy-cni.io/inbound-ports", "80"),
        ],
        &[("tproxy-cni.io/proxy-protocol-out", "9000")],
        &[("tproxy-cni.io/proxy-protocol-out", "9000:v3")],
        &[("tproxy-cni.io/proxy-protocol-out", "x:v1")],
        &[("tproxy-cni.io/proxy-protocol-out", "15021:v1")],
        &[("tproxy-cni.io/xff-ports", "http")],
        &[("tproxy-cni.io/xff-ports", "15001")],
        &[
            ("tproxy-cni.io/xff-ports", "80"),
            ("tproxy-cni.io/xff-num-trusted-proxies", "-1"),
        ],
        &[
            ("tproxy-cni.io/xff-ports", "80"),
            ("tproxy-cni.io/xff-num-trusted-proxies", "65"),
        ],
        &[("tproxy-cni.io/xff-num-trusted-proxies", "1")],
        &[
            ("tproxy-cni.io/xff-ports", "80"),
            ("tproxy-cni.io/xff-num-trusted-proxies", "1"),
            ("tproxy-cni.io/xff-trusted-cidrs", "10.0.0.0/8"),
        ],
        &[("tproxy-cni.io/allow-peer-cidrs", "10.0.0.300")],
        &[("tproxy-cni.io/deny-peer-cidrs", "*")],
        &[("tproxy-cni.io/allow-client-cidrs", "fd00::/129")],
        &[("tproxy-cni.io/deny-client-cidrs", "a,,b")],
        &[("proxy.istio.io/config", "gatewayTopology: [1, 2")],
        &[("proxy.istio.io/config", "- a list")],
        &[(
            "proxy.istio.io/config",
            "gatewayTopology:\n  numTrustedProxies: many\n",
        )],
        &[(
            "proxy.istio.io/config",
            "{\"gatewayTopology\": {\"numTrustedProxies\": -2}}",
        )],
        &[(
            "proxy.istio.io/config",
            "gatewayTopology:\n  proxyProtocol: true\n",
        )],
    ];
    for case in cases {
        let e = policy(case).expect_err(&format!("{case:?} should fail"));
        // The last key of each case is the offending one, except where a missing partner
        // is reported on the key that is present.
        assert!(
            case.iter().any(|(k, _)| *k == e.key),
            "{case:?}: error names {:?}: {e}",
            e.key
        );
        assert!(e.to_string().contains(&e.key), "{e}");
    }
    // The error for a key that needs a partner names the partner too.
    let e = policy(&[("tproxy-cni.io/proxy-protocol-ports", "8443")]).unwrap_err();
    assert!(e.reason.contains("proxy-protocol-trusted-cidrs"), "{e}");
    let e = policy(&[
        ("tproxy-cni.io/xff-ports", "80"),
        ("tproxy-cni.io/xff-num-trusted-proxies", "1"),
        ("tproxy-cni.io/xff-trusted-cidrs", "10.0.0.0/8"),
    ])
    .unwrap_err();
    assert_eq!(e.key, "tproxy-cni.io/xff-trusted-cidrs");
    let big = format!("a: \"{}\"", "x".repeat(MAX_PROXY_CONFIG));
    let e = policy(&[("proxy.istio.io/config", &big)]).unwrap_err();
    assert_eq!(e.key, "proxy.istio.io/config");
}

#[test]
fn istio_proxy_config_gateway_topology() {
    let yaml = "concurrency: 2\ngatewayTopology:\n  numTrustedProxies: 2\n  proxyProtocol: {}\n";
    let p = policy(&[
        ("sidecar.istio.io/interceptionMode", "TPROXY"),
        ("proxy.istio.io/config", yaml),
        ("tproxy-cni.io/xff-ports", "8080"),
    ])
    .unwrap();
    let ns = &p.north_south;
    assert_eq!(ns.xff_trust, XffTrust::Hops(2));
    assert_eq!(ns.proxy_protocol_ports, Selector::All);
    // Istio's gateway requires the header from every source.
    for ip in ["198.51.100.7", "2001:db8::7"] {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        assert!(ns.proxy_protocol_trusted.iter().any(|c| c.contains(&ip)));
    }
    // JSON spelling; our keys win over Istio's.
    let json = r#"{"gatewayTopology": {"numTrustedProxies": 3, "proxyProtocol": {}}}"#;
    let p = policy(&[
        ("proxy.istio.io/config", json),
        ("tproxy-cni.io/xff-ports", "8080"),
        ("tproxy-cni.io/xff-num-trusted-proxies", "1"),
        ("tproxy-cni.io/proxy-protocol-trusted-cidrs", "10.1.0.0/16"),
    ])
    .unwrap();
    assert_eq!(p.north_south.xff_trust, XffTrust::Hops(1));
    assert_eq!(
        p.north_south.proxy_protocol_trusted,
        vec!["10.1.0.0/16".parse().unwrap()]
    );
    // Other ProxyConfig fields, and an empty topology, change nothing.
    let p = policy(&[(
        "proxy.istio.io/config",
        "holdApplicationUntilProxyStarts: true\n",
    )])
    .unwrap();
    assert_eq!(p.north_south, NorthSouth::default());
    // Another mesh's pod: Istio's config belongs to that mesh and is ignored.
    let p = policy(&[
        ("sidecar.istio.io/status", "{}"),
        ("proxy.istio.io/config", yaml),
    ])
    .unwrap();
    assert_eq!(p.north_south, NorthSouth::default());
    let p = policy(&[
        ("sidecar.istio.io/status", "{}"),
        ("proxy.istio.io/config", "not: [valid"),
    ]);
    assert!(p.is_ok(), "another mesh's config is not ours to check");
}

#[test]
fn downward_api_file() {
    let text = "kubernetes.io/config.seen=\"2024-01-01T00:00:00Z\"\ntproxy-cni.io/mode=\"tproxy\"\nodd=\"a\\\"b\\\\c\\nd\\u00e9\\x41\\101\"\n\n";
    let m = parse_downward_api(text).unwrap();
    assert_eq!(m["tproxy-cni.io/mode"], "tproxy");
    assert_eq!(m["odd"], "a\"b\\c\ndéAA");
    for bad in [
        "novalue",
        "k=unquoted",
        "k=\"open",
        "k=\"bad\\q\"",
        "=\"v\"",
        "k=\"a\"b\"",
    ] {
        assert!(parse_downward_api(bad).is_err(), "{bad:?}");
    }
    let p = PodPolicy::from_annotations(&m, &Defaults::default()).unwrap();
    assert_eq!(p.mode, Mode::Tproxy);
}

#[test]
fn ipv4_mapped_cidrs_are_refused_with_the_ipv4_spelling() {
    let e = policy(&[(
        "tproxy-cni.io/deny-client-cidrs",
        "10.2.0.0/16, ::ffff:10.1.0.0/112",
    )])
    .unwrap_err();
    assert_eq!(e.key, "tproxy-cni.io/deny-client-cidrs");
    assert!(e.reason.contains("write 10.1.0.0/16"), "{e}");
    let e = policy(&[(
        "tproxy-cni.io/exclude-outbound-ip-ranges",
        "::ffff:192.0.2.7",
    )])
    .unwrap_err();
    assert!(e.reason.contains("write 192.0.2.7/32"), "{e}");
    // Plain IPv6 ranges, even ones that contain the mapped block, stay.
    let p = policy(&[("tproxy-cni.io/deny-client-cidrs", "::/0, 2001:db8::/32")]).unwrap();
    assert_eq!(p.north_south.acl.deny_client.len(), 2);
}

#[test]
fn connect_ports_must_be_xff_ports() {
    let p = policy(&[
        ("tproxy-cni.io/xff-ports", "8080-8090"),
        ("tproxy-cni.io/xff-connect-ports", "8081"),
    ])
    .unwrap();
    assert!(p.north_south.xff_connect_on(8081));
    assert!(!p.north_south.xff_connect_on(8080));
    let e = policy(&[
        ("tproxy-cni.io/xff-ports", "8080"),
        ("tproxy-cni.io/xff-connect-ports", "8080-8081"),
    ])
    .unwrap_err();
    assert_eq!(e.key, "tproxy-cni.io/xff-connect-ports");
    assert!(e.reason.contains("not in tproxy-cni.io/xff-ports"), "{e}");
}
