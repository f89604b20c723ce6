//! The Kubernetes downward-API annotations file (`key="value"` lines, Go-quoted values), which
//! the sidecar reads its pod's annotations from.

use std::collections::BTreeMap;

use super::{err, PolicyError};

/// Parses the Kubernetes downward-API annotations file: one `key="value"` per line, the value
/// quoted the way Go's `%q` does (escapes such as `\n`, `\"`, `\\`, `\u00e9`).
pub fn parse_downward_api(text: &str) -> Result<BTreeMap<String, String>, PolicyError> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| err(&format!("line {}", n + 1), line, why.to_string());
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| bad("expected key=\"value\""))?;
        let k = k.trim();
        if k.is_empty() {
            return Err(bad("empty key"));
        }
        let v = unquote_go(v.trim()).ok_or_else(|| bad("value is not a Go-quoted string"))?;
        out.insert(k.to_string(), v);
    }
    Ok(out)
}

/// Undoes Go's `strconv.Quote`. `None` on anything malformed.
fn unquote_go(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return None,
            '\\' => {
                let e = chars.next()?;
                match e {
                    'a' => out.push('\x07'),
                    'b' => out.push('\x08'),
                    'f' => out.push('\x0c'),
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    'v' => out.push('\x0b'),
                    '\\' => out.push('\\'),
                    '"' => out.push('"'),
                    '\'' => out.push('\''),
                    'x' | 'u' | 'U' => {
                        let n = match e {
                            'x' => 2,
                            'u' => 4,
                            _ => 8,
                        };
                        let hex: String = chars.by_ref().take(n).collect();
                        if hex.len() != n {
                            return None;
                        }
                        let v = u32::from_str_radix(&hex, 16).ok()?;
                        out.push(char::from_u32(v)?);
                    }
                    '0'..='7' => {
                        let rest: String = chars.by_ref().take(2).collect();
                        let oct = format!("{e}{rest}");
                        if oct.len() != 3 {
                            return None;
                        }
                        let v = u32::from_str_radix(&oct, 8).ok()?;
                        out.push(char::from_u32(v)?);
                    }
                    _ => return None,
                }
            }
            c => out.push(c),
        }
    }
    Some(out)
}
