//! tproxy-cni: a chained CNI plugin and an in-pod transparent proxy that keep the client's source IP.
//!
//! - `consts`: ports, marks, table ids, priorities, names (each with why).
//! - `netaddr`: CIDR and port-range value types.
//! - `annotations`: pod annotations (ours, Istio's, Kuma's) -> `PodPolicy` (pure).
//! - `plan`: the pure description of every kernel object we own in a pod netns.
//! - `nft`: Plan -> one nf_tables netlink batch; read-back for CHECK; canonical text render.
//! - `routing`: Plan -> rtnetlink fwmark rules, local routes, loopback addresses.
//! - `apply`: Plan -> kernel: apply (with undo), remove (collects every error), verify (drift).
//! - `netns`: the only place that calls `setns`.
//! - `cni`: the CNI protocol frame (env, config, result passthrough, errors, commands).
//! - `host`: the `tproxy-cni-host` command: the same policy on a host or any netns, no CNI.
//! - `sidecar`: the in-pod transparent proxy.
//! - `logging`: the one log backend and timestamp format of all binaries.
//! - `install`: the node installer (binary copy, conflist patching, watch).

// Two modules need `unsafe` (each says why where it allows it): sidecar::sockopt (socket
// options, pipes and splice that neither std nor nix wrap) and install::files (renameat2,
// whose libc wrapper musl lacks). Everything else is safe code.
#![deny(unsafe_code)]

pub mod annotations;
pub mod apply;
pub mod cni;
pub mod consts;
pub mod flags;
pub mod host;
pub mod install;
pub mod logging;
pub mod netaddr;
pub mod netns;
pub mod nft;
pub mod nslock;
pub mod plan;
pub mod routing;
pub mod sidecar;
