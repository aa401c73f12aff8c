//! Alerts: detections become e-mail (SMTP, through lettre) and webhook messages (generic JSON
//! or Slack-compatible, through reqwest), per channel, without flooding anyone.
//!
//! - [`channel`]: each channel kind's configuration, its validation, and the redaction of its
//!   secrets for the API.
//! - [`message`]: what a message says (one alert, a digest, a test), rendered as a subject and text
//!   and as the webhook's JSON. Pure.
//! - [`send`]: the transports.
//! - [`dispatch`]: the dispatcher. One pass ([`dispatch::run_once`]) reads the detections past a
//!   cursor kept in `settings`, and for every enabled channel drops those below its minimum
//!   severity, folds repeats of one (rule, address) within its de-duplication window into the
//!   earlier alert, queues at most `max_per_hour` messages per rolling hour, and folds anything
//!   beyond that into one digest; then it sends what is due, each channel on its own task, retrying
//!   failures with backoff. [`dispatch::run`] repeats passes on one replica at a time, woken by
//!   `NOTIFY mirage_detection` and by a poll.
//!
//! Every detection a channel accepts is counted in exactly one `alert_deliveries` row (a message,
//! a digest, or a suppressed repeat), so nothing is lost from the counts, and a wave of any size
//! costs a channel at most `max_per_hour` messages an hour.

pub mod channel;
pub mod dispatch;
pub mod message;
pub mod send;

/// Severities, lowest first, as detections and channels name them.
pub const SEVERITIES: [&str; 5] = ["info", "low", "medium", "high", "critical"];

/// The rank of a severity (`info` = 0 ... `critical` = 4); unknown names rank lowest.
pub fn severity_rank(severity: &str) -> usize {
    SEVERITIES
        .iter()
        .position(|s| *s == severity)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_severities() {
        assert!(severity_rank("critical") > severity_rank("high"));
        assert!(severity_rank("low") > severity_rank("info"));
        assert_eq!(severity_rank("bogus"), 0);
    }
}
