//! Is this pod's network namespace programmed for our mode?
//!
//! A pod created before the plugin was chained into the node's CNI configuration runs with no
//! interception at all: TPROXY fails open (docs/ARCHITECTURE.md, pitfall 1), so the app is
//! reached directly and nothing looks wrong. The sidecar checks what it can read without
//! privileges over rtnetlink, at start and on `/ready`, and stays not-ready until it is there:
//!
//! - tproxy mode: for each family the pod has a global address in, a policy rule that sends
//!   our mark (under the rule's own mask) to a table holding `local default dev lo`. Without
//!   it the app's replies to our transparent upstreams never come back to us.
//! - redirect mode: the NAT rules live in nftables, which the kernel lets nobody read without
//!   CAP_NET_ADMIN. What the plugin also leaves in an IPv6 pod is `::6/128` on `lo` (the
//!   source the sidecar dials from), so a dual-stack or IPv6 pod is checked through that; an
//!   IPv4-only redirect pod cannot be checked, which is said once, and readiness does not
//!   depend on it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::socket::{recv, send, MsgFlags};

use super::config::InboundMode;
use tproxy_cni_plugin::netlink_attrs as attrs;
use tproxy_cni_plugin::routing::RoutingError;
use tproxy_cni_policy::consts::REDIRECT_SOURCE_V6;
use tproxy_cni_policy::Family;

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Programmed,
    /// Something the plugin puts there is missing (what, in words).
    Missing(String),
    /// Nothing readable tells (why).
    Unverifiable(String),
}

/// Reads the kernel state once.
pub(crate) fn verify(mode: InboundMode, mark: u32) -> Verdict {
    match read(mode, mark) {
        Ok(v) => v,
        Err(e) => Verdict::Unverifiable(format!("rtnetlink: {e}")),
    }
}

fn read(mode: InboundMode, mark: u32) -> Result<Verdict, RoutingError> {
    let mut nl = Dumper::open()?;
    let addrs = dump_addresses(&mut nl)?;
    let lo = nix::net::if_::if_nametoindex("lo").unwrap_or(0);
    // Families of the pod's own addresses (global scope, not on lo); none known: IPv4.
    let mut fams: Vec<Family> = addrs
        .iter()
        .filter(|a| a.index != lo && a.scope == RT_SCOPE_UNIVERSE)
        .map(|a| Family::of(&a.ip))
        .collect();
    fams.sort();
    fams.dedup();
    if fams.is_empty() {
        fams.push(Family::V4);
    }
    match mode {
        InboundMode::Tproxy => {
            for fam in fams {
                if !mark_routes_locally(&mut nl, fam, mark, lo)? {
                    return Ok(Verdict::Missing(format!(
                        "no {fam} policy rule sends fwmark {mark:#x} to a table with \
                         `local default dev lo`"
                    )));
                }
            }
            Ok(Verdict::Programmed)
        }
        InboundMode::Redirect => {
            if !fams.contains(&Family::V6) {
                return Ok(Verdict::Unverifiable(
                    "redirect mode in an IPv4-only pod: the plugin's NAT rules cannot be read \
                     without CAP_NET_ADMIN"
                        .into(),
                ));
            }
            let six = IpAddr::V6(REDIRECT_SOURCE_V6);
            if addrs.iter().any(|a| a.index == lo && a.ip == six) {
                Ok(Verdict::Programmed)
            } else {
                Ok(Verdict::Missing(format!(
                    "{six} is not on lo (the plugin adds it in redirect mode)"
                )))
            }
        }
    }
}

/// Every address in the netns.
fn dump_addresses(nl: &mut Dumper) -> Result<Vec<Addr>, RoutingError> {
    let mut out = Vec::new();
    for af in [libc::AF_INET, libc::AF_INET6] {
        // struct ifaddrmsg: family, prefix length, flags, scope, index (u32).
        let mut head = [0u8; 8];
        head[0] = af as u8;
        match nl.dump(libc::RTM_GETADDR, &head, "addrs", |kind, body| {
            if kind == libc::RTM_NEWADDR {
                out.extend(Addr::parse(body));
            }
        }) {
            Ok(()) => {}
            // No IPv6 in this kernel or netns.
            Err(RoutingError::Kernel { err, .. })
                if err.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// A `fwmark` rule matching `mark` under its own mask, pointing at a table that holds
/// `local default dev lo`. Loose on priority and mask on purpose: what matters is where
/// marked packets go.
fn mark_routes_locally(
    nl: &mut Dumper,
    fam: Family,
    mark: u32,
    lo: u32,
) -> Result<bool, RoutingError> {
    let af = match fam {
        Family::V4 => libc::AF_INET,
        Family::V6 => libc::AF_INET6,
    } as u8;
    // struct fib_rule_hdr and struct rtmsg are both 12 bytes, the family first.
    let mut head = [0u8; 12];
    head[0] = af;
    let mut tables = Vec::new();
    nl.dump(libc::RTM_GETRULE, &head, "listing rules", |kind, body| {
        if kind == libc::RTM_NEWRULE {
            tables.extend(Rule::parse(body).and_then(|r| rule_table_for(&r, mark)));
        }
    })?;
    if tables.is_empty() {
        return Ok(false);
    }
    let mut found = false;
    nl.dump(libc::RTM_GETROUTE, &head, "listing routes", |kind, body| {
        if kind == libc::RTM_NEWROUTE {
            found |= Route::parse(body)
                .and_then(|r| local_default_table(&r, lo))
                .is_some_and(|t| tables.contains(&t));
        }
    })?;
    Ok(found)
}

/// `RT_SCOPE_UNIVERSE`: a global address.
const RT_SCOPE_UNIVERSE: u8 = 0;
/// `FR_ACT_TO_TBL`: a rule whose action is "lookup table".
const FR_ACT_TO_TBL: u8 = 1;
/// `RTN_LOCAL`: a route delivering to this host.
const RTN_LOCAL: u8 = 2;
/// Rule attributes (linux/fib_rules.h).
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
/// Route and address attributes (linux/rtnetlink.h, linux/if_addr.h).
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

/// One address: (interface index, scope, address).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Addr {
    index: u32,
    scope: u8,
    ip: IpAddr,
}

/// What a rule says about marks and tables.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Rule {
    action: u8,
    table: u32,
    fwmark: Option<u32>,
    fwmask: Option<u32>,
}

/// What a route says about where it delivers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Route {
    kind: u8,
    dst_len: u8,
    table: u32,
    oif: Option<u32>,
    /// The `RTA_DST` attribute, when there is one.
    dst: Option<IpAddr>,
    /// An `RTA_DST` of neither 4 nor 16 bytes.
    dst_other: bool,
}

impl Addr {
    fn parse(body: &[u8]) -> Option<Addr> {
        let scope = *body.get(3)?;
        let index = u32::from_ne_bytes(body.get(4..8)?.try_into().ok()?);
        // The first of IFA_LOCAL and IFA_ADDRESS, as the kernel lists them.
        let ip = attrs(body.get(8..)?).find_map(|(t, v)| match t {
            IFA_LOCAL | IFA_ADDRESS => ip_of(v),
            _ => None,
        })?;
        Some(Addr { index, scope, ip })
    }
}

impl Rule {
    fn parse(body: &[u8]) -> Option<Rule> {
        let head = body.get(..12)?;
        let mut r = Rule {
            action: head[7],
            table: u32::from(head[4]),
            ..Rule::default()
        };
        for (t, v) in attrs(&body[12..]) {
            match t {
                FRA_TABLE => r.table = u32_of(v)?,
                FRA_FWMARK => r.fwmark = Some(u32_of(v)?),
                FRA_FWMASK => r.fwmask = Some(u32_of(v)?),
                _ => {}
            }
        }
        Some(r)
    }
}

impl Route {
    fn parse(body: &[u8]) -> Option<Route> {
        let head = body.get(..12)?;
        let mut r = Route {
            dst_len: head[1],
            table: u32::from(head[4]),
            kind: head[7],
            ..Route::default()
        };
        for (t, v) in attrs(&body[12..]) {
            match t {
                RTA_TABLE => r.table = u32_of(v)?,
                RTA_OIF => r.oif = Some(u32_of(v)?),
                RTA_DST => match ip_of(v) {
                    Some(ip) => r.dst = Some(ip),
                    None => r.dst_other = true,
                },
                _ => {}
            }
        }
        Some(r)
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

fn ip_of(v: &[u8]) -> Option<IpAddr> {
    match v.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(v).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(v).ok()?))),
        _ => None,
    }
}

/// The table of a `fwmark M/K lookup T` rule that matches `mark`.
fn rule_table_for(r: &Rule, mark: u32) -> Option<u32> {
    if r.action != FR_ACT_TO_TBL {
        return None;
    }
    let fwmark = r.fwmark?;
    let mask = r.fwmask.unwrap_or(u32::MAX);
    (mask != 0 && fwmark & mask == mark & mask).then_some(r.table)
}

/// The table of a `local default dev lo` route.
fn local_default_table(r: &Route, lo: u32) -> Option<u32> {
    let default_dst = !r.dst_other && r.dst.is_none_or(|a| a.is_unspecified());
    (r.kind == RTN_LOCAL && r.dst_len == 0 && default_dst && r.oif == Some(lo)).then_some(r.table)
}

/// A read-only rtnetlink socket that dumps one kind of object at a time. Hand-written rather
/// than `tproxy_cni_plugin::routing::Rtnl`: that one decodes every reply into
/// `netlink-packet-route`'s full message types, whose parsers (every link kind, every
/// attribute) were a third of this binary's code, mapped into every pod for the three fixed
/// headers and six attributes read here (docs/ARCHITECTURE.md, pitfall 91).
struct Dumper {
    fd: OwnedFd,
    seq: u32,
    /// Replies are read into this. The kernel sizes each batch of a dump to the reader's
    /// buffer (at least one page's worth, `NLMSG_GOODSIZE`), so 8 KiB, as libmnl reads, holds
    /// any batch; a larger buffer only stays in the heap after the check.
    rx: Vec<u8>,
}

/// `struct nlmsghdr`: length, type, flags, sequence, port.
const NLMSG_HDRLEN: usize = 16;

impl Dumper {
    fn open() -> Result<Dumper, RoutingError> {
        use nix::sys::socket::{
            connect, socket, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType,
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )
        .map_err(|e| RoutingError::Socket(e.into()))?;
        // Connected to the kernel (port 0): only its replies are received.
        connect(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
            .map_err(|e| RoutingError::Socket(e.into()))?;
        Ok(Dumper {
            fd,
            seq: 0,
            rx: vec![0; 8 * 1024],
        })
    }

    /// Sends a dump request of type `kind` with the fixed header `head`, and hands each reply
    /// message (type, body after the netlink header) to `each` until the dump is done.
    fn dump(
        &mut self,
        kind: u16,
        head: &[u8],
        what: &str,
        mut each: impl FnMut(u16, &[u8]),
    ) -> Result<(), RoutingError> {
        self.seq = self.seq.wrapping_add(1);
        let len = NLMSG_HDRLEN + head.len();
        let mut req = Vec::with_capacity(len);
        req.extend_from_slice(&(len as u32).to_ne_bytes());
        req.extend_from_slice(&kind.to_ne_bytes());
        req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
        req.extend_from_slice(&self.seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(head);
        send(self.fd.as_raw_fd(), &req, MsgFlags::empty())
            .map_err(|e| RoutingError::Socket(e.into()))?;
        let bad = |detail: &str| RoutingError::Decode {
            what: what.into(),
            detail: detail.into(),
        };
        loop {
            let n = match recv(self.fd.as_raw_fd(), &mut self.rx, MsgFlags::empty()) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(RoutingError::Socket(e.into())),
            };
            let mut b = &self.rx[..n];
            while !b.is_empty() {
                let h = b.get(..NLMSG_HDRLEN).ok_or_else(|| bad("short header"))?;
                let mlen = u32::from_ne_bytes(h[..4].try_into().unwrap_or_default()) as usize;
                let mtype = u16::from_ne_bytes([h[4], h[5]]);
                let mseq = u32::from_ne_bytes(h[8..12].try_into().unwrap_or_default());
                if mlen < NLMSG_HDRLEN {
                    return Err(bad("zero-length message"));
                }
                let body = b
                    .get(NLMSG_HDRLEN..mlen)
                    .ok_or_else(|| bad("truncated message"))?;
                b = b.get(align4(mlen)..).unwrap_or_default();
                if mseq != self.seq {
                    continue;
                }
                match i32::from(mtype) {
                    libc::NLMSG_DONE => return Ok(()),
                    libc::NLMSG_ERROR => {
                        let code = body.get(..4).ok_or_else(|| bad("short error"))?;
                        let code = i32::from_ne_bytes(code.try_into().unwrap_or_default());
                        return match code {
                            0 => Ok(()),
                            c => Err(RoutingError::Kernel {
                                what: what.into(),
                                err: io::Error::from_raw_os_error(-c),
                            }),
                        };
                    }
                    _ => each(mtype, body),
                }
            }
        }
    }
}

/// How long a verdict is reused: `/ready` may be probed often, the kernel state changes
/// rarely, and a dump costs a few netlink round trips.
const CACHE: Duration = Duration::from_secs(1);

/// The check behind `/ready`, cached, logging each change of verdict once.
#[derive(Debug)]
pub(crate) struct Checker {
    mode: InboundMode,
    mark: u32,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    at: Option<Instant>,
    last: Option<Verdict>,
}

impl Checker {
    pub(crate) fn new(mode: InboundMode, mark: u32) -> Checker {
        Checker {
            mode,
            mark,
            state: Mutex::new(State::default()),
        }
    }

    /// `Err(reason)` while the netns is known not to be programmed.
    pub(crate) fn ready(&self) -> Result<(), String> {
        self.ready_with(|| verify(self.mode, self.mark))
    }

    fn ready_with(&self, read: impl FnOnce() -> Verdict) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = st.at.is_some_and(|t| t.elapsed() < CACHE);
        if !fresh {
            let v = read();
            if st.last.as_ref() != Some(&v) {
                match &v {
                    Verdict::Missing(what) => log::warn!(
                        "not ready: {what} in this pod's network namespace, so \
                         nothing is intercepted ({} mode). Likely cause: the pod started before \
                         tproxy-cni was chained into the node's CNI configuration; recreate the \
                         pod once the installer runs on its node",
                        self.mode.as_str()
                    ),
                    Verdict::Programmed if st.last.is_some() => {
                        log::info!("interception rules found; ready")
                    }
                    Verdict::Programmed => {}
                    Verdict::Unverifiable(why) => log::warn!(
                        "cannot verify the interception rules ({why}); \
                         readiness does not depend on them"
                    ),
                }
            }
            st.last = Some(v);
            st.at = Some(Instant::now());
        }
        match &st.last {
            Some(Verdict::Missing(what)) => Err(what.clone()),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_matching_follows_the_rules_mask() {
        let rule = |mark: u32, mask: Option<u32>, action: u8| Rule {
            action,
            table: 29808,
            fwmark: Some(mark),
            fwmask: mask,
        };
        assert_eq!(
            rule_table_for(&rule(0x7470, None, FR_ACT_TO_TBL), 0x7470),
            Some(29808)
        );
        // Only our bits compared: a rule written with a narrower mask still routes us.
        assert_eq!(
            rule_table_for(&rule(0x7470, Some(0xffff), FR_ACT_TO_TBL), 0x17470),
            Some(29808)
        );
        assert_eq!(
            rule_table_for(&rule(0x539, None, FR_ACT_TO_TBL), 0x7470),
            None
        );
        assert_eq!(
            rule_table_for(&rule(0x7470, Some(0), FR_ACT_TO_TBL), 0x7470),
            None
        );
        // FR_ACT_UNREACHABLE
        assert_eq!(rule_table_for(&rule(0x7470, None, 7), 0x7470), None);
    }

    fn attr(t: u16, v: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&(4 + v.len() as u16).to_ne_bytes());
        a.extend_from_slice(&t.to_ne_bytes());
        a.extend_from_slice(v);
        a.resize(align4(a.len()), 0);
        a
    }

    /// Messages as `ip rule` / `ip route` / `ip addr` dumps carry them.
    #[test]
    fn parses_the_kernels_fixed_headers_and_attributes() {
        // fwmark 0x7470/0xffff lookup 29808 (table above 255: 252 in the header, FRA_TABLE).
        let mut rule = vec![2, 0, 0, 0, 252, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
        rule.extend(attr(FRA_TABLE, &29808u32.to_ne_bytes()));
        rule.extend(attr(6, &32765u32.to_ne_bytes())); // FRA_PRIORITY, ignored
        rule.extend(attr(FRA_FWMARK, &0x7470u32.to_ne_bytes()));
        rule.extend(attr(FRA_FWMASK, &0xffffu32.to_ne_bytes()));
        let r = Rule::parse(&rule).unwrap();
        assert_eq!(
            r,
            Rule {
                action: FR_ACT_TO_TBL,
                table: 29808,
                fwmark: Some(0x7470),
                fwmask: Some(0xffff)
            }
        );
        assert_eq!(rule_table_for(&r, 0x7470), Some(29808));

        // local default dev lo table 29808 (IPv4: no RTA_DST at all).
        let mut route = vec![2, 0, 0, 0, 252, 3, 254, RTN_LOCAL, 0, 0, 0, 0];
        route.extend(attr(RTA_TABLE, &29808u32.to_ne_bytes()));
        route.extend(attr(RTA_OIF, &1u32.to_ne_bytes()));
        let r = Route::parse(&route).unwrap();
        assert_eq!(local_default_table(&r, 1), Some(29808));
        assert_eq!(local_default_table(&r, 2), None);
        // IPv6 lists the default destination as ::; another destination is not the default.
        let mut v6 = route.clone();
        v6[0] = 10;
        v6.extend(attr(RTA_DST, &[0; 16]));
        assert_eq!(
            local_default_table(&Route::parse(&v6).unwrap(), 1),
            Some(29808)
        );
        let mut other = route.clone();
        other.extend(attr(RTA_DST, &[10, 0, 0, 1]));
        assert_eq!(local_default_table(&Route::parse(&other).unwrap(), 1), None);
        let mut unicast = route.clone();
        unicast[7] = 1; // RTN_UNICAST
        assert_eq!(
            local_default_table(&Route::parse(&unicast).unwrap(), 1),
            None
        );

        // 10.0.0.5/24 scope global on index 3.
        let mut addr = vec![2, 24, 0, RT_SCOPE_UNIVERSE];
        addr.extend(3u32.to_ne_bytes());
        addr.extend(attr(IFA_ADDRESS, &[10, 0, 0, 5]));
        addr.extend(attr(IFA_LOCAL, &[10, 0, 0, 6]));
        assert_eq!(
            Addr::parse(&addr),
            Some(Addr {
                index: 3,
                scope: RT_SCOPE_UNIVERSE,
                ip: "10.0.0.5".parse().unwrap()
            })
        );
        // Truncated input is refused, not read past.
        assert_eq!(Rule::parse(&rule[..8]), None);
        assert_eq!(Addr::parse(&addr[..6]), None);
        let mut cut = route.clone();
        cut.truncate(route.len() - 2);
        assert_eq!(Route::parse(&cut).unwrap().oif, None);
    }

    /// The dump against this process's own network namespace: `lo` is there, with 127.0.0.1.
    #[test]
    fn dumps_the_namespaces_addresses() {
        let mut nl = Dumper::open().unwrap();
        let addrs = dump_addresses(&mut nl).unwrap();
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        if addrs.iter().any(|a| a.index == lo) {
            assert!(
                addrs.iter().any(|a| a.index == lo && a.ip == local),
                "{addrs:?}"
            );
        }
        // Two dumps on one socket: sequence numbers keep them apart.
        let mut head = [0u8; 12];
        head[0] = libc::AF_INET as u8;
        let mut n = 0;
        nl.dump(libc::RTM_GETROUTE, &head, "routes", |_, _| n += 1)
            .unwrap();
        assert!(n > 0 || addrs.is_empty());
    }

    #[test]
    fn checker_caches_and_reports_missing() {
        let c = Checker::new(InboundMode::Tproxy, 0x7470);
        let missing = || Verdict::Missing("no rule".into());
        assert_eq!(c.ready_with(missing), Err("no rule".into()));
        // Within the cache time the kernel is not read again.
        assert_eq!(
            c.ready_with(|| panic!("read again within the cache time")),
            Err("no rule".into())
        );
        c.state.lock().unwrap().at = None;
        assert_eq!(c.ready_with(|| Verdict::Programmed), Ok(()));
        c.state.lock().unwrap().at = None;
        assert_eq!(c.ready_with(|| Verdict::Unverifiable("x".into())), Ok(()));
    }
}
