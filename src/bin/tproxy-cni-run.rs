//! tproxy-cni-run: runs a CNI conflist like a container runtime would (see `tproxy_cni_run`).

fn main() {
    tproxy_cni_run::main()
}
