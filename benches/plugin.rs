//! Plugin benchmark: tproxy-cni ADD/DEL latency in fresh netns, leaks after parallel
//! ADD/DEL cycles, and the same ruleset loaded with `nft -f` in the same run for comparison.
//!
//! Needs root. Run by `scripts/bench.sh`, or alone: `cargo build --release --bins && cargo bench
//! --bench plugin -- [--quick]`. Without `--bench` on the command line (`cargo test
//! --all-targets`) it does nothing: timings are not tests.
//!
//! Environment: `TPROXY_CNI_BIN` (the plugin; default `$CARGO_TARGET_DIR/release/tproxy-cni`),
//! `BENCH_OUT` (write `metric<TAB>value` lines there for the report), `BENCH_NS_PREFIX` (netns
//! name prefix, so a caller can clean up after a kill).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tproxy_cni_plugin::plan::{self, PlanConfig};
use tproxy_cni_policy::{Defaults, PodPolicy};

const PARALLEL: usize = 20;

struct Opts {
    pods: usize,
    cycles: usize,
    plugin: PathBuf,
    prefix: String,
    out: Option<PathBuf>,
}

/// Every netns this run made, deleted at the end (also after Ctrl-C: see `stop`).
struct Namespaces {
    names: Mutex<Vec<String>>,
}

impl Namespaces {
    fn create(&self, names: &[String]) {
        let batch: String = names.iter().map(|n| format!("netns add {n}\n")).collect();
        run_stdin(Command::new("ip").args(["-batch", "-"]), &batch);
        self.names.lock().unwrap().extend(names.iter().cloned());
        // The plugin's `local default dev lo` route wants lo up, as it is in a real pod.
        for n in names {
            run(Command::new("ip").args(["-n", n, "link", "set", "lo", "up"]));
        }
    }
    fn delete_all(&self) {
        let names = std::mem::take(&mut *self.names.lock().unwrap());
        let batch: String = names.iter().map(|n| format!("netns del {n}\n")).collect();
        if !batch.is_empty() {
            run_stdin(Command::new("ip").args(["-force", "-batch", "-"]), &batch);
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if !out.status.success() {
        panic!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_stdin(cmd: &mut Command, input: &str) -> bool {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait().map(|s| s.success()).unwrap_or(false)
}

/// The CNI config a runtime would send for a pod with one annotation (mode) and these IPs.
fn conf(mode: &str, ips: &[String]) -> String {
    let ips: Vec<String> = ips
        .iter()
        .map(|a| format!("{{\"address\":\"{a}\"}}"))
        .collect();
    format!(
        "{{\"cniVersion\":\"1.0.0\",\"name\":\"bench\",\"type\":\"tproxy-cni\",\"runtimeConfig\":\
         {{\"io.kubernetes.cri.pod-annotations\":{{\"tproxy-cni.io/mode\":\"{mode}\"}}}},\
         \"prevResult\":{{\"cniVersion\":\"1.0.0\",\"ips\":[{}]}}}}",
        ips.join(",")
    )
}

/// Runs the plugin alone, the way a runtime does (env + stdin); returns its wall time.
fn cni(o: &Opts, cmd: &str, ns: &str, conf: &str) -> Result<Duration, String> {
    let t = Instant::now();
    let mut child = Command::new(&o.plugin)
        .env_clear()
        .env("CNI_COMMAND", cmd)
        .env("CNI_CONTAINERID", ns)
        .env("CNI_NETNS", format!("/var/run/netns/{ns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", o.plugin.display()))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let d = t.elapsed();
    if out.status.success() {
        Ok(d)
    } else {
        Err(format!(
            "{cmd} in {ns}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `nft ARGS` inside netns `ns`, entered between fork and exec so nothing but nft is timed (as
/// the plugin enters the netns itself). Returns the wall time.
fn nft_in(ns: &str, args: &[&str]) -> (Duration, String) {
    let f = File::open(format!("/var/run/netns/{ns}")).expect("open netns");
    let fd = f.as_raw_fd();
    let mut cmd = Command::new("nft");
    cmd.args(args);
    // SAFETY: between fork and exec the closure only makes the setns syscall (async-signal-safe)
    // on a descriptor the parent keeps open until the child has exec'd.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let t = Instant::now();
    let out = cmd.output().expect("spawn nft");
    let d = t.elapsed();
    assert!(
        out.status.success(),
        "nft {args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(f);
    (d, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where the `nft -f` text goes (removed at the end, also after a failure).
fn rules_file(o: &Opts) -> PathBuf {
    std::env::temp_dir().join(format!("{}.nft", o.prefix))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pct(v: &mut [f64], p: usize) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() * p) / 100).min(v.len() - 1);
    v[i]
}

/// What tproxy-cni may have left in a netns: tables, fwmark rules, routes in its table, `::6`.
fn leftovers(ns: &str) -> Vec<String> {
    let mut left = Vec::new();
    let (_, tables) = nft_in(ns, &["list", "tables"]);
    left.extend(tables.lines().map(|l| format!("{ns}: {l}")));
    for fam in ["-4", "-6"] {
        let rules = run(Command::new("ip").args(["-n", ns, fam, "rule", "show"]));
        left.extend(
            rules
                .lines()
                .filter(|l| l.contains("fwmark") || l.contains("29808"))
                .map(|l| format!("{ns}: rule {l}")),
        );
        // A table with no routes left does not exist at all: ip says so and fails.
        let out = Command::new("ip")
            .args(["-n", ns, fam, "route", "show", "table", "29808"])
            .output()
            .expect("spawn ip");
        let routes = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && !err.contains("does not exist") {
            panic!("ip route show table 29808 in {ns}: {err}");
        }
        left.extend(routes.lines().map(|l| format!("{ns}: route {l}")));
    }
    let lo = run(Command::new("ip").args(["-n", ns, "-6", "addr", "show", "dev", "lo"]));
    left.extend(
        lo.lines()
            .filter(|l| l.contains("::6/128"))
            .map(|l| format!("{ns}: lo {}", l.trim())),
    );
    left
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("plugin bench: timings are not tests; run `cargo bench --bench plugin` as root");
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("plugin bench: needs root (network namespaces); skipped");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let o = Opts {
        pods: if quick { 50 } else { 500 },
        cycles: if quick { 100 } else { 500 },
        plugin: std::env::var_os("TPROXY_CNI_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| target.join("release/tproxy-cni")),
        prefix: std::env::var("BENCH_NS_PREFIX")
            .unwrap_or_else(|_| format!("tpbp-{}", std::process::id())),
        out: std::env::var_os("BENCH_OUT").map(PathBuf::from),
    };
    assert!(
        o.plugin.exists(),
        "{} missing: cargo build --release --bins",
        o.plugin.display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).expect("signal handler");
    }
    let nss = Namespaces {
        names: Mutex::new(Vec::new()),
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| bench(&o, &nss, &stop)));
    nss.delete_all();
    let _ = std::fs::remove_file(rules_file(&o));
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(_) => std::process::exit(2),
    }
}

/// Returns false when the plugin failed or leaked.
fn bench(o: &Opts, nss: &Namespaces, stop: &AtomicBool) -> bool {
    // The nft path loads the very table the plugin plans, rendered as `nft -f` text.
    let ann: BTreeMap<String, String> = [("tproxy-cni.io/mode".to_string(), "tproxy".to_string())]
        .into_iter()
        .collect();
    let policy = PodPolicy::from_annotations(&ann, &Defaults::default()).expect("policy");
    let ip: IpAddr = "10.77.0.2".parse().unwrap();
    let plan = plan::build(&PlanConfig::default(), &policy, &[ip], &[]);
    let text =
        tproxy_cni_plugin::nft::render(plan.table.as_ref().expect("tproxy mode has a table"));
    let rules_file = rules_file(o);
    std::fs::write(&rules_file, &text).expect("write rules");
    let rules_path = rules_file.to_str().unwrap().to_string();
    let tproxy_conf = conf("tproxy", &["10.77.0.2/24".to_string()]);

    // 1. Latency, one pod at a time: ADD in a fresh netns, the same table with `nft -f` (plus
    //    the fwmark rule and local route with `ip`) in another fresh netns, then DEL.
    eprintln!(
        "plugin bench: {} pods, ADD/DEL vs nft -f, {}",
        o.pods,
        o.plugin.display()
    );
    let a: Vec<String> = (0..o.pods).map(|i| format!("{}-a{i}", o.prefix)).collect();
    let b: Vec<String> = (0..o.pods).map(|i| format!("{}-b{i}", o.prefix)).collect();
    nss.create(&a);
    nss.create(&b);
    let (mut add, mut del, mut nft, mut nft_full) = (vec![], vec![], vec![], vec![]);
    let (mut nft_del, mut spawn) = (vec![], vec![]);
    let mut failures = Vec::new();
    let mut leaks = Vec::new();
    for i in 0..o.pods {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        match cni(o, "ADD", &a[i], &tproxy_conf) {
            Ok(d) => add.push(ms(d)),
            Err(e) => failures.push(e),
        }
        let (d, _) = nft_in(&b[i], &["-f", &rules_path]);
        let t = Instant::now();
        run(Command::new("ip").args([
            "-n", &b[i], "rule", "add", "fwmark", "0x7470", "lookup", "29808", "priority", "29808",
        ]));
        run(Command::new("ip").args([
            "-n",
            &b[i],
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "29808",
        ]));
        nft.push(ms(d));
        nft_full.push(ms(d + t.elapsed()));
        if i == 0 {
            let (_, ours) = nft_in(&a[0], &["list", "table", "inet", "tproxy_cni"]);
            let (_, theirs) = nft_in(&b[0], &["list", "table", "inet", "tproxy_cni"]);
            if ours != theirs {
                eprintln!("plugin bench: WARNING: the plugin's table differs from nft -f of render():\n{ours}\n---\n{theirs}");
            }
        }
        match cni(o, "DEL", &a[i], &tproxy_conf) {
            Ok(d) => del.push(ms(d)),
            Err(e) => failures.push(e),
        }
        let (d, _) = nft_in(&b[i], &["delete", "table", "inet", "tproxy_cni"]);
        nft_del.push(ms(d));
        // The floor under every figure: spawning a process that does nothing.
        let t = Instant::now();
        run(&mut Command::new("true"));
        spawn.push(ms(t.elapsed()));
        leaks.extend(leftovers(&a[i]));
    }

    // 2. Leaks: CYCLES fresh netns, ADD then DEL in each, PARALLEL at a time; tproxy and
    //    redirect modes, single and dual stack. Then nothing of ours may be left anywhere.
    eprintln!(
        "plugin bench: {} ADD/DEL cycles, {PARALLEL} in parallel",
        o.cycles
    );
    let c: Vec<String> = (0..o.cycles)
        .map(|i| format!("{}-c{i}", o.prefix))
        .collect();
    nss.create(&c);
    let next = AtomicUsize::new(0);
    let cycle_failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= o.cycles || stop.load(Ordering::Relaxed) {
                    break;
                }
                let mode = if i % 2 == 0 { "tproxy" } else { "redirect" };
                let mut ips = vec![format!("10.77.{}.{}/16", i / 250, i % 250 + 2)];
                if i % 4 < 2 {
                    ips.push(format!("fd77::{:x}/64", i + 2));
                }
                let cf = conf(mode, &ips);
                for cmd in ["ADD", "DEL"] {
                    if let Err(e) = cni(o, cmd, &c[i], &cf) {
                        cycle_failures.lock().unwrap().push(e);
                    }
                }
            });
        }
    });
    if stop.load(Ordering::Relaxed) {
        return false;
    }
    failures.extend(cycle_failures.into_inner().unwrap());
    for ns in &c {
        leaks.extend(leftovers(ns));
    }
    // The host's own netns must never be touched.
    let host = run(Command::new("nft").args(["list", "tables"]));
    leaks.extend(
        host.lines()
            .filter(|l| l.contains("tproxy_cni"))
            .map(|l| format!("host: {l}")),
    );
    let host_rules = run(Command::new("ip").args(["rule", "show"]));
    leaks.extend(
        host_rules
            .lines()
            .filter(|l| l.contains("lookup 29808"))
            .map(|l| format!("host: rule {l}")),
    );

    let figures = [
        ("add", add),
        ("del", del),
        ("nft", nft),
        ("nft_full", nft_full),
        ("nft_del", nft_del),
        ("spawn", spawn),
    ];
    let mut tsv = String::new();
    println!(
        "\n{:<44} {:>9} {:>9}",
        "plugin benchmark (wall time per call)", "p50 ms", "p99 ms"
    );
    for (name, mut v) in figures {
        if v.is_empty() {
            continue;
        }
        let (p50, p99) = (pct(&mut v, 50), pct(&mut v, 99));
        let label = match name {
            "add" => "tproxy-cni ADD (tproxy mode)",
            "del" => "tproxy-cni DEL",
            "nft" => "nft -f (same table, from nft::render)",
            "nft_full" => "nft -f + ip rule add + ip route add",
            "nft_del" => "nft delete table (same table)",
            _ => "spawn /bin/true (process floor)",
        };
        println!("{label:<44} {p50:>9.2} {p99:>9.2}");
        tsv += &format!("{name}_p50_ms\t{p50:.3}\n{name}_p99_ms\t{p99:.3}\n");
    }
    println!(
        "pods {}, cycles {} ({PARALLEL} parallel), failed calls {}, leaked objects {}",
        o.pods,
        o.cycles,
        failures.len(),
        leaks.len()
    );
    for f in failures.iter().take(5) {
        println!("  failed: {f}");
    }
    for l in leaks.iter().take(10) {
        println!("  leaked: {l}");
    }
    tsv += &format!(
        "pods\t{}\ncycles\t{}\nparallel\t{PARALLEL}\nfailures\t{}\nleaks\t{}\nleak_detail\t{}\n",
        o.pods,
        o.cycles,
        failures.len(),
        leaks.len(),
        leaks.first().map(String::as_str).unwrap_or("")
    );
    if let Some(out) = &o.out {
        std::fs::write(out, tsv).expect("write BENCH_OUT");
    }
    failures.is_empty() && leaks.is_empty()
}
