//! The only place that calls `setns`: runs a closure on a short-lived thread inside a netns.
//!
//! docs/ARCHITECTURE.md, pitfall 7: a thread that entered another netns must never run
//! unrelated code afterwards, so
//! each call gets a fresh scoped thread that exits when the closure returns.
//!
//! The path comes from the runtime (`CNI_NETNS`) and is opened without ever blocking: first
//! with `O_PATH` (no open side effect, a FIFO does not wait for a writer), checked to be a
//! namespace file (nsfs), and only then opened for `setns`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The netns path is empty or no longer exists (a DEL after the sandbox went away).
    #[error("CNI_NETNS {}: network namespace does not exist", show(.0))]
    Gone(PathBuf),
    #[error("CNI_NETNS {}: opening network namespace: {err}", show(path))]
    Open { path: PathBuf, err: io::Error },
    /// The path exists but is no namespace file (a FIFO, a plain file, a directory, ...).
    #[error(
        "CNI_NETNS {}: not a network namespace: it is {what}, not a namespace file (nsfs)",
        show(path)
    )]
    NotNamespace { path: PathBuf, what: &'static str },
    #[error(
        "CNI_NETNS {}: entering network namespace: {err} (is it a network namespace?)",
        show(path)
    )]
    Enter { path: PathBuf, err: nix::Error },
    #[error("CNI_NETNS {}: the thread inside the network namespace panicked", show(.0))]
    Panicked(PathBuf),
    /// Another caller holds the namespace's lock (`crate::nslock`) for too long, or the lock
    /// file cannot be made.
    #[error("CNI_NETNS {}: {err}", show(path))]
    Lock {
        path: PathBuf,
        err: crate::nslock::LockError,
    },
}

fn show(p: &Path) -> String {
    tproxy_cni_policy::echo(&p.to_string_lossy())
}

/// Runs `f` inside the network namespace at `path` and returns its result.
pub fn run_in<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    if path.as_os_str().is_empty() {
        return Err(NetnsError::Gone(path.to_path_buf()));
    }
    let file = open_namespace(path)?;
    enter(path, &file, f)
}

/// `run_in` holding the namespace's lock (`crate::nslock`) around `f`: what every caller that
/// changes or verifies our objects in a netns uses, so one netns has one writer at a time.
pub(crate) fn run_locked<T: Send>(
    path: &Path,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetnsError> {
    if path.as_os_str().is_empty() {
        return Err(NetnsError::Gone(path.to_path_buf()));
    }
    let file = open_namespace(path)?;
    let _held = lock_namespace(path, &file)?;
    enter(path, &file, f)
}

/// Takes the lock for the open namespace file `file` (opened from `path`).
pub fn lock_namespace(path: &Path, file: &File) -> Result<crate::nslock::NetnsLock, NetnsError> {
    crate::nslock::lock(
        Path::new(crate::nslock::LOCK_DIR),
        file,
        crate::nslock::WAIT,
    )
    .map_err(|err| NetnsError::Lock {
        path: path.to_path_buf(),
        err,
    })
}

fn enter<T: Send>(path: &Path, file: &File, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|err| NetnsError::Enter {
                path: path.to_path_buf(),
                err,
            })?;
            Ok(f())
        });
        match h.join() {
            Ok(r) => r,
            Err(_) => Err(NetnsError::Panicked(path.to_path_buf())),
        }
    })
}

/// Opens `path` for `setns` after checking, without blocking, that it is a namespace file.
fn open_namespace(path: &Path) -> Result<File, NetnsError> {
    let open_err = |err: io::Error| {
        if err.kind() == io::ErrorKind::NotFound {
            NetnsError::Gone(path.to_path_buf())
        } else {
            NetnsError::Open {
                path: path.to_path_buf(),
                err,
            }
        }
    };
    let not_ns = |f: &File| NetnsError::NotNamespace {
        path: path.to_path_buf(),
        what: describe(f),
    };
    let probe = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    if !is_nsfs(&probe) {
        return Err(not_ns(&probe));
    }
    // Now a namespace file: opening it reads nothing and cannot block. O_NONBLOCK still covers
    // a path swapped for a FIFO in between, which the second check then refuses.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    if !is_nsfs(&file) {
        return Err(not_ns(&file));
    }
    Ok(file)
}

fn is_nsfs(f: &File) -> bool {
    fstatfs(f.as_fd()).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
}

/// What a non-namespace file is, for the error message.
fn describe(f: &File) -> &'static str {
    let Ok(m) = f.metadata() else {
        return "unreadable";
    };
    let t = m.file_type();
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_file() {
        "a regular file"
    } else {
        "another kind of file"
    }
}
