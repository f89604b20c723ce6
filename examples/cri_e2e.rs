//! The CRI half of the real-runtime run (`scripts/runtime-e2e.sh` starts containerd and calls
//! this inside the node's network namespace). It speaks the Kubernetes CRI v1 API to containerd
//! the way kubelet does, with the settings and security contexts read from `manifests/`:
//!
//! 0. a TPROXY pod and a client set up while the conflist holds only the primary (`late`);
//! 1. the installer container of `manifests/base/daemonset.yaml` (host network, the node's CNI conf
//!    and bin dirs, libcni's cache and the netns dir mounted in, `settings.json` from
//!    `manifests/base/configmap.yaml`) chains tproxy-cni into the primary conflist, and its reconcile
//!    loop programs the late pod, whose sidecar turns ready with no restart;
//! 2. a TPROXY pod (app + the sidecar of `manifests/examples/native/httpbin.yaml`) whose app sees the
//!    client pod's IP; a REDIRECT pod whose app sees 127.0.0.6; a pod with a bad annotation
//!    whose RunPodSandbox fails naming the key and leaks nothing;
//! 3. StopPodSandbox twice and RemovePodSandbox: every DEL succeeds;
//! 4. the installer stops (SIGTERM): our entry is gone, the primary's plugins are intact.
//!
//! Stand-ins, said plainly: there is no kubelet here; this client plays its part (it writes the
//! downward-API annotations file itself and applies `runAsNonRoot` as kubelet does). The app is
//! busybox `httpd` with a CGI script answering with `REMOTE_ADDR`; the client is busybox `nc`.
//!
//! Prints `PASS name` / `FAIL name: why` per check and ends with `N passed, M failed`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

type Cri = RuntimeServiceClient<Channel>;

#[path = "cri_e2e/late.rs"]
mod late;

/// Generous: the 2-core CI machine is shared.
const CALL: Duration = Duration::from_secs(60);
const OUR_TYPE: &str = "tproxy-cni";

struct Args {
    socket: PathBuf,
    work: PathBuf,
    repo: PathBuf,
    /// Cargo's target dir (the image archive and the static installer binary are there).
    target: PathBuf,
    image: String,
    testbox: String,
}

fn args() -> Result<Args> {
    let mut m = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| anyhow!("{k} needs a value"))?;
        m.insert(k, v);
    }
    let mut get = |k: &str| m.remove(k).ok_or_else(|| anyhow!("missing {k}"));
    Ok(Args {
        socket: get("--socket")?.into(),
        work: get("--work")?.into(),
        repo: get("--repo")?.into(),
        target: get("--target-dir")?.into(),
        image: get("--image")?,
        testbox: get("--testbox")?,
    })
}

#[derive(Default)]
struct Tally {
    passed: u32,
    failed: u32,
}

impl Tally {
    fn check(&mut self, name: &str, r: Result<()>) -> bool {
        match r {
            Ok(()) => {
                self.passed += 1;
                println!("PASS {name}");
                true
            }
            Err(e) => {
                self.failed += 1;
                println!("FAIL {name}: {e:#}");
                false
            }
        }
    }
}

async fn connect(sock: &Path) -> Result<Cri> {
    let sock = sock.to_path_buf();
    let ch = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let sock = sock.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(sock).await?)) }
        }))
        .await
        .context("connect to containerd's CRI socket")?;
    Ok(RuntimeServiceClient::new(ch))
}

/// Awaits a CRI call with a deadline; the gRPC status message becomes the error text.
async fn call<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(CALL, f).await {
        Err(_) => bail!("{what}: no answer within {CALL:?}"),
        Ok(Err(s)) => bail!("{what}: {} ({:?})", s.message(), s.code()),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

fn sh(cmd: &str) -> Result<String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()?;
    if !out.status.success() {
        bail!("`{cmd}`: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ------------------------------------------------------------------------------- manifests

fn yaml_docs(path: &Path) -> Result<Vec<Yaml>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut out = Vec::new();
    for d in serde_yaml::Deserializer::from_str(&text) {
        out.push(serde::Deserialize::deserialize(d).with_context(|| path.display().to_string())?);
    }
    Ok(out)
}

/// The pod template of the first workload (Deployment/DaemonSet) in a manifest file.
fn pod_template(path: &Path) -> Result<Yaml> {
    yaml_docs(path)?
        .into_iter()
        .find_map(|d| {
            let t = d.get("spec")?.get("template")?;
            Some(t.clone())
        })
        .ok_or_else(|| anyhow!("{}: no pod template", path.display()))
}

/// A container of a pod template by name, looked up in `containers` and `initContainers` (a
/// native sidecar is an init container with `restartPolicy: Always`).
fn container<'a>(tmpl: &'a Yaml, name: &str) -> Result<&'a Yaml> {
    let spec = tmpl
        .get("spec")
        .ok_or_else(|| anyhow!("template has no spec"))?;
    ["containers", "initContainers"]
        .iter()
        .filter_map(|k| spec.get(*k)?.as_sequence())
        .flatten()
        .find(|c| c.get("name").and_then(Yaml::as_str) == Some(name))
        .ok_or_else(|| anyhow!("no container {name:?}"))
}

/// The sidecar container of `manifests/examples/native/httpbin.yaml`, as the manifest gives it.
struct ExampleSidecar {
    cmd: Vec<String>,
    args: Vec<String>,
    sc: LinuxContainerSecurityContext,
    /// Where the downward-API volume (the pod's annotations) is mounted.
    podinfo_mount: String,
}

impl ExampleSidecar {
    fn read(repo: &Path) -> Result<ExampleSidecar> {
        let example = pod_template(&repo.join("manifests/examples/native/httpbin.yaml"))?;
        let c = container(&example, "tproxy-sidecar")?;
        Ok(ExampleSidecar {
            cmd: strs(c.get("command")),
            args: strs(c.get("args")),
            sc: security_context(&example, c)?,
            podinfo_mount: c
                .get("volumeMounts")
                .and_then(Yaml::as_sequence)
                .into_iter()
                .flatten()
                .find_map(|m| m.get("mountPath").and_then(Yaml::as_str))
                .unwrap_or("/etc/podinfo")
                .to_string(),
        })
    }

    /// Its CRI config: the image, the manifest's command and args, the pod's downward-API
    /// dir `info` mounted read-only, and the security context `sec`.
    fn config(
        &self,
        node: &Node,
        info: &Path,
        sec: LinuxContainerSecurityContext,
    ) -> ContainerConfig {
        let mut c = node.container(
            "tproxy-sidecar",
            &node.a.image,
            &self.cmd.iter().map(String::as_str).collect::<Vec<_>>(),
            self.args.clone(),
        );
        c.mounts = vec![Mount {
            container_path: self.podinfo_mount.clone(),
            host_path: info.display().to_string(),
            readonly: true,
            ..Default::default()
        }];
        c.linux = Some(LinuxContainerConfig {
            security_context: Some(sec),
            ..Default::default()
        });
        c
    }
}

fn strs(v: Option<&Yaml>) -> Vec<String> {
    v.and_then(Yaml::as_sequence)
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What kubelet turns a container's (and its pod's) securityContext into.
fn security_context(pod: &Yaml, c: &Yaml) -> Result<LinuxContainerSecurityContext> {
    let sc = c.get("securityContext");
    let psc = pod.get("spec").and_then(|s| s.get("securityContext"));
    let field = |k: &str| {
        sc.and_then(|s| s.get(k))
            .or_else(|| psc.and_then(|s| s.get(k)))
    };
    let int = |k: &str| {
        field(k)
            .and_then(Yaml::as_i64)
            .map(|value| Int64Value { value })
    };
    let flag = |k: &str| field(k).and_then(Yaml::as_bool);
    let caps = sc.and_then(|s| s.get("capabilities"));
    let run_as_user = int("runAsUser");
    // kubelet refuses to start a runAsNonRoot container whose uid is 0.
    if flag("runAsNonRoot") == Some(true) && run_as_user.as_ref().is_none_or(|u| u.value == 0) {
        bail!("runAsNonRoot with uid 0 or none: kubelet would refuse this container");
    }
    let seccomp = field("seccompProfile")
        .and_then(|p| p.get("type"))
        .and_then(Yaml::as_str)
        .map(|t| SecurityProfile {
            profile_type: match t {
                "RuntimeDefault" => security_profile::ProfileType::RuntimeDefault,
                _ => security_profile::ProfileType::Unconfined,
            } as i32,
            ..Default::default()
        });
    // The SELinux type asked for (the installer's spc_t) goes to the runtime as kubelet sends
    // it; on a host without SELinux (this test's) the runtime must accept and ignore it.
    let selinux_options = field("seLinuxOptions").map(|o| {
        let s = |k: &str| {
            o.get(k)
                .and_then(Yaml::as_str)
                .unwrap_or_default()
                .to_string()
        };
        SeLinuxOption {
            user: s("user"),
            role: s("role"),
            r#type: s("type"),
            level: s("level"),
        }
    });
    Ok(LinuxContainerSecurityContext {
        selinux_options,
        capabilities: Some(Capability {
            add_capabilities: strs(caps.and_then(|c| c.get("add"))),
            drop_capabilities: strs(caps.and_then(|c| c.get("drop"))),
            ..Default::default()
        }),
        privileged: flag("privileged").unwrap_or(false),
        run_as_user,
        run_as_group: int("runAsGroup"),
        readonly_rootfs: flag("readOnlyRootFilesystem").unwrap_or(false),
        // kubelet: no_new_privs unless allowPrivilegeEscalation is true (or privileged).
        no_new_privs: flag("allowPrivilegeEscalation") == Some(false),
        seccomp,
        ..Default::default()
    })
}

// ------------------------------------------------------------------------------ the node

struct Node {
    cri: Cri,
    a: Args,
    sandboxes: Vec<String>,
}

struct Pod {
    id: String,
    ip: String,
    config: PodSandboxConfig,
    logs: PathBuf,
}

impl Node {
    fn pod_config(
        &self,
        name: &str,
        ns: &str,
        ann: &[(&str, &str)],
        host_net: bool,
    ) -> PodSandboxConfig {
        let uid = format!("{name}-uid-{}", std::process::id());
        let logs = self.a.work.join("logs").join(format!("{ns}_{name}_{uid}"));
        let labels = HashMap::from([
            ("app".to_string(), name.to_string()),
            ("io.kubernetes.pod.name".to_string(), name.to_string()),
            ("io.kubernetes.pod.namespace".to_string(), ns.to_string()),
            ("io.kubernetes.pod.uid".to_string(), uid.clone()),
        ]);
        let mut annotations: HashMap<String, String> = ann
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        annotations.insert("kubernetes.io/config.source".into(), "api".into());
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid,
                namespace: ns.into(),
                attempt: 0,
            }),
            // kubelet leaves the hostname empty for host-network pods (the node's own).
            hostname: if host_net { String::new() } else { name.into() },
            log_directory: logs.display().to_string(),
            labels,
            annotations,
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: if host_net {
                            NamespaceMode::Node
                        } else {
                            NamespaceMode::Pod
                        } as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn run_pod(&mut self, config: PodSandboxConfig) -> Result<Pod> {
        let logs = PathBuf::from(&config.log_directory);
        std::fs::create_dir_all(&logs)?;
        let r = call(
            "RunPodSandbox",
            self.cri.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }),
        )
        .await?;
        self.sandboxes.push(r.pod_sandbox_id.clone());
        let st = call(
            "PodSandboxStatus",
            self.cri.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: r.pod_sandbox_id.clone(),
                verbose: false,
            }),
        )
        .await?;
        let ip = st
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        Ok(Pod {
            id: r.pod_sandbox_id,
            ip,
            config,
            logs,
        })
    }

    async fn start(&mut self, pod: &Pod, c: ContainerConfig) -> Result<String> {
        let name = c
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let r = call(
            &format!("CreateContainer {name}"),
            self.cri.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(c),
                sandbox_config: Some(pod.config.clone()),
            }),
        )
        .await?;
        call(
            &format!("StartContainer {name}"),
            self.cri.start_container(StartContainerRequest {
                container_id: r.container_id.clone(),
            }),
        )
        .await?;
        Ok(r.container_id)
    }

    fn container(
        &self,
        name: &str,
        image: &str,
        cmd: &[&str],
        args: Vec<String>,
    ) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            args,
            log_path: format!("{name}/0.log"),
            linux: Some(LinuxContainerConfig::default()),
            ..Default::default()
        }
    }

    async fn state(&mut self, id: &str) -> Result<(i32, i32)> {
        let st = call(
            "ContainerStatus",
            self.cri.container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            }),
        )
        .await?
        .status
        .ok_or_else(|| anyhow!("no status"))?;
        Ok((st.state, st.exit_code))
    }

    /// `/proc/PID/status` of a container's process (pid from the verbose status).
    async fn proc_status(&mut self, id: &str) -> Result<String> {
        let r = call(
            "ContainerStatus verbose",
            self.cri.container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: true,
            }),
        )
        .await?;
        let info: Json =
            serde_json::from_str(r.info.get("info").map(String::as_str).unwrap_or("{}"))?;
        let pid = info["pid"]
            .as_u64()
            .ok_or_else(|| anyhow!("no pid in the verbose status"))?;
        Ok(std::fs::read_to_string(format!("/proc/{pid}/status"))?)
    }

    async fn exec(&mut self, id: &str, cmd: &str) -> Result<String> {
        let r = call(
            "ExecSync",
            self.cri.exec_sync(ExecSyncRequest {
                container_id: id.into(),
                cmd: vec!["sh".into(), "-c".into(), cmd.into()],
                timeout: 15,
            }),
        )
        .await?;
        if r.exit_code != 0 {
            bail!(
                "`{cmd}` exited {}: {}",
                r.exit_code,
                String::from_utf8_lossy(&r.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&r.stdout).into_owned())
    }

    async fn stop_remove(&mut self, id: &str) -> Result<()> {
        for n in 1..=2 {
            call(
                &format!("StopPodSandbox #{n}"),
                self.cri.stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: id.into(),
                }),
            )
            .await?;
        }
        call(
            "RemovePodSandbox",
            self.cri.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            }),
        )
        .await?;
        self.sandboxes.retain(|s| s != id);
        Ok(())
    }

    async fn sandbox_count(&mut self) -> Result<usize> {
        Ok(call(
            "ListPodSandbox",
            self.cri
                .list_pod_sandbox(ListPodSandboxRequest { filter: None }),
        )
        .await?
        .items
        .len())
    }

    fn conf_dir(&self) -> PathBuf {
        self.a.work.join("cni/net.d")
    }
    fn bin_dir(&self) -> PathBuf {
        self.a.work.join("cni/bin")
    }
    fn primary(&self) -> Result<Json> {
        let p = self.conf_dir().join("10-primary.conflist");
        let text = std::fs::read_to_string(&p).with_context(|| p.display().to_string())?;
        Ok(serde_json::from_str(&text)?)
    }

    /// What a leak would leave: veths on the node, host-local allocations, pod netns files.
    fn leftovers(&self) -> Result<(usize, usize, usize)> {
        let veths = sh("ip -o link show type veth")?.lines().count();
        let count = |d: PathBuf, skip: &dyn Fn(&str) -> bool| -> usize {
            std::fs::read_dir(d)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .filter(|e| !skip(&e.file_name().to_string_lossy()))
                        .count()
                })
                .unwrap_or(0)
        };
        let ips = count(self.a.work.join("ipam/primary"), &|n| {
            n == "lock" || n.starts_with("last_reserved_ip")
        });
        let netns = count(
            self.a.work.join("state/io.containerd.grpc.v1.cri/netns"),
            &|_| false,
        );
        Ok((veths, ips, netns))
    }
}

/// Kubelet's downward-API file for `metadata.annotations` (`key="value"` lines, Go-quoted).
fn downward_api(dir: &Path, ann: &[(&str, &str)]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut lines: Vec<String> = ann
        .iter()
        .map(|(k, v)| format!("{k}={}", serde_json::to_string(v).unwrap_or_default()))
        .collect();
    lines.sort();
    std::fs::write(dir.join("annotations"), lines.join("\n") + "\n")?;
    sh(&format!("chmod -R a+rX {}", dir.display()))?;
    Ok(())
}

fn entry_present(list: &Json) -> bool {
    list["plugins"]
        .as_array()
        .is_some_and(|p| p.iter().any(|x| x["type"] == OUR_TYPE))
}

async fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let t = Instant::now();
    loop {
        if f()? {
            return Ok(());
        }
        if t.elapsed() > within {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ------------------------------------------------------------------------- the image layer

/// A tar member: name, the PAX records of its entry, its data.
type TarMember<'a> = (String, HashMap<String, Vec<u8>>, &'a [u8]);

/// Members of a tar archive: (name, PAX records of the entry, data). Enough for the archives
/// scripts/oci-image.py writes (ustar headers, PAX `x` headers, names under 100 bytes).
fn tar_members(data: &[u8]) -> Result<Vec<TarMember<'_>>> {
    let mut out = Vec::new();
    let mut pax = HashMap::new();
    let mut off = 0;
    while off + 512 <= data.len() {
        let h = &data[off..off + 512];
        if h.iter().all(|b| *b == 0) {
            break;
        }
        let field = |r: std::ops::Range<usize>| {
            let f = &h[r];
            String::from_utf8_lossy(&f[..f.iter().position(|b| *b == 0).unwrap_or(f.len())])
                .trim()
                .to_string()
        };
        let name = field(0..100);
        let size = usize::from_str_radix(&field(124..136), 8)
            .with_context(|| format!("tar header of {name:?}: bad size"))?;
        let body = data
            .get(off + 512..off + 512 + size)
            .ok_or_else(|| anyhow!("tar member {name:?} truncated"))?;
        off += 512 + size.div_ceil(512) * 512;
        match h[156] {
            b'x' => {
                // Records: "LEN key=value\n", LEN counting the whole record.
                let mut rest = body;
                while !rest.is_empty() {
                    let sp = rest
                        .iter()
                        .position(|b| *b == b' ')
                        .ok_or_else(|| anyhow!("pax"))?;
                    let len: usize = std::str::from_utf8(&rest[..sp])?.parse()?;
                    let rec = rest
                        .get(sp + 1..len.saturating_sub(1))
                        .ok_or_else(|| anyhow!("pax"))?;
                    let eq = rec
                        .iter()
                        .position(|b| *b == b'=')
                        .ok_or_else(|| anyhow!("pax"))?;
                    pax.insert(
                        String::from_utf8_lossy(&rec[..eq]).into_owned(),
                        rec[eq + 1..].to_vec(),
                    );
                    rest = &rest[len..];
                }
            }
            b'g' => {}
            _ => out.push((name, std::mem::take(&mut pax), body)),
        }
    }
    Ok(out)
}

/// The `security.capability` xattr that the image's layer stores for `path`.
fn layer_file_cap(archive: &Path, path: &str) -> Result<Option<Vec<u8>>> {
    let data = std::fs::read(archive).with_context(|| archive.display().to_string())?;
    let outer = tar_members(&data)?;
    let manifest = outer
        .iter()
        .find(|m| m.0 == "manifest.json")
        .ok_or_else(|| anyhow!("no manifest.json"))?;
    let manifest: Json = serde_json::from_slice(manifest.2)?;
    let mut found = None;
    for layer in manifest[0]["Layers"].as_array().into_iter().flatten() {
        let name = layer.as_str().unwrap_or_default();
        let blob = outer
            .iter()
            .find(|m| m.0 == name)
            .ok_or_else(|| anyhow!("layer {name} missing"))?;
        for (n, pax, _) in tar_members(blob.2)? {
            if n == path {
                found = Some(pax.get("SCHILY.xattr.security.capability").cloned());
            }
        }
    }
    found.ok_or_else(|| anyhow!("{path} not in any layer"))
}

// ------------------------------------------------------------------------------- the run

/// The idle sidecar's resident memory may be at most 3 MiB (docs/ARCHITECTURE.md, pitfall 91).
const MAX_SIDECAR_RSS_KIB: u64 = 3 * 1024;

/// `VmRSS` of a `/proc/PID/status` text, in KiB.
fn vm_rss_kib(status: &str) -> Result<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/PID/status:\n{status}"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut t = Tally::default();
    let r = run(&mut t).await;
    if let Err(e) = r {
        t.check("run completed", Err(e));
    }
    println!("{} passed, {} failed", t.passed, t.failed);
    std::process::exit(if t.failed == 0 { 0 } else { 1 });
}

async fn run(t: &mut Tally) -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("--cleanup") {
        // The script's cleanup after an interrupt: stop and remove every sandbox, so that
        // containerd runs DEL for each (netns, veth, IP, libcni cache all released).
        let sock = std::env::args()
            .nth(2)
            .ok_or_else(|| anyhow!("--cleanup SOCKET"))?;
        let mut cri = connect(Path::new(&sock)).await?;
        let items = call(
            "ListPodSandbox",
            cri.list_pod_sandbox(ListPodSandboxRequest { filter: None }),
        )
        .await?
        .items;
        for sb in items {
            let id = sb.id;
            let _ = call(
                "StopPodSandbox",
                cri.stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                }),
            )
            .await;
            let _ = call(
                "RemovePodSandbox",
                cri.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id }),
            )
            .await;
        }
        std::process::exit(0);
    }
    let a = args()?;
    let cri = connect(&a.socket).await?;
    let mut node = Node {
        cri,
        a,
        sandboxes: Vec::new(),
    };
    let r = scenario(&mut node, t).await;
    // Whatever a failed step left: stop and remove (the script kills what even this leaves).
    for id in node.sandboxes.clone() {
        let _ = node.stop_remove(&id).await;
    }
    r
}

async fn scenario(node: &mut Node, t: &mut Tally) -> Result<()> {
    let repo = node.a.repo.clone();
    let original = node.primary()?;

    // ---- 0. the image carries the sidecar's file capability in its layer
    // vfs_cap_data revision 2 without the effective flag (the sidecar raises it itself, so a
    // container without NET_RAW can still execute the binary), permitted = CAP_NET_RAW (bit 13).
    let want: [u8; 20] = [
        0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    t.check(
        "image layer: usr/local/bin/tproxy-sidecar has security.capability = cap_net_raw+p",
        layer_file_cap(
            &node.a.target.join("image/tproxy-cni.oci.tar"),
            "usr/local/bin/tproxy-sidecar",
        )
        .and_then(|cap| match cap {
            Some(c) if c == want => Ok(()),
            Some(c) => Err(anyhow!("xattr is {c:02x?}, want {want:02x?}")),
            None => Err(anyhow!("no SCHILY.xattr.security.capability record")),
        }),
    );

    // ---- 0. pods set up before the installer (a new node, a primary rewrite, a restart)
    let late = late::before_installer(node, t).await?;

    // ---- 1. the installer, as the DaemonSet runs it
    let ds = pod_template(&repo.join("manifests/base/daemonset.yaml"))?;
    let inst = container(&ds, "install")?;
    let cm = yaml_docs(&repo.join("manifests/base/configmap.yaml"))?;
    let settings = cm
        .iter()
        .find_map(|d| {
            d.get("data")?
                .get("settings.json")?
                .as_str()
                .map(str::to_string)
        })
        .ok_or_else(|| anyhow!("manifests/base/configmap.yaml: no data.settings.json"))?;
    let settings_dir = node.a.work.join("configmap");
    std::fs::create_dir_all(&settings_dir)?;
    std::fs::write(settings_dir.join("settings.json"), &settings)?;
    let health = node.a.work.join("health");
    std::fs::create_dir_all(&health)?;
    std::fs::create_dir_all("/run/tproxy-cni/locks")?;
    // The DaemonSet's volumes, with the node's dirs being our temp ones.
    let host_of = |mount_path: &str| -> Option<PathBuf> {
        match mount_path {
            "/host/opt/cni/bin" => Some(node.bin_dir()),
            "/host/etc/cni/net.d" => Some(node.conf_dir()),
            "/etc/tproxy-cni" => Some(settings_dir.clone()),
            "/run/tproxy-cni" => Some(health.clone()),
            // The plugin's per-netns locks: the node's own dir, where the plugin that containerd
            // runs takes them (hostPath DirectoryOrCreate: created below).
            "/run/tproxy-cni/locks" => Some(PathBuf::from("/run/tproxy-cni/locks")),
            // containerd 1.6 keeps libcni's cache here, not configurable (pitfall 44).
            "/host/var/lib/cni" => Some(PathBuf::from("/var/lib/cni")),
            // Pod netns under containerd's state dir (netns_mounts_under_state_dir).
            "/host/var/run/netns" => {
                Some(node.a.work.join("state/io.containerd.grpc.v1.cri/netns"))
            }
            _ => None,
        }
    };
    let mut mounts = Vec::new();
    for m in inst
        .get("volumeMounts")
        .and_then(Yaml::as_sequence)
        .into_iter()
        .flatten()
    {
        let path = m
            .get("mountPath")
            .and_then(Yaml::as_str)
            .unwrap_or_default();
        let host = host_of(path)
            .ok_or_else(|| anyhow!("daemonset mount {path}: no stand-in for it in this run"))?;
        mounts.push(Mount {
            container_path: path.into(),
            host_path: host.display().to_string(),
            readonly: m.get("readOnly").and_then(Yaml::as_bool).unwrap_or(false),
            propagation: match m.get("mountPropagation").and_then(Yaml::as_str) {
                Some("HostToContainer") => MountPropagation::PropagationHostToContainer as i32,
                Some("Bidirectional") => MountPropagation::PropagationBidirectional as i32,
                _ => MountPropagation::PropagationPrivate as i32,
            },
            ..Default::default()
        });
    }
    let inst_cmd = strs(inst.get("command"));
    let inst_args = strs(inst.get("args"));
    let inst_sc = security_context(&ds, inst)?;
    let inst_pod = node.pod_config("tproxy-cni-node", "tproxy-cni", &[], true);
    let inst_pod = node.run_pod(inst_pod).await.context("installer sandbox")?;
    let mk_installer = |node: &Node, name: &str, extra: &[&str]| {
        let mut c = node.container(
            name,
            &node.a.image,
            &inst_cmd.iter().map(String::as_str).collect::<Vec<_>>(),
            inst_args
                .iter()
                .cloned()
                .chain(extra.iter().map(|s| s.to_string()))
                .collect(),
        );
        c.mounts = mounts.clone();
        c.linux = Some(LinuxContainerConfig {
            security_context: Some(inst_sc.clone()),
            ..Default::default()
        });
        c
    };
    // Never break a node: with one of the primary's binaries missing from the bin dir (as when
    // the DaemonSet mounts a dir the runtime does not search), the installer must not chain us
    // and must say why; once the binary is there it chains at the next resync (10 s).
    let portmap = node.bin_dir().join("portmap");
    let hidden = node.bin_dir().join(".portmap.hidden");
    std::fs::rename(&portmap, &hidden).context("hiding portmap")?;
    let c = mk_installer(node, "install", &[]);
    let installer = node.start(&inst_pod, c).await?;
    let conf = node.conf_dir().join("10-primary.conflist");
    let bin = node.bin_dir().join(OUR_TYPE);
    let reason = health.join("reason");
    let refused = wait_for(
        "the installer's reason file",
        Duration::from_secs(30),
        || Ok(std::fs::read_to_string(&reason).is_ok_and(|r| r.contains("portmap"))),
    )
    .await
    .and_then(|()| {
        let list: Json = serde_json::from_str(&std::fs::read_to_string(&conf)?)?;
        if entry_present(&list) {
            bail!("our entry was written although portmap is missing: {list}");
        }
        if health.join("ready").exists() {
            bail!("the installer says ready although portmap is missing");
        }
        Ok(())
    });
    t.check(
        "installer refuses to chain while a primary binary (portmap) is missing: no entry, not \
         ready, the reason names it",
        refused,
    );
    std::fs::rename(&hidden, &portmap).context("restoring portmap")?;
    let chained = wait_for(
        "tproxy-cni entry and binary",
        Duration::from_secs(30),
        || {
            let list: Json = serde_json::from_str(&std::fs::read_to_string(&conf)?)?;
            Ok(entry_present(&list) && bin.exists())
        },
    )
    .await;
    let ok = t.check(
        "installer (image, DaemonSet settings) chains tproxy-cni into the primary conflist",
        chained.and_then(|()| {
            let list = node.primary()?;
            let last = list["plugins"]
                .as_array()
                .and_then(|p| p.last())
                .ok_or_else(|| anyhow!("no plugins"))?;
            if last["type"] != OUR_TYPE {
                bail!("our entry is not last: {list}");
            }
            let want: Json = serde_json::from_str(&settings)?;
            for (k, v) in want.as_object().into_iter().flatten() {
                if &last[k] != v {
                    bail!("entry {k} = {} but the ConfigMap says {v}", last[k]);
                }
            }
            Ok(())
        }),
    );
    if !ok {
        let log = std::fs::read_to_string(inst_pod.logs.join("install/0.log")).unwrap_or_default();
        bail!("installer did not chain the plugin; its log:\n{log}");
    }
    late::after_installer(node, t, late, &inst_pod.logs.join("install/0.log")).await;

    // ---- 2. pods through CRI, as kubelet creates them
    let sidecar = ExampleSidecar::read(&repo)?;
    let tb = node.a.testbox.clone();

    let client = node
        .run_pod(node.pod_config("sleep", "default", &[], false))
        .await?;
    let cc = node.container("sleep", &tb, &["sleep", "3600"], vec![]);
    let client_c = node.start(&client, cc).await?;

    for (mode, want_peer) in [
        ("tproxy", client.ip.clone()),
        ("redirect", "127.0.0.6".to_string()),
    ] {
        let name = format!("httpbin-{mode}");
        let ann = [("tproxy-cni.io/mode", mode)];
        let pod = node
            .run_pod(node.pod_config(&name, "default", &ann, false))
            .await?;
        let res = async {
            let pod = &pod;
            let info = node.a.work.join("podinfo").join(&name);
            downward_api(&info, &ann)?;
            let app = node.container(
                "httpbin",
                &tb,
                &["httpd", "-f", "-p", "8000", "-h", "/www"],
                vec![],
            );
            node.start(pod, app).await?;
            // Redirect mode needs no capability: its pod drops ALL and adds nothing, which the
            // image's permitted-only file capability allows (docs/ARCHITECTURE.md, pitfall 19).
            let mut sec = sidecar.sc.clone();
            if mode == "redirect" {
                if let Some(c) = sec.capabilities.as_mut() {
                    c.add_capabilities.clear();
                }
            }
            let sc = sidecar.config(node, &info, sec);
            let sc_id = node.start(pod, sc).await?;
            let sc_log = pod.logs.join("tproxy-sidecar/0.log");
            // The app's view, asked from the client pod (retried while the sidecar starts).
            let req = format!(
                "printf 'GET /cgi-bin/ip HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {} 8000",
                pod.ip
            );
            let t0 = Instant::now();
            let peer = loop {
                let (state, code) = node.state(&sc_id).await?;
                if state == ContainerState::ContainerExited as i32 {
                    bail!(
                        "the sidecar exited ({code}) with the manifest's security context: {}",
                        std::fs::read_to_string(&sc_log).unwrap_or_default().trim()
                    );
                }
                let out = node.exec(&client_c, &req).await;
                if let Ok(out) = &out {
                    let log = std::fs::read_to_string(&sc_log).unwrap_or_default();
                    if log.contains("\"mode\":") {
                        break out
                            .lines()
                            .rev()
                            .find(|l| !l.trim().is_empty())
                            .unwrap_or("")
                            .trim()
                            .to_string();
                    }
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    bail!(
                        "no proxied answer within 30 s (last: {out:?}); sidecar log: {}",
                        std::fs::read_to_string(&sc_log).unwrap_or_default().trim()
                    );
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            };
            // busybox httpd listens on [::] and reports IPv4 peers as "[::ffff:a.b.c.d]".
            let peer = peer
                .trim_start_matches('[')
                .trim_end_matches(']')
                .trim_start_matches("::ffff:")
                .to_string();
            if peer != want_peer {
                bail!("the app saw {peer:?}, want {want_peer:?}");
            }
            let log = std::fs::read_to_string(&sc_log).unwrap_or_default();
            if !log.contains(&format!("\"mode\":\"{mode}\"")) {
                bail!("the sidecar did not log a {mode} connection: {log}");
            }
            // The sidecar's process as the runtime started it (its image has no shell: read
            // /proc of its pid, which the verbose status reports).
            let status = node.proc_status(&sc_id).await?;
            Ok::<_, anyhow::Error>(status)
        }
        .await;
        let saw = format!("{mode} pod: app sees {want_peer} through the sidecar");
        match res {
            Ok(status) => {
                t.check(&saw, Ok(()));
                let (eff, what) = if mode == "redirect" {
                    ("CapEff:\t0000000000000000", "no capability (none added)")
                } else {
                    ("CapEff:\t0000000000002000", "exactly NET_RAW effective")
                };
                let want = [
                    "Uid:\t1337\t1337\t1337\t1337",
                    eff,
                    "CapAmb:\t0000000000000000",
                    "NoNewPrivs:\t1",
                ];
                t.check(
                    &format!(
                        "{mode} pod: sidecar runs as uid 1337 with {what}, no ambient set, \
                         no_new_privs"
                    ),
                    match want.iter().find(|w| !status.lines().any(|l| l == **w)) {
                        None => Ok(()),
                        Some(w) => Err(anyhow!("want {w:?} in /proc/PID/status:\n{status}")),
                    },
                );
                // What a sidecar costs every pod: the image's build, as the runtime started it,
                // after the connection above (docs/ARCHITECTURE.md, pitfall 91).
                t.check(
                    &format!("{mode} pod: sidecar RSS at most {MAX_SIDECAR_RSS_KIB} KiB"),
                    vm_rss_kib(&status).and_then(|kib| {
                        println!("  {mode} pod: sidecar VmRSS {kib} KiB");
                        if kib <= MAX_SIDECAR_RSS_KIB {
                            Ok(())
                        } else {
                            Err(anyhow!("VmRSS {kib} KiB"))
                        }
                    }),
                );
            }
            Err(e) => {
                t.check(&saw, Err(e));
            }
        }
        let r = node.stop_remove(&pod.id).await;
        t.check(
            &format!("{mode} pod: StopPodSandbox twice + RemovePodSandbox (every DEL succeeds)"),
            r,
        );
    }

    // ---- bad annotation: RunPodSandbox fails naming the key, nothing leaks
    let before = node.leftovers()?;
    let n_before = node.sandbox_count().await?;
    let bad = node.pod_config(
        "bad",
        "default",
        &[("tproxy-cni.io/mode", "sideways")],
        false,
    );
    let r = node.run_pod(bad).await;
    let after = node.leftovers()?;
    let n_after = node.sandbox_count().await?;
    t.check(
        "bad annotation: RunPodSandbox fails naming the key, no sandbox/netns/IP/veth leaked",
        match r {
            Ok(p) => Err(anyhow!("RunPodSandbox succeeded (pod {} ip {})", p.id, p.ip)),
            Err(e) if !format!("{e:#}").contains("tproxy-cni.io/mode") => {
                Err(anyhow!("error does not name the key: {e:#}"))
            }
            Err(_) if before != after || n_before != n_after => Err(anyhow!(
                "leaked: (veths, ips, netns) {before:?} -> {after:?}, sandboxes {n_before} -> {n_after}"
            )),
            Err(_) => Ok(()),
        },
    );

    let r = node.stop_remove(&client.id).await;
    t.check("client pod: StopPodSandbox twice + RemovePodSandbox", r);
    let (veths, ips, netns) = node.leftovers()?;
    t.check(
        "after every pod is gone: no veth, IP allocation or pod netns left",
        if (veths, ips, netns) == (0, 0, 0) {
            Ok(())
        } else {
            Err(anyhow!("veths {veths}, ips {ips}, netns {netns}"))
        },
    );

    // ---- 4. the installer stops (SIGTERM, grace period of the DaemonSet)
    let grace = ds
        .get("spec")
        .and_then(|s| s.get("terminationGracePeriodSeconds"))
        .and_then(Yaml::as_i64)
        .unwrap_or(30);
    call(
        "StopContainer installer",
        node.cri.stop_container(StopContainerRequest {
            container_id: installer.clone(),
            timeout: grace,
        }),
    )
    .await?;
    let after_term = node.primary()?;
    let mut how = "removed on SIGTERM";
    if entry_present(&after_term) {
        // Documented "keep on exit" behaviour: the explicit uninstall removes it.
        let help = sh(&format!(
            "{}/x86_64-unknown-linux-gnu/release/tproxy-cni-install --help",
            node.a.target.display()
        ))?;
        if help.contains("--uninstall") {
            how = "kept on SIGTERM, removed by --uninstall";
            let c = mk_installer(node, "uninstall", &["--uninstall"]);
            let id = node.start(&inst_pod, c).await?;
            let t0 = Instant::now();
            while node.state(&id).await?.0 != ContainerState::ContainerExited as i32 {
                if t0.elapsed() > Duration::from_secs(30) {
                    bail!("--uninstall did not exit within 30 s");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let end = node.primary()?;
    t.check(
        &format!("installer stop: our entry is gone ({how}), the primary's plugins are intact"),
        if entry_present(&end) {
            Err(anyhow!("entry still there: {end}"))
        } else if end["plugins"] != original["plugins"] {
            Err(anyhow!(
                "primary changed: {} -> {}",
                original["plugins"],
                end["plugins"]
            ))
        } else {
            Ok(())
        },
    );
    let r = node.stop_remove(&inst_pod.id).await;
    t.check("installer pod: StopPodSandbox twice + RemovePodSandbox", r);
    Ok(())
}
