//! What the plugin reads for a pod: the mode first, and the rest only when the mode needs it
//! (docs/ARCHITECTURE.md, pitfall 61).

use std::collections::BTreeMap;

use super::{
    err, foreign_mesh, Defaults, Mode, NorthSouth, OutboundPolicy, PodPolicy, PolicyError,
    Selector, ISTIO_MODE, OUR_KEYS, OUR_MODE,
};
use crate::consts::ANNOTATION_PREFIX;

/// The pod's mode, reading only the mode keys (and checking that our prefix holds no unknown
/// key, which could be a misspelt mode): a pod in mode `none` needs nothing else parsed.
/// Another mesh's pod without our mode key is `none`.
pub(crate) fn pod_mode(
    ann: &BTreeMap<String, String>,
    defaults: &Defaults,
) -> Result<Mode, PolicyError> {
    for (k, v) in ann {
        if let Some(rest) = k.strip_prefix(ANNOTATION_PREFIX) {
            if !OUR_KEYS.contains(&rest) {
                return Err(err(
                    k,
                    v,
                    format!(
                        "unknown key; known keys under {ANNOTATION_PREFIX}: {}",
                        OUR_KEYS.join(", ")
                    ),
                ));
            }
        }
    }
    let foreign = foreign_mesh(ann).is_some();
    let pick = |k: &'static str| ann.get(k).map(|v| (k, v.as_str()));
    let chosen = if foreign {
        pick(OUR_MODE)
    } else {
        pick(OUR_MODE).or_else(|| pick(ISTIO_MODE))
    };
    match chosen {
        Some((k, v)) => Mode::parse(v).ok_or_else(|| {
            err(
                k,
                v,
                "unknown mode; expected tproxy, redirect or none (any case)",
            )
        }),
        None if foreign => Ok(Mode::None),
        None => Ok(defaults.mode),
    }
}

impl PodPolicy {
    /// The plugin's view: parses only what the pod's mode needs. In mode `none` (no mode and a
    /// conflist default of `none`, another mesh's pod, or `none` said) nothing beyond the mode
    /// keys is read, so no other value, however large or malformed, costs anything
    /// (docs/ARCHITECTURE.md, pitfall 61).
    pub fn for_plugin(
        ann: &BTreeMap<String, String>,
        defaults: &Defaults,
    ) -> Result<PodPolicy, PolicyError> {
        match pod_mode(ann, defaults)? {
            Mode::None => Ok(PodPolicy::inert(defaults)),
            _ => PodPolicy::from_annotations(ann, defaults),
        }
    }

    /// Mode `none` with the conflist defaults: programs nothing.
    fn inert(defaults: &Defaults) -> PodPolicy {
        PodPolicy {
            mode: Mode::None,
            fail: defaults.fail,
            inbound_ports: Selector::All,
            exclude_inbound_ports: defaults.exclude_inbound_ports.clone(),
            outbound: OutboundPolicy {
                include_cidrs: Selector::List(Vec::new()),
                exclude_cidrs: Vec::new(),
                include_ports: Vec::new(),
                exclude_ports: Vec::new(),
            },
            proxy_uid: defaults.proxy_uid,
            proxy_gid: defaults.proxy_gid,
            north_south: NorthSouth::default(),
        }
    }
}
