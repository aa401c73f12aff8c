//! Strict parsing of client addresses taken from log lines.
//!
//! A log line is attacker-influenced text, so an address is only accepted when std's own parsers
//! accept it: no substring guessing, no hostnames. IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what
//! vsftpd with `listen_ipv6=YES` prints for IPv4 clients) is normalised to IPv4 so one client has
//! one identity whichever socket family saw it.

use std::net::{IpAddr, SocketAddr};

/// Parses a client address as a daemon writes it: `a.b.c.d`, an IPv6 address, `[v6]`,
/// `a.b.c.d:port` or `[v6]:port`. Returns `None` for anything else (hostnames, zone ids,
/// unbracketed IPv6 with a port, trailing garbage).
pub fn parse_addr(text: &str) -> Option<IpAddr> {
    // Surrounding whitespace is the only thing tolerated; everything else must parse exactly.
    let text = text.trim();
    if text.is_empty() || text.len() > 64 {
        return None;
    }
    let ip = if let Ok(ip) = text.parse::<IpAddr>() {
        ip
    } else if let Ok(sock) = text.parse::<SocketAddr>() {
        // `a.b.c.d:port` or `[v6]:port` (Redis `addr=`, MongoDB `remote`).
        sock.ip()
    } else if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)?
    } else {
        return None;
    };
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<String> {
        parse_addr(s).map(|ip| ip.to_string())
    }

    #[test]
    fn accepts_plain_and_port_forms() {
        assert_eq!(p("10.77.0.67").as_deref(), Some("10.77.0.67"));
        assert_eq!(p("fd77::66").as_deref(), Some("fd77::66"));
        assert_eq!(p("10.77.0.66:59720").as_deref(), Some("10.77.0.66"));
        assert_eq!(p("[fd77::66]:6379").as_deref(), Some("fd77::66"));
        assert_eq!(p("[fd77::66]").as_deref(), Some("fd77::66"));
    }

    #[test]
    fn normalises_ipv4_mapped() {
        assert_eq!(p("::ffff:10.77.0.20").as_deref(), Some("10.77.0.20"));
        assert_eq!(p("[::ffff:10.77.0.20]:21").as_deref(), Some("10.77.0.20"));
    }

    #[test]
    fn rejects_hostnames_and_garbage() {
        for bad in [
            "",
            "localhost",
            "UNKNOWN",
            "10.77.0.256",
            "10.77.0.1x",
            "fd77::66:59720:1:2:3:4:5",
            "fe80::1%eth0",
            "1.2.3.4/24",
            "[10.77.0.1]",
            "0x7f.1",
        ] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }
}
