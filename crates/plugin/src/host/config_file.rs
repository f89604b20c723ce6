//! Reading `--config FILE`: a regular file of bounded size, checked on the opened descriptor.
//!
//! The path comes from whoever runs the CLI (a unit file, a script). A FIFO would block the
//! open (and then the read) until a writer appears, a character device such as `/dev/zero`
//! never ends, and a huge file would be read whole into memory (docs/ARCHITECTURE.md,
//! pitfall 63). So the file is opened with `O_NONBLOCK` (a FIFO's open returns at once), its
//! type and size are taken from that descriptor (`fstat`: no window in which the path could
//! be swapped), and at most [`MAX_CONFIG`] + 1 bytes are ever read.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Largest `--config` accepted: a conflist entry is a few hundred bytes.
pub(crate) const MAX_CONFIG: u64 = 1024 * 1024;

/// The file's bytes, or a message naming what is wrong with it (the caller adds the path).
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(format!("{what}; --config takes a regular file"));
    }
    if meta.len() > MAX_CONFIG {
        return Err(too_big(meta.len()));
    }
    read_capped(file)
}

/// Reads at most [`MAX_CONFIG`] bytes; a file that grew past it since `fstat` is refused too.
fn read_capped(file: File) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    file.take(MAX_CONFIG + 1)
        .read_to_end(&mut buf)
        .map_err(|e| e.to_string())?;
    if buf.len() as u64 > MAX_CONFIG {
        return Err(too_big(buf.len() as u64));
    }
    Ok(buf)
}

fn too_big(len: u64) -> String {
    format!("{len} bytes or more, at most {MAX_CONFIG}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_only_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.json");
        std::fs::write(&ok, b"{}").unwrap();
        assert_eq!(read(&ok).unwrap(), b"{}");
        let e = read(dir.path()).unwrap_err();
        assert!(e.contains("a directory"), "{e}");
        let e = read(Path::new("/dev/zero")).unwrap_err();
        assert!(e.contains("character device"), "{e}");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Without O_NONBLOCK this open would block until a writer appears.
        let e = read(&fifo).unwrap_err();
        assert!(e.contains("a FIFO"), "{e}");
        let big = dir.path().join("big.json");
        let f = File::create(&big).unwrap();
        f.set_len(MAX_CONFIG + 1).unwrap();
        let e = read(&big).unwrap_err();
        assert!(e.contains("at most"), "{e}");
        f.set_len(MAX_CONFIG).unwrap();
        assert_eq!(read(&big).unwrap().len() as u64, MAX_CONFIG);
        let e = read(&dir.path().join("absent")).unwrap_err();
        assert!(e.contains("No such file"), "{e}");
    }
}
