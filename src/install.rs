//! The node installer: copies the plugin binary, chains our entry into the conflist the runtime uses, keeps it there; removes it only when asked.
//!
//! - `conflist`: the pure patching rules (which file, where our entry goes, what is kept).
//! - `chained`: our separate list in front of a `.conf`/`.json` primary, which stays untouched.
//! - `compat`: which `cniVersion`s the plugin serves (others are refused, not chained into).
//! - `files`: atomic writes and binary copies.
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

pub mod cache;
pub mod chained;
pub mod cli;
pub mod compat;
pub mod conflist;
pub mod reconcile;
pub mod status;
// `renameat2(RENAME_EXCHANGE)` through a raw syscall: the libc wrapper is missing on musl,
// which the image links. One `unsafe` block, with its SAFETY note.
#[allow(unsafe_code)]
pub mod files;
pub mod watch;

use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{InitFlags, Inotify};

/// Everything the installer needs to know; built by `cli`.
#[derive(Debug, Clone)]
pub struct Options {
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
pub enum State {
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
pub enum Runtime {
    /// containerd (and libcni's own default): the first config file in byte order, even if it
    /// is broken. A broken first file is refused (the node is broken anyway), never skipped.
    Containerd,
    /// CRI-O: the first *valid* file (parses, every plugin binary in the bin dir), or the one
    /// whose `name` is its `cni_default_network` (our `--default-network`).
    Crio,
}

/// A config file as read for a pass.
struct Config {
    /// Its name in the conf dir (bytes: names need not be UTF-8).
    name: OsString,
    /// The name is a symlink; `real` is where it points.
    linked: bool,
    /// The file we read and write (symlinks followed: the runtime reads through them).
    real: PathBuf,
    bytes: Vec<u8>,
    value: Value,
}

/// The conf dir's configs, primaries and our chained copies apart (each in byte order).
#[derive(Default)]
struct Listing {
    foreign: Vec<OsString>,
    /// Name, and the source it records.
    chained: Vec<(OsString, String)>,
}

/// What reading one candidate gave.
enum Loaded {
    Valid(Config),
    /// Why a runtime would not load it (one line, names the file).
    Invalid(String),
    /// Gone between readdir and read.
    Vanished,
}

/// What `replace_checked` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Swap {
    /// Our bytes are in place and replaced exactly what we had read.
    Written,
    /// Someone wrote the file in between; their newer file is in place, ours is not.
    Raced,
}

/// How many exchanges `replace_checked` tries while a writer keeps writing.
const SWAP_ROUNDS: usize = 50;

/// Replaces the file `path`, whose content we read as `before`, by `desired` without ever
/// losing a write made in between (docs/ARCHITECTURE.md, pitfall 15). The new file is
/// exchanged with the old one atomically (`renameat2(RENAME_EXCHANGE)`), which hands back what
/// was replaced: if that is not what we read, someone wrote after our read, so their file
/// (the same inode, so an in-place writer keeps writing where the runtime reads) is exchanged
/// back and `Raced` returned for the caller to re-read and patch again. Each exchange back is
/// checked the same way. Without `RENAME_EXCHANGE` (some file systems) it falls back to
/// compare-then-rename, which narrows the window but cannot close it.
pub fn replace_checked(path: &Path, before: &[u8], desired: &[u8]) -> std::io::Result<Swap> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file path",
        ));
    };
    let mode = files::mode_of(path).unwrap_or(0o644);
    let tmp = files::write_temp(dir, name, desired, mode)?;
    // What the path holds as far as we know, and what we are about to put there.
    let mut believed = before.to_vec();
    let mut in_tmp = desired.to_vec();
    for round in 0..SWAP_ROUNDS {
        match files::exchange(&tmp, path) {
            Ok(()) => {}
            Err(e) if round == 0 && files::exchange_unsupported(&e) => {
                let result = match std::fs::read(path) {
                    Ok(now) if now == before => std::fs::rename(&tmp, path)
                        .and_then(|()| files::sync_dir(dir))
                        .map(|()| Swap::Written),
                    Ok(_) => Ok(Swap::Raced),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Swap::Raced),
                    Err(e) => Err(e),
                };
                let _ = files::remove_if_present(&tmp);
                return result;
            }
            Err(e) => {
                let _ = files::remove_if_present(&tmp);
                return match e.kind() {
                    // The file was renamed away or deleted: the watch brings us back.
                    std::io::ErrorKind::NotFound => Ok(Swap::Raced),
                    _ => Err(e),
                };
            }
        }
        // `tmp` now holds what was at `path`.
        let came = std::fs::read(&tmp)?;
        if came == believed {
            files::remove_if_present(&tmp)?;
            files::sync_dir(dir)?;
            return Ok(if round == 0 {
                Swap::Written
            } else {
                Swap::Raced
            });
        }
        // A write landed after our read: it is newer than what we just put in place. Put it
        // back on the next round, then check that what comes out is ours.
        log::debug!(
            "{} changed under us (round {round}); giving the newer file back",
            path.display()
        );
        believed = std::mem::replace(&mut in_tmp, came);
    }
    // A writer that rewrites faster than two renames: leave its last file where it is.
    Err(std::io::Error::other(format!(
        "kept changing through {SWAP_ROUNDS} exchanges; the last version it replaced is kept \
         in {}",
        tmp.display()
    )))
}

/// One attempt of a reconcile pass.
enum Pass {
    Done(State),
    /// The primary changed under us (renamed, or rewritten between read and write); retry.
    Raced(String),
}

/// First and longest wait after a failed pass.
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Health file names inside `health_dir`.
pub const READY_FILE: &str = "ready";
pub const ALIVE_FILE: &str = "alive";
/// Why the installer is not ready (the last reason), for the readiness probe's output.
pub const REASON_FILE: &str = "reason";

/// The installer's state between passes.
pub struct Installer {
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

impl Installer {
    pub fn new(opts: Options) -> Result<Installer, InstallError> {
        let entry = conflist::entry(&opts.settings).map_err(|source| InstallError::Config {
            path: PathBuf::from("--settings"),
            source,
        })?;
        Ok(Installer {
            pods: reconcile::Reconciler::new(opts.reconcile.clone()),
            opts,
            entry,
            last: None,
            seen: HashMap::new(),
            keep: None,
        })
    }

    /// The entry this installer writes.
    pub fn entry(&self) -> &Map<String, Value> {
        &self.entry
    }

    /// Copies every binary into the bin dir (atomic, 0755, skipped when identical).
    pub fn install_binaries(&self) -> Result<(), InstallError> {
        std::fs::create_dir_all(&self.opts.bin_dir).map_err(io_err(&self.opts.bin_dir))?;
        for src in &self.opts.binaries {
            let (dest, what) = files::copy_binary(src, &self.opts.bin_dir).map_err(io_err(src))?;
            match what {
                files::Copied::Installed => log::info!("installed {}", dest.display()),
                files::Copied::Unchanged => log::info!("{} is up to date", dest.display()),
            }
        }
        Ok(())
    }

    /// Copies back any binary that disappeared from the bin dir (k3s swaps its bin dir on
    /// upgrade; node clean-up scripts wipe it). A `stat` per binary, so cheap on every pass.
    pub fn restore_binaries(&self) -> Result<(), InstallError> {
        for src in &self.opts.binaries {
            let Some(name) = src.file_name() else {
                continue;
            };
            let dest = self.opts.bin_dir.join(name);
            if !dest.is_file() {
                log::warn!("{} disappeared; installing it again", dest.display());
                std::fs::create_dir_all(&self.opts.bin_dir).map_err(io_err(&self.opts.bin_dir))?;
                files::copy_binary(src, &self.opts.bin_dir).map_err(io_err(src))?;
            }
        }
        Ok(())
    }

    /// Names of the config files in the conf dir, in byte order (Go's `sort.Strings`, what
    /// containerd and CRI-O use; names are bytes and need not be UTF-8, docs/ARCHITECTURE.md,
    /// pitfall 71). Symlinks count even when their target is missing here: the runtime lists
    /// them too (and may resolve them).
    fn config_names(&self) -> Result<Vec<OsString>, InstallError> {
        let dir = &self.opts.conf_dir;
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            let name = e.file_name();
            if !conflist::is_config_os(&name) {
                continue;
            }
            let path = dir.join(&name);
            // Follows symlinks like the runtime does; directories are not configs.
            let link = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
            if path.is_file() || (link && !path.exists()) {
                names.push(name);
            }
        }
        // OsString orders by bytes on Unix.
        names.sort();
        Ok(names)
    }

    /// The config names split into the primaries' (`foreign`) and our chained copies of
    /// single-config primaries (`chained`, with the source each records).
    fn listing(&self) -> Result<Listing, InstallError> {
        let mut out = Listing::default();
        for name in self.config_names()? {
            let path = self.opts.conf_dir.join(&name);
            let regular = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file());
            let source = regular
                .then(|| std::fs::read(&path).ok())
                .flatten()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|v| chained::source_of(&v).map(str::to_string));
            match source {
                Some(src) => out.chained.push((name, src)),
                None => out.foreign.push(name),
            }
        }
        Ok(out)
    }

    /// The plugin binaries `config` needs that are not executable files in the bin dir (ours
    /// excepted: we install it before any entry names it).
    fn missing_binaries(&self, config: &Value) -> Vec<String> {
        conflist::plugin_types(config)
            .into_iter()
            .filter(|t| t != conflist::PLUGIN_TYPE)
            .filter(|t| {
                if t.contains('/') || t == ".." {
                    return true;
                }
                let path = self.opts.bin_dir.join(t);
                match std::fs::metadata(&path) {
                    Ok(m) => {
                        use std::os::unix::fs::PermissionsExt;
                        !(m.is_file() && m.permissions().mode() & 0o111 != 0)
                    }
                    // A symlink we cannot follow here (an absolute link resolves on the host,
                    // not in this container): the runtime may well find it; not ours to judge.
                    Err(_) => {
                        !std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink())
                    }
                }
            })
            .collect()
    }

    /// Reads one config file (through a symlink) and judges it the way a runtime would.
    fn load(&self, name: &OsStr) -> Result<Loaded, InstallError> {
        let path = self.opts.conf_dir.join(name);
        let real = match std::fs::canonicalize(&path) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(match std::fs::read_link(&path) {
                    Ok(target) => Loaded::Invalid(format!(
                        "{} is a symlink to {}, which does not exist in this container (an \
                         absolute link resolves differently here than on the host); mount its \
                         target at the same path or make the link relative",
                        path.display(),
                        target.display()
                    )),
                    Err(_) => Loaded::Vanished,
                });
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let bytes = match std::fs::read(&real) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::Vanished),
            Err(e) => return Err(io_err(&real)(e)),
        };
        let value = match conflist::parse(&bytes) {
            Ok(v) => v,
            Err(e) => return Ok(Loaded::Invalid(format!("{}: {e}", path.display()))),
        };
        let missing = self.missing_binaries(&value);
        if !missing.is_empty() {
            let ours = if conflist::contains_ours(&value) {
                "; our entry stays (removing it would not let pods start)"
            } else {
                "; not chaining"
            };
            return Ok(Loaded::Invalid(format!(
                "{} uses plugin(s) {} but {} has no such executable: --bin-dir is probably not \
                 the directory the container runtime searches for CNI plugins (set it to the \
                 node's CNI bin dir, e.g. /home/kubernetes/bin on GKE; see docs/install.md){ours}",
                path.display(),
                missing
                    .iter()
                    .map(|m| format!("{m:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.opts.bin_dir.display()
            )));
        }
        let linked = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
        Ok(Loaded::Valid(Config {
            name: name.to_os_string(),
            linked,
            real,
            bytes,
            value,
        }))
    }

    /// The config the runtime uses (see `Runtime`), or why there is none to patch.
    fn select(&self) -> Result<Result<Config, Pass>, InstallError> {
        // Our chained copies are not primaries: they stand in for one (`chained`).
        let names = self.listing()?.foreign;
        let Some(first) = names.first() else {
            return Ok(Err(Pass::Done(State::NoPrimary)));
        };
        let dir = self.opts.conf_dir.display();
        match (self.opts.runtime, &self.opts.default_network) {
            (Runtime::Containerd, _) => match self.load(first)? {
                Loaded::Valid(c) => Ok(Ok(c)),
                Loaded::Vanished => Ok(Err(Pass::Raced(format!(
                    "{} vanished while reading",
                    first.to_string_lossy()
                )))),
                // containerd loads only this file: the node is broken until it is fixed, and
                // chaining into a later file would be chaining into something nobody reads.
                Loaded::Invalid(why) => Ok(Err(Pass::Done(State::Blocked(format!(
                    "{why} (containerd loads the first config in byte order; retried on change and at each resync)"
                ))))),
            },
            (Runtime::Crio, default) => {
                let mut first_why = None;
                for name in &names {
                    match self.load(name)? {
                        Loaded::Valid(c) => match default {
                            Some(net)
                                if c.value.get("name").and_then(Value::as_str) != Some(net) => {}
                            _ => return Ok(Ok(c)),
                        },
                        Loaded::Vanished => {
                            return Ok(Err(Pass::Raced(format!(
                                "{} vanished while reading",
                                name.to_string_lossy()
                            ))))
                        }
                        Loaded::Invalid(why) => {
                            first_why.get_or_insert(why);
                        }
                    }
                }
                let why = match default {
                    Some(net) => {
                        format!("no valid config in {dir} has the name {net:?} (--default-network)")
                    }
                    None => format!("no valid config in {dir}"),
                };
                Ok(Err(Pass::Done(State::Blocked(match first_why {
                    Some(first) => format!("{why}; first problem: {first}"),
                    None => why,
                }))))
            }
        }
    }

    /// One pass: make sure our entry is in the config the runtime uses. Writes only when
    /// something changes, and never replaces content it did not read (see `replace_checked`).
    pub fn reconcile(&mut self) -> Result<State, InstallError> {
        let mut attempt = 0;
        let mut settled = true;
        let state = loop {
            self.keep = None;
            match self.reconcile_once()? {
                Pass::Done(state) => break state,
                // The primary CNI is writing right now: give it a moment, a few times, then
                // leave it to the watch (its close/rename event brings us back).
                Pass::Raced(msg) if attempt >= 5 => {
                    settled = false;
                    break State::Blocked(msg);
                }
                Pass::Raced(_) => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        // A chained copy that is not the one in use now would shadow its source (or outlive
        // it): gone, whatever the state, once a pass has settled (docs/ARCHITECTURE.md,
        // pitfall 71). A source still being written keeps its copy until the next pass.
        if settled {
            self.remove_stale_chained()?;
        }
        self.report(&state);
        self.update_ready(&state);
        Ok(state)
    }

    /// Someone else's settings in our entry of `value` (the file `real`), written after we
    /// asserted ours: left alone, so two installers never rewrite a file back and forth.
    fn foreign_entry(&self, real: &Path, value: &Value, name: &OsStr) -> Option<State> {
        let found = conflist::our_entry(value)?;
        let mine = self.seen.get(real)?;
        (found != &self.entry && mine != found).then(|| {
            State::Foreign(
                name.to_string_lossy().into_owned(),
                format!(
                    "{}: our entry was rewritten with other settings by someone else (another \
                     installer, or a hand edit); leaving it (restart this installer to apply \
                     ours)",
                    self.opts.conf_dir.join(name).display()
                ),
            )
        })
    }

    fn reconcile_once(&mut self) -> Result<Pass, InstallError> {
        let c = match self.select()? {
            Ok(c) => c,
            Err(pass) => return Ok(pass),
        };
        let path = self.opts.conf_dir.join(&c.name);
        if let Some(why) = compat::unservable(&c.value) {
            return Ok(Pass::Done(State::Blocked(format!(
                "{} {why}; not chaining (every pod ADD on the node would fail)",
                path.display()
            ))));
        }
        if c.value.get("plugins").is_none() {
            return self.chain_single(c);
        }
        if let Some(state) = self.foreign_entry(&c.real, &c.value, &c.name) {
            return Ok(Pass::Done(state));
        }
        let name = c.name.to_string_lossy().into_owned();
        let patched = match conflist::patch(&c.bytes, &c.value, &self.entry) {
            Ok(None) => {
                self.seen.insert(c.real.clone(), self.entry.clone());
                return Ok(Pass::Done(State::Ready(name)));
            }
            Ok(Some(p)) => p,
            Err(e) => {
                return Ok(Pass::Done(State::Blocked(format!(
                    "{}: {e}; left untouched, retrying when it changes",
                    path.display()
                ))))
            }
        };
        match replace_checked(&c.real, &c.bytes, &patched).map_err(io_err(&c.real))? {
            Swap::Raced => Ok(Pass::Raced(format!(
                "{} kept changing while we patched it",
                path.display()
            ))),
            Swap::Written => {
                self.seen.insert(c.real.clone(), self.entry.clone());
                if c.linked {
                    log::info!(
                        "added our entry to {} (the target of {})",
                        c.real.display(),
                        path.display()
                    );
                } else {
                    log::info!("added our entry to {}", path.display());
                }
                Ok(Pass::Done(State::Ready(name)))
            }
        }
    }

    fn report(&mut self, state: &State) {
        if self.last.as_ref() == Some(state) {
            return;
        }
        match state {
            State::Ready(name) => log::info!(
                "ready: {} chains {}",
                self.opts.conf_dir.join(name).display(),
                conflist::PLUGIN_TYPE
            ),
            State::NoPrimary => log::warn!(
                "no CNI config in {} yet; waiting for the primary CNI to write one",
                self.opts.conf_dir.display()
            ),
            State::Blocked(msg) => log::error!("{msg}"),
            State::Foreign(_, msg) => log::warn!("{msg}"),
        }
        self.last = Some(state.clone());
    }

    /// The `ready` file while chained; otherwise none, and the `reason` file says why (the
    /// readiness probe prints it, so `kubectl describe pod` shows it).
    fn update_ready(&self, state: &State) {
        let Some(dir) = &self.opts.health_dir else {
            return;
        };
        let path = dir.join(READY_FILE);
        let reason = match state {
            State::Ready(_) | State::Foreign(..) => None,
            State::NoPrimary => Some(format!(
                "no CNI config in {} yet; waiting for the primary CNI",
                self.opts.conf_dir.display()
            )),
            State::Blocked(msg) => Some(msg.clone()),
        };
        let res = match (state, &reason) {
            (State::Ready(name) | State::Foreign(name, _), _) => {
                std::fs::write(&path, format!("{name}\n"))
            }
            (_, why) => files::remove_if_present(&path).and_then(|_| {
                std::fs::write(dir.join(REASON_FILE), why.as_deref().unwrap_or_default())
            }),
        };
        if let Err(e) = res {
            log::error!("{}: {e}", path.display());
        }
    }

    fn touch_alive(&self) {
        if let Some(dir) = &self.opts.health_dir {
            let path = dir.join(ALIVE_FILE);
            if let Err(e) = std::fs::write(&path, b"") {
                log::error!("{}: {e}", path.display());
            }
        }
    }

    /// Removes our entry from every config in the conf dir that has one, then the ready file.
    /// Keeps going past errors (a malformed file must not stop the others) and reports the first.
    pub fn remove_entries(&self) -> Result<(), InstallError> {
        if let Some(dir) = &self.opts.health_dir {
            let _ = files::remove_if_present(&dir.join(READY_FILE));
        }
        let dir = &self.opts.conf_dir;
        let names = match self.listing() {
            Ok(l) => {
                // Our chained copies go whole: without our entry they would only repeat (and
                // shadow) their source.
                for (name, _) in &l.chained {
                    let path = dir.join(name);
                    match files::remove_if_present(&path) {
                        Ok(true) => log::info!("removed {}", path.display()),
                        Ok(false) => {}
                        Err(e) => log::warn!("uninstall: {}: {e}", path.display()),
                    }
                }
                l.foreign
            }
            Err(InstallError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        let mut first_err = None;
        let mut done: HashSet<PathBuf> = HashSet::new();
        for name in names {
            let path = dir.join(&name);
            let result = (|| -> Result<(), InstallError> {
                // Through symlinks, like the runtime reads; each real file once.
                let real = match std::fs::canonicalize(&path) {
                    Ok(r) => r,
                    // A dangling link: nothing of ours can be behind it.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                    Err(e) => return Err(io_err(&path)(e)),
                };
                if !done.insert(real.clone()) {
                    return Ok(());
                }
                for _ in 0..5 {
                    let bytes = match std::fs::read(&real) {
                        Ok(b) => b,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                        Err(e) => return Err(io_err(&real)(e)),
                    };
                    let config =
                        conflist::parse(&bytes).map_err(|source| InstallError::Config {
                            path: path.clone(),
                            source,
                        })?;
                    let Some(cleaned) = conflist::unpatch(&bytes, &config).map_err(|source| {
                        InstallError::Config {
                            path: path.clone(),
                            source,
                        }
                    })?
                    else {
                        return Ok(());
                    };
                    match replace_checked(&real, &bytes, &cleaned).map_err(io_err(&real))? {
                        Swap::Written => {
                            log::info!("removed our entry from {}", path.display());
                            return Ok(());
                        }
                        // Rewritten meanwhile: read the newer file and remove from that.
                        Swap::Raced => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                Err(io_err(&path)(std::io::Error::other(
                    "kept changing while we removed our entry",
                )))
            })();
            if let Err(e) = result {
                // Malformed foreign files are not ours to judge on the way out; note and go on.
                log::warn!("uninstall: {e}");
                if !matches!(e, InstallError::Config { .. }) && first_err.is_none() {
                    first_err = Some(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Removes the binaries we installed (after the entries: a runtime must never find an
    /// entry whose binary is missing, or every pod ADD on the node fails).
    pub fn remove_binaries(&self) -> Result<(), InstallError> {
        for src in &self.opts.binaries {
            let Some(name) = src.file_name() else {
                continue;
            };
            let dest = self.opts.bin_dir.join(name);
            if files::remove_if_present(&dest).map_err(io_err(&dest))? {
                log::info!("removed {}", dest.display());
            }
        }
        Ok(())
    }

    /// Full uninstall: entries first, then binaries.
    pub fn uninstall(&self) -> Result<(), InstallError> {
        let entries = self.remove_entries();
        // Binaries go only once no config references them any more.
        entries?;
        self.remove_binaries()
    }

    /// Installs, then watches until SIGTERM/SIGINT; then uninstalls unless `keep_on_exit`.
    pub fn run(mut self) -> Result<(), InstallError> {
        let (sig_read, sig_write) = UnixStream::pair().map_err(io_err(Path::new("signal pipe")))?;
        sig_read
            .set_nonblocking(true)
            .map_err(io_err(Path::new("signal pipe")))?;
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            let w = sig_write
                .try_clone()
                .map_err(io_err(Path::new("signal pipe")))?;
            signal_hook::low_level::pipe::register(sig, w)
                .map_err(io_err(Path::new("signal handler")))?;
        }
        if let Some(dir) = &self.opts.health_dir {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            let _ = files::remove_if_present(&dir.join(READY_FILE));
        }
        self.install_binaries()?;
        // The kubelet creates the conf dir with DirectoryOrCreate too; without it we could not watch.
        std::fs::create_dir_all(&self.opts.conf_dir).map_err(io_err(&self.opts.conf_dir))?;
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| InstallError::Sys("inotify_init", e))?;
        let mut watches = watch::Watches::default();
        watches.watch_conf(&inotify, &self.opts.conf_dir);
        // After a failed pass (a write that keeps failing: ENOSPC, EBUSY on a bind-mounted
        // file, a read-only mount) the next one waits, doubling up to BACKOFF_MAX; events in
        // between are collected, not acted on.
        let mut backoff = Duration::ZERO;
        let mut last_pass = Instant::now();
        let mut cache_watch = self.cache_watch();
        // Links watched before the first read: a re-point during the pass is an event.
        self.refresh_watches(&inotify, &mut watches);
        let mut pending = !self.pass();
        pending |= self.refresh_watches(&inotify, &mut watches);
        // The pods after the watches: `ready` is already written, and a config write the
        // watches would miss meanwhile would wait for the next resync.
        self.reconcile_pods(None);
        if pending {
            backoff = BACKOFF_START;
        }
        loop {
            let wait = if pending { backoff } else { self.opts.resync };
            let timeout = wait
                .saturating_sub(last_pass.elapsed())
                .max(Duration::from_millis(10));
            let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
            let (mut conf_event, mut signal, mut cache_event) = (false, false, false);
            {
                let mut fds = vec![
                    PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
                    PollFd::new(sig_read.as_fd(), PollFlags::POLLIN),
                ];
                if let Some(w) = &cache_watch {
                    fds.push(PollFd::new(w.fd(), PollFlags::POLLIN));
                }
                match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
                    Ok(_) => {
                        conf_event = fds[0].any().unwrap_or(false);
                        signal = fds[1].any().unwrap_or(false);
                        cache_event = fds.get(2).and_then(|f| f.any()).unwrap_or(false);
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(InstallError::Sys("poll", e)),
                }
            }
            if signal {
                log::info!("signal received, shutting down");
                break;
            }
            if conf_event {
                // Writers often do several steps (write temp, rename, chmod): let them settle
                // briefly, then handle everything in one pass.
                std::thread::sleep(Duration::from_millis(30));
                let events = watches.drain(&inotify);
                if events.dir_gone {
                    // The conf dir itself went away or was replaced: re-establish the watch.
                    watches.lose_conf();
                }
                if events.relink {
                    // A link on the way to the conf dir or a config was re-pointed: watch
                    // what the paths lead to now (docs/ARCHITECTURE.md, pitfall 72).
                    watches.watch_conf(&inotify, &self.opts.conf_dir);
                    self.refresh_watches(&inotify, &mut watches);
                }
                // Only config names matter: our own temp files (and the primary's) and other
                // files such as kubeconfigs never trigger a pass.
                pending |= events.configs || events.dir_gone;
            }
            if !watches.has_conf() {
                watches.watch_conf(&inotify, &self.opts.conf_dir);
            }
            if cache_event {
                self.cache_event(cache_watch.as_mut());
            }
            let due = if pending { backoff } else { self.opts.resync };
            if last_pass.elapsed() >= due || (pending && backoff.is_zero()) {
                let ok = self.pass();
                let moved = self.refresh_watches(&inotify, &mut watches);
                if let Some(w) = cache_watch.as_mut() {
                    w.rewatch();
                }
                self.reconcile_pods(None);
                last_pass = Instant::now();
                if ok {
                    // The conf dir's path moved during the pass: once more, where it leads now.
                    pending = moved;
                    backoff = Duration::ZERO;
                } else {
                    pending = true;
                    backoff = (backoff * 2).clamp(BACKOFF_START, BACKOFF_MAX);
                    log::info!("retrying in {}ms", backoff.as_millis());
                }
            }
        }
        if self.opts.keep_on_exit {
            log::info!(
                "leaving our entry and binaries in place (the next installer takes over; \
                 uninstall with --remove-on-exit or --uninstall)"
            );
            self.update_ready(&State::Blocked("shutting down".into()));
            return Ok(());
        }
        self.uninstall()
    }

    /// Watches the links and symlink targets on the way to the conf dir and its configs. True
    /// when the conf dir's watch had to move (a pass is due: it may have read the old one).
    fn refresh_watches(&self, inotify: &Inotify, watches: &mut watch::Watches) -> bool {
        let names = self.config_names().unwrap_or_default();
        let moved = watches.refresh(inotify, &self.opts.conf_dir, &names);
        if moved {
            log::info!(
                "{} now leads somewhere else; watching it there",
                self.opts.conf_dir.display()
            );
            watches.watch_conf(inotify, &self.opts.conf_dir);
        }
        moved
    }

    /// A reconcile whose errors are logged, not fatal: the next event or resync retries.
    /// False when something failed (logged): the caller backs off before the next pass.
    fn pass(&mut self) -> bool {
        self.touch_alive();
        let mut ok = true;
        if let Err(e) = self.restore_binaries() {
            log::error!("{e}");
            ok = false;
        }
        if let Err(e) = self.reconcile() {
            log::error!("{e}");
            self.last = None;
            self.update_ready(&State::Blocked(e.to_string()));
            ok = false;
        }
        ok
    }
}

/// `--probe ready|alive`: exit status for a kubelet exec probe. `alive` fails when the loop has
/// not refreshed its file for `max_age` (a stuck installer).
pub fn probe(health_dir: &Path, what: &str, max_age: Duration) -> Result<(), InstallError> {
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
            crate::logging::init("tproxy-cni-install", level, None);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    }

    #[test]
    fn replace_checked_never_replaces_unread_content() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("10-x.conflist");
        std::fs::write(&path, b"v1").unwrap();
        // What we read is what is there: ours goes in, mode kept, nothing left behind.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        assert_eq!(
            replace_checked(&path, b"v1", b"v1+ours").unwrap(),
            Swap::Written
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"v1+ours");
        assert_eq!(files::mode_of(&path), Some(0o600));
        assert_eq!(names(d.path()), ["10-x.conflist"]);
        // The file changed after our read (we read v1, v2 is there): v2 stays, same inode (an
        // in-place writer keeps writing where the runtime reads), and the caller retries.
        std::fs::write(&path, b"v2").unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
        assert_eq!(
            replace_checked(&path, b"v1", b"v1+ours").unwrap(),
            Swap::Raced
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"v2");
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap()),
            ino
        );
        assert_eq!(names(d.path()), ["10-x.conflist"]);
        // Gone meanwhile: raced, nothing created.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            replace_checked(&path, b"v2", b"v2+ours").unwrap(),
            Swap::Raced
        );
        assert!(names(d.path()).is_empty());
    }
}
