//! Every YAML document under `manifests/` must be a valid Kubernetes object (k8s-openapi v1.34
//! types, with no field the schema does not know), kustomizations must list existing files, and
//! the installer/sidecar specs must keep the security properties the docs promise.
//!
//! No kustomize binary is available here, so the overlays' patches are applied by the small
//! JSON-patch (RFC 6902) and strategic-merge appliers below: they implement only the operations
//! the overlays use, and refuse a patch whose target does not exist in the base (kustomize
//! itself would append a second volume instead of changing the one we mean).

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, ResourceQuota, Service, ServiceAccount, Volume,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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
    #[serde(default)]
    patches: Vec<KustomizePatch>,
}

/// An inline patch: a JSON 6902 operation list or a strategic-merge object, and what it targets.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct KustomizePatch {
    target: PatchTarget,
    patch: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct PatchTarget {
    group: Option<String>,
    version: Option<String>,
    kind: String,
    name: Option<String>,
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
    /// Every document as parsed JSON, with its file: the input of the patch checks.
    raw: Vec<(PathBuf, Value)>,
}

fn parse_all() -> Parsed {
    let mut p = Parsed::default();
    for (file, i, v) in documents() {
        p.raw.push((file.clone(), v.clone()));
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
    // manifests/, examples/, examples/legacy/ and one overlay per platform.
    assert_eq!(p.kustomizations.len(), 3 + OVERLAYS.len());
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

    // Host paths: the CNI dirs, libcni's cache and the netns dir (the reconcile loop), nothing else.
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
            "/var/run/netns"
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
    let entry = tproxy_cni::install::conflist::entry(&settings).unwrap();
    // The defaults the plugin documents (consts.rs), so the ConfigMap cannot drift from them.
    use tproxy_cni::consts as c;
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
    if let Err(e) = tproxy_cni::cni::conf::NetConf::parse(&bytes) {
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
            Some(i64::from(tproxy_cni::consts::PROXY_UID))
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
        // the admin port does, before the proxy listens: src/sidecar/admin.rs).
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
                Value::from(tproxy_cni::consts::ADMIN_PORT),
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

// ---- Patch appliers (only what the kustomizations under manifests/ use) ----

/// The tokens of a JSON pointer ("/a/b~1c" -> ["a", "b/c"]).
fn pointer_tokens(path: &str, at: &str) -> Vec<String> {
    let rest = path
        .strip_prefix('/')
        .unwrap_or_else(|| panic!("{at}: {path:?} is not a JSON pointer"));
    rest.split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// The parent container of `path` and the last token.
fn parent_of<'a>(doc: &'a mut Value, path: &str, at: &str) -> (&'a mut Value, String) {
    let mut tokens = pointer_tokens(path, at);
    let last = tokens.pop().unwrap_or_default();
    let parent: String = tokens.iter().map(|t| format!("/{t}")).collect();
    let v = doc
        .pointer_mut(&parent)
        .unwrap_or_else(|| panic!("{at}: {parent:?} does not exist"));
    (v, last)
}

fn json_patch_remove(doc: &mut Value, path: &str, at: &str) -> Value {
    let (parent, last) = parent_of(doc, path, at);
    match parent {
        Value::Object(m) => m
            .shift_remove(&last)
            .unwrap_or_else(|| panic!("{at}: remove {path}: no such key")),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .unwrap_or_else(|_| panic!("{at}: remove {path}: bad index"));
            assert!(i < a.len(), "{at}: remove {path}: index out of range");
            a.remove(i)
        }
        _ => panic!("{at}: remove {path}: parent is not a container"),
    }
}

fn json_patch_add(doc: &mut Value, path: &str, value: Value, at: &str) {
    let (parent, last) = parent_of(doc, path, at);
    match parent {
        Value::Object(m) => {
            m.insert(last, value);
        }
        Value::Array(a) if last == "-" => a.push(value),
        Value::Array(a) => {
            let i: usize = last
                .parse()
                .unwrap_or_else(|_| panic!("{at}: add {path}: bad index"));
            assert!(i <= a.len(), "{at}: add {path}: index out of range");
            a.insert(i, value);
        }
        _ => panic!("{at}: add {path}: parent is not a container"),
    }
}

/// RFC 6902: test, add, remove, replace, move. Panics (fails the test) where kustomize would fail.
fn apply_json_patch(doc: &mut Value, ops: &Value, at: &str) {
    for op in ops.as_array().expect("a JSON patch is a list") {
        let path = op["path"].as_str().expect("op.path");
        match op["op"].as_str().expect("op.op") {
            "test" => assert_eq!(
                doc.pointer(path),
                Some(&op["value"]),
                "{at}: test {path} fails on the base"
            ),
            "add" => json_patch_add(doc, path, op["value"].clone(), at),
            "remove" => {
                json_patch_remove(doc, path, at);
            }
            "replace" => {
                let v = doc
                    .pointer_mut(path)
                    .unwrap_or_else(|| panic!("{at}: replace {path}: no such path"));
                *v = op["value"].clone();
            }
            "move" => {
                let from = op["from"].as_str().expect("op.from");
                let v = json_patch_remove(doc, from, at);
                json_patch_add(doc, path, v, at);
            }
            other => panic!("{at}: JSON patch op {other} is not supported by this test"),
        }
    }
}

/// Strategic merge for maps and lists of named objects (volumes, containers, mounts by `name`):
/// every named element of the patch must already exist in the base.
fn apply_strategic_merge(base: &mut Value, patch: &Value, path: &str) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, pv) in p {
                let sub = format!("{path}.{k}");
                match b.get_mut(k) {
                    Some(bv) => apply_strategic_merge(bv, pv, &sub),
                    None => {
                        b.insert(k.clone(), pv.clone());
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(p)) => {
            for pe in p {
                let name = pe["name"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{path}: only lists of named objects are merged"));
                let be = b
                    .iter_mut()
                    .find(|e| e["name"] == name)
                    .unwrap_or_else(|| panic!("{path}[name={name}]: not in the base"));
                apply_strategic_merge(be, pe, &format!("{path}[name={name}]"));
            }
        }
        (b, p) => *b = p.clone(),
    }
}

fn target_matches(t: &PatchTarget, doc: &Value) -> bool {
    let api = doc["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api.rsplit_once('/').unwrap_or(("", api));
    doc["kind"] == t.kind.as_str()
        && t.group.as_deref().is_none_or(|g| g == group)
        && t.version.as_deref().is_none_or(|v| v == version)
        && t.name
            .as_deref()
            .is_none_or(|n| doc["metadata"]["name"] == n)
}

/// The documents a kustomization renders, from the raw documents of its resources (files or
/// directories with their own kustomization) and its patches. Images and namespace are not
/// applied: the checks below look at neither.
fn render(p: &Parsed, dir: &str) -> Vec<Value> {
    let (file, k) = p
        .kustomizations
        .iter()
        .find(|(f, _)| rel_dir(f) == dir)
        .unwrap_or_else(|| panic!("no kustomization in manifests/{dir}"));
    let base_dir = file.parent().unwrap();
    let mut docs = Vec::new();
    for r in &k.resources {
        let path = base_dir.join(r).canonicalize().unwrap();
        if path.is_dir() {
            let sub = path
                .strip_prefix(root().canonicalize().unwrap())
                .unwrap()
                .display()
                .to_string();
            docs.extend(render(p, &sub));
        } else {
            docs.extend(
                p.raw
                    .iter()
                    .filter(|(f, _)| f.canonicalize().unwrap() == path)
                    .map(|(_, v)| v.clone()),
            );
        }
    }
    for patch in &k.patches {
        let at = format!("{} patch on {}", file.display(), patch.target.kind);
        let body: Value =
            serde_yaml::from_str(&patch.patch).unwrap_or_else(|e| panic!("{at}: not YAML: {e}"));
        let mut hits = 0;
        for d in docs.iter_mut().filter(|d| target_matches(&patch.target, d)) {
            hits += 1;
            if body.is_array() {
                apply_json_patch(d, &body, &at);
            } else {
                assert_eq!(body["kind"], d["kind"], "{at}");
                assert_eq!(body["metadata"]["name"], d["metadata"]["name"], "{at}");
                assert_eq!(
                    body["metadata"]["namespace"], d["metadata"]["namespace"],
                    "{at}"
                );
                apply_strategic_merge(&mut d["spec"], &body["spec"], "spec");
            }
        }
        assert!(hits > 0, "{at}: the target matches nothing in the base");
    }
    docs
}

fn typed<T: DeserializeOwned + Serialize>(docs: &[Value], kind: &str, at: &str) -> Vec<T> {
    docs.iter()
        .filter(|d| d["kind"] == kind)
        .map(|d| strict(d, at))
        .collect()
}

#[test]
fn patch_appliers_refuse_what_kustomize_would_not_do_as_meant() {
    // The appliers are part of the checks: they must fail where the overlays would be wrong.
    let base = serde_json::json!({"spec": {"volumes": [
        {"name": "cni-bin", "hostPath": {"path": "/opt/cni/bin", "type": "DirectoryOrCreate"}}
    ]}});
    let mut ok = base.clone();
    apply_strategic_merge(
        &mut ok,
        &serde_json::json!({"spec": {"volumes": [{"name": "cni-bin", "hostPath": {"path": "/x"}}]}}),
        "",
    );
    assert_eq!(
        ok["spec"]["volumes"][0]["hostPath"],
        serde_json::json!({"path": "/x", "type": "DirectoryOrCreate"})
    );
    let typo = std::panic::catch_unwind(|| {
        let mut b = base.clone();
        apply_strategic_merge(
            &mut b,
            &serde_json::json!({"spec": {"volumes": [{"name": "cni-bins", "hostPath": {"path": "/x"}}]}}),
            "",
        );
    });
    assert!(
        typo.is_err(),
        "a patch of a volume the base lacks must fail"
    );

    let mut d = serde_json::json!({"c": [{"name": "a"}], "i": [{"name": "s", "r": "Always"}]});
    apply_json_patch(
        &mut d,
        &serde_json::json!([
            {"op": "test", "path": "/i/0/name", "value": "s"},
            {"op": "move", "from": "/i/0", "path": "/c/-"},
            {"op": "remove", "path": "/c/1/r"}
        ]),
        "t",
    );
    assert_eq!(
        d,
        serde_json::json!({"c": [{"name": "a"}, {"name": "s"}], "i": []})
    );
    let failing_test = std::panic::catch_unwind(|| {
        let mut d = serde_json::json!({"i": [{"name": "app"}]});
        apply_json_patch(
            &mut d,
            &serde_json::json!([{"op": "test", "path": "/i/0/name", "value": "s"}]),
            "t",
        );
    });
    assert!(failing_test.is_err());
}

#[test]
fn legacy_examples_run_the_same_sidecar_as_an_ordinary_container() {
    let p = parse_all();
    let native: Vec<Deployment> = typed(&render(&p, "examples"), "Deployment", "examples");
    let legacy: Vec<Deployment> = typed(
        &render(&p, "examples/legacy"),
        "Deployment",
        "examples/legacy",
    );
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

/// The platform overlays: (directory, label of its row in docs/install.md, conf dir, bin dir).
const OVERLAYS: [(&str, &str, &str, &str); 4] = [
    ("gke", "GKE", "/etc/cni/net.d", "/home/kubernetes/bin"),
    (
        "k3s",
        "k3s",
        "/var/lib/rancher/k3s/agent/etc/cni/net.d",
        "/var/lib/rancher/k3s/data/cni",
    ),
    ("rke2", "RKE2", "/etc/cni/net.d", "/opt/cni/bin"),
    (
        "microk8s",
        "MicroK8s",
        "/var/snap/microk8s/current/args/cni-network",
        "/var/snap/microk8s/current/opt/cni/bin",
    ),
];

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

#[test]
fn platform_overlays_point_the_installer_at_their_platform_dirs() {
    let p = parse_all();
    let base: Vec<DaemonSet> = typed(&render(&p, ""), "DaemonSet", "manifests");
    assert_eq!(
        installer_host_dirs(&base[0]),
        ("/etc/cni/net.d".into(), "/opt/cni/bin".into())
    );
    let dirs: BTreeSet<String> = std::fs::read_dir(root().join("overlays"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        dirs,
        OVERLAYS.iter().map(|o| o.0.to_string()).collect(),
        "every overlay is checked here, and only overlays that exist"
    );
    let install_md =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/install.md"))
            .unwrap();
    for (dir, label, conf, bin) in OVERLAYS {
        let at = format!("overlays/{dir}");
        let (_, k) = p
            .kustomizations
            .iter()
            .find(|(f, _)| rel_dir(f) == at)
            .unwrap();
        assert!(
            k.resources.iter().any(|r| r == "../.."),
            "{at}: must build on manifests/"
        );
        let docs = render(&p, &at);
        // Nothing of the base is lost.
        let ids = |ds: &[Value]| -> BTreeSet<String> {
            ds.iter()
                .map(|d| format!("{}/{}", d["kind"], d["metadata"]["name"]))
                .collect()
        };
        assert!(ids(&docs).is_superset(&ids(&render(&p, ""))), "{at}");
        let ds: Vec<DaemonSet> = typed(&docs, "DaemonSet", &at);
        assert_eq!(ds.len(), 1, "{at}");
        assert_eq!(
            installer_host_dirs(&ds[0]),
            (conf.to_string(), bin.to_string()),
            "{at}"
        );
        // The same dirs as the documented table row of that platform.
        assert!(
            install_md.lines().any(|l| l.starts_with('|')
                && l.contains(label)
                && l.contains(&format!("`{conf}`"))
                && l.contains(&format!("`{bin}`"))),
            "docs/install.md has no table row for {label} with `{conf}` and `{bin}`"
        );
        assert!(
            install_md.contains(&format!("manifests/overlays/{dir}/")),
            "docs/install.md does not mention manifests/overlays/{dir}/"
        );
    }
}

#[test]
fn gke_overlay_admits_the_node_critical_installer() {
    // GKE admits system-node-critical pods only in namespaces with a quota for that class.
    let p = parse_all();
    let docs = render(&p, "overlays/gke");
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
