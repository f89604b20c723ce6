use super::*;
use crate::testutil::{Edit, Rng};

fn lim() -> Limits {
    Limits::default()
}

fn head(buf: &[u8]) -> RequestHead {
    match HeadReader::new(lim()).feed(buf) {
        HeadParse::Head(h) => h,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
    }
}

fn head_err(buf: &[u8]) -> HeadError {
    match HeadReader::new(lim()).feed(buf) {
        HeadParse::Error(e) => e,
        other => panic!(
            "{:?}: expected an error, got {other:?}",
            String::from_utf8_lossy(buf)
        ),
    }
}

const GET: &[u8] = b"GET /a?b=c HTTP/1.1\r\nHost: app\r\nAccept: */*\r\n\r\n";

#[test]
fn simple_get() {
    let mut buf = GET.to_vec();
    buf.extend_from_slice(b"NEXT");
    let h = head(&buf);
    assert_eq!(h.method(&buf), b"GET");
    assert_eq!(h.target(&buf), b"/a?b=c");
    assert_eq!(h.version, Version::Http11);
    assert_eq!(h.head_len, GET.len());
    assert_eq!(h.framing, Framing::None);
    assert!(h.keep_alive && !h.upgrade && !h.connect && !h.expect_continue);
    assert_eq!(h.fields.len(), 2);
    assert_eq!(
        h.values(&buf, "ACCEPT").collect::<Vec<_>>(),
        vec![&b"*/*"[..]]
    );
}

#[test]
fn byte_at_a_time_and_every_truncation() {
    let req =
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n";
    let mut r = HeadReader::new(lim());
    for n in 0..req.len() {
        assert_eq!(r.feed(&req[..n]), HeadParse::NeedMore, "at {n}");
        // A fresh reader agrees (the scan position is only an optimisation).
        assert_eq!(
            HeadReader::new(lim()).feed(&req[..n]),
            HeadParse::NeedMore,
            "at {n}"
        );
    }
    let HeadParse::Head(h) = r.feed(req) else {
        panic!("complete")
    };
    assert_eq!(h.head_len, req.len());
    assert_eq!(h.framing, Framing::Length(3));
}

#[test]
fn leading_empty_lines_are_skipped() {
    let buf = b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let h = head(buf);
    assert_eq!(h.start, 4);
    assert_eq!(h.method(buf), b"GET");
    assert_eq!(h.head_len, buf.len());
    assert_eq!(HeadReader::new(lim()).feed(b"\r\n\r"), HeadParse::NeedMore);
}

#[test]
fn framing_and_flags() {
    let cases: &[(&[u8], Framing, bool, bool, bool)] = &[
        // (head, framing, keep_alive, expect_continue, upgrade)
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n", Framing::Length(10), true, false, false),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", Framing::None, true, false, false),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\ncontent-length: 5\r\n\r\n", Framing::Length(5), true, false, false),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", Framing::Chunked, true, false, false),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, CHUNKED\r\n\r\n", Framing::Chunked, true, false, false),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", Framing::Chunked, true, false, false),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", Framing::None, false, false, false),
        (b"GET / HTTP/1.0\r\n\r\n", Framing::None, false, false, false),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", Framing::None, true, false, false),
        (b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 4\r\n\r\n", Framing::Length(4), true, true, false),
        // HTTP/1.0 expectations are ignored.
        (b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n", Framing::Length(4), false, false, false),
        (b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n", Framing::None, true, false, true),
        // Upgrade without the Connection token is not an upgrade (RFC 9110 7.8).
        (b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n", Framing::None, true, false, false),
        (b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n", Framing::None, true, false, false),
    ];
    for (buf, framing, ka, exp, up) in cases {
        let h = head(buf);
        assert_eq!(
            (h.framing, h.keep_alive, h.expect_continue, h.upgrade),
            (*framing, *ka, *exp, *up),
            "{}",
            String::from_utf8_lossy(buf)
        );
    }
    let c = head(b"CONNECT app:443 HTTP/1.1\r\nHost: app:443\r\n\r\n");
    assert!(c.connect);
}

#[test]
fn malformed_heads_are_400() {
    let cases: &[&[u8]] = &[
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\r\nHost: a\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\rX\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n: empty\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n",
        b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / http/1.1\r\nHost: a\r\n\r\n",
        b"GET /\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551616\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n",
    ];
    for buf in cases {
        let e = head_err(buf);
        assert_eq!(e.status(), 400, "{}: {e:?}", String::from_utf8_lossy(buf));
        assert!(e.response().starts_with(b"HTTP/1.1 400 "));
    }
    // The largest Content-Length that fits is fine.
    let h = head(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551615\r\n\r\n");
    assert_eq!(h.framing, Framing::Length(u64::MAX));
}

#[test]
fn non_http_bytes_fail_before_the_head_completes() {
    // A TLS ClientHello, a PROXY header, and HTTP/2's preface on an HTTP/1 port.
    assert_eq!(head_err(b"\x16\x03\x01\x02\x00").status(), 400);
    assert_eq!(
        head_err(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nGET").status(),
        400
    );
    assert_eq!(head_err(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").status(), 505);
    assert_eq!(head_err(b"GET / HTTP/3.0\r\n").status(), 505);
    assert_eq!(head_err(b"GET / HTTP/1.1\r\nHost: a\rX").status(), 400);
}

#[test]
fn head_limit_is_431() {
    let small = Limits {
        max_head: 64,
        max_headers: 3,
    };
    let base = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec(); // 25 bytes
    let fill = |total: usize| {
        let mut b = base.clone();
        b.extend_from_slice(b"X: ");
        b.resize(total - 4, b'v');
        b.extend_from_slice(b"\r\n\r\n");
        b
    };
    let exact = fill(64);
    assert!(matches!(HeadReader::new(small).feed(&exact), HeadParse::Head(h) if h.head_len == 64));
    let over = fill(65);
    assert_eq!(
        HeadReader::new(small).feed(&over),
        HeadParse::Error(HeadError::TooLarge(64))
    );
    // Without a terminator: refused once the limit is reached, not later.
    let mut endless = base.clone();
    endless.resize(63, b'v');
    assert_eq!(HeadReader::new(small).feed(&endless), HeadParse::NeedMore);
    endless.push(b'v');
    let e = HeadReader::new(small).feed(&endless);
    assert_eq!(e, HeadParse::Error(HeadError::TooLarge(64)));
    // Empty lines alone count too.
    assert_eq!(
        HeadReader::new(small).feed(&b"\r\n".repeat(40)),
        HeadParse::Error(HeadError::TooLarge(64))
    );
    // Too many fields.
    let many = b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
    let e = HeadReader::new(small).feed(many);
    assert_eq!(e, HeadParse::Error(HeadError::TooManyFields(3)));
    assert_eq!(HeadError::TooManyFields(3).status(), 431);
    assert!(HeadError::TooLarge(1)
        .response()
        .starts_with(b"HTTP/1.1 431 "));
}

fn chunked_body() -> &'static [u8] {
    b"5;name=value;flag\r\nhello\r\n6 ; ext=\"quoted;value\"\r\n world\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer-One: 1\r\nTrailer-Two: two\r\n\r\n"
}

#[test]
fn chunked_with_extensions_and_trailers() {
    let body = chunked_body();
    let mut stream = body.to_vec();
    stream.extend_from_slice(b"GET /next");
    let mut b = Body::new(Framing::Chunked, 1024);
    assert_eq!(b.feed(&stream), Ok(body.len()));
    assert!(b.is_done());
    // Split anywhere: the same total.
    for cut in 0..=stream.len() {
        let mut b = Body::new(Framing::Chunked, 1024);
        let n1 = b.feed(&stream[..cut]).unwrap();
        let n2 = if b.is_done() {
            0
        } else {
            b.feed(&stream[cut..]).unwrap()
        };
        assert_eq!(n1 + n2, body.len(), "cut {cut}");
        assert!(b.is_done());
    }
    // Byte by byte.
    let mut b = Body::new(Framing::Chunked, 1024);
    let mut total = 0;
    for &byte in &stream {
        if b.is_done() {
            break;
        }
        total += b.feed(&[byte]).unwrap();
    }
    assert_eq!(total, body.len());
    // No trailers, bare last chunk.
    let mut b = Body::new(Framing::Chunked, 1024);
    assert_eq!(b.feed(b"0\r\n\r\nX"), Ok(5));
    assert!(b.is_done());
}

#[test]
fn chunked_errors() {
    let cases: &[(&[u8], BodyError)] = &[
        (b"\r\n", BodyError::ChunkSize),
        (b"g\r\n", BodyError::ChunkSize),
        (b"-5\r\n", BodyError::ChunkSize),
        (b"5 \r\n", BodyError::ChunkSize),
        (b"5 x\r\n", BodyError::ChunkSize),
        (b"5\n", BodyError::ChunkSize),
        (b"5\rX", BodyError::ChunkSize),
        (b"5;a\x00\r\n", BodyError::ChunkSize),
        (b"11111111111111111\r\n", BodyError::ChunkSize),
        (b"5\r\nhelloX", BodyError::ChunkEnd),
        (b"5\r\nhello\n", BodyError::ChunkEnd),
        (b"5\r\nhello\rX", BodyError::ChunkEnd),
        (b"0\r\n: v\r\n\r\n", BodyError::Trailer),
        (b"0\r\n folded\r\n\r\n", BodyError::Trailer),
        (b"0\r\nA: b\rX", BodyError::Trailer),
        (b"0\r\n\rX", BodyError::Trailer),
        (b"0\r\nA: \x01\r\n\r\n", BodyError::Trailer),
    ];
    for (data, want) in cases {
        let mut b = Body::new(Framing::Chunked, 1024);
        assert_eq!(
            b.feed(data),
            Err(*want),
            "{}",
            String::from_utf8_lossy(data)
        );
    }
    let mut long = b"1;".to_vec();
    long.resize(MAX_CHUNK_LINE + 10, b'x');
    assert_eq!(
        Body::new(Framing::Chunked, 1024).feed(&long),
        Err(BodyError::ChunkLineTooLong)
    );
    let mut trailers = b"0\r\n".to_vec();
    trailers.extend_from_slice(&b"T: 1234567\r\n".repeat(10));
    assert_eq!(
        Body::new(Framing::Chunked, 64).feed(&trailers),
        Err(BodyError::TrailerTooLarge)
    );
    // The largest chunk size is accepted (and then waits for data).
    let mut b = Body::new(Framing::Chunked, 64);
    assert_eq!(b.feed(b"ffffffffffffffff\r\nabc"), Ok(21));
    assert!(!b.is_done());
}

#[test]
fn content_length_body() {
    let mut b = Body::new(Framing::Length(5), 0);
    assert_eq!(b.feed(b"he"), Ok(2));
    assert!(!b.is_done());
    assert_eq!(b.feed(b"lloGET"), Ok(3));
    assert!(b.is_done());
    assert_eq!(b.feed(b"GET"), Ok(0));
    assert!(Body::new(Framing::None, 0).is_done());
}

/// Reads every request of a pipelined stream: (method, target, body bytes) each.
fn split_pipeline(stream: &[u8], step: usize) -> Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut consumed = 0; // start of the current request in `stream`
    let mut avail = 0; // bytes "received" so far
    let mut reader = HeadReader::new(lim());
    'requests: while consumed < stream.len() {
        let h = loop {
            match reader.feed(&stream[consumed..avail]) {
                HeadParse::Head(h) => break h,
                HeadParse::NeedMore => {
                    assert!(avail < stream.len(), "truncated stream");
                    avail = (avail + step).min(stream.len());
                }
                HeadParse::Error(e) => panic!("{e}"),
            }
        };
        reader.reset();
        let buf = &stream[consumed..];
        let (method, target) = (h.method(buf).to_vec(), h.target(buf).to_vec());
        consumed += h.head_len;
        let mut body = Body::new(h.framing, lim().max_head);
        let mut body_bytes = Vec::new();
        loop {
            if body.is_done() {
                out.push((method, target, body_bytes));
                continue 'requests;
            }
            if avail <= consumed {
                avail = (avail + step).min(stream.len());
            }
            let n = body.feed(&stream[consumed..avail]).unwrap();
            body_bytes.extend_from_slice(&stream[consumed..consumed + n]);
            consumed += n;
            if !body.is_done() {
                assert!(avail < stream.len(), "truncated body");
                avail = (avail + step).min(stream.len());
            }
        }
    }
    out
}

#[test]
fn pipelining_content_length_chunked_and_none() {
    let mut stream = Vec::new();
    stream.extend_from_slice(
        b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nGET /fake H",
    );
    stream
        .extend_from_slice(b"POST /two HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n");
    stream.extend_from_slice(chunked_body());
    stream.extend_from_slice(b"\r\nGET /three HTTP/1.1\r\nHost: a\r\n\r\n");
    stream.extend_from_slice(
        b"PUT /four HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    );
    for step in [1, 2, 7, 64, stream.len()] {
        let got = split_pipeline(&stream, step);
        let names: Vec<_> = got
            .iter()
            .map(|(m, t, _)| {
                format!(
                    "{} {}",
                    String::from_utf8_lossy(m),
                    String::from_utf8_lossy(t)
                )
            })
            .collect();
        assert_eq!(
            names,
            ["POST /one", "POST /two", "GET /three", "PUT /four"],
            "step {step}"
        );
        assert_eq!(got[0].2, b"GET /fake H");
        assert_eq!(got[1].2, chunked_body());
        assert!(got[2].2.is_empty());
        assert_eq!(got[3].2, b"ok");
    }
}

#[test]
fn fuzz_mutated_requests_never_panic() {
    let seeds: Vec<Vec<u8>> = vec![
        GET.to_vec(),
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nX-Forwarded-For: 1.2.3.4, [::1]:80\r\n\r\n5;e\r\nhello\r\n0\r\nT: v\r\n\r\n".to_vec(),
        b"PUT / HTTP/1.0\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nabc".to_vec(),
    ];
    let alphabet =
        b"\r\n :;,0123456789abcdefGET/HTTP1.chunkedContent-LengthTransfer-EncodingHost\t\x00\xff";
    let limits = Limits {
        max_head: 256,
        max_headers: 8,
    };
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut heads, mut errors) = (0u32, 0u32);
    let edits = [Edit::Set, Edit::Insert, Edit::Remove, Edit::Truncate];
    for _ in 0..30_000 {
        let buf = rng.mutant(&seeds, &edits, 3, alphabet);
        match HeadReader::new(limits).feed(&buf) {
            HeadParse::Head(h) => {
                heads += 1;
                assert!(h.head_len <= buf.len() && h.head_len <= limits.max_head);
                // What we would forward parses back to the same request.
                let pod = crate::client::PodAddrs::default();
                let ck = crate::client::ClientCheck {
                    pod: &pod,
                    local: None,
                };
                let r = crate::edge::rewrite(
                    &buf,
                    &h,
                    "192.0.2.1".parse().unwrap(),
                    "peer",
                    &tproxy_cni_policy::XffTrust::Hops(1),
                    &ck,
                );
                let again = match HeadReader::new(Limits::default()).feed(&r.head) {
                    HeadParse::Head(a) => a,
                    other => panic!("{:?} -> {other:?}", String::from_utf8_lossy(&r.head)),
                };
                assert_eq!(again.head_len, r.head.len());
                assert_eq!(again.framing, h.framing);
                assert_eq!(again.method(&r.head), h.method(&buf));
                let mut body = Body::new(h.framing, 256);
                let _ = body.feed(&buf[h.head_len..]);
            }
            HeadParse::Error(e) => {
                errors += 1;
                assert!(matches!(e.status(), 400 | 431 | 505));
            }
            HeadParse::NeedMore => assert!(buf.len() < limits.max_head),
        }
    }
    assert!(heads > 1000 && errors > 1000, "{heads} {errors}");
}

const PLAIN: ResponseTo = ResponseTo {
    head_method: false,
    connect: false,
};

fn resp(buf: &[u8], to: ResponseTo) -> ResponseHead {
    match ResponseReader::new(lim()).feed(buf, to) {
        ResponseParse::Head(h) => h,
        other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
    }
}

#[test]
fn response_framing_table() {
    let head_to = ResponseTo {
        head_method: true,
        connect: false,
    };
    let connect_to = ResponseTo {
        head_method: false,
        connect: true,
    };
    use ResponseFraming as F;
    type Case<'a> = (&'a [u8], ResponseTo, u16, F, bool, bool);
    let cases: &[Case] = &[
        // (head, answering, status, framing, interim, keep_alive)
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", PLAIN, 200, F::Length(5), false, true),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", PLAIN, 200, F::None, false, true),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", PLAIN, 200, F::Chunked, false, true),
        (b"HTTP/1.1 200 OK\r\n\r\n", PLAIN, 200, F::UntilClose, false, false),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", PLAIN, 200, F::UntilClose, false, false),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", PLAIN, 200, F::UntilClose, false, false),
        (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", PLAIN, 200, F::UntilClose, false, false),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n", PLAIN, 200, F::Length(5), false, false),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n", PLAIN, 200, F::Length(5), false, false),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n", PLAIN, 200, F::Length(5), false, true),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", head_to, 200, F::None, false, true),
        (b"HTTP/1.1 204 No Content\r\n\r\n", PLAIN, 204, F::None, false, true),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", PLAIN, 304, F::None, false, true),
        (b"HTTP/1.1 100 Continue\r\n\r\n", PLAIN, 100, F::None, true, true),
        (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", PLAIN, 103, F::None, true, true),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", PLAIN, 101, F::Tunnel, false, true),
        (b"HTTP/1.1 200 Connection established\r\n\r\n", connect_to, 200, F::Tunnel, false, true),
        (b"HTTP/1.1 407 Proxy Auth\r\nContent-Length: 2\r\n\r\n", connect_to, 407, F::Length(2), false, true),
        (b"HTTP/1.1 200\r\nContent-Length: 1\r\n\r\n", PLAIN, 200, F::Length(1), false, true),
        (b"HTTP/1.1 200 \r\nContent-Length: 1\r\n\r\n", PLAIN, 200, F::Length(1), false, true),
    ];
    for (buf, to, status, framing, interim, ka) in cases {
        let h = resp(buf, *to);
        assert_eq!(
            (h.status, h.framing, h.interim, h.keep_alive, h.head_len),
            (*status, *framing, *interim, *ka, buf.len()),
            "{}",
            String::from_utf8_lossy(buf)
        );
    }
}

#[test]
fn malformed_responses() {
    let cases: &[&[u8]] = &[
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1  200 OK\r\n\r\n",
        b"HTTP/1.1 200 O\x00K\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 1\n\n",
        b"ICY 200 OK\r\n\r\n",
    ];
    for buf in cases {
        assert!(
            matches!(
                ResponseReader::new(lim()).feed(buf, PLAIN),
                ResponseParse::Error(_)
            ),
            "{}",
            String::from_utf8_lossy(buf)
        );
    }
    assert_eq!(
        ResponseReader::new(lim()).feed(b"HTTP/1.1 200 OK\r\nA: b\r\n", PLAIN),
        ResponseParse::NeedMore
    );
}

#[test]
fn expect_continue_then_final_response_then_next() {
    // The app answers 100 Continue, then the final response, then a response to the next
    // pipelined request: each boundary is found.
    let stream: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nHTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05hello";
    let mut pos = 0;
    let mut seen = Vec::new();
    let mut reader = ResponseReader::new(lim());
    loop {
        let ResponseParse::Head(h) = reader.feed(&stream[pos..], PLAIN) else {
            panic!("at {pos}")
        };
        reader.reset();
        seen.push(h.status);
        pos += h.head_len;
        let Some(mut body) = Body::from_response(h.framing, 1024) else {
            break; // tunnel: the rest is raw
        };
        pos += body.feed(&stream[pos..]).unwrap();
        assert!(body.is_done());
    }
    assert_eq!(seen, [100, 201, 101]);
    assert_eq!(&stream[pos..], b"\x81\x05hello");
    // Until-close bodies take everything.
    let mut b = Body::from_response(ResponseFraming::UntilClose, 0).unwrap();
    assert_eq!(b.feed(b"HTTP/1.1 200 OK\r\n\r\n"), Ok(19));
    assert!(!b.is_done());
}

/// A random valid chunked body (random sizes, extensions, trailers).
fn random_chunked(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..rng.below(5) {
        let n = 1 + rng.below(300);
        out.extend_from_slice(format!("{n:x}").as_bytes());
        if rng.below(2) == 0 {
            out.extend_from_slice(b" ;a=1;b=\"x y\"");
        }
        out.extend_from_slice(b"\r\n");
        out.extend((0..n).map(|_| rng.next() as u8));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n");
    for t in 0..rng.below(3) {
        out.extend_from_slice(format!("T{t}: v\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[test]
fn fuzz_chunked_split_invariance_and_mutations() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _ in 0..5_000 {
        let body = random_chunked(&mut rng);
        let mut stream = body.clone();
        stream.extend_from_slice(b"GET / HTTP/1.1\r\n");
        // Any split into pieces consumes exactly the body.
        let mut b = Body::new(Framing::Chunked, 1024);
        let mut pos = 0;
        while !b.is_done() {
            assert!(pos < stream.len(), "ran past the body");
            let end = (pos + 1 + rng.below(64)).min(stream.len());
            pos += b.feed(&stream[pos..end]).unwrap();
        }
        assert_eq!(pos, body.len());
        // A mutated body never panics and never consumes past what it was given.
        let mut m = stream.clone();
        rng.edit(&mut m, Edit::SetAny, b"");
        let mut b = Body::new(Framing::Chunked, 1024);
        if let Ok(n) = b.feed(&m) {
            assert!(n <= m.len());
        }
    }
}

/// Head parsing must cost O(bytes) however the head is cut into reads: a 59 KB request line
/// fed one byte at a time used to rescan the whole line on every read (quadratic).
#[test]
fn head_fed_one_byte_at_a_time_is_scanned_linearly() {
    let mut long_target = b"GET /".to_vec();
    long_target.resize(59 * 1024, b'a');
    long_target.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\n");
    let mut many_lines = b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n".to_vec();
    while many_lines.len() < 59 * 1024 {
        many_lines.extend_from_slice(b"X-Filler: abcdefghijklmnopqrstuvwxyz\r\n");
    }
    many_lines.extend_from_slice(b"\r\n");
    let limits = Limits {
        max_head: 64 * 1024,
        max_headers: 10_000,
    };
    for req in [&long_target, &many_lines] {
        let mut r = HeadReader::new(limits);
        for n in 1..req.len() {
            assert_eq!(r.feed(&req[..n]), HeadParse::NeedMore, "at {n}");
        }
        assert!(matches!(r.feed(req), HeadParse::Head(h) if h.head_len == req.len()));
        let scanned = r.bytes_scanned();
        assert!(
            scanned <= 4 * req.len(),
            "{scanned} bytes examined for a {}-byte head",
            req.len()
        );
    }
    // Empty lines before the request line, one byte at a time, are linear too.
    let mut r = HeadReader::new(limits);
    let crlfs = b"\r\n".repeat(30 * 1024);
    for n in 1..crlfs.len() {
        assert_eq!(r.feed(&crlfs[..n]), HeadParse::NeedMore, "at {n}");
    }
    assert!(
        r.bytes_scanned() <= 4 * crlfs.len(),
        "{}",
        r.bytes_scanned()
    );
}

/// Request trailers never reach the app, however the body is cut into reads: a client could
/// otherwise send `X-Forwarded-For` or `x-envoy-external-address` after the body.
#[test]
fn request_trailers_are_dropped_at_every_split() {
    let body: &[u8] = b"3\r\nabc\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\nx-envoy-external-address: 6.6.6.6\r\n\r\nNEXT";
    let want: &[u8] = b"3\r\nabc\r\n0\r\n\r\n";
    for split in 0..=body.len() {
        for step in [1, 2, 7, body.len()] {
            let mut b = Body::new(Framing::Chunked, 1024);
            let mut out = Vec::new();
            let mut pos = 0;
            let mut parts = vec![&body[..split]];
            parts.extend(body[split..].chunks(step));
            for part in parts {
                if b.is_done() {
                    break;
                }
                let (n, dropped) = b.feed_dropping_trailers(part).unwrap();
                assert!(dropped.end <= n);
                out.extend_from_slice(&part[..dropped.start]);
                out.extend_from_slice(&part[dropped.end..n]);
                pos += n;
            }
            assert!(b.is_done(), "split {split} step {step}");
            assert_eq!(pos, body.len() - 4, "split {split} step {step}");
            assert_eq!(out, want, "split {split} step {step}");
        }
    }
    // Without trailers nothing is dropped; responses keep theirs.
    let mut b = Body::new(Framing::Chunked, 1024);
    assert_eq!(b.feed_dropping_trailers(want).unwrap(), (want.len(), 0..0));
    let mut b = Body::new(Framing::Chunked, 1024);
    assert_eq!(b.feed(body).unwrap(), body.len() - 4);
}
