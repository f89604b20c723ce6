//! What the kernel would refuse, refused before a batch is sent: name and comment lengths,
//! plain `nft` identifiers (so `render()` stays loadable), rule counts.

use super::batch::table_obj;
use super::{invalid, NftError, MAX_RULES};
use crate::plan::Table;

/// Longest table/chain name the kernel takes (`NFT_NAME_MAXLEN` 256 includes the NUL).
pub(super) const NAME_MAX: usize = 255;
/// `IFNAMSIZ` 16 includes the NUL.
pub(super) const IFNAME_MAX: usize = 15;
/// nft's (libnftnl's) comment limit, `NFTNL_UDATA_COMMENT_MAXLEN`.
pub(super) const COMMENT_MAX: usize = 128;

/// Names must fit the kernel and be plain `nft` identifiers, so `render()` stays loadable.
pub(super) fn check_name(what: &str, name: &str) -> Result<(), NftError> {
    let obj = || format!("{what} name {name:?}");
    if name.is_empty() {
        return Err(invalid(obj(), "empty"));
    }
    if name.len() > NAME_MAX {
        return Err(invalid(
            obj(),
            format!("{} bytes, at most {NAME_MAX}", name.len()),
        ));
    }
    let ok_first = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !ok_first
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(invalid(
            obj(),
            "use letters, digits, '_', '-', '.', starting with a letter or '_'",
        ));
    }
    Ok(())
}

pub(super) fn check_table(t: &Table) -> Result<(), NftError> {
    check_name("table", &t.name)?;
    let rules: usize = t.chains.iter().map(|c| c.rules.len()).sum();
    if rules > MAX_RULES {
        return Err(invalid(
            table_obj(&t.name),
            format!("{rules} rules, at most {MAX_RULES} (shorten the port and range lists)"),
        ));
    }
    for c in &t.chains {
        check_name("chain", &c.name)?;
        for (i, r) in c.rules.iter().enumerate() {
            let obj = || format!("chain {} rule {}", c.name, i + 1);
            if r.comment.len() > COMMENT_MAX {
                return Err(invalid(
                    obj(),
                    format!(
                        "comment is {} bytes, at most {COMMENT_MAX}",
                        r.comment.len()
                    ),
                ));
            }
            if r.comment.chars().any(|ch| ch == '"' || ch.is_control()) {
                return Err(invalid(obj(), "comment holds '\"' or a control character"));
            }
            for m in &r.matches {
                if let crate::plan::Match::IifName(n) | crate::plan::Match::OifName(n) = m {
                    if n.is_empty() || n.len() > IFNAME_MAX {
                        return Err(invalid(
                            obj(),
                            format!("interface name {n:?} must be 1-{IFNAME_MAX} bytes"),
                        ));
                    }
                    // `*` would be a wildcard in nft text and `"`/`\` break quoting: the
                    // rendered rule would no longer be the rule we programmed.
                    if n.chars()
                        .any(|ch| matches!(ch, '"' | '*' | '\\' | '/') || ch.is_control())
                    {
                        return Err(invalid(
                            obj(),
                            format!("interface name {n:?} has a character nft cannot quote"),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}
