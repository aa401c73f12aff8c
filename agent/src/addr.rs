//! Address and range validation: nothing reaches a kernel map before it passes through here.
//!
//! A small parser of our own instead of the `ipnet` crate, because the rules are ours: IPv4-mapped
//! IPv6 is folded to IPv4 (the data path sees IPv4 packets, so a mapped key would never match),
//! host bits must be zero (a typo such as `198.18.0.7/16` is refused, not silently widened), and
//! ranges broader than a safe minimum are refused unless the operator forces them.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// Shortest IPv4 prefix accepted without `--force`.
pub const MIN_PREFIX_V4: u8 = 16;
/// Shortest IPv6 prefix accepted without `--force`.
pub const MIN_PREFIX_V6: u8 = 32;

/// Why an address or range was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    /// Not an IPv4 or IPv6 address.
    #[error("`{input}` is not an IPv4 or IPv6 address")]
    Syntax {
        /// What was given.
        input: String,
    },
    /// The prefix length is not a number or is too long for the family.
    #[error("`{input}`: prefix length must be 0-{max}")]
    PrefixLength {
        /// What was given.
        input: String,
        /// The family's maximum.
        max: u8,
    },
    /// Bits set below the prefix.
    #[error("`{input}` has host bits set; did you mean `{suggestion}`?")]
    HostBits {
        /// What was given.
        input: String,
        /// The network the operator probably meant.
        suggestion: String,
    },
    /// A range broader than the safe minimum.
    #[error(
        "`{input}` covers too many addresses (shorter than /{min}); pass --force if you mean it"
    )]
    TooBroad {
        /// What was given.
        input: String,
        /// The minimum prefix length for the family.
        min: u8,
    },
    /// An address that can never be the source of a packet we judge.
    #[error("`{input}` is {what} and cannot be a packet source")]
    NotASource {
        /// What was given.
        input: String,
        /// What kind of address it is.
        what: &'static str,
    },
}

/// An IPv4 or IPv6 network: an address and a prefix length, host bits zero, IPv4-mapped IPv6
/// folded to IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Net {
    /// IPv4 network.
    V4(Ipv4Addr, u8),
    /// IPv6 network (never IPv4-mapped).
    V6(Ipv6Addr, u8),
}

impl Net {
    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        match self {
            Net::V4(_, p) | Net::V6(_, p) => *p,
        }
    }

    /// Whether this is a single address (/32 or /128).
    pub fn is_host(&self) -> bool {
        matches!(self, Net::V4(_, 32) | Net::V6(_, 128))
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        match self {
            Net::V4(a, _) => IpAddr::V4(*a),
            Net::V6(a, _) => IpAddr::V6(*a),
        }
    }

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self, normalize(ip)) {
            (Net::V4(n, p), IpAddr::V4(a)) => mask_v4(a, *p) == *n,
            (Net::V6(n, p), IpAddr::V6(a)) => mask_v6(a, *p) == *n,
            _ => false,
        }
    }

    /// Refuses ranges broader than [`MIN_PREFIX_V4`] / [`MIN_PREFIX_V6`] unless `force`.
    pub fn check_breadth(self, force: bool) -> Result<Self, AddrError> {
        let min = match self {
            Net::V4(..) => MIN_PREFIX_V4,
            Net::V6(..) => MIN_PREFIX_V6,
        };
        if !force && self.prefix() < min {
            return Err(AddrError::TooBroad {
                input: self.to_string(),
                min,
            });
        }
        Ok(self)
    }

    /// Refuses networks that cannot be packet sources: the unspecified address, multicast and
    /// IPv4 limited broadcast. Applies to attacker entries, where such an entry would be a
    /// mistake.
    pub fn check_source(self) -> Result<Self, AddrError> {
        let what = match self {
            Net::V4(a, 32) if a.is_unspecified() => Some("the unspecified address"),
            Net::V4(a, 32) if a.is_broadcast() => Some("the broadcast address"),
            Net::V4(a, p) if p >= 4 && a.is_multicast() => Some("a multicast address"),
            Net::V6(a, 128) if a.is_unspecified() => Some("the unspecified address"),
            Net::V6(a, p) if p >= 8 && a.is_multicast() => Some("a multicast address"),
            _ => None,
        };
        match what {
            Some(what) => Err(AddrError::NotASource {
                input: self.to_string(),
                what,
            }),
            None => Ok(self),
        }
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Net::V4(a, 32) => write!(f, "{a}"),
            Net::V6(a, 128) => write!(f, "{a}"),
            Net::V4(a, p) => write!(f, "{a}/{p}"),
            Net::V6(a, p) => write!(f, "{a}/{p}"),
        }
    }
}

/// Folds an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) to IPv4.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn mask_v4(a: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let bits = u32::from(a);
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ipv4Addr::from(bits & mask)
}

fn mask_v6(a: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let bits = u128::from(a);
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    Ipv6Addr::from(bits & mask)
}

impl FromStr for Net {
    type Err = AddrError;

    /// Parses `ADDR` or `ADDR/LEN`. An IPv4-mapped IPv6 range keeps its meaning: `::ffff:0:0/104`
    /// becomes `0.0.0.0/8`.
    fn from_str(input: &str) -> Result<Self, AddrError> {
        let input = input.trim();
        let (addr, len) = match input.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (input, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| AddrError::Syntax {
            input: input.to_owned(),
        })?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match len {
            None => max,
            Some(l) => match l.parse::<u8>() {
                Ok(p) if p <= max && !l.starts_with('+') => p,
                _ => {
                    return Err(AddrError::PrefixLength {
                        input: input.to_owned(),
                        max,
                    });
                }
            },
        };
        // Fold IPv4-mapped IPv6: the address, and the prefix if it reaches into the IPv4 part.
        let (ip, prefix) = match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= 96 => (IpAddr::V4(v4), prefix - 96),
                _ => (ip, prefix),
            },
            v4 => (v4, prefix),
        };
        let net = match ip {
            IpAddr::V4(a) => Net::V4(mask_v4(a, prefix), prefix),
            IpAddr::V6(a) => Net::V6(mask_v6(a, prefix), prefix),
        };
        if net.addr() != ip {
            return Err(AddrError::HostBits {
                input: input.to_owned(),
                suggestion: net.to_string(),
            });
        }
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Net {
        s.parse().unwrap()
    }

    #[test]
    fn parses_hosts_and_ranges() {
        assert_eq!(net("198.18.0.7"), Net::V4(Ipv4Addr::new(198, 18, 0, 7), 32));
        assert_eq!(
            net("198.18.0.0/24"),
            Net::V4(Ipv4Addr::new(198, 18, 0, 0), 24)
        );
        assert_eq!(
            net("2001:db8::1"),
            Net::V6("2001:db8::1".parse().unwrap(), 128)
        );
        assert_eq!(net("2001:db8::/48").prefix(), 48);
        assert!(net("198.18.0.7").is_host());
    }

    #[test]
    fn folds_ipv4_mapped() {
        assert_eq!(net("::ffff:198.18.0.7"), net("198.18.0.7"));
        assert_eq!(net("::ffff:198.18.0.0/120"), net("198.18.0.0/24"));
    }

    #[test]
    fn refuses_bad_input() {
        assert!(matches!(
            "nope".parse::<Net>(),
            Err(AddrError::Syntax { .. })
        ));
        assert!(matches!(
            "1.2.3.4/33".parse::<Net>(),
            Err(AddrError::PrefixLength { .. })
        ));
        assert!(matches!(
            "1.2.3.4/x".parse::<Net>(),
            Err(AddrError::PrefixLength { .. })
        ));
        assert!(matches!(
            "1.2.3.4/+8".parse::<Net>(),
            Err(AddrError::PrefixLength { .. })
        ));
        assert!(matches!(
            "::1/129".parse::<Net>(),
            Err(AddrError::PrefixLength { .. })
        ));
        assert_eq!(
            "198.18.0.7/16".parse::<Net>(),
            Err(AddrError::HostBits {
                input: "198.18.0.7/16".into(),
                suggestion: "198.18.0.0/16".into()
            })
        );
    }

    #[test]
    fn refuses_broad_ranges_unless_forced() {
        assert!(matches!(
            net("0.0.0.0/0").check_breadth(false),
            Err(AddrError::TooBroad { .. })
        ));
        assert!(matches!(
            net("::/0").check_breadth(false),
            Err(AddrError::TooBroad { .. })
        ));
        assert!(matches!(
            net("10.0.0.0/8").check_breadth(false),
            Err(AddrError::TooBroad { .. })
        ));
        assert!(net("10.0.0.0/8").check_breadth(true).is_ok());
        assert!(net("198.18.0.0/16").check_breadth(false).is_ok());
        assert!(net("2001:db8::/32").check_breadth(false).is_ok());
        assert!(matches!(
            net("2001:db8::/31").check_breadth(false),
            Err(AddrError::TooBroad { .. })
        ));
    }

    #[test]
    fn refuses_non_sources() {
        for s in ["0.0.0.0", "255.255.255.255", "224.0.0.1", "ff02::1", "::"] {
            assert!(
                matches!(net(s).check_source(), Err(AddrError::NotASource { .. })),
                "{s}"
            );
        }
        assert!(net("198.18.0.7").check_source().is_ok());
    }

    #[test]
    fn contains() {
        let n = net("198.18.0.0/24");
        assert!(n.contains("198.18.0.9".parse().unwrap()));
        assert!(n.contains("::ffff:198.18.0.9".parse().unwrap()));
        assert!(!n.contains("198.18.1.9".parse().unwrap()));
        assert!(net("0.0.0.0/0").contains("1.1.1.1".parse().unwrap()));
    }
}
