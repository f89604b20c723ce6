//! tproxy-cni-install: the node installer run by the DaemonSet (see `tproxy_cni_install`).

fn main() {
    let args = std::env::args().skip(1).collect();
    if let Err(e) = tproxy_cni_install::main_with(args) {
        // The logger may not be up (usage errors), so print directly; probes rely on the exit
        // code. Each error's message already names its cause, so no source chain is appended.
        eprintln!("tproxy-cni-install: {e}");
        std::process::exit(1);
    }
}
