//! A node made of network namespaces, with the reference bridge + host-local plugins as the
//! cluster network and tproxy-cni chained after them, run by the one libcni emulator (the
//! `tproxy_cni_run` crate, which the `tproxy-cni-run` binary runs too) from inside the node's
//! netns.
#![allow(dead_code)]

pub use tproxy_cni_run as cnirun;

use std::path::PathBuf;

use serde_json::{json, Map, Value};
use tproxy_cni_plugin::CniError;
use tproxy_cni_policy::consts::POD_ANNOTATIONS_CAPABILITY;

use super::{unique, Netns};
pub use cnirun::RunError;

/// Where Debian's `containernetworking-plugins` puts the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The CNI error object a failed plugin printed (panics, naming the failure, when it printed
/// none).
pub fn cni(e: &RunError) -> &CniError {
    e.plugin_error()
        .unwrap_or_else(|| panic!("no CNI error object on stdout: {e}"))
}

pub struct Node {
    pub ns: Netns,
    pub dir: tempfile::TempDir,
    pub conflist: Value,
}

pub struct Pod {
    pub ns: Netns,
    pub id: String,
    pub annotations: Value,
    pub result: Value,
}

impl Pod {
    /// The pod's first address of the family (4 or 6), without prefix.
    pub fn ip(&self, family: u8) -> Option<String> {
        self.result["ips"].as_array()?.iter().find_map(|ip| {
            let a = ip["address"].as_str()?.split('/').next()?.to_string();
            (a.contains(':') == (family == 6)).then_some(a)
        })
    }

    /// `ip(family)` for a pod that must have one (a dual-stack test network).
    pub fn addr(&self, family: u8) -> String {
        self.ip(family)
            .unwrap_or_else(|| panic!("pod {} has no IPv{family} address", self.id))
    }
}

/// Where plugins are found: ours next to the test's build of it, then the reference ones.
fn cni_path() -> Vec<PathBuf> {
    let ours = PathBuf::from(env!("CARGO_BIN_EXE_tproxy-cni"));
    let dir = ours.parent().map(PathBuf::from).unwrap_or_default();
    vec![dir, PathBuf::from(REFERENCE_PLUGINS)]
}

fn command(cmd: &str) -> &'static str {
    match cmd {
        "ADD" => "ADD",
        "CHECK" => "CHECK",
        "DEL" => "DEL",
        other => panic!("unsupported command {other}"),
    }
}

impl Node {
    /// A node whose conflist chains `tproxy` (our entry, merged over the defaults) after a
    /// dual-stack bridge + host-local network.
    pub fn new(tproxy: Value) -> Node {
        let ns = Netns::new("node");
        let dir = tempfile::tempdir().expect("tempdir");
        let bridge = unique("tpb");
        let mut ours = json!({
            "type": "tproxy-cni",
            "capabilities": {"io.kubernetes.cri.pod-annotations": true},
            "logFile": dir.path().join("tproxy-cni.log"),
            "logLevel": "debug",
        });
        if let (Some(o), Some(extra)) = (ours.as_object_mut(), tproxy.as_object()) {
            for (k, v) in extra {
                o.insert(k.clone(), v.clone());
            }
        }
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "test-pod-network",
            "plugins": [
                {
                    "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": "10.88.0.0/16"}], [{"subnet": "fd00:88::/64"}]],
                        "dataDir": dir.path().join("ipam"),
                    }
                },
                ours
            ]
        });
        Node { ns, dir, conflist }
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// What the runtime knows about one attachment besides the conflist.
    fn invocation(&self, pod_netns: &str, id: &str, annotations: &Value) -> cnirun::Invocation {
        let mut runtime_config = Map::new();
        runtime_config.insert(POD_ANNOTATIONS_CAPABILITY.into(), annotations.clone());
        cnirun::Invocation {
            container_id: id.into(),
            netns: pod_netns.into(),
            ifname: "eth0".into(),
            cni_args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), "default".into()),
                ("K8S_POD_NAME".into(), id.into()),
            ],
            runtime_config,
            cni_path: cni_path(),
        }
    }

    /// Runs `f` in the node's netns, where the runtime runs plugins: the plugin processes
    /// inherit the netns of the thread that spawns them.
    fn on_node<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        tproxy_cni_plugin::run_in(&self.ns.path(), f).expect("enter the node's netns")
    }

    /// Runs one plugin by itself as libcni would, with `prev` as its `prevResult`.
    pub fn exec(
        &self,
        plugin: &Value,
        cmd: &str,
        pod_netns: &str,
        id: &str,
        annotations: &Value,
        prev: Option<&Value>,
    ) -> Result<Value, RunError> {
        let list = json!({
            "cniVersion": self.conflist["cniVersion"],
            "name": self.conflist["name"],
            "plugins": [plugin],
        });
        let inv = self.invocation(pod_netns, id, annotations);
        self.on_node(|| cnirun::one(&list, 0, command(cmd), &inv, prev))
    }

    /// Creates a pod sandbox and runs ADD through the whole chain. On failure the chain is
    /// rolled back with DEL (as the runtime does) and the error returned.
    pub fn add_pod(&self, annotations: &[(&str, &str)]) -> Result<Pod, RunError> {
        self.add_pod_in(Netns::new("pod"), annotations)
    }

    /// As [`Node::add_pod`], in a network namespace the caller made (e.g. one owned by a user
    /// namespace, as a runtime makes for `hostUsers: false`).
    pub fn add_pod_in(&self, ns: Netns, annotations: &[(&str, &str)]) -> Result<Pod, RunError> {
        let ann: Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let ann = Value::Object(ann);
        let id = ns.name.clone();
        let inv = self.invocation(&ns.path().to_string_lossy(), &id, &ann);
        let res = self.on_node(|| cnirun::add(&self.conflist, &inv));
        let mut pod = Pod {
            ns,
            id,
            annotations: ann,
            result: Value::Null,
        };
        match res {
            Ok(r) => {
                pod.result = r;
                Ok(pod)
            }
            Err(e) => {
                let _ = self.del_pod(&pod);
                Err(e)
            }
        }
    }

    /// DEL through the chain in reverse order, each plugin given the cached ADD result.
    pub fn del_pod(&self, pod: &Pod) -> Result<(), RunError> {
        self.del_pod_at(pod, &pod.ns.path().to_string_lossy())
    }

    pub fn del_pod_at(&self, pod: &Pod, netns: &str) -> Result<(), RunError> {
        let prev = (!pod.result.is_null()).then_some(&pod.result);
        let inv = self.invocation(netns, &pod.id, &pod.annotations);
        self.on_node(|| cnirun::del(&self.conflist, &inv, prev))
    }

    /// CHECK through the chain, in order, with the cached result.
    pub fn check_pod(&self, pod: &Pod) -> Result<(), RunError> {
        let inv = self.invocation(&pod.ns.path().to_string_lossy(), &pod.id, &pod.annotations);
        self.on_node(|| cnirun::check(&self.conflist, &inv, &pod.result))
    }

    /// CHECK of our plugin alone. With several pods on one bridge the reference bridge
    /// plugin's own CHECK fails on its changing MAC (the bridge takes its lowest port's), so
    /// multi-pod tests check only what is ours.
    pub fn check_ours(&self, pod: &Pod) -> Result<(), RunError> {
        self.exec_on(&self.ours(), "CHECK", pod).map(|_| ())
    }

    /// Runs `plugin` by itself for `cmd` on `pod` (its netns, id and annotations), with the
    /// pod's cached ADD result as `prevResult`.
    pub fn exec_on(&self, plugin: &Value, cmd: &str, pod: &Pod) -> Result<Value, RunError> {
        let path = pod.ns.path().to_string_lossy().into_owned();
        self.exec(
            plugin,
            cmd,
            &path,
            &pod.id,
            &pod.annotations,
            Some(&pod.result),
        )
    }

    /// Our entry alone (for running tproxy-cni by itself with a given prevResult).
    pub fn ours(&self) -> Value {
        self.plugins().last().cloned().unwrap_or(Value::Null)
    }

    pub fn plugin_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tproxy-cni.log")).unwrap_or_default()
    }
}
