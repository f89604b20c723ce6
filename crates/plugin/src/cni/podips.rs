//! The pod's own addresses in a `prevResult`: what decides the families ADD programs.
//!
//! A primary's result can list addresses that are not the pod's (docs/ARCHITECTURE.md,
//! pitfall 74): `ips[].interface` may point at a host-side interface (no `sandbox`), and
//! link-local or IPv4-mapped addresses say nothing about the families the pod is reached on.
//! Rules:
//! - an entry whose `interface` index points at an `interfaces[]` entry with a non-empty
//!   `sandbox` counts; one pointing at an entry without a `sandbox` does not;
//! - an entry without `interface` counts (the CNI spec makes the field optional, and primaries
//!   that omit it, IPAM-only results among them, describe the pod's own addresses);
//! - an index that is not a non-negative integer, or has no `interfaces[]` entry, is an error
//!   naming the key (the result is malformed; guessing could program the wrong family);
//! - link-local (`169.254.0.0/16`, `fe80::/10`) and IPv4-mapped (`::ffff:0:0/96`) addresses
//!   never count.

use std::net::IpAddr;

use serde_json::Value;

use super::error::{code, echo_json, CniError};
use tproxy_cni_policy::echo;

fn invalid(msg: String) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

/// True for addresses that tell which family the pod is reached on.
fn counts(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_link_local(),
        IpAddr::V6(v6) => {
            let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
            !link_local && v6.to_ipv4_mapped().is_none()
        }
    }
}

/// Whether `interfaces[index]` is inside the container (has a `sandbox`).
fn in_sandbox(prev: &Value, i: usize, index: &Value) -> Result<bool, CniError> {
    let key = format!("\"prevResult.ips[{i}].interface\"");
    let n = index
        .as_u64()
        .ok_or_else(|| invalid(format!("{key}: must be an index, got {}", echo_json(index))))?;
    let iface = prev
        .get("interfaces")
        .and_then(Value::as_array)
        .and_then(|a| a.get(usize::try_from(n).unwrap_or(usize::MAX)))
        .ok_or_else(|| {
            invalid(format!(
                "{key}: {n} has no entry in \"prevResult.interfaces\""
            ))
        })?;
    Ok(iface
        .get("sandbox")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty()))
}

/// The pod's own addresses in `prev` (see the module rules), in order.
pub(crate) fn pod_addresses(prev: &Value) -> Result<Vec<IpAddr>, CniError> {
    let ips = match prev.get("ips") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(invalid(format!(
                "\"prevResult.ips\": must be a list, got {}",
                echo_json(other)
            )))
        }
    };
    let mut out = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let addr = ip.get("address").and_then(Value::as_str).ok_or_else(|| {
            invalid(format!(
                "\"prevResult.ips[{i}].address\" is missing or not a string"
            ))
        })?;
        let host = addr.split('/').next().unwrap_or(addr);
        let parsed: IpAddr = host.parse().map_err(|_| {
            invalid(format!(
                "\"prevResult.ips[{i}].address\": {} is not an IP/prefix",
                echo(addr)
            ))
        })?;
        let pods = match ip.get("interface") {
            None | Some(Value::Null) => true,
            Some(index) => in_sandbox(prev, i, index)?,
        };
        if pods && counts(&parsed) {
            out.push(parsed);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn addrs(prev: Value) -> Vec<String> {
        pod_addresses(&prev)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn only_the_pods_own_addresses_count() {
        let ifaces = json!([
            {"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
            {"name": "veth1", "mac": "aa:bb:cc:dd:ee:fe"},
            {"name": "eth0", "mac": "aa:bb:cc:dd:ee:fd", "sandbox": "/var/run/netns/x"}
        ]);
        let prev = json!({"interfaces": ifaces, "ips": [
            {"address": "10.1.0.5/24", "interface": 2},
            {"address": "fd00::1/64", "interface": 0},
            {"address": "fe80::5/64", "interface": 2},
            {"address": "169.254.1.1/16", "interface": 2},
            {"address": "::ffff:10.1.0.5/128", "interface": 2},
            {"address": "10.1.0.6/24"}
        ]});
        assert_eq!(addrs(prev), ["10.1.0.5", "10.1.0.6"]);
        // An empty sandbox is no sandbox.
        let prev = json!({"interfaces": [{"name": "eth0", "sandbox": ""}],
            "ips": [{"address": "fd00::5/64", "interface": 0}]});
        assert!(addrs(prev).is_empty());
    }

    #[test]
    fn bad_interface_indexes_name_the_key() {
        for (index, says) in [
            (json!(3), "3 has no entry"),
            (json!(-1), "must be an index"),
            (json!("0"), "must be an index"),
        ] {
            let prev = json!({"interfaces": [{"name": "eth0", "sandbox": "/x"}],
                "ips": [{"address": "10.1.0.5/24", "interface": index}]});
            let e = pod_addresses(&prev).unwrap_err();
            assert_eq!(e.code, code::INVALID_CONFIG);
            assert!(
                e.msg.contains("prevResult.ips[0].interface") && e.msg.contains(says),
                "{e}"
            );
        }
        let prev = json!({"ips": [{"address": "10.1.0.5/24", "interface": 0}]});
        assert!(pod_addresses(&prev).is_err());
    }
}
