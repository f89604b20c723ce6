//! Tests of the HTTP/1.1 relay over socket pairs: framing, rewrites, the ACL, resets.

use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::testutil::tcp_pair as pair;

/// client <-> [down | relay_http | up] <-> app, peer 192.0.2.9, numTrustedProxies 1.
async fn setup(
    acl: Acl,
    max_head: usize,
) -> (TcpStream, TcpStream, tokio::task::JoinHandle<HttpOutcome>) {
    setup_connect(acl, max_head, false).await
}

/// `connect`: the port opted in to CONNECT.
async fn setup_connect(
    acl: Acl,
    max_head: usize,
    connect: bool,
) -> (TcpStream, TcpStream, tokio::task::JoinHandle<HttpOutcome>) {
    let (client, down) = pair().await;
    let (up, app) = pair().await;
    let h = tokio::spawn(async move {
        let cut = Cut::default();
        let trust = XffTrust::Hops(1);
        let pod = crate::client::PodAddrs::new(vec!["10.1.0.5".parse().unwrap()], vec![]);
        let conn = HttpConn {
            peer: "192.0.2.9".parse().unwrap(),
            peer_source: "peer",
            check: ClientCheck {
                pod: &pod,
                local: None,
            },
            connect,
            trust: &trust,
            acl: &acl,
            limits: http1::Limits {
                max_head,
                ..Default::default()
            },
            idle: Duration::from_secs(10),
            metrics: None,
        };
        relay_http(&down, &up, Vec::new(), conn, &cut).await
    });
    (client, app, h)
}

/// Reads until `buf` holds `n` occurrences of `marker` (bounded by 5 s).
async fn read_until(s: &mut TcpStream, marker: &[u8], n: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        while buf.windows(marker.len()).filter(|w| *w == marker).count() < n {
            let k = s.read(&mut chunk).await.unwrap();
            if k == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..k]);
        }
    })
    .await
    .expect("timed out");
    buf
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

#[tokio::test]
async fn pipelined_keep_alive_requests_are_all_rewritten() {
    let (mut client, mut app, h) = setup(Acl::default(), 8192).await;
    // Three pipelined requests in one write: a chunked body, a Content-Length body, none.
    client
        .write_all(
            b"POST /a HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.1, 10.0.0.1\r\n\
              x-envoy-external-address: 6.6.6.6\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nabc\r\n0\r\n\r\n\
              PUT /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
              GET /c HTTP/1.1\r\nHost: x\r\nx-forwarded-for: 198.51.100.7\r\n\r\n",
        )
        .await
        .unwrap();
    let got = text(&read_until(&mut app, b"\r\n\r\n", 4).await);
    let heads: Vec<&str> = got.split("\r\n\r\n").collect();
    assert!(heads[0].starts_with("POST /a HTTP/1.1\r\n"), "{got}");
    assert!(
        heads[0].contains("x-forwarded-for: 203.0.113.1, 10.0.0.1, 192.0.2.9"),
        "{got}"
    );
    // numTrustedProxies 1: the rightmost incoming entry is the client.
    assert!(
        heads[0].contains("x-envoy-external-address: 10.0.0.1"),
        "{got}"
    );
    assert!(
        !got.contains("6.6.6.6"),
        "client-sent external address stripped: {got}"
    );
    assert!(
        heads[1].starts_with("3\r\nabc\r\n0"),
        "chunked body intact: {got}"
    );
    assert!(heads[2].starts_with("PUT /b") && heads[2].contains("x-forwarded-for: 192.0.2.9"));
    assert!(
        heads[2].contains("x-envoy-external-address: 192.0.2.9"),
        "{got}"
    );
    assert!(heads[3].starts_with("helloGET /c"), "{got}");
    assert!(heads[3].contains("x-forwarded-for: 198.51.100.7, 192.0.2.9"));
    assert!(heads[3].contains("x-envoy-external-address: 198.51.100.7"));
    for _ in 0..3 {
        app.write_all(OK).await.unwrap();
    }
    let back = read_until(&mut client, b"ok", 3).await;
    assert_eq!(back, [OK, OK, OK].concat());
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    app.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    app.shutdown().await.unwrap();
    let o = h.await.unwrap();
    assert_eq!(o.end, EndReason::Normal);
    assert_eq!(o.requests, 3);
    assert_eq!(o.first_client.unwrap().client.to_string(), "10.0.0.1");
    assert_eq!(o.first_client.unwrap().source, "xff");
    assert_eq!(o.to_downstream, 3 * OK.len() as u64);
}

#[tokio::test]
async fn continue_then_final_response() {
    let (mut client, mut app, h) = setup(Acl::default(), 8192).await;
    client
        .write_all(
            b"POST /u HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
        )
        .await
        .unwrap();
    read_until(&mut app, b"\r\n\r\n", 1).await;
    app.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, b"\r\n\r\n", 1).await;
    client.write_all(b"data").await.unwrap();
    read_until(&mut app, b"data", 1).await;
    app.write_all(OK).await.unwrap();
    assert_eq!(read_until(&mut client, b"ok", 1).await, OK);
    drop(client);
    drop(app);
    let o = h.await.unwrap();
    assert_eq!(o.requests, 1);
}

#[tokio::test]
async fn websocket_upgrade_becomes_plain_bytes_and_declined_upgrade_stays_http() {
    let (mut client, mut app, h) = setup(Acl::default(), 8192).await;
    let up_req =
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    // Declined first: the next request must still be parsed and rewritten.
    client.write_all(up_req).await.unwrap();
    read_until(&mut app, b"\r\n\r\n", 1).await;
    app.write_all(OK).await.unwrap();
    read_until(&mut client, b"ok", 1).await;
    client.write_all(up_req).await.unwrap();
    let second = text(&read_until(&mut app, b"\r\n\r\n", 1).await);
    assert!(second.contains("x-forwarded-for: 192.0.2.9"), "{second}");
    // Accepted now: after 101, bytes that look like HTTP pass unchanged both ways.
    app.write_all(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    read_until(&mut client, b"\r\n\r\n", 1).await;
    let raw = b"GET /not-http HTTP/1.1\r\nHost: y\r\n\r\n";
    client.write_all(raw).await.unwrap();
    assert_eq!(read_until(&mut app, b"\r\n\r\n", 1).await, raw);
    app.write_all(b"\x81\x02hi").await.unwrap();
    assert_eq!(read_until(&mut client, b"hi", 1).await, b"\x81\x02hi");
    client.shutdown().await.unwrap();
    app.shutdown().await.unwrap();
    let o = h.await.unwrap();
    assert_eq!((o.end, o.requests), (EndReason::Normal, 2));
}

#[tokio::test]
async fn bad_heads_get_400_and_431_after_earlier_responses() {
    for (req, status) in [
        (&b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n"[..], 400u16),
        (&b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: 0123456789012345678901234567890123456789\r\n\r\n"[..], 431),
    ] {
        let (mut client, mut app, h) = setup(Acl::default(), 64).await;
        let mut both = b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        both.extend_from_slice(req);
        client.write_all(&both).await.unwrap();
        read_until(&mut app, b"\r\n\r\n", 1).await;
        // The answer waits for the response to the first request.
        tokio::time::sleep(Duration::from_millis(50)).await;
        app.write_all(OK).await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        let back = text(&back);
        assert!(back.starts_with("HTTP/1.1 200 OK"), "{back}");
        assert!(back.contains(&format!("HTTP/1.1 {status} ")), "{back}");
        let o = h.await.unwrap();
        assert_eq!(o.end, EndReason::ProtocolError);
        assert_eq!(o.answered.map(|a| a.0), Some(status));
        assert_eq!(o.requests, 1);
    }
}

#[tokio::test]
async fn app_closing_instead_of_answering_an_upgrade_does_not_hang() {
    let (mut client, mut app, h) = setup(Acl::default(), 8192).await;
    client
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    read_until(&mut app, b"\r\n\r\n", 1).await;
    app.shutdown().await.unwrap();
    drop(app);
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut back))
        .await
        .expect("client sees the close")
        .unwrap();
    client.shutdown().await.unwrap();
    let o = tokio::time::timeout(Duration::from_secs(5), h)
        .await
        .expect("relay ends")
        .unwrap();
    assert_eq!(o.requests, 1);
}

#[tokio::test]
async fn client_reset_while_the_app_is_silent_resets_the_app() {
    // An upgrade request: the client side is not read until the app answers, so only the
    // error watch can see the client's reset.
    let (client, mut app, h) = setup(Acl::default(), 8192).await;
    let mut client = client;
    client
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    read_until(&mut app, b"\r\n\r\n", 1).await;
    sockopt::reset_on_close(&client);
    drop(client);
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), app.read_to_end(&mut rest))
        .await
        .expect("the app hears of it");
    assert!(r.is_err(), "a reset, not a clean close: {r:?}");
    let o = h.await.unwrap();
    assert_eq!(o.end, EndReason::DownstreamTermination);
}

#[tokio::test]
async fn tls_and_http2_clients_are_answered_not_relayed() {
    for (hello, status) in [
        (&b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..], "400"),
        (&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], "505"),
    ] {
        let (mut client, _app, h) = setup(Acl::default(), 8192).await;
        client.write_all(hello).await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert!(
            text(&back).starts_with(&format!("HTTP/1.1 {status} ")),
            "{}",
            text(&back)
        );
        assert_eq!(h.await.unwrap().requests, 0);
    }
}

#[tokio::test]
async fn denied_client_gets_403() {
    let acl = Acl {
        deny_client: vec!["203.0.113.0/24".parse().unwrap()],
        ..Acl::default()
    };
    let (mut client, _app, h) = setup(acl, 8192).await;
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.5\r\n\r\n")
        .await
        .unwrap();
    let mut back = Vec::new();
    client.read_to_end(&mut back).await.unwrap();
    assert!(
        text(&back).starts_with("HTTP/1.1 403 Forbidden"),
        "{}",
        text(&back)
    );
    let o = h.await.unwrap();
    assert_eq!(o.end, EndReason::Rbac);
    assert_eq!(o.denied, Some(Denied::ClientDenied));
    assert_eq!(o.requests, 0);
}

async fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
        .await
        .expect("closed in time")
        .unwrap();
    back
}

#[tokio::test]
async fn connect_is_refused_unless_the_port_opted_in() {
    // An ordinary app answers CONNECT with 200 and stays in HTTP: before, the sidecar then
    // relayed raw bytes, and the next request reached the app unrewritten.
    let (mut client, mut app, h) = setup(Acl::default(), 8192).await;
    client
        .write_all(b"CONNECT / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nx-envoy-external-address: 6.6.6.6\r\n\r\n")
        .await
        .unwrap();
    let back = text(&read_all(&mut client).await);
    assert!(back.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{back}");
    assert!(
        !back.contains("RBAC"),
        "not the access control's answer: {back}"
    );
    let mut seen = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), app.read_to_end(&mut seen)).await;
    assert!(seen.is_empty(), "the app saw {:?}", text(&seen));
    let o = h.await.unwrap();
    assert_eq!(
        (o.answered, o.requests),
        (Some((403, "connect_refused")), 0)
    );

    // Opted in: CONNECT goes to the app, and a 2xx makes a tunnel.
    let (mut client, mut app, h) = setup_connect(Acl::default(), 8192, true).await;
    client
        .write_all(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n")
        .await
        .unwrap();
    let got = text(&read_until(&mut app, b"\r\n\r\n", 1).await);
    assert!(got.starts_with("CONNECT db:5432 HTTP/1.1\r\n"), "{got}");
    app.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
    read_until(&mut client, b"\r\n\r\n", 1).await;
    client.write_all(b"raw bytes").await.unwrap();
    assert_eq!(read_until(&mut app, b"bytes", 1).await, b"raw bytes");
    client.shutdown().await.unwrap();
    app.shutdown().await.unwrap();
    assert_eq!(h.await.unwrap().end, EndReason::Normal);
}

#[tokio::test]
async fn h2c_upgrade_reaches_the_app_as_plain_http() {
    let (mut client, mut app, h) = setup(Acl::default(), 8192).await;
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMA\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Not an upgrade any more: both requests go out at once, rewritten.
    let got = text(&read_until(&mut app, b"\r\n\r\n", 2).await);
    assert!(!got.to_ascii_lowercase().contains("upgrade"), "{got}");
    assert_eq!(
        got.matches("x-forwarded-for: 192.0.2.9").count(),
        2,
        "{got}"
    );
    drop(client);
    drop(app);
    h.await.unwrap();
}

#[tokio::test]
async fn request_trailers_never_reach_the_app() {
    let (mut client, mut app, h) = setup(Acl::default(), 8192).await;
    client
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\nx-envoy-external-address: 6.6.6.6\r\n\r\nGET /n HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = text(&read_until(&mut app, b"\r\n\r\n", 3).await);
    assert!(!got.contains("6.6.6.6"), "{got}");
    assert!(
        got.contains("3\r\nabc\r\n0\r\n\r\nGET /n HTTP/1.1\r\n"),
        "{got}"
    );
    drop(client);
    drop(app);
    assert_eq!(h.await.unwrap().requests, 2);
}

#[tokio::test]
async fn a_403_on_keep_alive_names_the_denied_requests_client() {
    let acl = Acl {
        deny_client: vec!["203.0.113.0/24".parse().unwrap()],
        ..Acl::default()
    };
    let (mut client, mut app, h) = setup(acl, 8192).await;
    client
        .write_all(b"GET /1 HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.1\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.5\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut app, b"\r\n\r\n", 1).await;
    app.write_all(OK).await.unwrap();
    let back = text(&read_all(&mut client).await);
    assert!(back.contains("RBAC: access denied"), "{back}");
    let o = h.await.unwrap();
    assert_eq!(o.first_client.unwrap().client.to_string(), "198.51.100.1");
    assert_eq!(o.answered_client.unwrap().client.to_string(), "203.0.113.5");
}
