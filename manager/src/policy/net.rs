//! Validation of the addresses and ranges that go into the policy (attackers and allowlist).
//!
//! One canonical form per network, so that the unique `(group, net)` key and the kernel's maps
//! agree: IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is folded to IPv4 (the agent's maps key IPv4
//! sources as IPv4; a mapped entry would never match), host bits must be zero (an operator who
//! typed `10.1.2.3/16` meant something, and guessing which is worse than asking), and ranges
//! broader than a /16 (IPv4) or /32 (IPv6) need `force` from an admin. The database's CHECK
//! (/8, /16) is the floor nobody passes.

use std::net::IpAddr;

use ipnet::IpNet;

/// Broadest IPv4 prefix accepted without `force`.
pub const MIN_PREFIX_V4: u8 = 16;
/// Broadest IPv6 prefix accepted without `force`.
pub const MIN_PREFIX_V6: u8 = 32;
/// Broadest IPv4 prefix accepted at all (the schema's CHECK).
pub const FLOOR_PREFIX_V4: u8 = 8;
/// Broadest IPv6 prefix accepted at all (the schema's CHECK).
pub const FLOOR_PREFIX_V6: u8 = 16;

/// Parses `input` (an address, or `address/prefix`) into its canonical network, or says why not.
/// `force` lifts the /16 and /32 limits (down to the schema's floor).
pub fn parse(input: &str, force: bool) -> Result<IpNet, String> {
    let input = input.trim();
    let (addr, prefix) = match input.split_once('/') {
        Some((addr, prefix)) => {
            let prefix: u8 = prefix
                .parse()
                .map_err(|_| format!("`{input}`: the prefix length is not a number"))?;
            (addr, Some(prefix))
        }
        None => (input, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("`{input}` is not an IPv4 or IPv6 address or range"))?;
    let (addr, prefix) = match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                let prefix = match prefix {
                    Some(p) if p < 96 => {
                        return Err(format!(
                            "`{input}`: an IPv4-mapped range needs a prefix of at least /96"
                        ));
                    }
                    Some(p) => Some(p - 96),
                    None => None,
                };
                (IpAddr::V4(v4), prefix)
            }
            None => (IpAddr::V6(v6), prefix),
        },
        v4 => (v4, prefix),
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = prefix.unwrap_or(max);
    let net = IpNet::new(addr, prefix)
        .map_err(|_| format!("`{input}`: the prefix length must be at most /{max}"))?;
    if net.network() != addr {
        return Err(format!(
            "`{input}` has host bits set; did you mean `{}`?",
            net.trunc()
        ));
    }
    let (limit, floor) = match net {
        IpNet::V4(_) => (MIN_PREFIX_V4, FLOOR_PREFIX_V4),
        IpNet::V6(_) => (MIN_PREFIX_V6, FLOOR_PREFIX_V6),
    };
    if prefix < floor {
        return Err(format!(
            "`{net}` is too broad: the broadest range allowed is /{floor}"
        ));
    }
    if prefix < limit && !force {
        return Err(format!(
            "`{net}` is broader than /{limit}; an admin can set `force` to allow it"
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonicalizes() {
        for (input, want) in [
            ("192.0.2.1", "192.0.2.1/32"),
            (" 192.0.2.0/24 ", "192.0.2.0/24"),
            ("::ffff:192.0.2.1", "192.0.2.1/32"),
            ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
            ("2001:db8::1", "2001:db8::1/128"),
            ("2001:db8::/48", "2001:db8::/48"),
        ] {
            assert_eq!(parse(input, false).unwrap().to_string(), want, "{input}");
        }
    }

    #[test]
    fn refuses() {
        for (input, force, needle) in [
            ("192.0.2.1/24", false, "did you mean `192.0.2.0/24`"),
            ("10.0.0.0/8", false, "force"),
            ("0.0.0.0/0", true, "too broad"),
            ("2001:d00::/24", false, "force"),
            ("::/0", true, "too broad"),
            ("192.0.2.1/33", false, "at most /32"),
            ("::ffff:0.0.0.0/90", false, "/96"),
            ("example.org", false, "not an IPv4"),
            ("1.2.3.4/x", false, "not a number"),
        ] {
            let err = parse(input, force).unwrap_err();
            assert!(err.contains(needle), "{input}: {err}");
        }
        assert_eq!(parse("10.0.0.0/8", true).unwrap().to_string(), "10.0.0.0/8");
    }
}
