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

pub mod apply;
pub mod cni;
pub mod host;
pub mod netns;
pub mod nft;
pub mod nslock;
pub mod plan;
pub mod routing;
