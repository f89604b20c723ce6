//! Why CAP_NET_RAW is missing, read from `/proc/self/status`, so the start-up error tells the
//! user what to change instead of sending them to add what is already there.
//!
//! Kubernetes puts a container's `capabilities.add` in the bounding, permitted and effective sets
//! of the runtime's process, but sets no ambient capabilities: when a non-root process executes a
//! binary without file capabilities, the kernel clears its permitted and effective sets
//! (docs/ARCHITECTURE.md, pitfall 13). The image's binary carries the file capability
//! `cap_net_raw+p` (permitted only, so a container without NET_RAW can still execute it: pitfall
//! 19) and the sidecar raises it to effective at start. So "in the bounding set but not
//! permitted" means the binary lacks its file capability; "not in the bounding set" means the
//! container never asked for NET_RAW.

/// Number of CAP_NET_RAW (capability.h).
pub(crate) const CAP_NET_RAW: u32 = 13;
/// Bit of CAP_NET_RAW in the capability masks of `/proc/PID/status`.
pub(crate) const NET_RAW: u64 = 1 << CAP_NET_RAW;

/// The capability sets and uids of a process, as `/proc/PID/status` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CapState {
    pub eff: u64,
    pub prm: u64,
    pub bnd: u64,
    pub amb: u64,
    /// Effective uid.
    pub euid: u32,
    pub no_new_privs: bool,
}

impl CapState {
    /// Parses the text of `/proc/PID/status`; `None` when a needed line is missing or garbled.
    pub(crate) fn parse(status: &str) -> Option<CapState> {
        let mut st = CapState::default();
        let (mut eff, mut prm, mut bnd, mut uid) = (false, false, false, false);
        for line in status.lines() {
            let Some((key, val)) = line.split_once(':') else {
                continue;
            };
            let val = val.trim();
            let hex = || u64::from_str_radix(val, 16).ok();
            match key {
                "CapEff" => (st.eff, eff) = (hex()?, true),
                "CapPrm" => (st.prm, prm) = (hex()?, true),
                "CapBnd" => (st.bnd, bnd) = (hex()?, true),
                "CapAmb" => st.amb = hex()?,
                "NoNewPrivs" => st.no_new_privs = val == "1",
                // Real, effective, saved, filesystem.
                "Uid" => {
                    st.euid = val.split_whitespace().nth(1)?.parse().ok()?;
                    uid = true;
                }
                _ => {}
            }
        }
        (eff && prm && bnd && uid).then_some(st)
    }

    /// The current process's state; `None` when `/proc` is unreadable.
    pub(crate) fn current() -> Option<CapState> {
        CapState::parse(&std::fs::read_to_string("/proc/self/status").ok()?)
    }
}

/// What to tell the user when setting a socket option that needs CAP_NET_RAW failed. `exe` is
/// the path of the running binary (for the `setcap` command in the hint).
pub(crate) fn diagnose(st: Option<CapState>, exe: &str) -> String {
    let Some(st) = st else {
        return "tproxy mode needs CAP_NET_RAW (could not read /proc/self/status to say more). \
                Add it to the sidecar container: securityContext.capabilities.add: [\"NET_RAW\"], \
                and give the binary the file capability: setcap cap_net_raw+p "
            .to_string()
            + exe;
    };
    let sets = format!(
        "uid {}, CapEff {:016x}, CapPrm {:016x}, CapBnd {:016x}, CapAmb {:016x}, NoNewPrivs {}",
        st.euid, st.eff, st.prm, st.bnd, st.amb, st.no_new_privs as u8
    );
    if st.bnd & NET_RAW == 0 {
        return format!(
            "tproxy mode needs CAP_NET_RAW, and it is not in this container's bounding set ({sets}). \
             Add it to the sidecar container: securityContext.capabilities.add: [\"NET_RAW\"] \
             (or use redirect mode, which needs no capability)"
        );
    }
    if st.eff & NET_RAW == 0 {
        if st.prm & NET_RAW != 0 {
            return format!(
                "tproxy mode needs CAP_NET_RAW: it is permitted but could not be made effective \
                 ({sets}); the sidecar raises it at start, so something refused capset(2)"
            );
        }
        let who = if st.euid == 0 {
            "the process runs as root but CAP_NET_RAW was dropped from its permitted set"
                .to_string()
        } else {
            format!(
                "the process runs as non-root uid {} without ambient capabilities (Kubernetes \
                 sets none), so the kernel grants it only the file capabilities of the binary, \
                 and {exe} lacks its file capability cap_net_raw+p",
                st.euid
            )
        };
        return format!(
            "tproxy mode needs CAP_NET_RAW: it is in the bounding set (capabilities.add has it) \
             but not effective ({sets}): {who}. Fix: run the image whose tproxy-sidecar carries \
             the file capability (scripts/image.sh or install/Dockerfile build it), or run \
             `setcap cap_net_raw+p {exe}` when building your image, on a filesystem not mounted \
             nosuid; keep capabilities.add: [\"NET_RAW\"] (or use redirect mode, which needs no \
             capability)"
        );
    }
    format!(
        "tproxy mode needs CAP_NET_RAW; it is effective ({sets}) yet the kernel refused: a \
         security module (AppArmor, SELinux, seccomp) or a user namespace that does not own the \
         pod's network namespace denies it"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/proc/self/status` lines of a process as containerd starts it for a non-root container
    /// with `capabilities.add: ["NET_RAW"]`, drop ALL, and a binary without file capabilities.
    const NO_FILE_CAP: &str = "Name:\ttproxy-sidecar\nUid:\t1337\t1337\t1337\t1337\n\
        CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
        CapBnd:\t0000000000002000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";

    #[test]
    fn parses_sets_and_effective_uid() {
        let st = CapState::parse(NO_FILE_CAP).expect("parse");
        assert_eq!(
            st,
            CapState {
                eff: 0,
                prm: 0,
                bnd: NET_RAW,
                amb: 0,
                euid: 1337,
                no_new_privs: true
            }
        );
        assert_eq!(CapState::parse("CapEff:\tzz\n"), None);
        assert_eq!(CapState::parse("Name:\tx\n"), None);
    }

    #[test]
    fn bounding_but_not_effective_blames_the_missing_file_capability() {
        let m = diagnose(
            CapState::parse(NO_FILE_CAP),
            "/usr/local/bin/tproxy-sidecar",
        );
        assert!(m.contains("in the bounding set"), "{m}");
        assert!(m.contains("non-root uid 1337"), "{m}");
        assert!(m.contains("lacks its file capability cap_net_raw+p"), "{m}");
        assert!(
            m.contains("setcap cap_net_raw+p /usr/local/bin/tproxy-sidecar"),
            "{m}"
        );
        assert!(!m.contains("Add it to the sidecar container"), "{m}");
    }

    #[test]
    fn not_in_bounding_set_says_add_it_to_the_container() {
        let st = CapState::parse(&NO_FILE_CAP.replace("CapBnd:\t0000000000002000", "CapBnd:\t0"));
        let m = diagnose(st, "/x");
        assert!(m.contains("not in this container's bounding set"), "{m}");
        assert!(
            m.contains("securityContext.capabilities.add: [\"NET_RAW\"]"),
            "{m}"
        );
    }

    #[test]
    fn effective_yet_refused_points_elsewhere_and_unreadable_status_still_helps() {
        let st = CapState {
            eff: NET_RAW,
            prm: NET_RAW,
            bnd: NET_RAW,
            ..CapState::default()
        };
        let m = diagnose(Some(st), "/x");
        assert!(m.contains("it is effective"), "{m}");
        let m = diagnose(None, "/x");
        assert!(m.contains("setcap cap_net_raw+p /x"), "{m}");
    }
}
