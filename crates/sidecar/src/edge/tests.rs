use super::*;
use crate::client::PodAddrs;
use crate::http1::{HeadParse, HeadReader, Limits};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn head(buf: &[u8]) -> RequestHead {
    match HeadReader::new(Limits::default()).feed(buf) {
        HeadParse::Head(h) => h,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
    }
}

fn run(buf: &[u8], peer: &str, trust: &XffTrust) -> EdgeRewrite {
    let pod = PodAddrs::new(vec![ip("10.1.0.5")], vec!["10.1.0.255".parse().unwrap()]);
    let ck = ClientCheck {
        pod: &pod,
        local: None,
    };
    rewrite(buf, &head(buf), ip(peer), "peer", trust, &ck)
}

fn text(r: &EdgeRewrite) -> String {
    String::from_utf8(r.head.clone()).unwrap()
}

#[test]
fn forwarding_headers_are_replaced_and_the_rest_kept() {
    let buf: &[u8] = b"GET /p HTTP/1.1\r\nHost: app\r\nX-Forwarded-For: 203.0.113.128, 203.0.113.10\r\nX-Envoy-External-Address: 6.6.6.6\r\nAccept: */*\r\nx-forwarded-for: 203.0.113.1\r\nX-Other: keep\r\n\r\n";
    let r = run(buf, "192.0.2.5", &XffTrust::Hops(2));
    assert_eq!(r.decided.client, ip("203.0.113.10"));
    assert_eq!(
        text(&r),
        "GET /p HTTP/1.1\r\nHost: app\r\nAccept: */*\r\nX-Other: keep\r\n\
         x-forwarded-for: 203.0.113.128, 203.0.113.10, 203.0.113.1, 192.0.2.5\r\n\
         x-envoy-external-address: 203.0.113.10\r\nx-forwarded-proto: http\r\n\r\n"
    );
    // What we send is itself a valid head with exactly one of each.
    let again = head(&r.head);
    for name in PROTECTED {
        let n = again.values(&r.head, name).count();
        assert_eq!(n, usize::from(name != INTERNAL), "{name}");
    }
}

#[test]
fn no_request_is_internal() {
    // A pod-to-pod request: no XFF, private peer. Envoy without `internal_address_config`
    // (the default since 1.33) counts it as external: the client's own x-envoy-internal and
    // x-envoy-external-address never pass, ours name the peer.
    let buf: &[u8] = b"POST / HTTP/1.1\r\nHost: a\r\nx-envoy-external-address: 1.1.1.1\r\nX-Envoy-Internal: true\r\nContent-Length: 2\r\n\r\n";
    let r = run(buf, "10.0.0.7", &XffTrust::Hops(1));
    assert_eq!(r.decided.client, ip("10.0.0.7"));
    assert_eq!(
        text(&r),
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nx-forwarded-for: 10.0.0.7\r\n\
         x-envoy-external-address: 10.0.0.7\r\nx-forwarded-proto: http\r\n\r\n"
    );
    // HTTP/1.0 and leading empty lines: version kept, empty lines dropped; IPv6 peer.
    let r = run(
        b"\r\nGET / HTTP/1.0\r\n\r\n",
        "2001:db8::1",
        &XffTrust::Hops(0),
    );
    assert_eq!(
        text(&r),
        "GET / HTTP/1.0\r\nx-forwarded-for: 2001:db8::1\r\nx-envoy-external-address: 2001:db8::1\r\n\
         x-forwarded-proto: http\r\n\r\n"
    );
}

#[test]
fn underscore_spellings_of_protected_names_are_dropped() {
    let buf: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\nX_Envoy_External_Address: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.7\r\nx-forwarded_for: 6.6.6.8\r\nX_ENVOY_INTERNAL: true\r\nx_forwarded_proto: https\r\nX_Other_Thing: kept\r\nX-Forwarded-Forx: kept\r\n\r\n";
    let r = run(buf, "192.0.2.5", &XffTrust::Hops(0));
    let t = text(&r);
    assert!(!t.contains("6.6.6."), "{t}");
    assert!(!t.to_ascii_lowercase().contains("internal"), "{t}");
    assert!(t.contains("X_Other_Thing: kept\r\n") && t.contains("X-Forwarded-Forx: kept\r\n"));
    assert!(t.contains("x-forwarded-for: 192.0.2.5\r\n"), "{t}");
    assert!(t.contains("x-forwarded-proto: http\r\n"), "{t}");
    // Underscore spellings are not read as XFF either (with one trusted hop, the peer stays).
    assert_eq!(
        run(buf, "192.0.2.5", &XffTrust::Hops(1)).decided.client,
        ip("192.0.2.5")
    );
    for name in [
        "x_forwarded_for",
        "X-ENVOY_EXTERNAL-ADDRESS",
        "x-forwarded-proto",
    ] {
        assert!(is_protected(name.as_bytes()), "{name}");
    }
    for name in [
        "x_forwarded_fo",
        "x-forwarded-forr",
        "xx-envoy-internal",
        "x.forwarded.for",
    ] {
        assert!(!is_protected(name.as_bytes()), "{name}");
    }
}

#[test]
fn forwarded_proto_is_believed_only_from_a_trusted_downstream() {
    let one = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Proto: HTTPS\r\n\r\n";
    let two = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Proto: https\r\n\r\n";
    let odd = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Proto: ftp\r\n\r\n";
    let cidrs = XffTrust::Cidrs(vec!["192.0.2.0/24".parse().unwrap()]);
    for (buf, peer, trust, want) in [
        (&one[..], "192.0.2.5", XffTrust::Hops(0), "http"),
        (&one[..], "192.0.2.5", XffTrust::Hops(1), "https"),
        (&two[..], "192.0.2.5", XffTrust::Hops(1), "http"),
        (&odd[..], "192.0.2.5", XffTrust::Hops(1), "http"),
        (&one[..], "192.0.2.5", cidrs.clone(), "https"),
        (&one[..], "198.51.100.5", cidrs.clone(), "http"),
    ] {
        let t = text(&run(buf, peer, &trust));
        let line = format!("x-forwarded-proto: {want}\r\n");
        assert!(t.contains(&line), "{trust:?} {peer}: {t}");
        assert_eq!(t.matches("-proto").count(), 1, "{t}");
    }
}

#[test]
fn h2c_upgrade_is_stripped_and_other_upgrades_kept() {
    let buf: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings, keep-alive\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n";
    assert!(head(buf).upgrade);
    let r = run(buf, "192.0.2.5", &XffTrust::Hops(0));
    assert!(!r.upgrade);
    let t = text(&r);
    assert!(t.contains("connection: keep-alive\r\n"), "{t}");
    let lower = t.to_ascii_lowercase();
    assert!(
        !lower.contains("upgrade") && !lower.contains("http2-settings"),
        "{t}"
    );
    // Only h2c tokens: the Connection field goes entirely.
    let buf: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: H2C\r\nHTTP2-Settings: AAMA\r\n\r\n";
    let r = run(buf, "192.0.2.5", &XffTrust::Hops(0));
    assert!(!r.upgrade && !text(&r).to_ascii_lowercase().contains("connection"));
    // A lone `Upgrade: h2c` (no Connection token) goes too.
    let buf: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\n\r\n";
    let r = run(buf, "192.0.2.5", &XffTrust::Hops(0));
    assert!(!text(&r).to_ascii_lowercase().contains("upgrade"));
    // A WebSocket upgrade passes untouched.
    let ws: &[u8] =
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    let r = run(ws, "192.0.2.5", &XffTrust::Hops(0));
    assert!(r.upgrade);
    assert!(text(&r).contains("Connection: Upgrade\r\nUpgrade: websocket\r\n"));
}

/// Envoy's documented X-Forwarded-For examples (HTTP connection manager, "x-forwarded-for",
/// Examples 1-6), row by row. Envoy's internal-proxy rows (`use_remote_address: false` with N
/// trusted hops) do not count their own peer, so they trust the same address as our edge with
/// N + 1 hops: those rows run with N + 1. The one deliberate difference is the internal flag of
/// Example 6: Envoy's documentation predates 1.33, since when no address is internal without
/// `internal_address_config`; the sidecar never marks a request internal (pitfall 66).
#[test]
fn envoy_documented_xff_examples() {
    struct Row {
        example: u8,
        use_remote_address: bool,
        num_trusted_hops: u32,
        peer: &'static str,
        xff: Option<&'static str>,
        trusted_client: &'static str,
        envoy_internal: bool,
        /// Envoy's documented resulting XFF (edge rows only: an internal Envoy does not append).
        envoy_xff: Option<&'static str>,
    }
    let rows = [
        Row {
            example: 1,
            use_remote_address: true,
            num_trusted_hops: 0,
            peer: "192.0.2.5",
            xff: Some("203.0.113.128, 203.0.113.10, 203.0.113.1"),
            trusted_client: "192.0.2.5",
            envoy_internal: false,
            envoy_xff: Some("203.0.113.128, 203.0.113.10, 203.0.113.1, 192.0.2.5"),
        },
        Row {
            example: 2,
            use_remote_address: false,
            num_trusted_hops: 0,
            peer: "10.11.12.13",
            xff: Some("203.0.113.128, 203.0.113.10, 203.0.113.1, 192.0.2.5"),
            trusted_client: "192.0.2.5",
            envoy_internal: false,
            envoy_xff: None,
        },
        Row {
            example: 3,
            use_remote_address: true,
            num_trusted_hops: 2,
            peer: "192.0.2.5",
            xff: Some("203.0.113.128, 203.0.113.10, 203.0.113.1"),
            trusted_client: "203.0.113.10",
            envoy_internal: false,
            envoy_xff: Some("203.0.113.128, 203.0.113.10, 203.0.113.1, 192.0.2.5"),
        },
        Row {
            example: 4,
            use_remote_address: false,
            num_trusted_hops: 2,
            peer: "10.11.12.13",
            xff: Some("203.0.113.128, 203.0.113.10, 203.0.113.1, 192.0.2.5"),
            trusted_client: "203.0.113.10",
            envoy_internal: false,
            envoy_xff: None,
        },
        Row {
            example: 5,
            use_remote_address: false,
            num_trusted_hops: 0,
            peer: "10.20.30.40",
            xff: None,
            trusted_client: "10.20.30.40",
            envoy_internal: false,
            envoy_xff: None,
        },
        Row {
            example: 6,
            use_remote_address: false,
            num_trusted_hops: 0,
            peer: "10.20.30.50",
            xff: Some("10.20.30.40"),
            trusted_client: "10.20.30.40",
            envoy_internal: true,
            envoy_xff: None,
        },
    ];
    for r in rows {
        let hops = r.num_trusted_hops + u32::from(!r.use_remote_address);
        let mut req = b"GET / HTTP/1.1\r\nHost: a\r\nX-Envoy-Internal: true\r\n".to_vec();
        if let Some(x) = r.xff {
            req.extend_from_slice(format!("X-Forwarded-For: {x}\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        let out = run(&req, r.peer, &XffTrust::Hops(hops));
        let ex = r.example;
        assert_eq!(out.decided.client, ip(r.trusted_client), "example {ex}");
        let sent = head(&out.head);
        let internal = sent.values(&out.head, INTERNAL).next().is_some();
        let ours_differs = ex == 6;
        assert_eq!(internal, r.envoy_internal && !ours_differs, "example {ex}");
        let ext: Vec<&[u8]> = sent.values(&out.head, EXTERNAL_ADDRESS).collect();
        assert_eq!(ext, vec![r.trusted_client.as_bytes()], "example {ex}");
        if let Some(want) = r.envoy_xff {
            let got: Vec<&[u8]> = sent.values(&out.head, XFF).collect();
            assert_eq!(got, vec![want.as_bytes()], "example {ex}");
        }
    }
}

#[test]
fn a_refused_xff_client_falls_back_to_the_peer_everywhere() {
    for claimed in [
        "127.0.0.1",
        "0.0.0.0",
        "10.1.0.5",
        "10.1.0.255",
        "240.0.0.1",
        "224.0.0.9",
    ] {
        let buf = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: {claimed}\r\n\r\n");
        let r = run(buf.as_bytes(), "192.0.2.5", &XffTrust::Hops(1));
        assert_eq!(r.decided.client, ip("192.0.2.5"), "{claimed}");
        assert_eq!(r.decided.source, "peer_refused_xff");
        assert!(r.decided.refused.is_some());
        let t = text(&r);
        assert!(t.contains("x-envoy-external-address: 192.0.2.5\r\n"), "{t}");
    }
}
