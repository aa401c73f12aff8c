//! Counting state: the per-(rule, source) sliding windows that turn matches into verdicts.
//!
//! Two backends with one contract ([`State::record`]):
//!
//! - [`MemoryState`]: one server, state in this process, bounded and swept;
//! - [`crate::detect::pg::PgState`]: several servers behind one address share their matches
//!   through PostgreSQL, so an attack split across them is counted as one server would count it.
//!
//! The contract, per rule `r` (threshold `t`, window `w`) and source key `k` (an address, or an
//! IPv6 prefix when the rule aggregates): a match at time `ts` *crosses* when at least `t`
//! matches of `(r, k)` have times in `(ts - w, ts]`. A crossing is *flagged* (one verdict) unless
//! `(r, k)` was already flagged at a time in `(ts - w, ts]`: a continuing attack gives one verdict
//! per window, which refreshes the manager's entry. A match of a rule that `requires` rule `q` is
//! only counted when `(q, k)` was flagged at a time in `(ts - w_r, ts]`.

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;

use super::{pg::PgState, window};

/// Evidence lines kept per verdict (the newest).
pub const EVIDENCE_LINES: usize = 20;
/// Longest evidence line (the manager's limit), in bytes.
pub const MAX_EVIDENCE_LINE: usize = 4096;
/// Matches remembered per (rule, source) in memory: more than any sane threshold, and the cap
/// that bounds a flood from one source.
const MAX_RECENT: usize = 1024;
/// Flag times remembered per (rule, source) (the newest).
const MAX_FLAGS: usize = 64;

/// What the backends need to know of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleMeta {
    /// Rule id (the shared state's key, stable across servers and restarts).
    pub id: String,
    /// Matches within `window` that flag.
    pub threshold: u32,
    /// Window, seconds.
    pub window: i64,
    /// Index of the rule this one requires.
    pub requires: Option<usize>,
    /// How long matches and flags of this rule must be kept: its window, or longer when a
    /// rule requiring it looks further back.
    pub keep: i64,
}

/// One counted match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// Index into the rules.
    pub rule: usize,
    /// Source key.
    pub key: IpNet,
    /// Event time, Unix seconds.
    pub ts: i64,
    /// The log line (evidence), already cut to [`MAX_EVIDENCE_LINE`].
    pub line: String,
}

/// A crossing that became a verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    /// Index into the rules.
    pub rule: usize,
    /// Source key.
    pub key: IpNet,
    /// Matches within the window at the crossing.
    pub count: u64,
    /// Time of the crossing match.
    pub at: i64,
    /// Oldest match time in the window.
    pub first: i64,
    /// The newest matching lines in the window, oldest first.
    pub evidence: Vec<String>,
}

/// Errors of the shared backend (the memory one cannot fail).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A PostgreSQL statement failed.
    #[error("shared state: {what}")]
    Database {
        /// Which step.
        what: &'static str,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
}

/// The counting backend.
#[derive(Debug)]
pub enum State {
    /// In this process.
    Memory(MemoryState),
    /// Shared through PostgreSQL.
    Postgres(PgState),
}

impl State {
    /// Records matches (in any order) and returns the new flags, in time order.
    ///
    /// # Errors
    ///
    /// Only the PostgreSQL backend fails; then nothing of the batch was recorded.
    pub async fn record(
        &mut self,
        meta: &[RuleMeta],
        hits: Vec<Hit>,
    ) -> Result<Vec<Flag>, StateError> {
        match self {
            Self::Memory(m) => Ok(m.record(meta, hits)),
            Self::Postgres(p) => p.record(meta, hits).await,
        }
    }

    /// Forgets what no window can reach any more, given the newest event time seen.
    ///
    /// # Errors
    ///
    /// As `record`.
    pub async fn sweep(&mut self, meta: &[RuleMeta], watermark: i64) -> Result<u64, StateError> {
        match self {
            Self::Memory(m) => Ok(m.sweep(meta, watermark)),
            Self::Postgres(p) => p.sweep(meta, watermark).await,
        }
    }

    /// Binds sessions (pid, thread or connection ids) to addresses: `(scope, session, addr, ts)`.
    ///
    /// # Errors
    ///
    /// As `record`.
    pub async fn bind_sessions(
        &mut self,
        binds: Vec<(String, String, std::net::IpAddr, i64)>,
    ) -> Result<(), StateError> {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Postgres(p) => p.bind_sessions(binds).await,
        }
    }

    /// Looks up sessions another server bound (`None` from the memory backend: this process's
    /// own bindings are already in the detector's cache).
    ///
    /// # Errors
    ///
    /// As `record`.
    pub async fn lookup_sessions(
        &mut self,
        keys: Vec<(String, String)>,
    ) -> Result<HashMap<(String, String), std::net::IpAddr>, StateError> {
        match self {
            Self::Memory(_) => Ok(HashMap::new()),
            Self::Postgres(p) => p.lookup_sessions(keys).await,
        }
    }

    /// Number of (rule, source) windows held in memory (0 for the shared backend).
    pub fn tracked(&self) -> usize {
        match self {
            Self::Memory(m) => m.keys.len(),
            Self::Postgres(_) => 0,
        }
    }
}

#[derive(Debug, Default)]
struct KeyState {
    /// Match times and lines (sorted by time), at most `MAX_RECENT`.
    hits: Vec<(i64, String)>,
    /// Flag times.
    flags: Vec<i64>,
    /// Newest match time.
    last: i64,
}

/// Counting state in this process.
#[derive(Debug)]
pub struct MemoryState {
    keys: HashMap<(usize, IpNet), KeyState>,
    /// Most (rule, source) pairs held; beyond it the oldest are swept early.
    max_keys: usize,
}

/// The rules that `requires` each rule.
pub(super) fn dependents(meta: &[RuleMeta]) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); meta.len()];
    for (i, m) in meta.iter().enumerate() {
        if let Some(req) = m.requires
            && let Some(list) = out.get_mut(req)
        {
            list.push(i);
        }
    }
    out
}

/// The batch grouped per (rule, source), in rule order (a required rule is loaded, so indexed,
/// before the rules requiring it), with whether the pair's gate changed.
pub(super) type Work = BTreeMap<(usize, IpNet), (Vec<(i64, String)>, bool)>;

pub(super) fn group(meta: &[RuleMeta], hits: Vec<Hit>) -> Work {
    let mut work = Work::new();
    for h in hits {
        if h.rule < meta.len() {
            work.entry((h.rule, h.key))
                .or_default()
                .0
                .push((h.ts, h.line));
        }
    }
    work
}

impl MemoryState {
    /// Empty state holding at most `max_keys` (rule, source) windows.
    pub fn new(max_keys: usize) -> Self {
        Self {
            keys: HashMap::new(),
            max_keys: max_keys.max(1),
        }
    }

    fn record(&mut self, meta: &[RuleMeta], hits: Vec<Hit>) -> Vec<Flag> {
        let deps = dependents(meta);
        let mut work = group(meta, hits);
        let mut flags = Vec::new();
        while let Some(((rule, key), (new, gate_changed))) = work.pop_first() {
            let m = &meta[rule];
            let gate: Option<Vec<i64>> = m.requires.map(|q| {
                self.keys
                    .get(&(q, key))
                    .map(|st| st.flags.clone())
                    .unwrap_or_default()
            });
            if self.keys.len() >= self.max_keys && !self.keys.contains_key(&(rule, key)) {
                self.evict_oldest();
            }
            let st = self.keys.entry((rule, key)).or_default();
            let mut times: Vec<(i64, bool)> =
                st.hits.iter().map(|(t, _)| (*t, gate_changed)).collect();
            times.extend(new.iter().map(|(t, _)| (*t, true)));
            for (t, line) in new {
                st.last = st.last.max(t);
                let at = st.hits.partition_point(|(u, _)| *u <= t);
                st.hits.insert(at, (t, line));
            }
            // Time-based forgetting is the sweep's (by the newest event time seen, as in the
            // shared backend); here only the count is bounded, dropping the oldest.
            let over = st.hits.len().saturating_sub(MAX_RECENT);
            st.hits.drain(..over);
            let found =
                window::crossings(&times, &st.flags, m.threshold, m.window, gate.as_deref());
            for c in &found {
                st.flags.push(c.at);
                let lo = st
                    .hits
                    .partition_point(|(u, _)| *u <= c.at.saturating_sub(m.window));
                let hi = st.hits.partition_point(|(u, _)| *u <= c.at);
                let lines = &st.hits[lo..hi];
                let skip = lines.len().saturating_sub(EVIDENCE_LINES);
                flags.push(Flag {
                    rule,
                    key,
                    count: c.count,
                    at: c.at,
                    first: c.first,
                    evidence: lines.iter().skip(skip).map(|(_, l)| l.clone()).collect(),
                });
            }
            let over = st.flags.len().saturating_sub(MAX_FLAGS);
            st.flags.drain(..over);
            if !found.is_empty() {
                for &d in deps.get(rule).map_or(&[][..], Vec::as_slice) {
                    work.entry((d, key)).or_default().1 = true;
                }
            }
        }
        flags.sort_by_key(|f| f.at);
        flags
    }

    fn sweep(&mut self, meta: &[RuleMeta], watermark: i64) -> u64 {
        let before = self.keys.len();
        self.keys.retain(|(rule, _), st| {
            let keep = meta.get(*rule).map_or(0, |m| m.keep);
            st.last > watermark.saturating_sub(keep)
        });
        u64::try_from(before - self.keys.len()).unwrap_or(u64::MAX)
    }

    /// Drops the tenth of the windows whose newest match is oldest (a flood of distinct
    /// sources must not grow memory without bound).
    fn evict_oldest(&mut self) {
        let mut lasts: Vec<i64> = self.keys.values().map(|st| st.last).collect();
        let n = (lasts.len() / 10).max(1);
        let (_, cut, _) = lasts.select_nth_unstable(n - 1);
        let cut = *cut;
        let mut removed = 0;
        self.keys.retain(|_, st| {
            if removed < n && st.last <= cut {
                removed += 1;
                false
            } else {
                true
            }
        });
        tracing::warn!(
            removed,
            max = self.max_keys,
            "Counting state full: dropped the oldest windows."
        );
    }
}

/// Cuts a line to at most [`MAX_EVIDENCE_LINE`] bytes on a character boundary.
pub fn evidence_line(line: &str) -> String {
    if line.len() <= MAX_EVIDENCE_LINE {
        return line.to_owned();
    }
    let mut end = MAX_EVIDENCE_LINE;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Vec<RuleMeta> {
        vec![
            RuleMeta {
                id: "fail".into(),
                threshold: 3,
                window: 60,
                requires: None,
                keep: 3600,
            },
            RuleMeta {
                id: "ok-after-fail".into(),
                threshold: 1,
                window: 3600,
                requires: Some(0),
                keep: 3600,
            },
        ]
    }

    fn hit(rule: usize, addr: &str, ts: i64) -> Hit {
        Hit {
            rule,
            key: IpNet::from(addr.parse::<std::net::IpAddr>().unwrap()),
            ts,
            line: format!("{rule} {addr} {ts}"),
        }
    }

    #[test]
    fn one_flag_per_window_and_again_after_it() {
        let m = meta();
        let mut s = MemoryState::new(100);
        let f = s.record(&m, (0..10).map(|i| hit(0, "10.0.0.1", 100 + i)).collect());
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].at, f[0].count, f[0].first), (102, 3, 100));
        assert_eq!(f[0].evidence.len(), 3);
        // 59 s after the flag: same window, no new verdict; 60 s after: a new one.
        assert!(s.record(&m, vec![hit(0, "10.0.0.1", 161)]).is_empty());
        let f = s.record(&m, vec![hit(0, "10.0.0.1", 162)]);
        assert_eq!(f.len(), 1, "{f:?}");
        // Spread-out matches never cross.
        let f = s.record(&m, (0..10).map(|i| hit(0, "10.0.0.2", i * 40)).collect());
        assert!(f.is_empty());
    }

    #[test]
    fn requires_only_after_the_prerequisite_flag() {
        let m = meta();
        let mut s = MemoryState::new(100);
        let mut hits = vec![hit(1, "10.0.0.1", 99)];
        hits.extend((0..3).map(|i| hit(0, "10.0.0.1", 100 + i)));
        hits.push(hit(1, "10.0.0.1", 150));
        hits.push(hit(1, "10.0.0.2", 150));
        let f = s.record(&m, hits);
        let got: Vec<(usize, i64)> = f.iter().map(|f| (f.rule, f.at)).collect();
        assert_eq!(got, vec![(0, 102), (1, 150)]);
    }

    #[test]
    fn sweep_and_cap_bound_memory() {
        let m = meta();
        let mut s = MemoryState::new(50);
        s.record(
            &m,
            (0..200)
                .map(|i| hit(0, &format!("10.0.1.{i}"), i))
                .collect(),
        );
        assert!(s.keys.len() <= 50, "{}", s.keys.len());
        assert!(s.sweep(&m, 10_000) > 0);
        assert!(s.keys.is_empty());
    }

    #[test]
    fn evidence_is_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_EVIDENCE_LINE);
        let cut = evidence_line(&long);
        assert!(cut.len() <= MAX_EVIDENCE_LINE && cut.len() >= MAX_EVIDENCE_LINE - 1);
    }
}
