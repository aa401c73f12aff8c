//! What alert messages say. An [`Alert`] covers one (rule, address) — the detections of it that
//! arrived together; a [`Digest`] folds everything beyond a channel's hourly budget into counts.
//! Both are stored as the delivery row's `payload` and rendered when sent ([`render`]): a subject
//! and a text for e-mail and Slack, and a JSON document for the generic webhook.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::severity_rank;

/// Evidence lines an alert carries.
const MAX_EVIDENCE: usize = 5;
/// Longest evidence line kept, in bytes.
const MAX_EVIDENCE_LINE: usize = 500;
/// Distinct addresses a digest counts one by one; beyond that they are counted together.
const MAX_DIGEST_ADDRESSES: usize = 1000;
/// Addresses a digest message lists.
pub const TOP_ADDRESSES: usize = 10;

/// A detection, as much of it as alerts use.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// Row id.
    pub id: i64,
    /// The attacker's address.
    pub addr: IpAddr,
    /// The rule that fired.
    pub rule: String,
    /// The attacked service.
    pub service: String,
    /// `info` ... `critical`.
    pub severity: String,
    /// When it happened.
    pub at: OffsetDateTime,
    /// The reporting server.
    pub server: String,
    /// The attacker entry it was counted against.
    pub attacker_id: Option<i64>,
    /// The first evidence lines.
    pub evidence: Vec<String>,
}

/// One alert: a (rule, address) and the detections of it in one pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// The rule.
    pub rule: String,
    /// The service.
    pub service: String,
    /// The highest severity among the detections.
    pub severity: String,
    /// The attacker's address.
    pub address: IpAddr,
    /// How many detections.
    pub count: i64,
    /// The first detection's id.
    pub first_detection: i64,
    /// The last detection's id.
    pub last_detection: i64,
    /// When the first happened.
    #[serde(with = "time::serde::rfc3339")]
    pub first_at: OffsetDateTime,
    /// When the last happened.
    #[serde(with = "time::serde::rfc3339")]
    pub last_at: OffsetDateTime,
    /// The server that reported the first.
    pub server: String,
    /// The attacker entry.
    pub attacker_id: Option<i64>,
    /// The first evidence lines.
    pub evidence: Vec<String>,
}

impl Alert {
    /// An alert for `detections` (one rule and address, in id order; not empty).
    pub fn new(detections: &[&Detection]) -> Option<Self> {
        let first = detections.first()?;
        let last = detections.last()?;
        let severity = detections
            .iter()
            .map(|d| d.severity.as_str())
            .max_by_key(|s| severity_rank(s))
            .unwrap_or(first.severity.as_str());
        Some(Self {
            rule: first.rule.clone(),
            service: first.service.clone(),
            severity: severity.to_owned(),
            address: first.addr,
            count: detections.len() as i64,
            first_detection: first.id,
            last_detection: last.id,
            first_at: detections.iter().map(|d| d.at).min().unwrap_or(first.at),
            last_at: detections.iter().map(|d| d.at).max().unwrap_or(last.at),
            server: first.server.clone(),
            attacker_id: detections.iter().find_map(|d| d.attacker_id),
            evidence: first
                .evidence
                .iter()
                .take(MAX_EVIDENCE)
                .map(|line| truncate(line, MAX_EVIDENCE_LINE))
                .collect(),
        })
    }
}

/// Counts of the detections folded into a digest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Digest {
    /// Detections folded in.
    pub total: i64,
    /// The lowest detection id.
    pub first_detection: Option<i64>,
    /// The highest detection id.
    pub last_detection: Option<i64>,
    /// The earliest detection time.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub first_at: Option<OffsetDateTime>,
    /// The latest detection time.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub last_at: Option<OffsetDateTime>,
    /// Detections per rule.
    pub by_rule: BTreeMap<String, i64>,
    /// Detections per service.
    pub by_service: BTreeMap<String, i64>,
    /// Detections per severity.
    pub by_severity: BTreeMap<String, i64>,
    /// Detections per address, for the first [`MAX_DIGEST_ADDRESSES`] distinct addresses.
    pub addresses: BTreeMap<String, i64>,
    /// Detections from addresses beyond those.
    pub other_addresses: i64,
}

impl Digest {
    /// Folds one detection in.
    pub fn add(&mut self, d: &Detection) {
        self.total += 1;
        self.first_detection = Some(self.first_detection.map_or(d.id, |f| f.min(d.id)));
        self.last_detection = Some(self.last_detection.map_or(d.id, |l| l.max(d.id)));
        self.first_at = Some(self.first_at.map_or(d.at, |f| f.min(d.at)));
        self.last_at = Some(self.last_at.map_or(d.at, |l| l.max(d.at)));
        *self.by_rule.entry(d.rule.clone()).or_default() += 1;
        *self.by_service.entry(d.service.clone()).or_default() += 1;
        *self.by_severity.entry(d.severity.clone()).or_default() += 1;
        let addr = d.addr.to_string();
        if let Some(n) = self.addresses.get_mut(&addr) {
            *n += 1;
        } else if self.addresses.len() < MAX_DIGEST_ADDRESSES {
            self.addresses.insert(addr, 1);
        } else {
            self.other_addresses += 1;
        }
    }

    /// The `n` addresses with the most detections, most first.
    pub fn top_addresses(&self, n: usize) -> Vec<(&str, i64)> {
        let mut all: Vec<(&str, i64)> = self
            .addresses
            .iter()
            .map(|(a, c)| (a.as_str(), *c))
            .collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        all.truncate(n);
        all
    }

    /// The highest severity folded in.
    pub fn severity(&self) -> &str {
        self.by_severity
            .keys()
            .max_by_key(|s| severity_rank(s))
            .map_or("info", String::as_str)
    }
}

/// A rendered message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// E-mail subject (and the first line elsewhere).
    pub subject: String,
    /// Plain text body.
    pub text: String,
    /// The generic webhook's JSON body.
    pub json: Value,
}

impl Message {
    /// The Slack-compatible body: `{"text": ...}` (mrkdwn, the subject in bold).
    pub fn slack(&self) -> Value {
        json!({ "text": format!("*{}*\n{}", self.subject, self.text) })
    }
}

/// What a message is rendered for.
#[derive(Debug, Clone, Copy)]
pub struct ChannelInfo<'a> {
    /// The channel's name.
    pub name: &'a str,
    /// Its hourly budget (digests explain it).
    pub max_per_hour: i32,
}

fn time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn truncate(line: &str, max: usize) -> String {
    if line.len() <= max {
        return line.to_owned();
    }
    let mut end = max;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

fn counts(map: &BTreeMap<String, i64>) -> String {
    let mut all: Vec<(&String, &i64)> = map.iter().collect();
    all.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    all.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Renders a delivery of `kind` (`alert`, `digest`, `test`) from its stored payload.
pub fn render(
    kind: &str,
    payload: &Value,
    channel: ChannelInfo<'_>,
) -> Result<Message, serde_json::Error> {
    match kind {
        "alert" => {
            let alert: Alert = serde_json::from_value(payload.clone())?;
            Ok(render_alert(&alert, channel))
        }
        "digest" => {
            let digest: Digest = serde_json::from_value(payload.clone())?;
            Ok(render_digest(&digest, channel))
        }
        _ => Ok(render_test(channel)),
    }
}

fn render_alert(a: &Alert, channel: ChannelInfo<'_>) -> Message {
    let subject = format!(
        "[Mirage] {}: {} from {} ({})",
        a.severity.to_uppercase(),
        a.rule,
        a.address,
        a.service
    );
    let mut text = String::new();
    let _ = writeln!(
        text,
        "Rule {} fired for {} on {}, severity {}.",
        a.rule, a.address, a.service, a.severity
    );
    if a.count == 1 {
        let _ = writeln!(text, "At {} (reported by {}).", time(a.first_at), a.server);
    } else {
        let _ = writeln!(
            text,
            "{} detections between {} and {} (first reported by {}).",
            a.count,
            time(a.first_at),
            time(a.last_at),
            a.server
        );
    }
    if let Some(id) = a.attacker_id {
        let _ = writeln!(text, "Attacker entry #{id}.");
    }
    if !a.evidence.is_empty() {
        let _ = writeln!(text, "Evidence:");
        for line in &a.evidence {
            let _ = writeln!(text, "  {line}");
        }
    }
    let _ = write!(
        text,
        "Detection ids {}-{}.",
        a.first_detection, a.last_detection
    );
    let json = json!({
        "kind": "alert", "channel": channel.name, "subject": subject, "text": text, "alert": a,
    });
    Message {
        subject,
        text,
        json,
    }
}

fn render_digest(d: &Digest, channel: ChannelInfo<'_>) -> Message {
    let distinct = d.addresses.len() as i64;
    let addresses = if d.other_addresses > 0 {
        format!("more than {distinct} addresses")
    } else {
        format!("{distinct} address(es)")
    };
    let subject = format!(
        "[Mirage] digest: {} detections from {addresses} (highest severity {})",
        d.total,
        d.severity()
    );
    let mut text = String::new();
    let _ = writeln!(
        text,
        "{} detections arrived beyond this channel's limit of {} messages per hour; here they \
         are in one message.",
        d.total, channel.max_per_hour
    );
    if let (Some(first), Some(last)) = (d.first_at, d.last_at) {
        let _ = writeln!(text, "Between {} and {}.", time(first), time(last));
    }
    let _ = writeln!(text, "By severity: {}.", counts(&d.by_severity));
    let _ = writeln!(text, "By rule: {}.", counts(&d.by_rule));
    let _ = writeln!(text, "By service: {}.", counts(&d.by_service));
    let top = d.top_addresses(TOP_ADDRESSES);
    let _ = writeln!(
        text,
        "Top addresses: {}.",
        top.iter()
            .map(|(a, n)| format!("{a} ({n})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let (Some(first), Some(last)) = (d.first_detection, d.last_detection) {
        let _ = write!(text, "Detection ids {first}-{last}.");
    }
    let json = json!({
        "kind": "digest", "channel": channel.name, "subject": subject, "text": text,
        "digest": {
            "total": d.total,
            "first_detection": d.first_detection, "last_detection": d.last_detection,
            "first_at": d.first_at.map(time), "last_at": d.last_at.map(time),
            "by_rule": d.by_rule, "by_service": d.by_service, "by_severity": d.by_severity,
            "top_addresses": top.iter().map(|(a, n)| json!({ "address": a, "count": n }))
                .collect::<Vec<_>>(),
            "distinct_addresses": distinct, "other_addresses": d.other_addresses,
            "max_per_hour": channel.max_per_hour,
        },
    });
    Message {
        subject,
        text,
        json,
    }
}

fn render_test(channel: ChannelInfo<'_>) -> Message {
    let subject = format!("[Mirage] test message for channel {}", channel.name);
    let text = format!(
        "This is a test message from mirage-manager for the alert channel `{}`. If you can read \
         it, the channel works.",
        channel.name
    );
    let json = json!({ "kind": "test", "channel": channel.name, "subject": subject, "text": text });
    Message {
        subject,
        text,
        json,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detection(id: i64, addr: &str, rule: &str, severity: &str) -> Detection {
        Detection {
            id,
            addr: addr.parse().unwrap(),
            rule: rule.to_owned(),
            service: "ssh".to_owned(),
            severity: severity.to_owned(),
            at: OffsetDateTime::from_unix_timestamp(1_700_000_000 + id).unwrap(),
            server: "srv-1".to_owned(),
            attacker_id: None,
            evidence: vec!["x".repeat(600), "b".to_owned()],
        }
    }

    #[test]
    fn an_alert_covers_its_detections() {
        let (a, b) = (
            detection(7, "198.51.100.7", "ssh-brute", "medium"),
            detection(9, "198.51.100.7", "ssh-brute", "high"),
        );
        let alert = Alert::new(&[&a, &b]).unwrap();
        assert_eq!(
            (alert.count, alert.first_detection, alert.last_detection),
            (2, 7, 9)
        );
        assert_eq!(alert.severity, "high");
        assert!(alert.evidence[0].len() < 510);
        let channel = ChannelInfo {
            name: "ops",
            max_per_hour: 5,
        };
        let m = render("alert", &serde_json::to_value(&alert).unwrap(), channel).unwrap();
        assert_eq!(
            m.subject,
            "[Mirage] HIGH: ssh-brute from 198.51.100.7 (ssh)"
        );
        assert!(m.text.contains("2 detections"), "{}", m.text);
        assert_eq!(m.json["alert"]["count"], 2);
        assert_eq!(m.slack().as_object().unwrap().len(), 1);
    }

    #[test]
    fn a_digest_counts_everything() {
        let mut digest = Digest::default();
        for i in 0..1500 {
            let severity = if i % 3 == 0 { "critical" } else { "low" };
            let addr = format!("10.0.{}.{}", i / 250, i % 250);
            digest.add(&detection(i, &addr, &format!("r{}", i % 4), severity));
        }
        digest.add(&detection(2000, "10.0.0.0", "r0", "low"));
        assert_eq!(digest.total, 1501);
        assert_eq!(digest.by_rule.values().sum::<i64>(), 1501);
        assert_eq!(digest.by_severity.values().sum::<i64>(), 1501);
        assert_eq!(
            digest.addresses.values().sum::<i64>() + digest.other_addresses,
            1501
        );
        assert_eq!(digest.top_addresses(1), [("10.0.0.0", 2)]);
        assert_eq!(digest.severity(), "critical");
        let stored = serde_json::to_value(&digest).unwrap();
        let channel = ChannelInfo {
            name: "ops",
            max_per_hour: 5,
        };
        let m = render("digest", &stored, channel).unwrap();
        assert!(m.subject.contains("1501 detections"), "{}", m.subject);
        assert_eq!(m.json["digest"]["total"], 1501);
        assert_eq!(
            m.json["digest"]["top_addresses"].as_array().unwrap().len(),
            TOP_ADDRESSES
        );
        assert!(m.text.contains("limit of 5 messages per hour"));
    }
}
