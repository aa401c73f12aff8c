//! Offline replay: runs a `RuleSet` over log lines and keeps per-source sliding windows.
//!
//! Windows: every match is stamped with the line's own timestamp, or, when the line has none,
//! with the last timestamp seen earlier in the same file. A source is flagged by a rule once
//! `threshold` of its matches fall within `window` seconds. Matches with no timestamp at all (a
//! whole `sshd -E` file, which has none) never expire: only line order is known, so the whole
//! file is one window and the threshold alone decides. Counting is across all files of one scan.
//!
//! Sessions: a line that names only a pid, thread or connection id (rsyncd's `[pid] ERROR: module
//! is read only`, a MariaDB general-log `Query`, a MongoDB `connN` line) gets the address that an
//! earlier line of the same file and service bound to that id (a rule match that captured both
//! `addr` and `session`). Unbound ids are counted as unresolved and do not count.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
};

use ipnet::IpNet;
use serde::Serialize;

use crate::{
    detect::{display_key, source_key},
    rules::{Action, Extracted, RuleSet, Severity},
    timestamp::{Timestamps, format_rfc3339},
};

/// Lines longer than this are skipped (and counted): no daemon in the packs writes them, and
/// bounding the line bounds the regex work per line.
pub const MAX_LINE: usize = 16 * 1024;

/// One matching line (`scan --matches`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LineMatch {
    /// The file as given.
    pub file: String,
    /// Line number from 1.
    pub line: u64,
    /// The rule's service.
    pub service: String,
    /// The rule id.
    pub rule: String,
    /// The extracted, normalised address.
    pub addr: IpAddr,
    /// The line's timestamp (RFC 3339 UTC), or `None` if the line has none.
    pub timestamp: Option<String>,
}

/// One flagged source of one rule (the default `scan` output).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Flagged {
    /// The source: an address, or an IPv6 prefix when the rule aggregates.
    pub addr: String,
    /// The rule's service.
    pub service: String,
    /// The rule id.
    pub rule: String,
    /// The rule's severity.
    pub severity: Severity,
    /// The rule's suggested action.
    pub action: Action,
    /// All matches of this source for this rule in the scan.
    pub count: u64,
    /// Earliest timestamp among the matches (RFC 3339 UTC), if any had one.
    pub first: Option<String>,
    /// Latest timestamp among the matches, if any had one.
    pub last: Option<String>,
}

/// Counters of one scan.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    /// Lines read.
    pub lines: u64,
    /// Lines with at least one counted match.
    pub matched: u64,
    /// Matches whose `addr` did not parse as an address (not counted).
    pub unparseable: u64,
    /// Lines longer than `MAX_LINE` (skipped).
    pub oversized: u64,
    /// Matches naming a session no earlier line of the file bound to an address (not counted).
    pub unresolved: u64,
}

#[derive(Debug, Default)]
struct SourceState {
    recent: VecDeque<Option<i64>>,
    count: u64,
    first: Option<i64>,
    last: Option<i64>,
    flagged: bool,
}

/// A scan in progress: feed files line by line, then read the flagged sources.
#[derive(Debug)]
pub struct Scanner<'a> {
    rules: &'a RuleSet,
    timestamps: Timestamps,
    state: HashMap<(usize, IpNet), SourceState>,
    /// Per rule, the index of the rule it `requires`, resolved once.
    requires: Vec<Option<usize>>,
    stats: Stats,
}

impl<'a> Scanner<'a> {
    /// A scanner over `rules`.
    ///
    /// # Errors
    ///
    /// Only if the built-in timestamp patterns fail to compile.
    pub fn new(rules: &'a RuleSet) -> Result<Self, regex::Error> {
        Ok(Self::with_timestamps(rules, Timestamps::new()?))
    }

    /// A scanner with its own timestamp recogniser (e.g. a fixed year for RFC 3164 lines).
    pub fn with_timestamps(rules: &'a RuleSet, timestamps: Timestamps) -> Self {
        let ids: HashMap<&str, usize> = rules
            .rules()
            .iter()
            .enumerate()
            .map(|(i, r)| (r.config.id.as_str(), i))
            .collect();
        let requires = rules
            .rules()
            .iter()
            .map(|r| {
                r.config
                    .requires
                    .as_deref()
                    .map(|id| ids.get(id).copied().unwrap_or(usize::MAX))
            })
            .collect();
        Self {
            rules,
            timestamps,
            state: HashMap::new(),
            requires,
            stats: Stats::default(),
        }
    }

    /// Feeds one file's contents; `file` names it in `LineMatch`. Invalid UTF-8 is replaced,
    /// CR before LF (`sshd -E`) is dropped. Returns the matching lines.
    pub fn feed(&mut self, file: &str, contents: &[u8]) -> Vec<LineMatch> {
        let mut out = Vec::new();
        let mut last_ts: Option<i64> = None;
        // Session (pid, thread or connection id) to address, per service, for this file only:
        // ids are reused across daemons and restarts, so the latest binding wins.
        let mut sessions: HashMap<(String, String), IpAddr> = HashMap::new();
        if contents.is_empty() {
            return out;
        }
        // A final newline ends the last line; it does not start an empty one.
        let body = contents.strip_suffix(b"\n").unwrap_or(contents);
        for (idx, raw) in body.split(|b| *b == b'\n').enumerate() {
            self.stats.lines += 1;
            let line_no = u64::try_from(idx).unwrap_or(u64::MAX).saturating_add(1);
            if raw.len() > MAX_LINE {
                self.stats.oversized += 1;
                continue;
            }
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let line = String::from_utf8_lossy(raw);
            let own_ts = self.timestamps.extract(&line);
            if own_ts.is_some() {
                last_ts = own_ts;
            }
            let ts = own_ts.or(last_ts);
            let mut counted = false;
            let matches = self.rules.evaluate(&line);
            for m in &matches {
                if let (Extracted::Addr(addr), Some(session)) = (&m.addr, &m.session) {
                    let service = self.rules.rules()[m.rule].config.service.clone();
                    sessions.insert((service, session.clone()), *addr);
                }
            }
            for m in matches {
                let addr = match m.addr {
                    Extracted::Addr(addr) => addr,
                    Extracted::Unparseable => {
                        self.stats.unparseable += 1;
                        tracing::debug!(
                            file,
                            line = line_no,
                            "Address did not parse, line not counted."
                        );
                        continue;
                    }
                    Extracted::Session(id) => {
                        let service = self.rules.rules()[m.rule].config.service.clone();
                        if let Some(addr) = sessions.get(&(service, id)) {
                            *addr
                        } else {
                            self.stats.unresolved += 1;
                            continue;
                        }
                    }
                };
                if !self.prerequisite_met(m.rule, addr) {
                    continue;
                }
                counted = true;
                self.record(m.rule, addr, ts);
                let rule = &self.rules.rules()[m.rule].config;
                out.push(LineMatch {
                    file: file.to_owned(),
                    line: line_no,
                    service: rule.service.clone(),
                    rule: rule.id.clone(),
                    addr,
                    timestamp: own_ts.map(format_rfc3339),
                });
            }
            if counted {
                self.stats.matched += 1;
            }
        }
        out
    }

    /// Whether a `requires` rule has already flagged this source (true without `requires`).
    fn prerequisite_met(&self, rule_idx: usize, addr: IpAddr) -> bool {
        let Some(Some(req)) = self.requires.get(rule_idx) else {
            return true;
        };
        // A required rule missing from the set (impossible after validation) never flags.
        let Some(req_rule) = self.rules.rules().get(*req) else {
            return false;
        };
        let key = source_key(addr, req_rule.config.ipv6_prefix);
        self.state.get(&(*req, key)).is_some_and(|st| st.flagged)
    }

    fn record(&mut self, rule_idx: usize, addr: IpAddr, ts: Option<i64>) {
        let Some(rule) = self.rules.rules().get(rule_idx) else {
            return;
        };
        let rule = &rule.config;
        let key = source_key(addr, rule.ipv6_prefix);
        let st = self.state.entry((rule_idx, key)).or_default();
        st.count += 1;
        if let Some(t) = ts {
            // Files are replayed in the order given, so time can go backwards between files.
            st.first = Some(st.first.map_or(t, |f| f.min(t)));
            st.last = Some(st.last.map_or(t, |l| l.max(t)));
        }
        st.recent.push_back(ts);
        if let Some(now) = ts {
            let horizon = now.saturating_sub(i64::try_from(rule.window).unwrap_or(i64::MAX));
            while st
                .recent
                .front()
                .is_some_and(|t| t.is_some_and(|t| t <= horizon))
            {
                st.recent.pop_front();
            }
        }
        let threshold = usize::try_from(rule.threshold).unwrap_or(usize::MAX);
        if st.recent.len() >= threshold {
            st.flagged = true;
        }
        // Only the last `threshold` matches can matter for the next decision.
        while st.recent.len() > threshold {
            st.recent.pop_front();
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The flagged sources, sorted by service, rule and address.
    pub fn flagged(&self) -> Vec<Flagged> {
        let mut out: Vec<Flagged> = self
            .state
            .iter()
            .filter(|(_, st)| st.flagged)
            .filter_map(|((rule_idx, key), st)| {
                let rule = &self.rules.rules().get(*rule_idx)?.config;
                Some(Flagged {
                    addr: display_key(key),
                    service: rule.service.clone(),
                    rule: rule.id.clone(),
                    severity: rule.severity,
                    action: rule.action,
                    count: st.count,
                    first: st.first.map(format_rfc3339),
                    last: st.last.map(format_rfc3339),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.service, &a.rule, &a.addr).cmp(&(&b.service, &b.rule, &b.addr)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACK: &str = r#"
[[rule]]
id = "t-fail"
service = "t"
description = "test"
patterns = ['^(?:\S+ )?FAIL from (?P<addr>\S+)$']
threshold = 3
window = 60
severity = "medium"
action = "drop"

[[rule]]
id = "t-agg"
service = "t"
description = "test"
patterns = ['^(?:\S+ )?AGG from (?P<addr>\S+)$']
threshold = 2
window = 60
severity = "low"
action = "default"
ipv6_prefix = 64
"#;

    fn set() -> RuleSet {
        let mut s = RuleSet::default();
        s.add_str("t.toml", PACK).unwrap();
        s
    }

    #[test]
    fn flags_at_threshold_within_window_only() {
        let rules = set();
        let mut sc = Scanner::new(&rules).unwrap();
        let log = "2026-11-28T01:00:00Z FAIL from 10.0.0.1\n\
                   2026-11-28T01:00:50Z FAIL from 10.0.0.1\n\
                   2026-11-28T01:02:00Z FAIL from 10.0.0.1\n\
                   2026-11-28T01:00:00Z FAIL from 10.0.0.2\n\
                   2026-11-28T01:00:01Z FAIL from 10.0.0.2\n\
                   2026-11-28T01:00:02Z FAIL from ::ffff:10.0.0.2\n";
        let m = sc.feed("a", log.as_bytes());
        assert_eq!(m.len(), 6);
        assert_eq!(m[5].addr.to_string(), "10.0.0.2");
        let f = sc.flagged();
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].addr, "10.0.0.2");
        assert_eq!(f[0].count, 3);
        assert_eq!(f[0].first.as_deref(), Some("2026-11-28T01:00:00Z"));
        assert_eq!(f[0].last.as_deref(), Some("2026-11-28T01:00:02Z"));
    }

    #[test]
    fn untimestamped_lines_use_line_order() {
        let rules = set();
        let mut sc = Scanner::new(&rules).unwrap();
        sc.feed(
            "e",
            b"FAIL from fd77::66\r\nFAIL from fd77::66\r\nFAIL from fd77::66\r\n",
        );
        let f = sc.flagged();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].addr, "fd77::66");
        assert_eq!(f[0].first, None);
        assert_eq!(sc.stats().lines, 3);
    }

    #[test]
    fn unparseable_addresses_do_not_count() {
        let rules = set();
        let mut sc = Scanner::new(&rules).unwrap();
        let m = sc.feed(
            "x",
            b"FAIL from host.example\nFAIL from 10.0.0.999\nFAIL from 1.2.3.4x\n",
        );
        assert!(m.is_empty());
        assert_eq!(sc.stats().unparseable, 3);
        assert!(sc.flagged().is_empty());
    }

    #[test]
    fn requires_counts_only_already_flagged_sources() {
        let mut rules = set();
        rules
            .add_str(
                "ok.toml",
                r#"
[[rule]]
id = "t-ok-after-fail"
service = "t"
description = "login after brute force"
patterns = ['^(?:\S+ )?OK from (?P<addr>\S+)$']
threshold = 1
window = 60
severity = "critical"
action = "redirect"
requires = "t-fail"
"#,
            )
            .unwrap();
        let mut sc = Scanner::new(&rules).unwrap();
        let m = sc.feed(
            "x",
            b"OK from 10.0.0.1\nFAIL from 10.0.0.1\nFAIL from 10.0.0.2\nFAIL from 10.0.0.1\n\
              FAIL from 10.0.0.1\nOK from 10.0.0.1\nOK from 10.0.0.2\n",
        );
        assert_eq!(m.iter().filter(|m| m.rule == "t-ok-after-fail").count(), 1);
        let f: Vec<_> = sc.flagged().into_iter().map(|f| (f.rule, f.addr)).collect();
        assert!(f.contains(&("t-ok-after-fail".to_owned(), "10.0.0.1".to_owned())));
        assert!(!f.iter().any(|(_, a)| a == "10.0.0.2"));
    }

    #[test]
    fn feed_survives_hostile_files() {
        // Deterministic pseudo-random files (xorshift): arbitrary bytes, CR/LF soup, real
        // prefixes with random tails, and a line over MAX_LINE, through the built-in packs.
        let rules = RuleSet::builtin().unwrap();
        let mut sc = Scanner::new(&rules).unwrap();
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let prefixes: [&[u8]; 4] = [
            b"Failed password for x from ",
            b"2026/11/28 01:59:23 [1] auth failed on module m from h (",
            b"10.0.0.1 - - [28/Nov/2026:02:02:39 +0000] \"GET /",
            b"1795831163.6 [0 ",
        ];
        for round in 0..200u64 {
            let mut file = Vec::new();
            for i in 0..50 {
                if i % 3 == 0 {
                    file.extend_from_slice(prefixes[i % prefixes.len()]);
                }
                for _ in 0..next() % 120 {
                    let b = u8::try_from(next() % 256).unwrap();
                    file.push(if round % 2 == 0 && b % 5 == 0 {
                        b'\n'
                    } else {
                        b
                    });
                }
                file.push(b'\n');
            }
            sc.feed("fuzz", &file);
        }
        let lines_before = sc.stats().lines;
        let mut big = vec![b'a'; MAX_LINE + 1];
        big.extend_from_slice(b"\nFailed password for x from 10.0.0.9 port 1 ssh2\r\n");
        let m = sc.feed("big", &big);
        assert_eq!(sc.stats().oversized, 1);
        assert_eq!(sc.stats().lines, lines_before + 2);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].line, 2);
        assert!(sc.feed("empty", b"").is_empty());
    }

    #[test]
    fn sessions_resolve_through_an_earlier_binding_in_the_same_file() {
        let rules = RuleSet::builtin().unwrap();
        let mut sc = Scanner::new(&rules).unwrap();
        let mongo = |ctx: &str, rest: &str| {
            format!(
                r#"{{"t":{{"$date":"2026-11-28T01:59:16.860+00:00"}},"s":"I","c":"{ctx}",{rest}}}"#
            )
        };
        let accepted = mongo(
            "NETWORK",
            r#""id":22943,"ctx":"listener","msg":"Connection accepted","attr":{"remote":"[fd77::66]:50210","uuid":"x","connectionId":7,"connectionCount":1}"#,
        );
        let denied = |conn: u32| {
            mongo(
                "ACCESS",
                &format!(
                    r#""id":20436,"ctx":"conn{conn}","msg":"Checking authorization failed","attr":{{"error":{{"code":13}}}}"#
                ),
            )
        };
        let log = format!(
            "{}\n{accepted}\n{}\n{}\n{}\n",
            denied(7),
            denied(7),
            denied(8),
            denied(7)
        );
        let m = sc.feed("mongod.log", log.as_bytes());
        let unauth: Vec<_> = m
            .iter()
            .filter(|m| m.rule == "mongodb-unauthorized-command")
            .collect();
        assert_eq!(unauth.len(), 2);
        assert!(unauth.iter().all(|m| m.addr.to_string() == "fd77::66"));
        // conn7 before its binding and conn8 never bound.
        assert_eq!(sc.stats().unresolved, 2);
        // Bindings do not leak into the next file.
        sc.feed("other.log", format!("{}\n", denied(7)).as_bytes());
        assert_eq!(sc.stats().unresolved, 3);
    }

    #[test]
    fn aggregates_ipv6_by_prefix() {
        let rules = set();
        let mut sc = Scanner::new(&rules).unwrap();
        sc.feed(
            "x",
            b"AGG from 2001:db8::1\nAGG from 2001:db8::2\nAGG from 10.0.0.1\n",
        );
        let f = sc.flagged();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].addr, "2001:db8::/64");
    }
}
