//! What the daemon watches: the conf dir, every symlink on the way to it and to each config,
//! and the directories of symlinked configs' targets (docs/ARCHITECTURE.md, pitfall 72).
//!
//! inotify watches inodes, not paths: a watch added through a symlink stays on the directory
//! the link pointed to when it was added. So every link met while resolving the conf dir's
//! path (the dir itself, a parent such as MicroK8s' `current`) or a config's path (the file, a
//! ConfigMap's `..data`) is watched in the directory that holds it, by name; an event on such
//! a name, or a watched directory going away, makes the daemon re-resolve everything
//! (`Events::relink`) and run a pass.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, Inotify, WatchDescriptor};

use super::conflist;

/// The events that can change a config file (or a link) in a watched directory.
pub(crate) const FILE_EVENTS: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_ATTRIB);

/// Every watch uses one mask: adding a watch on a directory already watched replaces its mask,
/// so the conf dir's own `*_SELF` events must be part of every mask.
const MASK: AddWatchFlags = FILE_EVENTS
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF);

/// Longest chain of links followed (the kernel's own limit for a path is 40).
const MAX_LINKS: usize = 40;

/// Every symlink met while resolving `path`, as (directory holding it, its name), in order,
/// and where the path leads. Relative links resolve against their own directory.
pub(crate) fn links_on(path: &Path) -> (Vec<(PathBuf, OsString)>, PathBuf) {
    let mut links = Vec::new();
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    // Owned components, processed front to back (kept reversed for cheap pops).
    let mut owned: Vec<OsString> = Vec::new();
    let push_front = |owned: &mut Vec<OsString>, p: &Path| {
        for c in p.components().rev() {
            owned.push(c.as_os_str().to_os_string());
        }
    };
    push_front(&mut owned, &abs);
    let mut cur = PathBuf::from("/");
    while let Some(c) = owned.pop() {
        match Path::new(&c).components().next() {
            Some(Component::RootDir) => cur = PathBuf::from("/"),
            Some(Component::ParentDir) => {
                cur.pop();
            }
            Some(Component::Normal(name)) => {
                let next = cur.join(name);
                let is_link =
                    std::fs::symlink_metadata(&next).is_ok_and(|m| m.file_type().is_symlink());
                match (is_link, std::fs::read_link(&next)) {
                    (true, Ok(target)) if links.len() < MAX_LINKS => {
                        links.push((cur.clone(), name.to_os_string()));
                        push_front(&mut owned, &target);
                    }
                    _ => cur = next,
                }
            }
            _ => {}
        }
    }
    (links, cur)
}

/// What a batch of events was about.
#[derive(Debug, Default)]
pub(crate) struct Events {
    /// The conf dir itself went away or was replaced.
    pub dir_gone: bool,
    /// Some event named a config file (or had no name).
    pub configs: bool,
    /// A link on the path, or a watched directory, changed: re-resolve every watch.
    pub relink: bool,
}

/// The names that matter in one watched directory.
#[derive(Debug, Default)]
struct Interest {
    /// Targets of symlinked configs.
    files: HashSet<OsString>,
    /// Links on some path we resolve.
    links: HashSet<OsString>,
}

/// The daemon's watches.
#[derive(Debug, Default)]
pub(crate) struct Watches {
    conf: Option<WatchDescriptor>,
    /// Where the conf dir's path led when its watch was added.
    conf_real: Option<PathBuf>,
    dirs: HashMap<WatchDescriptor, Interest>,
}

impl Watches {
    /// True while the conf dir has a watch.
    pub(crate) fn has_conf(&self) -> bool {
        self.conf.is_some()
    }

    /// (Re)adds the conf dir's watch through whatever its path resolves to now; logs and
    /// leaves it unset when the dir is missing (retried on resync).
    pub(crate) fn watch_conf(&mut self, inotify: &Inotify, conf_dir: &Path) {
        // Resolved after the watch is added: a link re-pointed in between shows up as a
        // difference at the next `refresh`, never as a silently stale watch.
        let added = inotify.add_watch(conf_dir, MASK);
        self.conf_real = Some(links_on(conf_dir).1);
        match added {
            Ok(wd) => {
                if let Some(old) = self.conf.replace(wd) {
                    if old != wd && !self.dirs.contains_key(&old) {
                        let _ = inotify.rm_watch(old);
                    }
                }
            }
            Err(e) => {
                log::warn!("cannot watch {}: {e}", conf_dir.display());
                self.conf = None;
            }
        }
    }

    /// Forgets the conf dir's watch (it went away); `watch_conf` adds it again.
    pub(crate) fn lose_conf(&mut self) {
        self.conf = None;
    }

    /// Rebuilds the watches on links and symlink targets for the conf dir and `names` (the
    /// config names in it); watches no longer needed are removed. True when the conf dir's
    /// path now leads somewhere else than its watch (a link changed before its own watch was
    /// in place): the caller watches it again and runs a pass.
    pub(crate) fn refresh(
        &mut self,
        inotify: &Inotify,
        conf_dir: &Path,
        names: &[OsString],
    ) -> bool {
        let mut want: HashMap<PathBuf, Interest> = HashMap::new();
        let (conf_links, conf_real) = links_on(conf_dir);
        for (dir, name) in conf_links {
            want.entry(dir).or_default().links.insert(name);
        }
        for name in names {
            let (links, real) = links_on(&conf_dir.join(name));
            for (dir, link) in links {
                want.entry(dir).or_default().links.insert(link);
            }
            if let (Some(dir), Some(file)) = (real.parent(), real.file_name()) {
                if dir != conf_real {
                    want.entry(dir.to_path_buf())
                        .or_default()
                        .files
                        .insert(file.to_os_string());
                }
            }
        }
        let mut dirs: HashMap<WatchDescriptor, Interest> = HashMap::new();
        for (dir, interest) in want {
            // The same directory watched twice gives the same descriptor (the conf dir's
            // too: the mask is the same).
            match inotify.add_watch(&dir, MASK) {
                Ok(wd) => {
                    let e = dirs.entry(wd).or_default();
                    e.files.extend(interest.files);
                    e.links.extend(interest.links);
                }
                Err(e) => log::debug!("cannot watch {}: {e}", dir.display()),
            }
        }
        for old in self.dirs.keys() {
            if !dirs.contains_key(old) && Some(*old) != self.conf {
                let _ = inotify.rm_watch(*old);
            }
        }
        self.dirs = dirs;
        // Checked after the link watches are in place: a later change is an event.
        self.conf.is_some() && self.conf_real.as_deref() != Some(links_on(conf_dir).1.as_path())
    }

    /// Reads all pending events.
    pub(crate) fn drain(&self, inotify: &Inotify) -> Events {
        let mut out = Events::default();
        let mut seen = HashSet::new();
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for ev in events {
                let gone = ev.mask.intersects(
                    AddWatchFlags::IN_DELETE_SELF
                        | AddWatchFlags::IN_MOVE_SELF
                        | AddWatchFlags::IN_IGNORED,
                );
                let interest = self.dirs.get(&ev.wd);
                if let (Some(i), Some(name)) = (interest, ev.name.as_ref()) {
                    if i.links.contains(name) {
                        out.relink = true;
                        out.configs = true;
                    }
                    if i.files.contains(name) {
                        out.configs = true;
                    }
                }
                if Some(ev.wd) != self.conf {
                    // A directory on some path went away: resolve again.
                    if gone && interest.is_some() {
                        out.relink = true;
                        out.configs = true;
                    }
                    continue;
                }
                if gone {
                    out.dir_gone = true;
                }
                match ev.name {
                    Some(name) => {
                        if conflist::is_config_os(&name) {
                            out.configs = true;
                        }
                        seen.insert(name);
                    }
                    None => out.configs = true,
                }
            }
        }
        if !seen.is_empty() {
            log::debug!("conf dir events for {seen:?}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_on_the_way_are_found_and_followed() {
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        std::fs::create_dir_all(root.join("rev1/net.d")).unwrap();
        symlink("rev1", root.join("current")).unwrap();
        symlink(root.join("current/net.d"), root.join("conf")).unwrap();
        let (links, real) = links_on(&root.join("conf"));
        assert_eq!(real, root.join("rev1/net.d"));
        assert_eq!(
            links,
            [
                (root.clone(), OsString::from("conf")),
                (root.clone(), OsString::from("current"))
            ]
        );
        // ConfigMap layout: file -> ..data/file, ..data -> ..2024
        let cm = root.join("cm");
        std::fs::create_dir_all(cm.join("..2024")).unwrap();
        std::fs::write(cm.join("..2024/10-x.conflist"), b"{}").unwrap();
        symlink("..2024", cm.join("..data")).unwrap();
        symlink("..data/10-x.conflist", cm.join("10-x.conflist")).unwrap();
        let (links, real) = links_on(&cm.join("10-x.conflist"));
        assert_eq!(real, cm.join("..2024/10-x.conflist"));
        assert_eq!(
            links,
            [
                (cm.clone(), OsString::from("10-x.conflist")),
                (cm.clone(), OsString::from("..data"))
            ]
        );
        // A loop ends.
        symlink("loop", root.join("loop")).unwrap();
        let (links, _) = links_on(&root.join("loop"));
        assert_eq!(links.len(), MAX_LINKS);
    }
}
