use super::*;
use crate::testutil::{Edit, Rng};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn lim() -> Limits {
    Limits::default()
}

fn header(buf: &[u8]) -> Header {
    match parse(buf, &lim()) {
        Parse::Header(h) => h,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
    }
}

fn err(buf: &[u8]) -> Error {
    match parse(buf, &lim()) {
        Parse::Error(e) => e,
        other => panic!("{:?}: expected an error, got {other:?}", buf),
    }
}

fn pairs() -> Vec<(SocketAddr, SocketAddr)> {
    vec![
        (sa("192.0.2.7:40000"), sa("10.1.2.3:443")),
        (sa("255.255.255.255:65535"), sa("255.255.255.255:65535")),
        (sa("0.0.0.0:0"), sa("1.2.3.4:1")),
        (sa("[2001:db8::7]:40000"), sa("[fd00::1]:8080")),
        (
            sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
            sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
        ),
        (sa("[::1]:1"), sa("[::]:0")),
    ]
}

#[test]
fn round_trip_both_versions_v4_and_v6() {
    for (src, dst) in pairs() {
        for (version, enc) in [
            (Version::V1, encode_v1(src, dst)),
            (Version::V2, encode_v2(src, dst)),
        ] {
            let h = header(&enc);
            assert_eq!(h.version, version);
            assert_eq!(h.command, Command::Proxy);
            assert_eq!(h.transport, Transport::Stream);
            assert_eq!(
                h.family,
                if src.is_ipv4() {
                    Family::Inet
                } else {
                    Family::Inet6
                }
            );
            assert_eq!(h.addrs, Some(Endpoints { src, dst }));
            assert_eq!(h.client(), Some(src));
            assert_eq!(h.header_len, enc.len());
            assert!(h.tlvs.is_empty());
        }
    }
}

#[test]
fn longest_v1_headers_fit_the_107_byte_limit() {
    // Spec section 2.1: TCP6 worst case is 104 bytes, TCP4 56, and the 107-byte bound comes
    // from "PROXY UNKNOWN" followed by the same optional fields.
    let max6 = sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535");
    let enc = encode_v1(max6, max6);
    assert_eq!(enc.len(), 104);
    assert_eq!(header(&enc).header_len, 104);
    let max4 = sa("255.255.255.255:65535");
    assert_eq!(encode_v1(max4, max4).len(), 56);
    let f = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
    let unknown = format!("PROXY UNKNOWN {f} {f} 65535 65535\r\n");
    assert_eq!(unknown.len(), V1_MAX_LEN);
    let h = header(unknown.as_bytes());
    assert_eq!((h.header_len, h.addrs), (107, None));
}

#[test]
fn v1_exact_bytes() {
    assert_eq!(
        encode_v1(sa("192.0.2.7:40000"), sa("10.1.2.3:443")),
        b"PROXY TCP4 192.0.2.7 10.1.2.3 40000 443\r\n"
    );
    assert_eq!(
        encode_v1(sa("[2001:db8::7]:1"), sa("[fd00::1]:2")),
        b"PROXY TCP6 2001:db8::7 fd00::1 1 2\r\n"
    );
    assert_eq!(encode_v1_unknown(), b"PROXY UNKNOWN\r\n");
}

#[test]
fn v2_exact_bytes() {
    let enc = encode_v2(sa("192.0.2.7:40000"), sa("10.1.2.3:443"));
    let mut want = V2_SIGNATURE.to_vec();
    want.extend_from_slice(&[0x21, 0x11, 0, 12, 192, 0, 2, 7, 10, 1, 2, 3]);
    want.extend_from_slice(&40000u16.to_be_bytes());
    want.extend_from_slice(&443u16.to_be_bytes());
    assert_eq!(enc, want);
    assert_eq!(
        encode_v2_local(),
        b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00".to_vec()
    );
    let enc6 = encode_v2(sa("[::1]:1"), sa("[::2]:2"));
    assert_eq!(&enc6[12..16], &[0x21, 0x21, 0, 36]);
    assert_eq!(enc6.len(), 16 + 36);
}

#[test]
fn encoder_puts_mixed_families_into_one() {
    // IPv4 client behind an IPv6 frontend: both as IPv6 (v4 mapped).
    let src = sa("192.0.2.7:1000");
    let dst = sa("[2001:db8::1]:80");
    let mapped = sa("[::ffff:192.0.2.7]:1000");
    for enc in [encode_v1(src, dst), encode_v2(src, dst)] {
        let h = header(&enc);
        assert_eq!(h.family, Family::Inet6);
        assert_eq!(h.addrs, Some(Endpoints { src: mapped, dst }));
    }
    // IPv4-mapped on both sides: plain IPv4.
    let h = header(&encode_v1(mapped, sa("[::ffff:10.0.0.1]:80")));
    assert_eq!(h.family, Family::Inet);
    assert_eq!(h.client(), Some(src));
}

#[test]
fn app_bytes_after_the_header_are_not_consumed() {
    for (src, dst) in pairs() {
        for enc in [encode_v1(src, dst), encode_v2(src, dst)] {
            let mut buf = enc.clone();
            buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n\r\n\r\n\0\r\nQUIT\n");
            let h = header(&buf);
            assert_eq!(h.header_len, enc.len());
            assert_eq!(
                &buf[h.header_len..],
                b"GET / HTTP/1.1\r\n\r\n\r\n\r\n\0\r\nQUIT\n"
            );
        }
    }
}

fn valid_headers() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = pairs()
        .into_iter()
        .flat_map(|(s, d)| [encode_v1(s, d), encode_v2(s, d)])
        .collect();
    v.push(encode_v1_unknown());
    v.push(b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n".to_vec());
    v.push(encode_v2_local());
    v.push(with_tlvs(
        encode_v2(sa("1.2.3.4:5"), sa("6.7.8.9:10")),
        &[(0x01, b"h2"), (0x04, &[0, 0, 0, 0]), (0x20, &[])],
    ));
    v
}

/// Appends TLVs to an encoded v2 header and fixes its length field.
fn with_tlvs(mut enc: Vec<u8>, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    for (kind, value) in tlvs {
        enc.push(*kind);
        enc.extend_from_slice(&(value.len() as u16).to_be_bytes());
        enc.extend_from_slice(value);
    }
    let len = (enc.len() - V2_FIXED_LEN) as u16;
    enc[14..16].copy_from_slice(&len.to_be_bytes());
    enc
}

#[test]
fn every_truncation_of_a_valid_header_needs_more() {
    for enc in valid_headers() {
        for cut in 0..enc.len() {
            match parse(&enc[..cut], &lim()) {
                Parse::NeedMore { at_least } => {
                    assert!(at_least > cut, "{enc:?} cut {cut}: at_least {at_least}");
                    assert!(
                        at_least <= enc.len(),
                        "{enc:?} cut {cut}: over-asks {at_least}"
                    );
                }
                other => panic!("{enc:?} cut at {cut}: {other:?}"),
            }
        }
    }
}

#[test]
fn byte_at_a_time_feeding() {
    for enc in valid_headers() {
        let mut stream = enc.clone();
        stream.extend_from_slice(b"app");
        let mut buf = Vec::new();
        let mut got = None;
        for &b in &stream {
            buf.push(b);
            match parse(&buf, &lim()) {
                Parse::NeedMore { .. } => assert!(buf.len() < enc.len()),
                Parse::Header(h) => {
                    got = Some(h);
                    break;
                }
                Parse::Error(e) => panic!("{enc:?}: {e} at {}", buf.len()),
            }
        }
        let h = got.expect("header completes");
        assert_eq!(h.header_len, enc.len());
        assert_eq!(buf.len(), enc.len(), "decided before reading app bytes");
        assert_eq!(&stream[h.header_len..], b"app");
    }
}

#[test]
fn v1_unknown_ignores_the_rest() {
    for line in [
        &b"PROXY UNKNOWN\r\n"[..],
        b"PROXY UNKNOWN 1.2.3.4 whatever at all\r\n",
    ] {
        let h = header(line);
        assert_eq!(h.addrs, None);
        assert_eq!(h.family, Family::Unspec);
        assert_eq!(h.header_len, line.len());
    }
}

#[test]
fn v1_errors() {
    let cases: &[(&[u8], Error)] = &[
        (b"GET / HTTP/1.1\r\n", Error::NotProxy),
        (b"PROXy TCP4", Error::NotProxy),
        (b"\x16\x03\x01", Error::NotProxy), // TLS ClientHello
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", Error::V1BadLineEnd),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", Error::V1BadLineEnd),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", Error::V1BadLineEnd),
        (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", Error::V1BadChar),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\0", Error::V1BadChar),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xc3\xa9", Error::V1BadChar),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", Error::V1BadProtocol),
        (b"PROXY tcp4 ", Error::V1BadProtocol),
        (b"PROXY UDP4", Error::V1BadProtocol),
        (b"PROXY UNKNOWNX\r\n", Error::V1BadProtocol),
        (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", Error::V1BadProtocol),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", Error::V1BadFields),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", Error::V1BadFields),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", Error::V1BadFields),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", Error::V1BadFields),
        (b"PROXY TCP4\r\n", Error::V1BadFields),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ", Error::V1BadFields),
        // Mixed families and invalid addresses.
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", Error::V1BadAddress),
        (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", Error::V1BadAddress),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", Error::V1BadAddress),
        (b"PROXY TCP6 ::1 1.2.3.4 1 2\r\n", Error::V1BadAddress),
        (b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", Error::V1BadAddress),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", Error::V1BadAddress),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", Error::V1BadAddress),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", Error::V1BadAddress),
        (b"PROXY TCP6 [::1] ::1 1 2\r\n", Error::V1BadAddress),
        (b"PROXY TCP4 1.2.3.4x", Error::V1BadAddress),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8.9 ", Error::V1BadAddress),
        (b"PROXY TCP4 1234567890123456", Error::V1BadAddress),
        (b"PROXY TCP6 g", Error::V1BadAddress),
        // Ports.
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", Error::V1BadPort),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", Error::V1BadPort),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", Error::V1BadPort),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 00 2\r\n", Error::V1BadPort),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n", Error::V1BadPort),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", Error::V1BadPort),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 0x50\r\n", Error::V1BadPort),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 123456\r\n", Error::V1BadPort),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 08", Error::V1BadPort),
    ];
    for (buf, want) in cases {
        assert_eq!(
            parse(buf, &lim()),
            Parse::Error(*want),
            "{}",
            String::from_utf8_lossy(buf)
        );
    }
}

#[test]
fn v1_oversize_is_an_error_not_a_wait() {
    // 107 bytes of a plausible prefix with no CRLF: decided at the limit.
    let mut buf = b"PROXY UNKNOWN ".to_vec();
    buf.resize(V1_MAX_LEN, b'a');
    assert_eq!(err(&buf), Error::V1TooLong);
    assert!(matches!(
        parse(&buf[..106], &lim()),
        Parse::NeedMore { at_least: 107 }
    ));
    // CRLF that would end at byte 108.
    buf.truncate(106);
    buf.extend_from_slice(b"\r\n");
    assert_eq!(err(&buf), Error::V1TooLong);
    // ... and at 107 it is fine.
    let mut ok = b"PROXY UNKNOWN ".to_vec();
    ok.resize(105, b'a');
    ok.extend_from_slice(b"\r\n");
    assert_eq!(header(&ok).header_len, 107);
}

#[test]
fn v1_partial_tokens_fail_fast() {
    // Garbage is rejected as soon as the token that shows it is complete, not at 107 bytes.
    assert_eq!(err(b"PROXY GET "), Error::V1BadProtocol);
    assert_eq!(err(b"PROXY TCP4 1.2.3.4.5 "), Error::V1BadAddress);
    assert_eq!(err(b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 "), Error::V1BadPort);
    assert_eq!(err(b"PROXY TCP4 1.2.3.4 5.6.7.8 7 8 "), Error::V1BadFields);
    // A plausible prefix keeps waiting.
    assert!(matches!(
        parse(b"PROXY TCP6 2001:db8:", &lim()),
        Parse::NeedMore { .. }
    ));
}

#[test]
fn v2_local_uses_no_addresses_and_ignores_the_block() {
    let h = header(&encode_v2_local());
    assert_eq!(h.command, Command::Local);
    assert_eq!(h.addrs, None);
    assert_eq!(h.client(), None);
    assert_eq!(h.header_len, 16);
    // LOCAL with an address block (some balancers send their own addresses): still no addrs.
    let mut enc = encode_v2(sa("1.2.3.4:5"), sa("6.7.8.9:10"));
    enc[12] = 0x20;
    let h = header(&enc);
    assert_eq!(
        (h.command, h.addrs, h.header_len),
        (Command::Local, None, 28)
    );
    // LOCAL with a short block for its family: the block is discarded, not parsed.
    let mut enc = encode_v2_local();
    enc[13] = 0x21;
    enc[15] = 3;
    enc.extend_from_slice(&[1, 2, 3]);
    assert_eq!(header(&enc).header_len, 19);
}

#[test]
fn v2_unspec_and_unix_proxy_carry_no_address() {
    let mut enc = V2_SIGNATURE.to_vec();
    enc.extend_from_slice(&[0x21, 0x00, 0, 0]);
    let h = header(&enc);
    assert_eq!((h.family, h.addrs), (Family::Unspec, None));

    let mut enc = V2_SIGNATURE.to_vec();
    enc.extend_from_slice(&[0x21, 0x31, 0, 216]);
    enc.extend_from_slice(&[b'/'; 216]);
    let h = header(&enc);
    assert_eq!(
        (h.family, h.transport, h.addrs, h.header_len),
        (Family::Unix, Transport::Stream, None, 232)
    );
}

#[test]
fn v2_tlvs_are_skipped_and_listed() {
    let base = encode_v2(sa("[2001:db8::9]:4242"), sa("[2001:db8::1]:443"));
    let enc = with_tlvs(
        base.clone(),
        &[(0x01, b"h2"), (0x05, b"unique"), (0x04, &[1, 2, 3, 4])],
    );
    let mut buf = enc.clone();
    buf.extend_from_slice(b"\x01\x00\x05app"); // looks like a TLV: must not be read
    let h = header(&buf);
    assert_eq!(h.header_len, enc.len());
    assert_eq!(h.client(), Some(sa("[2001:db8::9]:4242")));
    assert_eq!(h.tlvs, base.len()..enc.len());
    let got: Vec<_> = tlvs(&buf[h.tlvs.clone()]).collect();
    assert_eq!(
        got,
        vec![
            Ok(Tlv {
                kind: 1,
                value: b"h2"
            }),
            Ok(Tlv {
                kind: 5,
                value: b"unique"
            }),
            Ok(Tlv {
                kind: 4,
                value: &[1, 2, 3, 4]
            }),
        ]
    );
}

#[test]
fn v2_errors() {
    let good = encode_v2(sa("1.2.3.4:5"), sa("6.7.8.9:10"));
    let with = |i: usize, b: u8| {
        let mut e = good.clone();
        e[i] = b;
        e
    };
    assert_eq!(err(&with(12, 0x11)), Error::V2BadVersion);
    assert_eq!(err(&with(12, 0x31)), Error::V2BadVersion);
    assert_eq!(err(&with(12, 0x22)), Error::V2BadCommand);
    assert_eq!(err(&with(12, 0x2f)), Error::V2BadCommand);
    for fam in [0x01, 0x10, 0x13, 0x20, 0x41, 0xff] {
        assert_eq!(err(&with(13, fam)), Error::V2BadFamily(fam));
    }
    assert_eq!(err(&with(13, 0x12)), Error::V2NotStream); // UDP over IPv4
                                                          // Family INET6 with a 12-byte block.
    assert_eq!(err(&with(13, 0x21)), Error::V2ShortAddress);
    // A signature byte off.
    assert_eq!(err(&with(11, b'x')), Error::NotProxy);
    assert_eq!(
        err(&good[..5].iter().chain(b"x").copied().collect::<Vec<_>>()),
        Error::NotProxy
    );
    // Decided on the fixed part alone, before the block arrives.
    assert_eq!(err(&with(12, 0x11)[..13]), Error::V2BadVersion);
    assert_eq!(err(&with(13, 0x55)[..14]), Error::V2BadFamily(0x55));
}

#[test]
fn v2_length_bound() {
    let base = encode_v2(sa("1.2.3.4:5"), sa("6.7.8.9:10"));
    let mut big = base.clone();
    big[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    // Refused from the 16 fixed bytes, without waiting for 64 KiB.
    assert_eq!(
        err(&big),
        Error::V2TooLong {
            len: 16 + 65535,
            max: DEFAULT_V2_MAX_LEN
        }
    );
    let tight = Limits {
        v2_max_len: 100,
        ..lim()
    };
    let ok = with_tlvs(base.clone(), &[(0xe0, &[0u8; 69])]); // 28 + 72 = 100
    assert!(matches!(parse(&ok, &tight), Parse::Header(h) if h.header_len == 100));
    let over = with_tlvs(base.clone(), &[(0xe0, &[0u8; 70])]);
    assert_eq!(
        parse(&over, &tight),
        Parse::Error(Error::V2TooLong { len: 101, max: 100 })
    );
    // A limit below a plain IPv6 header is raised to it.
    let tiny = Limits {
        v2_max_len: 0,
        ..lim()
    };
    let v6 = encode_v2(sa("[::1]:1"), sa("[::2]:2"));
    assert!(matches!(parse(&v6, &tiny), Parse::Header(_)));
}

#[test]
fn v2_tlv_overrun_is_an_error() {
    let base = encode_v2(sa("1.2.3.4:5"), sa("6.7.8.9:10"));
    // A TLV claiming 10 bytes with 2 present, inside a header whose length covers only those.
    let mut enc = base.clone();
    enc.extend_from_slice(&[0x01, 0x00, 0x0a, b'h', b'2']);
    let len = (enc.len() - 16) as u16;
    enc[14..16].copy_from_slice(&len.to_be_bytes());
    let mut buf = enc.clone();
    buf.extend_from_slice(&[0u8; 32]); // app bytes that would "complete" it: not read
    assert_eq!(err(&buf), Error::V2BadTlv);
    // A trailing 1 or 2 bytes (not a whole TLV head).
    for tail in [&[0x01][..], &[0x01, 0x00]] {
        let mut enc = base.clone();
        enc.extend_from_slice(tail);
        let len = (enc.len() - 16) as u16;
        enc[14..16].copy_from_slice(&len.to_be_bytes());
        assert_eq!(err(&enc), Error::V2BadTlv);
    }
    assert_eq!(
        tlvs(&[1, 0, 5, 1]).collect::<Vec<_>>(),
        vec![Err(Error::V2BadTlv)]
    );
}

#[test]
fn versions_can_be_refused_per_port() {
    let only2 = Limits {
        accept_v1: false,
        ..lim()
    };
    let only1 = Limits {
        accept_v2: false,
        ..lim()
    };
    let (s, d) = (sa("1.2.3.4:5"), sa("6.7.8.9:10"));
    assert_eq!(
        parse(&encode_v1(s, d), &only2),
        Parse::Error(Error::VersionNotAllowed(Version::V1))
    );
    assert_eq!(
        parse(&encode_v2(s, d), &only1),
        Parse::Error(Error::VersionNotAllowed(Version::V2))
    );
    assert!(matches!(parse(&encode_v2(s, d), &only2), Parse::Header(_)));
}

#[test]
fn error_labels_are_distinct() {
    let all = [
        Error::NotProxy,
        Error::VersionNotAllowed(Version::V1),
        Error::V1TooLong,
        Error::V1BadLineEnd,
        Error::V1BadChar,
        Error::V1BadProtocol,
        Error::V1BadFields,
        Error::V1BadAddress,
        Error::V1BadPort,
        Error::V2BadVersion,
        Error::V2BadCommand,
        Error::V2BadFamily(0),
        Error::V2NotStream,
        Error::V2TooLong { len: 0, max: 0 },
        Error::V2ShortAddress,
        Error::V2BadTlv,
    ];
    let labels: std::collections::HashSet<_> = all.iter().map(Error::label).collect();
    assert_eq!(labels.len(), all.len());
}

/// A random v2 length field.
fn v2_random_length(rng: &mut Rng, buf: &mut [u8]) {
    if buf.len() >= 16 && buf[..12] == V2_SIGNATURE {
        let l = (rng.next() as u16).to_be_bytes();
        buf[14..16].copy_from_slice(&l);
    }
}

#[test]
fn fuzz_mutated_headers_never_panic_and_consume_within_bounds() {
    let seeds = valid_headers();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let limits = Limits {
        v2_max_len: 512,
        ..lim()
    };
    let alphabet = b"PROXY TCP46UNKNOWN0123456789abcdef.:\r\n \x00\xff\x21\x11";
    let (mut headers, mut errors, mut more) = (0u32, 0u32, 0u32);
    let edits = [
        Edit::SetAny,
        Edit::Set,
        Edit::Truncate,
        Edit::Insert,
        Edit::Append(300),
        Edit::Custom(v2_random_length),
    ];
    for _ in 0..100_000 {
        let buf = rng.mutant(&seeds, &edits, 4, alphabet);
        match parse(&buf, &limits) {
            Parse::Header(h) => {
                headers += 1;
                assert!(h.header_len <= buf.len());
                let bound = match h.version {
                    Version::V1 => V1_MAX_LEN,
                    Version::V2 => limits.v2_max_len,
                };
                assert!(h.header_len <= bound, "{h:?}");
                assert!(h.tlvs.start >= 16.min(h.header_len) && h.tlvs.end == h.header_len);
                // The answer depends on the header bytes only.
                assert_eq!(parse(&buf[..h.header_len], &limits), Parse::Header(h));
            }
            Parse::NeedMore { at_least } => {
                more += 1;
                assert!(at_least > buf.len());
                assert!(at_least <= V1_MAX_LEN.max(limits.v2_max_len));
            }
            Parse::Error(_) => errors += 1,
        }
    }
    // The mutations reach all three outcomes (else the loop proves little).
    assert!(
        headers > 1000 && errors > 1000 && more > 1000,
        "{headers} {errors} {more}"
    );
}
