//! A `.conf` (or `.json`) primary keeps its file: our chain for it is a separate list, written
//! next to it under a name the runtimes load first, recording its source in `SOURCE_KEY`
//! (docs/ARCHITECTURE.md, pitfall 71; docs/install.md, "How the installer picks and chains a
//! config").
//!
//! - Name: the source's stem + `-tproxy-cni.conflist`. Runtimes order names as bytes (Go's
//!   `sort.Strings` in containerd's go-cni and CRI-O's ocicni), and `-` (0x2d) sorts before
//!   `.` (0x2e), so `10-x-tproxy-cni.conflist` comes right before `10-x.conf`, whatever the stem.
//! - Content: libcni's own conversion of a single config to a list (`cniVersion` and `name`
//!   lifted, the plugin kept as written) with our entry after it. CRI-O keeps the first file of
//!   a network `name` and takes the first valid file as its default: both are ours.
//! - Lifetime: the daemon rewrites it when the source changes and removes it as soon as the
//!   source is gone or no longer the config the runtime would use.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use serde_json::{Map, Value};

use super::conflist::{self, ConflistError};
use super::{InstallError, Installer};

/// The top-level key of our list that names its source file (in the same directory).
pub(crate) const SOURCE_KEY: &str = "tproxyCniSource";

/// What the chained list's name adds to the source's stem.
pub(crate) const SUFFIX: &str = "-tproxy-cni.conflist";

/// The chained list's name for the single-config file `source` (`.conf` or `.json`); `None`
/// for other names (a single config in a `.conflist` file loads nowhere).
pub fn name_for(source: &OsStr) -> Option<OsString> {
    let b = source.as_bytes();
    let stem = [b".conf".as_slice(), b".json"]
        .iter()
        .find_map(|ext| b.strip_suffix(*ext))?;
    let mut out = stem.to_vec();
    out.extend_from_slice(SUFFIX.as_bytes());
    // Byte order, as the runtimes sort: ours must come first.
    (out.as_slice() < b).then(|| OsString::from_vec(out))
}

/// The source a list of ours records (only lists holding our entry count).
pub(crate) fn source_of(value: &Value) -> Option<&str> {
    if !conflist::contains_ours(value) {
        return None;
    }
    value.get(SOURCE_KEY).and_then(Value::as_str)
}

/// The chained list for the single config `bytes` (parsed: `config`) named `source`.
pub fn render(
    bytes: &[u8],
    config: &Value,
    entry: &Map<String, Value>,
    source: &str,
) -> Result<Vec<u8>, ConflistError> {
    let Some(Value::Object(mut want)) = conflist::inject(config, entry)? else {
        return Err(ConflistError::Shape("not a single plugin config".into()));
    };
    let converted = conflist::patch(bytes, config, entry)?
        .ok_or_else(|| ConflistError::Shape("not a single plugin config".into()))?;
    // The source goes right after `{`: the one key the conversion does not write.
    let text = String::from_utf8_lossy(&converted).into_owned();
    let key = serde_json::to_string(SOURCE_KEY).unwrap_or_default();
    let val = serde_json::to_string(source).unwrap_or_default();
    let out = text.replacen("{\n", &format!("{{\n  {key}: {val},\n"), 1);
    // The parsed meaning, for the check: the same list plus the source.
    let mut full = Map::new();
    full.insert(SOURCE_KEY.into(), Value::String(source.into()));
    full.append(&mut want);
    match serde_json::from_str::<Value>(&out) {
        Ok(got) if got == Value::Object(full) => Ok(out.into_bytes()),
        _ => Err(ConflistError::Shape(
            "unusual layout we cannot convert safely; left untouched".into(),
        )),
    }
}

/// True for a list that an older installer made by converting the single config `conf` in
/// place (it deleted the `.conf`): our entry, the same network name, and exactly one other
/// plugin, of the same type. When the primary writes its `.conf` again, that list is dead
/// weight that would outlive the primary; it is removed.
pub(crate) fn is_old_conversion(list: &Value, conf: &Value) -> bool {
    let Some(plugins) = list.get("plugins").and_then(Value::as_array) else {
        return false;
    };
    let foreign: Vec<&Value> = plugins
        .iter()
        .filter(|p| p.get("type").and_then(Value::as_str) != Some(conflist::PLUGIN_TYPE))
        .collect();
    conflist::contains_ours(list)
        && list.get(SOURCE_KEY).is_none()
        && list.get("name").is_some()
        && list.get("name") == conf.get("name")
        && matches!(foreign.as_slice(), [only] if only.get("type") == conf.get("type"))
}

impl Installer {
    /// Removes every chained copy of ours except `self.keep`.
    pub(super) fn remove_stale_chained(&self) -> Result<(), InstallError> {
        for (name, source) in self.listing()?.chained {
            if self.keep.as_ref() == Some(&name) {
                continue;
            }
            let path = self.opts.conf_dir.join(&name);
            if super::files::remove_if_present(&path).map_err(super::io_err(&path))? {
                log::info!(
                    "removed {} (our chained copy of {source}, which is gone or no longer the \
                     config the runtime uses)",
                    path.display()
                );
            }
        }
        Ok(())
    }

    /// A single-config primary (`.conf`, `.json`) stays as it is: our chain for it is a
    /// separate list that the runtime loads first (`chained`), rewritten when the source
    /// changes. A list an older installer converted from it is removed.
    pub(super) fn chain_single(&mut self, c: super::Config) -> Result<super::Pass, InstallError> {
        let dir = self.opts.conf_dir.clone();
        let path = dir.join(&c.name);
        let Some(source) = c.name.to_str() else {
            return Ok(super::Pass::Done(super::State::Blocked(format!(
                "{}: its name is not UTF-8, so our chained copy cannot record it as its source; \
                 not chaining (rename the file, or make it a .conflist)",
                path.display()
            ))));
        };
        let Some(target) = name_for(&c.name) else {
            return Ok(super::Pass::Done(super::State::Blocked(format!(
                "{}: a single plugin config in a file runtimes load as a list; not chaining \
                 (name it .conf, or make it a list)",
                path.display()
            ))));
        };
        let target_path = dir.join(&target);
        let desired = match render(&c.bytes, &c.value, &self.entry, source) {
            Ok(d) => d,
            Err(e) => {
                return Ok(super::Pass::Done(super::State::Blocked(format!(
                    "{}: {e}; not chaining, retrying when it changes",
                    path.display()
                ))))
            }
        };
        let listing = self.listing()?;
        if listing.foreign.contains(&target) || (target_path.exists() && !target_path.is_file()) {
            return Ok(super::Pass::Done(super::State::Blocked(format!(
                "{}: our chained copy would replace {}, which is not ours; fix the conf dir",
                path.display(),
                target_path.display()
            ))));
        }
        let target_name = target.to_string_lossy().into_owned();
        let existing = std::fs::read(&target_path).ok();
        if let Some(old) = &existing {
            if let Ok(v) = serde_json::from_slice::<Value>(old) {
                if let Some(state) = self.foreign_entry(&target_path, &v, &target) {
                    self.keep = Some(target);
                    return Ok(super::Pass::Done(state));
                }
            }
        }
        self.migrate_old_conversion(&c)?;
        if existing.as_deref() != Some(desired.as_slice()) {
            let mode = super::files::mode_of(&c.real).unwrap_or(0o644);
            super::files::atomic_write(&dir, &target, &desired, mode)
                .map_err(super::io_err(&target_path))?;
            log::info!(
                "chained {} through {} (runtimes load it first; {} is left as it is)",
                path.display(),
                target_path.display(),
                path.display()
            );
        }
        self.seen.insert(target_path, self.entry.clone());
        self.keep = Some(target);
        Ok(super::Pass::Done(super::State::Ready(target_name)))
    }

    /// Removes `<stem>.conflist` when an older installer made it by converting the `.conf`
    /// primary `c` in place (`chained::is_old_conversion`).
    fn migrate_old_conversion(&self, c: &super::Config) -> Result<(), InstallError> {
        let b = std::os::unix::ffi::OsStrExt::as_bytes(c.name.as_os_str());
        let Some(stem) = b
            .strip_suffix(b".conf")
            .or_else(|| b.strip_suffix(b".json"))
        else {
            return Ok(());
        };
        let mut old = stem.to_vec();
        old.extend_from_slice(b".conflist");
        let old_path = self
            .opts
            .conf_dir
            .join(<OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&old));
        if !std::fs::symlink_metadata(&old_path).is_ok_and(|m| m.file_type().is_file()) {
            return Ok(());
        }
        let Ok(v) = std::fs::read(&old_path).map(|b| conflist::parse(&b)) else {
            return Ok(());
        };
        if v.is_ok_and(|v| is_old_conversion(&v, &c.value)) {
            super::files::remove_if_present(&old_path).map_err(super::io_err(&old_path))?;
            log::info!(
                "removed {}: an older installer converted {} into it; {} is the primary's again",
                old_path.display(),
                c.name.to_string_lossy(),
                c.name.to_string_lossy()
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_sort_before_their_source_as_bytes() {
        for (src, want) in [
            ("10-x.conf", Some("10-x-tproxy-cni.conflist")),
            ("10-x.json", Some("10-x-tproxy-cni.conflist")),
            ("a.conf", Some("a-tproxy-cni.conflist")),
            ("10-x.conflist", None),
            ("x", None),
        ] {
            let got = name_for(OsStr::new(src));
            assert_eq!(got.as_deref(), want.map(OsStr::new), "{src}");
            if let Some(g) = got {
                assert!(g.as_bytes() < src.as_bytes());
            }
        }
        // Bytes, not text: a non-UTF-8 stem is kept as it is.
        let src = OsStr::from_bytes(b"10-\xff.conf");
        let got = name_for(src).unwrap();
        assert_eq!(got.as_bytes(), b"10-\xff-tproxy-cni.conflist");
    }

    #[test]
    fn render_records_the_source_and_keeps_the_plugin() {
        let bytes = br#"{"cniVersion": "1.0.0", "name": "k8s", "type": "bridge", "mtu": 1e3}"#;
        let config: Value = serde_json::from_slice(bytes).unwrap();
        let entry = conflist::entry(&Value::Null).unwrap();
        let out = render(bytes, &config, &entry, "10-x.conf").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(source_of(&v), Some("10-x.conf"));
        assert_eq!(v["name"], "k8s");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["plugins"][0], config);
        assert_eq!(v["plugins"][1]["type"], conflist::PLUGIN_TYPE);
        // The number stays as the primary wrote it.
        assert!(String::from_utf8_lossy(&out).contains("1e3"));
        assert!(render(
            br#"{"name":"k","plugins":[{"type":"a"}]}"#,
            &json!({"name":"k","plugins":[{"type":"a"}]}),
            &entry,
            "x"
        )
        .is_err());
    }

    #[test]
    fn old_conversions_are_recognised() {
        let conf = json!({"cniVersion": "0.3.1", "name": "k8s", "type": "bridge"});
        let old = json!({"cniVersion": "0.3.1", "name": "k8s",
            "plugins": [{"type": "bridge", "mtu": 1}, {"type": "tproxy-cni"}]});
        assert!(is_old_conversion(&old, &conf));
        let mut other = old.clone();
        other["name"] = "other".into();
        assert!(!is_old_conversion(&other, &conf));
        let two = json!({"name": "k8s",
            "plugins": [{"type": "bridge"}, {"type": "portmap"}, {"type": "tproxy-cni"}]});
        assert!(!is_old_conversion(&two, &conf));
        let not_ours = json!({"name": "k8s", "plugins": [{"type": "bridge"}]});
        assert!(!is_old_conversion(&not_ours, &conf));
    }
}
