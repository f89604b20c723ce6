//! tproxy-sidecar: parse flags and env, run the in-pod transparent proxy, map the result to an
//! exit code (0 clean stop, 1 runtime/privilege error, 2 bad configuration).

use std::collections::BTreeMap;
use std::process::ExitCode;

use tproxy_cni_sidecar as sidecar;

/// An idle connection is one tokio task and two socket registrations, all 128-byte aligned;
/// this allocator serves them without malloc's alignment waste (crates/sidecar/src/alloc.rs).
#[global_allocator]
static ALLOCATOR: sidecar::Allocator = sidecar::Allocator;

fn main() -> ExitCode {
    // One log format for every binary (crates/policy/src/logging.rs): stderr, which kubectl logs shows.
    tproxy_cni_policy::init_logging("tproxy-sidecar", log::LevelFilter::Info, None);
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // vars_os: a non-UTF-8 variable elsewhere in the environment must not abort us.
    let env: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("TPROXY_SIDECAR_"))
        .collect();
    match sidecar::parse_config(&args, &env) {
        Ok(sidecar::Parsed::Help) => {
            print!("{}", sidecar::help());
            ExitCode::SUCCESS
        }
        Err(e) => {
            log::error!("{e} (see --help)");
            ExitCode::from(2)
        }
        Ok(sidecar::Parsed::Run(cfg)) => match sidecar::run(*cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                log::error!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}
