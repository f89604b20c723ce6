//! Canonical `nft -f` text of a plan table, laid out as `nft list table` prints it (nft 1.0.x):
//! golden tests need no root, and loading it with `nft -f` must give the kernel exactly what our
//! batch gives (the root tests compare the two listings).

use crate::plan::{Action, Chain, ChainKind, Hook, MarkBits, Match, Table};
use std::fmt::Write;
use tproxy_cni_policy::Family;

fn kind(k: ChainKind) -> &'static str {
    match k {
        ChainKind::Filter => "filter",
        ChainKind::Route => "route",
        ChainKind::Nat => "nat",
    }
}

pub(crate) fn hook(h: Hook) -> &'static str {
    match h {
        Hook::Prerouting => "prerouting",
        Hook::Input => "input",
        Hook::Output => "output",
        Hook::Postrouting => "postrouting",
    }
}

/// nft's standard priority names for inet, in nft's lookup order; `dstnat` and `srcnat` only
/// name a priority at the hook they belong to. nft prints `name +/- n` for |n| <= 10.
pub(crate) fn priority(h: Hook, p: i32) -> String {
    let table: [(&str, i32, Option<Hook>); 6] = [
        ("raw", -300, None),
        ("mangle", -150, None),
        ("dstnat", -100, Some(Hook::Prerouting)),
        ("filter", 0, None),
        ("security", 50, None),
        ("srcnat", 100, Some(Hook::Postrouting)),
    ];
    for (name, val, only) in table {
        if only.is_some_and(|o| o != h) {
            continue;
        }
        let off = i64::from(p) - i64::from(val);
        if off == 0 {
            return name.to_string();
        }
        if (-10..=10).contains(&off) {
            let sign = if off > 0 { '+' } else { '-' };
            return format!("{name} {sign} {}", off.abs());
        }
    }
    p.to_string()
}

fn fam(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn cidr(c: &tproxy_cni_policy::Cidr) -> String {
    if c.prefix() == c.family().max_prefix() {
        c.addr().to_string()
    } else {
        c.to_string()
    }
}

fn matches(ms: &[Match]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, m) in ms.iter().enumerate() {
        let next = ms.get(i + 1);
        let s = match m {
            // nft lists an explicit dependency only when the next match does not imply it.
            Match::L4ProtoTcp if matches!(next, Some(Match::TcpDport(_))) => continue,
            Match::Nfproto(f) if matches!(next, Some(Match::Saddr(c) | Match::Daddr(c)) if c.family() == *f) => {
                continue
            }
            Match::IifName(n) => format!("iifname \"{n}\""),
            Match::OifName(n) => format!("oifname \"{n}\""),
            Match::Nfproto(f) => {
                format!("meta nfproto ipv{}", if *f == Family::V4 { 4 } else { 6 })
            }
            Match::L4ProtoTcp => "meta l4proto tcp".into(),
            Match::TcpDport(r) => format!("tcp dport {r}"),
            Match::Saddr(c) => format!("{} saddr {}", fam(c.family()), cidr(c)),
            Match::Daddr(c) => format!("{} daddr {}", fam(c.family()), cidr(c)),
            Match::CtDirectionReply => "ct direction reply".into(),
            Match::CtStateNew => "ct state new".into(),
            Match::CtMark(b) => mark_match("ct mark", b),
            Match::Mark(b) => mark_match("meta mark", b),
            Match::SkUid(v) => format!("meta skuid {v}"),
            Match::SkGid(v) => format!("meta skgid {v}"),
        };
        out.push(s);
    }
    out
}

fn mark_match(what: &str, b: &MarkBits) -> String {
    if b.mask == u32::MAX {
        format!("{what} 0x{:08x}", b.value)
    } else {
        format!("{what} & 0x{:08x} == 0x{:08x}", b.mask, b.value & b.mask)
    }
}

/// nft prints `x & A | V` with A = the kept bits plus V (what its bitwise AND constant holds
/// after it folds the OR in), and `x | V` when A is all ones.
fn mark_set(what: &str, b: &MarkBits) -> String {
    let v = b.value & b.mask;
    if b.mask == u32::MAX {
        return format!("{what} set 0x{v:08x}");
    }
    let and = !b.mask | v;
    if and == u32::MAX {
        format!("{what} set {what} | 0x{v:08x}")
    } else if v == 0 {
        // Clearing our bits: nft lists no `| 0`.
        format!("{what} set {what} & 0x{and:08x}")
    } else {
        format!("{what} set {what} & 0x{and:08x} | 0x{v:08x}")
    }
}

fn action(a: &Action) -> String {
    match a {
        Action::SetMark(b) => mark_set("meta mark", b),
        Action::SetCtMark(b) => mark_set("ct mark", b),
        Action::Tproxy { port } => format!("tproxy to :{port}"),
        Action::Redirect { port } => format!("redirect to :{port}"),
        Action::RejectTcpReset => "reject with tcp reset".into(),
        Action::Accept => "accept".into(),
        Action::Return => "return".into(),
        Action::Counter => "counter".into(),
    }
}

fn chain(out: &mut String, c: &Chain) {
    let _ = writeln!(out, "\tchain {} {{", c.name);
    let _ = writeln!(
        out,
        "\t\ttype {} hook {} priority {}; policy accept;",
        kind(c.kind),
        hook(c.hook),
        priority(c.hook, c.priority)
    );
    for r in &c.rules {
        let mut parts = matches(&r.matches);
        parts.extend(r.actions.iter().map(action));
        if !r.comment.is_empty() {
            parts.push(format!("comment \"{}\"", r.comment));
        }
        let _ = writeln!(out, "\t\t{}", parts.join(" "));
    }
    out.push_str("\t}\n");
}

pub(crate) fn render(t: &Table) -> String {
    let mut out = format!(
        "table inet {} {{\n\tcomment \"{}\"\n",
        t.name,
        super::owner_comment()
    );
    for (i, c) in t.chains.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        chain(&mut out, c);
    }
    out.push_str("}\n");
    out
}
