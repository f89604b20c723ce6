//! Tests of the installer's own logic (the daemon loop runs in tests/install_*.rs).

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
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
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
