//! Plan -> kernel: the one step between a plan and the nftables / rtnetlink calls.
//!
//! `apply` programs a plan (table first, then routing; a failed step undoes the table),
//! `remove` tears down everything of ours (keeps going and reports every failure), `verify`
//! compares the kernel with a plan (typed drift, separate from a failure to read). The two
//! kernel sides are narrow traits: [`Kernel`] is the real one (over `nft` and `routing`), and
//! the unit tests below use a recorder, so the orchestration is tested without root. Every
//! function works in the current network namespace; callers enter the pod's (or the host's
//! chosen) netns first with `netns::run_in`.

use std::fmt;

use crate::nft::NftError;
use crate::plan::{FwmarkRule, LocalRoute, Plan, PlanConfig, Routing, Table};
use crate::routing::RoutingError;
use tproxy_cni_policy::{Cidr, Family};

/// The nftables operations the apply layer needs.
pub trait Tables {
    /// Creates or atomically replaces our table with exactly `table`'s content.
    fn apply(&self, table: &Table) -> Result<(), NftError>;
    /// Deletes the table; `Ok(false)` when it was absent.
    fn delete(&self, name: &str) -> Result<bool, NftError>;
    /// Deletes every table carrying our owner comment except `keep`; returns the names deleted.
    fn delete_others(&self, keep: Option<&str>) -> Result<Vec<String>, NftError>;
    fn exists(&self, name: &str) -> Result<bool, NftError>;
    /// Names of the tables carrying our owner comment.
    fn owned(&self) -> Result<Vec<String>, NftError>;
    /// One line per difference between the kernel's table and `table`.
    fn check(&self, table: &Table) -> Result<Vec<String>, NftError>;
}

/// The policy-routing operations the apply layer needs.
pub trait Routes {
    /// Makes our rules, routes and lo addresses equal to `r` (undoes itself on failure).
    fn apply(&self, r: &Routing) -> Result<(), RoutingError>;
    /// Removes all of ours plus `r` by identity; every failure it met.
    fn delete(&self, r: &Routing) -> Result<(), Vec<RoutingError>>;
    /// One line per difference between the kernel and `r`.
    fn check(&self, r: &Routing) -> Result<Vec<String>, RoutingError>;
}

/// The real kernel: nf_tables and rtnetlink in the current network namespace.
#[derive(Debug, Clone, Copy, Default)]
pub struct Kernel;

impl Tables for Kernel {
    fn apply(&self, table: &Table) -> Result<(), NftError> {
        crate::nft::apply(table)
    }
    fn delete(&self, name: &str) -> Result<bool, NftError> {
        crate::nft::delete(name)
    }
    fn delete_others(&self, keep: Option<&str>) -> Result<Vec<String>, NftError> {
        crate::nft::delete_owned_except(keep)
    }
    fn exists(&self, name: &str) -> Result<bool, NftError> {
        crate::nft::exists(name)
    }
    fn owned(&self) -> Result<Vec<String>, NftError> {
        crate::nft::owned_tables()
    }
    fn check(&self, table: &Table) -> Result<Vec<String>, NftError> {
        crate::nft::check(table)
    }
}

impl Routes for Kernel {
    fn apply(&self, r: &Routing) -> Result<(), RoutingError> {
        crate::routing::apply(r)
    }
    fn delete(&self, r: &Routing) -> Result<(), Vec<RoutingError>> {
        crate::routing::delete(r)
    }
    fn check(&self, r: &Routing) -> Result<Vec<String>, RoutingError> {
        crate::routing::check(r)
    }
}

/// A kernel operation that failed (for `remove`: every one that failed).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("nftables: {0}")]
    Nft(#[from] NftError),
    #[error("policy routing: {0}")]
    Routing(#[from] RoutingError),
    /// Teardown met several failures; all of them, in the order met.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Teardown(Vec<Error>),
}

impl Error {
    /// Whether some failure is a table of our name that is not ours (left alone on purpose,
    /// docs/ARCHITECTURE.md, pitfall 64): a configuration mistake, not a kernel failure.
    pub(crate) fn has_foreign_table(&self) -> bool {
        match self {
            Error::Nft(NftError::NotOurs { .. }) => true,
            Error::Teardown(v) => v.iter().any(Error::has_foreign_table),
            _ => false,
        }
    }
    /// Whether every failure is such a table (everything of ours was removed).
    pub(crate) fn only_foreign_tables(&self) -> bool {
        match self {
            Error::Nft(NftError::NotOurs { .. }) => true,
            Error::Teardown(v) => v.iter().all(Error::only_foreign_tables),
            _ => false,
        }
    }
}

/// One way the kernel differs from the plan (CHECK's 101, as opposed to a read [`Error`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// Our table is absent or differs from the plan (the text names the object).
    Table(String),
    /// Our table exists although the plan has none (mode `none`).
    Unwanted(String),
    /// A table with our owner comment under another name.
    ExtraTable(String),
    /// A rule, route or lo address of ours is missing, duplicated or not in the plan.
    Routing(String),
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::Table(d) | Drift::Routing(d) => f.write_str(d),
            Drift::Unwanted(t) => write!(f, "table inet {t} present but the mode is none"),
            Drift::ExtraTable(t) => write!(f, "extra table inet {t} of ours"),
        }
    }
}

/// Programs `plan`: the table first (one atomic batch), then tables of ours under another name
/// go, then routing. If a later step fails, the table goes too, so a failed apply leaves
/// nothing of this plan behind (routing undoes itself). Both steps also remove what is ours
/// but not in the plan (another mode's rules, another release's numbers).
pub(crate) fn apply(t: &dyn Tables, r: &dyn Routes, plan: &Plan) -> Result<(), Error> {
    if let Some(table) = &plan.table {
        t.apply(table)?;
        if let Err(e) = t.delete_others(Some(&table.name)) {
            undo_table(t, &table.name, "removing stale tables failed");
            return Err(e.into());
        }
    }
    if let Err(e) = r.apply(&plan.routing) {
        if let Some(table) = &plan.table {
            undo_table(t, &table.name, "routing failed");
        }
        return Err(e.into());
    }
    Ok(())
}

fn undo_table(t: &dyn Tables, name: &str, why: &str) {
    if let Err(undo) = t.delete(name) {
        log::warn!("removing table {name} after {why}: {undo}");
    }
}

/// Removes everything of ours: the table `table_name`, every other table with our owner
/// comment, and the routing objects of `owned` (see [`owned_routing`]) plus every tagged one.
/// Absent objects are not errors. A table `table_name` without our owner comment is left alone
/// and reported ([`Error::only_foreign_tables`] tells the caller nothing else failed). Keeps
/// going after a failure and returns all of them.
pub(crate) fn remove(
    t: &dyn Tables,
    r: &dyn Routes,
    table_name: &str,
    owned: &Routing,
) -> Result<(), Error> {
    let mut errs: Vec<Error> = Vec::new();
    match t.delete(table_name) {
        // A name we refuse is a table we never created: nothing to remove.
        Ok(_) | Err(NftError::Invalid { .. }) => {}
        Err(e) => errs.push(e.into()),
    }
    if let Err(e) = t.delete_others(None) {
        errs.push(e.into());
    }
    if let Err(es) = r.delete(owned) {
        errs.extend(es.into_iter().map(Error::from));
    }
    match errs.len() {
        0 => Ok(()),
        1 => Err(errs.remove(0)),
        _ => Err(Error::Teardown(errs)),
    }
}

/// Compares the kernel with `plan` (whose table, when it has one, is named `table_name`):
/// every difference as [`Drift`], empty when they agree; `Err` only when the kernel could not
/// be read.
pub fn verify(
    t: &dyn Tables,
    r: &dyn Routes,
    plan: &Plan,
    table_name: &str,
) -> Result<Vec<Drift>, Error> {
    let mut drift = Vec::new();
    match &plan.table {
        Some(table) => drift.extend(t.check(table)?.into_iter().map(Drift::Table)),
        None => {
            if t.exists(table_name)? {
                drift.push(Drift::Unwanted(table_name.to_string()));
            }
        }
    }
    for other in t.owned()? {
        if other != table_name {
            drift.push(Drift::ExtraTable(other));
        }
    }
    drift.extend(r.check(&plan.routing)?.into_iter().map(Drift::Routing));
    Ok(drift)
}

/// What removal deletes by exact identity besides everything carrying our owner tags (see
/// `routing`): this configuration's rules and routes and the previous release's untagged
/// default rule, for both families, and `lo_addresses` (what the plan adds to lo).
/// Independent of the policy, which a DEL may not receive.
pub(crate) fn owned_routing(cfg: &PlanConfig, lo_addresses: &[Cidr]) -> Routing {
    let mut r = Routing::default();
    for family in [Family::V4, Family::V6] {
        r.rules.push(FwmarkRule {
            family,
            mark: cfg.mark,
            mask: cfg.mark,
            table: cfg.route_table,
            priority: cfg.rule_priority,
        });
        r.local_routes.push(LocalRoute {
            family,
            table: cfg.route_table,
        });
    }
    // The previous release's default rule (untagged, whole-mark): what it programmed is
    // cleaned by this release's removal too.
    for family in [Family::V4, Family::V6] {
        r.rules.push(FwmarkRule {
            family,
            mark: tproxy_cni_policy::consts::LEGACY_MARK,
            mask: u32::MAX,
            table: tproxy_cni_policy::consts::ROUTE_TABLE,
            priority: tproxy_cni_policy::consts::RULE_PRIORITY,
        });
    }
    r.lo_addresses = lo_addresses.to_vec();
    r
}

/// One line for logs: what a plan programs.
pub(crate) fn summary(plan: &Plan) -> String {
    let rules: usize = plan
        .table
        .iter()
        .flat_map(|t| &t.chains)
        .map(|c| c.rules.len())
        .sum();
    format!(
        "table {} ({rules} rules), {} policy rules, {} routes, {} lo addresses",
        plan.table.as_ref().map(|t| t.name.as_str()).unwrap_or("-"),
        plan.routing.rules.len(),
        plan.routing.local_routes.len(),
        plan.routing.lo_addresses.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use tproxy_cni_policy::{Defaults, Mode, PodPolicy};

    /// Records every call, in order, across both sides; fails the operations named in `fail`.
    #[derive(Default)]
    struct Recorder {
        calls: RefCell<Vec<String>>,
        fail: Vec<&'static str>,
        /// What `owned`/`exists` report, and the drift lines `check` returns.
        owned: Vec<String>,
        drift: Vec<String>,
    }

    impl Recorder {
        fn failing(ops: &[&'static str]) -> Recorder {
            Recorder {
                fail: ops.to_vec(),
                ..Recorder::default()
            }
        }
        fn call(&self, op: &'static str, arg: &str) -> bool {
            self.calls.borrow_mut().push(format!("{op} {arg}"));
            self.fail.contains(&op)
        }
        fn calls(&self) -> Vec<String> {
            self.calls.borrow().clone()
        }
        fn nft(&self, op: &'static str, arg: &str) -> Result<(), NftError> {
            match self.call(op, arg) {
                true => Err(NftError::Protocol(format!("{op} failed"))),
                false => Ok(()),
            }
        }
        fn rt(&self, op: &'static str) -> Result<(), RoutingError> {
            match self.call(op, "") {
                true => Err(RoutingError::Decode {
                    what: op.into(),
                    detail: "failed".into(),
                }),
                false => Ok(()),
            }
        }
    }

    impl Tables for Recorder {
        fn apply(&self, table: &Table) -> Result<(), NftError> {
            self.nft("nft.apply", &table.name)
        }
        fn delete(&self, name: &str) -> Result<bool, NftError> {
            if name.contains('/') {
                self.call("nft.delete", name);
                return Err(NftError::Invalid {
                    object: name.into(),
                    reason: "bad".into(),
                });
            }
            self.nft("nft.delete", name).map(|()| true)
        }
        fn delete_others(&self, keep: Option<&str>) -> Result<Vec<String>, NftError> {
            self.nft("nft.delete_others", keep.unwrap_or("-"))
                .map(|()| vec![])
        }
        fn exists(&self, name: &str) -> Result<bool, NftError> {
            self.nft("nft.exists", name)
                .map(|()| self.owned.iter().any(|o| o == name))
        }
        fn owned(&self) -> Result<Vec<String>, NftError> {
            self.nft("nft.owned", "").map(|()| self.owned.clone())
        }
        fn check(&self, table: &Table) -> Result<Vec<String>, NftError> {
            self.nft("nft.check", &table.name)
                .map(|()| self.drift.clone())
        }
    }

    impl Routes for Recorder {
        fn apply(&self, _: &Routing) -> Result<(), RoutingError> {
            self.rt("rt.apply")
        }
        fn delete(&self, _: &Routing) -> Result<(), Vec<RoutingError>> {
            // Two failures, as a teardown that met a rule and a route it could not remove.
            self.rt("rt.delete").map_err(|e| {
                vec![
                    e,
                    RoutingError::Decode {
                        what: "route".into(),
                        detail: "also failed".into(),
                    },
                ]
            })
        }
        fn check(&self, _: &Routing) -> Result<Vec<String>, RoutingError> {
            self.rt("rt.check")
                .map(|()| vec!["missing ipv4 rule".to_string()])
        }
    }

    fn plan(mode: Mode) -> Plan {
        let policy = PodPolicy {
            mode,
            ..PodPolicy::from_annotations(&Default::default(), &Defaults::default())
                .expect("defaults are valid")
        };
        crate::plan::build(&PlanConfig::default(), &policy, &[], &[])
    }

    #[test]
    fn apply_programs_table_then_stale_tables_then_routing() {
        let k = Recorder::default();
        apply(&k, &k, &plan(Mode::Tproxy)).expect("apply");
        assert_eq!(
            k.calls(),
            [
                "nft.apply tproxy_cni",
                "nft.delete_others tproxy_cni",
                "rt.apply "
            ]
        );
    }

    #[test]
    fn routing_failure_after_the_table_committed_removes_the_table() {
        let k = Recorder::failing(&["rt.apply"]);
        let e = apply(&k, &k, &plan(Mode::Tproxy)).expect_err("routing fails");
        assert!(matches!(e, Error::Routing(_)), "{e:?}");
        assert_eq!(
            k.calls(),
            [
                "nft.apply tproxy_cni",
                "nft.delete_others tproxy_cni",
                "rt.apply ",
                "nft.delete tproxy_cni"
            ]
        );
    }

    #[test]
    fn stale_table_failure_removes_the_new_table_and_skips_routing() {
        let k = Recorder::failing(&["nft.delete_others"]);
        let e = apply(&k, &k, &plan(Mode::Redirect)).expect_err("sweep fails");
        assert!(matches!(e, Error::Nft(_)), "{e:?}");
        assert_eq!(
            k.calls(),
            [
                "nft.apply tproxy_cni",
                "nft.delete_others tproxy_cni",
                "nft.delete tproxy_cni"
            ]
        );
    }

    #[test]
    fn table_failure_touches_nothing_else() {
        let k = Recorder::failing(&["nft.apply"]);
        assert!(apply(&k, &k, &plan(Mode::Tproxy)).is_err());
        assert_eq!(k.calls(), ["nft.apply tproxy_cni"]);
    }

    #[test]
    fn remove_keeps_going_and_reports_every_failure() {
        let k = Recorder::failing(&["nft.delete", "nft.delete_others", "rt.delete"]);
        let owned = owned_routing(&PlanConfig::default(), &[]);
        let e = remove(&k, &k, "tproxy_cni", &owned).expect_err("all fail");
        assert_eq!(
            k.calls(),
            ["nft.delete tproxy_cni", "nft.delete_others -", "rt.delete "]
        );
        let Error::Teardown(all) = &e else {
            panic!("not a teardown error: {e:?}")
        };
        assert_eq!(all.len(), 4, "{e}");
        let text = e.to_string();
        for part in [
            "nft.delete failed",
            "nft.delete_others failed",
            "rt.delete",
            "also failed",
        ] {
            assert!(text.contains(part), "{part} missing from {text}");
        }
    }

    #[test]
    fn remove_of_nothing_and_of_a_refused_name_succeeds() {
        let k = Recorder::default();
        let owned = owned_routing(&PlanConfig::default(), &[]);
        remove(&k, &k, "tproxy_cni", &owned).expect("nothing to remove");
        remove(&k, &k, "bad/name", &owned).expect("a refused name was never created");
        // One failure stays itself (no teardown list of one).
        let k = Recorder::failing(&["nft.delete_others"]);
        let e = remove(&k, &k, "tproxy_cni", &owned).expect_err("fails");
        assert!(matches!(e, Error::Nft(_)), "{e:?}");
    }

    #[test]
    fn verify_separates_read_failures_from_drift() {
        for op in ["nft.check", "nft.owned", "rt.check"] {
            let k = Recorder::failing(&[op]);
            let e = verify(&k, &k, &plan(Mode::Tproxy), "tproxy_cni");
            assert!(e.is_err(), "{op}: a read failure is an error, not drift");
        }
        let k = Recorder {
            owned: vec!["tproxy_cni".into(), "tproxy_old".into()],
            drift: vec!["rule 3 missing".into()],
            ..Recorder::default()
        };
        let d = verify(&k, &k, &plan(Mode::Tproxy), "tproxy_cni").expect("read");
        assert_eq!(
            d,
            [
                Drift::Table("rule 3 missing".into()),
                Drift::ExtraTable("tproxy_old".into()),
                Drift::Routing("missing ipv4 rule".into()),
            ]
        );
        assert_eq!(d[1].to_string(), "extra table inet tproxy_old of ours");
    }

    #[test]
    fn verify_of_mode_none_reports_a_present_table() {
        let k = Recorder {
            owned: vec!["tproxy_cni".into()],
            ..Recorder::default()
        };
        let d = verify(&k, &k, &plan(Mode::None), "tproxy_cni").expect("read");
        assert_eq!(d[0], Drift::Unwanted("tproxy_cni".into()));
        assert_eq!(
            k.calls(),
            ["nft.exists tproxy_cni", "nft.owned ", "rt.check "]
        );
    }

    #[test]
    fn owned_routing_covers_both_families_and_the_legacy_rule() {
        let lo: Vec<Cidr> = vec!["::6/128".parse().expect("cidr")];
        let r = owned_routing(&PlanConfig::default(), &lo);
        assert_eq!(r.rules.len(), 4);
        assert_eq!(r.local_routes.len(), 2);
        assert!(r
            .rules
            .iter()
            .any(|x| x.mark == tproxy_cni_policy::consts::LEGACY_MARK && x.mask == u32::MAX));
        assert_eq!(r.lo_addresses, lo);
    }
}
