//! Ownership before destruction (docs/ARCHITECTURE.md, pitfall 64): we replace or delete only
//! tables that carry our owner comment, and we address them by the handle we read them with.
//!
//! `tableName` comes from a conflist or the host CLI's `--config`, so it can name any table
//! in the netns, such as a firewall's `inet filter`. Before any replace or delete the table is
//! read: a table of that name without our comment is an error naming it, and is left alone.
//! The delete in the batch then names the table by its kernel handle, not its name, so a table
//! swapped in under the same name after the look is never the one deleted (the kernel answers
//! `ENOENT`, and the caller looks again).

use super::{table_obj, wire, KTable, NftError, OWNER_TAG};
use tproxy_cni_policy::consts::TABLE_NAME;

/// Whether the kernel's table `name` is ours: it carries our owner comment (any layout), or it
/// is the one table the release before the owner tag made, our default name with no comment
/// at all (so DEL and re-ADD still clean pods of that release).
pub(super) fn is_ours(name: &str, k: &KTable) -> bool {
    k.comment.starts_with(OWNER_TAG) || (k.comment.is_empty() && name == TABLE_NAME)
}

/// The error for a table of `name` that is not ours.
pub(super) fn not_ours(name: &str, k: &KTable) -> NftError {
    NftError::NotOurs {
        table: table_obj(name),
        comment: k.comment.clone(),
    }
}

/// Names the table to delete: by its handle when the kernel gave one, else by name.
pub(super) fn put_table_ref(m: &mut wire::Msg, name: &str, handle: Option<u64>) {
    match handle {
        Some(h) => {
            m.put(wire::NFTA_TABLE_HANDLE, &h.to_be_bytes());
        }
        None => {
            m.put_str(wire::NFTA_TABLE_NAME, name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(comment: &str) -> KTable {
        KTable {
            flags: 0,
            comment: comment.into(),
            handle: Some(7),
        }
    }

    #[test]
    fn ours_is_our_comment_or_the_untagged_default_table() {
        assert!(is_ours("filter", &k("tproxy-cni layout 1")));
        assert!(is_ours("renamed", &k("tproxy-cni layout 0")));
        assert!(is_ours(TABLE_NAME, &k("")));
        assert!(!is_ours("filter", &k("")));
        assert!(!is_ours(TABLE_NAME, &k("site firewall")));
        assert!(!is_ours("filter", &k("tproxy-cni")));
        let e = not_ours("filter", &k("site firewall")).to_string();
        assert!(
            e.contains("table inet filter") && e.contains("site firewall"),
            "{e}"
        );
        let mut m = wire::Msg::nft(wire::NFT_MSG_DELTABLE, 0, 1, wire::NFPROTO_INET);
        put_table_ref(&mut m, "filter", Some(0x0102));
        let bytes = m.finish();
        // NFTA_TABLE_HANDLE (4), 12 bytes, the handle big-endian; no name.
        let attrs = &bytes[20..];
        assert_eq!(&attrs[..4], &[12, 0, 4, 0]);
        assert_eq!(&attrs[4..12], &0x0102u64.to_be_bytes());
        assert_eq!(attrs.len(), 12);
    }
}
