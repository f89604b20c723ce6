//! tproxy-cni-install (placeholder: being written)
fn main() {}
