//! One syslog message (RFC 5424 or RFC 3164) to a [`LogRecord`], and the RFC 5424 form the
//! agent sends.
//!
//! The agent ships each line of a service's log file as the MSG of an RFC 5424 message with a
//! `mirage@32473` structured-data element naming the service (and the file), so the rules see
//! the line exactly as the daemon wrote it. Relays (rsyslog) forward what daemons logged through
//! syslog(3); for those the line is rebuilt the way rsyslog would have written it to a file,
//! `TIMESTAMP HOST APP[PID]: MSG`, which is the form the rule packs match.
//!
//! Parsing is syslog_loose's; on top of it this module insists on a PRI (syslog_loose treats it
//! as optional, which would let any line that happens to start with a date through) and takes
//! the MSG from the original text rather than syslog_loose's trimmed slice, so that an agent
//! line keeps its leading and trailing spaces.

use std::net::SocketAddr;

use chrono::{DateTime, Datelike as _, FixedOffset, NaiveDate, SecondsFormat, Utc};
use syslog_loose::{Message, Protocol, Variant};

use crate::record::{LogRecord, Origin};

// The agent's side of the wire (the RFC 5424 it sends) lives in `syslog-wire`, shared with
// mirage-agent; re-exported here so both ends name one definition.
pub use syslog_wire::{MIRAGE_SD_ID, SEQ_PARAM, format_rfc5424, format_rfc5424_with};

/// Why a frame or datagram is not a usable syslog message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Malformed {
    /// No PRI, or a header that neither RFC 5424 nor RFC 3164 parsing accepts.
    #[error("not a syslog message")]
    NotSyslog,
    /// A valid header with an empty (or blank) MSG: nothing for the rules to look at.
    #[error("empty message")]
    EmptyMessage,
}

impl Malformed {
    /// The `reason` label of `mirage_server_malformed_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotSyslog => "not_syslog",
            Self::EmptyMessage => "empty_message",
        }
    }
}

/// The service whose rules apply to a program name (APP-NAME, or the RFC 3164 tag).
pub fn service_for_app(app: &str) -> Option<&'static str> {
    Some(match app.to_ascii_lowercase().as_str() {
        "sshd" | "sshd-session" => "sshd",
        "vsftpd" => "vsftpd",
        "rsyncd" | "rsync" => "rsync",
        "mysqld" | "mariadbd" | "mariadb" => "mysql",
        "redis" | "redis-server" => "redis",
        "mongod" => "mongodb",
        "nginx" | "apache2" | "httpd" => "web",
        _ => return None,
    })
}

/// Parses one message received from `peer` over a connection (or datagram) of trust `origin`.
///
/// The bytes may be any encoding: invalid UTF-8 is replaced (U+FFFD), a UTF-8 BOM before the
/// MSG (RFC 5424 §6.4) is removed, and so are trailing CR and LF. RFC 3164 timestamps carry
/// neither year nor zone: they are taken as UTC, in the latest year that does not put them in
/// the future.
///
/// # Errors
///
/// [`Malformed::NotSyslog`] without a PRI or a parsable header, [`Malformed::EmptyMessage`]
/// when the MSG is blank.
pub fn parse_message(raw: &[u8], origin: Origin, peer: SocketAddr) -> Result<LogRecord, Malformed> {
    let text = String::from_utf8_lossy(raw);
    let text: &str = &text;
    let parsed =
        syslog_loose::parse_message_with_year_exact_tz(text, year_for, Some(Utc), Variant::Either)
            .map_err(|_| Malformed::NotSyslog)?;
    // syslog_loose makes the PRI optional; without one this is not syslog but some line.
    if parsed.facility.is_none() || parsed.severity.is_none() {
        return Err(Malformed::NotSyslog);
    }

    let msg = original_msg(text, &parsed);
    if msg.trim().is_empty() {
        return Err(Malformed::EmptyMessage);
    }

    let mirage = parsed
        .structured_data
        .iter()
        .find(|element| element.id == MIRAGE_SD_ID);
    let param = |wanted: &str| {
        mirage.and_then(|element| {
            element
                .params()
                .find(|(name, _)| **name == wanted)
                .map(|(_, value)| value)
        })
    };
    let seq = param(SEQ_PARAM).and_then(|value| value.parse::<u64>().ok());
    let service = param("service")
        .filter(|service| !service.is_empty())
        .or_else(|| parsed.appname.and_then(service_for_app).map(str::to_owned));

    let host = match (parsed.hostname, &origin) {
        (Some(host), _) => host.to_owned(),
        (None, Origin::Agent { name }) => name.clone(),
        (None, _) => peer.ip().to_canonical().to_string(),
    };

    let line = if mirage.is_some() {
        msg.to_owned()
    } else {
        relayed_line(text, &parsed, &host, msg)
    };

    Ok(LogRecord {
        origin,
        peer,
        host,
        service,
        line,
        timestamp: parsed.timestamp.map(|ts| ts.timestamp()),
        seq,
    })
}

/// The year of an RFC 3164 timestamp (which has none): the latest that does not put it more
/// than a day in the future, so a December line read in January is last year's and a line
/// from a sender whose clock is a little ahead across New Year is next year's.
fn year_for((month, day, hour, minute, second): syslog_loose::IncompleteDate) -> i32 {
    let now = Utc::now();
    let limit = now.timestamp() + 86_400;
    [now.year() + 1, now.year(), now.year() - 1]
        .into_iter()
        .find(|&year| {
            NaiveDate::from_ymd_opt(year, month, day)
                .and_then(|date| date.and_hms_opt(hour, minute, second))
                .is_some_and(|at| at.and_utc().timestamp() <= limit)
        })
        .unwrap_or(now.year())
}

/// Where `part` (a slice of `text`) starts in `text`.
fn offset_in(text: &str, part: &str) -> Option<usize> {
    let offset = (part.as_ptr() as usize).checked_sub(text.as_ptr() as usize)?;
    (offset + part.len() <= text.len()).then_some(offset)
}

/// The MSG as it is in `text`: syslog_loose trims the input and the spaces before the MSG, but
/// an agent line's own leading and trailing spaces are part of it.
fn original_msg<'a>(text: &'a str, parsed: &Message<&'a str>) -> &'a str {
    let Some(mut start) = offset_in(text, parsed.msg) else {
        return strip_msg(parsed.msg);
    };
    let bytes = text.as_bytes();
    match parsed.protocol {
        // `SD SP MSG`: one space separates them, any more belong to the MSG.
        Protocol::RFC5424(_) => {
            let mut sep = start;
            while sep > 0 && bytes[sep - 1] == b' ' {
                sep -= 1;
            }
            if sep < start {
                start = sep + 1;
            }
        }
        // syslog_loose reads `[id k="v"]` at the start of an RFC 3164 MSG as structured data;
        // RFC 3164 has none, so it stays in the line.
        Protocol::RFC3164 => {
            if let Some(first) = parsed.structured_data.first()
                && let Some(id) = offset_in(text, first.id)
                && id > 0
                && bytes[id - 1] == b'['
            {
                start = start.min(id - 1);
            }
        }
    }
    strip_msg(&text[start..])
}

fn strip_msg(msg: &str) -> &str {
    let msg = msg.trim_end_matches(['\r', '\n']);
    msg.strip_prefix('\u{feff}').unwrap_or(msg)
}

/// `TIMESTAMP HOST APP[PID]: MSG`, as rsyslog's `RSYSLOG_FileFormat` writes it; missing pieces
/// are left out.
fn relayed_line(text: &str, parsed: &Message<&str>, host: &str, msg: &str) -> String {
    let mut line = String::with_capacity(msg.len() + 64);
    if let Some(ts) = parsed.timestamp {
        line.push_str(&header_timestamp(text, parsed, ts));
        line.push(' ');
    }
    line.push_str(host);
    line.push(' ');
    if let Some(app) = parsed.appname {
        line.push_str(app);
        if let Some(pid) = &parsed.procid {
            line.push('[');
            line.push_str(&pid.to_string());
            line.push(']');
        }
        line.push_str(": ");
    }
    line.push_str(msg);
    line
}

/// The header's timestamp as it was written, if that was RFC 3339 (keeping its `Z` or offset
/// and its fraction), else (RFC 3164) the parsed time in RFC 3339.
fn header_timestamp(text: &str, parsed: &Message<&str>, ts: DateTime<FixedOffset>) -> String {
    let after_pri = text
        .trim_start()
        .split_once('>')
        .map_or("", |(_, rest)| rest);
    let after_version = match parsed.protocol {
        Protocol::RFC5424(_) => after_pri.trim_start_matches(|c: char| c.is_ascii_digit()),
        Protocol::RFC3164 => after_pri,
    };
    let token = after_version
        .trim_start()
        .split(char::is_whitespace)
        .next()
        .unwrap_or("");
    if DateTime::parse_from_rfc3339(token).is_ok() {
        token.to_owned()
    } else {
        ts.to_rfc3339_opts(SecondsFormat::AutoSi, false)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use chrono::TimeZone as _;
    use proptest::prelude::*;

    use super::*;

    fn peer() -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 40000)
    }

    fn parse(raw: &str) -> Result<LogRecord, Malformed> {
        parse_message(raw.as_bytes(), Origin::Relay, peer())
    }

    #[test]
    fn rfc5424_without_structured_data() {
        let r = parse(
            "<38>1 2026-11-28T01:59:23.123456+00:00 web-1 sshd 123 - - Failed password for root from 203.0.113.9 port 4242 ssh2\n",
        )
        .unwrap();
        assert_eq!(r.host, "web-1");
        assert_eq!(r.service.as_deref(), Some("sshd"));
        assert_eq!(
            r.line,
            "2026-11-28T01:59:23.123456+00:00 web-1 sshd[123]: Failed password for root from 203.0.113.9 port 4242 ssh2"
        );
        assert_eq!(r.timestamp, Some(1_795_831_163));
        assert_eq!(r.origin, Origin::Relay);
        assert_eq!(r.peer, peer());
    }

    #[test]
    fn rfc5424_keeps_z_and_omits_missing_pieces() {
        let r = parse("<13>1 2026-11-28T01:59:23Z - mongod - - - a line").unwrap();
        assert_eq!(r.host, "192.0.2.7");
        assert_eq!(r.service.as_deref(), Some("mongodb"));
        assert_eq!(r.line, "2026-11-28T01:59:23Z 192.0.2.7 mongod: a line");
        let r = parse("<13>1 - host - - - - no time").unwrap();
        assert_eq!(r.timestamp, None);
        assert_eq!(r.service, None);
        assert_eq!(r.line, "host no time");
    }

    #[test]
    fn rfc5424_with_foreign_structured_data() {
        let r = parse(
            "<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut=\"3\" eventSource=\"Application\"] An application event",
        )
        .unwrap();
        assert_eq!(r.service, None);
        assert_eq!(
            r.line,
            "2003-10-11T22:14:15.003Z mymachine.example.com evntslog: An application event"
        );
        assert_eq!(r.timestamp, Some(1_065_910_455));
    }

    #[test]
    fn rfc3164_from_rsyslog() {
        let r = parse("<38>Nov 28 01:59:23 host sshd[123]: Failed password for invalid user x")
            .unwrap();
        assert_eq!(r.host, "host");
        assert_eq!(r.service.as_deref(), Some("sshd"));
        let ts = r.timestamp.unwrap();
        let dt = DateTime::<Utc>::from_timestamp(ts, 0).unwrap();
        assert_eq!(
            (dt.month(), dt.day(), dt.time().to_string()),
            (11, 28, "01:59:23".to_owned())
        );
        assert!(ts <= Utc::now().timestamp() + 2 * 86_400);
        assert_eq!(
            r.line,
            format!(
                "{}-11-28T01:59:23+00:00 host sshd[123]: Failed password for invalid user x",
                dt.year()
            )
        );
        // rsyslog's RFC 3339 forwarding format keeps its timestamp as written.
        let r = parse("<38>2026-11-28T02:59:23.5+01:00 host sshd[9]: x").unwrap();
        assert_eq!(r.line, "2026-11-28T02:59:23.5+01:00 host sshd[9]: x");
        assert_eq!(r.timestamp, Some(1_795_831_163));
        // No PID, tag names another service.
        let r = parse("<30>Nov 28 02:00:01 db mariadbd: Access denied").unwrap();
        assert_eq!(r.service.as_deref(), Some("mysql"));
        assert!(
            r.line.ends_with(" db mariadbd: Access denied"),
            "{}",
            r.line
        );
        // A bracketed start of the MSG stays in the line.
        let r =
            parse("<131>Jun 8 11:54:08 master httpd: [client 1.2.3.4] x=\"y\" AH01630").unwrap();
        assert!(
            r.line
                .ends_with("master httpd: [client 1.2.3.4] x=\"y\" AH01630"),
            "{}",
            r.line
        );
        let r = parse("<131>Jun 8 11:54:08 master httpd: [a b=\"c\"] d").unwrap();
        assert!(
            r.line.ends_with("master httpd: [a b=\"c\"] d"),
            "{}",
            r.line
        );
    }

    #[test]
    fn rfc3164_year_is_never_far_in_the_future() {
        let now = Utc::now();
        for (month, day) in [(1, 1), (6, 15), (12, 31), (now.month(), now.day())] {
            let year = year_for((month, day, 0, 0, 0));
            let at = Utc
                .from_utc_datetime(
                    &NaiveDate::from_ymd_opt(year, month, day)
                        .unwrap()
                        .and_hms_opt(0, 0, 0)
                        .unwrap(),
                )
                .timestamp();
            assert!(at <= now.timestamp() + 2 * 86_400, "{month}-{day}");
            assert!(at > now.timestamp() - 366 * 86_400, "{month}-{day}");
        }
    }

    #[test]
    fn mirage_element_gives_service_and_verbatim_line() {
        let raw = "<14>1 2026-11-28T01:59:21Z web-1 mirage-agent - - [mirage@32473 service=\"vsftpd\" path=\"/var/log/vsftpd.log\"]   Sat Nov 28 01:59:21 2026 [pid 3] [x] FAIL LOGIN: Client \"::ffff:203.0.113.9\"  \r\n";
        let r = parse_message(
            raw.as_bytes(),
            Origin::Agent {
                name: "web-1".to_owned(),
            },
            peer(),
        )
        .unwrap();
        assert_eq!(r.service.as_deref(), Some("vsftpd"));
        assert_eq!(
            r.line,
            "  Sat Nov 28 01:59:21 2026 [pid 3] [x] FAIL LOGIN: Client \"::ffff:203.0.113.9\"  "
        );
        assert_eq!(r.host, "web-1");
        assert_eq!(r.timestamp, Some(1_795_831_161));
        assert_eq!(r.seq, None);
        let r = parse(
            "<14>1 - h mirage-agent - - [mirage@32473 service=\"sshd\" seq=\"18446744073709551615\"] x",
        )
        .unwrap();
        assert_eq!(r.seq, Some(u64::MAX));
        // Only the agent's element carries it, and only as a number.
        let r = parse("<14>1 - h sshd - - [other@1 seq=\"7\"] x").unwrap();
        assert_eq!(r.seq, None);
        let r = parse("<14>1 - h sshd - - [mirage@32473 seq=\"-7\"] x").unwrap();
        assert_eq!(r.seq, None);
        // Without a `service` parameter the APP-NAME decides.
        let r = parse("<14>1 - h sshd - - [mirage@32473 path=\"/var/log/auth.log\"] x").unwrap();
        assert_eq!(r.service.as_deref(), Some("sshd"));
        assert_eq!(r.line, "x");
    }

    #[test]
    fn bom_and_invalid_utf8() {
        let mut raw =
            b"<13>1 2026-11-28T01:59:23Z h app - - - \xef\xbb\xbfhello \xff world".to_vec();
        let r = parse_message(&raw, Origin::Untrusted, peer()).unwrap();
        assert_eq!(r.line, "2026-11-28T01:59:23Z h app: hello \u{fffd} world");
        raw.truncate(raw.len() - 13);
        assert_eq!(
            parse_message(&raw, Origin::Untrusted, peer()),
            Err(Malformed::EmptyMessage)
        );
    }

    #[test]
    fn garbage_and_empty_messages_are_malformed() {
        for raw in [
            "",
            "hello world",
            "Nov 28 01:59:23 host sshd[1]: no pri",
            "2026-11-28T01:59:23Z host sshd: no pri",
            "<>1 - - - - - - x",
            "<999>1 - - - - - - x",
            "<13>not a header at all",
            "\u{0}\u{1}<13>",
        ] {
            assert_eq!(parse(raw), Err(Malformed::NotSyslog), "{raw:?}");
        }
        for raw in [
            "<13>1 2026-11-28T01:59:23Z h app - - -",
            "<13>1 2026-11-28T01:59:23Z h app - - -    \r\n",
            "<13>1 - h app - - [mirage@32473 service=\"sshd\"] ",
        ] {
            assert_eq!(parse(raw), Err(Malformed::EmptyMessage), "{raw:?}");
        }
        assert_eq!(Malformed::NotSyslog.as_str(), "not_syslog");
    }

    #[test]
    fn format_escapes_and_sanitises() {
        let s = format_rfc5424_with(
            "we\"ird]\\svc",
            "my host",
            "",
            "line",
            1_795_831_163,
            &[("path", "/var/log/a]b.log")],
        );
        assert_eq!(
            s,
            "<14>1 2026-11-28T01:59:23Z my_host - - - [mirage@32473 service=\"we\\\"ird\\]\\\\svc\" path=\"/var/log/a\\]b.log\"] line"
        );
        let r = parse(&s).unwrap();
        assert_eq!(r.service.as_deref(), Some("we\"ird]\\svc"));
        assert_eq!(r.line, "line");
        assert!(format_rfc5424("s", "h", "a", "l", i64::MAX).contains(" - h a "));
    }

    #[test]
    fn service_mapping() {
        for (app, svc) in [
            ("sshd-session", "sshd"),
            ("rsync", "rsync"),
            ("mariadb", "mysql"),
            ("redis-server", "redis"),
            ("apache2", "web"),
            ("NGINX", "web"),
        ] {
            assert_eq!(service_for_app(app), Some(svc));
        }
        assert_eq!(service_for_app("cron"), None);
    }

    proptest! {
        #[test]
        fn parse_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_message(&raw, Origin::Untrusted, peer());
        }

        #[test]
        fn parse_never_panics_on_syslog_like_text(raw in "<[0-9]{1,3}>(1 )?[-0-9TZ:.+ a-zA-Z\\[\\]=\"\\\\@]{0,120}") {
            let _ = parse_message(raw.as_bytes(), Origin::Untrusted, peer());
        }

        #[test]
        fn format_then_parse_round_trips(
            service in "[a-z]{1,10}|.{0,12}",
            host in "[a-zA-Z0-9.][a-zA-Z0-9.-]{0,19}",
            app in "[a-z][a-z-]{0,9}",
            // `\PC` has no controls (CR, LF) and no format characters (the BOM).
            line in "\\PC{0,40}[a-z0-9]\\PC{0,40}",
            ts in 0i64..253_402_300_799,
        ) {
            let raw = format_rfc5424(&service, &host, &app, &line, ts);
            let framed = crate::syslog::framing::frame_octet_counted(&raw);
            let mut decoder = crate::syslog::framing::Decoder::new(4096);
            let mut input = &framed[..];
            let Some(crate::syslog::framing::Event::Frame(frame)) = decoder.next_event(&mut input) else {
                panic!("no frame");
            };
            let r = parse_message(&frame, Origin::Relay, peer()).unwrap();
            let want_service = if service.is_empty() {
                service_for_app(&app).map(str::to_owned)
            } else {
                Some(service.clone())
            };
            prop_assert_eq!(r.service, want_service);
            prop_assert_eq!(r.line, line);
            prop_assert_eq!(r.timestamp, Some(ts));
            prop_assert_eq!(r.host, host);
        }
    }
}
