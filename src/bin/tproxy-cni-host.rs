//! tproxy-cni-host: apply, remove, show or check tproxy-cni's interception on a host or in a
//! given network namespace (see `tproxy_cni_plugin::host_main_with`). A binary of its own, not a subcommand of
//! the plugin: the plugin's interface is the CNI protocol (environment + stdin, no arguments),
//! and an operator's command line should not share a `main` with it.

fn main() {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut stdout = std::io::stdout().lock();
    let code = tproxy_cni_plugin::host_main_with(&args, &mut stdout);
    std::process::exit(code);
}
