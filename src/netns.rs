//! The only place that calls `setns`: runs a closure on a short-lived thread inside a netns.
//!
//! Pitfall 7: a thread that entered another netns must never run unrelated code afterwards, so
//! each call gets a fresh scoped thread that exits when the closure returns.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The netns path is empty or no longer exists (a DEL after the sandbox went away).
    #[error("network namespace {0:?} does not exist")]
    Gone(PathBuf),
    #[error("opening network namespace {path:?}: {err}")]
    Open { path: PathBuf, err: io::Error },
    #[error("entering network namespace {path:?}: {err} (is it a network namespace?)")]
    Enter { path: PathBuf, err: nix::Error },
    #[error("the thread inside network namespace {0:?} panicked")]
    Panicked(PathBuf),
}

/// Runs `f` inside the network namespace at `path` and returns its result.
pub fn run_in<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    if path.as_os_str().is_empty() {
        return Err(NetnsError::Gone(path.to_path_buf()));
    }
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(NetnsError::Gone(path.to_path_buf()))
        }
        Err(err) => {
            return Err(NetnsError::Open {
                path: path.to_path_buf(),
                err,
            })
        }
    };
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
