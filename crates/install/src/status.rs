//! The installer's hooks for the pods' reconcile loop (`reconcile`) and `--status`: which
//! network is chained, when a pass runs, the metrics file, the table and JSON views.

use std::collections::HashSet;
use std::io::Write;

use serde_json::{json, Map, Value};

use super::reconcile::{self, CacheWatch, Network, PodStatus, Reconciler};
use super::{files, InstallError, Installer, State};

/// The metrics file in the health dir (Prometheus text format; a node exporter's textfile
/// collector can read it from a shared directory).
pub(crate) const METRICS_FILE: &str = "reconcile.prom";

impl Installer {
    /// The config the runtime uses and the entry of ours in it; `None` when the runtime's
    /// config has no entry of ours (not chained: nothing to compare pods with).
    fn chained(&self) -> Option<(Value, Map<String, Value>)> {
        let c = self.select().ok()?.ok()?;
        let entry = super::conflist::our_entry(&c.value)?.clone();
        Some((c.value, entry))
    }

    /// The cache dir's watch, unless the loop is off.
    pub(super) fn cache_watch(&self) -> Option<CacheWatch> {
        (self.opts.reconcile.mode != reconcile::Mode::Off)
            .then(|| CacheWatch::new(&self.opts.reconcile.cache_dir))
            .flatten()
    }

    /// libcni wrote or removed cache entries: look at those pods now.
    pub(super) fn cache_event(&mut self, watch: Option<&mut CacheWatch>) {
        let Some(w) = watch else { return };
        // libcni writes the entry after the list's ADD returned; let the write settle.
        std::thread::sleep(std::time::Duration::from_millis(20));
        match w.drain() {
            Some(names) if names.is_empty() => {}
            Some(names) => self.reconcile_pods(Some(&names)),
            None => self.reconcile_pods(None),
        }
    }

    /// One reconcile pass over the pods (those of the named cache files, when given), once our
    /// entry is in place; refreshes the metrics file.
    pub(super) fn reconcile_pods(&mut self, only: Option<&HashSet<String>>) {
        if self.opts.reconcile.mode == reconcile::Mode::Off {
            return;
        }
        // Only a chained node repairs: what a pod should have is what our entry says.
        if !matches!(self.last, Some(State::Ready(_) | State::Foreign(..))) {
            return;
        }
        let Some((list, entry)) = self.chained() else {
            return;
        };
        let net = Network {
            list: &list,
            entry: &entry,
        };
        self.pods.pass(&net, only);
        if let Some(dir) = &self.opts.health_dir {
            if let Err(e) =
                files::atomic_write(dir, METRICS_FILE, self.pods.metrics().as_bytes(), 0o644)
            {
                log::warn!("{}: {e}", dir.join(METRICS_FILE).display());
            }
        }
    }

    /// `--status [--json]`: every pod of the network the runtime uses, looked at, not touched.
    pub(crate) fn print_status(&self, json: bool) -> Result<(), InstallError> {
        let c = match self.select()? {
            Ok(c) => c,
            Err(_) => {
                return Err(InstallError::Usage(format!(
                    "no config in {} to read the network from",
                    self.opts.conf_dir.display()
                )))
            }
        };
        // Not chained yet: what the pods would get once it is (our entry as we would write it).
        let chained = super::conflist::our_entry(&c.value).cloned();
        let entry = chained.clone().unwrap_or_else(|| self.entry.clone());
        let net = Network {
            list: &c.value,
            entry: &entry,
        };
        let mut settings = self.opts.reconcile.clone();
        settings.mode = reconcile::Mode::Report;
        let mut looker = Reconciler::new(settings);
        looker.quiet = true;
        let pods = looker.pass(&net, None);
        let mut out = std::io::stdout().lock();
        let io = |e: std::io::Error| InstallError::Io {
            path: "stdout".into(),
            source: e,
        };
        if json {
            let mut v = render_json(net.name(), &pods);
            v["chained"] = Value::Bool(chained.is_some());
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&v).unwrap_or_default()
            )
            .map_err(io)?;
        } else {
            writeln!(
                out,
                "network {:?} ({}){}",
                net.name(),
                self.opts.conf_dir.join(&c.name).display(),
                if chained.is_some() {
                    ""
                } else {
                    ", not chained yet"
                }
            )
            .map_err(io)?;
            render_table(&pods, &mut out).map_err(io)?;
        }
        Ok(())
    }
}

/// `--status`: a table, one line per pod.
pub(crate) fn render_table(
    pods: &[PodStatus],
    out: &mut dyn std::io::Write,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<40} {:<9} {:<14} {:>9}  detail",
        "POD", "POLICY", "STATE", "PACKETS"
    )?;
    for p in pods {
        let packets = p.packets().map_or("-".to_string(), |n| n.to_string());
        let mut detail = p.detail.clone();
        if !p.action.is_empty() {
            detail = format!(
                "{}{}",
                p.action,
                if detail.is_empty() {
                    String::new()
                } else {
                    format!("; {detail}")
                }
            );
        }
        let line = format!(
            "{:<40} {:<9} {:<14} {packets:>9}  {detail}",
            p.pod,
            p.policy,
            p.state.as_str()
        );
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// `--status --json`: every pod with its rules' counters.
pub(crate) fn render_json(network: &str, pods: &[PodStatus]) -> Value {
    json!({
        "network": network,
        "pods": pods.iter().map(PodStatus::to_json).collect::<Vec<_>>(),
    })
}
