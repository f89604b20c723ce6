//! One accepted connection, as named steps: its original destination, admission (access
//! control and the PROXY header), the dial, the PROXY header towards the app, the relay (plain
//! or HTTP) and the TIME_WAIT book. A step that ends the connection returns a `Stop`; the
//! client is reset in one place (`Stop::reset`), whatever the reason.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::TcpStream;

use super::{dial, is_own_port, usable_source, Conn, OwnPortGuard, Role, Shared};
use crate::accesslog::EndReason;
use crate::addr::{unmap, ClientAddr, OrigDst};
use crate::client::{self, Claim, ClientCheck};
use crate::config::InboundMode;
use crate::httprelay::{self, HttpConn};
use crate::metrics::NsCounter;
use crate::ports::InboundGuard;
use crate::proxy_protocol as pp;
use crate::relay;
use crate::sockopt;
use crate::xff;
use tproxy_cni_policy::Denied;
use tproxy_cni_policy::PpVersion;

/// (bytes from downstream, bytes to downstream) and why the connection ended.
pub(super) type Done = ((u64, u64), EndReason);

/// A connection ended before any relay ran: why, and how many bytes the client had sent.
pub(super) struct Stop {
    received: u64,
    end: EndReason,
}

impl Stop {
    pub(super) fn new(end: EndReason) -> Stop {
        Stop { received: 0, end }
    }

    fn after(received: u64, end: EndReason) -> Stop {
        Stop { received, end }
    }

    /// The one place a connection that never reached a relay is closed: every such end
    /// (refused, no route, the app unreachable, a bad PROXY header) is a reset, what the
    /// client would have seen without us (docs/ARCHITECTURE.md, pitfall 33). A relay that ran
    /// chose each leg's linger itself from how it ended (relay.rs, httprelay.rs).
    pub(super) fn reset(self, down: &TcpStream) -> Done {
        sockopt::reset_on_close(down);
        ((self.received, 0), self.end)
    }
}

/// Serves one admitted connection to its end. Not an `async fn`, which would keep its
/// arguments twice (docs/ARCHITECTURE.md, pitfall 80).
pub(super) fn serve<'a>(
    shared: &'a Shared,
    down: &'a TcpStream,
    role: Role,
    c: &'a mut Conn,
) -> impl std::future::Future<Output = Done> + Send + 'a {
    sockopt::set_nodelay(down);
    // Dying before the relay ends must reset the client, not close it cleanly (relay.rs).
    sockopt::reset_on_close(down);
    async move {
        let e = match established(shared, down, role, c).await {
            Ok(e) => e,
            Err(done) => return done,
        };
        let o = relay::relay(
            down,
            &e.up,
            &shared.pipes,
            shared.cfg.idle_timeout,
            &shared.cut,
        )
        .await;
        if o.pipes_refused > 0 {
            shared.metrics.fd_exhausted();
            shared.log_error(format_args!(
                "relay pipe: out of file descriptors; copied through user space instead"
            ));
        }
        book_time_wait(shared, &e.up, role, &o, c);
        ((e.pre + o.from_downstream, o.to_downstream), o.end)
    }
}

/// A duration in whole microseconds, saturated (the access log's resolution).
fn micros(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// `establish`, boxed and freed before the relay: admission, the dial and the PROXY header
/// towards the app are over by then, and the largest of their states would otherwise size
/// every idle connection's task (docs/ARCHITECTURE.md, pitfall 80). An X-Forwarded-For port's
/// HTTP relay runs here to its end, boxed too, so the plain connections' task stays sized by
/// the plain relay; `Err` is how a connection ended that needs no plain relay.
async fn established(
    shared: &Shared,
    down: &TcpStream,
    role: Role,
    c: &mut Conn,
) -> Result<Established, Done> {
    match Box::pin(establish(shared, down, role, c)).await {
        Ok(Next::Relay(e)) => Ok(e),
        // The guards in `e` live to the end of the HTTP relay, as for the plain one.
        Ok(Next::Http(e, orig, early)) => {
            Err(Box::pin(relay_http(shared, down, &e.up, orig, early, c)).await)
        }
        Err(stop) => Err(stop.reset(down)),
    }
}

/// What comes after `establish`: the plain relay, or the HTTP relay of an X-Forwarded-For
/// port with the original destination and the bytes read after a PROXY header.
enum Next {
    Relay(Established),
    Http(Established, OrigDst, Vec<u8>),
}

/// A connection ready for the plain relay: the upstream, dialled and greeted, and what must
/// live as long as the relay.
struct Established {
    up: TcpStream,
    /// In tproxy mode the client's port is recorded for as long as the connection lives (and
    /// the linger time after), so no upstream of ours reuses its tuple (ports.rs).
    _guard: Option<InboundGuard>,
    /// Keeps an outbound upstream's port registered for loop detection until the relay is
    /// over.
    _own_port: Option<OwnPortGuard>,
    /// Bytes the client sent before the relay (after a PROXY header), passed on already.
    pre: u64,
}

/// The steps before the relay: the original destination, admission, the dial, the PROXY
/// header towards the app and, for the plain relay, the bytes read after the client's.
async fn establish(
    shared: &Shared,
    down: &TcpStream,
    role: Role,
    c: &mut Conn,
) -> Result<Next, Stop> {
    let orig = original_destination(shared, down, role, c)?;
    c.orig = Some(orig);
    let adm = match role {
        Role::Inbound(_) => admission(shared, down, orig, c).await?,
        Role::Outbound => Admitted::default(),
    };
    let guard = match role {
        Role::Inbound(InboundMode::Tproxy) => Some(shared.ports.inbound_open(c.client.0, orig.0)),
        _ => None,
    };
    let (up, own_port) = dial_upstream(shared, role, orig, c).await?;
    let pre = adm.early.len() as u64;
    if let Role::Inbound(_) = role {
        proxy_out(shared, &up, orig, adm.pp_dst, c)
            .await
            .map_err(|end| Stop::after(pre, end))?;
    }
    let e = Established {
        up,
        _guard: guard,
        _own_port: own_port,
        pre,
    };
    if adm.xff_port {
        return Ok(Next::Http(e, orig, adm.early));
    }
    if !adm.early.is_empty() && httprelay::write_all(&e.up, &adm.early).await.is_err() {
        return Err(Stop::after(pre, EndReason::UpstreamTermination));
    }
    Ok(Next::Relay(e))
}

/// Where the client meant to connect: the accepted socket's own address under TPROXY, the NAT
/// record otherwise. Our own upstream captured again, or a connection addressed to the
/// sidecar itself, has no route (dialling it would loop back into us).
fn original_destination(
    shared: &Shared,
    down: &TcpStream,
    role: Role,
    c: &Conn,
) -> Result<OrigDst, Stop> {
    let v6 = c.local.0.is_ipv6();
    let orig = match role {
        // TPROXY keeps the packet's destination: the accepted socket's own address.
        Role::Inbound(InboundMode::Tproxy) => Ok(OrigDst(c.local.0)),
        Role::Inbound(InboundMode::Redirect) | Role::Outbound => {
            sockopt::original_dst(down, v6).map(|a| OrigDst(unmap(a)))
        }
    };
    if role == Role::Outbound && shared.outbound_ports.contains(c.client.0) {
        // Our own upstream came back through the capture: the plugin exempts the proxy by uid
        // (and, in redirect mode, by mark); we run as neither. Said once; the access log has
        // every occurrence (NR).
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            log::warn!(
                "outbound loop from {}: run the sidecar as the proxy uid (1337) \
             that the plugin exempts from outbound capture",
                c.client
            );
        }
        return Err(Stop::new(EndReason::NoRoute));
    }
    match orig {
        Ok(o) if !is_own_port(&shared.cfg, o.port()) => Ok(o),
        _ => Err(Stop::new(EndReason::NoRoute)),
    }
}

/// What admission found out about an inbound connection.
#[derive(Default)]
struct Admitted {
    /// Bytes read after a PROXY header: they belong to the app.
    early: Vec<u8>,
    /// The destination a trusted PROXY header named.
    pp_dst: Option<SocketAddr>,
    /// An X-Forwarded-For port: the client is decided per request.
    xff_port: bool,
}

/// North-south admission (inbound only): access control on the peer, the PROXY header of a
/// trusted peer, access control on the client it names (per request on XFF ports, 403 there).
async fn admission(
    shared: &Shared,
    down: &TcpStream,
    orig: OrigDst,
    c: &mut Conn,
) -> Result<Admitted, Stop> {
    let ns = &shared.ns;
    let peer_ip = c.client.ip();
    let mut adm = Admitted {
        xff_port: ns.cfg.xff_on(orig.port()),
        ..Admitted::default()
    };
    if let Err(d) = ns.cfg.acl.check_peer(peer_ip) {
        return Err(deny(shared, c, d, 0));
    }
    if ns.cfg.proxy_protocol_on(orig.port()) {
        if ns
            .cfg
            .proxy_protocol_trusted
            .iter()
            .any(|n| n.contains(&peer_ip))
        {
            proxy_header(shared, down, orig, c, &mut adm).await?;
        } else {
            // Never parsed: the bytes reach the app untouched.
            shared.metrics.count(NsCounter::ProxyProtocol, "untrusted");
        }
    }
    if !adm.xff_port {
        let client = c.effective.map(|a| a.ip()).unwrap_or(peer_ip);
        if let Err(d) = ns.cfg.acl.check_client(client) {
            return Err(deny(shared, c, d, adm.early.len() as u64));
        }
    }
    Ok(adm)
}

/// Reads a trusted peer's PROXY header and takes the client it claims, if module `client`
/// accepts it; a missing, malformed or late header ends the connection (`DPE`).
async fn proxy_header(
    shared: &Shared,
    down: &TcpStream,
    orig: OrigDst,
    c: &mut Conn,
    adm: &mut Admitted,
) -> Result<(), Stop> {
    let (h, rest) = match read_proxy_header(down, shared.cfg.proxy_protocol_timeout).await {
        Ok(ok) => ok,
        Err((why, got)) => {
            shared.metrics.count(NsCounter::ProxyProtocol, why);
            c.details = Some(format!("proxy_protocol_{why}").into());
            shared.log_error(format_args!(
                "PROXY protocol from {}: {why}; connection reset",
                c.client
            ));
            return Err(Stop::after(got, EndReason::ProtocolError));
        }
    };
    adm.early = rest;
    let Some(a) = h.addrs else {
        // v2 LOCAL (a balancer's health check), v1 UNKNOWN: the peer.
        c.source = "proxy_protocol_local";
        shared.metrics.count(NsCounter::ProxyProtocol, "local");
        return Ok(());
    };
    let ck = ClientCheck {
        pod: &shared.ns.pod,
        local: Some(orig.0.ip()),
    };
    let claim = Claim::ProxyProtocol(a.src.ip());
    let d = client::decide(c.client.ip(), "peer", claim, &ck);
    if let Some(r) = d.refused {
        shared.metrics.count(NsCounter::ClientFallback, r.label());
    } else {
        c.effective = Some(SocketAddr::new(d.client, a.src.port()));
    }
    c.source = d.source;
    adm.pp_dst = Some(unmap(a.dst));
    shared.metrics.count(NsCounter::ProxyProtocol, "proxy");
    Ok(())
}

/// Refuses a connection by the access control: counted, logged with `RBAC`.
fn deny(shared: &Shared, c: &mut Conn, d: Denied, received: u64) -> Stop {
    shared.metrics.count(NsCounter::RbacDenied, d.label());
    c.details = Some(format!("rbac_{}", d.label()).into());
    Stop::after(received, EndReason::Rbac)
}

/// Reads a PROXY protocol header within `timeout`. Returns the header and the bytes read after
/// it (they belong to the app), or why not and how many bytes were read.
async fn read_proxy_header(
    down: &TcpStream,
    timeout: std::time::Duration,
) -> Result<(pp::Header, Vec<u8>), (&'static str, u64)> {
    let limits = pp::Limits::default();
    let mut buf = Vec::with_capacity(512);
    let read = async {
        loop {
            // `parse` never asks for more than the header limit, so `buf` stays bounded.
            match pp::parse(&buf, &limits) {
                pp::Parse::Header(h) => {
                    let rest = buf[h.header_len..].to_vec();
                    return Ok((h, rest));
                }
                pp::Parse::Error(e) => return Err(e.label()),
                pp::Parse::NeedMore { .. } => {}
            }
            match httprelay::read_more(down, &mut buf).await {
                Ok(0) => return Err("truncated"),
                Ok(_) => {}
                Err(_) => return Err("read_error"),
            }
        }
    };
    let r = tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err("timeout"));
    r.map_err(|why| (why, buf.len() as u64))
}

/// Dials the app within the connect timeout, from the client a trusted PROXY header named as
/// its TCP peer (tproxy mode) when that address can be a source for this destination, else
/// from the TCP peer.
async fn dial_upstream(
    shared: &Shared,
    role: Role,
    orig: OrigDst,
    c: &mut Conn,
) -> Result<(TcpStream, Option<OwnPortGuard>), Stop> {
    let t = Instant::now();
    let source = match c.effective {
        Some(e) if usable_source(e.ip(), orig.0.ip()) => ClientAddr(e),
        _ => c.client,
    };
    let dialed =
        tokio::time::timeout(shared.cfg.connect_timeout, dial(shared, role, source, orig)).await;
    let dir = role.direction();
    match dialed {
        Ok(Ok((up, local, own))) => {
            shared.metrics.connect_latency(dir, t.elapsed());
            c.connect_us = Some(micros(t.elapsed()));
            c.upstream_local = Some(local);
            Ok((up, own))
        }
        Ok(Err(e)) if sockopt::is_fd_exhaustion(&e) => {
            // Our own shortage, not the app's: not UF, and said at a bounded rate.
            shared.metrics.fd_exhausted();
            shared.log_error(format_args!("upstream socket: {e}"));
            Err(Stop::new(EndReason::Overloaded))
        }
        Ok(Err(_)) | Err(_) => {
            shared.metrics.connect_failed(dir);
            c.connect_us = Some(micros(t.elapsed()));
            // The client sees what it would have seen without us: a reset.
            Err(Stop::new(if dialed.is_err() {
                EndReason::UpstreamConnectTimeout
            } else {
                EndReason::UpstreamConnectFailure
            }))
        }
    }
}

/// Sends the app a PROXY header on the ports that want one: the effective client, and the
/// destination the balancer's own header named.
async fn proxy_out(
    shared: &Shared,
    up: &TcpStream,
    orig: OrigDst,
    pp_dst: Option<SocketAddr>,
    c: &Conn,
) -> Result<(), EndReason> {
    let Some(v) = shared.ns.cfg.proxy_protocol_out_on(orig.port()) else {
        return Ok(());
    };
    let src = c.effective.unwrap_or(c.client.0);
    let dst = pp_dst.unwrap_or(orig.0);
    let hdr = match v {
        PpVersion::V1 => pp::encode_v1(src, dst),
        PpVersion::V2 => pp::encode_v2(src, dst),
    };
    httprelay::write_all(up, &hdr)
        .await
        .map_err(|_| EndReason::UpstreamTermination)
}

/// The HTTP/1.1 relay of an X-Forwarded-For port, and what it learnt for the access log.
async fn relay_http(
    shared: &Shared,
    down: &TcpStream,
    up: &TcpStream,
    orig: OrigDst,
    early: Vec<u8>,
    c: &mut Conn,
) -> Done {
    let peer = xff::peer_ip(SocketAddr::new(
        c.effective.map(|a| a.ip()).unwrap_or(c.client.ip()),
        0,
    ));
    let conn = HttpConn {
        peer,
        peer_source: c.source,
        check: ClientCheck {
            pod: &shared.ns.pod,
            local: Some(orig.0.ip()),
        },
        connect: shared.ns.cfg.xff_connect_on(orig.port()),
        trust: &shared.ns.cfg.xff_trust,
        acl: &shared.ns.cfg.acl,
        limits: crate::http1::Limits {
            max_head: shared.cfg.max_request_head,
            ..Default::default()
        },
        idle: shared.cfg.idle_timeout,
        metrics: Some(&shared.metrics),
    };
    // Boxed: its state (about 2.7 KiB) would otherwise size every connection's task, the
    // plain ones too (docs/ARCHITECTURE.md, pitfall 80).
    let o = Box::pin(httprelay::relay_http(down, up, early, conn, &shared.cut)).await;
    c.http_requests = Some(o.requests);
    // The log names the request the sidecar answered (a 403's denied client), else the
    // first one.
    if let Some(d) = o.answered_client.or(o.first_client) {
        if d.client != peer {
            c.effective = Some(SocketAddr::new(d.client, 0));
        }
        c.source = d.source;
    }
    for r in &o.refused {
        shared.metrics.count(NsCounter::ClientFallback, r);
    }
    if let Some((status, why)) = o.answered {
        if status != 0 {
            c.response_code = Some(status);
            let result = match status {
                400 => "400",
                403 => "403",
                431 => "431",
                _ => "505",
            };
            shared.metrics.count(NsCounter::HttpRequests, result);
        }
        // The relay's own failure reasons already read `http_...`; head errors do not.
        c.details = Some(
            match (o.denied, status) {
                (Some(d), _) => format!("rbac_{}", d.label()),
                (None, 0) => why.to_string(),
                (None, _) => format!("http_{why}"),
            }
            .into(),
        );
    }
    if let Some(d) = o.denied {
        shared.metrics.count(NsCounter::RbacDenied, d.label());
    }
    ((o.from_downstream, o.to_downstream), o.end)
}

/// We sent the first FIN to the app, so our upstream socket now holds its tuple in
/// TIME_WAIT. Without TCP timestamps no connect() may take it over for 60 s: the port book
/// must not offer it (ports.rs, docs/ARCHITECTURE.md, pitfall 54). The book is keyed by the
/// address the upstream was bound to: the client's, or the one its PROXY header carried.
fn book_time_wait(shared: &Shared, up: &TcpStream, role: Role, o: &relay::Outcome, c: &Conn) {
    if role == Role::Inbound(InboundMode::Tproxy)
        && o.end == EndReason::Normal
        && o.upstream_fin_first
        && sockopt::has_timestamps(up) != Some(true)
    {
        if let (Some(local), Some(orig)) = (c.upstream_local, c.orig) {
            shared
                .ports
                .upstream_time_wait(local.0.ip(), orig.0, local.0.port());
        }
    }
}
