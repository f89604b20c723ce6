//! The daemon loop: binaries in place, passes on inotify events and on the resync timer with
//! a backoff after failures, the health files, and what happens on SIGTERM.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{InitFlags, Inotify};

use crate::{
    conflist, files, io_err, reconcile, watch, InstallError, Installer, Options, State, ALIVE_FILE,
    READY_FILE, REASON_FILE,
};

/// First and longest wait after a failed pass.
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl Installer {
    pub(crate) fn new(opts: Options) -> Result<Installer, InstallError> {
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

    /// Copies every binary into the bin dir (atomic, 0755, skipped when identical).
    pub(crate) fn install_binaries(&self) -> Result<(), InstallError> {
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
    pub(crate) fn restore_binaries(&self) -> Result<(), InstallError> {
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

    pub(crate) fn report(&mut self, state: &State) {
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
    pub(crate) fn update_ready(&self, state: &State) {
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

    pub(crate) fn touch_alive(&self) {
        if let Some(dir) = &self.opts.health_dir {
            let path = dir.join(ALIVE_FILE);
            if let Err(e) = std::fs::write(&path, b"") {
                log::error!("{}: {e}", path.display());
            }
        }
    }

    /// Removes the binaries we installed (after the entries: a runtime must never find an
    /// entry whose binary is missing, or every pod ADD on the node fails).
    pub(crate) fn remove_binaries(&self) -> Result<(), InstallError> {
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
    pub(crate) fn uninstall(&self) -> Result<(), InstallError> {
        let entries = self.remove_entries();
        // Binaries go only once no config references them any more.
        entries?;
        self.remove_binaries()
    }

    /// Installs, then watches until SIGTERM/SIGINT; then uninstalls unless `keep_on_exit`.
    pub(crate) fn run(mut self) -> Result<(), InstallError> {
        let sig_read = signal_pipe()?;
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
            let (conf_event, signal, cache_event) =
                wait_events(&inotify, &sig_read, cache_watch.as_ref(), ms)?;
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
    pub(crate) fn refresh_watches(&self, inotify: &Inotify, watches: &mut watch::Watches) -> bool {
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
    pub(crate) fn pass(&mut self) -> bool {
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

/// A self-pipe that SIGTERM and SIGINT write to: its read end polls with the watches.
fn signal_pipe() -> Result<UnixStream, InstallError> {
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
    Ok(sig_read)
}

/// Waits up to `ms` for the conf dir's watches, a signal or the pods' cache watch; which of
/// them are readable (none on a timeout or an interrupted poll).
fn wait_events(
    inotify: &Inotify,
    sig_read: &UnixStream,
    cache_watch: Option<&reconcile::CacheWatch>,
    ms: u16,
) -> Result<(bool, bool, bool), InstallError> {
    let mut fds = vec![
        PollFd::new(inotify.as_fd(), PollFlags::POLLIN),
        PollFd::new(sig_read.as_fd(), PollFlags::POLLIN),
    ];
    if let Some(w) = cache_watch {
        fds.push(PollFd::new(w.fd(), PollFlags::POLLIN));
    }
    match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) => Ok((
            fds[0].any().unwrap_or(false),
            fds[1].any().unwrap_or(false),
            fds.get(2).and_then(|f| f.any()).unwrap_or(false),
        )),
        Err(nix::errno::Errno::EINTR) => Ok((false, false, false)),
        Err(e) => Err(InstallError::Sys("poll", e)),
    }
}
