//! libcni's result cache as libcni writes it (containernetworking/cni, libcni/api.go
//! `cacheAdd`/`cacheDel`/`getCachedResult`): after a successful ADD of a list, one file
//! `<dir>/results/<network>-<container>-<ifname>` (mode 0600, dirs 0700) holding
//! `{"kind":"cniCacheV1","containerId","config","ifName","networkName","netns","cniArgs",
//! "capabilityArgs","result"}`; CHECK and DEL read the result back from it; DEL removes it.
//!
//! What differs from libcni: `config` is the list as this emulator parsed it, re-serialised
//! (libcni keeps the file's bytes); `netns` is written as libcni 1.2+ does (containerd 1.6's
//! libcni 1.1 leaves it out; the result's `interfaces[].sandbox` carries the path either way).

use serde_json::{json, Map, Value};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::Invocation;

/// `<dir>/results/<network>-<container>-<ifname>`.
pub(crate) fn path(dir: &Path, network: &str, inv: &Invocation) -> PathBuf {
    dir.join("results")
        .join(format!("{network}-{}-{}", inv.container_id, inv.ifname))
}

/// Go's `encoding/json` writes a `[]byte` as standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(ABC[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Writes the entry for a successful list ADD.
pub(crate) fn add(
    dir: &Path,
    list: &Value,
    inv: &Invocation,
    result: &Value,
) -> std::io::Result<()> {
    let network = list.get("name").and_then(Value::as_str).unwrap_or_default();
    let file = path(dir, network, inv);
    let args: Vec<Value> = inv.cni_args.iter().map(|(k, v)| json!([k, v])).collect();
    let mut o = Map::new();
    o.insert("kind".into(), json!("cniCacheV1"));
    o.insert("containerId".into(), json!(inv.container_id));
    o.insert(
        "config".into(),
        json!(base64(&serde_json::to_vec(list).unwrap_or_default())),
    );
    o.insert("ifName".into(), json!(inv.ifname));
    o.insert("networkName".into(), json!(network));
    if !inv.netns.as_os_str().is_empty() {
        o.insert("netns".into(), json!(inv.netns.display().to_string()));
    }
    if !args.is_empty() {
        o.insert("cniArgs".into(), Value::Array(args));
    }
    if !inv.runtime_config.is_empty() {
        o.insert(
            "capabilityArgs".into(),
            Value::Object(inv.runtime_config.clone()),
        );
    }
    o.insert("result".into(), result.clone());
    if let Some(parent) = file.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&file)?;
    std::io::Write::write_all(&mut f, &serde_json::to_vec(&Value::Object(o))?)
}

/// The cached result of the attachment, if there is an entry.
pub(crate) fn result(dir: &Path, list: &Value, inv: &Invocation) -> Option<Value> {
    let network = list.get("name").and_then(Value::as_str).unwrap_or_default();
    let bytes = std::fs::read(path(dir, network, inv)).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    (v.get("kind")? == "cniCacheV1").then(|| v.get("result").cloned())?
}

/// Removes the entry after a successful DEL (absent is fine).
pub(crate) fn del(dir: &Path, list: &Value, inv: &Invocation) -> std::io::Result<()> {
    let network = list.get("name").and_then(Value::as_str).unwrap_or_default();
    match std::fs::remove_file(path(dir, network, inv)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_go_writes_it() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"{\"name\":\"pods\"}"), "eyJuYW1lIjoicG9kcyJ9");
    }
}
