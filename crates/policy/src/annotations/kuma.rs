//! Kuma's merged annotation `traffic.kuma.io/transparent-proxy-config`: one YAML value in
//! which Kuma's injector writes the transparent-proxy settings of the pod that differ from the
//! defaults (Kuma's ConfigMap design; its CNI plugin reads only this annotation). Field names
//! as in Kuma's "Transparent Proxy Configuration Reference" (docs/ARCHITECTURE.md, pitfall 62).
//!
//! We honour its exclusions for pods migrated from Kuma, after our keys and Istio's and before
//! the older one-key `traffic.kuma.io/exclude-*` annotations (the injector merges those into
//! this value): `redirect.inbound.excludePorts`, `redirect.outbound.excludePorts` and
//! `redirect.outbound.excludePortsForIPs`. Other fields are ignored. The value goes through the
//! same bounded reader as Istio's config (`yaml`), and any malformed part is an error naming
//! the annotation and the field.

use super::yaml::Node;
use super::{cidr_list, err, port_list, yaml_value, PolicyError};

/// The annotation's key.
pub(crate) const KEY: &str = "traffic.kuma.io/transparent-proxy-config";

/// Kuma's fields we read, with the annotation keys of ours they stand for.
pub(crate) const INBOUND_PORTS: &str = "redirect.inbound.excludePorts";
pub(crate) const OUTBOUND_PORTS: &str = "redirect.outbound.excludePorts";
pub(crate) const OUTBOUND_IPS: &str = "redirect.outbound.excludePortsForIPs";

/// The exclusions, each as the comma-separated list our list parsers read (checked already).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Exclusions {
    pub inbound_ports: Option<String>,
    pub outbound_ports: Option<String>,
    pub outbound_ips: Option<String>,
}

impl Exclusions {
    /// The list for one of the field paths above.
    pub(crate) fn get(&self, field: &str) -> Option<&str> {
        match field {
            INBOUND_PORTS => self.inbound_ports.as_deref(),
            OUTBOUND_PORTS => self.outbound_ports.as_deref(),
            OUTBOUND_IPS => self.outbound_ips.as_deref(),
            _ => None,
        }
    }
}

/// Reads the exclusions from the annotation's value.
pub(crate) fn exclusions(value: &str) -> Result<Exclusions, PolicyError> {
    let doc = yaml_value(KEY, value)?;
    if doc.is_null() {
        return Ok(Exclusions::default());
    }
    if !matches!(doc, Node::Map(_)) {
        return Err(err(
            KEY,
            value,
            "expected a mapping (Kuma's transparent proxy config)",
        ));
    }
    let inbound_ports = list(&doc, INBOUND_PORTS, value)?;
    let outbound_ports = list(&doc, OUTBOUND_PORTS, value)?;
    let outbound_ips = list(&doc, OUTBOUND_IPS, value)?;
    let named = |path: &str, e: PolicyError| err(KEY, value, format!("{path}: {}", e.reason));
    if let Some(l) = &inbound_ports {
        port_list(KEY, l).map_err(|e| named(INBOUND_PORTS, e))?;
    }
    if let Some(l) = &outbound_ports {
        port_list(KEY, l).map_err(|e| named(OUTBOUND_PORTS, e))?;
    }
    if let Some(l) = &outbound_ips {
        cidr_list(KEY, l).map_err(|e| named(OUTBOUND_IPS, e))?;
    }
    Ok(Exclusions {
        inbound_ports,
        outbound_ports,
        outbound_ips,
    })
}

/// The field at dotted `path` as a comma-separated list: a YAML list of scalars, or one
/// scalar holding a comma-separated list. `None` when absent or null. Every mapping on the way
/// must be a mapping (or null: nothing below it).
fn list(doc: &Node, path: &str, value: &str) -> Result<Option<String>, PolicyError> {
    let mut node = doc;
    let mut walked = String::new();
    for part in path.split('.') {
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(part);
        node = match node {
            Node::Map(m) => match m.get(part) {
                Some(n) if n.is_null() => return Ok(None),
                Some(n) => n,
                None => return Ok(None),
            },
            _ => {
                let parent = walked.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
                return Err(err(KEY, value, format!("{parent} must be a mapping")));
            }
        };
    }
    match node {
        Node::Scalar { text, .. } => Ok(Some(text.clone())),
        Node::Seq(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item.as_scalar() {
                    Some(s) => out.push(s.trim()),
                    None => {
                        return Err(err(
                            KEY,
                            value,
                            format!("{path} must be a list of single values"),
                        ))
                    }
                }
            }
            Ok(Some(out.join(",")))
        }
        Node::Map(_) => Err(err(KEY, value, format!("{path} must be a list"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_lists_and_errors() {
        let ex = exclusions(
            "kumaDPUser: kuma-dp\nredirect:\n  inbound:\n    excludePorts: [22, 8080]\n    enabled: true\n  outbound:\n    excludePorts: \"53, 9000-9100\"\n    excludePortsForIPs:\n    - 10.0.0.0/8\n    - fd00::/8\n  dns: {enabled: true}\n",
        )
        .unwrap();
        assert_eq!(ex.inbound_ports.as_deref(), Some("22,8080"));
        assert_eq!(ex.outbound_ports.as_deref(), Some("53, 9000-9100"));
        assert_eq!(ex.outbound_ips.as_deref(), Some("10.0.0.0/8,fd00::/8"));
        let json = exclusions(r#"{"redirect":{"inbound":{"excludePorts":[22,80,443]}}}"#).unwrap();
        assert_eq!(json.get(INBOUND_PORTS), Some("22,80,443"));
        assert_eq!(json.get(OUTBOUND_PORTS), None);
        assert_eq!(exclusions("").unwrap(), Exclusions::default());
        assert_eq!(exclusions("redirect: ~").unwrap(), Exclusions::default());
        for (bad, field) in [
            (
                "redirect:\n  inbound:\n    excludePorts: [22, x]\n",
                INBOUND_PORTS,
            ),
            (
                "redirect:\n  outbound:\n    excludePorts: [70000]\n",
                OUTBOUND_PORTS,
            ),
            (
                "redirect:\n  outbound:\n    excludePortsForIPs: [10.0.0.1/8]\n",
                OUTBOUND_IPS,
            ),
            (
                "redirect:\n  inbound:\n    excludePorts: [[22]]\n",
                INBOUND_PORTS,
            ),
            (
                "redirect:\n  inbound:\n    excludePorts: {a: 1}\n",
                INBOUND_PORTS,
            ),
            ("redirect: [1]\n", "redirect"),
            ("redirect:\n  inbound: 3\n", "redirect.inbound"),
            ("- 1\n", "mapping"),
            ("redirect: &r {}\n", "anchors"),
            ("redirect: [\n", "not YAML"),
        ] {
            let e = exclusions(bad).expect_err(bad);
            assert_eq!(e.key, KEY);
            assert!(e.reason.contains(field), "{bad:?}: {e}");
        }
    }
}
