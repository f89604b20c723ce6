//! tproxy-sidecar (placeholder: being written)
fn main() {}
