//! Command-line flags of `tproxy-cni-install` -> a `Command`; no side effects besides reading the settings file.

use super::reconcile::{self, Settings};
use super::{InstallError, Options, Runtime};
use log::LevelFilter;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use tproxy_cni_policy::flags;

pub(crate) const USAGE: &str = "\
tproxy-cni-install: chain tproxy-cni into the node's primary CNI config and keep it there.

usage: tproxy-cni-install [--once | --uninstall] [flags]
       tproxy-cni-install --probe ready|alive [--health-dir DIR] [--max-age SECS]
       tproxy-cni-install --status [--json] [flags]

  --conf-dir DIR      CNI config dir as mounted in the container  [/host/etc/cni/net.d]
  --bin-dir DIR       CNI binary dir as mounted in the container  [/host/opt/cni/bin]
  --binary PATH       binary to copy into --bin-dir (repeatable)  [tproxy-cni next to this executable]
  --settings FILE     JSON object of plugin settings for our entry (the ConfigMap key); absent file = none
  --settings-json J   the same, inline (wins over --settings)
  --runtime R         containerd|crio: which config the runtime uses, so which one we patch
                      (containerd: the first file in byte order; crio: the first valid one)  [containerd]
  --default-network N with --runtime crio: CRI-O's cni_default_network (patch the config named N)
  --remove-on-exit    on SIGTERM remove the entry, then the binaries (the last step of an uninstall)
  --keep-on-exit      on SIGTERM leave the entry and binaries (the default; upgrades have no window)
  --health-dir DIR    where the `ready` and `alive` probe files live; '' disables  [/run/tproxy-cni]
  --resync SECS       wake-up period without events (liveness refresh, safety-net reconcile)  [10]
  --log-level LEVEL   error|warn|info|debug|trace  [info]
  --once              install binaries and the entry, then exit (no watch, no cleanup)
  --uninstall         remove our entry from every config, then the binaries, then exit
  --probe WHAT        exit 0 when ready (entry in place) / alive (loop refreshed within --max-age)
  --max-age SECS      --probe alive threshold  [60]
  --cni-cache-dir DIR libcni's cache dir as mounted (results in DIR/results)  [/host/var/lib/cni]
  --netns-dir DIR     the runtime's pod netns dir as mounted  [/host/var/run/netns]
  --reconcile MODE    repair|report|off: pods set up without our entry, or whose rules drifted,
                      get the plugin's ADD (repair), are only logged (report), or not looked at  [repair]
  --status            print every pod of the chained network (policy, state, our rules' packets), then exit
  --json              with --status: JSON instead of a table
  -h, --help          this text";

/// What the binary should do.
// Built once per process; boxing `Options` would only add noise at every use.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Command {
    Help,
    Run {
        opts: Options,
        mode: Mode,
        level: LevelFilter,
    },
    Probe {
        health_dir: PathBuf,
        what: String,
        max_age: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Daemon,
    Once,
    Uninstall,
    /// `--status [--json]`: one look at every pod, printed; no writes.
    Status {
        json: bool,
    },
}

fn usage(msg: impl Into<String>) -> InstallError {
    InstallError::Usage(format!("{}\n(see --help)", msg.into()))
}

fn secs(flag: &str, v: &str) -> Result<Duration, InstallError> {
    match v.parse::<u64>() {
        Ok(n) if n > 0 => Ok(Duration::from_secs(n)),
        _ => Err(usage(format!(
            "{flag} takes a positive number of seconds, got {v:?}"
        ))),
    }
}

/// The default binary: `tproxy-cni` in the installer's own directory (the image ships both).
fn default_binary() -> Vec<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(super::conflist::PLUGIN_TYPE)))
        .into_iter()
        .collect()
}

/// The flags as given (defaults filled in), before they are checked together.
struct Flags {
    conf_dir: PathBuf,
    bin_dir: PathBuf,
    binaries: Vec<PathBuf>,
    settings_file: Option<PathBuf>,
    settings_json: Option<String>,
    keep_on_exit: bool,
    runtime: Runtime,
    default_network: Option<String>,
    health_dir: Option<PathBuf>,
    resync: Duration,
    level: LevelFilter,
    mode: Mode,
    probe: Option<String>,
    max_age: Duration,
    reconcile: Settings,
    json: bool,
}

impl Default for Flags {
    fn default() -> Self {
        Flags {
            conf_dir: PathBuf::from("/host/etc/cni/net.d"),
            bin_dir: PathBuf::from("/host/opt/cni/bin"),
            binaries: Vec::new(),
            settings_file: None,
            settings_json: None,
            keep_on_exit: true,
            runtime: Runtime::Containerd,
            default_network: None,
            health_dir: Some(PathBuf::from("/run/tproxy-cni")),
            resync: Duration::from_secs(10),
            level: LevelFilter::Info,
            mode: Mode::Daemon,
            probe: None,
            max_age: Duration::from_secs(60),
            reconcile: Settings::default(),
            json: false,
        }
    }
}

/// The flags that take a value, and those that take none (crates/policy/src/flags.rs).
const SPEC: flags::Spec<'static> = flags::Spec {
    values: &[
        "cni-cache-dir",
        "netns-dir",
        "reconcile",
        "runtime",
        "default-network",
        "conf-dir",
        "bin-dir",
        "binary",
        "settings",
        "settings-json",
        "health-dir",
        "resync",
        "max-age",
        "probe",
        "log-level",
    ],
    switches: &[
        "keep-on-exit",
        "remove-on-exit",
        "once",
        "uninstall",
        "status",
        "json",
    ],
};

/// Parses the arguments after the program name.
pub(crate) fn parse(args: Vec<String>) -> Result<Command, InstallError> {
    let Some(f) = read_flags(args)? else {
        return Ok(Command::Help);
    };
    if let Some(what) = f.probe {
        let health_dir = f
            .health_dir
            .ok_or_else(|| usage("--probe needs a --health-dir"))?;
        return Ok(Command::Probe {
            health_dir,
            what,
            max_age: f.max_age,
        });
    }
    let settings = read_settings(f.settings_json, f.settings_file)?;
    let mode = match f.mode {
        Mode::Status { .. } => Mode::Status { json: f.json },
        _ if f.json => return Err(usage("--json goes with --status")),
        m => m,
    };
    if f.default_network.is_some() && f.runtime != Runtime::Crio {
        return Err(usage(
            "--default-network is CRI-O's cni_default_network: use it with --runtime crio",
        ));
    }
    let binaries = if f.binaries.is_empty() {
        default_binary()
    } else {
        f.binaries
    };
    Ok(Command::Run {
        opts: Options {
            conf_dir: f.conf_dir,
            bin_dir: f.bin_dir,
            binaries,
            settings,
            keep_on_exit: f.keep_on_exit,
            runtime: f.runtime,
            default_network: f.default_network,
            health_dir: f.health_dir,
            resync: f.resync,
            reconcile: f.reconcile,
        },
        mode,
        level: f.level,
    })
}

/// Every flag into `Flags`; `None` for `--help`.
fn read_flags(args: Vec<String>) -> Result<Option<Flags>, InstallError> {
    let flags::Parsed::Flags(given) =
        flags::parse(args, &SPEC).map_err(|e| usage(e.to_string()))?
    else {
        return Ok(None);
    };
    let mut f = Flags::default();
    for flag in given {
        match flag.name {
            "keep-on-exit" | "remove-on-exit" => f.keep_on_exit = flag.name == "keep-on-exit",
            "once" | "uninstall" | "status" => {
                if f.mode != Mode::Daemon {
                    return Err(usage("--once, --uninstall and --status exclude each other"));
                }
                f.mode = match flag.name {
                    "once" => Mode::Once,
                    "uninstall" => Mode::Uninstall,
                    _ => Mode::Status { json: false },
                };
            }
            "json" => f.json = true,
            name => set_value(&mut f, name, flag.into_value())?,
        }
    }
    Ok(Some(f))
}

/// One `--flag value`, by the flag's name without `--`.
fn set_value(f: &mut Flags, name: &str, value: String) -> Result<(), InstallError> {
    match name {
        "conf-dir" => f.conf_dir = value.into(),
        "bin-dir" => f.bin_dir = value.into(),
        "binary" => f.binaries.push(PathBuf::from(value)),
        "settings" => f.settings_file = Some(value.into()),
        "settings-json" => f.settings_json = Some(value),
        "health-dir" => f.health_dir = (!value.is_empty()).then(|| value.into()),
        "resync" => f.resync = secs("--resync", &value)?,
        "max-age" => f.max_age = secs("--max-age", &value)?,
        "probe" => f.probe = Some(value),
        "cni-cache-dir" => f.reconcile.cache_dir = value.into(),
        "netns-dir" => f.reconcile.netns_dir = value.into(),
        "reconcile" => {
            f.reconcile.mode = reconcile::Mode::parse(&value).ok_or_else(|| {
                usage(format!(
                    "--reconcile takes repair, report or off, got {value:?}"
                ))
            })?
        }
        "runtime" => {
            f.runtime = match value.as_str() {
                "containerd" => Runtime::Containerd,
                "crio" | "cri-o" => Runtime::Crio,
                _ => {
                    return Err(usage(format!(
                        "--runtime takes containerd or crio, got {value:?}"
                    )))
                }
            }
        }
        "default-network" if value.is_empty() => f.default_network = None,
        "default-network" => f.default_network = Some(value),
        "log-level" => {
            f.level = value
                .parse()
                .map_err(|_| usage(format!("--log-level: unknown level {value:?}")))?
        }
        _ => return Err(usage(format!("unknown flag --{name}"))),
    }
    Ok(())
}

/// Our entry's settings: inline JSON wins over the file; an absent or blank file is none.
fn read_settings(json: Option<String>, file: Option<PathBuf>) -> Result<Value, InstallError> {
    Ok(match (json, file) {
        (Some(j), _) => serde_json::from_str(&j)
            .map_err(|e| usage(format!("--settings-json is not JSON: {e}")))?,
        (None, Some(path)) => match std::fs::read(&path) {
            Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Value::Null,
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| usage(format!("--settings {}: not JSON: {e}", path.display())))?,
            // An optional ConfigMap that is not there means "defaults".
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(e) => return Err(usage(format!("--settings {}: {e}", path.display()))),
        },
        (None, None) => Value::Null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, InstallError> {
        parse(args.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn flags() {
        let Command::Run { opts, mode, level } = p(&[
            "--conf-dir=/c",
            "--bin-dir",
            "/b",
            "--binary",
            "/x/tproxy-cni",
            "--settings-json",
            r#"{"failClosed":true}"#,
            "--remove-on-exit",
            "--runtime=crio",
            "--default-network",
            "podnet",
            "--health-dir=",
            "--once",
            "--log-level",
            "debug",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(opts.conf_dir, PathBuf::from("/c"));
        assert_eq!(opts.bin_dir, PathBuf::from("/b"));
        assert_eq!(opts.binaries, [PathBuf::from("/x/tproxy-cni")]);
        assert_eq!(opts.settings["failClosed"], true);
        assert!(!opts.keep_on_exit && opts.health_dir.is_none());
        assert_eq!(opts.runtime, Runtime::Crio);
        assert_eq!(opts.default_network.as_deref(), Some("podnet"));
        let Command::Run { opts, .. } = p(&[]).unwrap() else {
            panic!()
        };
        // Upgrades without a window: the entry stays on SIGTERM unless asked otherwise.
        assert!(opts.keep_on_exit && opts.runtime == Runtime::Containerd);
        assert!(p(&["--runtime", "docker"]).is_err());
        assert!(p(&["--default-network", "x"]).is_err());
        assert_eq!((mode, level), (Mode::Once, LevelFilter::Debug));
        assert!(p(&["--bogus", "1"]).is_err());
        assert!(p(&["--conf-dir"]).is_err());
        assert!(p(&["--once", "--uninstall"]).is_err());
        assert!(p(&["--status", "--once"]).is_err());
        assert!(p(&["--json"]).is_err());
        assert!(p(&["--reconcile", "fix"]).is_err());
        let Command::Run { opts, mode, .. } = p(&[
            "--status",
            "--json",
            "--cni-cache-dir=/cache",
            "--netns-dir",
            "/ns",
            "--reconcile=report",
        ])
        .unwrap() else {
            panic!()
        };
        assert_eq!(mode, Mode::Status { json: true });
        assert_eq!(
            opts.reconcile,
            Settings {
                cache_dir: "/cache".into(),
                netns_dir: "/ns".into(),
                mode: reconcile::Mode::Report
            }
        );
        let Command::Run { opts, .. } = p(&[]).unwrap() else {
            panic!()
        };
        assert_eq!(opts.reconcile, Settings::default());
        assert!(p(&["--resync", "0"]).is_err());
        assert!(p(&["--settings-json", "{"]).is_err());
        assert!(matches!(
            p(&["--probe", "ready"]).unwrap(),
            Command::Probe { .. }
        ));
    }
}
