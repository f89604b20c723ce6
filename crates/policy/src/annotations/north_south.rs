//! The north-south keys: PROXY protocol in and out, X-Forwarded-For, the peer and client ACLs;
//! ours first, then Istio's `proxy.istio.io/config` gateway topology.

use std::collections::BTreeMap;

use super::lists::{cidr_list, items, port_list, port_selector, reason, yaml_value};
use super::{
    err, yaml, NorthSouth, PolicyError, PpVersion, Selector, XffTrust, ISTIO_PROXY_CONFIG,
    MAX_TRUSTED_HOPS,
};
use crate::consts::ANNOTATION_PREFIX;
use crate::echo;
use crate::netaddr::PortRange;

/// What Istio's `proxy.istio.io/config` says about the gateway topology.
#[derive(Debug, Default, PartialEq, Eq)]
struct IstioTopology {
    num_trusted_proxies: Option<u32>,
    proxy_protocol: bool,
}

fn istio_topology(value: &str) -> Result<IstioTopology, PolicyError> {
    let key = ISTIO_PROXY_CONFIG;
    let doc = yaml_value(key, value)?;
    if doc.is_null() {
        return Ok(IstioTopology::default());
    }
    if !matches!(doc, yaml::Node::Map(_)) {
        return Err(err(key, value, "expected a mapping (a ProxyConfig)"));
    }
    let gt = match doc.get("gatewayTopology") {
        None => return Ok(IstioTopology::default()),
        Some(gt) if gt.is_null() => return Ok(IstioTopology::default()),
        Some(gt @ yaml::Node::Map(_)) => gt,
        Some(_) => return Err(err(key, value, "gatewayTopology must be a mapping")),
    };
    let num_trusted_proxies = match gt.get("numTrustedProxies") {
        None => None,
        Some(v) if v.is_null() => None,
        Some(v) => match v.as_u64() {
            Some(n) if n <= u64::from(MAX_TRUSTED_HOPS) => Some(n as u32),
            _ => {
                return Err(err(
                    key,
                    value,
                    format!(
                        "gatewayTopology.numTrustedProxies must be a number 0-{MAX_TRUSTED_HOPS}"
                    ),
                ))
            }
        },
    };
    let proxy_protocol = match gt.get("proxyProtocol") {
        None => false,
        Some(v) if v.is_null() => false,
        Some(yaml::Node::Map(_)) => true,
        Some(_) => {
            return Err(err(
                key,
                value,
                "gatewayTopology.proxyProtocol must be a mapping (e.g. {})",
            ))
        }
    };
    Ok(IstioTopology {
        num_trusted_proxies,
        proxy_protocol,
    })
}

fn pp_out_list(key: &str, value: &str) -> Result<Vec<(PortRange, PpVersion)>, PolicyError> {
    items(key, value)?
        .into_iter()
        .map(|item| {
            let (p, v) = item.rsplit_once(':').ok_or_else(|| {
                err(
                    key,
                    value,
                    format!("{} is not PORT:v1 or PORT:v2", echo(item)),
                )
            })?;
            let version = match v.trim().to_ascii_lowercase().as_str() {
                "v1" | "1" => PpVersion::V1,
                "v2" | "2" => PpVersion::V2,
                _ => {
                    return Err(err(
                        key,
                        value,
                        format!("{} is not PORT:v1 or PORT:v2", echo(item)),
                    ))
                }
            };
            let range = p
                .trim()
                .parse::<PortRange>()
                .map_err(|e| err(key, value, reason(&e)))?;
            Ok((range, version))
        })
        .collect()
}

impl NorthSouth {
    /// Reads the north-south keys (ours, then Istio's `proxy.istio.io/config`). Checks the keys
    /// among themselves; [`PodPolicy::from_annotations`] also checks them against the captured
    /// ports. The sidecar calls this with its flags under the same key names.
    pub fn from_annotations(ann: &BTreeMap<String, String>) -> Result<NorthSouth, PolicyError> {
        let k = |name: &str| format!("{ANNOTATION_PREFIX}{name}");
        let get = |name: &str| {
            let key = k(name);
            ann.get(&key).map(|v| (key, v.as_str()))
        };
        let istio = match ann.get(ISTIO_PROXY_CONFIG) {
            Some(v) => istio_topology(v)?,
            None => IstioTopology::default(),
        };
        let mut ns = NorthSouth::default();

        let pp_ports = get("proxy-protocol-ports");
        let pp_trusted = get("proxy-protocol-trusted-cidrs");
        match &pp_ports {
            Some((key, v)) => ns.proxy_protocol_ports = port_selector(key, v)?,
            // Istio's gateway: every listener expects the header (from everyone, unless our
            // trusted-CIDR key narrows it).
            None if istio.proxy_protocol => ns.proxy_protocol_ports = Selector::All,
            None => {}
        }
        match &pp_trusted {
            Some((key, v)) => ns.proxy_protocol_trusted = cidr_list(key, v)?,
            None if istio.proxy_protocol => {
                ns.proxy_protocol_trusted = ["0.0.0.0/0", "::/0"]
                    .iter()
                    .filter_map(|c| c.parse().ok())
                    .collect()
            }
            None => {}
        }
        let pp_on = !ns.proxy_protocol_ports.is_nothing();
        if pp_on && ns.proxy_protocol_trusted.is_empty() {
            let (key, v) = pp_ports.clone().unwrap_or_default();
            return Err(err(
                &key,
                v,
                format!(
                    "needs {} (the balancers' addresses; 0.0.0.0/0,::/0 requires the header from everyone)",
                    k("proxy-protocol-trusted-cidrs")
                ),
            ));
        }
        if !pp_on && !ns.proxy_protocol_trusted.is_empty() {
            let (key, v) = pp_trusted.clone().unwrap_or_default();
            return Err(err(
                &key,
                v,
                format!("has no effect without {}", k("proxy-protocol-ports")),
            ));
        }
        if let Some((key, v)) = get("proxy-protocol-out") {
            ns.proxy_protocol_out = pp_out_list(&key, v)?;
        }

        if let Some((key, v)) = get("xff-ports") {
            ns.xff_ports = port_list(&key, v)?;
        }
        if let Some((key, v)) = get("xff-connect-ports") {
            ns.xff_connect_ports = port_list(&key, v)?;
            if let Some(r) = ns
                .xff_connect_ports
                .iter()
                .find(|r| (r.lo..=r.hi).any(|p| !ns.xff_on(p)))
            {
                return Err(err(&key, v, format!("{r} is not in {}", k("xff-ports"))));
            }
        }
        let hops = get("xff-num-trusted-proxies");
        let cidrs = get("xff-trusted-cidrs");
        ns.xff_trust = xff_trust(&hops, &cidrs, &istio)?;
        if ns.xff_ports.is_empty() {
            if let Some((key, v)) = hops.as_ref().or(cidrs.as_ref()) {
                return Err(err(
                    key,
                    v,
                    format!("has no effect without {}", k("xff-ports")),
                ));
            }
        }

        for (name, list) in [
            ("allow-peer-cidrs", &mut ns.acl.allow_peer),
            ("deny-peer-cidrs", &mut ns.acl.deny_peer),
            ("allow-client-cidrs", &mut ns.acl.allow_client),
            ("deny-client-cidrs", &mut ns.acl.deny_client),
        ] {
            if let Some((key, v)) = get(name) {
                *list = cidr_list(&key, v)?;
            }
        }
        Ok(ns)
    }
}

/// Whom the X-Forwarded-For chain trusts: our hop count or our CIDRs (not both), else Istio's
/// `numTrustedProxies`, else nobody.
fn xff_trust(
    hops: &Option<(String, &str)>,
    cidrs: &Option<(String, &str)>,
    istio: &IstioTopology,
) -> Result<XffTrust, PolicyError> {
    let k = |name: &str| format!("{ANNOTATION_PREFIX}{name}");
    Ok(match (hops, cidrs) {
        (Some(_), Some((key, v))) => {
            return Err(err(
                key,
                v,
                format!(
                    "use either this or {}, not both",
                    k("xff-num-trusted-proxies")
                ),
            ))
        }
        (Some((key, v)), None) => {
            let t = v.trim();
            match t.parse::<u32>() {
                Ok(n) if n <= MAX_TRUSTED_HOPS && t.bytes().all(|b| b.is_ascii_digit()) => {
                    XffTrust::Hops(n)
                }
                _ => {
                    return Err(err(
                        key,
                        v,
                        format!("expected a number 0-{MAX_TRUSTED_HOPS}"),
                    ))
                }
            }
        }
        (None, Some((key, v))) => XffTrust::Cidrs(cidr_list(key, v)?),
        (None, None) => XffTrust::Hops(istio.num_trusted_proxies.unwrap_or(0)),
    })
}
