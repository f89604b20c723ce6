//! The pod policy: which annotation sets each field (ours, Istio's, Kuma's, then the conflist
//! defaults), and the checks across fields.

use std::collections::BTreeMap;

use super::lists::{
    cidr_list, cidr_selector, first_covered, first_covered_cidr, id, port_list, port_selector,
};
use super::{
    err, foreign_mesh, kuma, pod_mode, Defaults, FailMode, NorthSouth, OutboundPolicy, PodPolicy,
    PolicyError, Selector,
};
use crate::consts::ANNOTATION_PREFIX;
use crate::netaddr::PortRange;

/// Where one field can come from.
enum Src {
    /// An annotation of its own.
    Key(&'static str),
    /// A field of Kuma's merged annotation ([`kuma::KEY`]).
    Kuma(&'static str),
}

/// The places that can set one field, highest precedence first.
struct Sources(&'static [Src]);

const S_INBOUND: Sources = Sources(&[
    Src::Key("tproxy-cni.io/inbound-ports"),
    Src::Key("traffic.sidecar.istio.io/includeInboundPorts"),
]);
const S_EX_INBOUND: Sources = Sources(&[
    Src::Key("tproxy-cni.io/exclude-inbound-ports"),
    Src::Key("traffic.sidecar.istio.io/excludeInboundPorts"),
    Src::Kuma(kuma::INBOUND_PORTS),
    Src::Key("traffic.kuma.io/exclude-inbound-ports"),
]);
const S_IN_OUT_CIDR: Sources = Sources(&[
    Src::Key("tproxy-cni.io/include-outbound-ip-ranges"),
    Src::Key("traffic.sidecar.istio.io/includeOutboundIPRanges"),
]);
const S_EX_OUT_CIDR: Sources = Sources(&[
    Src::Key("tproxy-cni.io/exclude-outbound-ip-ranges"),
    Src::Key("traffic.sidecar.istio.io/excludeOutboundIPRanges"),
    Src::Kuma(kuma::OUTBOUND_IPS),
    Src::Key("traffic.kuma.io/exclude-outbound-ips"),
]);
const S_IN_OUT_PORTS: Sources = Sources(&[
    Src::Key("tproxy-cni.io/include-outbound-ports"),
    Src::Key("traffic.sidecar.istio.io/includeOutboundPorts"),
]);
const S_EX_OUT_PORTS: Sources = Sources(&[
    Src::Key("tproxy-cni.io/exclude-outbound-ports"),
    Src::Key("traffic.sidecar.istio.io/excludeOutboundPorts"),
    Src::Kuma(kuma::OUTBOUND_PORTS),
    Src::Key("traffic.kuma.io/exclude-outbound-ports"),
]);

/// The pod's annotations with Kuma's merged config read (once, and only when a field of
/// the pod's mode needs it).
struct Ann<'a> {
    map: &'a BTreeMap<String, String>,
    kuma: kuma::Exclusions,
}

impl Sources {
    /// The first source present: the annotation key to name in errors, and the value.
    fn pick<'a>(&self, ann: &'a Ann<'_>) -> Option<(&'static str, &'a str)> {
        self.0.iter().find_map(|s| match s {
            Src::Key(k) => ann.map.get(*k).map(|v| (*k, v.as_str())),
            Src::Kuma(field) => ann.kuma.get(field).map(|v| (kuma::KEY, v)),
        })
    }
}

impl PodPolicy {
    /// Validates the annotations that concern us and derives the pod's policy.
    /// Annotations of other tools are ignored; ours, Istio's and Kuma's traffic keys are checked.
    pub fn from_annotations(
        ann: &BTreeMap<String, String>,
        defaults: &Defaults,
    ) -> Result<PodPolicy, PolicyError> {
        let mode = pod_mode(ann, defaults)?;
        // Another mesh's pod: its Istio/Kuma keys configure that mesh, not us; only ours count,
        // and without our mode key the pod is left alone.
        let own_only: BTreeMap<String, String>;
        let map = if foreign_mesh(ann).is_some() {
            own_only = ann
                .iter()
                .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            &own_only
        } else {
            ann
        };
        // Kuma's merged config counts only for pods without another mesh's mark (it was
        // filtered out above otherwise), and only its exclusions are read.
        let kuma = match map.get(kuma::KEY) {
            Some(v) => kuma::exclusions(v)?,
            None => kuma::Exclusions::default(),
        };
        let ann = &Ann { map, kuma };

        let fail = fail_mode(map, defaults)?;
        let (inbound_ports, exclude_inbound_ports) = inbound(ann, defaults)?;
        let outbound = outbound(ann)?;
        let proxy_uid = match map.get("tproxy-cni.io/proxy-uid") {
            Some(v) => id("tproxy-cni.io/proxy-uid", v)?,
            None => defaults.proxy_uid,
        };
        let proxy_gid = match map.get("tproxy-cni.io/proxy-gid") {
            Some(v) => Some(id("tproxy-cni.io/proxy-gid", v)?),
            None => defaults.proxy_gid,
        };
        let north_south = NorthSouth::from_annotations(map)?;
        north_south_captured(map, &north_south, &inbound_ports, &exclude_inbound_ports)?;

        Ok(PodPolicy {
            mode,
            fail,
            inbound_ports,
            exclude_inbound_ports,
            outbound,
            proxy_uid,
            proxy_gid,
            north_south,
        })
    }
}

fn fail_mode(map: &BTreeMap<String, String>, defaults: &Defaults) -> Result<FailMode, PolicyError> {
    Ok(match map.get("tproxy-cni.io/fail-mode") {
        Some(v) => match v.trim().to_ascii_lowercase().as_str() {
            "closed" => FailMode::Closed,
            "open" => FailMode::Open,
            _ => return Err(err("tproxy-cni.io/fail-mode", v, "expected closed or open")),
        },
        None => defaults.fail,
    })
}

/// The captured inbound ports and the excluded ones (the conflist's defaults plus the pod's).
fn inbound(
    ann: &Ann<'_>,
    defaults: &Defaults,
) -> Result<(Selector<PortRange>, Vec<PortRange>), PolicyError> {
    let inbound_ports = match S_INBOUND.pick(ann) {
        Some((k, v)) => port_selector(k, v)?,
        None => Selector::All,
    };
    let mut exclude_inbound_ports = defaults.exclude_inbound_ports.clone();
    let ex_in_key = S_EX_INBOUND.pick(ann);
    if let Some((k, v)) = ex_in_key {
        exclude_inbound_ports.extend(port_list(k, v)?);
    }
    if let (Selector::List(inc), Some((ek, ev))) = (&inbound_ports, ex_in_key) {
        let user_ex = port_list(ek, ev)?;
        if let Some((i, e)) = first_covered(inc, &user_ex) {
            let (ik, _) = S_INBOUND.pick(ann).unwrap_or(("", ""));
            return Err(err(
                ek,
                ev,
                format!("{e} excludes all of {i} in {ik:?}: the include could never match"),
            ));
        }
    }
    Ok((inbound_ports, exclude_inbound_ports))
}

/// The outbound CIDRs and ports; an include that an exclude covers entirely is an error.
fn outbound(ann: &Ann<'_>) -> Result<OutboundPolicy, PolicyError> {
    let include_cidrs = match S_IN_OUT_CIDR.pick(ann) {
        Some((k, v)) => cidr_selector(k, v)?,
        None => Selector::List(Vec::new()),
    };
    let exclude_cidrs = match S_EX_OUT_CIDR.pick(ann) {
        Some((k, v)) => cidr_list(k, v)?,
        None => Vec::new(),
    };
    if let Selector::List(inc) = &include_cidrs {
        if let Some((i, e)) = first_covered_cidr(inc, &exclude_cidrs) {
            let (ek, ev) = S_EX_OUT_CIDR.pick(ann).unwrap_or(("", ""));
            let (ik, _) = S_IN_OUT_CIDR.pick(ann).unwrap_or(("", ""));
            let why = if i == e {
                format!("{i} is both included and excluded")
            } else {
                format!("{e} excludes all of {i} in {ik:?}: the include could never match")
            };
            return Err(err(ek, ev, why));
        }
    }
    let include_ports = match S_IN_OUT_PORTS.pick(ann) {
        Some((k, v)) => port_list(k, v)?,
        None => Vec::new(),
    };
    let exclude_ports = match S_EX_OUT_PORTS.pick(ann) {
        Some((k, v)) => port_list(k, v)?,
        None => Vec::new(),
    };
    if let Some((i, e)) = first_covered(&include_ports, &exclude_ports) {
        let (ek, ev) = S_EX_OUT_PORTS.pick(ann).unwrap_or(("", ""));
        return Err(err(
            ek,
            ev,
            format!("{e} excludes all of included outbound port {i}"),
        ));
    }
    Ok(OutboundPolicy {
        include_cidrs,
        exclude_cidrs,
        include_ports,
        exclude_ports,
    })
}

/// The north-south ports must be ports the sidecar sees: captured, and not excluded.
fn north_south_captured(
    map: &BTreeMap<String, String>,
    north_south: &NorthSouth,
    inbound_ports: &Selector<PortRange>,
    exclude_inbound_ports: &[PortRange],
) -> Result<(), PolicyError> {
    let covered = |key: &str, ranges: &[PortRange]| -> Result<(), PolicyError> {
        let value = map.get(key).map(String::as_str).unwrap_or("");
        for r in ranges {
            if let Some(e) = exclude_inbound_ports.iter().find(|e| e.overlaps(r)) {
                return Err(err(
                    key,
                    value,
                    format!(
                        "{r} overlaps the excluded inbound port(s) {e}: the sidecar never sees it"
                    ),
                ));
            }
            if let Selector::List(inc) = inbound_ports {
                if !inc.iter().any(|i| i.lo <= r.lo && r.hi <= i.hi) {
                    return Err(err(
                        key,
                        value,
                        format!("{r} is not within the captured inbound ports"),
                    ));
                }
            }
        }
        Ok(())
    };
    if let Selector::List(l) = &north_south.proxy_protocol_ports {
        covered("tproxy-cni.io/proxy-protocol-ports", l)?;
    }
    covered("tproxy-cni.io/xff-ports", &north_south.xff_ports)?;
    let out: Vec<PortRange> = north_south
        .proxy_protocol_out
        .iter()
        .map(|(r, _)| *r)
        .collect();
    covered("tproxy-cni.io/proxy-protocol-out", &out)?;
    Ok(())
}
