//! tproxy-cni-plugin: the chained CNI plugin and the host CLI. Synchronous, no tokio: a CNI
//! plugin is a short-lived process that programs the kernel and exits.
//!
//! - `plan`: the pure description of every kernel object we own in a pod netns.
//! - `nft`: Plan -> one nf_tables netlink batch; read-back for CHECK; canonical text render.
//! - `routing`: Plan -> rtnetlink fwmark rules, local routes, loopback addresses.
//! - `apply`: Plan -> kernel: apply (with undo), remove (collects every error), verify (drift).
//! - `netns`: the only place that calls `setns`.
//! - `nslock`: the per-netns lock the plugin and the installer's repairs share.
//! - `cni`: the CNI protocol frame (env, config, result passthrough, errors, commands).
//! - `host`: the `tproxy-cni-host` command: the same policy on a host or any netns, no CNI.

#![deny(unsafe_code)]

mod apply;
mod cni;
mod host;
mod netns;
mod nslock;

// Three whole modules stay public, each already a facade (private submodules behind a short
// `pub use` list) of one group its callers use together: `plan` is the Plan's data types and
// `plan::build`; `nft` the nf_tables table's apply, read-back (`check`, `rule_status`,
// `table_comment`, ...) and render; `routing` the rules and routes' apply, check and delete and
// the `Rtnl` socket. Their names read best qualified (`nft::apply`, `routing::apply`).
pub mod nft;
pub mod plan;
pub mod routing;

/// Drift between a plan and the kernel, as CHECK and the installer's repairs see it.
pub use apply::{verify, Drift, Kernel};
/// The CNI protocol frame: `run` is the whole plugin (env, stdin, stdout in, exit code out).
pub use cni::{
    conf::{peek_bad_table_name, peek_version, NetConf, SUPPORTED_VERSIONS},
    env::ProcessEnv,
    error::CniError,
    plan_for, run,
};
/// The `tproxy-cni-host` command.
pub use host::main_with as host_main_with;
/// The only door into a pod's netns, and the per-netns lock shared with the installer.
pub use netns::{lock_namespace, run_in, NetnsError};
/// The netlink attribute (TLV) reader, for the sidecar's own rtnetlink dumps.
pub use nft::wire::attrs as netlink_attrs;
pub use nslock::LOCK_DIR;
