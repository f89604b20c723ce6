//! One flag parser for the four command lines (`tproxy-cni-host`, `tproxy-sidecar`,
//! `tproxy-cni-install`, `tproxy-cni-run`): `--flag value` and `--flag=value` (Kubernetes
//! `args` are often written inline), switches without a value, `-h`/`--help`, the environment
//! variable a flag falls back to, and one wording for the errors. Each command line lists its
//! flags and turns the values into its own settings, in the order given.

use crate::echo;

/// The flags a command line accepts, by name without the leading `--`.
#[derive(Debug, Clone, Copy)]
pub struct Spec<'a> {
    /// Flags that take a value.
    pub values: &'a [&'static str],
    /// Flags that take none.
    pub switches: &'a [&'static str],
}

/// One flag as given: its name (without `--`) and, for a flag that takes one, its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    pub name: &'static str,
    pub value: Option<String>,
}

impl Flag {
    /// The value, or "" for a switch.
    pub fn value(&self) -> &str {
        self.value.as_deref().unwrap_or("")
    }

    /// The value, moved out ("" for a switch).
    pub fn into_value(self) -> String {
        self.value.unwrap_or_default()
    }
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// `-h` or `--help`, anywhere a flag may stand.
    Help,
    /// The flags in the order given.
    Flags(Vec<Flag>),
}

/// Why the arguments could not be read. Every message names the offending argument.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    #[error("unknown flag {}", echo(.0))]
    Unknown(String),
    #[error("--{0} needs a value")]
    MissingValue(&'static str),
    #[error("--{0} takes no value")]
    NoValue(&'static str),
}

/// Reads `args` (without the program name or a leading command word) against `spec`. A value
/// is the rest of `--flag=value` or else the next argument, whatever it looks like.
pub fn parse<I>(args: I, spec: &Spec<'_>) -> Result<Parsed, FlagError>
where
    I: IntoIterator<Item = String>,
{
    let mut it = args.into_iter();
    let mut flags = Vec::new();
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Parsed::Help);
        }
        let (body, inline) = match arg.strip_prefix("--").map(|b| b.split_once('=')) {
            Some(Some((n, v))) => (n, Some(v.to_string())),
            Some(None) => (&arg[2..], None),
            None => return Err(FlagError::Unknown(arg)),
        };
        if let Some(name) = find(spec.switches, body) {
            if inline.is_some() {
                return Err(FlagError::NoValue(name));
            }
            flags.push(Flag { name, value: None });
            continue;
        }
        let Some(name) = find(spec.values, body) else {
            let shown = arg.split_once('=').map_or(arg.as_str(), |(n, _)| n);
            return Err(FlagError::Unknown(shown.to_string()));
        };
        let value = match inline {
            Some(v) => v,
            None => it.next().ok_or(FlagError::MissingValue(name))?,
        };
        flags.push(Flag {
            name,
            value: Some(value),
        });
    }
    Ok(Parsed::Flags(flags))
}

fn find(names: &[&'static str], body: &str) -> Option<&'static str> {
    names.iter().copied().find(|n| *n == body)
}

/// The environment variable a flag falls back to: `PREFIX` and the flag's name in upper case
/// with `_` for `-` (`--connect-timeout` <-> `TPROXY_SIDECAR_CONNECT_TIMEOUT`).
pub fn env_name(prefix: &str, flag: &str) -> String {
    format!("{prefix}{}", flag.to_ascii_uppercase().replace('-', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: Spec<'static> = Spec {
        values: &["conf-dir", "binary"],
        switches: &["once"],
    };

    fn p(args: &[&str]) -> Result<Parsed, FlagError> {
        parse(args.iter().map(|s| s.to_string()), &SPEC)
    }

    fn flag(name: &'static str, value: Option<&str>) -> Flag {
        Flag {
            name,
            value: value.map(str::to_string),
        }
    }

    #[test]
    fn both_spellings_switches_and_order() {
        assert_eq!(
            p(&[
                "--conf-dir",
                "/a",
                "--once",
                "--binary=/b=c",
                "--binary",
                "--once"
            ])
            .unwrap(),
            Parsed::Flags(vec![
                flag("conf-dir", Some("/a")),
                flag("once", None),
                flag("binary", Some("/b=c")),
                // The next argument is the value, whatever it looks like.
                flag("binary", Some("--once")),
            ])
        );
        assert_eq!(
            p(&["--conf-dir="]).unwrap(),
            Parsed::Flags(vec![flag("conf-dir", Some(""))])
        );
        assert_eq!(p(&[]).unwrap(), Parsed::Flags(vec![]));
    }

    #[test]
    fn help_anywhere_a_flag_may_stand() {
        assert_eq!(p(&["--once", "-h"]).unwrap(), Parsed::Help);
        assert_eq!(p(&["--help", "--bogus"]).unwrap(), Parsed::Help);
        // A value is never taken for a flag.
        assert_eq!(
            p(&["--binary", "-h"]).unwrap(),
            Parsed::Flags(vec![flag("binary", Some("-h"))])
        );
    }

    #[test]
    fn errors_name_the_argument() {
        let e = |a: &[&str]| p(a).unwrap_err().to_string();
        assert_eq!(e(&["--bogus", "1"]), r#"unknown flag "--bogus""#);
        assert_eq!(e(&["--bogus=1"]), r#"unknown flag "--bogus""#);
        assert_eq!(e(&["conf-dir"]), r#"unknown flag "conf-dir""#);
        assert_eq!(e(&["-x"]), r#"unknown flag "-x""#);
        assert_eq!(e(&["--binary"]), "--binary needs a value");
        assert_eq!(e(&["--once=yes"]), "--once takes no value");
        let long = format!("--{}", "x".repeat(10_000));
        assert!(e(&[&long]).len() < 200, "a huge argument is cut");
    }

    #[test]
    fn env_names() {
        assert_eq!(
            env_name("TPROXY_SIDECAR_", "connect-timeout"),
            "TPROXY_SIDECAR_CONNECT_TIMEOUT"
        );
    }
}
