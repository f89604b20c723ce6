//! A node made of network namespaces, with the reference bridge + host-local plugins as the
//! cluster network and tproxy-cni chained after them, run the way libcni runs a conflist.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{json, Map, Value};

use super::{unique, Netns};

/// Where Debian's `containernetworking-plugins` puts the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// A failed plugin: which one, its exit status and what it printed.
#[derive(Debug)]
pub struct PluginError {
    pub plugin: String,
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl PluginError {
    /// The CNI error object the plugin printed.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or(Value::Null)
    }
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
}

fn plugin_path(kind: &str) -> PathBuf {
    if kind == "tproxy-cni" {
        PathBuf::from(env!("CARGO_BIN_EXE_tproxy-cni"))
    } else {
        PathBuf::from(REFERENCE_PLUGINS).join(kind)
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

    /// Runs one plugin as libcni would: env + stdin, inside the node's netns.
    pub fn exec(
        &self,
        plugin: &Value,
        cmd: &str,
        pod_netns: &str,
        id: &str,
        annotations: &Value,
        prev: Option<&Value>,
    ) -> Result<Value, PluginError> {
        let kind = plugin["type"].as_str().unwrap_or_default().to_string();
        let mut conf: Map<String, Value> = plugin.as_object().cloned().unwrap_or_default();
        conf.insert("name".into(), self.conflist["name"].clone());
        conf.insert("cniVersion".into(), self.conflist["cniVersion"].clone());
        if let Some(p) = prev {
            conf.insert("prevResult".into(), p.clone());
        }
        // libcni passes a runtimeConfig key only to plugins declaring that capability.
        if plugin["capabilities"]["io.kubernetes.cri.pod-annotations"] == json!(true) {
            conf.insert(
                "runtimeConfig".into(),
                json!({"io.kubernetes.cri.pod-annotations": annotations}),
            );
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .arg(plugin_path(&kind))
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", pod_netns)
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={id}"),
            )
            .env("CNI_PATH", REFERENCE_PLUGINS)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn plugin");
        let stdin = Value::Object(conf).to_string();
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("stdin");
        let out = child.wait_with_output().expect("wait plugin");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(PluginError {
                plugin: kind,
                status: out.status.code().unwrap_or(-1),
                stdout,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        if stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_str(&stdout).expect("plugin stdout is JSON"))
    }

    /// Creates a pod sandbox and runs ADD through the whole chain. On failure the chain is
    /// rolled back with DEL (as the runtime does) and the error returned.
    pub fn add_pod(&self, annotations: &[(&str, &str)]) -> Result<Pod, PluginError> {
        let ns = Netns::new("pod");
        let ann: Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let ann = Value::Object(ann);
        let id = ns.name.clone();
        let path = ns.path().to_string_lossy().into_owned();
        let mut prev: Option<Value> = None;
        for p in self.plugins() {
            match self.exec(&p, "ADD", &path, &id, &ann, prev.as_ref()) {
                Ok(r) => prev = Some(r),
                Err(e) => {
                    let pod = Pod {
                        ns,
                        id,
                        annotations: ann,
                        result: Value::Null,
                    };
                    let _ = self.del_pod(&pod);
                    return Err(e);
                }
            }
        }
        Ok(Pod {
            ns,
            id,
            annotations: ann,
            result: prev.unwrap_or(Value::Null),
        })
    }

    /// DEL through the chain in reverse order, each plugin given the cached ADD result.
    pub fn del_pod(&self, pod: &Pod) -> Result<(), PluginError> {
        self.del_pod_at(pod, &pod.ns.path().to_string_lossy())
    }

    pub fn del_pod_at(&self, pod: &Pod, netns: &str) -> Result<(), PluginError> {
        let prev = (!pod.result.is_null()).then_some(&pod.result);
        for p in self.plugins().iter().rev() {
            self.exec(p, "DEL", netns, &pod.id, &pod.annotations, prev)?;
        }
        Ok(())
    }

    /// CHECK through the chain, in order, with the cached result.
    pub fn check_pod(&self, pod: &Pod) -> Result<(), PluginError> {
        for p in self.plugins() {
            self.exec(
                &p,
                "CHECK",
                &pod.ns.path().to_string_lossy(),
                &pod.id,
                &pod.annotations,
                Some(&pod.result),
            )?;
        }
        Ok(())
    }

    /// CHECK of our plugin alone. With several pods on one bridge the reference bridge
    /// plugin's own CHECK fails on its changing MAC (the bridge takes its lowest port's), so
    /// multi-pod tests check only what is ours.
    pub fn check_ours(&self, pod: &Pod) -> Result<(), PluginError> {
        let path = pod.ns.path().to_string_lossy().into_owned();
        self.exec(
            &self.ours(),
            "CHECK",
            &path,
            &pod.id,
            &pod.annotations,
            Some(&pod.result),
        )
        .map(|_| ())
    }

    /// Our entry alone (for running tproxy-cni by itself with a given prevResult).
    pub fn ours(&self) -> Value {
        self.plugins().last().cloned().unwrap_or(Value::Null)
    }

    pub fn plugin_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tproxy-cni.log")).unwrap_or_default()
    }
}
