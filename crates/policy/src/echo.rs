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
