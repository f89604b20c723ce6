//! Every YAML document under `manifests/` must be a valid Kubernetes object (k8s-openapi v1.34
//! types, with no field the schema does not know), kustomizations must list existing files, and
//! the installer/sidecar specs must keep the security properties the docs promise.
//!
//! What a user applies is what `kubectl kustomize` renders, so every kustomization is rendered
//! by the real `kubectl` (its built-in kustomize), the same command `kubectl apply -k` runs
//! first: the checks of overlays, examples and the platform table look at that output. kubectl is
//! part of the machines this project runs on (CI's included); where it is absent the rendering
//! tests say SKIP, and with `CI` set they fail. What kustomize does not check (the typed schema,
//! orphaned files) is checked on the source files and on the rendered output alike.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, ResourceQuota, Service, ServiceAccount, Volume,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
}

/// Every document of every YAML file, as JSON, with its origin for messages.
fn documents() -> Vec<(PathBuf, usize, Value)> {
    let mut files = Vec::new();
    yaml_files(&root(), &mut files);
    assert!(!files.is_empty(), "no manifests found");
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let v = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: document {i}: {e}", f.display()));
            if v.is_null() {
                continue; // an empty document (e.g. a trailing `---`)
            }
            let json = serde_json::to_value(&v)
                .unwrap_or_else(|e| panic!("{}: document {i}: {e}", f.display()));
            out.push((f.clone(), i, json));
        }
    }
    out
}

/// Asserts that everything in `orig` survives in `typed` (its re-serialised typed form): a key
/// the schema does not know is dropped by the typed round trip, and shows up here.
fn assert_subset(orig: &Value, typed: &Value, path: &str, at: &str) {
    match (orig, typed) {
        (Value::Object(o), Value::Object(t)) => {
            for (k, v) in o {
                let sub = format!("{path}.{k}");
                match t.get(k) {
                    Some(tv) => assert_subset(v, tv, &sub, at),
                    None => panic!("{at}: unknown field {sub} (typo, or not in the v1.34 schema)"),
                }
            }
        }
        (Value::Array(o), Value::Array(t)) => {
            assert_eq!(o.len(), t.len(), "{at}: {path}: list length changed");
            for (i, (a, b)) in o.iter().zip(t).enumerate() {
                assert_subset(a, b, &format!("{path}[{i}]"), at);
            }
        }
        _ => assert_eq!(
            orig, typed,
            "{at}: {path}: value changed in the typed round trip"
        ),
    }
}

fn strict<T: DeserializeOwned + Serialize>(v: &Value, at: &str) -> T {
    let typed: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{at}: does not match the schema: {e}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_subset(v, &back, "", at);
    typed
}

/// kustomize's own file, which k8s-openapi does not cover: the fields we use, nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct Kustomization {
    api_version: String,
    kind: String,
    #[serde(default)]
    namespace: Option<String>,
    resources: Vec<String>,
    #[serde(default)]
    images: Vec<KustomizeImage>,
    /// Checked by kustomize itself when it renders.
    #[serde(default)]
    patches: Vec<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[allow(dead_code)]
struct KustomizeImage {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
}

/// All typed objects, by kind.
#[derive(Default)]
struct Parsed {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    resource_quotas: Vec<ResourceQuota>,
    kustomizations: Vec<(PathBuf, Kustomization)>,
}

fn parse_all() -> Parsed {
    let mut p = Parsed::default();
    for (file, i, v) in documents() {
        let at = format!("{} doc {i}", file.display());
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        let api = v["apiVersion"].as_str().unwrap_or_default().to_string();
        match (api.as_str(), kind.as_str()) {
            ("v1", "Namespace") => p.namespaces.push(strict(&v, &at)),
            ("v1", "ServiceAccount") => p.service_accounts.push(strict(&v, &at)),
            ("v1", "ConfigMap") => p.config_maps.push(strict(&v, &at)),
            ("v1", "Service") => p.services.push(strict(&v, &at)),
            ("v1", "ResourceQuota") => p.resource_quotas.push(strict(&v, &at)),
            ("apps/v1", "DaemonSet") => p.daemon_sets.push(strict(&v, &at)),
            ("apps/v1", "Deployment") => p.deployments.push(strict(&v, &at)),
            ("kustomize.config.k8s.io/v1beta1", "Kustomization") => {
                let k: Kustomization =
                    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{at}: {e}"));
                p.kustomizations.push((file, k));
            }
            _ => panic!("{at}: unexpected {api} {kind}; add it to this test"),
        }
    }
    p
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn init_container<'a>(spec: &'a PodSpec, name: &str) -> Option<&'a Container> {
    spec.init_containers
        .as_ref()
        .and_then(|cs| cs.iter().find(|c| c.name == name))
}

/// The pod volume mounted at `mount_path` in container `c`.
fn mounted_volume<'a>(spec: &'a PodSpec, c: &Container, mount_path: &str) -> &'a Volume {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == mount_path)
        .unwrap_or_else(|| panic!("{}: nothing mounted at {mount_path}", c.name));
    spec.volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("{}: no volume {}", c.name, mount.name))
}

/// The directory a file under `manifests/` lives in, relative to `manifests/` ("" for the root).
fn rel_dir(file: &Path) -> String {
    file.parent()
        .and_then(|d| d.strip_prefix(root()).ok())
        .map(|d| d.display().to_string())
        .unwrap_or_default()
}

#[test]
fn every_document_matches_the_schema() {
    let p = parse_all();
    assert_eq!(p.namespaces.len(), 1);
    assert_eq!(p.daemon_sets.len(), 1);
    assert_eq!(p.config_maps.len(), 1);
    assert!(p.service_accounts.len() >= 2);
    assert_eq!(p.deployments.len(), 2);
    assert_eq!(p.services.len(), 3);
    assert_eq!(p.resource_quotas.len(), 1, "the GKE overlay's quota");
    // base/, examples/native/, examples/legacy/ and one overlay per platform.
    assert_eq!(p.kustomizations.len(), 3 + overlay_dirs().len());
}

#[test]
fn kustomizations_list_existing_files_and_nothing_is_orphaned() {
    let p = parse_all();
    let mut listed = BTreeSet::new();
    for (file, k) in &p.kustomizations {
        let dir = file.parent().unwrap();
        assert!(!k.resources.is_empty());
        for r in &k.resources {
            let path = dir.join(r);
            assert!(
                path.exists(),
                "{}: resource {r} does not exist",
                file.display()
            );
            listed.insert(path.canonicalize().unwrap());
        }
        assert_eq!(k.api_version, "kustomize.config.k8s.io/v1beta1");
    }
    let mut files = Vec::new();
    yaml_files(&root(), &mut files);
    for f in files {
        if f.file_name().and_then(|n| n.to_str()) == Some("kustomization.yaml") {
            continue;
        }
        assert!(
            listed.contains(&f.canonicalize().unwrap()),
            "{} is in no kustomization",
            f.display()
        );
    }
}

#[test]
fn installer_daemonset_is_least_privilege_and_complete() {
    let p = parse_all();
    let ds = &p.daemon_sets[0];
    let ns = p.namespaces[0].metadata.name.clone().unwrap();
    assert_eq!(ds.metadata.namespace.as_deref(), Some(ns.as_str()));
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    // Tolerate every taint: one toleration with operator Exists and no key.
    let tol = spec.tolerations.as_ref().unwrap();
    assert!(tol
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()));
    assert_eq!(spec.automount_service_account_token, Some(false));
    let sa = spec.service_account_name.as_deref().unwrap();
    assert!(p
        .service_accounts
        .iter()
        .any(|s| s.metadata.name.as_deref() == Some(sa)));

    // Host paths: the CNI dirs, libcni's cache, the netns dir and the plugin's per-netns locks
    // (the reconcile loop), nothing else.
    let vols = spec.volumes.as_ref().unwrap();
    let host: BTreeSet<&str> = vols
        .iter()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.as_str()))
        .collect();
    assert_eq!(
        host,
        BTreeSet::from([
            "/etc/cni/net.d",
            "/opt/cni/bin",
            "/var/lib/cni",
            "/var/run/netns",
            "/run/tproxy-cni/locks"
        ])
    );

    let c = container(spec, "install");
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    // Entering pod netns and programming them (the reconcile loop), nothing more.
    assert_eq!(
        caps.add.as_deref(),
        Some(&["NET_ADMIN".to_string(), "SYS_ADMIN".to_string()][..])
    );
    let mount = |path: &str| {
        c.volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.mount_path == path)
            .unwrap_or_else(|| panic!("no mount at {path}"))
    };
    assert_eq!(mount("/host/var/lib/cni").read_only, Some(true));
    let netns = mount("/host/var/run/netns");
    assert_eq!(netns.mount_propagation.as_deref(), Some("HostToContainer"));
    // The plugin's lock dir at the path the plugin uses, so repairs and the runtime's ADD/DEL
    // of one pod take turns.
    assert_eq!(mount("/run/tproxy-cni/locks").read_only, None);
    let res = c.resources.as_ref().unwrap();
    assert!(res.requests.is_some() && res.limits.is_some());
    assert!(c.readiness_probe.is_some() && c.liveness_probe.is_some());

    // The installer's flags point at the mounted dirs, and its settings at the ConfigMap.
    let args = c.args.as_ref().unwrap();
    let mounts: BTreeSet<&str> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    for flag in [
        "--conf-dir=",
        "--bin-dir=",
        "--health-dir=",
        "--cni-cache-dir=",
        "--netns-dir=",
    ] {
        let v = args
            .iter()
            .find_map(|a| a.strip_prefix(flag))
            .unwrap_or_else(|| panic!("missing {flag}"));
        assert!(mounts.contains(v), "{flag}{v} is not a mount");
    }
    let settings = args
        .iter()
        .find_map(|a| a.strip_prefix("--settings="))
        .unwrap();
    assert!(mounts
        .iter()
        .any(|m| Path::new(settings).parent() == Some(Path::new(m))));
    // Readiness asks the installer itself (the image has no shell).
    let ready = c.readiness_probe.as_ref().unwrap().exec.as_ref().unwrap();
    let cmd = ready.command.as_ref().unwrap();
    assert_eq!(cmd[0], "/usr/local/bin/tproxy-cni-install");
    assert!(cmd.contains(&"ready".to_string()));
}

#[test]
fn configmap_settings_are_accepted_by_the_installer() {
    let p = parse_all();
    let data = p.config_maps[0].data.as_ref().unwrap();
    let settings: Value = serde_json::from_str(&data["settings.json"]).unwrap();
    let entry = tproxy_cni_install::conflist::entry(&settings).unwrap();
    // The defaults the plugin documents (consts.rs), so the ConfigMap cannot drift from them.
    use tproxy_cni_policy::consts as c;
    assert_eq!(entry["inboundPort"], c::INBOUND_PORT);
    assert_eq!(entry["outboundPort"], c::OUTBOUND_PORT);
    assert_eq!(entry["mark"], c::MARK);
    assert_eq!(entry["routeTable"], c::ROUTE_TABLE);
    assert_eq!(entry["rulePriority"], c::RULE_PRIORITY);
    assert_eq!(entry["proxyUid"], c::PROXY_UID);
    assert_eq!(entry["failClosed"], false);

    // And the plugin accepts the entry the installer builds from it, as a runtime would send it.
    let mut stdin = entry.clone();
    stdin.insert("name".into(), "k8s-pod-network".into());
    stdin.insert("cniVersion".into(), "1.0.0".into());
    stdin.insert(
        "prevResult".into(),
        serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]}),
    );
    let bytes = serde_json::to_vec(&stdin).unwrap();
    if let Err(e) = tproxy_cni_plugin::NetConf::parse(&bytes) {
        panic!("the plugin rejects the ConfigMap's settings: {e:?}");
    }
}

#[test]
fn example_apps_carry_annotation_and_hardened_sidecar() {
    let p = parse_all();
    for d in &p.deployments {
        let name = d.metadata.name.clone().unwrap();
        let tpl = &d.spec.as_ref().unwrap().template;
        let ann = tpl.metadata.as_ref().unwrap().annotations.as_ref().unwrap();
        assert_eq!(ann["tproxy-cni.io/mode"], "tproxy", "{name}");
        let spec = tpl.spec.as_ref().unwrap();
        // A native sidecar: an init container that keeps running (restartPolicy Always), so
        // the kubelet starts the app only after its startup probe passed, and stops it first.
        assert!(
            spec.containers.iter().all(|c| c.name != "tproxy-sidecar"),
            "{name}: the sidecar must be an init container, not an ordinary one"
        );
        let s = init_container(spec, "tproxy-sidecar")
            .unwrap_or_else(|| panic!("{name}: no init container tproxy-sidecar"));
        assert_eq!(s.restart_policy.as_deref(), Some("Always"), "{name}");
        let sc = s.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true), "{name}");
        assert_eq!(
            sc.run_as_user,
            Some(i64::from(tproxy_cni_policy::consts::PROXY_UID))
        );
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        assert_eq!(caps.add.as_deref(), Some(&["NET_RAW".to_string()][..]));
        assert_eq!(
            s.args.as_deref(),
            Some(
                &[
                    "--annotations-file".to_string(),
                    "/etc/podinfo/annotations".to_string()
                ][..]
            )
        );
        // The downward-API file the sidecar reads: metadata.annotations at /etc/podinfo/annotations.
        let vol = mounted_volume(spec, s, "/etc/podinfo");
        let items = vol.downward_api.as_ref().unwrap().items.as_ref().unwrap();
        assert!(items.iter().any(|i| i.path == "annotations"
            && i.field_ref.as_ref().map(|f| f.field_path.as_str())
                == Some("metadata.annotations")));
        // Probes hit the admin port, which the plugin never intercepts. The startup probe asks
        // /ready, which turns 200 only once every listener is bound (/healthz answers as soon as
        // the admin port does, before the proxy listens: crates/sidecar/src/admin.rs).
        for (what, probe, path) in [
            ("startupProbe", &s.startup_probe, "/ready"),
            ("readinessProbe", &s.readiness_probe, "/ready"),
            ("livenessProbe", &s.liveness_probe, "/healthz"),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .unwrap_or_else(|| panic!("{name}: no httpGet {what}"));
            assert_eq!(
                serde_json::to_value(&get.port).unwrap(),
                Value::from(tproxy_cni_policy::consts::ADMIN_PORT),
                "{name}: {what}"
            );
            assert_eq!(get.path.as_deref(), Some(path), "{name}: {what}");
        }
    }
    let ingress = p
        .services
        .iter()
        .find(|s| s.spec.as_ref().unwrap().type_.as_deref() == Some("LoadBalancer"))
        .expect("an ingress Service");
    assert_eq!(
        ingress
            .spec
            .as_ref()
            .unwrap()
            .external_traffic_policy
            .as_deref(),
        Some("Local")
    );
}

#[test]
fn images_are_the_kustomized_name() {
    let p = parse_all();
    let names: BTreeSet<String> = p
        .kustomizations
        .iter()
        .flat_map(|(_, k)| k.images.iter().map(|i| i.name.clone()))
        .collect();
    let mut ours = Vec::new();
    for d in &p.deployments {
        let spec = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        ours.extend(spec.containers.clone());
        ours.extend(spec.init_containers.clone().unwrap_or_default());
    }
    for ds in &p.daemon_sets {
        ours.extend(
            ds.spec
                .as_ref()
                .unwrap()
                .template
                .spec
                .as_ref()
                .unwrap()
                .containers
                .clone(),
        );
    }
    let checked: Vec<&Container> = ours
        .iter()
        .filter(|c| c.name == "tproxy-sidecar" || c.name == "install")
        .collect();
    assert_eq!(checked.len(), 3, "two sidecars and the installer");
    for c in checked {
        let image = c.image.as_deref().unwrap();
        let repo = image.split(':').next().unwrap();
        assert!(
            names.contains(repo),
            "{image} is not retargetable by kustomize images"
        );
    }
}

// ---- Rendering with the real kustomize ----

/// Whether `kubectl` runs here. Absent: SKIP (a message), or a failure when `CI` is set.
fn have_kubectl() -> bool {
    static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAVE.get_or_init(|| {
        let ok = Command::new("kubectl")
            .args(["version", "--client"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            assert!(
                std::env::var_os("CI").is_none(),
                "kubectl (with its built-in kustomize) is not installed, and CI is set"
            );
            eprintln!("SKIP: kubectl not found; kustomizations are not rendered");
        }
        ok
    })
}

/// `kubectl kustomize manifests/<dir>`: the documents a user's `kubectl apply -k` would send,
/// as JSON. None (after a SKIP message) where kubectl is absent.
fn rendered(dir: &str) -> Option<Vec<Value>> {
    if !have_kubectl() {
        return None;
    }
    Some(kustomize(&root().join(dir)))
}

/// Runs `kubectl kustomize PATH`; fails the test with kustomize's message if it fails.
fn kustomize(path: &Path) -> Vec<Value> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(path)
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("kustomize output is UTF-8");
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc)
            .unwrap_or_else(|e| panic!("{}: rendered YAML: {e}", path.display()));
        if !v.is_null() {
            docs.push(serde_json::to_value(&v).expect("YAML to JSON"));
        }
    }
    assert!(!docs.is_empty(), "{}: rendered nothing", path.display());
    docs
}

fn typed<T: DeserializeOwned + Serialize>(docs: &[Value], kind: &str, at: &str) -> Vec<T> {
    docs.iter()
        .filter(|d| d["kind"] == kind)
        .map(|d| strict(d, at))
        .collect()
}

/// Every directory under `manifests/` with a kustomization, relative to `manifests/`.
fn kustomization_dirs() -> BTreeSet<String> {
    let mut files = Vec::new();
    yaml_files(&root(), &mut files);
    files
        .iter()
        .filter(|f| f.file_name().and_then(|n| n.to_str()) == Some("kustomization.yaml"))
        .map(|f| rel_dir(f))
        .collect()
}

/// The platform overlays: the directories under `manifests/overlays/`.
fn overlay_dirs() -> BTreeSet<String> {
    std::fs::read_dir(root().join("overlays"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn repo_file(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The kustomization paths that the docs' commands name: what follows `kubectl apply -k`,
/// `kubectl delete -k` and `kubectl kustomize`, up to a space, backtick or parenthesis.
fn documented_commands(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for cmd in [
        "kubectl apply -k ",
        "kubectl delete -k ",
        "kubectl kustomize ",
    ] {
        for (i, _) in text.match_indices(cmd) {
            let rest = &text[i + cmd.len()..];
            let end = rest
                .find(|c: char| c.is_whitespace() || matches!(c, '`' | ')' | '"' | '\''))
                .unwrap_or(rest.len());
            out.push(rest[..end].to_string());
        }
    }
    out
}

/// A documented path as a directory relative to `manifests/` ("manifests/base/" -> "base").
fn manifests_dir(path: &str, at: &str) -> String {
    path.strip_prefix("manifests/")
        .unwrap_or_else(|| panic!("{at}: {path} is not under manifests/"))
        .trim_end_matches('/')
        .to_string()
}

#[test]
fn every_kustomization_renders_with_kubectl_kustomize() {
    if !have_kubectl() {
        return;
    }
    let dirs = kustomization_dirs();
    assert!(dirs.contains("base") && dirs.len() >= 3, "{dirs:?}");
    for dir in &dirs {
        let docs = rendered(dir).expect("kubectl present");
        // What kustomize produced is still valid against the schema (a patch can add a field
        // kustomize does not know, and kustomize would pass it on).
        let at = format!("kubectl kustomize manifests/{dir}");
        for d in &docs {
            match (d["apiVersion"].as_str(), d["kind"].as_str()) {
                (Some("v1"), Some("Namespace")) => drop(strict::<Namespace>(d, &at)),
                (Some("v1"), Some("ServiceAccount")) => drop(strict::<ServiceAccount>(d, &at)),
                (Some("v1"), Some("ConfigMap")) => drop(strict::<ConfigMap>(d, &at)),
                (Some("v1"), Some("Service")) => drop(strict::<Service>(d, &at)),
                (Some("v1"), Some("ResourceQuota")) => drop(strict::<ResourceQuota>(d, &at)),
                (Some("apps/v1"), Some("DaemonSet")) => drop(strict::<DaemonSet>(d, &at)),
                (Some("apps/v1"), Some("Deployment")) => drop(strict::<Deployment>(d, &at)),
                other => panic!("{at}: unexpected {other:?}"),
            }
        }
    }
}

#[test]
fn the_docs_install_commands_are_the_kustomizations_that_render() {
    if !have_kubectl() {
        return;
    }
    // Every command of README.md, docs/install.md and the kustomizations' own headers.
    let mut sources: Vec<(String, String)> = ["README.md", "docs/install.md"]
        .iter()
        .map(|f| (f.to_string(), repo_file(f)))
        .collect();
    for dir in kustomization_dirs() {
        let f = format!("manifests/{dir}/kustomization.yaml");
        let text = repo_file(&f);
        sources.push((f, text));
    }
    let mut named = BTreeSet::new();
    for (file, text) in &sources {
        for path in documented_commands(text) {
            let dir = manifests_dir(&path, file);
            assert!(
                root().join(&dir).join("kustomization.yaml").is_file(),
                "{file}: `{path}` has no kustomization.yaml"
            );
            named.insert(dir);
        }
    }
    // The commands a user copies from the docs render, with the command itself.
    for dir in &named {
        kustomize(&root().join(dir));
    }
    // And each kustomization is reachable from the docs: by a command, or as the "apply"
    // column of the platform table (checked against its dirs below).
    let table: BTreeSet<String> = platform_table()
        .into_iter()
        .map(|row| row.apply_dir)
        .collect();
    for dir in kustomization_dirs() {
        assert!(
            named.contains(&dir) || table.contains(&dir),
            "manifests/{dir}/ is in no install command of README.md or docs/install.md"
        );
    }
    for must in ["base", "examples/native", "examples/legacy", "overlays/gke"] {
        assert!(
            named.contains(must),
            "no documented command for manifests/{must}/"
        );
    }
}

/// One row of docs/install.md's "CNI dirs per platform" table that names a kustomization.
struct PlatformRow {
    label: String,
    conf: String,
    bin: String,
    apply_dir: String,
}

/// The rows of the platform table: `| platform | `conf` | `bin` | `manifests/...` ... | sources |`.
fn platform_table() -> Vec<PlatformRow> {
    let md = repo_file("docs/install.md");
    let start = md
        .find("### CNI dirs per platform")
        .expect("docs/install.md: no section \"CNI dirs per platform\"");
    let code = |cell: &str| -> Option<String> {
        let cell = cell.trim();
        let inner = cell.strip_prefix('`')?;
        Some(inner[..inner.find('`')?].to_string())
    };
    let mut rows = Vec::new();
    for line in md[start..].lines().skip(1) {
        if line.starts_with("#") {
            break;
        }
        if !line.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = line.split('|').collect();
        if cells.len() < 6 {
            continue;
        }
        let (Some(conf), Some(bin), Some(apply)) = (code(cells[2]), code(cells[3]), code(cells[4]))
        else {
            continue;
        };
        rows.push(PlatformRow {
            label: cells[1].trim().to_string(),
            conf,
            bin,
            apply_dir: manifests_dir(&apply, "docs/install.md platform table"),
        });
    }
    assert!(rows.len() >= 5, "docs/install.md: platform table not found");
    rows
}
#[test]
fn legacy_examples_run_the_same_sidecar_as_an_ordinary_container() {
    let (Some(native), Some(legacy)) = (rendered("examples/native"), rendered("examples/legacy"))
    else {
        return;
    };
    let native: Vec<Deployment> = typed(&native, "Deployment", "examples/native");
    let legacy: Vec<Deployment> = typed(&legacy, "Deployment", "examples/legacy");
    assert_eq!(native.len(), 2);
    assert_eq!(legacy.len(), native.len());
    for (n, l) in native.iter().zip(&legacy) {
        let name = n.metadata.name.clone().unwrap();
        assert_eq!(l.metadata.name, n.metadata.name);
        let nspec = n.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let lspec = l.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert!(
            init_container(lspec, "tproxy-sidecar").is_none(),
            "{name}: legacy keeps the sidecar among the init containers"
        );
        let ls = container(lspec, "tproxy-sidecar");
        assert_eq!(
            ls.restart_policy, None,
            "{name}: restartPolicy on an ordinary container is not for old clusters"
        );
        // Everything else is the native sidecar's: image, args, security context, probes, mounts.
        let mut expected = init_container(nspec, "tproxy-sidecar").unwrap().clone();
        expected.restart_policy = None;
        assert_eq!(ls, &expected, "{name}: the two variants drifted apart");
        // The app containers and the volumes are the same.
        assert_eq!(
            lspec
                .containers
                .iter()
                .filter(|c| c.name != "tproxy-sidecar")
                .count(),
            nspec.containers.len()
        );
        assert_eq!(lspec.volumes, nspec.volumes);
        assert_eq!(
            l.spec.as_ref().unwrap().template.metadata,
            n.spec.as_ref().unwrap().template.metadata,
            "{name}: same annotations"
        );
    }
}

/// The host dirs the installer's --conf-dir and --bin-dir end up in: flag -> mount -> volume.
fn installer_host_dirs(ds: &DaemonSet) -> (String, String) {
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = container(spec, "install");
    let host_dir = |flag: &str| -> String {
        let in_container = c
            .args
            .as_ref()
            .unwrap()
            .iter()
            .rev() // the installer takes the last occurrence
            .find_map(|a| a.strip_prefix(flag))
            .unwrap_or_else(|| panic!("no {flag}"));
        let vol = mounted_volume(spec, c, in_container);
        vol.host_path
            .as_ref()
            .unwrap_or_else(|| panic!("{flag}: volume {} is not a hostPath", vol.name))
            .path
            .clone()
    };
    (host_dir("--conf-dir="), host_dir("--bin-dir="))
}

/// Every hostPath of the pod: the installer must mount the CNI dirs, libcni's cache, the netns
/// dir and the plugin's per-netns lock dir, and nothing else.
fn host_paths(ds: &DaemonSet) -> BTreeSet<String> {
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    spec.volumes
        .iter()
        .flatten()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.clone()))
        .collect()
}

#[test]
fn rendered_installers_use_the_dirs_of_their_platform_table_row() {
    if !have_kubectl() {
        return;
    }
    let rows = platform_table();
    // Every overlay is in the table, and the table names nothing that does not exist.
    let in_table: BTreeSet<String> = rows.iter().map(|r| r.apply_dir.clone()).collect();
    for o in overlay_dirs() {
        assert!(
            in_table.contains(&format!("overlays/{o}")),
            "docs/install.md's platform table has no row applying manifests/overlays/{o}/"
        );
    }
    assert!(in_table.contains("base"));
    let base_ids: BTreeSet<String> = ids(&rendered("base").expect("kubectl present"));
    for row in &rows {
        let at = format!("{} (manifests/{})", row.label, row.apply_dir);
        let docs = rendered(&row.apply_dir).expect("kubectl present");
        // Nothing of the base is lost.
        assert!(ids(&docs).is_superset(&base_ids), "{at}");
        let ds: Vec<DaemonSet> = typed(&docs, "DaemonSet", &at);
        assert_eq!(ds.len(), 1, "{at}");
        // The dirs the installer's flags end up in are the row's, and they are the only host
        // paths (a patch naming a volume the base lacks would add a third one).
        assert_eq!(
            installer_host_dirs(&ds[0]),
            (row.conf.clone(), row.bin.clone()),
            "{at}"
        );
        // Besides the row's two dirs, the reconcile loop's libcni cache and netns dirs (the
        // runtimes' defaults on every platform of the table) and the plugin's lock dir.
        assert_eq!(
            host_paths(&ds[0]),
            BTreeSet::from([
                row.conf.clone(),
                row.bin.clone(),
                "/var/lib/cni".to_string(),
                "/var/run/netns".to_string(),
                "/run/tproxy-cni/locks".to_string(),
            ]),
            "{at}"
        );
    }
}

fn ids(docs: &[Value]) -> BTreeSet<String> {
    docs.iter()
        .map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"]))
        .collect()
}

/// The node types the installer must not be scheduled on (no CNI dir it could write, and a
/// pod stuck there keeps `kubectl rollout status` from finishing), as (label, value).
const EXCLUDED_NODES: [(&str, &str); 2] = [
    ("type", "virtual-kubelet"),
    ("eks.amazonaws.com/compute-type", "fargate"),
];

#[test]
fn rendered_installers_schedule_only_where_they_can_work() {
    if !have_kubectl() {
        return;
    }
    let mut dirs = vec!["base".to_string()];
    dirs.extend(overlay_dirs().into_iter().map(|o| format!("overlays/{o}")));
    for dir in dirs {
        let at = format!("manifests/{dir}");
        let ds: Vec<DaemonSet> = typed(&rendered(&dir).expect("kubectl present"), "DaemonSet", &at);
        let spec = ds[0].spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let sel = spec.node_selector.as_ref().expect("a nodeSelector");
        assert_eq!(
            sel.get("kubernetes.io/os").map(String::as_str),
            Some("linux"),
            "{at}"
        );
        // One required term (terms are ORed: a second one would let excluded nodes back in)
        // whose expressions (ANDed) exclude each node type.
        let terms = &spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .unwrap_or_else(|| panic!("{at}: no required node affinity"))
            .node_selector_terms;
        assert_eq!(terms.len(), 1, "{at}");
        let exprs = terms[0].match_expressions.as_deref().unwrap_or_default();
        for (key, value) in EXCLUDED_NODES {
            assert!(
                exprs.iter().any(|e| e.key == key
                    && e.operator == "NotIn"
                    && e.values
                        .as_ref()
                        .is_some_and(|v| v.iter().any(|x| x == value))),
                "{at}: nodes with {key}={value} are not excluded"
            );
        }
        // Every taint tolerated (dedicated and control-plane nodes run pods that need the chain).
        assert!(
            spec.tolerations
                .iter()
                .flatten()
                .any(|t| t.operator.as_deref() == Some("Exists")
                    && t.key.is_none()
                    && t.effect.is_none()),
            "{at}"
        );
        // SELinux: the type that may write the host's CNI dirs on enforcing nodes, with no
        // privilege added.
        let c = container(spec, "install");
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(
            sc.se_linux_options
                .as_ref()
                .and_then(|o| o.type_.as_deref()),
            Some("spc_t"),
            "{at}"
        );
        assert_eq!(sc.privileged, Some(false), "{at}");
    }
}

#[test]
fn gke_overlay_admits_the_node_critical_installer() {
    // GKE admits system-node-critical pods only in namespaces with a quota for that class.
    let Some(docs) = rendered("overlays/gke") else {
        return;
    };
    let ds: Vec<DaemonSet> = typed(&docs, "DaemonSet", "gke");
    let quotas: Vec<ResourceQuota> = typed(&docs, "ResourceQuota", "gke");
    assert_eq!(quotas.len(), 1);
    let q = &quotas[0];
    assert_eq!(q.metadata.namespace, ds[0].metadata.namespace);
    let spec = q.spec.as_ref().unwrap();
    let class = ds[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .priority_class_name
        .clone()
        .unwrap();
    let sel = spec.scope_selector.as_ref().unwrap();
    let expr = sel.match_expressions.as_ref().unwrap();
    assert!(expr.iter().any(|e| e.scope_name == "PriorityClass"
        && e.operator == "In"
        && e.values.as_ref().is_some_and(|v| v.contains(&class))));
    assert!(spec.hard.as_ref().unwrap().contains_key("pods"));
}
