//! Pure conflist patching for the installer: pick the primary config, insert or remove our entry.
//!
//! No file system access here: the daemon reads bytes, these functions decide, the daemon writes.
//! That keeps every rule below testable with before/after fixtures.
//!
//! Rules, and why:
//! - the primary is the first `.conf`/`.conflist`/`.json` file in byte-wise lexical order, which
//!   is what libcni's `ConfFiles` + sort gives containerd (CRI-O skips invalid files; the daemon
//!   decides which one per `--runtime`);
//! - the file is patched as text (`patch`/`unpatch`): only our entry's bytes change, so numbers
//!   (`1e3`, big integers, long fractions), spacing and order stay as the primary wrote them;
//! - a lone `.conf` is converted to a list the way libcni's `ConfListFromConf` does it (name
//!   and cniVersion lifted to the list, the plugin object kept whole), because only lists
//!   chain; the result goes into a separate file of ours (`chained`), never over the `.conf`;
//! - our entry goes **last** when missing, but an entry already present stays where it is and is
//!   updated in place: a second chained plugin that also wants to be last would otherwise fight
//!   us forever, each rewrite triggering the other's watch;
//! - every other key, including `cniVersion`, `disableCheck` and unknown ones, is kept, in order.

use serde_json::{Map, Value};

use tproxy_cni_policy::consts::POD_ANNOTATIONS_CAPABILITY;

/// The `type` of our plugin, i.e. the binary name in the CNI bin dir.
pub const PLUGIN_TYPE: &str = "tproxy-cni";

/// File extensions runtimes load from the conf dir (libcni `ConfFiles` with these three).
pub(crate) const CONFIG_EXTENSIONS: [&str; 3] = [".conf", ".conflist", ".json"];

/// Why a config cannot be patched. The daemon prefixes the file name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConflistError {
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("not a CNI config: {0}")]
    Shape(String),
    #[error("plugin settings: {0}")]
    Settings(String),
}

/// True for names a runtime would load as a network config: libcni matches the extension only
/// (dot files included), so we do too; our temporary files end in `.tmp` for that reason.
pub(crate) fn is_config_name(name: &str) -> bool {
    CONFIG_EXTENSIONS.iter().any(|ext| name.ends_with(ext))
}

/// `is_config_name` on a name as bytes (names need not be UTF-8).
pub(crate) fn is_config_os(name: &std::ffi::OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let b = name.as_bytes();
    CONFIG_EXTENSIONS
        .iter()
        .any(|ext| b.ends_with(ext.as_bytes()))
}

/// The primary config among a directory's file names: the lexically first config name.
pub fn select_primary<'a, I>(names: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    names.into_iter().filter(|n| is_config_name(n)).min()
}

/// Parses a config file's bytes; a clear error for anything that is not a JSON object.
pub fn parse(bytes: &[u8]) -> Result<Value, ConflistError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| ConflistError::Json(e.to_string()))?;
    validate(&v)?;
    Ok(v)
}

/// Checks the shape runtimes need: an object with either a `plugins` array of objects each with
/// a `type`, or (single config) a `type` of its own.
fn validate(v: &Value) -> Result<(), ConflistError> {
    let obj = v
        .as_object()
        .ok_or_else(|| ConflistError::Shape("top level is not an object".into()))?;
    match obj.get("plugins") {
        Some(Value::Array(plugins)) => {
            if plugins.is_empty() {
                return Err(ConflistError::Shape("\"plugins\" is empty".into()));
            }
            for (i, p) in plugins.iter().enumerate() {
                if p.get("type").and_then(Value::as_str).is_none() {
                    return Err(ConflistError::Shape(format!(
                        "plugins[{i}] has no string \"type\""
                    )));
                }
            }
            Ok(())
        }
        Some(_) => Err(ConflistError::Shape("\"plugins\" is not an array".into())),
        None if obj.get("type").and_then(Value::as_str).is_some() => Ok(()),
        None => Err(ConflistError::Shape(
            "neither a \"plugins\" list nor a single plugin \"type\"".into(),
        )),
    }
}

/// A single-plugin config as a one-entry list (libcni's conversion); lists pass through.
pub fn to_list(config: &Value) -> Result<Value, ConflistError> {
    validate(config)?;
    if config.get("plugins").is_some() {
        return Ok(config.clone());
    }
    let mut list = Map::new();
    if let Some(v) = config.get("cniVersion") {
        list.insert("cniVersion".into(), v.clone());
    }
    match config.get("name") {
        Some(v) => {
            list.insert("name".into(), v.clone());
        }
        None => return Err(ConflistError::Shape("single config has no \"name\"".into())),
    }
    list.insert("plugins".into(), Value::Array(vec![config.clone()]));
    Ok(Value::Object(list))
}

/// Our conflist entry: `type`, the pod-annotations capability, then the user's settings in their
/// order. Settings may not override `type`; capabilities they list are kept beside ours.
pub fn entry(settings: &Value) -> Result<Map<String, Value>, ConflistError> {
    let settings = match settings {
        Value::Null => Map::new(),
        Value::Object(m) => m.clone(),
        _ => {
            return Err(ConflistError::Settings(
                "must be a JSON object of plugin options".into(),
            ))
        }
    };
    let mut caps = Map::new();
    caps.insert(POD_ANNOTATIONS_CAPABILITY.into(), Value::Bool(true));
    let mut out = Map::new();
    out.insert("type".into(), Value::String(PLUGIN_TYPE.into()));
    for (k, v) in settings {
        match k.as_str() {
            "type" if v != PLUGIN_TYPE => {
                return Err(ConflistError::Settings(format!(
                    "\"type\" must be {PLUGIN_TYPE:?} (the installed binary), got {v}"
                )))
            }
            // Set by the runtime from the list; a value here would be misleading.
            "type" | "name" | "cniVersion" | "prevResult" | "runtimeConfig" => {}
            "capabilities" => match v {
                Value::Object(extra) => {
                    for (ck, cv) in extra {
                        if ck != POD_ANNOTATIONS_CAPABILITY {
                            caps.insert(ck, cv);
                        }
                    }
                }
                _ => {
                    return Err(ConflistError::Settings(
                        "\"capabilities\" must be an object".into(),
                    ))
                }
            },
            _ => {
                out.insert(k, v);
            }
        }
    }
    // type, capabilities, then settings: the order a human reads the entry in.
    let mut ordered = Map::new();
    ordered.insert("type".into(), Value::String(PLUGIN_TYPE.into()));
    ordered.insert("capabilities".into(), Value::Object(caps));
    for (k, v) in out {
        if k != "type" {
            ordered.insert(k, v);
        }
    }
    Ok(ordered)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// True when `config` is a list holding any entry of ours (whatever its settings).
pub fn contains_ours(config: &Value) -> bool {
    config
        .get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|p| p.iter().any(is_ours))
}

/// True when `config` is a list holding exactly `entry` (semantically, key order aside) once.
pub fn has_entry(config: &Value, entry: &Map<String, Value>) -> bool {
    let Some(plugins) = config.get("plugins").and_then(Value::as_array) else {
        return false;
    };
    let ours: Vec<&Value> = plugins.iter().filter(|p| is_ours(p)).collect();
    matches!(ours.as_slice(), [only] if only.as_object() == Some(entry))
}

/// Inserts (or updates in place) our entry. `None` means the config is already as wanted, so
/// the caller writes nothing: that is what makes the installer idempotent and its own writes
/// quiet under its own watch.
pub fn inject(config: &Value, entry: &Map<String, Value>) -> Result<Option<Value>, ConflistError> {
    let is_list = config.get("plugins").is_some();
    if is_list && has_entry(config, entry) {
        return Ok(None);
    }
    let mut list = to_list(config)?;
    let Some(plugins) = list.get_mut("plugins").and_then(Value::as_array_mut) else {
        return Err(ConflistError::Shape("\"plugins\" is not an array".into()));
    };
    match plugins.iter().position(is_ours) {
        Some(first) => {
            plugins[first] = Value::Object(entry.clone());
            // Keep the first of duplicates (someone's hand edit), drop the rest.
            let mut i = 0;
            plugins.retain(|p| {
                let keep = i == first || !is_ours(p);
                i += 1;
                keep
            });
        }
        None => plugins.push(Value::Object(entry.clone())),
    }
    Ok(Some(list))
}

/// Removes every entry of ours. `None` means there was none (write nothing). A list that held
/// only our entry is left alone: removing it would leave an empty, invalid list.
pub fn remove(config: &Value) -> Result<Option<Value>, ConflistError> {
    validate(config)?;
    let Some(plugins) = config.get("plugins").and_then(Value::as_array) else {
        return Ok(None);
    };
    if !plugins.iter().any(is_ours) || plugins.iter().all(is_ours) {
        return Ok(None);
    }
    let mut out = config.clone();
    if let Some(list) = out.get_mut("plugins").and_then(Value::as_array_mut) {
        list.retain(|p| !is_ours(p));
    }
    Ok(Some(out))
}

/// The plugin `type`s a runtime must find in its bin dir for `config` (a list's plugins, or a
/// single config's own type), in order, without duplicates.
pub(crate) fn plugin_types(config: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |t: Option<&str>| {
        if let Some(t) = t {
            if !out.iter().any(|o| o == t) {
                out.push(t.to_string());
            }
        }
    };
    match config.get("plugins").and_then(Value::as_array) {
        Some(plugins) => plugins
            .iter()
            .for_each(|p| push(p.get("type").and_then(Value::as_str))),
        None => push(config.get("type").and_then(Value::as_str)),
    }
    out
}

/// The first entry of ours in a list, whatever its settings.
pub(crate) fn our_entry(config: &Value) -> Option<&Map<String, Value>> {
    config
        .get("plugins")
        .and_then(Value::as_array)?
        .iter()
        .find(|p| is_ours(p))
        .and_then(Value::as_object)
}

/// `inject` on a file's bytes, as a splice: the bytes to write, or `None` when nothing changes.
///
/// Only our entry's bytes change (inserted before the list's `]` with the indentation of the
/// element before it, or replacing an entry of ours in place); every other byte of the file,
/// numbers as written (`1e3`, big integers, long fractions), spacing and key order, stays. A lone
/// config becomes a list whose single plugin is its original text. The result is checked
/// against the parsed `inject`, so a splice can never write something else.
pub fn patch(
    bytes: &[u8],
    config: &Value,
    entry: &Map<String, Value>,
) -> Result<Option<Vec<u8>>, ConflistError> {
    let Some(want) = inject(config, entry)? else {
        return Ok(None);
    };
    let out = if config.get("plugins").is_some() {
        let list = plugins_span(bytes)?;
        let ours: Vec<usize> = (0..list.elems.len())
            .filter(|&i| list.is_ours(bytes, i))
            .collect();
        let mut edits = Vec::new();
        match ours.split_first() {
            Some((&first, rest)) => {
                let indent = list.indent_of(bytes, first);
                let (s, e) = list.elems[first];
                edits.push((s, e, render_entry(entry, indent.as_deref())));
                edits.extend(list.removals(rest));
            }
            None => {
                let last = list.elems.len() - 1;
                let indent = list.indent_of(bytes, last);
                let (s, e) = list.elems[last];
                // The whitespace before the last element (after its comma, if any).
                let before = String::from_utf8_lossy(&bytes[list.after(last)..s]).into_owned();
                let sep = before.rsplit(',').next().unwrap_or_default().to_string();
                edits.push((
                    e,
                    e,
                    format!(",{sep}{}", render_entry(entry, indent.as_deref())),
                ));
            }
        }
        apply(bytes, edits)
    } else {
        convert_bytes(bytes, config, entry)?
    };
    check(&out, &want)?;
    Ok(Some(out))
}

/// `remove` on a file's bytes, as a splice (every other byte stays); `None` when nothing changes.
pub fn unpatch(bytes: &[u8], config: &Value) -> Result<Option<Vec<u8>>, ConflistError> {
    let Some(want) = remove(config)? else {
        return Ok(None);
    };
    let list = plugins_span(bytes)?;
    let ours: Vec<usize> = (0..list.elems.len())
        .filter(|&i| list.is_ours(bytes, i))
        .collect();
    let out = apply(bytes, list.removals(&ours));
    check(&out, &want)?;
    Ok(Some(out))
}

/// The splice must mean exactly what the parsed patch means.
fn check(out: &[u8], want: &Value) -> Result<(), ConflistError> {
    match serde_json::from_slice::<Value>(out) {
        Ok(got) if &got == want => Ok(()),
        _ => Err(ConflistError::Shape(
            "unusual layout we cannot splice safely (e.g. duplicate keys); left untouched".into(),
        )),
    }
}

/// A lone config as a list: `cniVersion` and `name` lifted (their original text), the plugin
/// kept as written, our entry after it.
fn convert_bytes(
    bytes: &[u8],
    config: &Value,
    entry: &Map<String, Value>,
) -> Result<Vec<u8>, ConflistError> {
    to_list(config)?;
    let members = members(bytes).ok_or_else(|| ConflistError::Json("cannot scan".into()))?;
    let raw = |key: &str| {
        members
            .iter()
            .rev()
            .find(|m| m.key == key)
            .map(|m| String::from_utf8_lossy(&bytes[m.value.0..m.value.1]).into_owned())
    };
    let mut out = String::from("{\n");
    if let Some(v) = raw("cniVersion") {
        out.push_str(&format!("  \"cniVersion\": {v},\n"));
    }
    if let Some(v) = raw("name") {
        out.push_str(&format!("  \"name\": {v},\n"));
    }
    // Indented one level deeper: only whitespace after line breaks changes (a JSON string
    // cannot hold a raw line break, so no value changes).
    let text = String::from_utf8_lossy(bytes)
        .trim()
        .replace('\n', "\n    ");
    out.push_str(&format!(
        "  \"plugins\": [\n    {},\n    {}\n  ]\n}}\n",
        text,
        render_entry(entry, Some("    "))
    ));
    Ok(out.into_bytes())
}

/// Our entry as JSON text: pretty, continued at `indent` when the list is laid out on lines,
/// compact otherwise.
fn render_entry(entry: &Map<String, Value>, indent: Option<&str>) -> String {
    let v = Value::Object(entry.clone());
    match indent {
        Some(ind) => serde_json::to_string_pretty(&v)
            .unwrap_or_default()
            .replace('\n', &format!("\n{ind}")),
        None => v.to_string(),
    }
}

/// Replaces byte ranges (non-overlapping) by text.
fn apply(bytes: &[u8], mut edits: Vec<(usize, usize, String)>) -> Vec<u8> {
    edits.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut out = bytes.to_vec();
    for (s, e, text) in edits {
        out.splice(s..e, text.into_bytes());
    }
    out
}

/// The `plugins` array of a list: byte spans of its elements.
struct ListSpan {
    /// Just after the `[`.
    open: usize,
    elems: Vec<(usize, usize)>,
}

impl ListSpan {
    /// Where the whitespace before element `i` starts (after `[` or the comma).
    fn after(&self, i: usize) -> usize {
        if i == 0 {
            self.open
        } else {
            // The comma follows the previous element, maybe after whitespace.
            self.elems[i - 1].1
        }
    }

    fn is_ours(&self, bytes: &[u8], i: usize) -> bool {
        let (s, e) = self.elems[i];
        serde_json::from_slice::<Value>(&bytes[s..e]).is_ok_and(|v| is_ours(&v))
    }

    /// The indentation of element `i` when it starts a line.
    fn indent_of(&self, bytes: &[u8], i: usize) -> Option<String> {
        let (s, _) = self.elems[i];
        let ws = String::from_utf8_lossy(&bytes[self.after(i)..s]).into_owned();
        ws.rfind('\n').map(|n| {
            ws[n + 1..]
                .chars()
                .filter(|c| *c == ' ' || *c == '\t')
                .collect()
        })
    }

    /// Ranges that remove elements `idx` (ascending) with their separators.
    fn removals(&self, idx: &[usize]) -> Vec<(usize, usize, String)> {
        let gone = |i: usize| idx.contains(&i);
        let first_kept = (0..self.elems.len()).find(|&i| !gone(i));
        let mut out = Vec::new();
        for &i in idx {
            match first_kept {
                // Before the first kept element: cut from this element to the next one.
                Some(k) if i < k => out.push((self.elems[i].0, self.elems[i + 1].0, String::new())),
                // After it: cut from the end of the previous element to the end of this one.
                _ if i > 0 => out.push((self.elems[i - 1].1, self.elems[i].1, String::new())),
                _ => {}
            }
        }
        out
    }
}

fn plugins_span(bytes: &[u8]) -> Result<ListSpan, ConflistError> {
    let shape = || ConflistError::Json("cannot locate \"plugins\" in the text".into());
    let members = members(bytes).ok_or_else(shape)?;
    // Duplicate keys: the last one counts, as for the parser.
    let m = members
        .iter()
        .rev()
        .find(|m| m.key == "plugins")
        .ok_or_else(shape)?;
    let mut sc = Scanner {
        b: bytes,
        i: m.value.0,
    };
    if sc.peek() != Some(b'[') {
        return Err(shape());
    }
    sc.i += 1;
    let open = sc.i;
    let mut elems = Vec::new();
    loop {
        sc.ws();
        match sc.peek() {
            Some(b']') => break,
            Some(b',') => sc.i += 1,
            Some(_) => elems.push(sc.value().ok_or_else(shape)?),
            None => return Err(shape()),
        }
    }
    if elems.is_empty() {
        return Err(shape());
    }
    Ok(ListSpan { open, elems })
}

/// A top-level member: its decoded key and the byte span of its value.
struct Member {
    key: String,
    value: (usize, usize),
}

fn members(bytes: &[u8]) -> Option<Vec<Member>> {
    let mut sc = Scanner { b: bytes, i: 0 };
    sc.ws();
    if sc.peek()? != b'{' {
        return None;
    }
    sc.i += 1;
    let mut out = Vec::new();
    loop {
        sc.ws();
        match sc.peek()? {
            b'}' => return Some(out),
            b',' => sc.i += 1,
            b'"' => {
                let (ks, ke) = sc.string()?;
                let key: String = serde_json::from_slice(&bytes[ks..ke]).ok()?;
                sc.ws();
                if sc.peek()? != b':' {
                    return None;
                }
                sc.i += 1;
                sc.ws();
                let value = sc.value()?;
                out.push(Member { key, value });
            }
            _ => return None,
        }
    }
}

/// A minimal JSON scanner over text serde_json has already accepted: it only finds spans.
struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn string(&mut self) -> Option<(usize, usize)> {
        let start = self.i;
        self.i += 1;
        loop {
            match self.peek()? {
                b'\\' => self.i += 2,
                b'"' => {
                    self.i += 1;
                    return Some((start, self.i));
                }
                _ => self.i += 1,
            }
        }
    }

    fn value(&mut self) -> Option<(usize, usize)> {
        let start = self.i;
        match self.peek()? {
            b'"' => self.string(),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth = depth.checked_sub(1)?;
                            if depth == 0 {
                                self.i += 1;
                                return Some((start, self.i));
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                ) {
                    self.i += 1;
                }
                (self.i > start).then_some((start, self.i))
            }
        }
    }
}

/// A whole config as two-space pretty JSON and a final newline (the parsed view; the daemon
/// writes `patch`/`unpatch` splices instead).
pub fn render(config: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(config).unwrap_or_default();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn primary_is_lexically_first_config() {
        let names = [
            "99-x.conf",
            "10-b.conflist",
            "05-a.txt",
            ".05-x.conflist.tmp",
            "10-a.json",
        ];
        assert_eq!(select_primary(names.iter().copied()), Some("10-a.json"));
        // Like libcni, a dot file with a config extension counts (and sorts first).
        assert_eq!(
            select_primary(["10-a.conf", ".hidden.conflist"].iter().copied()),
            Some(".hidden.conflist")
        );
        assert_eq!(select_primary(["README", "x.bak"].iter().copied()), None);
        // Byte order: upper case sorts before lower case, digits before letters.
        assert_eq!(
            select_primary(["a.conf", "B.conf", "1.conf"].iter().copied()),
            Some("1.conf")
        );
    }

    #[test]
    fn entry_order_and_overrides() {
        let e = entry(
            &json!({"failClosed": true, "type": "tproxy-cni", "name": "x",
            "capabilities": {"portMappings": true, POD_ANNOTATIONS_CAPABILITY: false}}),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"tproxy-cni","capabilities":{"io.kubernetes.cri.pod-annotations":true,"portMappings":true},"failClosed":true}"#
        );
        assert!(entry(&json!({"type": "other"})).is_err());
        assert!(entry(&json!([1])).is_err());
        assert!(entry(&json!({"capabilities": 1})).is_err());
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let e = entry(&Value::Null).unwrap();
        for bad in [
            json!(null),
            json!([]),
            json!({"plugins": {}}),
            json!({"plugins": []}),
            json!({"plugins": [1]}),
            json!({"name": "x"}),
            json!({"type": "bridge"}), // single config without a name
        ] {
            assert!(inject(&bad, &e).is_err(), "{bad}");
        }
        assert!(parse(b"{").is_err());
        assert!(parse(b"").is_err());
    }

    #[test]
    fn duplicates_collapse_and_update_in_place() {
        let e = entry(&json!({"logLevel": "debug"})).unwrap();
        let c = json!({"name": "n", "plugins": [{"type": "a"}, {"type": "tproxy-cni"}, {"type": "b"}, {"type": "tproxy-cni"}]});
        let out = inject(&c, &e).unwrap().unwrap();
        let types: Vec<&str> = out["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["a", "tproxy-cni", "b"]);
        assert_eq!(out["plugins"][1]["logLevel"], "debug");
        assert_eq!(inject(&out, &e).unwrap(), None);
    }

    #[test]
    fn remove_leaves_lists_of_only_ours() {
        let c = json!({"name": "n", "plugins": [{"type": "tproxy-cni"}]});
        assert_eq!(remove(&c).unwrap(), None);
        let c = json!({"name": "n", "plugins": [{"type": "a"}]});
        assert_eq!(remove(&c).unwrap(), None);
        assert_eq!(
            remove(&json!({"name": "n", "type": "bridge"})).unwrap(),
            None
        );
    }
}
