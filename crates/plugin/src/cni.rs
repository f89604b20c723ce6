//! The CNI protocol frame: env + stdin in, result or error JSON out, one exit code.
//!
//! `run` takes the environment, stdin and stdout as parameters (never the process globals), so
//! the whole protocol is testable in-process; failures become CNI codes only in `error.rs`.

pub mod conf;
pub mod env;
pub mod error;
#[cfg(test)]
mod golden;
mod podips;

use std::io::Write;

use serde_json::{json, Value};

use crate::apply::{self, Kernel};
use crate::netns::{self, NetnsError};
use crate::plan::{self, Plan};
use crate::routing;
use conf::{NetConf, SUPPORTED_VERSIONS};
use env::{CniEnv, Command, Env};
use error::{code, CniError};
use tproxy_cni_policy::PodPolicy;

/// The newest CNI version we speak, reported by VERSION and used in errors before a config is read.
pub(crate) const LATEST_VERSION: &str = "1.1.0";

/// Runs one plugin invocation. Returns the process exit code (0 success, 1 error printed).
pub fn run(env: &dyn Env, stdin: &[u8], stdout: &mut dyn Write) -> i32 {
    let version = conf::peek_version(stdin)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_string());
    match dispatch(env, stdin) {
        Ok(Some(out)) => match write_json(stdout, &out) {
            Ok(()) => 0,
            Err(e) => {
                log::error!("writing result: {e}");
                1
            }
        },
        Ok(None) => 0,
        Err(e) => {
            // Errors of a command were logged with the pod by `dispatch`; those before the
            // config was read have no logger to go to (stdout carries only the error object).
            let _ = write_json(stdout, &e.to_json(&version));
            1
        }
    }
}

fn write_json(out: &mut dyn Write, v: &Value) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, v)?;
    out.write_all(b"\n")?;
    out.flush()
}

fn dispatch(env: &dyn Env, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let cni = CniEnv::read(env)?;
    if cni.command == Command::Version {
        return Ok(Some(json!({
            "cniVersion": LATEST_VERSION,
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        // A table name ADD always refuses cannot name a table of ours: nothing to remove, and a
        // failing DEL would keep the primary plugin from freeing the pod's IP (docs/ARCHITECTURE.md, pitfall 9).
        Err(_) if cni.command == Command::Del && conf::peek_bad_table_name(stdin).is_some() => {
            return Ok(None);
        }
        // Any other config DEL cannot read (the conflist changed since ADD): what ADD made is
        // still found by its owner tags, whatever numbers it used, so remove that and succeed.
        Err(e) if cni.command == Command::Del => {
            return del_by_owner_tags(&cni, &e).map(|()| None);
        }
        Err(e) => return Err(e),
    };
    tproxy_cni_policy::init_logging("tproxy-cni", conf.log_level, conf.log_file.as_deref());
    let res = match cni.command {
        Command::Add => add(&cni, &conf).map(Some),
        Command::Del => del(&cni, &conf).map(|()| {
            log::info!("{}: DEL done", cni.pod());
            None
        }),
        Command::Check => check(&cni, &conf).map(|()| None),
        // All our state lives in pod netns that the runtime owns: nothing node-wide to report
        // or collect, and failing these would mark the whole network not ready
        // (docs/ARCHITECTURE.md, pitfall 10).
        Command::Status | Command::Gc | Command::Version => Ok(None),
    };
    if let Err(e) = &res {
        log::error!("{}: {} failed: {e}", cni.pod(), cni.command);
    }
    res
}

/// Most node addresses exempted from interception, one rule each.
const MAX_NODE_ADDRESSES: usize = 64;

/// Policy + plan for this invocation, given the node's addresses (pure). Only what the pod's
/// mode needs is parsed (docs/ARCHITECTURE.md, pitfall 61).
fn plan_with(conf: &NetConf, node_ips: &[std::net::IpAddr]) -> Result<Plan, CniError> {
    let policy = PodPolicy::for_plugin(&conf.annotations, &conf.defaults)?;
    let ips = conf.pod_ips()?;
    Ok(plan::build(&conf.plan, &policy, &ips, node_ips))
}

/// The plan ADD programs and CHECK compares: the node's addresses are read here, in the host
/// netns, before entering the pod's. The installer's reconcile loop compares with the same plan.
pub fn plan_for(conf: &NetConf) -> Result<Plan, CniError> {
    let bare = plan_with(conf, &[])?;
    if bare.is_empty() || !conf.node_bypass {
        // Mode none: nothing to program, no need to read the node; or the conflist turned the
        // node-address bypass off.
        return Ok(bare);
    }
    let mut node = routing::node_addresses()?;
    if node.len() > MAX_NODE_ADDRESSES {
        log::warn!(
            "the node has {} addresses; only the first {MAX_NODE_ADDRESSES} bypass interception",
            node.len()
        );
        node.truncate(MAX_NODE_ADDRESSES);
    }
    plan_with(conf, &node)
}

fn require_prev(conf: &NetConf) -> Result<&Value, CniError> {
    conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "\"prevResult\" is missing: tproxy-cni is a chained plugin and must be listed after the cluster network's plugin in the conflist",
        )
    })
}

fn add(cni: &CniEnv, conf: &NetConf) -> Result<Value, CniError> {
    let prev = require_prev(conf)?;
    let plan = plan_for(conf)?;
    if let Some(why) = tproxy_cni_policy::skip_reason(&conf.annotations) {
        log::info!("{}: {why}", cni.pod());
    } else if plan.is_empty() {
        log::debug!("{}: mode none, nothing to program", cni.pod());
    } else {
        let path = std::path::Path::new(&cni.netns);
        netns::run_locked(path, || apply::apply(&Kernel, &Kernel, &plan))??;
        log::info!("{}: programmed {}", cni.pod(), apply::summary(&plan));
    }
    // Chained plugins hand prevResult on unchanged; only the version is the config's.
    let mut out = prev.clone();
    if let Some(o) = out.as_object_mut() {
        o.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    }
    Ok(out)
}

fn del(cni: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    if cni.netns.is_empty() {
        log::debug!("{}: DEL without netns, nothing to remove", cni.pod());
        return Ok(());
    }
    // DEL never reads the annotations (docs/ARCHITECTURE.md, pitfalls 9 and 61): what ADD made
    // is found by its owner tags and this config's numbers, whatever mode the pod had, so a
    // value that is malformed, huge or hostile cannot make DEL fail or cost anything. The one
    // object without a tag, redirect mode's `::6` on lo, is removed whatever the mode: DEL
    // runs when the sandbox goes away.
    let owned = apply::owned_routing(&conf.plan, &redirect_lo());
    remove_in(cni, conf.plan.table_name.as_str(), &owned)
}

/// What redirect mode may have added to lo (`::6/128`).
fn redirect_lo() -> Vec<tproxy_cni_policy::Cidr> {
    tproxy_cni_policy::Cidr::new(tproxy_cni_policy::consts::REDIRECT_SOURCE_V6.into(), 128)
        .into_iter()
        .collect()
}

/// DEL with a config that does not parse: removes our objects by their owner tags (tables with
/// our comment, rules and routes with our protocol, `::6` on lo), with the default numbers for
/// what the tags do not cover. The config error goes to stderr, as the log file is unknown.
fn del_by_owner_tags(cni: &CniEnv, why: &CniError) -> Result<(), CniError> {
    let _ = writeln!(
        std::io::stderr(),
        "tproxy-cni: {}: DEL with an unreadable config ({}); removing what carries our owner tags",
        cni.pod(),
        why.msg
    );
    if cni.netns.is_empty() {
        return Ok(());
    }
    let cfg = plan::PlanConfig::default();
    let owned = apply::owned_routing(&cfg, &redirect_lo());
    remove_in(cni, cfg.table_name.as_str(), &owned)
}

/// Removes table `table`, every table carrying our owner comment and the `owned` routing
/// objects in the pod's netns; a netns that is gone, or was never one, holds nothing of ours.
fn remove_in(cni: &CniEnv, table: &str, owned: &plan::Routing) -> Result<(), CniError> {
    let res = netns::run_locked(std::path::Path::new(&cni.netns), || {
        apply::remove(&Kernel, &Kernel, table, owned)
    });
    match res {
        // A table of our name that is not ours is left alone, and there is nothing of ours to
        // remove in it: DEL succeeds (docs/ARCHITECTURE.md, pitfalls 9 and 64).
        Ok(Err(e)) if e.only_foreign_tables() => {
            log::warn!("{}: DEL left alone: {e}", cni.pod());
            Ok(())
        }
        Ok(r) => Ok(r?),
        Err(NetnsError::Gone(_)) => Ok(()),
        // ADD refuses such a path (a FIFO, a plain file), so nothing of ours can be in it.
        Err(NetnsError::NotNamespace { .. }) => Ok(()),
        // A path whose namespace was already unmounted: nothing of ours can be left in it.
        Err(NetnsError::Enter {
            err: nix::Error::EINVAL,
            ..
        }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn check(cni: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    if !conf::version_has_check(&conf.cni_version) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "CHECK needs cniVersion 0.4.0 or later, config has {}",
                conf.cni_version
            ),
        ));
    }
    require_prev(conf)?;
    let plan = plan_for(conf)?;
    let table = conf.plan.table_name.as_str();
    // A read failure is an error (100); only a difference is drift (101).
    let drift = netns::run_locked(std::path::Path::new(&cni.netns), || {
        apply::verify(&Kernel, &Kernel, &plan, table)
    })??;
    if drift.is_empty() {
        Ok(())
    } else {
        Err(CniError::drift(&cni.pod(), &drift))
    }
}
