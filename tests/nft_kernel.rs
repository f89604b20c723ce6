//! Root tests for `nft`: our netlink batch against the kernel, with `nft` itself as the oracle.

mod common;

use common::Netns;
use tproxy_cni_plugin::nft;
use tproxy_cni_plugin::plan::{Action, Chain, ChainKind, Hook, MarkBits, Match, Rule, Table};
use tproxy_cni_policy::{Family, PortRange};

/// Runs `f` on a fresh thread inside `ns` (the test thread never changes netns).
fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    tproxy_cni_plugin::run_in(&ns.path(), f).expect("enter the test netns")
}

fn rule(matches: Vec<Match>, actions: Vec<Action>, comment: &str) -> Rule {
    Rule {
        matches,
        actions,
        comment: comment.into(),
    }
}

/// One bit of ours, matched and set alone (the plan's form; docs/ARCHITECTURE.md, pitfall 31).
const M: MarkBits = MarkBits {
    value: 0x1000,
    mask: 0x1000,
};

/// A ~12-rule tproxy table touching every expression kind a filter/route chain can hold.
fn tproxy_table(name: &str) -> Table {
    let tcp = Match::L4ProtoTcp;
    Table {
        name: name.into(),
        chains: vec![
            Chain {
                name: "prerouting".into(),
                kind: ChainKind::Filter,
                hook: Hook::Prerouting,
                priority: -150,
                rules: vec![
                    rule(
                        vec![Match::IifName("lo".into()), Match::Mark(M)],
                        vec![Action::SetCtMark(M)],
                        "proxy to app leg",
                    ),
                    rule(
                        vec![Match::IifName("lo".into())],
                        vec![Action::Accept],
                        "loopback",
                    ),
                    rule(
                        vec![Match::CtDirectionReply],
                        vec![Action::Accept],
                        "replies",
                    ),
                    rule(
                        vec![tcp.clone(), Match::TcpDport(PortRange::single(15021))],
                        vec![Action::Accept],
                        "excluded port",
                    ),
                    rule(
                        vec![
                            tcp.clone(),
                            Match::TcpDport(PortRange { lo: 9000, hi: 9100 }),
                        ],
                        vec![Action::Accept],
                        "excluded range",
                    ),
                    rule(
                        vec![
                            Match::Nfproto(Family::V4),
                            Match::Saddr("10.16.0.0/12".parse().unwrap()),
                        ],
                        vec![Action::Accept],
                        "v4 source",
                    ),
                    rule(
                        vec![
                            Match::Nfproto(Family::V6),
                            Match::Saddr("fd00::/8".parse().unwrap()),
                        ],
                        vec![Action::Accept],
                        "v6 source",
                    ),
                    rule(
                        vec![
                            Match::Nfproto(Family::V4),
                            Match::Daddr("10.1.2.3/32".parse().unwrap()),
                        ],
                        vec![Action::Return],
                        "",
                    ),
                    rule(
                        vec![tcp.clone()],
                        vec![
                            Action::Tproxy { port: 15006 },
                            Action::SetMark(M),
                            Action::Accept,
                        ],
                        "inbound to the sidecar (tproxy)",
                    ),
                    rule(
                        vec![tcp, Match::CtStateNew],
                        vec![Action::RejectTcpReset],
                        "fail-closed",
                    ),
                ],
            },
            Chain {
                name: "output".into(),
                kind: ChainKind::Route,
                hook: Hook::Output,
                priority: -150,
                rules: vec![rule(
                    vec![Match::CtMark(M)],
                    vec![Action::SetMark(M)],
                    "app replies back to the proxy",
                )],
            },
        ],
    }
}

/// Redirect inbound + outbound capture: nat chains, uid/gid, oifname, /0 and v6 daddr.
fn redirect_table(name: &str) -> Table {
    let tcp = Match::L4ProtoTcp;
    Table {
        name: name.into(),
        chains: vec![
            Chain {
                name: "prerouting_nat".into(),
                kind: ChainKind::Nat,
                hook: Hook::Prerouting,
                priority: -100,
                rules: vec![
                    rule(
                        vec![Match::IifName("lo".into())],
                        vec![Action::Accept],
                        "loopback",
                    ),
                    rule(
                        vec![tcp.clone()],
                        vec![Action::Redirect { port: 15006 }],
                        "inbound (redirect)",
                    ),
                ],
            },
            Chain {
                name: "output_nat".into(),
                kind: ChainKind::Nat,
                hook: Hook::Output,
                priority: -100,
                rules: vec![
                    rule(vec![Match::SkUid(1337)], vec![Action::Accept], "proxy uid"),
                    rule(vec![Match::SkGid(1337)], vec![Action::Accept], "proxy gid"),
                    rule(vec![Match::Mark(M)], vec![Action::Accept], "marked"),
                    rule(
                        vec![Match::OifName("lo".into())],
                        vec![Action::Accept],
                        "loopback",
                    ),
                    rule(
                        vec![
                            Match::Nfproto(Family::V6),
                            Match::Daddr("fd00::/16".parse().unwrap()),
                        ],
                        vec![Action::Accept],
                        "excluded range",
                    ),
                    rule(
                        vec![
                            Match::Nfproto(Family::V4),
                            Match::Daddr("0.0.0.0/0".parse().unwrap()),
                            tcp,
                        ],
                        vec![Action::Redirect { port: 15001 }],
                        "outbound range",
                    ),
                ],
            },
        ],
    }
}

fn list(ns: &Netns, table: &str) -> String {
    ns.sh(&format!("nft list table inet {table}"))
}

fn apply_in(ns: &Netns, t: &Table) -> Result<(), nft::NftError> {
    let t = t.clone();
    in_ns(ns, move || nft::apply(&t))
}

fn load_render(ns: &Netns, t: &Table) {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("r.nft");
    std::fs::write(&f, nft::render(t)).unwrap();
    ns.sh(&format!("nft -f {}", f.display()));
}

/// Our batch and `nft -f render()` give byte-for-byte the same listing, and render() equals it.
fn assert_same_as_nft(t: &Table) {
    let a = Netns::new("nfta");
    let b = Netns::new("nftb");
    apply_in(&a, t).expect("apply");
    load_render(&b, t);
    let ours = list(&a, &t.name);
    let theirs = list(&b, &t.name);
    assert_eq!(ours, theirs, "listing of our batch vs nft -f render()");
    assert_eq!(ours, nft::render(t), "render() is nft's own listing");
    // Register level: the netlink debug dump of both must match too (catches encodings that
    // list the same but differ, e.g. a payload length).
    let dbg = |ns: &Netns| ns.sh(&format!("nft --debug=netlink list table inet {}", t.name));
    assert_eq!(dbg(&a), dbg(&b));
}

#[test]
fn tproxy_table_equals_nft() {
    require_root!();
    assert_same_as_nft(&tproxy_table("tproxy_cni"));
}

#[test]
fn redirect_table_equals_nft() {
    require_root!();
    assert_same_as_nft(&redirect_table("tproxy_cni"));
}

#[test]
fn json_listing_matches_plan() {
    require_root!();
    let ns = Netns::new("nftj");
    let t = tproxy_table("tproxy_cni");
    apply_in(&ns, &t).unwrap();
    let js = ns.sh("nft -j list table inet tproxy_cni");
    let parsed: nftables::schema::Nftables = serde_json::from_str(&js).unwrap();
    use nftables::schema::NfListObject;
    let mut chains = Vec::new();
    let mut comments = Vec::new();
    for o in parsed.objects.iter() {
        match o {
            nftables::schema::NfObject::ListObject(NfListObject::Chain(c)) => {
                chains.push((
                    c.name.to_string(),
                    c.hook.map(|h| format!("{h:?}")),
                    c.prio,
                    c._type.map(|h| format!("{h:?}")),
                ));
            }
            nftables::schema::NfObject::ListObject(NfListObject::Rule(r)) => {
                comments.push((
                    r.chain.to_string(),
                    r.comment.as_deref().map(str::to_string),
                ));
            }
            _ => {}
        }
    }
    assert_eq!(
        chains,
        vec![
            (
                "prerouting".into(),
                Some("Prerouting".into()),
                Some(-150),
                Some("Filter".into())
            ),
            (
                "output".into(),
                Some("Output".into()),
                Some(-150),
                Some("Route".into())
            ),
        ]
    );
    let want: Vec<(String, Option<String>)> = t
        .chains
        .iter()
        .flat_map(|c| {
            c.rules.iter().map(|r| {
                (
                    c.name.clone(),
                    (!r.comment.is_empty()).then(|| r.comment.clone()),
                )
            })
        })
        .collect();
    assert_eq!(
        comments, want,
        "rules in plan order (appended, not prepended)"
    );
}

#[test]
fn apply_twice_is_same_state_and_check_passes() {
    require_root!();
    let ns = Netns::new("nft2");
    let t = tproxy_table("tproxy_cni");
    apply_in(&ns, &t).unwrap();
    let first = list(&ns, "tproxy_cni");
    let t2 = t.clone();
    assert_eq!(
        in_ns(&ns, move || nft::check(&t2)).unwrap(),
        Vec::<String>::new()
    );
    apply_in(&ns, &t).unwrap();
    assert_eq!(list(&ns, "tproxy_cni"), first);
    // A different plan replaces the content atomically (no leftovers of the first).
    let mut r = redirect_table("tproxy_cni");
    apply_in(&ns, &r).unwrap();
    assert_eq!(list(&ns, "tproxy_cni"), nft::render(&r));
    r.chains.pop();
    apply_in(&ns, &r).unwrap();
    assert_eq!(list(&ns, "tproxy_cni"), nft::render(&r));
}

fn handles(ns: &Netns, chain: &str) -> Vec<(u64, String)> {
    ns.sh(&format!("nft -a list chain inet tproxy_cni {chain}"))
        .lines()
        .filter_map(|l| {
            let (body, h) = l.rsplit_once(" # handle ")?;
            Some((h.trim().parse().ok()?, body.trim().to_string()))
        })
        .filter(|(_, b)| !b.starts_with("chain") && !b.starts_with("type"))
        .collect()
}

#[test]
fn check_detects_drift() {
    require_root!();
    let ns = Netns::new("nftc");
    let t = tproxy_table("tproxy_cni");
    let chk = |ns: &Netns| {
        let t = t.clone();
        in_ns(ns, move || nft::check(&t)).expect("check reads the kernel")
    };
    assert_eq!(chk(&ns), vec!["table inet tproxy_cni absent".to_string()]);
    apply_in(&ns, &t).unwrap();
    assert_eq!(chk(&ns), Vec::<String>::new());

    // Delete rule 4 ("excluded port") by handle.
    let hs = handles(&ns, "prerouting");
    let (h, body) = &hs[3];
    assert!(body.contains("excluded port"), "{body}");
    ns.sh(&format!(
        "nft delete rule inet tproxy_cni prerouting handle {h}"
    ));
    let errs = chk(&ns);
    assert_eq!(
        errs,
        vec!["chain prerouting: rule 4 (\"excluded port\") missing".to_string()]
    );

    // An extra foreign rule and a changed rule are reported.
    apply_in(&ns, &t).unwrap();
    ns.sh("nft add rule inet tproxy_cni prerouting meta l4proto udp accept");
    let errs = chk(&ns);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("chain prerouting: extra rule handle"),
        "{errs:?}"
    );

    // A rule changed in place (same comment, other port) is reported once, as different.
    apply_in(&ns, &t).unwrap();
    let (h, _) = handles(&ns, "prerouting")[3].clone();
    ns.sh(&format!(
        "nft replace rule inet tproxy_cni prerouting handle {h} tcp dport 15022 accept comment '\"excluded port\"'"
    ));
    let errs = chk(&ns);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("chain prerouting: rule 4 (\"excluded port\") differs: want"),
        "{errs:?}"
    );
    eprintln!("check message: {}", errs[0]);

    // A deleted chain.
    apply_in(&ns, &t).unwrap();
    ns.sh("nft delete chain inet tproxy_cni output");
    assert_eq!(chk(&ns), vec!["chain output missing".to_string()]);

    // A wrong priority.
    apply_in(&ns, &t).unwrap();
    let mut other = t.clone();
    other.chains[1].priority = -140;
    let errs = in_ns(&ns, move || nft::check(&other)).unwrap();
    assert!(errs[0].contains("hook/priority"), "{errs:?}");

    // An absent table again.
    assert!(in_ns(&ns, || nft::delete("tproxy_cni")).unwrap());
    assert_eq!(chk(&ns), vec!["table inet tproxy_cni absent".to_string()]);
}

#[test]
fn delete_is_idempotent_and_spares_other_tables() {
    require_root!();
    let ns = Netns::new("nftd");
    ns.sh("nft add table inet other_mesh");
    ns.sh("nft add chain inet other_mesh c '{ type filter hook prerouting priority 0; }'");
    apply_in(&ns, &tproxy_table("tproxy_cni")).unwrap();
    assert!(in_ns(&ns, || nft::exists("tproxy_cni")).unwrap());
    assert!(in_ns(&ns, || nft::delete("tproxy_cni")).unwrap());
    assert!(!in_ns(&ns, || nft::delete("tproxy_cni")).unwrap());
    assert!(!in_ns(&ns, || nft::exists("tproxy_cni")).unwrap());
    // `exists` means "a table of ours" (docs/ARCHITECTURE.md, pitfall 64); theirs is not, and
    // deleting it by name is refused.
    assert!(!in_ns(&ns, || nft::exists("other_mesh")).unwrap());
    let e = in_ns(&ns, || nft::delete("other_mesh")).unwrap_err();
    assert!(e.to_string().contains("not ours"), "{e}");
    assert!(ns.sh("nft list ruleset").contains("table inet other_mesh"));
}

#[test]
fn rejected_batches_leave_nothing() {
    require_root!();
    let ns = Netns::new("nftr");
    // A route chain only exists at the output hook.
    let mut bad = tproxy_table("tproxy_cni");
    bad.chains[1].hook = Hook::Prerouting;
    let e = apply_in(&ns, &bad).unwrap_err().to_string();
    assert!(e.contains("chain output"), "{e}");
    assert!(!in_ns(&ns, || nft::exists("tproxy_cni")).unwrap());
    // redirect is only valid in a nat chain; the rule is the 9th of the batch's rules.
    let mut bad = tproxy_table("tproxy_cni");
    bad.chains[0].rules[8].actions = vec![Action::Redirect { port: 15006 }];
    let e = apply_in(&ns, &bad).unwrap_err().to_string();
    eprintln!("rejected batch error: {e}");
    assert!(e.contains("rule 9"), "{e}");
    assert!(e.contains("Operation not supported"), "{e}");
    assert!(!in_ns(&ns, || nft::exists("tproxy_cni")).unwrap());
    assert_eq!(ns.sh("nft list ruleset"), "");
    // A failed replace keeps the previous content.
    let good = tproxy_table("tproxy_cni");
    apply_in(&ns, &good).unwrap();
    let before = list(&ns, "tproxy_cni");
    apply_in(&ns, &bad).unwrap_err();
    assert_eq!(list(&ns, "tproxy_cni"), before);
}

#[test]
fn invalid_names_are_errors() {
    require_root!();
    let ns = Netns::new("nftn");
    let mut t = tproxy_table(&"x".repeat(300));
    assert!(matches!(
        apply_in(&ns, &t),
        Err(nft::NftError::Invalid { .. })
    ));
    t.name = "tproxy_cni".into();
    t.chains[0].rules[0].matches[0] = Match::IifName("a-very-long-ifname".into());
    assert!(matches!(
        apply_in(&ns, &t),
        Err(nft::NftError::Invalid { .. })
    ));
    assert!(!in_ns(&ns, || nft::exists("tproxy_cni")).unwrap());
}

fn median_us(mut v: Vec<u128>) -> u128 {
    v.sort();
    v[v.len() / 2]
}

/// Quick timing figure (printed; run with --nocapture): apply() of the ~12-rule table into a
/// fresh netns, and delete(); median of 50.
#[test]
fn timing_apply_delete() {
    require_root!();
    let mut ap = Vec::new();
    let mut del = Vec::new();
    let mut re = Vec::new();
    for _ in 0..50 {
        let ns = Netns::new("nftt");
        let (a, r, d) = in_ns(&ns, || {
            let t = tproxy_table("tproxy_cni");
            let s = std::time::Instant::now();
            nft::apply(&t).unwrap();
            let a = s.elapsed().as_micros();
            let s = std::time::Instant::now();
            nft::apply(&t).unwrap();
            let r = s.elapsed().as_micros();
            let s = std::time::Instant::now();
            assert!(nft::delete("tproxy_cni").unwrap());
            (a, r, s.elapsed().as_micros())
        });
        ap.push(a);
        re.push(r);
        del.push(d);
    }
    eprintln!(
        "TIMING apply(fresh) median {} us, apply(replace) median {} us, delete median {} us",
        median_us(ap),
        median_us(re),
        median_us(del)
    );
}

/// The golden render files (checked by the unit tests) are exactly what nft lists after
/// loading them: the goldens are nft's canonical text, not just text nft accepts.
#[test]
fn golden_files_are_nft_listings() {
    require_root!();
    for f in ["tproxy.nft", "redirect_outbound.nft"] {
        let ns = Netns::new("nftg");
        let path = format!("{}/tests/testdata/nft/{f}", env!("CARGO_MANIFEST_DIR"));
        ns.sh(&format!("nft -f {path}"));
        let want = std::fs::read_to_string(&path).unwrap();
        assert_eq!(list(&ns, "tproxy_cni"), want, "{f}");
    }
}

/// docs/ARCHITECTURE.md, pitfall 14: a batch of thousands of rules applies (one ACK, buffers
/// sized for the batch),
/// CHECK reads it all back, and a kernel refusal deep in a big batch is still reported with
/// the rule it concerns and leaves nothing.
#[test]
fn big_batches_apply_and_report_errors() {
    require_root!();
    let ns = Netns::new("nftbig");
    let mut t = tproxy_table("tproxy_cni");
    let extra: Vec<Rule> = (0..3000u16)
        .map(|i| {
            rule(
                vec![
                    Match::L4ProtoTcp,
                    Match::TcpDport(PortRange::single(20000 + i)),
                ],
                vec![Action::Accept],
                "excluded inbound port",
            )
        })
        .collect();
    t.chains[0].rules.splice(3..3, extra);
    apply_in(&ns, &t).expect("3000-rule batch");
    let t2 = t.clone();
    assert_eq!(
        in_ns(&ns, move || nft::check(&t2)).unwrap(),
        Vec::<String>::new()
    );
    let n = ns
        .sh("nft -a list chain inet tproxy_cni prerouting")
        .matches("# handle")
        .count();
    // One handle per rule plus the chain's own.
    assert_eq!(n, t.chains[0].rules.len() + 1);
    assert!(in_ns(&ns, || nft::delete("tproxy_cni")).unwrap());
    // Rule 2900 of the prerouting chain is invalid (redirect outside a nat chain).
    t.chains[0].rules[2899].actions = vec![Action::Redirect { port: 15006 }];
    let e = apply_in(&ns, &t).unwrap_err().to_string();
    assert!(e.contains("rule 2900"), "{e}");
    assert!(!in_ns(&ns, || nft::exists("tproxy_cni")).unwrap());
}

/// CHECK reports a dormant table (no rule runs), an extra set, an extra chain and a
/// table of another layout; before, all of these passed.
#[test]
fn check_reports_dormant_table_extra_objects_and_old_layout() {
    require_root!();
    let t = tproxy_table("tproxy_cni");
    let chk = |ns: &Netns| {
        let t = t.clone();
        in_ns(ns, move || nft::check(&t)).expect("check reads the kernel")
    };
    let ns = Netns::new("nftk");
    apply_in(&ns, &t).unwrap();
    assert_eq!(chk(&ns), Vec::<String>::new());

    ns.sh("nft add table inet tproxy_cni '{ flags dormant; }'");
    let d = chk(&ns);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].contains("dormant"), "{d:?}");

    apply_in(&ns, &t).unwrap();
    ns.sh("nft add set inet tproxy_cni allow '{ type ipv4_addr; }'");
    let d = chk(&ns);
    assert_eq!(
        d,
        vec!["extra set allow in table inet tproxy_cni".to_string()]
    );

    apply_in(&ns, &t).unwrap();
    ns.sh("nft add chain inet tproxy_cni sneaky");
    assert_eq!(chk(&ns), vec!["extra chain sneaky".to_string()]);

    // The same rules in a table without our owner comment (a layout from before the tag) or
    // with another layout number: drift, not an error.
    for comment in [None, Some("tproxy-cni layout 0")] {
        let other = Netns::new("nftk");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("r.nft");
        let mut text = nft::render(&t);
        let ours = format!("\tcomment \"{}\"\n", nft::owner_comment());
        text = text.replace(
            &ours,
            &comment
                .map(|c| format!("\tcomment \"{c}\"\n"))
                .unwrap_or_default(),
        );
        std::fs::write(&f, text).unwrap();
        other.sh(&format!("nft -f {}", f.display()));
        let d = chk(&other);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("another release's layout"), "{d:?}");
    }
}

/// docs/ARCHITECTURE.md, pitfall 64: tables are found by their owner comment, whatever their name; foreign tables
/// (no comment, or someone else's) are never listed or deleted.
#[test]
fn owned_tables_are_found_by_comment_not_name() {
    require_root!();
    let ns = Netns::new("nfto");
    apply_in(&ns, &tproxy_table("tproxy_cni")).unwrap();
    apply_in(&ns, &redirect_table("renamed_by_a_later_release")).unwrap();
    ns.sh("nft add table inet other_mesh '{ comment \"istio\"; }'");
    ns.sh("nft add table inet plain");
    let mut owned = in_ns(&ns, nft::owned_tables).unwrap();
    owned.sort();
    assert_eq!(owned, vec!["renamed_by_a_later_release", "tproxy_cni"]);
    let gone = in_ns(&ns, || nft::delete_owned_except(Some("tproxy_cni"))).unwrap();
    assert_eq!(gone, vec!["renamed_by_a_later_release"]);
    let gone = in_ns(&ns, || nft::delete_owned_except(None)).unwrap();
    assert_eq!(gone, vec!["tproxy_cni"]);
    let tables = ns.sh("nft list tables");
    assert_eq!(tables, "table inet other_mesh\ntable inet plain\n");
}
