//! `tproxy-cni-host`: the pod policy applied to the current network namespace or another one
//! (a VM, a container, a test netns), without Kubernetes.
//!
//! Flags are turned into the annotation map a pod would carry (`--exclude-inbound-ports 22`
//! is `tproxy-cni.io/exclude-inbound-ports: "22"`), so they are checked by the same parser
//! with the same messages; the plan and the apply layer are the plugin's. Every rule of a host
//! plan carries a `counter`, which `status` shows.

mod config_file;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use serde_json::Value;

use crate::apply::{self, Drift, Kernel};
use crate::plan::{Action, Plan, PlanConfig};
use tproxy_cni_policy::consts::ANNOTATION_PREFIX;
use tproxy_cni_policy::flags;
use tproxy_cni_policy::Cidr;
use tproxy_cni_policy::{Defaults, Mode, PodPolicy, OUR_KEYS};

pub(crate) const USAGE: &str = "\
tproxy-cni-host: tproxy-cni's interception for a host or any network namespace, no Kubernetes.

usage: tproxy-cni-host apply|remove|status|check [--netns PATH | --pid PID] [options]

  apply     program the policy (idempotent: replaces what is there, atomically for nftables)
  remove    remove our nftables table, fwmark rules, routes and lo address (leaves nothing)
  status    the programmed rules with their packet/byte counters, and any drift from the options
  check     compare the kernel with the options: exit 0 in sync, 101 drift, 100 unreadable

target (default: this process's network namespace):
  --netns PATH        a network namespace file (/var/run/netns/NAME, /proc/PID/ns/net)
  --pid PID           the network namespace of process PID

policy (each flag is the pod annotation tproxy-cni.io/<flag>, same values, same checks):
  --mode M                        tproxy | redirect | none  [tproxy]
  --inbound-ports LIST            '*' or ports/ranges sent to the proxy  [*]
  --exclude-inbound-ports LIST    never intercepted (e.g. 22, so SSH survives a dead proxy)
  --include-outbound-ip-ranges L  '*' or CIDRs whose egress goes to the outbound port
  --exclude-outbound-ip-ranges L  CIDRs never captured
  --include-outbound-ports LIST   egress ports always captured
  --exclude-outbound-ports LIST   egress ports never captured
  --fail-mode open|closed         with no proxy listening: reach the app / reset  [open]
  --proxy-uid N, --proxy-gid N    the proxy's own egress is never captured  [1337, none]
  A repeated list flag adds to the list.

numbers (ports, mark, route table, rule priority, table name, default excluded ports):
  --config FILE       JSON object with the plugin's conflist keys (inboundPort, outboundPort,
                      adminPort, mark, routeTable, rulePriority, tableName, excludeInboundPorts,
                      failClosed, defaultMode, proxyUid, proxyGid); flags win over it

Exit status: 0 done, 7 bad options (message names the flag's annotation), 100 kernel
failure, 101 check found drift.";

/// CNI's codes, reused as exit statuses so scripts read them like CNI CHECK.
pub(crate) mod exit {
    pub(crate) const OK: i32 = 0;
    pub(crate) const INVALID: i32 = 7;
    pub(crate) const KERNEL: i32 = 100;
    pub(crate) const DRIFT: i32 = 101;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Apply,
    Remove,
    Status,
    Check,
}

/// Where to act.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// This process's network namespace.
    Current,
    Path(PathBuf),
}

/// A checked invocation: everything is validated before the kernel is touched.
#[derive(Debug, Clone)]
pub(crate) struct Invocation {
    pub command: Command,
    pub target: Target,
    pub config: PlanConfig,
    pub policy: PodPolicy,
}

#[derive(Debug)]
pub(crate) enum Parsed {
    Help,
    Run(Box<Invocation>),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HostError {
    #[error("{0}\n(see --help)")]
    Usage(String),
    /// The same text the plugin reports for the pod annotation the flag stands for.
    #[error("{0}")]
    Policy(#[from] tproxy_cni_policy::PolicyError),
    #[error("--config: {0}")]
    Config(String),
    #[error("{0}")]
    Netns(#[from] crate::netns::NetnsError),
    #[error("{0}")]
    Kernel(#[from] apply::Error),
    #[error("reading addresses: {0}")]
    Addresses(#[from] crate::routing::RoutingError),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

impl HostError {
    pub(crate) fn exit_code(&self) -> i32 {
        match self {
            HostError::Usage(_) | HostError::Policy(_) | HostError::Config(_) => exit::INVALID,
            // The table named by tableName is someone else's (docs/ARCHITECTURE.md, pitfall 64).
            HostError::Kernel(e) if e.has_foreign_table() => exit::INVALID,
            _ => exit::KERNEL,
        }
    }
}

fn usage(msg: impl Into<String>) -> HostError {
    HostError::Usage(msg.into())
}

/// Parses the arguments after the program name. Reads `--config` if given; nothing else.
pub(crate) fn parse(args: &[String]) -> Result<Parsed, HostError> {
    let mut it = args.iter();
    let command = match it.next().map(String::as_str) {
        None => return Err(usage("missing command (apply, remove, status or check)")),
        Some("-h" | "--help" | "help") => return Ok(Parsed::Help),
        Some("apply") => Command::Apply,
        Some("remove") => Command::Remove,
        Some("status") => Command::Status,
        Some("check") => Command::Check,
        Some(other) => {
            return Err(usage(format!(
                "unknown command {}: apply, remove, status or check",
                tproxy_cni_policy::echo(other)
            )))
        }
    };
    let names: Vec<&'static str> = ["netns", "pid", "config"]
        .into_iter()
        .chain(OUR_KEYS.iter().copied())
        .collect();
    let spec = flags::Spec {
        values: &names,
        switches: &[],
    };
    let flags::Parsed::Flags(given) =
        flags::parse(it.cloned(), &spec).map_err(|e| usage(e.to_string()))?
    else {
        return Ok(Parsed::Help);
    };
    let mut target = Target::Current;
    let mut config_file: Option<PathBuf> = None;
    let mut ann: BTreeMap<String, String> = BTreeMap::new();
    for f in given {
        let name = f.name;
        let value = f.into_value();
        match name {
            "netns" | "pid" if target != Target::Current => {
                return Err(usage("--netns and --pid name one target: give one, once"))
            }
            "netns" if value.is_empty() => return Err(usage("--netns needs a path")),
            "netns" => target = Target::Path(value.into()),
            "pid" => match value.parse::<u32>() {
                Ok(pid) if pid > 0 => {
                    target = Target::Path(format!("/proc/{pid}/ns/net").into());
                }
                _ => {
                    return Err(usage(format!(
                        "--pid takes a process id, got {}",
                        tproxy_cni_policy::echo(&value)
                    )))
                }
            },
            "config" => config_file = Some(value.into()),
            _ => {
                let key = format!("{ANNOTATION_PREFIX}{name}");
                ann.entry(key)
                    .and_modify(|v| {
                        v.push(',');
                        v.push_str(&value);
                    })
                    .or_insert(value);
            }
        }
    }
    let (config, defaults) = read_config(config_file)?;
    let policy = PodPolicy::from_annotations(&ann, &defaults)?;
    Ok(Parsed::Run(Box::new(Invocation {
        command,
        target,
        config,
        policy,
    })))
}

/// The plugin's numbers and defaults from `--config` (the conflist entry's keys, checked by
/// the plugin's own parser), or the built-in ones. On a host the default mode is tproxy: a
/// user who runs `apply` wants interception.
fn read_config(file: Option<PathBuf>) -> Result<(PlanConfig, Defaults), HostError> {
    let obj = match &file {
        None => serde_json::Map::new(),
        Some(path) => {
            let text = config_file::read(path)
                .map_err(|e| HostError::Config(format!("{}: {e}", path.display())))?;
            match serde_json::from_slice(&text) {
                Ok(Value::Object(o)) => o,
                Ok(_) => {
                    return Err(HostError::Config(format!(
                        "{}: must be a JSON object",
                        path.display()
                    )))
                }
                Err(e) => {
                    return Err(HostError::Config(format!(
                        "{}: not JSON: {e}",
                        path.display()
                    )))
                }
            }
        }
    };
    let (config, admin_port) = PlanConfig::from_json(&obj).map_err(|e| HostError::Config(e.msg))?;
    let sidecar_ports = [config.inbound_port, config.outbound_port, admin_port];
    let mut defaults =
        Defaults::from_json(&obj, &sidecar_ports).map_err(|e| HostError::Config(e.msg))?;
    if !obj.contains_key("defaultMode") {
        defaults.mode = Mode::Tproxy;
    }
    Ok((config, defaults))
}

/// The host plan: the pod plan for both address families, whatever addresses the target has
/// now, with no node-address bypass (a host's own connections to itself arrive on lo, which is
/// never intercepted), and a counter on every rule. Both families always: a host's IPv6
/// address often appears after `apply` ran (SLAAC, DHCPv6, a late network manager), and an
/// IPv6 SYN captured without the IPv6 fwmark rule and route is never delivered to the proxy
/// (docs/ARCHITECTURE.md, pitfall 75). Only a netns where lo refuses IPv6 routes gets IPv4 alone.
fn host_plan(inv: &Invocation) -> Result<Plan, HostError> {
    let mut plan = crate::plan::build(&inv.config, &inv.policy, &host_families(), &[]);
    if let Some(t) = &mut plan.table {
        for rule in t.chains.iter_mut().flat_map(|c| c.rules.iter_mut()) {
            rule.actions.insert(0, Action::Counter);
        }
    }
    Ok(plan)
}

/// One address per family the host plan programs (the plan reads only their families): IPv4,
/// and IPv6 unless IPv6 is disabled on lo in this netns (`net.ipv6.conf.all.disable_ipv6=1` at
/// boot), where the kernel refuses the local route ("IPv6 is disabled on nexthop device"). A
/// kernel without IPv6 at all is handled by the routing layer, which skips the IPv6 half.
fn host_families() -> Vec<IpAddr> {
    let mut fams = vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)];
    // Read from this thread, which is in the target netns: /proc/sys/net is per netns.
    match std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6") {
        Ok(v) if v.trim() == "1" => {
            log::warn!(
                "IPv6 is disabled on lo: programming IPv4 only; after enabling IPv6, apply again"
            );
        }
        _ => fams.push(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
    }
    fams
}

/// Everything `remove` deletes: the table, tagged routing objects, this configuration's rules
/// and routes, and the lo address redirect mode adds (whichever mode was applied).
fn owned(inv: &Invocation) -> crate::plan::Routing {
    let lo: Vec<Cidr> = Cidr::new(tproxy_cni_policy::consts::REDIRECT_SOURCE_V6.into(), 128)
        .into_iter()
        .collect();
    apply::owned_routing(&inv.config, &lo)
}

/// What a command found, for the caller to print and map to an exit status.
#[derive(Debug)]
pub(crate) enum Outcome {
    Done(String),
    Status {
        table: Option<Vec<crate::nft::RuleStatus>>,
        drift: Vec<Drift>,
    },
    Check(Vec<Drift>),
}

/// Runs the command in the current thread's network namespace.
fn act(inv: &Invocation) -> Result<Outcome, HostError> {
    let table = inv.config.table_name.as_str();
    match inv.command {
        Command::Apply => {
            let plan = host_plan(inv)?;
            if plan.is_empty() {
                // Mode none: nothing may stay programmed.
                apply::remove(&Kernel, &Kernel, table, &owned(inv))?;
                return Ok(Outcome::Done(
                    "mode none: removed everything of ours".into(),
                ));
            }
            apply::apply(&Kernel, &Kernel, &plan)?;
            Ok(Outcome::Done(format!("applied {}", apply::summary(&plan))))
        }
        Command::Remove => {
            apply::remove(&Kernel, &Kernel, table, &owned(inv))?;
            Ok(Outcome::Done("removed everything of ours".into()))
        }
        Command::Status => {
            let plan = host_plan(inv)?;
            let rules = crate::nft::rule_status(table).map_err(apply::Error::from)?;
            let drift = apply::verify(&Kernel, &Kernel, &plan, table)?;
            Ok(Outcome::Status {
                table: rules,
                drift,
            })
        }
        Command::Check => {
            let plan = host_plan(inv)?;
            Ok(Outcome::Check(apply::verify(
                &Kernel, &Kernel, &plan, table,
            )?))
        }
    }
}

/// Runs the command in its target network namespace.
pub(crate) fn run(inv: &Invocation) -> Result<Outcome, HostError> {
    match &inv.target {
        // The lock covers the current netns too (docs/ARCHITECTURE.md, pitfall 73).
        Target::Current => {
            let path = std::path::Path::new("/proc/thread-self/ns/net");
            let file = std::fs::File::open(path).map_err(|err| crate::netns::NetnsError::Open {
                path: path.to_path_buf(),
                err,
            })?;
            let _held = crate::netns::lock_namespace(path, &file)?;
            act(inv)
        }
        Target::Path(p) => crate::netns::run_locked(p, || act(inv))?,
    }
}

/// Prints an outcome; returns the exit status.
pub(crate) fn report(
    inv: &Invocation,
    outcome: &Outcome,
    out: &mut dyn Write,
) -> Result<i32, HostError> {
    match outcome {
        Outcome::Done(what) => {
            log::info!("{what}");
            Ok(exit::OK)
        }
        Outcome::Check(drift) => {
            for d in drift {
                writeln!(out, "drift: {d}")?;
            }
            Ok(if drift.is_empty() {
                exit::OK
            } else {
                exit::DRIFT
            })
        }
        Outcome::Status { table, drift } => {
            let name = &inv.config.table_name;
            match table {
                None => writeln!(out, "table inet {name}: absent")?,
                Some(rules) => {
                    writeln!(out, "table inet {name}:")?;
                    writeln!(
                        out,
                        "  {:<16} {:>6} {:>12} {:>14}  comment",
                        "chain", "handle", "packets", "bytes"
                    )?;
                    for r in rules {
                        let (p, b) = match r.counter {
                            Some((p, b)) => (p.to_string(), b.to_string()),
                            None => ("-".into(), "-".into()),
                        };
                        writeln!(
                            out,
                            "  {:<16} {:>6} {p:>12} {b:>14}  {}",
                            r.chain, r.handle, r.comment
                        )?;
                    }
                }
            }
            if drift.is_empty() {
                writeln!(out, "in sync with the options given")?;
            } else {
                for d in drift {
                    writeln!(out, "drift: {d}")?;
                }
            }
            Ok(exit::OK)
        }
    }
}

/// The whole binary: parse, act, print; returns the exit status.
pub fn main_with(args: &[String], out: &mut dyn Write) -> i32 {
    tproxy_cni_policy::init_logging("tproxy-cni-host", log::LevelFilter::Info, None);
    let res = parse(args).and_then(|p| match p {
        Parsed::Help => {
            writeln!(out, "{USAGE}")?;
            Ok(exit::OK)
        }
        Parsed::Run(inv) => {
            let outcome = run(&inv)?;
            report(&inv, &outcome, out)
        }
    });
    match res {
        Ok(code) => code,
        Err(e) => {
            log::error!("{e}");
            e.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tproxy_cni_policy::FailMode;

    fn p(args: &[&str]) -> Result<Parsed, HostError> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn inv(args: &[&str]) -> Invocation {
        match p(args) {
            Ok(Parsed::Run(i)) => *i,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn flags_are_the_annotations() {
        let i = inv(&[
            "apply",
            "--exclude-inbound-ports",
            "22",
            "--exclude-inbound-ports=2222",
            "--fail-mode",
            "closed",
            "--netns",
            "/var/run/netns/vm",
        ]);
        assert_eq!(i.command, Command::Apply);
        assert_eq!(i.target, Target::Path("/var/run/netns/vm".into()));
        assert_eq!(i.policy.mode, Mode::Tproxy, "a host defaults to tproxy");
        assert_eq!(i.policy.fail, FailMode::Closed);
        let ports: Vec<String> = i
            .policy
            .exclude_inbound_ports
            .iter()
            .map(ToString::to_string)
            .collect();
        for want in ["22", "2222", "15006"] {
            assert!(ports.contains(&want.to_string()), "{want} in {ports:?}");
        }
        // The same policy as a pod with the same annotations.
        let mut ann = BTreeMap::new();
        ann.insert(
            "tproxy-cni.io/exclude-inbound-ports".into(),
            "22,2222".into(),
        );
        ann.insert("tproxy-cni.io/fail-mode".into(), "closed".into());
        ann.insert("tproxy-cni.io/mode".into(), "tproxy".into());
        let pod = PodPolicy::from_annotations(&ann, &Defaults::default()).expect("valid");
        assert_eq!(i.policy, pod);
        assert_eq!(
            inv(&["remove", "--pid", "42"]).target,
            Target::Path("/proc/42/ns/net".into())
        );
        assert_eq!(inv(&["status"]).target, Target::Current);
    }

    #[test]
    fn bad_values_get_the_plugins_message() {
        let mut ann = BTreeMap::new();
        ann.insert(
            "tproxy-cni.io/exclude-inbound-ports".to_string(),
            "99999".to_string(),
        );
        let want = PodPolicy::from_annotations(&ann, &Defaults::default())
            .expect_err("bad port")
            .to_string();
        let Err(e) = p(&["apply", "--exclude-inbound-ports", "99999"]) else {
            panic!("accepted a bad port")
        };
        assert_eq!(e.to_string(), want);
        assert!(
            want.contains("tproxy-cni.io/exclude-inbound-ports"),
            "{want}"
        );
        assert_eq!(e.exit_code(), exit::INVALID);
    }

    #[test]
    fn bad_usage_is_refused() {
        for args in [
            &[][..],
            &["frobnicate"],
            &["apply", "--modee", "tproxy"],
            &["apply", "--mode"],
            &["apply", "--pid", "x"],
            &["apply", "--pid", "0"],
            &["apply", "--netns", "/a", "--pid", "1"],
            &["apply", "--netns", ""],
            &["apply", "--config", "/nonexistent/tproxy.json"],
        ] {
            let e = p(args).expect_err(&format!("{args:?} accepted"));
            assert_eq!(e.exit_code(), exit::INVALID, "{args:?}: {e}");
        }
        assert!(matches!(p(&["--help"]), Ok(Parsed::Help)));
        assert!(matches!(p(&["apply", "-h"]), Ok(Parsed::Help)));
    }

    #[test]
    fn config_file_is_the_conflist_entry() {
        let dir = std::env::temp_dir().join(format!("tproxy-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let f = dir.join("c.json");
        std::fs::write(
            &f,
            r#"{"inboundPort": 16006, "mark": 8192, "defaultMode": "redirect"}"#,
        )
        .expect("write");
        let i = inv(&["apply", "--config", &f.to_string_lossy()]);
        assert_eq!(i.config.inbound_port, 16006);
        assert_eq!(i.config.mark, 8192);
        assert_eq!(i.policy.mode, Mode::Redirect, "the file's defaultMode");
        std::fs::write(&f, r#"{"mark": 0}"#).expect("write");
        let e = p(&["apply", "--config", &f.to_string_lossy()]).expect_err("mark 0");
        assert!(e.to_string().contains("\"mark\""), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
