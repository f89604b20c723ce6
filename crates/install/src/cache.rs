//! libcni's result cache, read-only: one file per attachment that a runtime set up through
//! libcni (containerd's go-cni, CRI-O), `<cache dir>/results/<network>-<container>-<ifname>`.
//!
//! The format is libcni's `cachedInfo` (containernetworking/cni, libcni/api.go): `kind`
//! (`cniCacheV1`), `containerId`, `config` (the list's bytes, base64), `ifName`, `networkName`,
//! `netns` (libcni 1.2 and later only), `cniArgs` (`[[key, value], ...]`), `capabilityArgs`
//! (every capability argument the runtime passed, whether a plugin asked for it or not) and
//! `result` (the list's final result). Pure: parsing and the plugin's stdin; no kernel.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use tproxy_cni_policy::consts::POD_ANNOTATIONS_CAPABILITY;

/// The `kind` libcni writes (and the only one it reads back).
pub(crate) const CACHE_KIND: &str = "cniCacheV1";
/// Largest cache file read: results are a few KiB; anything bigger is not libcni's.
const MAX_FILE: u64 = 1 << 20;

/// One cached attachment.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Attachment {
    /// The cache file it came from.
    pub file: PathBuf,
    pub container_id: String,
    pub network: String,
    pub ifname: String,
    /// `netns` as cached (libcni 1.2+); empty when the runtime's libcni does not write it.
    pub netns: String,
    pub cni_args: Vec<(String, String)>,
    pub capability_args: Map<String, Value>,
    pub result: Value,
}

/// The pod's annotations as the cache holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Annotations {
    /// The runtime cached no pod annotations (an older runtime): never guessed.
    Absent,
    /// Present but not an object of strings: the key named.
    Invalid(String),
    Present(BTreeMap<String, String>),
}

/// Where the pod's netns is, according to the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sandbox {
    /// One path (from `result.interfaces[].sandbox`, else the cached `netns`).
    Path(String),
    /// No interface names a sandbox and no `netns` is cached.
    Unknown,
    /// Interfaces name different sandboxes.
    Ambiguous(Vec<String>),
}

impl Attachment {
    /// Parses one cache file's bytes; the error says what is wrong with it.
    pub(crate) fn parse(file: &Path, bytes: &[u8]) -> Result<Attachment, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let o = v.as_object().ok_or("not a JSON object")?;
        let kind = o.get("kind").and_then(Value::as_str).unwrap_or_default();
        if kind != CACHE_KIND {
            return Err(format!(
                "\"kind\" is {kind:?}, not {CACHE_KIND:?} (not a libcni cache entry this \
                 release reads)"
            ));
        }
        let s = |k: &str| -> Result<String, String> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(format!("\"{k}\" is not a string")),
            }
        };
        let container_id = s("containerId")?;
        let network = s("networkName")?;
        let ifname = s("ifName")?;
        if container_id.is_empty() || network.is_empty() || ifname.is_empty() {
            return Err("\"containerId\", \"networkName\" or \"ifName\" is missing".into());
        }
        let mut cni_args = Vec::new();
        if let Some(args) = o.get("cniArgs").filter(|a| !a.is_null()) {
            for (i, pair) in args
                .as_array()
                .ok_or("\"cniArgs\" is not a list")?
                .iter()
                .enumerate()
            {
                match pair.as_array().map(Vec::as_slice) {
                    Some([Value::String(k), Value::String(v)]) => {
                        cni_args.push((k.clone(), v.clone()))
                    }
                    _ => return Err(format!("\"cniArgs[{i}]\" is not a [key, value] pair")),
                }
            }
        }
        let capability_args = match o.get("capabilityArgs") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => return Err("\"capabilityArgs\" is not an object".into()),
        };
        let result = match o.get("result") {
            Some(r @ Value::Object(_)) => r.clone(),
            _ => return Err("\"result\" is missing or not an object".into()),
        };
        Ok(Attachment {
            file: file.to_path_buf(),
            container_id,
            network,
            ifname,
            netns: s("netns")?,
            cni_args,
            capability_args,
            result,
        })
    }

    fn arg(&self, key: &str) -> Option<&str> {
        self.cni_args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `namespace/name` from the cached CNI args, else the container id.
    pub(crate) fn pod(&self) -> String {
        match (self.arg("K8S_POD_NAMESPACE"), self.arg("K8S_POD_NAME")) {
            (Some(ns), Some(n)) => format!("{ns}/{n}"),
            _ => format!("container {}", self.container_id),
        }
    }

    /// The pod annotations the runtime cached (`capabilityArgs`).
    pub(crate) fn annotations(&self) -> Annotations {
        let key = format!("capabilityArgs.{POD_ANNOTATIONS_CAPABILITY}");
        match self.capability_args.get(POD_ANNOTATIONS_CAPABILITY) {
            None | Some(Value::Null) => Annotations::Absent,
            Some(Value::Object(m)) => {
                let mut out = BTreeMap::new();
                for (k, v) in m {
                    match v {
                        Value::String(s) => {
                            out.insert(k.clone(), s.clone());
                        }
                        _ => {
                            return Annotations::Invalid(format!("\"{key}\".{k:?} is not a string"))
                        }
                    }
                }
                Annotations::Present(out)
            }
            Some(_) => Annotations::Invalid(format!("\"{key}\" is not an object")),
        }
    }

    /// The addresses of the cached result (`result.ips[].address`, prefix dropped); entries
    /// that do not parse are skipped (the plugin's own parser reports them).
    pub(crate) fn ips(&self) -> Vec<IpAddr> {
        self.result
            .get("ips")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|ip| ip.get("address")?.as_str()?.split('/').next()?.parse().ok())
            .collect()
    }

    /// The pod's netns path: the `sandbox` of the result's interfaces (all must agree), else
    /// the cached `netns`.
    pub(crate) fn sandbox(&self) -> Sandbox {
        let mut paths: Vec<String> = self
            .result
            .get("interfaces")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|i| i.get("sandbox")?.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        paths.sort();
        paths.dedup();
        match paths.len() {
            0 if !self.netns.is_empty() => Sandbox::Path(self.netns.clone()),
            0 => Sandbox::Unknown,
            1 => Sandbox::Path(paths.remove(0)),
            _ => Sandbox::Ambiguous(paths),
        }
    }

    /// `CNI_ARGS` as the runtime passed it (`K=V;K=V`, cached order).
    pub(crate) fn cni_args_env(&self) -> String {
        self.cni_args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }
}

/// The netns path to enter: `sandbox`'s file name under `netns_dir` (the runtime's netns
/// directory as mounted here). `None` for a name that could walk out of the directory.
pub(crate) fn map_sandbox(sandbox: &str, netns_dir: &Path) -> Option<PathBuf> {
    let name = Path::new(sandbox).file_name()?.to_str()?;
    if name.is_empty() || name == "." || name == ".." {
        return None;
    }
    Some(netns_dir.join(name))
}

/// The stdin libcni gives a plugin of the list (libcni/api.go `buildOneConfig`): the entry with
/// the list's `name` and `cniVersion`, the cached result as `prevResult`, and `runtimeConfig`
/// holding the capability arguments the entry declares.
pub(crate) fn plugin_stdin(list: &Value, entry: &Map<String, Value>, att: &Attachment) -> Value {
    let mut o = entry.clone();
    for k in ["name", "cniVersion"] {
        if let Some(v) = list.get(k) {
            o.insert(k.into(), v.clone());
        }
    }
    let mut prev = att.result.clone();
    // libcni converts the cached result to the list's version; ours reads only `ips`.
    if let (Some(p), Some(v)) = (prev.as_object_mut(), list.get("cniVersion")) {
        p.insert("cniVersion".into(), v.clone());
    }
    o.insert("prevResult".into(), prev);
    let mut rc = Map::new();
    if let Some(caps) = entry.get("capabilities").and_then(Value::as_object) {
        for (cap, on) in caps {
            if on.as_bool() == Some(true) {
                if let Some(v) = att.capability_args.get(cap) {
                    rc.insert(cap.clone(), v.clone());
                }
            }
        }
    }
    if !rc.is_empty() {
        o.insert("runtimeConfig".into(), Value::Object(rc));
    }
    Value::Object(o)
}

/// Every cache entry of `network` under `<cache_dir>/results`, in name order: the attachment,
/// or the file and why it was not read. A missing results dir is an empty node.
pub(crate) fn read(
    cache_dir: &Path,
    network: &str,
) -> std::io::Result<Vec<Result<Attachment, (PathBuf, String)>>> {
    let dir = cache_dir.join("results");
    let mut names: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(&format!("{network}-")))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let file = dir.join(&name);
        let bytes = match read_small(&file) {
            Ok(b) => b,
            // Removed by a DEL between the listing and the read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                out.push(Err((file, e.to_string())));
                continue;
            }
        };
        match Attachment::parse(&file, &bytes) {
            // A network whose name has this one as a prefix ("pods" and "pods-v2").
            Ok(a) if a.network != network => {}
            Ok(a) => out.push(Ok(a)),
            Err(why) => out.push(Err((file, why))),
        }
    }
    Ok(out)
}

fn read_small(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut buf = Vec::new();
    f.take(MAX_FILE + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_FILE {
        return Err(std::io::Error::other(
            "larger than 1 MiB; not a libcni cache entry",
        ));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The shape containerd 1.6 (go-cni, libcni 1.1) writes: no `netns`, `config` base64.
    fn cached() -> Value {
        json!({
            "kind": "cniCacheV1",
            "containerId": "abc123",
            "config": "eyJuYW1lIjoicG9kcyJ9",
            "ifName": "eth0",
            "networkName": "pods",
            "cniArgs": [["IgnoreUnknown", "1"], ["K8S_POD_NAMESPACE", "default"],
                        ["K8S_POD_NAME", "web-0"], ["K8S_POD_INFRA_CONTAINER_ID", "abc123"]],
            "capabilityArgs": {
                "io.kubernetes.cri.pod-annotations": {"tproxy-cni.io/mode": "tproxy"},
                "portMappings": []
            },
            "result": {
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
                    {"name": "vethx", "mac": "aa:bb:cc:dd:ee:00"},
                    {"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/var/run/netns/cni-1234"}
                ],
                "ips": [{"interface": 2, "address": "10.88.0.5/24", "gateway": "10.88.0.1"}]
            }
        })
    }

    fn parse(v: &Value) -> Result<Attachment, String> {
        Attachment::parse(Path::new("/c/results/x"), &serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn reads_what_libcni_caches() {
        let a = parse(&cached()).unwrap();
        assert_eq!(a.pod(), "default/web-0");
        assert_eq!(a.ips(), ["10.88.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(a.sandbox(), Sandbox::Path("/var/run/netns/cni-1234".into()));
        let Annotations::Present(ann) = a.annotations() else {
            panic!()
        };
        assert_eq!(ann["tproxy-cni.io/mode"], "tproxy");
        assert_eq!(
            a.cni_args_env(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123"
        );
    }

    #[test]
    fn what_the_cache_lacks_is_reported_not_guessed() {
        let mut v = cached();
        v["capabilityArgs"]
            .as_object_mut()
            .unwrap()
            .remove(POD_ANNOTATIONS_CAPABILITY);
        v["result"]["interfaces"][2]
            .as_object_mut()
            .unwrap()
            .remove("sandbox");
        v.as_object_mut().unwrap().remove("cniArgs");
        let a = parse(&v).unwrap();
        assert_eq!(a.annotations(), Annotations::Absent);
        assert_eq!(a.sandbox(), Sandbox::Unknown);
        assert_eq!(a.pod(), "container abc123");
        // libcni 1.2+ caches the netns itself.
        v["netns"] = json!("/var/run/netns/cni-9");
        assert_eq!(
            parse(&v).unwrap().sandbox(),
            Sandbox::Path("/var/run/netns/cni-9".into())
        );
        // Two interfaces in two sandboxes: which one is the pod's is not ours to pick.
        let mut two = cached();
        two["result"]["interfaces"][1]["sandbox"] = json!("/var/run/netns/other");
        assert!(matches!(parse(&two).unwrap().sandbox(), Sandbox::Ambiguous(p) if p.len() == 2));
        let mut bad = cached();
        bad["capabilityArgs"][POD_ANNOTATIONS_CAPABILITY] = json!({"a": 1});
        assert!(
            matches!(parse(&bad).unwrap().annotations(), Annotations::Invalid(m) if m.contains("\"a\""))
        );
    }

    #[test]
    fn refuses_what_is_not_a_libcni_entry() {
        for (patch, want) in [
            (json!({"kind": "cniCacheV2"}), "kind"),
            (json!({"containerId": ""}), "containerId"),
            (json!({"result": "x"}), "result"),
            (json!({"cniArgs": [["K"]]}), "cniArgs[0]"),
            (json!({"capabilityArgs": []}), "capabilityArgs"),
        ] {
            let mut v = cached();
            for (k, val) in patch.as_object().unwrap() {
                v[k] = val.clone();
            }
            let e = parse(&v).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        assert!(Attachment::parse(Path::new("x"), b"\xff").is_err());
    }

    #[test]
    fn sandbox_maps_by_name_only() {
        let d = Path::new("/host/var/run/netns");
        assert_eq!(
            map_sandbox("/var/run/netns/cni-1", d),
            Some(PathBuf::from("/host/var/run/netns/cni-1"))
        );
        assert_eq!(map_sandbox("/proc/123/ns/net", d), Some(d.join("net")));
        assert_eq!(map_sandbox("/var/run/netns/..", d), None);
        assert_eq!(map_sandbox("/", d), None);
    }

    #[test]
    fn stdin_is_what_libcni_builds() {
        let a = parse(&cached()).unwrap();
        let list = json!({"cniVersion": "1.0.0", "name": "pods", "plugins": []});
        let entry = json!({"type": "tproxy-cni",
            "capabilities": {"io.kubernetes.cri.pod-annotations": true, "bandwidth": true,
                             "portMappings": false},
            "failClosed": true});
        let s = plugin_stdin(&list, entry.as_object().unwrap(), &a);
        assert_eq!(s["name"], "pods");
        assert_eq!(s["cniVersion"], "1.0.0");
        assert_eq!(s["failClosed"], true);
        assert_eq!(s["prevResult"]["ips"][0]["address"], "10.88.0.5/24");
        // Only declared capabilities, and only those the runtime passed.
        assert_eq!(
            s["runtimeConfig"],
            json!({"io.kubernetes.cri.pod-annotations": {"tproxy-cni.io/mode": "tproxy"}})
        );
    }

    #[test]
    fn reads_only_this_network() {
        let d = tempfile::tempdir().unwrap();
        let res = d.path().join("results");
        std::fs::create_dir_all(&res).unwrap();
        let mut v = cached();
        std::fs::write(
            res.join("pods-abc123-eth0"),
            serde_json::to_vec(&v).unwrap(),
        )
        .unwrap();
        v["networkName"] = json!("pods-v2");
        std::fs::write(
            res.join("pods-v2-abc123-eth0"),
            serde_json::to_vec(&v).unwrap(),
        )
        .unwrap();
        std::fs::write(res.join("pods-broken-eth0"), b"{").unwrap();
        std::fs::write(res.join("other-abc-eth0"), b"{").unwrap();
        let got = read(d.path(), "pods").unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].as_ref().is_ok_and(|a| a.network == "pods"));
        assert!(got[1].is_err());
        assert!(read(&d.path().join("nope"), "pods").unwrap().is_empty());
    }
}
