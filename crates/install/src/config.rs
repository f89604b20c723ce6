//! Which config the runtime uses, and our entry in it: the conf dir's listing, the choice of
//! the file to patch, one reconcile pass over it, and removing our entries.

use serde_json::Value;
use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{
    chained, compat, conflist, files, io_err, replace_checked, InstallError, Installer, Runtime,
    State, Swap, READY_FILE,
};

/// A config file as read for a pass.
pub(crate) struct Config {
    /// Its name in the conf dir (bytes: names need not be UTF-8).
    pub(crate) name: OsString,
    /// The name is a symlink; `real` is where it points.
    pub(crate) linked: bool,
    /// The file we read and write (symlinks followed: the runtime reads through them).
    pub(crate) real: PathBuf,
    pub(crate) bytes: Vec<u8>,
    pub(crate) value: Value,
}

/// The conf dir's configs, primaries and our chained copies apart (each in byte order).
#[derive(Default)]
pub(crate) struct Listing {
    pub(crate) foreign: Vec<OsString>,
    /// Name, and the source it records.
    pub(crate) chained: Vec<(OsString, String)>,
}

/// What reading one candidate gave.
pub(crate) enum Loaded {
    Valid(Config),
    /// Why a runtime would not load it (one line, names the file).
    Invalid(String),
    /// Gone between readdir and read.
    Vanished,
}

/// One attempt of a reconcile pass.
pub(crate) enum Pass {
    Done(State),
    /// The primary changed under us (renamed, or rewritten between read and write); retry.
    Raced(String),
}

impl Installer {
    /// Names of the config files in the conf dir, in byte order (Go's `sort.Strings`, what
    /// containerd and CRI-O use; names are bytes and need not be UTF-8, docs/ARCHITECTURE.md,
    /// pitfall 71). Symlinks count even when their target is missing here: the runtime lists
    /// them too (and may resolve them).
    pub(crate) fn config_names(&self) -> Result<Vec<OsString>, InstallError> {
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
    pub(crate) fn listing(&self) -> Result<Listing, InstallError> {
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
    pub(crate) fn missing_binaries(&self, config: &Value) -> Vec<String> {
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
    pub(crate) fn load(&self, name: &OsStr) -> Result<Loaded, InstallError> {
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
    pub(crate) fn select(&self) -> Result<Result<Config, Pass>, InstallError> {
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
    pub(crate) fn reconcile(&mut self) -> Result<State, InstallError> {
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
    pub(crate) fn foreign_entry(&self, real: &Path, value: &Value, name: &OsStr) -> Option<State> {
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

    pub(crate) fn reconcile_once(&mut self) -> Result<Pass, InstallError> {
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

    /// Removes our entry from every config in the conf dir that has one, then the ready file.
    /// Keeps going past errors (a malformed file must not stop the others) and reports the first.
    pub(crate) fn remove_entries(&self) -> Result<(), InstallError> {
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
}
