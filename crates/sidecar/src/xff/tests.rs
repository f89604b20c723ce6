use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn eff(xff: &[&str], peer: &str, trust: &XffTrust) -> Effective {
    let lines: Vec<&[u8]> = xff.iter().map(|s| s.as_bytes()).collect();
    effective_client(&lines, ip(peer), trust)
}

const P: &str = "192.0.2.5";

#[test]
fn num_trusted_proxies_table() {
    // (N, incoming XFF field lines, expected client, expected source)
    let xff_at = |n| Source::Xff { from_right: n };
    let cases: &[(u32, &[&str], &str, Source)] = &[
        (0, &[], P, Source::Peer),
        (0, &["10.0.0.1"], P, Source::Peer),
        (0, &["10.0.0.1, 10.0.0.2"], P, Source::Peer),
        (0, &["10.0.0.1, 10.0.0.2, 10.0.0.3"], P, Source::Peer),
        (1, &[], P, Source::Peer),
        (1, &["10.0.0.1"], "10.0.0.1", xff_at(1)),
        (1, &["10.0.0.1, 10.0.0.2"], "10.0.0.2", xff_at(1)),
        (1, &["10.0.0.1, 10.0.0.2, 10.0.0.3"], "10.0.0.3", xff_at(1)),
        (2, &[], P, Source::Peer),
        (2, &["10.0.0.1"], P, Source::Peer),
        (2, &["10.0.0.1, 10.0.0.2"], "10.0.0.1", xff_at(2)),
        (2, &["10.0.0.1, 10.0.0.2, 10.0.0.3"], "10.0.0.2", xff_at(2)),
        // Several field lines are one list, in order.
        (
            2,
            &["10.0.0.1", "10.0.0.2, 10.0.0.3"],
            "10.0.0.2",
            xff_at(2),
        ),
        (
            2,
            &["10.0.0.1, 10.0.0.2", "10.0.0.3"],
            "10.0.0.2",
            xff_at(2),
        ),
        (
            3,
            &["10.0.0.1", "10.0.0.2", "10.0.0.3"],
            "10.0.0.1",
            xff_at(3),
        ),
        (4, &["10.0.0.1", "10.0.0.2", "10.0.0.3"], P, Source::Peer),
        // Empty field lines add nothing.
        (1, &["", "10.0.0.1", " \t"], "10.0.0.1", xff_at(1)),
        (1, &["  "], P, Source::Peer),
    ];
    for (n, xff, want, source) in cases {
        let got = eff(xff, P, &XffTrust::Hops(*n));
        assert_eq!(
            (got.client, got.source),
            (ip(want), *source),
            "N={n} XFF={xff:?}"
        );
    }
}

#[test]
fn malformed_picked_element_falls_back_to_peer() {
    let bad = [
        "unknown",
        "",
        "not-an-ip",
        "10.0.0.256",
        "010.0.0.1",
        "fe80::1%eth0",
        "[10.0.0.1]",
        "[::1",
        "::1]",
        "10.0.0.1:",
        "10.0.0.1:65536",
        "10.0.0.1:+80",
        "[::1]:",
        "[::1]x",
        "[::1]:80:80",
        "_hidden",
        "10.0.0.1 10.0.0.2",
        "2001:db8::1:80:80:80:80:80",
    ];
    for b in bad {
        let got = eff(&[&format!("10.0.0.9, {b}")], P, &XffTrust::Hops(1));
        assert_eq!(
            (got.client, got.source),
            (ip(P), Source::PeerMalformedXff),
            "{b:?}"
        );
        assert_eq!(parse_element(b.as_bytes()), None, "{b:?}");
    }
    // Non-UTF-8 bytes.
    let got = effective_client(&[b"10.0.0.9, \xff\xfe"], ip(P), &XffTrust::Hops(1));
    assert_eq!(got.source, Source::PeerMalformedXff);
    // Empty element from a trailing comma, or two commas in a row.
    assert_eq!(eff(&["10.0.0.9,"], P, &XffTrust::Hops(1)).client, ip(P));
    assert_eq!(
        eff(&["10.0.0.9,,10.0.0.8"], P, &XffTrust::Hops(2)).client,
        ip(P)
    );
    // Malformed elements left of the picked one are never looked at.
    let got = eff(&["garbage, 10.0.0.7"], P, &XffTrust::Hops(1));
    assert_eq!(got.client, ip("10.0.0.7"));
}

#[test]
fn element_forms_ipv4_ipv6_brackets_ports() {
    let ok = [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7\t", "203.0.113.7"),
        ("203.0.113.7:8080", "203.0.113.7"),
        ("203.0.113.7:0", "203.0.113.7"),
        ("2001:db8::7", "2001:db8::7"),
        ("[2001:db8::7]", "2001:db8::7"),
        ("[2001:db8::7]:443", "2001:db8::7"),
        ("::1", "::1"),
        ("[::1]:65535", "::1"),
        ("2001:0db8:0000:0000:0000:0000:0000:0007", "2001:db8::7"),
        // IPv4-mapped counts as IPv4 (so CIDRs and ACLs match one form).
        ("::ffff:198.51.100.1", "198.51.100.1"),
        ("[::ffff:198.51.100.1]:1", "198.51.100.1"),
    ];
    for (raw, want) in ok {
        assert_eq!(parse_element(raw.as_bytes()), Some(ip(want)), "{raw:?}");
        let got = eff(&[&format!("10.0.0.1, {raw}")], P, &XffTrust::Hops(1));
        assert_eq!(got.client, ip(want), "{raw:?}");
    }
    // An IPv6 peer: N=0 keeps it, canonical.
    let got = eff(&["10.0.0.1"], "2001:db8::99", &XffTrust::Hops(0));
    assert_eq!(got.client, ip("2001:db8::99"));
    let got = eff(&[], "::ffff:192.0.2.5", &XffTrust::Hops(0));
    assert_eq!(got.client, ip("192.0.2.5"));
}

fn cidrs(list: &[&str]) -> XffTrust {
    XffTrust::Cidrs(list.iter().map(|c| c.parse().unwrap()).collect())
}

#[test]
fn trusted_cidrs_walk_from_the_right() {
    let t = cidrs(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
    let xff_at = |n| Source::Xff { from_right: n };
    let cases: &[(&[&str], &str, &str, Source)] = &[
        // Untrusted peer: XFF ignored, however plausible.
        (&["198.51.100.1"], "192.0.2.5", "192.0.2.5", Source::Peer),
        // Trusted peer, no XFF: the peer.
        (&[], "10.1.1.1", "10.1.1.1", Source::Peer),
        (&["198.51.100.1"], "10.1.1.1", "198.51.100.1", xff_at(1)),
        (
            &["203.0.113.9, 198.51.100.1, 10.2.2.2"],
            "10.1.1.1",
            "198.51.100.1",
            xff_at(2),
        ),
        (
            &["203.0.113.9", "10.3.3.3, 10.2.2.2"],
            "10.1.1.1",
            "203.0.113.9",
            xff_at(3),
        ),
        // Every element trusted: the leftmost.
        (&["10.9.9.9, 10.2.2.2"], "10.1.1.1", "10.9.9.9", xff_at(2)),
        // IPv6, bracketed with ports, across both families.
        (
            &["[2001:db8:1::5]:1234, [2001:db8:ffff::1]:80"],
            "2001:db8:ffff::2",
            "2001:db8:1::5",
            xff_at(2),
        ),
        (
            &["198.51.100.1, 2001:db8:ffff::1"],
            "::ffff:10.1.1.1",
            "198.51.100.1",
            xff_at(2),
        ),
        // A malformed element on the walk: the peer, never the spoofable left part.
        (
            &["198.51.100.1, bogus, 10.2.2.2"],
            "10.1.1.1",
            "10.1.1.1",
            Source::PeerMalformedXff,
        ),
        // ... but one left of the answer is never reached.
        (
            &["bogus, 198.51.100.1, 10.2.2.2"],
            "10.1.1.1",
            "198.51.100.1",
            xff_at(2),
        ),
    ];
    for (xff, peer, want, source) in cases {
        let got = eff(xff, peer, &t);
        assert_eq!(
            (got.client, got.source),
            (ip(want), *source),
            "XFF={xff:?} peer={peer}"
        );
    }
}

#[test]
fn appended_value() {
    let cases: &[(&[&str], &str, &str)] = &[
        (&[], "192.0.2.5", "192.0.2.5"),
        (&[""], "192.0.2.5", "192.0.2.5"),
        (&["  10.0.0.1  "], "192.0.2.5", "10.0.0.1, 192.0.2.5"),
        (&["a", "b"], "2001:db8::5", "a, b, 2001:db8::5"),
        (&["10.0.0.1"], "::ffff:192.0.2.5", "10.0.0.1, 192.0.2.5"),
    ];
    for (xff, peer, want) in cases {
        let lines: Vec<&[u8]> = xff.iter().map(|s| s.as_bytes()).collect();
        assert_eq!(
            String::from_utf8(appended_xff(&lines, ip(peer))).unwrap(),
            *want
        );
    }
}

#[test]
fn huge_hop_counts_and_long_lists_are_safe() {
    let long = vec!["10.0.0.1"; 1000].join(", ");
    assert_eq!(eff(&[&long], P, &XffTrust::Hops(u32::MAX)).client, ip(P));
    assert_eq!(
        eff(&[&long], P, &XffTrust::Hops(1000)).source,
        Source::Xff { from_right: 1000 }
    );
    let all = cidrs(&["0.0.0.0/0"]);
    assert_eq!(
        eff(&[&long], P, &all).source,
        Source::Xff { from_right: 1000 }
    );
}
