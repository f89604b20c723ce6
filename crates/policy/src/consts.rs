//! The shared numbers: ports, marks, route table, rule priority, names. Each says why it has its value.

/// Inbound port of the sidecar: Envoy's/Istio's `15006`, so Istio users find what they know.
pub const INBOUND_PORT: u16 = 15006;
/// Outbound (egress capture) port of the sidecar: Istio's `15001`.
pub const OUTBOUND_PORT: u16 = 15001;
/// Sidecar admin port (`/healthz`, `/ready`, `/metrics`): Istio's health port `15021`.
pub const ADMIN_PORT: u16 = 15021;

/// Packet / conntrack mark bits of the proxy legs. The plugin matches and sets only the bits of
/// `mark` (mask = mark), so marks others set in the same pod keep theirs: one bit that Istio
/// (0x539), kube-proxy (0x4000, 0x8000), Calico (0xffff0000), Cilium (0x0f00) and ztunnel
/// (0xfff) do not use.
pub const MARK: u32 = 0x1000;
/// The mark of releases before layout 1 (whole-mark match, no owner tag): DEL still removes
/// their fwmark rule `fwmark 0x7470 lookup ROUTE_TABLE priority RULE_PRIORITY` by identity.
pub const LEGACY_MARK: u32 = 0x7470;
/// Routing table that holds `local default dev lo` for marked packets (same "tp" number).
pub const ROUTE_TABLE: u32 = 0x7470;
/// Priority of our `fwmark` policy rule: below `main` (32766), above nothing we know of.
pub const RULE_PRIORITY: u32 = 0x7470;

/// Protocol id on every policy rule (`FRA_PROTOCOL`) and route (`rtm_protocol`) we add: the
/// owner tag DEL and CHECK find them by, whatever mark, table or priority a release used.
/// `0x74` is ASCII "t"; unassigned in iproute2's `rt_protos` (0-18, 42, 99, 186-192 are taken).
pub const RT_PROTOCOL: u8 = 0x74;

/// uid the sidecar runs as, exempt from outbound capture. Istio's `1337`, which sidecar images
/// and PodSecurity setups already expect.
pub const PROXY_UID: u32 = 1337;

/// Our nftables table in the pod netns (family `inet`). One table = one atomic unit for ADD/DEL.
pub const TABLE_NAME: &str = "tproxy_cni";

/// Source address the sidecar dials the app from in REDIRECT mode: what Istio uses, and what the
/// seeds show apps seeing. `::6` is its IPv6 twin (the plugin adds it to `lo` in redirect mode).
pub const REDIRECT_SOURCE_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 6);
pub const REDIRECT_SOURCE_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// Prefix of our own annotation family.
pub const ANNOTATION_PREFIX: &str = "tproxy-cni.io/";
/// The runtimeConfig key under which containerd/CRI-O pass pod annotations (needs the capability).
pub const POD_ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";
