//! Small value types shared by policy, plan and kernel code: CIDRs and TCP port ranges.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Address family of a rule, route or CIDR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
    /// The `AF_*` number netlink wants.
    pub fn af(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }
    /// The unspecified address of the family (`0.0.0.0` / `::`).
    pub fn any(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }
    pub fn max_prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

/// An IP network, `addr/prefix`, with host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Builds a CIDR, clearing host bits. `None` when the prefix is too long for the family.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let fam = Family::of(&addr);
        if prefix > fam.max_prefix() {
            return None;
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a) & mask_u32(prefix);
                IpAddr::V4(Ipv4Addr::from(bits))
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a) & mask_u128(prefix);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        };
        Some(Cidr { addr, prefix })
    }
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }
    /// The netmask as bytes in network order (4 or 16 bytes).
    pub fn mask_bytes(&self) -> Vec<u8> {
        match self.addr {
            IpAddr::V4(_) => mask_u32(self.prefix).to_be_bytes().to_vec(),
            IpAddr::V6(_) => mask_u128(self.prefix).to_be_bytes().to_vec(),
        }
    }
    /// The network address as bytes in network order.
    pub fn addr_bytes(&self) -> Vec<u8> {
        match self.addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(*a) & mask_u32(self.prefix) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                u128::from(*a) & mask_u128(self.prefix) == u128::from(n)
            }
            _ => false,
        }
    }
}

fn mask_u32(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

fn mask_u128(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix.min(128)))
    }
}

/// Why a CIDR or port text was refused (the caller adds which key it came from).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{0:?} is not an IP address or CIDR")]
    BadCidr(String),
    #[error("{0:?} has host bits set (did you mean {1}?)")]
    HostBits(String, Cidr),
    #[error("{0:?} is not a port (1-65535) or port range (lo-hi)")]
    BadPort(String),
}

impl FromStr for Cidr {
    type Err = ParseError;
    /// Accepts `10.0.0.0/8`, `fd00::/8`, and a bare address as a host route (`/32`, `/128`).
    /// Host bits set (`10.1.2.3/8`) are refused rather than silently widened.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let bad = || ParseError::BadCidr(s.to_string());
        let (addr, prefix) = match t.split_once('/') {
            Some((a, p)) => {
                let addr: IpAddr = a.parse().map_err(|_| bad())?;
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 3 {
                    return Err(bad());
                }
                let prefix: u8 = p.parse().map_err(|_| bad())?;
                (addr, prefix)
            }
            None => {
                let addr: IpAddr = t.parse().map_err(|_| bad())?;
                let p = Family::of(&addr).max_prefix();
                (addr, p)
            }
        };
        let cidr = Cidr::new(addr, prefix).ok_or_else(bad)?;
        if cidr.addr != addr {
            return Err(ParseError::HostBits(s.to_string(), cidr));
        }
        Ok(cidr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An inclusive TCP port range; a single port has `lo == hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn single(p: u16) -> PortRange {
        PortRange { lo: p, hi: p }
    }
    pub(crate) fn contains(&self, p: u16) -> bool {
        self.lo <= p && p <= self.hi
    }
    pub(crate) fn overlaps(&self, o: &PortRange) -> bool {
        self.lo <= o.hi && o.lo <= self.hi
    }
}

impl FromStr for PortRange {
    type Err = ParseError;
    /// `8080` or `9000-9100`; port 0 and reversed ranges are refused.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let bad = || ParseError::BadPort(s.to_string());
        let port = |x: &str| -> Result<u16, ParseError> {
            let x = x.trim();
            if x.is_empty() || x.len() > 5 || !x.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            match x.parse::<u32>() {
                Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
                _ => Err(bad()),
            }
        };
        let r = match t.split_once('-') {
            Some((a, b)) => PortRange {
                lo: port(a)?,
                hi: port(b)?,
            },
            None => PortRange::single(port(t)?),
        };
        if r.lo > r.hi {
            return Err(bad());
        }
        Ok(r)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parse_and_display() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "10.1.2.3".parse::<Cidr>().unwrap().to_string(),
            "10.1.2.3/32"
        );
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix(), 0);
        for bad in [
            "",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "x",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "10.0.0.0/8/9",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} should fail");
        }
        assert!(matches!(
            "10.1.2.3/8".parse::<Cidr>(),
            Err(ParseError::HostBits(..))
        ));
    }

    #[test]
    fn cidr_masks_and_contains() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert_eq!(c.mask_bytes(), vec![255, 255, 0, 0]);
        assert!(c.contains(&"10.1.200.3".parse().unwrap()));
        assert!(!c.contains(&"10.2.0.1".parse().unwrap()));
        let z: Cidr = "::/0".parse().unwrap();
        assert_eq!(z.mask_bytes(), vec![0; 16]);
    }

    #[test]
    fn port_ranges() {
        assert_eq!("80".parse::<PortRange>().unwrap(), PortRange::single(80));
        assert_eq!(
            "9000-9100".parse::<PortRange>().unwrap(),
            PortRange { lo: 9000, hi: 9100 }
        );
        for bad in [
            "0",
            "65536",
            "-1",
            "a",
            "",
            "10-5",
            "1-",
            "99999999999999999999",
            "+80",
        ] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?} should fail");
        }
    }
}
