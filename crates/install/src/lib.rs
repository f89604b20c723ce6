//! The node installer: copies the plugin binary, chains our entry into the conflist the runtime uses, keeps it there; removes it only when asked.
//!
//! - `conflist`: the pure patching rules (which file, where our entry goes, what is kept).
//! - `chained`: our separate list in front of a `.conf`/`.json` primary, which stays untouched.
//! - `compat`: which `cniVersion`s the plugin serves (others are refused, not chained into).
//! - `files`: atomic writes, binary copies, `replace_checked`.
//! - `config`: which config the runtime uses, one reconcile pass over it, removing our entries.
//! - `daemon`: the loop (events, resync, backoff, health files, SIGTERM).
//! - `cli`: flags -> `Command`.
//! - `cache`, `reconcile`, `status`: pods set up without our entry, or whose rules drifted,
//!   found in libcni's cache and repaired with the plugin's own code; `--status`.
//! - `logger`: stderr logger.
//!
//! The daemon loop is event-driven: inotify on the conf dir plus a self-pipe for SIGTERM/SIGINT,
//! both in one `poll(2)`. A periodic resync (default 10 s) refreshes the liveness file, copies
//! back a binary that vanished from the bin dir (not watched), notices primary binaries that
//! appeared or vanished, and catches anything inotify cannot see (e.g. a conf dir deleted and
//! re-created, or replaced by a bind mount). Directories holding symlinked configs' targets,
//! and every symlink on the way to the conf dir or a config, are watched too; a re-pointed
//! link is re-resolved at once (`watch`).
//!
//! Guarantees:
//! - an entry is written only into the config the runtime uses (`Runtime`), and only when every
//!   plugin binary that config names is an executable in the bin dir; our binary is in place
//!   first. A primary binary vanishing later leaves our entry (the node fails every ADD anyway;
//!   removing ours would open a window for annotated pods when it comes back), not ready;
//! - a write never replaces content we did not read (`replace_checked`);
//! - only our entry's bytes change; symlinks are written through; a single-config primary is
//!   never rewritten (our chained copy stands in front of it and goes when it goes);
//! - file names are bytes, ordered as the runtimes order them;
//! - a failing pass backs off (0.5 s doubling to 30 s); only config names trigger passes;
//! - an entry of ours that someone else rewrote with other settings after we asserted ours
//!   is left alone (two installers settle after one write each);
//! - SIGTERM leaves entry and binaries (upgrades have no window); `--remove-on-exit` or
//!   `--uninstall` remove the entry first, then the binaries.

// Only the modules that allow it below may use `unsafe`.
#![deny(unsafe_code)]

pub(crate) mod cache;
pub(crate) mod chained;
pub(crate) mod cli;
pub(crate) mod compat;
// One whole module stays public: `conflist`, the pure patcher, is a facade of one group (parse,
// entry, inject, remove, patch, unpatch, render, ...) that the tests drive together, and its
// names read best qualified (`conflist::parse`, `conflist::render`).
pub mod conflist;
pub(crate) mod reconcile;
pub(crate) mod status;
// `renameat2(RENAME_EXCHANGE)` through a raw syscall: the libc wrapper is missing on musl,
// which the image links. One `unsafe` block, with its SAFETY note.
#[allow(unsafe_code)]
pub(crate) mod files;
pub(crate) mod watch;

mod config;
mod daemon;
#[cfg(test)]
mod tests;

/// Our chained copy in front of a single-config primary: its file name and its bytes.
pub use chained::{name_for as chained_name_for, render as chained_render};

use config::{Config, Pass};
pub(crate) use files::{replace_checked, Swap};

use serde_json::{Map, Value};
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything the installer needs to know; built by `cli`.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// Where the runtime reads network configs (`/etc/cni/net.d` on the host).
    pub conf_dir: PathBuf,
    /// Where the runtime finds plugin binaries (`/opt/cni/bin` on the host).
    pub bin_dir: PathBuf,
    /// Binaries to copy into `bin_dir` (the plugin first).
    pub binaries: Vec<PathBuf>,
    /// Plugin settings written into our entry (only what the user configured).
    pub settings: Value,
    /// On SIGTERM keep the entry and the binaries (the default: a rolling upgrade's next pod
    /// takes over without a window; uninstalling is an explicit step).
    pub keep_on_exit: bool,
    /// Which file the runtime uses (see `Runtime`).
    pub runtime: Runtime,
    /// CRI-O's `cni_default_network`: patch the valid config with this `name`.
    pub default_network: Option<String>,
    /// Directory for the `ready` and `alive` probe files; `None` disables them.
    pub health_dir: Option<PathBuf>,
    /// How often the loop wakes without events (liveness, safety-net reconcile).
    pub resync: Duration,
    /// The pods' reconcile loop (libcni's cache, the netns dir, the mode).
    pub reconcile: reconcile::Settings,
}

/// Why the installer failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0}")]
    Usage(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Config {
        path: PathBuf,
        source: conflist::ConflistError,
    },
    #[error("{0}: {1}")]
    Sys(&'static str, nix::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The outcome of one reconcile pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum State {
    /// Our entry is in the named primary config.
    Ready(String),
    /// The conf dir holds no config yet (the primary CNI has not started).
    NoPrimary,
    /// The primary cannot be patched (malformed, a plugin binary missing, or the conversion
    /// target is foreign); the message names the file. We wait for it to change.
    Blocked(String),
    /// The named config holds an entry of ours with settings someone else wrote after we
    /// asserted ours; left alone (counts as ready: the node is chained).
    Foreign(String, String),
}

/// Which config file the node's container runtime uses; decides which file we patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Runtime {
    /// containerd (and libcni's own default): the first config file in byte order, even if it
    /// is broken. A broken first file is refused (the node is broken anyway), never skipped.
    Containerd,
    /// CRI-O: the first *valid* file (parses, every plugin binary in the bin dir), or the one
    /// whose `name` is its `cni_default_network` (our `--default-network`).
    Crio,
}

/// Health file names inside `health_dir`.
pub(crate) const READY_FILE: &str = "ready";
pub(crate) const ALIVE_FILE: &str = "alive";
/// Why the installer is not ready (the last reason), for the readiness probe's output.
pub(crate) const REASON_FILE: &str = "reason";

/// The installer's state between passes.
pub(crate) struct Installer {
    opts: Options,
    entry: Map<String, Value>,
    /// The last state logged, so a waiting or blocked installer logs once per change, not per wake.
    last: Option<State>,
    /// Per file (real path): the entry of ours we last wrote or found there as ours.
    seen: HashMap<PathBuf, Map<String, Value>>,
    /// The pods' reconcile loop.
    pods: reconcile::Reconciler,
    /// The chained copy the last pass wrote or confirmed (all others are removed).
    keep: Option<OsString>,
}

/// `--probe ready|alive`: exit status for a kubelet exec probe. `alive` fails when the loop has
/// not refreshed its file for `max_age` (a stuck installer).
pub(crate) fn probe(health_dir: &Path, what: &str, max_age: Duration) -> Result<(), InstallError> {
    let file = match what {
        "ready" => READY_FILE,
        "alive" => ALIVE_FILE,
        other => {
            return Err(InstallError::Usage(format!(
                "--probe takes ready or alive, not {other:?}"
            )))
        }
    };
    let path = health_dir.join(file);
    let meta = std::fs::metadata(&path).map_err(|e| {
        let reason = std::fs::read_to_string(health_dir.join(REASON_FILE)).unwrap_or_default();
        InstallError::Usage(if e.kind() == std::io::ErrorKind::NotFound {
            match reason.trim() {
                why if what == "ready" && !why.is_empty() => format!("not ready: {why}"),
                _ => format!("not {what}: {} does not exist", path.display()),
            }
        } else {
            format!("{}: {e}", path.display())
        })
    })?;
    if what == "alive" {
        let age = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .unwrap_or_default();
        if age > max_age {
            return Err(InstallError::Usage(format!(
                "{} not refreshed for {}s",
                path.display(),
                age.as_secs()
            )));
        }
    }
    Ok(())
}

/// The whole installer: flags in, exit status out (the binary only maps the error).
pub fn main_with(args: Vec<String>) -> Result<(), InstallError> {
    match cli::parse(args)? {
        cli::Command::Help => {
            println!("{}", cli::USAGE);
            Ok(())
        }
        cli::Command::Probe {
            health_dir,
            what,
            max_age,
        } => probe(&health_dir, &what, max_age),
        cli::Command::Run {
            mut opts,
            mode,
            level,
        } => {
            tproxy_cni_policy::init_logging("tproxy-cni-install", level, None);
            if matches!(mode, cli::Mode::Once | cli::Mode::Status { .. }) {
                // Nothing probes a one-shot run, and its health dir may not exist on a host.
                opts.health_dir = None;
            }
            let mut installer = Installer::new(opts)?;
            match mode {
                cli::Mode::Daemon => installer.run(),
                cli::Mode::Once => {
                    installer.install_binaries()?;
                    match installer.reconcile()? {
                        State::Ready(_) => Ok(()),
                        State::Foreign(_, m) => {
                            log::warn!("{m}");
                            Ok(())
                        }
                        State::NoPrimary => {
                            Err(InstallError::Usage("no CNI config to chain into".into()))
                        }
                        State::Blocked(m) => Err(InstallError::Usage(m)),
                    }
                }
                cli::Mode::Uninstall => installer.uninstall(),
                cli::Mode::Status { json } => installer.print_status(json),
            }
        }
    }
}
