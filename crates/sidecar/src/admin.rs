//! The admin port: `/healthz` (liveness), `/ready` (readiness) and `/metrics` (Prometheus).
//!
//! A deliberately tiny HTTP/1.x responder (one request per connection, `Connection: close`):
//! kubelet probes and Prometheus scrapes need nothing more, and it keeps the sidecar free of an
//! HTTP stack.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::metrics::Metrics;

/// What the probes report.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// Set once every listener is bound.
    pub ready: AtomicBool,
    /// Set at SIGTERM: readiness turns 503 so nothing new is routed here while draining.
    pub draining: AtomicBool,
    /// Verifies that the pod's netns is programmed for our mode; `None` when nothing is
    /// diverted to us (mode none).
    pub intercepted: Option<super::netcheck::Checker>,
}

/// Admin connections served at once; more wait in the accept queue. Bounded so that a flood
/// of probes or scrapes cannot eat the descriptors kept for it (sidecar.rs, `FD_RESERVE`).
pub(crate) const MAX_CONCURRENT: usize = 16;

/// Serves until `stop` turns true.
pub(crate) async fn serve(
    listeners: Vec<TcpListener>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) {
    let mut tasks = Vec::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT));
    for l in listeners {
        let (h, m, mut stop) = (health.clone(), metrics.clone(), stop.clone());
        let slots = slots.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let accepted = tokio::select! {
                    r = l.accept() => r,
                    _ = stop.wait_for(|v| *v) => return,
                };
                match accepted {
                    Ok((s, _)) => {
                        let (h, m) = (h.clone(), m.clone());
                        tokio::spawn(async move {
                            let _slot = slot;
                            let _ = tokio::time::timeout(Duration::from_secs(5), answer(s, &h, &m))
                                .await;
                        });
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn answer(mut s: TcpStream, health: &Health, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = vec![0u8; 2048];
    let mut len = 0;
    // Read until the end of the request head (or the buffer is full: probes are tiny).
    while len < buf.len() {
        let n = s.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET" | "HEAD", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET" | "HEAD", "/ready") => {
            if health.draining.load(Ordering::Relaxed) {
                ("503 Service Unavailable", "text/plain", "draining\n".into())
            } else if !health.ready.load(Ordering::Relaxed) {
                ("503 Service Unavailable", "text/plain", "starting\n".into())
            } else if let Some(Err(what)) = health.intercepted.as_ref().map(|c| c.ready()) {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    format!("not intercepted: {what}\n"),
                )
            } else if metrics.saturated() {
                // Every slot taken: a new connection would wait in the accept queue, so ask
                // the Service to send it elsewhere. Liveness stays 200: busy is not broken.
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "saturated\n".into(),
                )
            } else {
                ("200 OK", "text/plain", "ready\n".into())
            }
        }
        ("GET" | "HEAD", "/metrics") => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "text/plain",
            "try /healthz /ready /metrics\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        resp.push_str(&body);
    }
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}
