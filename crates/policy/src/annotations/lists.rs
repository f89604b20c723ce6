//! The list parsers every annotation value goes through: comma-separated ports and CIDRs
//! (bounded by [`MAX_LIST`]), ids, and YAML values (bounded by [`super::MAX_PROXY_CONFIG`]);
//! each error names the key.

use std::net::IpAddr;

use super::{err, yaml, PolicyError, Selector, MAX_PROXY_CONFIG};
use crate::echo;
use crate::netaddr::{Cidr, ParseError, PortRange};

/// Most entries one list may hold: each becomes a rule, and a pod should not be able to make
/// the plugin build an unbounded ruleset.
pub(crate) const MAX_LIST: usize = 256;

/// Parses a YAML or JSON annotation value within [`MAX_PROXY_CONFIG`] and the reader's
/// bounds; errors name `key`.
pub(super) fn yaml_value(key: &str, value: &str) -> Result<yaml::Node, PolicyError> {
    if value.len() > MAX_PROXY_CONFIG {
        return Err(err(
            key,
            value,
            format!("longer than {MAX_PROXY_CONFIG} bytes"),
        ));
    }
    yaml::parse(value).map_err(|e| err(key, value, e))
}

/// An included entry that an excluded one covers entirely: the include could never match, so
/// the pair is a mistake. (An exclude inside a wider include is fine: "9000-9100 but not 9090".)
pub(super) fn first_covered(inc: &[PortRange], ex: &[PortRange]) -> Option<(PortRange, PortRange)> {
    inc.iter().find_map(|i| {
        ex.iter()
            .find(|e| e.lo <= i.lo && i.hi <= e.hi)
            .map(|e| (*i, *e))
    })
}

/// The CIDR version of [`first_covered`]: an included range inside an excluded one.
pub(super) fn first_covered_cidr(inc: &[Cidr], ex: &[Cidr]) -> Option<(Cidr, Cidr)> {
    inc.iter().find_map(|i| {
        ex.iter()
            .find(|e| e.family() == i.family() && e.prefix() <= i.prefix() && e.contains(&i.addr()))
            .map(|e| (*i, *e))
    })
}

/// A parse error with the offending entry cut like every echoed value.
pub(super) fn reason(e: &ParseError) -> String {
    match e {
        ParseError::BadCidr(s) => format!("{} is not an IP address or CIDR", echo(s)),
        ParseError::HostBits(s, c) => {
            format!("{} has host bits set (did you mean {c}?)", echo(s))
        }
        ParseError::BadPort(s) => {
            format!("{} is not a port (1-65535) or port range (lo-hi)", echo(s))
        }
    }
}

pub(super) fn items<'a>(key: &str, value: &'a str) -> Result<Vec<&'a str>, PolicyError> {
    let t = value.trim();
    if t.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = t.split(',').map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err(key, value, "empty entry in comma-separated list"));
    }
    if parts.len() > MAX_LIST {
        return Err(err(key, value, format!("more than {MAX_LIST} entries")));
    }
    Ok(parts)
}

pub(super) fn port_list(key: &str, value: &str) -> Result<Vec<PortRange>, PolicyError> {
    items(key, value)?
        .into_iter()
        .map(|p| {
            if p == "*" {
                return Err(err(key, value, "\"*\" is not allowed in this list"));
            }
            p.parse::<PortRange>()
                .map_err(|e| err(key, value, reason(&e)))
        })
        .collect()
}

pub(super) fn port_selector(key: &str, value: &str) -> Result<Selector<PortRange>, PolicyError> {
    if value.trim() == "*" {
        return Ok(Selector::All);
    }
    Ok(Selector::List(port_list(key, value)?))
}

pub(super) fn cidr_list(key: &str, value: &str) -> Result<Vec<Cidr>, PolicyError> {
    items(key, value)?
        .into_iter()
        .map(|c| {
            if c == "*" {
                return Err(err(key, value, "\"*\" is not allowed in this list"));
            }
            let cidr = c.parse::<Cidr>().map_err(|e| err(key, value, reason(&e)))?;
            refuse_v4_mapped(key, value, c, cidr)
        })
        .collect()
}

/// Clients and peers are compared as IPv4 once IPv4-mapped, so a range written in the mapped
/// form (`::ffff:10.1.0.0/112`) would never match anything: refused, with the IPv4 spelling
/// (docs/ARCHITECTURE.md, pitfall 69).
pub(super) fn refuse_v4_mapped(
    key: &str,
    value: &str,
    entry: &str,
    cidr: Cidr,
) -> Result<Cidr, PolicyError> {
    let IpAddr::V6(v6) = cidr.addr() else {
        return Ok(cidr);
    };
    match v6.to_ipv4_mapped() {
        Some(v4) if cidr.prefix() >= 96 => Err(err(
            key,
            value,
            format!(
                "{} is an IPv4-mapped IPv6 range, which never matches (addresses are compared as IPv4): write {v4}/{}",
                echo(entry),
                cidr.prefix() - 96
            ),
        )),
        _ => Ok(cidr),
    }
}

pub(super) fn cidr_selector(key: &str, value: &str) -> Result<Selector<Cidr>, PolicyError> {
    if value.trim() == "*" {
        return Ok(Selector::All);
    }
    Ok(Selector::List(cidr_list(key, value)?))
}

pub(super) fn id(key: &str, value: &str) -> Result<u32, PolicyError> {
    let t = value.trim();
    if t.is_empty() || t.len() > 10 || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(key, value, "expected a numeric id (0-4294967294)"));
    }
    match t.parse::<u64>() {
        // 4294967295 is (uid_t)-1, "no id" to the kernel.
        Ok(n) if n < u64::from(u32::MAX) => Ok(n as u32),
        _ => Err(err(key, value, "expected a numeric id (0-4294967294)")),
    }
}
