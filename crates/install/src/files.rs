//! File operations of the installer: atomic writes and binary copies that a runtime never sees half-done.
//!
//! Both go through a dot-named temporary file in the destination directory, then `rename(2)`:
//! same directory means same file system, so the rename is atomic, and the dot name plus the
//! `.tmp` suffix keep runtimes (which load `.conf`/`.conflist`/`.json`) from ever loading it.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A temporary path next to `dest`, unique per process and call. Names are bytes (a config
/// name need not be UTF-8; docs/ARCHITECTURE.md, pitfall 71).
fn temp_path(dir: &Path, name: &OsStr) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{}.{n}.tmp", std::process::id()));
    dir.join(tmp)
}

/// Writes `bytes` to a new temporary file next to `dir/name` (mode `mode`, synced) and returns
/// its path. The name starts with a dot and ends in `.tmp`: never a config name.
pub(crate) fn write_temp(
    dir: &Path,
    name: impl AsRef<OsStr>,
    bytes: &[u8],
    mode: u32,
) -> io::Result<PathBuf> {
    let tmp = temp_path(dir, name.as_ref());
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // The umask may have cleared bits of `mode`; binaries must end up exactly 0755.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        // Durable before visible: a node crash must not leave a renamed but empty config.
        f.sync_all()
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Makes renames in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to `dir/name` atomically with permission bits `mode`.
pub(crate) fn atomic_write(
    dir: &Path,
    name: impl AsRef<OsStr>,
    bytes: &[u8],
    mode: u32,
) -> io::Result<()> {
    let tmp = write_temp(dir, name.as_ref(), bytes, mode)?;
    let result = fs::rename(&tmp, dir.join(name.as_ref())).and_then(|()| sync_dir(dir));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Swaps two directory entries atomically (`renameat2(RENAME_EXCHANGE)`): each name then points
/// at the other's inode. Both must exist, on one file system. File systems without the flag
/// give `EINVAL`; see [`exchange_unsupported`].
pub(crate) fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths that outlive the call; no memory is handed over.
    // Raw syscall because the libc wrapper is missing on musl, which the image links.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// True when `exchange` failed because the kernel or file system lacks `RENAME_EXCHANGE`.
pub(crate) fn exchange_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

/// What `copy_binary` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Copied {
    Installed,
    /// The destination already had the same bytes and mode 0755.
    Unchanged,
}

/// Copies the executable `src` into `dir` under its own file name, atomically, mode 0755.
/// Replacing a binary a runtime is executing is safe: the old inode lives until it exits.
pub(crate) fn copy_binary(src: &Path, dir: &Path) -> io::Result<(PathBuf, Copied)> {
    let name = src.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "binary path has no file name")
    })?;
    let dest = dir.join(name);
    let bytes = fs::read(src)?;
    if let (Ok(old), Ok(meta)) = (fs::read(&dest), fs::metadata(&dest)) {
        if old == bytes && meta.permissions().mode() & 0o7777 == 0o755 {
            return Ok((dest, Copied::Unchanged));
        }
    }
    atomic_write(dir, name, &bytes, 0o755)?;
    Ok((dest, Copied::Installed))
}

/// Permission bits of an existing file, to keep them when we rewrite it (some primaries use 0600).
pub(crate) fn mode_of(path: &Path) -> Option<u32> {
    fs::metadata(path)
        .ok()
        .map(|m| m.permissions().mode() & 0o7777)
}

/// Removes a file; a file that is already gone is success (uninstall must be re-runnable).
pub(crate) fn remove_if_present(path: &Path) -> io::Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_and_copy() {
        let d = tempfile::tempdir().unwrap();
        atomic_write(d.path(), "a.conflist", b"{}", 0o600).unwrap();
        assert_eq!(fs::read(d.path().join("a.conflist")).unwrap(), b"{}");
        assert_eq!(mode_of(&d.path().join("a.conflist")), Some(0o600));
        let src = d.path().join("tool");
        fs::write(&src, b"#!/bin/sh\n").unwrap();
        let bin = d.path().join("bin");
        fs::create_dir(&bin).unwrap();
        assert_eq!(copy_binary(&src, &bin).unwrap().1, Copied::Installed);
        assert_eq!(copy_binary(&src, &bin).unwrap().1, Copied::Unchanged);
        assert_eq!(mode_of(&bin.join("tool")), Some(0o755));
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(&bin)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["tool"]);
        assert!(remove_if_present(&bin.join("tool")).unwrap());

        // Exchange swaps contents (inodes) both ways.
        fs::write(d.path().join("x"), b"x").unwrap();
        fs::write(d.path().join("y"), b"y").unwrap();
        exchange(&d.path().join("x"), &d.path().join("y")).unwrap();
        assert_eq!(fs::read(d.path().join("x")).unwrap(), b"y");
        assert_eq!(fs::read(d.path().join("y")).unwrap(), b"x");
        let e = exchange(&d.path().join("x"), &d.path().join("missing")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(!remove_if_present(&bin.join("tool")).unwrap());
    }
}

/// What `replace_checked` did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Swap {
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
pub(crate) fn replace_checked(path: &Path, before: &[u8], desired: &[u8]) -> std::io::Result<Swap> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file path",
        ));
    };
    let mode = mode_of(path).unwrap_or(0o644);
    let tmp = write_temp(dir, name, desired, mode)?;
    // What the path holds as far as we know, and what we are about to put there.
    let mut believed = before.to_vec();
    let mut in_tmp = desired.to_vec();
    for round in 0..SWAP_ROUNDS {
        match exchange(&tmp, path) {
            Ok(()) => {}
            Err(e) if round == 0 && exchange_unsupported(&e) => {
                let result = match std::fs::read(path) {
                    Ok(now) if now == before => std::fs::rename(&tmp, path)
                        .and_then(|()| sync_dir(dir))
                        .map(|()| Swap::Written),
                    Ok(_) => Ok(Swap::Raced),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Swap::Raced),
                    Err(e) => Err(e),
                };
                let _ = remove_if_present(&tmp);
                return result;
            }
            Err(e) => {
                let _ = remove_if_present(&tmp);
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
            remove_if_present(&tmp)?;
            sync_dir(dir)?;
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
