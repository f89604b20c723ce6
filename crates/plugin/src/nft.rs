//! Plan -> one atomic nf_tables netlink batch in the current netns; read-back for CHECK;
//! delete/exists; a canonical `nft -f` text render for golden tests. No `nft` binary at run time.
//!
//! Every call opens its own NETLINK_NETFILTER socket, so it acts on the netns of the calling
//! thread (callers enter the pod netns on a short-lived thread first, docs/ARCHITECTURE.md,
//! pitfall 7).
//!
//! - `wire`: netlink framing and the socket. Hand-written, not `netlink-packet-netfilter`,
//!   which lacks the ct/tproxy/reject/redir expressions (see its module comment).
//! - `expr`: plan matches/actions -> register-level expressions, byte-equal to what `nft`
//!   sends for the same rule text; decoding of the kernel's dump for `check`.
//! - `render`: the canonical `nft -f` text.
//! - `validate`: what the kernel would refuse, refused before anything is sent.
//! - `batch`: Plan -> the batch's messages, and sending it; `read`: our table read back;
//!   `check`: the read-back compared with the plan; `owner`: which tables are ours.
//!
//! This file keeps the public calls (apply, delete, exists, owned tables) and the error type.
//!
//! Cost (measured here): a batch into an absent table takes ~0.3 ms. Any call that deletes
//! base chains (replace, `delete`) pays ~11 ms when its socket closes, because the kernel
//! waits for the deferred destruction of the hooks (docs/ARCHITECTURE.md, pitfall 6) - `nft`
//! itself pays the same.

mod batch;
mod check;
mod expr;
mod owner;
mod read;
mod render;
#[cfg(test)]
mod tests;
mod validate;
pub(crate) mod wire;

pub use check::check;
pub use read::{rule_status, RuleStatus};

use batch::{build_batch, open, send_batch, table_obj, Batch};
use read::{ktable, table_info, KTable};
use validate::{check_name, check_table};

use crate::plan::Table;
use std::io;
use wire::Msg;

/// Most rules one table may hold. Annotation lists are capped (256 entries each), so only
/// conflist lists can come near; past this the plan is refused before touching the kernel
/// rather than sent as a batch of tens of megabytes.
pub(crate) const MAX_RULES: usize = 10_000;

/// Every table we create carries the comment `tproxy-cni layout N`: DEL removes any inet table
/// with this owner prefix whatever its name, and CHECK reports another layout as drift.
pub(crate) const OWNER_TAG: &str = "tproxy-cni layout ";
/// The layout of the table and routing objects this release programs. Bump it whenever the
/// rules of a plan change for the same input, so CHECK on older pods reports drift.
pub(crate) const LAYOUT: u32 = 1;

/// The owner comment of the tables this release creates.
pub fn owner_comment() -> String {
    format!("{OWNER_TAG}{LAYOUT}")
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The plan holds something we refuse to send (the kernel or `nft list` could not take it).
    #[error("invalid {object}: {reason}")]
    Invalid { object: String, reason: String },
    #[error("netlink socket ({op}): {err}")]
    Socket { op: &'static str, err: io::Error },
    /// The kernel refused a message; `object` names what that message created or deleted.
    #[error("kernel refused {object}: {}{}{}", io::Error::from_raw_os_error(*.errno), .detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default(), if *.more > 0 { format!(" [+{} follow-on errors]", .more) } else { String::new() })]
    Kernel {
        object: String,
        errno: i32,
        detail: Option<String>,
        more: usize,
    },
    #[error("unexpected netlink reply: {0}")]
    Protocol(String),
    /// A table of the configured name exists without our owner comment: someone else's, never
    /// replaced or deleted (docs/ARCHITECTURE.md, pitfall 64).
    #[error("{table} exists and is not ours (its comment is {comment:?}, ours start with {OWNER_TAG:?}): left untouched; set another tableName")]
    NotOurs { table: String, comment: String },
    /// The batch was sent but its replies could not be read: it may have been committed.
    #[error("netlink socket (reading the replies to a batch that may have been applied): {0}")]
    Uncertain(io::Error),
}

fn sock_err(op: &'static str) -> impl FnOnce(io::Error) -> NftError {
    move |err| NftError::Socket { op, err }
}

fn invalid(object: impl Into<String>, reason: impl Into<String>) -> NftError {
    NftError::Invalid {
        object: object.into(),
        reason: reason.into(),
    }
}

/// Names of the inet tables in this netns that carry our owner comment (any layout).
pub fn owned_tables() -> Result<Vec<String>, NftError> {
    let s = open()?;
    let req = Msg::nft(
        wire::NFT_MSG_GETTABLE,
        wire::NLM_F_DUMP,
        1,
        wire::NFPROTO_INET,
    );
    let replies = match s.request(&req.finish(), true) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            return Err(NftError::Kernel {
                object: "list inet tables".into(),
                errno: e.errno,
                detail: e.msg,
                more: 0,
            })
        }
        Err(e) => {
            return Err(NftError::Socket {
                op: "list tables",
                err: e,
            })
        }
    };
    Ok(replies
        .iter()
        .filter(|r| r.payload.first() == Some(&wire::NFPROTO_INET))
        .map(|r| ktable(&r.payload))
        .filter(|(_, t)| t.comment.starts_with(OWNER_TAG))
        .map(|(n, _)| n)
        .collect())
}

/// Deletes every table of ours except `keep`; returns the names deleted.
pub fn delete_owned_except(keep: Option<&str>) -> Result<Vec<String>, NftError> {
    let mut gone = Vec::new();
    for name in owned_tables()? {
        if Some(name.as_str()) == keep || check_name("table", &name).is_err() {
            continue;
        }
        if delete(&name)? {
            gone.push(name);
        }
    }
    Ok(gone)
}

/// Creates our inet table with exactly `table`'s content, or atomically replaces it, in one
/// batch. The delete is only in the batch when the table exists (docs/ARCHITECTURE.md, pitfall 6),
/// and only when it is ours: a table of that name without our comment is
/// [`NftError::NotOurs`] (pitfall 64).
pub fn apply(table: &Table) -> Result<(), NftError> {
    check_table(table)?;
    let s = open()?;
    // One retry covers a table that appeared or vanished between the look and the batch.
    for attempt in 0..2 {
        let replace = match table_info(&s, &table.name)? {
            Some(k) if !owner::is_ours(&table.name, &k) => {
                return Err(owner::not_ours(&table.name, &k))
            }
            Some(k) => Some(k.handle),
            None => None,
        };
        let exists = replace.is_some();
        match send_batch(&s, build_batch(table, replace)) {
            // The batch may be in the kernel: an ADD that fails must leave nothing of ours
            // (docs/ARCHITECTURE.md, pitfall 14), so remove the table before reporting.
            Err(e @ NftError::Uncertain(_)) => {
                if let Err(undo) = delete(&table.name) {
                    log::warn!("removing {} after {e}: {undo}", table_obj(&table.name));
                }
                return Err(e);
            }
            Err(NftError::Kernel { errno, .. })
                if attempt == 0
                    && ((exists && errno == libc::ENOENT)
                        || (!exists && errno == libc::EEXIST)) => {}
            r => return r,
        }
    }
    Err(NftError::Protocol(format!(
        "{} kept changing while we replaced it",
        table_obj(&table.name)
    )))
}

/// Deletes our table (with its chains and rules). `Ok(false)` when it was absent; a table of
/// that name without our owner comment is [`NftError::NotOurs`] and stays (pitfall 64).
pub fn delete(name: &str) -> Result<bool, NftError> {
    check_name("table", name)?;
    let s = open()?;
    for attempt in 0..2 {
        let Some(k) = table_info(&s, name)? else {
            return Ok(false);
        };
        if !owner::is_ours(name, &k) {
            return Err(owner::not_ours(name, &k));
        }
        let mut b = Batch::new();
        b.add(
            wire::NFT_MSG_DELTABLE,
            0,
            format!("delete {}", table_obj(name)),
            |m| owner::put_table_ref(m, name, k.handle),
        );
        match send_batch(&s, b) {
            Ok(()) => return Ok(true),
            // Gone, or replaced under the same name since the look: look again.
            Err(NftError::Kernel { errno, .. }) if errno == libc::ENOENT && attempt == 0 => {}
            Err(NftError::Kernel { errno, .. }) if errno == libc::ENOENT => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Whether a table of ours named `name` exists (one without our comment is not ours).
pub fn exists(name: &str) -> Result<bool, NftError> {
    check_name("table", name)?;
    Ok(table_info(&open()?, name)?.is_some_and(|k| owner::is_ours(name, &k)))
}

/// The comment of inet table `name` (our owner tag says which layout programmed it); `None`
/// when the table is absent. The installer's reconcile loop tells an older layout from drift.
pub fn table_comment(name: &str) -> Result<Option<String>, NftError> {
    check_name("table", name)?;
    Ok(table_info(&open()?, name)?.map(|t| t.comment))
}

/// Canonical `nft -f` text of the table, laid out like `nft list table inet NAME`.
pub fn render(table: &Table) -> String {
    render::render(table)
}
