//! Can the plugin serve a config? The installer chains only into configs whose `cniVersion` the
//! plugin accepts (`tproxy_cni_plugin::SUPPORTED_VERSIONS`): chaining into any other makes every
//! pod ADD on the node fail, annotated or not (docs/ARCHITECTURE.md, pitfall 70).

use serde_json::Value;

use tproxy_cni_plugin::SUPPORTED_VERSIONS;

/// `a.b.c` as numbers; `None` for anything else.
fn parse(v: &str) -> Option<(u64, u64, u64)> {
    let mut it = v.split('.').map(|p| p.parse::<u64>().ok());
    let out = (it.next()??, it.next()??, it.next()??);
    it.next().is_none().then_some(out)
}

/// Why the plugin cannot serve `config` (one clause naming the version and what to do), or
/// `None` when it can.
pub(crate) fn unservable(config: &Value) -> Option<String> {
    let oldest = SUPPORTED_VERSIONS.first().copied().unwrap_or("0.3.0");
    let newest = SUPPORTED_VERSIONS.last().copied().unwrap_or("1.1.0");
    let speaks = format!("tproxy-cni speaks {}", SUPPORTED_VERSIONS.join(", "));
    let v = match config.get("cniVersion") {
        None => {
            return Some(format!(
                "has no \"cniVersion\" (runtimes then treat it as 0.1.0; {speaks}); set \
                 \"cniVersion\" to {oldest} or later in the primary CNI's config"
            ))
        }
        Some(Value::String(s)) => s,
        Some(other) => {
            return Some(format!(
                "has a \"cniVersion\" that is not a string ({other}); {speaks}"
            ))
        }
    };
    if SUPPORTED_VERSIONS.contains(&v.as_str()) {
        return None;
    }
    let shown: String = v.chars().take(40).collect();
    Some(match (parse(v), parse(oldest), parse(newest)) {
        (Some(got), Some(lo), _) if got < lo => format!(
            "has cniVersion {shown:?}, older than {oldest} ({speaks}); set \"cniVersion\" to \
             {oldest} or later in the primary CNI's config (or upgrade the primary CNI)"
        ),
        (Some(got), _, Some(hi)) if got > hi => format!(
            "has cniVersion {shown:?}, newer than {newest} ({speaks}); upgrade tproxy-cni to a \
             release that speaks {shown}"
        ),
        _ => format!(
            "has cniVersion {shown:?}, which {speaks} does not include; use one of those in \
             the primary CNI's config"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn versions_the_plugin_serves() {
        for ok in SUPPORTED_VERSIONS {
            assert_eq!(unservable(&json!({ "cniVersion": ok })), None, "{ok}");
        }
        for (bad, says) in [
            (json!({}), "no \"cniVersion\""),
            (json!({"cniVersion": "0.1.0"}), "older than 0.3.0"),
            (json!({"cniVersion": "0.2.0"}), "older than 0.3.0"),
            (json!({"cniVersion": "1.2.0"}), "newer than 1.1.0"),
            (json!({"cniVersion": "2.0.0"}), "upgrade tproxy-cni"),
            (json!({"cniVersion": "0.3.2"}), "does not include"),
            (json!({"cniVersion": "x"}), "does not include"),
            (json!({"cniVersion": 1}), "not a string"),
        ] {
            let why = unservable(&bad).unwrap_or_default();
            assert!(why.contains(says), "{bad}: {why}");
        }
    }
}
