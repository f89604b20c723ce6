//! tproxy-cni-install: the node installer run by the DaemonSet (see `tproxy_cni::install`).

fn main() {
    let args = std::env::args().skip(1).collect();
    if let Err(e) = tproxy_cni::install::main_with(args) {
        let e = anyhow::Error::from(e);
        // The logger may not be up (usage errors), so print directly; probes rely on the exit code.
        eprintln!("tproxy-cni-install: {e:#}");
        std::process::exit(1);
    }
}
