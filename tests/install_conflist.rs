//! Golden tests of the installer's pure conflist patching against real primaries' configs
//! (`tests/testdata/conflist/NAME.before.*` -> `NAME.after.conflist`, optional `NAME.settings.json`).
//!
//! `UPDATE_GOLDEN=1 cargo test --test install_conflist` rewrites the `.after` files; review the diff.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tproxy_cni_install::conflist::{self, ConflistError, PLUGIN_TYPE};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/conflist")
}

/// Every fixture: (name, before file name, before bytes, settings).
fn fixtures() -> Vec<(String, String, Vec<u8>, Value)> {
    let mut out = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".before."))
        .collect();
    names.sort();
    for file in names {
        let name = file.split(".before.").next().unwrap().to_string();
        let bytes = std::fs::read(dir().join(&file)).unwrap();
        let settings = std::fs::read(dir().join(format!("{name}.settings.json")))
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap_or(Value::Null);
        out.push((name, file, bytes, settings));
    }
    out
}

fn types(v: &Value) -> Vec<String> {
    v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap().to_string())
        .collect()
}

fn top_keys(v: &Value) -> Vec<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn all_primaries_are_covered() {
    let names: Vec<String> = fixtures().into_iter().map(|f| f.0).collect();
    for want in [
        "aws-vpc",
        "bridge",
        "calico",
        "cilium",
        "flannel",
        "kindnet",
        "lone",
        "numbers",
        "stale-entry",
    ] {
        assert!(names.iter().any(|n| n == want), "missing fixture {want}");
    }
}

#[test]
fn inject_matches_golden_and_is_idempotent() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (name, file, bytes, settings) in fixtures() {
        let entry = conflist::entry(&settings).unwrap();
        let before = conflist::parse(&bytes).unwrap();
        let after = conflist::inject(&before, &entry)
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: expected a change"));
        // What the installer writes: the splice, which means the same as the parsed patch.
        let rendered = conflist::patch(&bytes, &before, &entry)
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: expected a change"));
        assert_eq!(
            serde_json::from_slice::<Value>(&rendered).unwrap(),
            after,
            "{name}"
        );
        let golden = dir().join(format!("{name}.after.conflist"));
        if update {
            std::fs::write(&golden, &rendered).unwrap();
        }
        let want = std::fs::read(&golden).unwrap_or_default();
        assert_eq!(
            String::from_utf8_lossy(&rendered),
            String::from_utf8_lossy(&want),
            "{name}: differs from {}",
            golden.display()
        );

        // Output name: lists keep theirs; a lone .conf gets a chained copy that sorts first.
        if before.get("plugins").is_none() {
            let copy = tproxy_cni_install::chained_name_for(std::ffi::OsStr::new(&file))
                .unwrap_or_else(|| panic!("{name}: no chained name for {file}"));
            assert!(
                copy.as_encoded_bytes() < file.as_bytes(),
                "{name}: {copy:?}"
            );
        }

        // The list's version and all top-level keys stay, in order.
        let list = conflist::to_list(&before).unwrap();
        assert_eq!(after["cniVersion"], list["cniVersion"], "{name}");
        assert_eq!(top_keys(&after), top_keys(&list), "{name}");
        // Every foreign plugin is kept byte-for-byte (as JSON) and in order.
        let foreign = |v: &Value| -> Vec<Value> {
            v["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["type"] != PLUGIN_TYPE)
                .cloned()
                .collect()
        };
        assert_eq!(
            serde_json::to_string(&foreign(&after)).unwrap(),
            serde_json::to_string(&foreign(&list)).unwrap(),
            "{name}"
        );
        // Exactly one entry of ours, with the capability that makes runtimes pass annotations.
        let ours: Vec<&Value> = after["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["type"] == PLUGIN_TYPE)
            .collect();
        assert_eq!(ours.len(), 1, "{name}");
        assert_eq!(
            ours[0]["capabilities"]["io.kubernetes.cri.pod-annotations"],
            true
        );
        assert!(conflist::has_entry(&after, &entry), "{name}");

        // Idempotent: a second pass (over the parsed golden file) changes nothing.
        let reparsed = conflist::parse(&want).unwrap();
        assert_eq!(
            conflist::inject(&reparsed, &entry).unwrap(),
            None,
            "{name}: second inject must be a no-op"
        );
    }
}

#[test]
fn entry_goes_last_when_missing() {
    for (name, _, bytes, settings) in fixtures() {
        if name == "stale-entry" {
            continue;
        }
        let entry = conflist::entry(&settings).unwrap();
        let after = conflist::inject(&conflist::parse(&bytes).unwrap(), &entry)
            .unwrap()
            .unwrap();
        assert_eq!(types(&after).last().unwrap(), PLUGIN_TYPE, "{name}");
    }
}

#[test]
fn stale_entry_is_updated_in_place_and_duplicates_dropped() {
    let bytes = std::fs::read(dir().join("stale-entry.before.conflist")).unwrap();
    let entry = conflist::entry(&Value::Null).unwrap();
    let after = conflist::inject(&conflist::parse(&bytes).unwrap(), &entry)
        .unwrap()
        .unwrap();
    // Not moved behind the other chained plugin: two "must be last" installers would fight.
    assert_eq!(types(&after), ["ptp", PLUGIN_TYPE, "some-mesh-cni"]);
    assert!(after["plugins"][1].get("logLevel").is_none());
    assert_eq!(after["disableGC"], false);
}

#[test]
fn settings_are_written_and_nothing_else() {
    let e = conflist::entry(&Value::Null).unwrap();
    assert_eq!(
        Value::Object(e),
        json!({"type": "tproxy-cni", "capabilities": {"io.kubernetes.cri.pod-annotations": true}})
    );
    let settings: Value =
        serde_json::from_slice(&std::fs::read(dir().join("aws-vpc.settings.json")).unwrap())
            .unwrap();
    let e = conflist::entry(&settings).unwrap();
    assert_eq!(
        serde_json::to_string(&e).unwrap(),
        r#"{"type":"tproxy-cni","capabilities":{"io.kubernetes.cri.pod-annotations":true},"failClosed":true,"logLevel":"debug","inboundPort":15006}"#
    );
}

#[test]
fn reinsert_after_primary_rewrites_its_file() {
    let entry = conflist::entry(&Value::Null).unwrap();
    let before: Value =
        conflist::parse(&std::fs::read(dir().join("calico.before.conflist")).unwrap()).unwrap();
    let patched = conflist::inject(&before, &entry).unwrap().unwrap();
    assert_eq!(conflist::inject(&patched, &entry).unwrap(), None);
    // Calico's install-cni rewrites its whole file (here: a new MTU), dropping our entry.
    let mut rewritten = before.clone();
    rewritten["plugins"][0]["mtu"] = json!(1440);
    assert!(!conflist::has_entry(&rewritten, &entry));
    let repaired = conflist::inject(&rewritten, &entry).unwrap().unwrap();
    assert_eq!(repaired["plugins"][0]["mtu"], 1440);
    assert_eq!(
        types(&repaired),
        ["calico", "portmap", "bandwidth", PLUGIN_TYPE]
    );
    // Settings changed (new ConfigMap): the entry is rewritten, still once.
    let entry2 = conflist::entry(&json!({"failClosed": true})).unwrap();
    let updated = conflist::inject(&repaired, &entry2).unwrap().unwrap();
    assert_eq!(
        types(&updated),
        ["calico", "portmap", "bandwidth", PLUGIN_TYPE]
    );
    assert_eq!(updated["plugins"][3]["failClosed"], true);
}

#[test]
fn removal_restores_the_primary() {
    for (name, _, bytes, settings) in fixtures() {
        let before = conflist::parse(&bytes).unwrap();
        // Nothing of ours: nothing to write.
        if !conflist::contains_ours(&before) {
            assert_eq!(conflist::remove(&before).unwrap(), None, "{name}");
        }
        let entry = conflist::entry(&settings).unwrap();
        let after = conflist::inject(&before, &entry).unwrap().unwrap();
        let removed = conflist::remove(&after).unwrap().unwrap();
        let mut want = conflist::to_list(&before).unwrap();
        if let Some(p) = want["plugins"].as_array_mut() {
            p.retain(|p| p["type"] != PLUGIN_TYPE);
        }
        // Same bytes once rendered: key order and every foreign field survive the round trip.
        assert_eq!(
            String::from_utf8_lossy(&conflist::render(&removed)),
            String::from_utf8_lossy(&conflist::render(&want)),
            "{name}"
        );
        assert_eq!(conflist::remove(&removed).unwrap(), None, "{name}");
    }
}

#[test]
fn malformed_input_is_an_error_not_a_panic() {
    let entry = conflist::entry(&Value::Null).unwrap();
    let truncated = &std::fs::read(dir().join("calico.before.conflist")).unwrap()[..200];
    assert!(matches!(
        conflist::parse(truncated),
        Err(ConflistError::Json(_))
    ));
    for bad in [
        &b""[..],
        b"null",
        b"[]",
        b"\"x\"",
        b"{\"name\":\"n\",\"plugins\":{}}",
        b"{\"name\":\"n\",\"plugins\":[]}",
        b"{\"name\":\"n\",\"plugins\":[{\"notype\":1}]}",
        b"{\"name\":\"n\"}",
        b"\xff\xfe",
    ] {
        let err = conflist::parse(bad).unwrap_err();
        assert!(!err.to_string().is_empty());
    }
    // Shapes that parse but cannot be chained.
    assert!(conflist::inject(&json!({"type": "bridge"}), &entry).is_err());
    assert!(conflist::remove(&json!({"plugins": 3})).is_err());
    // Bad settings are refused with a message, never written.
    assert!(conflist::entry(&json!("x")).is_err());
    assert!(conflist::entry(&json!({"type": "other"})).is_err());
}

#[test]
fn primary_selection_like_runtimes() {
    let dir = [
        "10-calico.conflist",
        "calico-kubeconfig",
        "87-podman-bridge.conflist",
        "05-cilium.conflist",
        "00-multus.conf.bak",
        ".10-calico.conflist.1234.0.tmp",
        "200-loopback.conf",
    ];
    assert_eq!(
        conflist::select_primary(dir.iter().copied()),
        Some("05-cilium.conflist")
    );
    // Lexical, not numeric: "200-" sorts before "87-".
    assert_eq!(
        conflist::select_primary(["87-a.conflist", "200-b.conf"].iter().copied()),
        Some("200-b.conf")
    );
    assert_eq!(
        conflist::select_primary(["kubeconfig"].iter().copied()),
        None
    );
}

#[test]
fn truncated_and_mangled_fixtures_never_panic() {
    let entry = conflist::entry(&Value::Null).unwrap();
    for (name, _, bytes, _) in fixtures() {
        for cut in 0..bytes.len() {
            let mut variants = vec![bytes[..cut].to_vec()];
            // And one byte replaced by a structural character.
            let mut m = bytes.clone();
            let structural = b"{}[]\":,0";
            m[cut] = structural[cut % structural.len()];
            variants.push(m);
            for v in variants {
                if let Ok(c) = conflist::parse(&v) {
                    let _ = conflist::inject(&c, &entry);
                    let _ = conflist::patch(&v, &c, &entry);
                    let _ = conflist::unpatch(&v, &c);
                    let _ = conflist::remove(&c);
                    let _ = conflist::to_list(&c);
                    let _ = tproxy_cni_install::chained_render(&v, &c, &entry, &name);
                }
            }
        }
    }
}

#[test]
fn splice_keeps_every_byte_of_the_primary() {
    for (name, _, bytes, settings) in fixtures() {
        let before = conflist::parse(&bytes).unwrap();
        let entry = conflist::entry(&settings).unwrap();
        let out = conflist::patch(&bytes, &before, &entry).unwrap().unwrap();
        if before.get("plugins").is_none() || conflist::contains_ours(&before) {
            continue;
        }
        // Inserting our entry only adds bytes; removing it gives back the original exactly.
        let removed = conflist::unpatch(&out, &conflist::parse(&out).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&removed),
            String::from_utf8_lossy(&bytes),
            "{name}"
        );
        let end = bytes.iter().rposition(|&b| b == b']').unwrap();
        let text_end = bytes[..end]
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .unwrap()
            + 1;
        assert!(out.starts_with(&bytes[..text_end]), "{name}");
        assert!(out.ends_with(&bytes[text_end..]), "{name}");
    }
    // Numbers as the primary wrote them, not as a float printer would.
    let bytes = std::fs::read(dir().join("numbers.before.conflist")).unwrap();
    let entry = conflist::entry(&Value::Null).unwrap();
    let out = conflist::patch(&bytes, &conflist::parse(&bytes).unwrap(), &entry)
        .unwrap()
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    for kept in [
        "\"mtu\": 1e3",
        "12345678901234567890123",
        "0.1000000000000000055511151231257827",
        "-0.0",
        "1E-7",
        r#""caf\u00e9 \"quoted\" [not, an, array]""#,
    ] {
        assert!(text.contains(kept), "{kept} not in {text}");
    }
    // Compact lists stay compact; a layout we cannot splice is refused, not rewritten.
    let compact = br#"{"name":"n","plugins":[{"type":"a","x":1e2}]}"#;
    let out = conflist::patch(compact, &conflist::parse(compact).unwrap(), &entry)
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        r#"{"name":"n","plugins":[{"type":"a","x":1e2},{"type":"tproxy-cni","capabilities":{"io.kubernetes.cri.pod-annotations":true}}]}"#
    );
    let dup = br#"{"name":"n","plugins":[{"type":"a"}],"plugins":[{"type":"b"}]}"#;
    let parsed = conflist::parse(dup).unwrap();
    let out = conflist::patch(dup, &parsed, &entry).unwrap().unwrap();
    assert_eq!(
        conflist::parse(&out).unwrap()["plugins"][1]["type"],
        PLUGIN_TYPE
    );
}

#[test]
fn splice_handles_duplicates_and_leading_entries() {
    let entry = conflist::entry(&json!({"logLevel": "debug"})).unwrap();
    for (text, want_types) in [
        (
            r#"{"name":"n","plugins":[{"type":"a"},{"type":"tproxy-cni"},{"type":"b"},{"type":"tproxy-cni","x":1}]}"#,
            vec!["a", PLUGIN_TYPE, "b"],
        ),
        (
            "{\"name\":\"n\",\"plugins\":[\n  {\"type\":\"tproxy-cni\"},\n  {\"type\":\"tproxy-cni\"},\n  {\"type\":\"a\"}\n]}",
            vec![PLUGIN_TYPE, "a"],
        ),
    ] {
        let bytes = text.as_bytes();
        let parsed = conflist::parse(bytes).unwrap();
        // patch checks its splice against the parsed patch and errs if they differ.
        let out = conflist::patch(bytes, &parsed, &entry).unwrap().unwrap();
        let v = conflist::parse(&out).unwrap();
        assert_eq!(types(&v), want_types, "{text}");
        assert!(conflist::has_entry(&v, &entry));
        // Removal of every entry of ours, wherever it stands.
        let removed = conflist::unpatch(bytes, &parsed).unwrap().unwrap();
        let r = conflist::parse(&removed).unwrap();
        assert!(!conflist::contains_ours(&r), "{}", String::from_utf8_lossy(&removed));
    }
}
