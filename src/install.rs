//! The node installer: copies the plugin binary, chains our entry into the primary conflist, keeps it there, removes it on exit.
//!
//! - `conflist`: the pure patching rules (which file, where our entry goes, what is kept).
//! - `files`: atomic writes and binary copies.
//! - `cli`: flags -> `Command`.
//! - `logger`: stderr logger.
//!
//! The daemon loop is event-driven: inotify on the conf dir plus a self-pipe for SIGTERM/SIGINT,
//! both in one `poll(2)`. A periodic resync (default 10 s) refreshes the liveness file, copies
//! back a binary that vanished from the bin dir (not watched) and catches anything inotify
//! cannot see (e.g. a conf dir deleted and re-created, or replaced by a bind mount).

pub mod cli;
pub mod conflist;
pub mod files;

use serde_json::{Map, Value};
use std::collections::HashSet;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

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
    /// On SIGTERM keep the entry and the binaries (upgrades: the next pod takes over).
    pub keep_on_exit: bool,
    /// Directory for the `ready` and `alive` probe files; `None` disables them.
    pub health_dir: Option<PathBuf>,
    /// How often the loop wakes without events (liveness, safety-net reconcile).
    pub resync: Duration,
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
    /// The primary cannot be patched (malformed, or the conversion target is foreign); the
    /// message names the file. We wait for it to change.
    Blocked(String),
}

/// One attempt of a reconcile pass.
enum Pass {
    Done(State),
    /// The primary changed under us (renamed, or rewritten between read and write); retry.
    Raced(String),
}

/// Health file names inside `health_dir`.
pub const READY_FILE: &str = "ready";
pub const ALIVE_FILE: &str = "alive";

/// The installer's state between passes.
pub struct Installer {
    opts: Options,
    entry: Map<String, Value>,
    /// The last state logged, so a waiting or blocked installer logs once per change, not per wake.
    last: Option<State>,
}

impl Installer {
    pub fn new(opts: Options) -> Result<Installer, InstallError> {
        let entry = conflist::entry(&opts.settings).map_err(|source| InstallError::Config {
            path: PathBuf::from("--settings"),
            source,
        })?;
        Ok(Installer {
            opts,
            entry,
            last: None,
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

    /// Names of the config files in the conf dir (regular files, UTF-8 names).
    fn config_names(&self) -> Result<Vec<String>, InstallError> {
        let dir = &self.opts.conf_dir;
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            // Follows symlinks like the runtime does; directories are not configs.
            if conflist::is_config_name(&name) && dir.join(&name).is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// One pass: make sure our entry is in the primary config. Writes only when something
    /// changes, re-reads the file right before writing so a concurrent rewrite by the primary
    /// CNI is never clobbered (it is retried instead).
    pub fn reconcile(&mut self) -> Result<State, InstallError> {
        let mut attempt = 0;
        let state = loop {
            match self.reconcile_once()? {
                Pass::Done(state) => break state,
                // The primary CNI is writing right now: give it a moment, a few times, then
                // leave it to the watch (its close/rename event brings us back).
                Pass::Raced(msg) if attempt >= 5 => break State::Blocked(msg),
                Pass::Raced(_) => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        self.report(&state);
        self.update_ready(&state);
        Ok(state)
    }

    fn reconcile_once(&self) -> Result<Pass, InstallError> {
        let dir = &self.opts.conf_dir;
        let names = self.config_names()?;
        let Some(primary) = conflist::select_primary(names.iter().map(String::as_str)) else {
            return Ok(Pass::Done(State::NoPrimary));
        };
        let path = dir.join(primary);
        let before = match std::fs::read(&path) {
            Ok(b) => b,
            // Renamed or deleted between readdir and read: the watch brings us back.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Pass::Raced(format!(
                    "{} vanished while reading",
                    path.display()
                )))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let config = match conflist::parse(&before) {
            Ok(c) => c,
            Err(e) => {
                return Ok(Pass::Done(State::Blocked(format!(
                    "{}: {e}; left untouched, retrying when it changes",
                    path.display()
                ))))
            }
        };
        let patched = match conflist::inject(&config, &self.entry) {
            Ok(None) => return Ok(Pass::Done(State::Ready(primary.to_string()))),
            Ok(Some(p)) => p,
            Err(e) => {
                return Ok(Pass::Done(State::Blocked(format!(
                    "{}: {e}; left untouched, retrying when it changes",
                    path.display()
                ))))
            }
        };
        let target = conflist::target_name(primary, &config);
        let target_path = dir.join(&target);
        if target != primary {
            // A lone .conf becomes <stem>.conflist. Never overwrite a list someone else owns:
            // only one we wrote before (it holds our entry) may be replaced.
            if let Ok(existing) = std::fs::read(&target_path) {
                let ours = conflist::parse(&existing)
                    .map(|c| conflist::contains_ours(&c))
                    .unwrap_or(false);
                if !ours {
                    return Ok(Pass::Done(State::Blocked(format!(
                        "{}: converting it would overwrite {}, which is not ours; fix the conf dir",
                        path.display(),
                        target_path.display()
                    ))));
                }
            }
        }
        // Optimistic concurrency: if the primary CNI wrote in the meantime, start over.
        match std::fs::read(&path) {
            Ok(now) if now == before => {}
            _ => {
                return Ok(Pass::Raced(format!(
                    "{} kept changing while we patched it",
                    path.display()
                )))
            }
        }
        let mode = files::mode_of(&path).unwrap_or(0o644);
        files::atomic_write(dir, &target, &conflist::render(&patched), mode)
            .map_err(io_err(&target_path))?;
        if target != primary {
            files::remove_if_present(&path).map_err(io_err(&path))?;
            log::info!(
                "converted {} into {} and added our entry",
                path.display(),
                target_path.display()
            );
        } else {
            log::info!("added our entry to {}", path.display());
        }
        Ok(Pass::Done(State::Ready(target)))
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
        }
        self.last = Some(state.clone());
    }

    fn update_ready(&self, state: &State) {
        let Some(dir) = &self.opts.health_dir else {
            return;
        };
        let path = dir.join(READY_FILE);
        let res = match state {
            State::Ready(name) => std::fs::write(&path, format!("{name}\n")),
            _ => files::remove_if_present(&path).map(|_| ()),
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
        let names = match self.config_names() {
            Ok(n) => n,
            Err(InstallError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        let mut first_err = None;
        for name in names {
            let path = dir.join(&name);
            let result = (|| -> Result<(), InstallError> {
                let bytes = std::fs::read(&path).map_err(io_err(&path))?;
                let config = conflist::parse(&bytes).map_err(|source| InstallError::Config {
                    path: path.clone(),
                    source,
                })?;
                if let Some(cleaned) =
                    conflist::remove(&config).map_err(|source| InstallError::Config {
                        path: path.clone(),
                        source,
                    })?
                {
                    let mode = files::mode_of(&path).unwrap_or(0o644);
                    files::atomic_write(dir, &name, &conflist::render(&cleaned), mode)
                        .map_err(io_err(&path))?;
                    log::info!("removed our entry from {}", path.display());
                }
                Ok(())
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
        let mut watching = self.watch(&inotify);
        self.pass();
        let mut last_pass = Instant::now();
        loop {
            let timeout = self
                .opts
                .resync
                .saturating_sub(last_pass.elapsed())
                .max(Duration::from_millis(10));
            let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
            let (mut conf_event, mut signal) = (false, false);
            {
                let mut fds = [
                    PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
                    PollFd::new(sig_read.as_fd(), PollFlags::POLLIN),
                ];
                match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
                    Ok(_) => {
                        conf_event = fds[0].any().unwrap_or(false);
                        signal = fds[1].any().unwrap_or(false);
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
                if drain(&inotify) {
                    // The conf dir itself went away or was replaced: re-establish the watch.
                    watching = false;
                }
            }
            if !watching {
                watching = self.watch(&inotify);
            }
            if conf_event || last_pass.elapsed() >= self.opts.resync {
                self.pass();
                last_pass = Instant::now();
            }
        }
        if self.opts.keep_on_exit {
            log::info!("--keep-on-exit: leaving our entry and binaries in place");
            if let Some(dir) = &self.opts.health_dir {
                let _ = files::remove_if_present(&dir.join(READY_FILE));
            }
            return Ok(());
        }
        self.uninstall()
    }

    /// Adds the conf-dir watch; false (logged) when the dir is missing, retried on resync.
    fn watch(&self, inotify: &Inotify) -> bool {
        let mask = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF;
        match inotify.add_watch(&self.opts.conf_dir, mask) {
            Ok(_) => true,
            Err(e) => {
                log::warn!("cannot watch {}: {e}", self.opts.conf_dir.display());
                false
            }
        }
    }

    /// A reconcile whose errors are logged, not fatal: the next event or resync retries.
    fn pass(&mut self) {
        self.touch_alive();
        if let Err(e) = self.restore_binaries() {
            log::error!("{e}");
        }
        if let Err(e) = self.reconcile() {
            log::error!("{e}");
            self.last = None;
            self.update_ready(&State::Blocked(String::new()));
        }
    }
}

/// Reads all pending inotify events; true when the watched directory itself is gone.
fn drain(inotify: &Inotify) -> bool {
    let mut dir_gone = false;
    let mut seen = HashSet::new();
    while let Ok(events) = inotify.read_events() {
        if events.is_empty() {
            break;
        }
        for ev in events {
            if ev.mask.intersects(
                AddWatchFlags::IN_DELETE_SELF
                    | AddWatchFlags::IN_MOVE_SELF
                    | AddWatchFlags::IN_IGNORED,
            ) {
                dir_gone = true;
            }
            if let Some(name) = ev.name {
                seen.insert(name);
            }
        }
    }
    if !seen.is_empty() {
        log::debug!("conf dir events for {seen:?}");
    }
    dir_gone
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
        InstallError::Usage(if e.kind() == std::io::ErrorKind::NotFound {
            format!("not {what}: {} does not exist", path.display())
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
            if mode == cli::Mode::Once {
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
                        State::NoPrimary => {
                            Err(InstallError::Usage("no CNI config to chain into".into()))
                        }
                        State::Blocked(m) => Err(InstallError::Usage(m)),
                    }
                }
                cli::Mode::Uninstall => installer.uninstall(),
            }
        }
    }
}
