//! Timestamps of the log formats the rule packs cover, as Unix seconds.
//!
//! Every daemon writes its own format, so the recogniser tries each known prefix in turn. Lines
//! without a timestamp (`sshd -E` files, MySQL general-log continuation lines, `ACL LOG` dumps)
//! get `None`; the scanner then carries the file's last timestamp forward (see `scan`).
//! Formats without an offset are taken as UTC (the daemons' local time; the corpus host is UTC).

use regex::{Captures, Regex};

/// The compiled timestamp recognisers.
#[derive(Debug)]
pub struct Timestamps {
    formats: Vec<Regex>,
    /// Year for RFC 3164 lines, which carry none (`Nov 28 01:59:16 host prog[pid]: ...`).
    year: i64,
}

const MONTHS: &str = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec";

impl Timestamps {
    /// Compiles the recognisers.
    ///
    /// # Errors
    ///
    /// Only if a built-in pattern does not compile, which the unit tests rule out.
    pub fn new() -> Result<Self, regex::Error> {
        Self::with_year(current_year())
    }

    /// Like `new`, with the year assumed for RFC 3164 lines (which carry none) given.
    ///
    /// # Errors
    ///
    /// As `new`.
    pub fn with_year(year: i64) -> Result<Self, regex::Error> {
        let rfc3339 = r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})T(?P<h>\d{2}):(?P<mi>\d{2}):(?P<s>\d{2})(?:\.\d{1,9})?(?P<off>Z|[+-]\d{2}:?\d{2})";
        let patterns = [
            // rsyslog RFC 3339 file template, and RFC 5424 without the PRI.
            format!(r"^{rfc3339}\s"),
            // MongoDB structured log: {"t":{"$date":"2026-11-28T01:59:16.860+00:00"}, ...
            format!(r#"^\{{"t":\{{"\$date":"{rfc3339}""#),
            // MariaDB error log: `2026-11-28  2:00:20 4 [Warning] ...`
            r"^(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2}) +(?P<h>\d{1,2}):(?P<mi>\d{2}):(?P<s>\d{2})\s".to_owned(),
            // rsyncd: `2026/11/28 01:59:23 [22342] ...`
            r"^(?P<y>\d{4})/(?P<mo>\d{2})/(?P<d>\d{2}) (?P<h>\d{2}):(?P<mi>\d{2}):(?P<s>\d{2})\s".to_owned(),
            // vsftpd native log and xferlog: `Sat Nov 28 01:59:21 2026 ...`
            format!(r"^(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) (?P<mon>{MONTHS}) +(?P<d>\d{{1,2}}) (?P<h>\d{{2}}):(?P<mi>\d{{2}}):(?P<s>\d{{2}}) (?P<y>\d{{4}})\s"),
            // Redis log: `21593:M 28 Nov 2026 01:57:52.901 ...`
            format!(r"^\d+:[A-Z] (?P<d>\d{{1,2}}) (?P<mon>{MONTHS}) (?P<y>\d{{4}}) (?P<h>\d{{2}}):(?P<mi>\d{{2}}):(?P<s>\d{{2}})(?:\.\d+)?\s"),
            // Redis MONITOR: `1795831163.631456 [0 10.77.0.20:44474] ...`
            r"^(?P<epoch>\d{9,11})\.\d+ \[".to_owned(),
            // MariaDB general log: `261128  2:00:20	     4 Connect ...`
            r"^(?P<yy>\d{2})(?P<mo>\d{2})(?P<d>\d{2}) +(?P<h>\d{1,2}):(?P<mi>\d{2}):(?P<s>\d{2})\s".to_owned(),
            // RFC 3164 / traditional rsyslog file format: `Nov 28 01:59:16 host prog[pid]: `.
            // No year: `with_year`'s (the current one by default).
            format!(r"^(?P<mon>{MONTHS}) +(?P<d>\d{{1,2}}) (?P<h>\d{{2}}):(?P<mi>\d{{2}}):(?P<s>\d{{2}}) \S+ "),
            // nginx/Apache combined: `10.77.0.67 - - [28/Nov/2026:02:02:39 +0000] ...`
            format!(r"^\S+ \S+ \S+ \[(?P<d>\d{{2}})/(?P<mon>{MONTHS})/(?P<y>\d{{4}}):(?P<h>\d{{2}}):(?P<mi>\d{{2}}):(?P<s>\d{{2}}) (?P<off>[+-]\d{{4}})\]"),
        ];
        let formats = patterns
            .iter()
            .map(|p| Regex::new(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { formats, year })
    }

    /// The line's timestamp in Unix seconds, or `None` if no known format matches or the
    /// fields are out of range.
    pub fn extract(&self, line: &str) -> Option<i64> {
        self.formats
            .iter()
            .find_map(|re| re.captures(line))
            .and_then(|c| from_captures(&c, self.year))
    }
}

fn num(c: &Captures<'_>, name: &str) -> Option<i64> {
    c.name(name).and_then(|m| m.as_str().parse().ok())
}

fn from_captures(c: &Captures<'_>, default_year: i64) -> Option<i64> {
    if let Some(epoch) = num(c, "epoch") {
        return Some(epoch);
    }
    let year = match num(c, "y") {
        Some(y) => y,
        None => match num(c, "yy") {
            Some(yy) => 2000 + yy,
            None => default_year,
        },
    };
    let month = match num(c, "mo") {
        Some(m) => m,
        None => {
            let name = c.name("mon")?.as_str();
            let idx = MONTHS.split('|').position(|m| m == name)?;
            i64::try_from(idx).ok()? + 1
        }
    };
    let (day, hour, min, sec) = (num(c, "d")?, num(c, "h")?, num(c, "mi")?, num(c, "s")?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let offset = match c.name("off").map(|m| m.as_str()) {
        None | Some("Z") => 0,
        Some(off) => {
            let sign = if off.starts_with('-') { -1 } else { 1 };
            let digits: String = off.chars().filter(char::is_ascii_digit).collect();
            let hh: i64 = digits.get(..2)?.parse().ok()?;
            let mm: i64 = digits.get(2..)?.parse().ok()?;
            sign * (hh * 3600 + mm * 60)
        }
    };
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec - offset)
}

/// The current UTC year from the system clock (1970 if the clock is before the epoch).
fn current_year() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    format_rfc3339(secs)
        .get(..4)
        .and_then(|y| y.parse().ok())
        .unwrap_or(1970)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`,
/// <https://howardhinnant.github.io/date_algorithms.html#days_from_civil>).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Formats Unix seconds as RFC 3339 UTC (`2026-11-28T01:59:16Z`), the inverse of
/// `days_from_civil` (Hinnant's `civil_from_days`).
pub fn format_rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_corpus_format_gives_the_same_instant() {
        let ts = Timestamps::with_year(2026).unwrap();
        let want = "2026-11-28T01:59:23Z";
        for line in [
            "2026-11-28T01:59:23.860166+00:00 vm sshd[22124]: Failed password",
            "2026-11-28T02:59:23+01:00 vm sshd[22124]: x",
            "2026-11-28  1:59:23 4 [Warning] Access denied",
            "2026/11/28 01:59:23 [22342] module-list request from UNKNOWN (10.77.0.20)",
            "Sat Nov 28 01:59:23 2026 [pid 22246] [alice] FAIL LOGIN: Client \"::ffff:10.77.0.20\"",
            "Sat Nov 28 01:59:23 2026 1 ::ffff:10.77.0.20 17 /home/alice/report.txt b _ i r alice ftp 0 * c",
            "21593:M 28 Nov 2026 01:59:23.632 - Accepted 127.0.0.1:39562",
            "1795831163.631456 [0 10.77.0.20:44474] \"AUTH\" \"(redacted)\"",
            "261128  1:59:23\t     4 Connect\tapp@10.77.0.20 on shop using TCP/IP",
            "10.77.0.67 - - [28/Nov/2026:01:59:23 +0000] \"GET / HTTP/1.1\" 200 1 \"-\" \"-\"",
            "{\"t\":{\"$date\":\"2026-11-28T01:59:23.860+00:00\"},\"s\":\"I\"}",
            "Nov 28 01:59:23 vm sshd[22124]: Failed password for alice from 10.77.0.20 port 1 ssh2",
        ] {
            let got = ts.extract(line).map(format_rfc3339);
            assert_eq!(got.as_deref(), Some(want), "{line}");
        }
    }

    #[test]
    fn rfc3164_year_defaults_to_the_current_one() {
        let now = Timestamps::new().unwrap();
        let got = now
            .extract("Jan  2 03:04:05 vm sshd[1]: x")
            .map(format_rfc3339);
        assert_eq!(
            got.map(|t| t.get(..4).unwrap() == format!("{}", current_year())),
            Some(true)
        );
    }

    #[test]
    fn lines_without_timestamps() {
        let ts = Timestamps::new().unwrap();
        for line in [
            "Failed password for root from 10.77.0.67 port 47784 ssh2",
            "\t\t     4 Connect\tAccess denied for user 'app'@'10.77.0.20' (using password: YES)",
            "2026-13-28T01:59:23Z vm x",
            "",
        ] {
            assert_eq!(ts.extract(line), None, "{line}");
        }
    }
}
