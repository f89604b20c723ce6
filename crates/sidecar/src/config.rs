//! Sidecar configuration: flags and `TPROXY_SIDECAR_*` environment variables -> `Config`.
//!
//! One table (`SPECS`) drives parsing, the environment names and `--help`, so they cannot drift
//! apart. Pure: the environment is passed in, nothing is read from the process here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use tproxy_cni_policy::consts;
use tproxy_cni_policy::PortRange;

/// Which inbound interception the sidecar serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundMode {
    /// TPROXY: accept on foreign addresses, dial the app from the client's own IP.
    Tproxy,
    /// NAT REDIRECT: read `SO_ORIGINAL_DST`, dial from 127.0.0.6 / ::6.
    Redirect,
}

impl InboundMode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            InboundMode::Tproxy => "tproxy",
            InboundMode::Redirect => "redirect",
        }
    }
}

/// `--mode`: a fixed mode, or `auto` (follow the pod's annotations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeFlag {
    Fixed(InboundMode),
    Auto,
}

/// Where access-log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
    Off,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub mode: ModeFlag,
    pub annotations_file: Option<PathBuf>,
    pub inbound_port: u16,
    /// `None` disables the outbound listener.
    pub outbound_port: Option<u16>,
    /// `None` disables the admin server.
    pub admin_port: Option<u16>,
    pub mark: u32,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_connections: usize,
    /// `None`: no per-source cap.
    pub max_connections_per_source: Option<usize>,
    pub upstream_ports: PortRange,
    pub port_linger: Duration,
    pub pipe_size: usize,
    pub access_log: AccessLogTarget,
    /// North-south flags given explicitly (flag or environment), by flag name, e.g.
    /// `xff-ports`. Checked here by the plugin's annotation code; in `auto` mode they override
    /// the pod's annotation of the same name (`tproxy-cni.io/<flag>`).
    pub north_south: BTreeMap<String, String>,
    /// How long a trusted source may take to send its PROXY protocol header.
    pub proxy_protocol_timeout: Duration,
    /// Bound on an HTTP request head on the XFF ports (431 beyond it).
    pub max_request_head: usize,
    /// Accept loops, each a single-threaded runtime on its own `SO_REUSEPORT` listeners;
    /// `None`: as many as the CPUs the process may use (cgroup quota, affinity).
    pub workers: Option<usize>,
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Run(Box<Config>),
    Help,
}

/// A flag or environment value that could not be used; names where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The command line itself (crates/policy/src/flags.rs).
    #[error(transparent)]
    Flag(#[from] tproxy_cni_policy::flags::FlagError),
    #[error("{source_name}={value:?}: {reason}")]
    Bad {
        source_name: String,
        value: String,
        reason: String,
    },
}

struct Spec {
    flag: &'static str,
    default: &'static str,
    help: &'static str,
}

/// Every option: `--flag`, its default, and its help line. The environment name is derived:
/// `--connect-timeout` <-> `TPROXY_SIDECAR_CONNECT_TIMEOUT`.
const SPECS: &[Spec] = &[
    Spec { flag: "mode", default: "auto", help: "tproxy | redirect | auto (auto: from --annotations-file, through the plugin's own policy code; tproxy when no file)" },
    Spec { flag: "annotations-file", default: "", help: "Kubernetes downward-API annotations file (key=\"value\" lines), read in auto mode" },
    Spec { flag: "inbound-port", default: "15006", help: "inbound listener port (TPROXY / REDIRECT target)" },
    Spec { flag: "outbound-port", default: "15001", help: "outbound (egress capture) listener port; 0 = off" },
    Spec { flag: "admin-port", default: "15021", help: "admin port: /healthz /ready /metrics; 0 = off" },
    Spec { flag: "mark", default: "0x1000", help: "SO_MARK of upstream sockets (must match the plugin's mark)" },
    Spec { flag: "connect-timeout", default: "5s", help: "upstream connect timeout (ms, s, m, h; bare number = seconds)" },
    Spec { flag: "idle-timeout", default: "1h", help: "close a connection with no bytes either way for this long (Envoy's TCP default)" },
    Spec { flag: "drain-timeout", default: "20s", help: "on SIGTERM/SIGINT: stop accepting, wait this long for in-flight connections" },
    Spec { flag: "max-connections", default: "4096", help: "concurrent connections (lowered to fit the open-file limit: 2 descriptors each, plus a shared pool of splice pipes); beyond it new ones wait in the kernel accept queue and /ready says 503" },
    Spec { flag: "max-connections-per-source", default: "0", help: "concurrent connections from one client IP; more are reset (flag RL); 0 = no cap (traffic through gateways or SNAT shares one IP)" },
    Spec { flag: "upstream-ports", default: "1024-32767", help: "tproxy upstream source ports (odd ones are used; below Linux/Windows client ephemeral ranges)" },
    Spec { flag: "port-linger", default: "120s", help: "how long a closed client port stays excluded from upstream use (conntrack TIME_WAIT)" },
    Spec { flag: "pipe-size", default: "65536", help: "capacity of each splice pipe in the shared pool, bytes (kernel rounds to pages)" },
    Spec { flag: "access-log", default: "-", help: "access log: - (stdout), off, or a file path (appended)" },
    Spec { flag: "proxy-protocol-ports", default: "", help: "inbound ports where trusted sources must send a PROXY protocol v1/v2 header (annotation tproxy-cni.io/proxy-protocol-ports)" },
    Spec { flag: "proxy-protocol-trusted-cidrs", default: "", help: "sources whose PROXY header is required and believed; others are never parsed" },
    Spec { flag: "proxy-protocol-out", default: "", help: "send the app a PROXY header with the effective client: PORT:v1|v2,..." },
    Spec { flag: "proxy-protocol-timeout", default: "3s", help: "a trusted source's PROXY header must be complete within this time, or the connection is reset" },
    Spec { flag: "xff-ports", default: "", help: "HTTP/1.1 ports whose requests get X-Forwarded-For and x-envoy-external-address" },
    Spec { flag: "xff-connect-ports", default: "", help: "XFF ports whose app may be sent CONNECT (refused with 403 elsewhere); each must be in --xff-ports" },
    Spec { flag: "xff-num-trusted-proxies", default: "", help: "trusted proxy hops in X-Forwarded-For (Istio's numTrustedProxies; default 0)" },
    Spec { flag: "xff-trusted-cidrs", default: "", help: "alternative to the hop count: X-Forwarded-For entries in these CIDRs are proxies" },
    Spec { flag: "max-request-headers-kb", default: "60", help: "request head limit on the XFF ports, KiB (Envoy's default); larger heads get 431" },
    Spec { flag: "allow-peer-cidrs", default: "", help: "only TCP peers in these CIDRs may connect (Istio ipBlocks, ALLOW)" },
    Spec { flag: "deny-peer-cidrs", default: "", help: "TCP peers in these CIDRs are reset (Istio ipBlocks, DENY)" },
    Spec { flag: "allow-client-cidrs", default: "", help: "only effective clients (PROXY protocol / XFF) in these CIDRs pass (Istio remoteIpBlocks, ALLOW)" },
    Spec { flag: "deny-client-cidrs", default: "", help: "effective clients in these CIDRs are refused: reset, or 403 on XFF ports (Istio remoteIpBlocks, DENY)" },
    Spec { flag: "workers", default: "1", help: "single-threaded accept loops on SO_REUSEPORT listeners; auto = the CPUs the cgroup quota and affinity allow (1 when unknown; set a CPU limit first)" },
];

const ENV_PREFIX: &str = "TPROXY_SIDECAR_";

fn env_name(flag: &str) -> String {
    tproxy_cni_policy::flags::env_name(ENV_PREFIX, flag)
}

/// The `--help` text, generated from `SPECS`.
pub fn help() -> String {
    let mut s = String::from(
        "tproxy-sidecar: in-pod transparent proxy that keeps the client's source IP\n\n\
         Usage: tproxy-sidecar [--flag value | --flag=value]...\n\n\
         Every flag can also be set by its environment variable; flags win.\n\
         Needs CAP_NET_RAW in tproxy mode (securityContext.capabilities.add: [\"NET_RAW\"]);\n\
         as non-root the binary must also carry the file capability cap_net_raw+p.\n\n",
    );
    for sp in SPECS {
        let _ = writeln!(
            s,
            "  --{:<18} {:<36} [default: {}]\n      {}",
            sp.flag,
            env_name(sp.flag),
            if sp.default.is_empty() {
                "none"
            } else {
                sp.default
            },
            sp.help
        );
    }
    s.push_str("  -h, --help           this text\n");
    s
}

/// (value, where it came from) per flag: flags over environment values over defaults; `None`
/// for `--help`. `env` holds the process environment (only `TPROXY_SIDECAR_*` keys are looked
/// at).
type Values = BTreeMap<&'static str, (String, String)>;

fn values(args: &[String], env: &BTreeMap<String, String>) -> Result<Option<Values>, ConfigError> {
    let mut vals = Values::new();
    for sp in SPECS {
        vals.insert(
            sp.flag,
            (sp.default.to_string(), format!("--{} default", sp.flag)),
        );
        let en = env_name(sp.flag);
        if let Some(v) = env.get(&en) {
            vals.insert(sp.flag, (v.clone(), en));
        }
    }
    let names: Vec<&'static str> = SPECS.iter().map(|s| s.flag).collect();
    let spec = tproxy_cni_policy::flags::Spec {
        values: &names,
        switches: &[],
    };
    let tproxy_cni_policy::flags::Parsed::Flags(given) =
        tproxy_cni_policy::flags::parse(args.iter().cloned(), &spec)?
    else {
        return Ok(None);
    };
    for f in given {
        let source = format!("--{}", f.name);
        vals.insert(f.name, (f.into_value(), source));
    }
    Ok(Some(vals))
}

/// Parses flags (`args` without the program name) over environment values over defaults.
/// `env` holds the process environment (only `TPROXY_SIDECAR_*` keys are looked at).
pub fn parse(args: &[String], env: &BTreeMap<String, String>) -> Result<Parsed, ConfigError> {
    let Some(vals) = values(args, env)? else {
        return Ok(Parsed::Help);
    };

    let get = |flag: &str| -> (&str, &str) {
        vals.get(flag)
            .map(|(v, s)| (v.as_str(), s.as_str()))
            .unwrap_or(("", ""))
    };
    let bad = |flag: &str, reason: &str| {
        let (v, s) = get(flag);
        ConfigError::Bad {
            source_name: s.to_string(),
            value: v.to_string(),
            reason: reason.to_string(),
        }
    };
    let port = |flag: &str, allow_zero: bool| -> Result<Option<u16>, ConfigError> {
        match get(flag).0.trim().parse::<u16>() {
            Ok(0) if allow_zero => Ok(None),
            Ok(0) => Err(bad(flag, "expected a port 1-65535")),
            Ok(p) => Ok(Some(p)),
            Err(_) => Err(bad(flag, "expected a port 1-65535")),
        }
    };
    let dur = |flag: &str| parse_duration(get(flag).0).ok_or_else(|| bad(flag, DURATION_HELP));
    let count = |flag: &str, max: usize| -> Result<usize, ConfigError> {
        match get(flag).0.trim().parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(bad(flag, &format!("expected a number 1-{max}"))),
        }
    };

    let mode = match get("mode").0.trim().to_ascii_lowercase().as_str() {
        "tproxy" => ModeFlag::Fixed(InboundMode::Tproxy),
        "redirect" => ModeFlag::Fixed(InboundMode::Redirect),
        "auto" => ModeFlag::Auto,
        _ => return Err(bad("mode", "expected tproxy, redirect or auto")),
    };
    let annotations_file = match get("annotations-file").0 {
        "" => None,
        p => Some(PathBuf::from(p)),
    };
    let inbound_port = port("inbound-port", false)?.unwrap_or(consts::INBOUND_PORT);
    let outbound_port = port("outbound-port", true)?;
    let admin_port = port("admin-port", true)?;
    let mark = parse_u32(get("mark").0)
        .filter(|m| *m != 0)
        .ok_or_else(|| bad("mark", "expected a non-zero number (decimal or 0x hex)"))?;
    let upstream_ports: PortRange = get("upstream-ports")
        .0
        .parse()
        .map_err(|_| bad("upstream-ports", "expected a port range lo-hi"))?;
    if upstream_ports.lo < 2
        || (upstream_ports.lo == upstream_ports.hi && upstream_ports.lo % 2 == 0)
    {
        return Err(bad(
            "upstream-ports",
            "the range must contain an odd port above 1",
        ));
    }
    let access_log = match get("access-log").0 {
        "-" | "" | "stdout" => AccessLogTarget::Stdout,
        "off" | "none" => AccessLogTarget::Off,
        p => AccessLogTarget::File(PathBuf::from(p)),
    };
    // North-south flags: checked by the plugin's own annotation code, under the same names.
    let mut north_south = BTreeMap::new();
    for key in tproxy_cni_policy::NORTH_SOUTH_KEYS {
        if let Some((v, src)) = vals.get(key) {
            if !src.ends_with(" default") {
                north_south.insert(key.to_string(), v.clone());
            }
        }
    }
    // In auto mode with an annotations file the flags complete the pod's annotations, so they
    // are checked together with them at start (`sidecar::resolve`); otherwise alone, here.
    if !(mode == ModeFlag::Auto && annotations_file.is_some()) {
        check_north_south(&north_south, |k| {
            vals.get(k).map(|(_, s)| s.clone()).unwrap_or_default()
        })?;
    }
    let max_request_head = count("max-request-headers-kb", 8192)? * 1024;
    distinct_ports(inbound_port, outbound_port, admin_port)?;
    Ok(Parsed::Run(Box::new(Config {
        mode,
        annotations_file,
        inbound_port,
        outbound_port,
        admin_port,
        mark,
        connect_timeout: dur("connect-timeout")?,
        idle_timeout: dur("idle-timeout")?,
        drain_timeout: dur("drain-timeout")?,
        max_connections: count("max-connections", 1 << 20)?,
        max_connections_per_source: match get("max-connections-per-source").0.trim() {
            "0" => None,
            _ => Some(count("max-connections-per-source", 1 << 20)?),
        },
        upstream_ports,
        port_linger: dur("port-linger")?,
        pipe_size: count("pipe-size", 1 << 24)?,
        access_log,
        north_south,
        proxy_protocol_timeout: dur("proxy-protocol-timeout")?,
        max_request_head,
        workers: match get("workers").0.trim() {
            "auto" => None,
            _ => Some(count("workers", MAX_WORKERS)?),
        },
    })))
}

/// The sidecar's own ports must differ.
fn distinct_ports(
    inbound: u16,
    outbound: Option<u16>,
    admin: Option<u16>,
) -> Result<(), ConfigError> {
    let mut seen = vec![inbound];
    for p in [outbound, admin].into_iter().flatten() {
        if seen.contains(&p) {
            return Err(ConfigError::Bad {
                source_name: "--inbound-port/--outbound-port/--admin-port".into(),
                value: p.to_string(),
                reason: "the sidecar's ports must differ".into(),
            });
        }
        seen.push(p);
    }
    Ok(())
}

/// The annotation map the north-south flags stand for (`tproxy-cni.io/<flag>`).
pub(crate) fn north_south_annotations(
    flags: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    flags
        .iter()
        .map(|(k, v)| (format!("{}{k}", consts::ANNOTATION_PREFIX), v.clone()))
        .collect()
}

/// Parses the north-south flags; an error names the flag (or variable) it came from.
fn check_north_south(
    flags: &BTreeMap<String, String>,
    source_of: impl Fn(&str) -> String,
) -> Result<(), ConfigError> {
    tproxy_cni_policy::NorthSouth::from_annotations(&north_south_annotations(flags))
        .map(|_| ())
        .map_err(|e| {
            let flag = e
                .key
                .strip_prefix(consts::ANNOTATION_PREFIX)
                .unwrap_or(&e.key)
                .to_string();
            ConfigError::Bad {
                source_name: source_of(&flag),
                value: e.value.clone(),
                reason: e.reason.replace(consts::ANNOTATION_PREFIX, "--"),
            }
        })
}

/// More loops than this only adds threads: the kernel spreads connections over at most the CPUs.
pub(crate) const MAX_WORKERS: usize = 64;

const DURATION_HELP: &str = "expected a duration such as 250ms, 5s, 2m, 1h (bare number = seconds)";

/// `250ms`, `5s`, `2m`, `1h`, or a bare number of seconds. At most about 10 years, so adding it
/// to an `Instant` can never overflow.
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() || num.len() > 12 {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "" | "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    if ms > 10 * 365 * 24 * 3_600_000 {
        return None;
    }
    Some(Duration::from_millis(ms))
}

fn parse_u32(s: &str) -> Option<u32> {
    let t = s.trim();
    match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => t.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn run(a: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match parse(&args(a), &env)? {
            Parsed::Run(c) => Ok(*c),
            Parsed::Help => panic!("help"),
        }
    }

    #[test]
    fn defaults_match_the_shared_constants() {
        let c = run(&[], &[]).unwrap();
        assert_eq!(c.mode, ModeFlag::Auto);
        assert_eq!(c.inbound_port, consts::INBOUND_PORT);
        assert_eq!(c.outbound_port, Some(consts::OUTBOUND_PORT));
        assert_eq!(c.admin_port, Some(consts::ADMIN_PORT));
        assert_eq!(c.mark, consts::MARK);
        assert_eq!(c.drain_timeout, Duration::from_secs(20));
        assert_eq!(c.access_log, AccessLogTarget::Stdout);
    }

    #[test]
    fn flags_override_env_override_defaults() {
        let env = [
            ("TPROXY_SIDECAR_MODE", "redirect"),
            ("TPROXY_SIDECAR_CONNECT_TIMEOUT", "250ms"),
            ("TPROXY_SIDECAR_ADMIN_PORT", "0"),
        ];
        let c = run(&["--mode=tproxy", "--access-log", "/tmp/x"], &env).unwrap();
        assert_eq!(c.mode, ModeFlag::Fixed(InboundMode::Tproxy));
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.admin_port, None);
        assert_eq!(c.access_log, AccessLogTarget::File("/tmp/x".into()));
    }

    #[test]
    fn errors_name_their_source() {
        let e = run(&["--idle-timeout", "5 parsecs"], &[]).unwrap_err();
        assert!(e.to_string().contains("--idle-timeout"), "{e}");
        let e = run(&[], &[("TPROXY_SIDECAR_MARK", "zz")]).unwrap_err();
        assert!(e.to_string().contains("TPROXY_SIDECAR_MARK"), "{e}");
        use tproxy_cni_policy::flags::FlagError;
        assert_eq!(
            run(&["--bogus", "1"], &[]),
            Err(ConfigError::Flag(FlagError::Unknown("--bogus".into())))
        );
        assert_eq!(
            run(&["--mode"], &[]),
            Err(ConfigError::Flag(FlagError::MissingValue("mode")))
        );
        assert_eq!(
            run(&["positional"], &[]),
            Err(ConfigError::Flag(FlagError::Unknown("positional".into())))
        );
        assert!(run(&["--admin-port", "15006"], &[]).is_err());
        assert!(run(&["--upstream-ports", "4-4"], &[]).is_err());
        assert!(run(&["--max-connections", "0"], &[]).is_err());
        let e = run(&["--max-connections-per-source", "-1"], &[]).unwrap_err();
        assert!(
            e.to_string().contains("--max-connections-per-source"),
            "{e}"
        );
        assert_eq!(run(&[], &[]).unwrap().max_connections_per_source, None);
        assert_eq!(
            run(&["--max-connections-per-source", "8"], &[])
                .unwrap()
                .max_connections_per_source,
            Some(8)
        );
        assert!(run(&["--inbound-port", "99999"], &[]).is_err());
        assert_eq!(run(&[], &[]).unwrap().workers, Some(1));
        assert_eq!(run(&["--workers", "auto"], &[]).unwrap().workers, None);
        assert_eq!(run(&["--workers", "2"], &[]).unwrap().workers, Some(2));
        for bad in ["0", "65", "two", ""] {
            let e = run(&["--workers", bad], &[]).unwrap_err();
            assert!(e.to_string().contains("--workers"), "{e}");
        }
    }

    #[test]
    fn north_south_flags_use_the_annotation_code() {
        let c = run(
            &["--xff-ports", "8080", "--xff-num-trusted-proxies=2"],
            &[("TPROXY_SIDECAR_DENY_CLIENT_CIDRS", "203.0.113.0/24")],
        )
        .unwrap();
        assert_eq!(c.north_south.len(), 3);
        let ns = tproxy_cni_policy::NorthSouth::from_annotations(&north_south_annotations(
            &c.north_south,
        ))
        .unwrap();
        assert!(ns.xff_on(8080));
        assert_eq!(ns.xff_trust, tproxy_cni_policy::XffTrust::Hops(2));
        assert_eq!(ns.acl.deny_client.len(), 1);
        assert_eq!(c.max_request_head, 60 * 1024);
        assert_eq!(c.proxy_protocol_timeout, Duration::from_secs(3));
        assert!(run(&[], &[]).unwrap().north_south.is_empty());
        let e = run(&["--xff-num-trusted-proxies", "1"], &[]).unwrap_err();
        assert!(
            e.to_string().contains("--xff-num-trusted-proxies")
                && e.to_string().contains("--xff-ports"),
            "{e}"
        );
        let e = run(&[], &[("TPROXY_SIDECAR_ALLOW_PEER_CIDRS", "10.0.0.1/8")]).unwrap_err();
        assert!(
            e.to_string().contains("TPROXY_SIDECAR_ALLOW_PEER_CIDRS"),
            "{e}"
        );
        let e = run(&["--proxy-protocol-ports", "443"], &[]).unwrap_err();
        assert!(
            e.to_string().contains("--proxy-protocol-trusted-cidrs"),
            "{e}"
        );
        assert!(run(&["--proxy-protocol-timeout", "soon"], &[]).is_err());
        assert!(run(&["--max-request-headers-kb", "0"], &[]).is_err());
    }

    #[test]
    fn help_lists_every_flag_and_env() {
        assert_eq!(
            parse(&args(&["--help"]), &BTreeMap::new()),
            Ok(Parsed::Help)
        );
        let h = help();
        for sp in SPECS {
            assert!(h.contains(&format!("--{}", sp.flag)));
            assert!(h.contains(&env_name(sp.flag)));
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        for bad in ["", "s", "-1s", "1.5s", "1d", "99999999999999999999", "1 s"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }
}
