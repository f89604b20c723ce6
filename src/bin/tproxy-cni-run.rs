//! tproxy-cni-run (placeholder: being written)
fn main() {}
