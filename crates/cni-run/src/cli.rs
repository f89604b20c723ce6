//! tproxy-cni-run: runs a CNI conflist like a container runtime would (ADD/CHECK/DEL/STATUS/GC), for the demo and shell tests.

use crate::cache;
use crate::Invocation;
use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use std::path::PathBuf;
use tproxy_cni_policy::consts::POD_ANNOTATIONS_CAPABILITY;
use tproxy_cni_policy::flags;

const USAGE: &str = "\
usage: tproxy-cni-run add|check|del|status|gc --conflist FILE [options]
  --conflist FILE        .conflist (or a lone .conf, wrapped like libcni does)
  --netns PATH           CNI_NETNS (add/check/del)
  --id ID                CNI_CONTAINERID (add/check/del)
  --ifname NAME          CNI_IFNAME (default eth0)
  --annotation K=V       pod annotation, passed as runtimeConfig.\"io.kubernetes.cri.pod-annotations\" (repeatable)
  --arg K=V              CNI_ARGS entry (repeatable; e.g. K8S_POD_NAMESPACE=default)
  --runtime-config K=JSON  any other runtimeConfig key (repeatable)
  --cni-path DIR:DIR     plugin dirs (default: $CNI_PATH, else this binary's dir:/opt/cni/bin:/usr/lib/cni)
  --prev-result FILE     cached ADD result for check/del ('-' = stdin)
  --cache-dir DIR        libcni's cache dir (e.g. /var/lib/cni): add writes DIR/results/NET-ID-IFNAME
                         as libcni does, check/del read the result from it, del removes it
  --valid ID/IFNAME      gc: an attachment to keep (repeatable)
Every flag may also be written --flag=value.
add prints the final result JSON on stdout.";

/// Every flag takes a value: `--flag value` or `--flag=value` (crates/policy/src/flags.rs).
const SPEC: flags::Spec<'static> = flags::Spec {
    values: &[
        "conflist",
        "netns",
        "id",
        "ifname",
        "annotation",
        "arg",
        "runtime-config",
        "cni-path",
        "prev-result",
        "cache-dir",
        "valid",
    ],
    switches: &[],
};

fn split_kv(s: &str, flag: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => bail!("{flag} expects K=V, got {s:?}"),
    }
}

fn default_cni_path() -> Vec<PathBuf> {
    if let Some(p) = std::env::var_os("CNI_PATH") {
        return std::env::split_paths(&p).collect();
    }
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
    {
        dirs.push(dir);
    }
    dirs.push("/opt/cni/bin".into());
    dirs.push("/usr/lib/cni".into());
    dirs
}

fn read_json(path: &str) -> Result<Value> {
    let text = if path == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
    };
    serde_json::from_str(&text).with_context(|| format!("{path}: not JSON"))
}

/// The `tproxy-cni-run` binary: arguments and environment of this process, exit code.
pub fn main() {
    if let Err(e) = run() {
        eprintln!("tproxy-cni-run: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let command = match args.next() {
        Some(c) if c == "-h" || c == "--help" => {
            println!("{USAGE}");
            return Ok(());
        }
        Some(c) => c,
        None => bail!("missing command\n{USAGE}"),
    };
    let mut conflist = None;
    let mut prev_result = None;
    let mut annotations = Map::new();
    let mut valid = Vec::new();
    let mut cni_path = None;
    let mut cache_dir: Option<PathBuf> = None;
    let mut inv = Invocation {
        ifname: "eth0".into(),
        ..Invocation::default()
    };
    let parsed = flags::parse(args, &SPEC).map_err(|e| anyhow::anyhow!("{e}\n{USAGE}"))?;
    let given = match parsed {
        flags::Parsed::Help => {
            println!("{USAGE}");
            return Ok(());
        }
        flags::Parsed::Flags(given) => given,
    };
    for f in given {
        let flag = format!("--{}", f.name);
        let value = f.into_value();
        match flag.as_str() {
            "--conflist" => conflist = Some(PathBuf::from(value)),
            "--netns" => inv.netns = value.into(),
            "--id" => inv.container_id = value,
            "--ifname" => inv.ifname = value,
            "--annotation" => {
                let (k, v) = split_kv(&value, &flag)?;
                annotations.insert(k, Value::String(v));
            }
            "--arg" => inv.cni_args.push(split_kv(&value, &flag)?),
            "--runtime-config" => {
                let (k, v) = split_kv(&value, &flag)?;
                let v: Value = serde_json::from_str(&v)
                    .with_context(|| format!("--runtime-config {k}: value is not JSON"))?;
                inv.runtime_config.insert(k, v);
            }
            "--cni-path" => cni_path = Some(std::env::split_paths(&value).collect()),
            "--prev-result" => prev_result = Some(value),
            "--cache-dir" => cache_dir = Some(value.into()),
            "--valid" => match value.split_once('/') {
                Some((id, ifname)) => valid.push((id.to_string(), ifname.to_string())),
                None => bail!("--valid expects ID/IFNAME, got {value:?}"),
            },
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    if !annotations.is_empty() {
        inv.runtime_config.insert(
            POD_ANNOTATIONS_CAPABILITY.into(),
            Value::Object(annotations),
        );
    }
    inv.cni_path = cni_path.unwrap_or_else(default_cni_path);
    let conflist = conflist.context("--conflist is required")?;
    let list = crate::load(&conflist)?;
    let mut prev = prev_result.as_deref().map(read_json).transpose()?;
    if let (None, Some(dir)) = (&prev, &cache_dir) {
        prev = cache::result(dir, &list, &inv);
    }
    let need_attachment = || -> Result<()> {
        if inv.container_id.is_empty() {
            bail!("{command} needs --id");
        }
        Ok(())
    };
    match command.as_str() {
        "add" => {
            need_attachment()?;
            if inv.netns.as_os_str().is_empty() {
                bail!("add needs --netns");
            }
            let result = crate::add(&list, &inv)?;
            if let Some(dir) = &cache_dir {
                cache::add(dir, &list, &inv, &result)
                    .with_context(|| format!("writing the cache entry under {}", dir.display()))?;
            }
            println!("{}", serde_json::to_string_pretty(&result)?);
        }
        "check" => {
            need_attachment()?;
            let prev = prev.context("check needs --prev-result")?;
            crate::check(&list, &inv, &prev)?;
        }
        "del" => {
            need_attachment()?;
            crate::del(&list, &inv, prev.as_ref())?;
            if let Some(dir) = &cache_dir {
                cache::del(dir, &list, &inv)
                    .with_context(|| format!("removing the cache entry under {}", dir.display()))?;
            }
        }
        "status" => crate::status(&list, &inv.cni_path)?,
        "gc" => crate::gc(&list, &inv.cni_path, &valid)?,
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
    Ok(())
}
