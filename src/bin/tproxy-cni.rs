//! `tproxy-cni`: the chained CNI plugin. Reads env + stdin, prints the result, exits.

use std::io::Read;

fn main() {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        eprintln!("tproxy-cni: reading stdin: {e}");
    }
    let mut stdout = std::io::stdout().lock();
    let code = tproxy_cni_plugin::run(&tproxy_cni_plugin::ProcessEnv, &stdin, &mut stdout);
    std::process::exit(code);
}
