//! The wire form of Mirage's log shipping: how `mirage-agent` encodes a collected log line as an
//! RFC 5424 message, and how it frames messages on a TLS (RFC 5425) or TCP (RFC 6587) stream.
//!
//! It sits between the agent's collectors and the server's listeners: the agent encodes with
//! [`format_rfc5424_with`] and [`frame_octet_counted`]; `mirage-server` decodes the frames and
//! parses the messages (its `syslog` module re-exports these, so both ends share one
//! definition). Transport, parsing and the acknowledgement protocol stay out of this crate.
//!
//! ```
//! let msg = syslog_wire::format_rfc5424_with(
//!     "sshd",
//!     "web-1",
//!     "mirage-agent",
//!     "Failed password for root from 203.0.113.9 port 4242 ssh2",
//!     1_795_831_163,
//!     &[("path", "/var/log/auth.log"), ("seq", "42")],
//! );
//! assert_eq!(
//!     msg,
//!     "<14>1 2026-11-28T01:59:23Z web-1 mirage-agent - - [mirage@32473 service=\"sshd\" \
//!      path=\"/var/log/auth.log\" seq=\"42\"] Failed password for root from 203.0.113.9 port 4242 ssh2"
//! );
//! assert!(syslog_wire::frame_octet_counted(&msg).starts_with(b"170 <14>1 "));
//! ```

use std::borrow::Cow;

use chrono::{DateTime, Datelike as _, SecondsFormat, Utc};

/// The SD-ID of the structured-data element the agent adds (32473 is the private enterprise
/// number RFC 5612 reserves for documentation, as RFC 5424's own examples use).
pub const MIRAGE_SD_ID: &str = "mirage@32473";

/// The `mirage@32473` parameter carrying the agent's per-agent sequence number: the server
/// drops a message whose number it has already handed to detection and acknowledges numbers
/// back on the connection (`ack N` lines; see the server's configuration reference).
pub const SEQ_PARAM: &str = "seq";

/// PRI of agent-shipped messages: facility user (1), severity informational (6). Detection does
/// not look at it; rsyslog relays file it somewhere sensible.
pub const AGENT_PRI: u8 = 14;

/// Encodes a log line as the agent sends it: RFC 5424 with the `mirage@32473` element.
///
/// `host` and `app` are reduced to what the header allows (printable US-ASCII, at most 255 and
/// 48 characters, `-` when empty); `unix_ts` out of RFC 3339's years 0 to 9999 is sent as the
/// NILVALUE. `line` should be one line: it is the MSG as is, so a trailing CR or LF and a
/// leading BOM would not survive the trip.
pub fn format_rfc5424(service: &str, host: &str, app: &str, line: &str, unix_ts: i64) -> String {
    format_rfc5424_with(service, host, app, line, unix_ts, &[])
}

/// [`format_rfc5424`] with more parameters in the `mirage@32473` element, e.g.
/// `[("path", "/var/log/vsftpd.log")]`. Names must be SD-NAMEs (printable US-ASCII without
/// `=`, space, `]` or `"`, at most 32 characters); values are escaped as RFC 5424 §6.3.3 says.
pub fn format_rfc5424_with(
    service: &str,
    host: &str,
    app: &str,
    line: &str,
    unix_ts: i64,
    extra: &[(&str, &str)],
) -> String {
    let timestamp = DateTime::<Utc>::from_timestamp(unix_ts, 0)
        .filter(|ts| (0..=9999).contains(&ts.year()))
        .map_or_else(
            || "-".to_owned(),
            |ts| ts.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        );
    let mut out = String::with_capacity(line.len() + 96);
    out.push('<');
    out.push_str(&AGENT_PRI.to_string());
    out.push_str(">1 ");
    out.push_str(&timestamp);
    out.push(' ');
    out.push_str(&header_field(host, 255));
    out.push(' ');
    out.push_str(&header_field(app, 48));
    out.push_str(" - - [");
    out.push_str(MIRAGE_SD_ID);
    out.push_str(" service=\"");
    escape_param(&mut out, service);
    out.push('"');
    for (name, value) in extra {
        out.push(' ');
        out.push_str(name);
        out.push_str("=\"");
        escape_param(&mut out, value);
        out.push('"');
    }
    out.push_str("] ");
    out.push_str(line);
    out
}

/// RFC 5424 §6.3.3: `"`, `\` and `]` in a PARAM-VALUE are escaped with a backslash.
pub fn escape_param(out: &mut String, value: &str) {
    for c in value.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// A header field (HOSTNAME, APP-NAME): `1*N PRINTUSASCII`, or the NILVALUE.
fn header_field(value: &str, max: usize) -> Cow<'_, str> {
    let printable = |c: char| c.is_ascii_graphic();
    if value.is_empty() {
        Cow::Borrowed("-")
    } else if value.len() <= max && value.chars().all(printable) {
        Cow::Borrowed(value)
    } else {
        Cow::Owned(
            value
                .chars()
                .map(|c| if printable(c) { c } else { '_' })
                .take(max)
                .collect(),
        )
    }
}

/// Encodes one message with octet counting (RFC 6587 §3.4.1, RFC 5425 §4.3): `LEN SP MSG`.
/// `msg` should not be empty: a count of 0 is not valid framing.
pub fn frame_octet_counted(msg: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + 8);
    out.extend_from_slice(msg.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(msg.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_values_and_sanitises_header_fields() {
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
        assert!(format_rfc5424("s", "h", "a", "l", i64::MAX).contains(" - h a "));
        assert_eq!(
            header_field(&"x".repeat(300), 255).len(),
            255,
            "long fields are cut"
        );
    }

    #[test]
    fn encodes_octet_counted() {
        assert_eq!(frame_octet_counted("héllo"), b"6 h\xc3\xa9llo");
    }
}
