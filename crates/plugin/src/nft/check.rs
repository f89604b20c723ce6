//! CHECK: the kernel's table compared with the plan; each difference is one readable line.

use super::batch::{hooknum, kind_name, table_obj};
use super::expr::Expr;
use super::read::{read_state, KChain, KRule, KState};
use super::validate::check_table;
use super::{expr, owner, owner_comment, wire, NftError};
use crate::plan::Table;

pub(super) fn exprs_text(v: &[Expr]) -> String {
    v.iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Compares the kernel's table with the plan: `Ok` with one string per missing, extra or
/// different object (empty when they agree), `Err` when the state could not be read. Rules are
/// numbered from 1 in plan order and matched in order by comment and expressions, so a
/// reordered rule shows up as missing plus extra.
pub fn check(table: &Table) -> Result<Vec<String>, NftError> {
    check_table(table)?;
    let Some(k) = read_state(&table.name)? else {
        return Ok(vec![format!("{} absent", table_obj(&table.name))]);
    };
    let mut problems = table_problems(&table.name, &k);
    for c in &table.chains {
        let Some(kc) = k.chains.iter().find(|kc| kc.name == c.name) else {
            problems.push(format!("chain {} missing", c.name));
            continue;
        };
        problems.extend(chain_problems(c, kc));
        let have: Vec<&KRule> = k.rules.iter().filter(|r| r.chain == c.name).collect();
        problems.extend(rule_problems(c, &have));
    }
    for kc in &k.chains {
        if !table.chains.iter().any(|c| c.name == kc.name) {
            problems.push(format!("extra chain {}", kc.name));
        }
    }
    Ok(problems)
}

/// The table itself: dormant, another layout's comment, objects we never create.
pub(super) fn table_problems(name: &str, k: &KState) -> Vec<String> {
    let mut problems = Vec::new();
    if k.table.flags & wire::NFT_TABLE_F_DORMANT != 0 {
        problems.push(format!("{} is dormant (no rule runs)", table_obj(name)));
    }
    if !owner::is_ours(name, &k.table) {
        problems.push(format!(
            "{} is not ours (comment {:?}): another program's table under our tableName",
            table_obj(name),
            k.table.comment
        ));
    } else if k.table.comment != owner_comment() {
        problems.push(format!(
            "{} has comment {:?}, want {:?} (programmed by another release's layout)",
            table_obj(name),
            k.table.comment,
            owner_comment()
        ));
    }
    for o in &k.others {
        problems.push(format!("extra {o} in {}", table_obj(name)));
    }
    problems
}

/// A chain's hook, priority, type and policy.
pub(super) fn chain_problems(c: &crate::plan::Chain, k: &KChain) -> Vec<String> {
    let mut problems = Vec::new();
    let want_hook = (hooknum(c.hook), c.priority);
    if k.hook != Some(want_hook) {
        problems.push(format!(
            "chain {}: hook/priority {:?} (hooknum, priority), want {:?}",
            c.name, k.hook, want_hook
        ));
    }
    if k.kind != kind_name(c.kind) {
        problems.push(format!(
            "chain {}: type {:?}, want {:?}",
            c.name,
            k.kind,
            kind_name(c.kind)
        ));
    }
    if k.policy != Some(wire::NF_ACCEPT) {
        problems.push(format!(
            "chain {}: policy {:?}, want accept",
            c.name, k.policy
        ));
    }
    problems
}

/// A chain's rules against the kernel's (`have`, in kernel order): each planned rule is found
/// in order by comment and expressions; one with the same comment but other expressions is
/// the planned rule, changed.
pub(super) fn rule_problems(c: &crate::plan::Chain, have: &[&KRule]) -> Vec<String> {
    let mut problems = Vec::new();
    let extras = |problems: &mut Vec<String>, skipped: &[&KRule], before: usize| {
        for extra in skipped {
            problems.push(format!(
                "chain {}: extra rule handle {} ({:?}) before rule {before}",
                c.name, extra.handle, extra.comment
            ));
        }
    };
    let mut pos = 0;
    for (i, r) in c.rules.iter().enumerate() {
        let want = expr::lower_rule(r);
        let rest = &have[pos..];
        if let Some(off) = rest
            .iter()
            .position(|k| k.comment == r.comment && k.exprs == want)
        {
            extras(&mut problems, &rest[..off], i + 1);
            pos += off + 1;
        } else if let Some(off) = rest.iter().position(|k| k.comment == r.comment) {
            // Reported once as different (not also as extra); matching continues after it.
            extras(&mut problems, &rest[..off], i + 1);
            problems.push(format!(
                "chain {}: rule {} ({:?}) differs: want {}, kernel has {}",
                c.name,
                i + 1,
                r.comment,
                exprs_text(&want),
                exprs_text(&rest[off].exprs)
            ));
            pos += off + 1;
        } else {
            problems.push(format!(
                "chain {}: rule {} ({:?}) missing",
                c.name,
                i + 1,
                r.comment
            ));
        }
    }
    for extra in &have[pos.min(have.len())..] {
        problems.push(format!(
            "chain {}: extra rule handle {} ({:?}) at the end",
            c.name, extra.handle, extra.comment
        ));
    }
    problems
}
