//! The late pod (docs/install.md, "Late join and drift repair"): a TPROXY pod (app + the sidecar
//! of `manifests/examples/native/httpbin.yaml`) and a client pod are set up through containerd while
//! the conflist holds only the primary; the sidecar stays not ready. Then the installer starts
//! (step 1 of the run) and, with no restart of anything, the reconcile loop programs the pod:
//! the sidecar turns ready and the app sees the client's IP through it.
//!
//! Readiness is asked the way kubelet's httpGet probe asks it: from the node, `GET /ready` on
//! the pod's 15021.

use super::*;
use std::io::{Read, Write};

pub struct Late {
    pub pod: Pod,
    pub sidecar: String,
    pub client: Pod,
    pub client_c: String,
}

/// `GET /ready` from the node; the status code (0 when nothing answered).
fn ready_code(ip: &str) -> u16 {
    let Ok(addr) = format!("{ip}:15021").parse::<std::net::SocketAddr>() else {
        return 0;
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /ready HTTP/1.0\r\nHost: probe\r\n\r\n")
        .is_err()
    {
        return 0;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Before the installer: the pods, through the primary-only conflist.
pub async fn before_installer(node: &mut Node, t: &mut Tally) -> Result<Late> {
    let repo = node.a.repo.clone();
    let example = ExampleSidecar::read(&repo)?;
    let tb = node.a.testbox.clone();

    let client = node
        .run_pod(node.pod_config("late-client", "default", &[], false))
        .await?;
    let cc = node.container("sleep", &tb, &["sleep", "3600"], vec![]);
    let client_c = node.start(&client, cc).await?;

    let name = "httpbin-late";
    let ann = [("tproxy-cni.io/mode", "tproxy")];
    let pod = node
        .run_pod(node.pod_config(name, "default", &ann, false))
        .await?;
    let info = node.a.work.join("podinfo").join(name);
    downward_api(&info, &ann)?;
    let app = node.container(
        "httpbin",
        &tb,
        &["httpd", "-f", "-p", "8000", "-h", "/www"],
        vec![],
    );
    node.start(&pod, app).await?;
    let sc = example.config(node, &info, example.sc.clone());
    let sidecar = node.start(&pod, sc).await?;

    // What containerd's libcni cached for it: the reconcile loop's only source.
    let cache = PathBuf::from(format!("/var/lib/cni/results/primary-{}-eth0", pod.id));
    let cached = std::fs::read_to_string(&cache)
        .with_context(|| format!("containerd's cache entry {}", cache.display()));
    t.check(
        "late pod (primary-only conflist): containerd's libcni cache holds its annotations, \
         addresses and netns",
        cached.and_then(|text| {
            eprintln!("late pod: {} = {text}", cache.display());
            let v: Json = serde_json::from_str(&text)?;
            let ann = &v["capabilityArgs"]["io.kubernetes.cri.pod-annotations"];
            if ann["tproxy-cni.io/mode"] != "tproxy" {
                bail!("no pod annotations in capabilityArgs: {text}");
            }
            let sandbox = v["result"]["interfaces"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|i| i["sandbox"].as_str().is_some_and(|s| !s.is_empty()));
            if v["kind"] != "cniCacheV1" || !sandbox || v["result"]["ips"].is_null() {
                bail!("not the libcni cache entry the loop reads: {text}");
            }
            Ok(())
        }),
    );
    // The sidecar is up (its admin port answers) but not ready: nothing intercepts yet.
    let ip = pod.ip.clone();
    let not_ready = wait_for("the sidecar's admin port", Duration::from_secs(30), || {
        Ok(ready_code(&ip) != 0)
    })
    .await
    .and_then(|()| match ready_code(&ip) {
        200 => bail!("the sidecar says ready although no rule is programmed"),
        _ => Ok(()),
    });
    t.check(
        "late pod before the installer: its sidecar is not ready (no rules)",
        not_ready,
    );
    Ok(Late {
        pod,
        sidecar,
        client,
        client_c,
    })
}

/// After the installer chained us: the loop programs the late pod; nothing restarts.
pub async fn after_installer(node: &mut Node, t: &mut Tally, late: Late, installer_log: &Path) {
    let ip = late.pod.ip.clone();
    let t0 = Instant::now();
    let ready = wait_for(
        "the late pod's sidecar ready",
        Duration::from_secs(30),
        || Ok(ready_code(&ip) == 200),
    )
    .await;
    let took = t0.elapsed();
    let log = std::fs::read_to_string(installer_log).unwrap_or_default();
    t.check(
        &format!(
            "late pod: the installer's reconcile loop programs it, its sidecar turns ready \
             (ready {} ms after this client saw our entry in the conflist)",
            took.as_millis()
        ),
        ready.and_then(|()| {
            if !log.contains("reconcile: default/httpbin-late")
                || !log.contains("repaired (missing")
            {
                bail!("no repair of default/httpbin-late in the installer's log:\n{log}");
            }
            Ok(())
        }),
    );
    // Same container, still running, started once: no restart was needed.
    let r = async {
        let (state, _) = node.state(&late.sidecar).await?;
        if state != ContainerState::ContainerRunning as i32 {
            bail!("the sidecar is not running (state {state})");
        }
        let req = format!(
            "printf 'GET /cgi-bin/ip HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {} 8000",
            late.pod.ip
        );
        let out = node.exec(&late.client_c, &req).await?;
        let peer = out
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_start_matches("::ffff:")
            .to_string();
        if peer != late.client.ip {
            bail!("the app saw {peer:?}, want the client's {}", late.client.ip);
        }
        let sc_log =
            std::fs::read_to_string(late.pod.logs.join("tproxy-sidecar/0.log")).unwrap_or_default();
        if !sc_log.contains("\"mode\":\"tproxy\"") {
            bail!("the sidecar did not log the connection: {sc_log}");
        }
        Ok(())
    }
    .await;
    t.check(
        "late pod: the same sidecar container, never restarted, proxies with the client's IP",
        r,
    );
    for p in [&late.pod, &late.client] {
        let id = p.id.clone();
        let r = node.stop_remove(&id).await;
        t.check("late pods: StopPodSandbox twice + RemovePodSandbox", r);
    }
}
