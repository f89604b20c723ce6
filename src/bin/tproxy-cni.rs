//! tproxy-cni (placeholder: being written)
fn main() {}
