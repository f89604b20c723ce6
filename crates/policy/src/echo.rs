//! How an error message quotes a value it was given: one rule for every crate, so a huge or
//! hostile value is never echoed whole (a leaf: it depends on nothing).

/// How many characters of a value an error message repeats.
pub const ECHO_MAX: usize = 64;

/// A value as an error message quotes it: `{:?}`-quoted, cut after [`ECHO_MAX`] characters with
/// its full size appended (`"aaaa…" (10485760 bytes)`), so a huge value is never echoed whole.
pub fn echo(s: &str) -> String {
    match s.char_indices().nth(ECHO_MAX) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &s[..cut], s.len()),
    }
}

/// A JSON value as an error message shows it, cut like [`echo`] (without the quotes).
pub fn echo_json(v: &serde_json::Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(ECHO_MAX) {
        None => s,
        Some((cut, _)) => format!("{}… ({} bytes)", &s[..cut], s.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_cuts_long_values_on_a_char_boundary() {
        assert_eq!(echo("80,x"), "\"80,x\"");
        let long = "é".repeat(100);
        let e = echo(&long);
        assert!(e.starts_with(&format!("\"{}", "é".repeat(ECHO_MAX))), "{e}");
        assert!(e.ends_with("… (200 bytes)"), "{e}");
        let v = serde_json::Value::String("x".repeat(1000));
        let e = echo_json(&v);
        assert!(e.len() < 100 && e.ends_with("(1002 bytes)"), "{e}");
        assert_eq!(echo_json(&serde_json::json!(1)), "1");
    }
}
