//! tproxy-cni-policy: the leaf crate. Pure values and parsers every other crate builds on; it
//! depends on no other crate of this workspace.
//!
//! - `consts`: ports, marks, table ids, priorities, names (each with why).
//! - `netaddr`: CIDR and port-range value types.
//! - `annotations`: pod annotations (ours, Istio's, Kuma's) -> `PodPolicy` (pure).
//! - `echo`: how any input is quoted back in an error message.
//! - `json`: typed reads of a network config's values, with `ConfigError`.
//! - `flags`: the one flag parser of the four command lines.
//! - `logging`: the one log backend and timestamp format of all binaries.

#![deny(unsafe_code)]

pub mod annotations;
pub mod consts;
mod echo;
pub mod flags;
pub mod json;
pub mod logging;
pub mod netaddr;

pub use echo::{echo, echo_json, ECHO_MAX};
