//! Late join and drift repair: the pods libcni's cache says are on this node, against what their
//! netns hold, repaired with the plugin's own code. No API credentials: everything comes from
//! the node (the cache, the netns mounts, the conflist the runtime uses).
//!
//! For each cached attachment of the chained network: the annotations and addresses from the
//! cache, the netns from the result's `interfaces[].sandbox` mapped by name into the netns dir,
//! confirmed by finding the cached addresses in it (docs/ARCHITECTURE.md, pitfall 85); the
//! policy and plan from `cni::conf` and `cni::plan_for`, the comparison from `apply::verify`
//! (what CHECK runs), and a repair through `cni::run` with `CNI_COMMAND=ADD`, the plugin's own
//! entry point, so a repair is exactly the ADD the runtime would have run (docs/install.md,
//! "Late join and drift repair").
//!
//! Never touched: mode `none`, other meshes' pods, entries without annotations, netns that
//! cannot be confirmed. Repairs are rate-limited per pod (back-off) and per pass (a cap).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use super::cache::{self, Annotations, Attachment, Sandbox};
use tproxy_cni_plugin::nft::RuleStatus;
use tproxy_cni_plugin::NetConf;
use tproxy_cni_plugin::{Drift, Kernel};

/// What the loop does with what it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Apply the plugin's layout where it is absent or differs (the default).
    Repair,
    /// Look and log, never write.
    Report,
    /// Do not look.
    Off,
}

impl Mode {
    pub(crate) fn parse(s: &str) -> Option<Mode> {
        match s {
            "repair" => Some(Mode::Repair),
            "report" => Some(Mode::Report),
            "off" => Some(Mode::Off),
            _ => None,
        }
    }
}

/// Where the loop looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settings {
    /// libcni's cache dir as mounted here (results live in `<dir>/results`).
    pub cache_dir: PathBuf,
    /// The runtime's netns dir as mounted here.
    pub netns_dir: PathBuf,
    pub mode: Mode,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cache_dir: PathBuf::from("/host/var/lib/cni"),
            netns_dir: PathBuf::from("/host/var/run/netns"),
            mode: Mode::Repair,
        }
    }
}

/// A pod's state as the loop sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum State {
    /// Our layout is in place and agrees with the plan.
    Programmed,
    /// Our table is absent.
    Missing,
    /// Our table (or our routing) differs from the plan.
    Drift,
    /// A table of ours from another layout (an older release) is there.
    OlderLayout,
    /// Mode `none`: nothing of ours belongs there.
    PolicyNone,
    /// Another mesh manages the pod.
    OtherMesh,
    /// Its netns cannot be found or confirmed.
    Unmatched,
    /// The runtime cached no annotations (older runtimes): not guessed.
    NoAnnotations,
    /// The cached config or annotations do not make a policy (the plugin's error).
    Invalid,
    /// Reading the kernel failed.
    Error,
}

impl State {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Programmed => "programmed",
            State::Missing => "missing",
            State::Drift => "drift",
            State::OlderLayout => "older-layout",
            State::PolicyNone => "none",
            State::OtherMesh => "other-mesh",
            State::Unmatched => "unmatched",
            State::NoAnnotations => "no-annotations",
            State::Invalid => "invalid",
            State::Error => "error",
        }
    }

    /// States a repair (the plugin's ADD) fixes.
    pub(crate) fn repairable(self) -> bool {
        matches!(self, State::Missing | State::Drift | State::OlderLayout)
    }
}

/// One pod (attachment) on the node.
#[derive(Debug, Clone)]
pub(crate) struct PodStatus {
    /// `namespace/name`, or the container when the runtime cached no pod name.
    pub pod: String,
    pub container_id: String,
    pub ifname: String,
    /// The pod's mode (`tproxy`, `redirect`, `none`), `-` when unknown.
    pub policy: String,
    pub state: State,
    /// Why (the drift, the missing netns, the plugin's error); empty when programmed.
    pub detail: String,
    /// The netns path entered, when one was matched.
    pub netns: Option<PathBuf>,
    /// Our table's rules with their counters, when it exists.
    pub rules: Option<Vec<RuleStatus>>,
    /// What this pass did: `repaired`, `repair failed: ...`, `deferred`, `backing off`, or empty.
    pub action: String,
}

impl PodStatus {
    fn new(att: &Attachment, state: State, detail: impl Into<String>) -> PodStatus {
        PodStatus {
            pod: att.pod(),
            container_id: att.container_id.clone(),
            ifname: att.ifname.clone(),
            policy: "-".into(),
            state,
            detail: detail.into(),
            netns: None,
            rules: None,
            action: String::new(),
        }
    }

    /// Packets counted by our rules (the sum over rules with a counter).
    pub(crate) fn packets(&self) -> Option<u64> {
        self.rules.as_ref().map(|r| {
            r.iter()
                .filter_map(|r| r.counter.map(|(p, _)| p))
                .sum::<u64>()
        })
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "pod": self.pod,
            "containerId": self.container_id,
            "ifName": self.ifname,
            "policy": self.policy,
            "state": self.state.as_str(),
            "detail": self.detail,
            "netns": self.netns.as_ref().map(|p| p.display().to_string()),
            "action": self.action,
            "rules": self.rules.as_ref().map(|rules| rules.iter().map(|r| json!({
                "chain": r.chain,
                "handle": r.handle,
                "comment": r.comment,
                "packets": r.counter.map(|c| c.0),
                "bytes": r.counter.map(|c| c.1),
            })).collect::<Vec<_>>()),
        })
    }
}

/// The chained network: the conflist the runtime uses and our entry in it.
pub(crate) struct Network<'a> {
    pub list: &'a Value,
    pub entry: &'a Map<String, Value>,
}

impl Network<'_> {
    pub(crate) fn name(&self) -> &str {
        self.list.get("name").and_then(Value::as_str).unwrap_or("")
    }
}

/// What the assessment needs to repair a pod.
struct Repair {
    stdin: Vec<u8>,
    netns: PathBuf,
}

/// Looks at one attachment (enters its netns to read, never writes).
fn assess(net: &Network, att: &Attachment, netns_dir: &Path) -> (PodStatus, Option<Repair>) {
    match att.annotations() {
        Annotations::Absent => {
            return (
                PodStatus::new(
                    att,
                    State::NoAnnotations,
                    "the runtime cached no pod annotations (an older runtime?); its policy is \
                     not guessed",
                ),
                None,
            )
        }
        Annotations::Invalid(why) => return (PodStatus::new(att, State::Invalid, why), None),
        Annotations::Present(_) => {}
    }
    let stdin =
        serde_json::to_vec(&cache::plugin_stdin(net.list, net.entry, att)).unwrap_or_default();
    let conf = match NetConf::parse(&stdin) {
        Ok(c) => c,
        Err(e) => return (PodStatus::new(att, State::Invalid, e.msg), None),
    };
    if let Some(why) = tproxy_cni_policy::skip_reason(&conf.annotations) {
        return (PodStatus::new(att, State::OtherMesh, why), None);
    }
    let policy =
        match tproxy_cni_policy::PodPolicy::from_annotations(&conf.annotations, &conf.defaults) {
            Ok(p) => p,
            Err(e) => return (PodStatus::new(att, State::Invalid, e.to_string()), None),
        };
    let mut st = PodStatus::new(att, State::Programmed, "");
    st.policy = policy.mode.as_str().to_string();
    if policy.mode == tproxy_cni_policy::Mode::None {
        st.state = State::PolicyNone;
        return (st, None);
    }
    let netns = match att.sandbox() {
        Sandbox::Path(p) => match cache::map_sandbox(&p, netns_dir) {
            Some(mapped) => mapped,
            None => {
                st.state = State::Unmatched;
                st.detail = format!("sandbox {p:?} has no usable name");
                return (st, None);
            }
        },
        Sandbox::Unknown => {
            st.state = State::Unmatched;
            st.detail = "the cached result names no sandbox (netns)".into();
            return (st, None);
        }
        Sandbox::Ambiguous(paths) => {
            st.state = State::Unmatched;
            st.detail = format!("the cached result names several sandboxes: {paths:?}");
            return (st, None);
        }
    };
    let plan = match tproxy_cni_plugin::plan_for(&conf) {
        Ok(p) => p,
        Err(e) => {
            st.state = State::Invalid;
            st.detail = e.msg;
            return (st, None);
        }
    };
    let ips = att.ips();
    let table = conf.plan.table_name.clone();
    let seen = tproxy_cni_plugin::run_in(&netns, || -> Result<_, String> {
        // The netns must hold the pod's addresses: a name reused by another pod, or a stale
        // cache entry, is never written to (pitfall 85).
        let have = tproxy_cni_plugin::routing::node_addresses().map_err(|e| e.to_string())?;
        if ips.is_empty() || !ips.iter().all(|ip| have.contains(ip)) {
            return Ok(None);
        }
        let comment = tproxy_cni_plugin::nft::table_comment(&table).map_err(|e| e.to_string())?;
        let drift = tproxy_cni_plugin::verify(&Kernel, &Kernel, &plan, &table)
            .map_err(|e| e.to_string())?;
        let rules = tproxy_cni_plugin::nft::rule_status(&table).map_err(|e| e.to_string())?;
        Ok(Some((comment, drift, rules)))
    });
    st.netns = Some(netns.clone());
    let (comment, drift, rules) = match seen {
        Err(e) => {
            st.state = State::Unmatched;
            st.detail = e.to_string();
            return (st, None);
        }
        Ok(Err(e)) => {
            st.state = State::Error;
            st.detail = e;
            return (st, None);
        }
        Ok(Ok(None)) => {
            st.state = State::Unmatched;
            st.detail = format!(
                "{} does not hold the cached addresses {ips:?} (not this pod's netns)",
                netns.display()
            );
            return (st, None);
        }
        Ok(Ok(Some(found))) => found,
    };
    st.rules = rules;
    st.state = classify(comment.as_deref(), &drift);
    st.detail = drift
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    let repair = st.state.repairable().then_some(Repair { stdin, netns });
    (st, repair)
}

/// The state from our table's comment (`None`: absent) and the drift CHECK would report.
fn classify(comment: Option<&str>, drift: &[Drift]) -> State {
    if drift.is_empty() {
        return State::Programmed;
    }
    let extra = drift.iter().any(|d| matches!(d, Drift::ExtraTable(_)));
    match comment {
        Some(c) if c != tproxy_cni_plugin::nft::owner_comment() => State::OlderLayout,
        // A table of ours under another name: an older release's table name.
        _ if extra => State::OlderLayout,
        None => State::Missing,
        Some(_) => State::Drift,
    }
}

/// Runs the plugin's ADD for `att` in-process, exactly as the runtime would have (env + stdin).
fn run_add(att: &Attachment, r: &Repair) -> Result<(), String> {
    let env: HashMap<String, String> = [
        ("CNI_COMMAND", "ADD".to_string()),
        ("CNI_CONTAINERID", att.container_id.clone()),
        ("CNI_NETNS", r.netns.display().to_string()),
        ("CNI_IFNAME", att.ifname.clone()),
        ("CNI_ARGS", att.cni_args_env()),
        ("CNI_PATH", String::new()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    // The plugin sets the log level from its config; the installer keeps its own.
    let level = log::max_level();
    let mut out = Vec::new();
    let code = tproxy_cni_plugin::run(&env, &r.stdin, &mut out);
    log::set_max_level(level);
    if code == 0 {
        return Ok(());
    }
    let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
    Err(tproxy_cni_plugin::CniError::from_json(&v)
        .map(|e| e.to_string())
        .unwrap_or_else(|| String::from_utf8_lossy(&out).trim().to_string()))
}

/// First wait before the same pod is repaired again, and the longest.
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Most repairs in one pass; the rest wait for the next (a resync later).
pub(crate) const MAX_REPAIRS_PER_PASS: usize = 20;

/// A pod's repair history.
struct History {
    attempts: u32,
    last: Instant,
}

/// The loop's state between passes.
pub(crate) struct Reconciler {
    pub settings: Settings,
    history: HashMap<String, History>,
    /// The last line logged per pod: a pod is logged when its state or action changes.
    logged: HashMap<String, String>,
    pub repairs: u64,
    pub failures: u64,
    pub passes: u64,
    last_states: BTreeMap<State, usize>,
    /// No log lines (`--status` prints instead).
    pub quiet: bool,
}

impl Reconciler {
    pub(crate) fn new(settings: Settings) -> Reconciler {
        Reconciler {
            settings,
            history: HashMap::new(),
            logged: HashMap::new(),
            repairs: 0,
            failures: 0,
            passes: 0,
            last_states: BTreeMap::new(),
            quiet: false,
        }
    }

    /// One pass over the cached attachments of `net` (only the cache files named in `only`,
    /// when given); repairs in `Repair` mode. Returns every pod's status.
    pub(crate) fn pass(&mut self, net: &Network, only: Option<&HashSet<String>>) -> Vec<PodStatus> {
        if self.settings.mode == Mode::Off {
            return Vec::new();
        }
        self.passes += 1;
        let entries = match cache::read(&self.settings.cache_dir, net.name()) {
            Ok(e) => e,
            Err(e) => {
                log::warn!(
                    "reconcile: cannot read {}: {e}",
                    self.settings.cache_dir.join("results").display()
                );
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        let mut budget = MAX_REPAIRS_PER_PASS;
        let mut live = HashSet::new();
        for entry in entries {
            let att = match entry {
                Ok(a) => a,
                Err((file, why)) => {
                    log::debug!("reconcile: {}: {why}", file.display());
                    continue;
                }
            };
            let key = att.file.display().to_string();
            live.insert(key.clone());
            let name = att.file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if only.is_some_and(|o| !o.contains(name)) {
                continue;
            }
            let (mut st, repair) = assess(net, &att, &self.settings.netns_dir);
            if let (Some(r), Mode::Repair) = (repair, self.settings.mode) {
                self.repair(&key, net, &att, &r, &mut st, &mut budget);
            }
            self.log(&key, &st);
            out.push(st);
        }
        // Forget pods whose cache entry is gone (a full pass sees every entry).
        if only.is_none() {
            self.history.retain(|k, _| live.contains(k));
            self.logged.retain(|k, _| live.contains(k));
            self.last_states.clear();
            for st in &out {
                *self.last_states.entry(st.state).or_default() += 1;
            }
        }
        out
    }

    fn repair(
        &mut self,
        key: &str,
        net: &Network,
        att: &Attachment,
        r: &Repair,
        st: &mut PodStatus,
        budget: &mut usize,
    ) {
        if let Err(why) = self.admit(key, Instant::now(), budget) {
            st.action = why;
            return;
        }
        let was = st.state;
        match run_add(att, r) {
            Ok(()) => {
                self.repairs += 1;
                // Read back what the repair left, as CHECK would.
                let (after, _) = assess(net, att, &self.settings.netns_dir);
                let detail = st.detail.clone();
                *st = after;
                st.action = format!("repaired ({}: {detail})", was.as_str());
            }
            Err(e) => {
                self.failures += 1;
                st.action = format!("repair failed: {e}");
            }
        }
    }

    /// Whether `key` may be repaired at `now`: per-pod back-off (1 s doubling to 5 min after
    /// each repair, reset once a pod stayed repaired for twice that), then the pass's budget.
    /// Records the attempt when it may.
    fn admit(&mut self, key: &str, now: Instant, budget: &mut usize) -> Result<(), String> {
        if let Some(h) = self.history.get(key) {
            let since = now.saturating_duration_since(h.last);
            let wait = BACKOFF_START
                .saturating_mul(1 << h.attempts.saturating_sub(1).min(16))
                .min(BACKOFF_MAX);
            if since < wait {
                return Err(format!(
                    "backing off (next repair in {}s)",
                    (wait - since).as_secs_f32().ceil()
                ));
            }
        }
        if *budget == 0 {
            return Err(format!(
                "deferred (at most {MAX_REPAIRS_PER_PASS} repairs per pass)"
            ));
        }
        *budget -= 1;
        let h = self.history.entry(key.to_string()).or_insert(History {
            attempts: 0,
            last: now,
        });
        if now.saturating_duration_since(h.last) > BACKOFF_MAX * 2 {
            h.attempts = 0;
        }
        h.attempts += 1;
        h.last = now;
        Ok(())
    }

    fn log(&mut self, key: &str, st: &PodStatus) {
        if self.quiet {
            return;
        }
        let line = format!(
            "reconcile: {} ({} {}): policy {}, {}{}{}",
            st.pod,
            st.container_id,
            st.ifname,
            st.policy,
            st.state.as_str(),
            if st.detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", st.detail)
            },
            if st.action.is_empty() {
                String::new()
            } else {
                format!("; {}", st.action)
            }
        );
        let changed = self.logged.get(key).map(|l| l != &line).unwrap_or(true);
        if changed || !st.action.is_empty() {
            match st.state {
                State::Error | State::Invalid => log::warn!("{line}"),
                _ if st.action.starts_with("repair failed") => log::warn!("{line}"),
                _ => log::info!("{line}"),
            }
            self.logged.insert(key.to_string(), line);
        } else {
            log::debug!("{line}");
        }
    }

    /// The counters in Prometheus' text format.
    pub(crate) fn metrics(&self) -> String {
        let mut s = String::new();
        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            ));
        };
        counter(
            &mut s,
            "tproxy_cni_reconcile_passes_total",
            "Reconcile passes over libcni's cache.",
            self.passes,
        );
        counter(
            &mut s,
            "tproxy_cni_reconcile_repairs_total",
            "Pods whose layout the installer applied (missing, drift or older layout).",
            self.repairs,
        );
        counter(
            &mut s,
            "tproxy_cni_reconcile_repair_failures_total",
            "Repairs the plugin refused or the kernel failed.",
            self.failures,
        );
        s.push_str(
            "# HELP tproxy_cni_reconcile_pods Pods on the node by state, at the last full pass.\n",
        );
        s.push_str("# TYPE tproxy_cni_reconcile_pods gauge\n");
        for (state, n) in &self.last_states {
            s.push_str(&format!(
                "tproxy_cni_reconcile_pods{{state=\"{}\"}} {n}\n",
                state.as_str()
            ));
        }
        s
    }
}

/// Watches libcni's results dir (and the cache dir, until the results dir exists).
pub(crate) struct CacheWatch {
    inotify: nix::sys::inotify::Inotify,
    results: Option<nix::sys::inotify::WatchDescriptor>,
    dir: PathBuf,
}

impl CacheWatch {
    pub(crate) fn new(cache_dir: &Path) -> Option<CacheWatch> {
        use nix::sys::inotify::{InitFlags, Inotify};
        let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
            Ok(i) => i,
            Err(e) => {
                log::warn!("reconcile: inotify: {e}; only resyncs will reconcile");
                return None;
            }
        };
        let mut w = CacheWatch {
            inotify,
            results: None,
            dir: cache_dir.to_path_buf(),
        };
        w.rewatch();
        Some(w)
    }

    /// (Re)adds the watches; cheap when they are in place.
    pub(crate) fn rewatch(&mut self) {
        use nix::sys::inotify::AddWatchFlags as F;
        if self.results.is_some() {
            return;
        }
        let results = self.dir.join("results");
        match self.inotify.add_watch(
            &results,
            F::IN_CLOSE_WRITE | F::IN_MOVED_TO | F::IN_DELETE_SELF | F::IN_MOVE_SELF,
        ) {
            Ok(wd) => self.results = Some(wd),
            // Not there yet (no pod since boot): the cache dir's watch says when it appears.
            Err(_) => {
                let _ = self
                    .inotify
                    .add_watch(&self.dir, F::IN_CREATE | F::IN_MOVED_TO);
            }
        }
    }

    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.inotify.as_fd()
    }

    /// The cache file names written since the last call (`None`: re-read everything).
    pub(crate) fn drain(&mut self) -> Option<HashSet<String>> {
        use nix::sys::inotify::AddWatchFlags as F;
        let mut names = HashSet::new();
        let mut all = false;
        while let Ok(events) = self.inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for ev in events {
                if Some(ev.wd) != self.results {
                    // The results dir appeared.
                    all = true;
                    continue;
                }
                if ev
                    .mask
                    .intersects(F::IN_DELETE_SELF | F::IN_MOVE_SELF | F::IN_IGNORED)
                {
                    self.results = None;
                    all = true;
                }
                match ev.name.and_then(|n| n.into_string().ok()) {
                    Some(n) => {
                        names.insert(n);
                    }
                    None => all = true,
                }
            }
        }
        self.rewatch();
        (!all).then_some(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_from_what_check_sees() {
        let ours = tproxy_cni_plugin::nft::owner_comment();
        assert_eq!(classify(Some(&ours), &[]), State::Programmed);
        assert_eq!(
            classify(None, &[Drift::Table("table inet tproxy_cni absent".into())]),
            State::Missing
        );
        assert_eq!(
            classify(Some(&ours), &[Drift::Table("chain x missing".into())]),
            State::Drift
        );
        assert_eq!(
            classify(
                Some("tproxy-cni layout 0"),
                &[Drift::Table("comment".into())]
            ),
            State::OlderLayout
        );
        // The pre-layout release wrote no comment at all.
        assert_eq!(
            classify(Some(""), &[Drift::Table("x".into())]),
            State::OlderLayout
        );
        assert_eq!(
            classify(None, &[Drift::ExtraTable("tproxy_old".into())]),
            State::OlderLayout
        );
        assert!(State::Missing.repairable() && !State::OtherMesh.repairable());
        assert!(!State::PolicyNone.repairable() && !State::Unmatched.repairable());
    }

    #[test]
    fn repairs_back_off_per_pod_and_are_capped_per_pass() {
        let mut r = Reconciler::new(Settings::default());
        let t = Instant::now();
        let s = Duration::from_secs;
        let mut budget = 2;
        assert!(r.admit("a", t, &mut budget).is_ok());
        // Again at once (something keeps removing our table): 1 s, then 2 s, 4 s...
        let e = r
            .admit("a", t + Duration::from_millis(500), &mut budget)
            .unwrap_err();
        assert!(e.starts_with("backing off"), "{e}");
        assert!(r.admit("a", t + s(1), &mut budget).is_ok());
        assert_eq!(budget, 0);
        // The pass's budget is spent: another pod waits for the next pass.
        let e = r.admit("b", t + s(1), &mut budget).unwrap_err();
        assert!(e.starts_with("deferred"), "{e}");
        let mut budget = MAX_REPAIRS_PER_PASS;
        assert!(r.admit("a", t + s(2), &mut budget).is_err());
        assert!(r.admit("a", t + s(3), &mut budget).is_ok());
        assert!(r.admit("a", t + s(6), &mut budget).is_err());
        assert!(r.admit("a", t + s(7), &mut budget).is_ok());
        // Never longer than the cap; a pod that stayed repaired long enough starts over.
        let late = t + s(7) + BACKOFF_MAX * 2 + s(1);
        assert!(r.admit("a", late, &mut budget).is_ok());
        assert!(r.admit("a", late + s(1), &mut budget).is_ok());
        assert_eq!(budget, MAX_REPAIRS_PER_PASS - 4);
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let mut r = Reconciler::new(Settings::default());
        r.repairs = 2;
        r.last_states.insert(State::Programmed, 3);
        let m = r.metrics();
        assert!(
            m.contains("\ntproxy_cni_reconcile_repairs_total 2\n"),
            "{m}"
        );
        assert!(
            m.contains("tproxy_cni_reconcile_pods{state=\"programmed\"} 3\n"),
            "{m}"
        );
        assert!(m
            .lines()
            .all(|l| l.starts_with('#') || l.split(' ').count() == 2));
    }
}
