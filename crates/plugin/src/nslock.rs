//! One writer per network namespace: ADD, DEL, CHECK (plugin) and every host CLI command hold
//! an exclusive `flock` on a file named after the netns's device and inode while they touch it,
//! so two callers with different policies never interleave and the end state is one caller's
//! whole plan (docs/ARCHITECTURE.md, pitfall 73).
//!
//! - The file is `/run/tproxy-cni/locks/<dev>-<ino>` (`/run` is a tmpfs: nothing survives a
//!   reboot, when the namespaces are gone too).
//! - Lock files do not accumulate: the holder unlinks its file before it lets go. A waiter that
//!   then gets the lock on the unlinked inode sees that the name no longer leads to its inode
//!   and starts over, so two holders can never hold two different inodes of one name.
//! - The wait is bounded (`WAIT`, polling); on timeout the caller fails with an error naming
//!   the namespace and the lock file (CNI code 11, "try again later").

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// Where the lock files live.
pub const LOCK_DIR: &str = "/run/tproxy-cni/locks";

/// Longest wait for another caller on the same netns. An ADD or DEL takes milliseconds; a
/// runtime's own CNI timeout is minutes, so this only ends a wait for a stuck process.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error(
        "another tproxy-cni process has held the lock on this network namespace for {}s ({}); \
         try again later",
        waited.as_secs(),
        path.display()
    )]
    Busy { path: PathBuf, waited: Duration },
}

/// Held for as long as it lives; unlinks its file, then unlocks, on drop.
#[derive(Debug)]
pub struct NetnsLock {
    path: PathBuf,
    _lock: Flock<File>,
}

impl Drop for NetnsLock {
    fn drop(&mut self) {
        // While still holding: a waiter on this inode notices the unlink and starts over.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The lock file for the namespace `ns` (an open namespace file) in `dir`.
pub(crate) fn lock_path(dir: &Path, ns: &File) -> std::io::Result<PathBuf> {
    let m = ns.metadata()?;
    Ok(dir.join(format!("{:x}-{}", m.dev(), m.ino())))
}

/// Takes the exclusive lock for the namespace `ns`, waiting up to `wait`.
pub(crate) fn lock(dir: &Path, ns: &File, wait: Duration) -> Result<NetnsLock, LockError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |err| LockError::Io { path, err }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    let path = lock_path(dir, ns).map_err(io(dir))?;
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io(&path))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(held) => {
                // Still the file the name leads to? (The last holder may have unlinked it.)
                let same = match (held.metadata(), std::fs::symlink_metadata(&path)) {
                    (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
                    _ => false,
                };
                if same {
                    return Ok(NetnsLock { path, _lock: held });
                }
                // Unlinked under us: drop it and take the new one.
                continue;
            }
            Err((_, Errno::EWOULDBLOCK)) => {}
            Err((_, Errno::EINTR)) => continue,
            Err((_, e)) => return Err(io(&path)(std::io::Error::from(e))),
        }
        if start.elapsed() >= wait {
            return Err(LockError::Busy {
                path,
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_bounded_and_leaves_no_file() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("locks");
        let ns = File::open("/proc/self/ns/net").unwrap();
        let held = lock(&dir, &ns, WAIT).unwrap();
        let path = lock_path(&dir, &ns).unwrap();
        assert!(path.exists());
        // A second caller waits, then gives up with the path in the message.
        let e = lock(&dir, &ns, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(e, LockError::Busy { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        // Released: the file is gone, and the next caller gets the lock at once.
        drop(held);
        assert!(!path.exists());
        let again = lock(&dir, &ns, Duration::from_millis(50)).unwrap();
        drop(again);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[test]
    fn waiters_serialise_and_never_overlap() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("locks");
        let inside = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..20 {
                        let ns = File::open("/proc/self/ns/net").unwrap();
                        let _l = lock(&dir, &ns, WAIT).unwrap();
                        let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_micros(200));
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert_eq!(most.load(Ordering::SeqCst), 1);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }
}
