//! Other meshes' marks: a pod that another mesh's injector manages is left alone unless our
//! own `tproxy-cni.io/mode` says otherwise.

use std::collections::BTreeMap;

use crate::echo;

/// Our mode key.
pub(super) const OUR_MODE: &str = "tproxy-cni.io/mode";

pub(super) const ISTIO_MODE: &str = "sidecar.istio.io/interceptionMode";

/// A mark another mesh's injector leaves on a pod it manages: `key` present (with `value`, when
/// one is given) means that mesh intercepts the pod's traffic itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshMark {
    pub mesh: &'static str,
    pub key: &'static str,
    /// The value that marks the pod (compared case-insensitively); `None`: any value.
    pub value: Option<&'static str>,
}

/// The signals of a pod managed by another mesh (README, "Pods of other meshes").
pub const MESH_MARKS: &[MeshMark] = &[
    // Written by Istio's sidecar injector on every pod it injects.
    MeshMark {
        mesh: "Istio (sidecar)",
        key: "sidecar.istio.io/status",
        value: None,
    },
    // Written by istio-cni in ambient mode on pods whose traffic ztunnel captures.
    MeshMark {
        mesh: "Istio (ambient)",
        key: "ambient.istio.io/redirection",
        value: Some("enabled"),
    },
    // Written by istio-cni on a partly enrolled pod: its redirection rules are already in the
    // pod's netns, ztunnel does not have the pod yet (README, "Pods of other meshes").
    MeshMark {
        mesh: "Istio (ambient)",
        key: "ambient.istio.io/redirection",
        value: Some("pending"),
    },
    // Written by Kuma's injector on the pods it injects.
    MeshMark {
        mesh: "Kuma",
        key: "kuma.io/sidecar-injected",
        value: Some("true"),
    },
    // Written by Linkerd's proxy injector (the version of the proxy it added).
    MeshMark {
        mesh: "Linkerd",
        key: "linkerd.io/proxy-version",
        value: None,
    },
    // Written by Consul's connect injector.
    MeshMark {
        mesh: "Consul",
        key: "consul.hashicorp.com/connect-inject-status",
        value: Some("injected"),
    },
];

/// The first mark of another mesh's injector on the pod, if any.
pub fn foreign_mesh(ann: &BTreeMap<String, String>) -> Option<(&'static MeshMark, &str)> {
    MESH_MARKS.iter().find_map(|m| {
        let v = ann.get(m.key)?;
        let hit = match m.value {
            None => !v.trim().is_empty(),
            Some(want) => v.trim().eq_ignore_ascii_case(want),
        };
        hit.then_some((m, v.as_str()))
    })
}

/// Why the plugin leaves this pod alone although the config or annotations might ask for
/// interception: another mesh manages it and our own `tproxy-cni.io/mode` is not set.
pub fn skip_reason(ann: &BTreeMap<String, String>) -> Option<String> {
    if ann.contains_key(OUR_MODE) {
        return None;
    }
    foreign_mesh(ann).map(|(m, v)| {
        format!(
            "managed by {} ({}={}); left alone (set {} to intercept it anyway)",
            m.mesh,
            m.key,
            echo(v),
            OUR_MODE
        )
    })
}
