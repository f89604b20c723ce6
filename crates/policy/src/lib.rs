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

mod annotations;
mod echo;
mod json;
mod logging;
mod netaddr;

// Two whole modules stay public, each a facade of one tight group that callers use together:
// `consts` is nothing but the numbers and names we own (the planner reads most of them at once),
// and `flags` is the flag parser's whole vocabulary (`parse`, `Spec`, `Flag`, `Parsed`,
// `FlagError`, `env_name`), which reads best qualified (`flags::parse`, `flags::Spec`).
pub mod consts;
pub mod flags;

/// Pod annotations -> `PodPolicy`, with the types the plugin plans from and the sidecar
/// enforces (`XffTrust`, the access control `Acl`).
pub use annotations::{
    acl::{Acl, Denied},
    parse_downward_api, skip_reason, Defaults, FailMode, Mode, NorthSouth, PodPolicy, PolicyError,
    PpVersion, Selector, XffTrust, MESH_MARKS, NORTH_SOUTH_KEYS, OUR_KEYS,
};
/// How any input is quoted back in an error message.
pub use echo::{echo, echo_json, ECHO_MAX};
/// Typed reads of a network config's values.
pub use json::{opt_bool, opt_port, opt_str, opt_u32, ConfigError};
/// The one log backend and timestamp format of all binaries.
pub use logging::{init as init_logging, rfc3339};
/// CIDR and port-range value types.
pub use netaddr::{Cidr, Family, PortRange};
