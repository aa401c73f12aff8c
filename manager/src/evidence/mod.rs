//! The evidence side of the manager: what `mirage-server` and `mirage-sandbox` report, and how it
//! becomes policy.
//!
//! - [`verdicts`]: batches of detections from servers, validated whole, stored idempotently, and
//!   turned into automatic attacker entries (with policy revisions) in one transaction.
//! - [`sessions`]: sandbox session records, attributed to the attacker entry that sent them.
//! - [`bus`]: the `mirage_detection` LISTEN fan-out behind the web UI's live attack log.
//! - [`retention`]: the hourly sweep that deletes records older than the retention settings.

pub mod bus;
pub mod retention;
pub mod sessions;
pub mod verdicts;

/// Verdicts received, by outcome (`accepted`, `duplicate`, `allowlisted`).
pub const VERDICTS: &str = "mirage_manager_verdicts_total";
/// Attacker entries changed by verdicts, by op (`add`, `update`).
pub const AUTOMATIC_ENTRIES: &str = "mirage_manager_automatic_attacker_changes_total";
/// Sandbox session reports stored, by outcome (`inserted`, `updated`).
pub const SANDBOX_SESSIONS: &str = "mirage_manager_sandbox_session_reports_total";
/// Rows deleted by the retention sweep, by table.
pub const RETENTION_DELETED: &str = "mirage_manager_retention_deleted_total";
/// Open live attack-log streams on this replica.
pub const EVENT_STREAMS: &str = "mirage_manager_event_streams";

/// Checks a free-text field: `min..=max` characters, no NUL (PostgreSQL text and jsonb cannot
/// hold one). `what` names the field in the message, e.g. `verdicts[3].rule`.
pub(crate) fn check_text(what: &str, value: &str, min: usize, max: usize) -> Result<(), String> {
    let len = value.chars().count();
    if len < min || len > max {
        return Err(if min > 0 && len < min {
            format!("{what} must not be empty")
        } else {
            format!("{what} is longer than {max} characters")
        });
    }
    check_nul(what, value)
}

/// Refuses a NUL character.
pub(crate) fn check_nul(what: &str, value: &str) -> Result<(), String> {
    if value.contains('\0') {
        return Err(format!("{what} contains a NUL character"));
    }
    Ok(())
}

/// Parses an RFC 3339 time.
pub(crate) fn parse_time(what: &str, value: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
        .map_err(|_| format!("{what}: `{value}` is not an RFC 3339 time"))
}

/// Parses an attacker's address: one IPv4 or IPv6 address, IPv4-mapped IPv6 folded to IPv4 (the
/// agents key IPv4 sources as IPv4), and never one that cannot be a remote attacker's source
/// (unspecified, loopback, multicast, broadcast): an entry for those would be a mistake at best.
pub fn parse_addr(what: &str, value: &str) -> Result<std::net::IpAddr, String> {
    let addr: std::net::IpAddr = value
        .trim()
        .parse()
        .map_err(|_| format!("{what}: `{value}` is not an IPv4 or IPv6 address"))?;
    let addr = addr.to_canonical();
    let refused = if addr.is_unspecified() {
        Some("unspecified")
    } else if addr.is_loopback() {
        Some("loopback")
    } else if addr.is_multicast() {
        Some("multicast")
    } else if matches!(addr, std::net::IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("broadcast")
    } else {
        None
    };
    match refused {
        Some(kind) => Err(format!(
            "{what}: `{addr}` is a {kind} address, not an attacker's"
        )),
        None => Ok(addr),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(
            parse_addr("a", "::ffff:203.0.113.5").unwrap().to_string(),
            "203.0.113.5"
        );
        assert_eq!(
            parse_addr("a", " 2001:db8::1 ").unwrap().to_string(),
            "2001:db8::1"
        );
        for (bad, needle) in [
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("127.0.0.2", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("203.0.113.0/24", "not an IPv4"),
            ("example.org", "not an IPv4"),
        ] {
            let err = parse_addr("verdicts[2].addr", bad).unwrap_err();
            assert!(
                err.contains(needle) && err.starts_with("verdicts[2].addr"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn checks_text() {
        check_text("x", "abc", 1, 3).unwrap();
        assert!(check_text("x", "", 1, 3).unwrap_err().contains("empty"));
        assert!(
            check_text("x", "abcd", 1, 3)
                .unwrap_err()
                .contains("longer")
        );
        assert!(check_text("x", "a\0", 1, 3).unwrap_err().contains("NUL"));
        assert!(parse_time("t", "2024-05-01T10:00:00Z").is_ok());
        assert!(
            parse_time("t", "yesterday")
                .unwrap_err()
                .contains("RFC 3339")
        );
    }
}
