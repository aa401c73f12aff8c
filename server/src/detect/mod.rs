//! Live detection: received log records in, verdicts out.
//!
//! [`Detector::process`] takes a batch of [`LogRecord`]s from the listeners and:
//!
//! 1. drops (and counts) records from untrusted sources: a forged line must never produce a
//!    verdict, so such lines are at most logged;
//! 2. runs the rules of the record's service (every rule when the service is unknown) over its
//!    line; the event time is the line's own timestamp, else the syslog header's, else the time
//!    of arrival, and never later than arrival (a host with a clock in the future must not
//!    advance the windows of everyone else);
//! 3. resolves lines naming only a session (pid, thread or connection id) through the session
//!    bindings of the same host and service; a line whose binding has not arrived yet (it may be
//!    on its way through another server) waits up to [`SESSION_WAIT_SECS`];
//! 4. skips addresses on the never-flag list (configured networks, the manager's allowlists,
//!    and loopback, unspecified, multicast and broadcast addresses, which are never attackers);
//! 5. counts the rest in the [`State`] backend and turns each new flag into a [`Verdict`] with a
//!    stable id, the rule's severity and suggested action, and the evidence lines.

pub mod pg;
pub mod state;
pub mod window;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use ipnet::{IpNet, Ipv6Net};
use sha2::{Digest as _, Sha256};

use crate::{
    RuleSet,
    record::LogRecord,
    rules::Extracted,
    timestamp::{Timestamps, format_rfc3339},
    verdict::Verdict,
};
pub use state::{Flag, Hit, MemoryState, RuleMeta, State, StateError};

/// How long a line naming an unbound session waits for its binding.
pub const SESSION_WAIT_SECS: u64 = 5;
/// Session bindings held in this process (the oldest go first).
const MAX_SESSIONS: usize = 200_000;
/// Lines waiting for a session binding.
const MAX_PENDING: usize = 100_000;
/// Matches kept for a retry while the shared state is unreachable.
const MAX_RETRY: usize = 200_000;
/// Event times later than arrival by more than this are taken as arrival.
const MAX_FUTURE_SECS: i64 = 300;

/// Counters of one detector (also exported as metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DetectStats {
    /// Records processed.
    pub records: u64,
    /// Records from untrusted sources (logged only).
    pub untrusted: u64,
    /// Matches counted.
    pub hits: u64,
    /// Matches whose address was on the never-flag list.
    pub never_flag: u64,
    /// Matches whose address text did not parse.
    pub unparseable: u64,
    /// Session lines whose binding never arrived.
    pub unresolved: u64,
    /// Verdicts produced.
    pub verdicts: u64,
    /// Matches dropped because the shared state was unreachable for too long.
    pub lost: u64,
}

/// Networks never flagged: the configured ones plus the manager's allowlists (refreshed).
#[derive(Debug, Clone, Default)]
pub struct NeverFlag {
    inner: Arc<RwLock<(Vec<IpNet>, Vec<IpNet>)>>,
}

impl NeverFlag {
    /// A list with the configured networks.
    pub fn new(configured: Vec<IpNet>) -> Self {
        Self {
            inner: Arc::new(RwLock::new((configured, Vec::new()))),
        }
    }

    /// Replaces the manager's part.
    pub fn set_manager(&self, nets: Vec<IpNet>) {
        match self.inner.write() {
            Ok(mut g) => g.1 = nets,
            Err(poisoned) => poisoned.into_inner().1 = nets,
        }
    }

    /// Whether `addr` must never be flagged.
    pub fn contains(&self, addr: IpAddr) -> bool {
        if addr.is_loopback()
            || addr.is_unspecified()
            || addr.is_multicast()
            || matches!(addr, IpAddr::V4(v4) if v4.is_broadcast())
        {
            return true;
        }
        let check =
            |g: &(Vec<IpNet>, Vec<IpNet>)| g.0.iter().chain(&g.1).any(|n| n.contains(&addr));
        match self.inner.read() {
            Ok(g) => check(&g),
            Err(poisoned) => check(&poisoned.into_inner()),
        }
    }
}

/// A line waiting for its session's binding.
#[derive(Debug)]
struct Pending {
    rule: usize,
    scope: String,
    session: String,
    ts: i64,
    line: String,
    deadline: Instant,
}

/// The live detector.
#[derive(Debug)]
pub struct Detector {
    rules: Arc<RuleSet>,
    meta: Vec<RuleMeta>,
    by_service: HashMap<String, Arc<[usize]>>,
    all: Arc<[usize]>,
    timestamps: Timestamps,
    sessions: HashMap<(String, String), (IpAddr, i64)>,
    never_flag: NeverFlag,
    state: State,
    pending: Vec<Pending>,
    retry: Vec<Hit>,
    watermark: i64,
    stats: DetectStats,
}

impl Detector {
    /// A detector over `rules` counting in `state`.
    ///
    /// # Errors
    ///
    /// Only if the built-in timestamp patterns fail to compile.
    pub fn new(
        rules: Arc<RuleSet>,
        state: State,
        never_flag: NeverFlag,
    ) -> Result<Self, regex::Error> {
        let ids: HashMap<&str, usize> = rules
            .rules()
            .iter()
            .enumerate()
            .map(|(i, r)| (r.config.id.as_str(), i))
            .collect();
        let mut meta: Vec<RuleMeta> = rules
            .rules()
            .iter()
            .map(|r| {
                let window = i64::try_from(r.config.window).unwrap_or(i64::MAX);
                RuleMeta {
                    id: r.config.id.clone(),
                    threshold: r.config.threshold,
                    window,
                    requires: r
                        .config
                        .requires
                        .as_deref()
                        .and_then(|id| ids.get(id).copied()),
                    keep: window,
                }
            })
            .collect();
        // A required rule's flags must outlive the window of the rules that look back at it.
        for i in 0..meta.len() {
            if let Some(req) = meta[i].requires {
                let w = meta[i].window;
                if let Some(m) = meta.get_mut(req) {
                    m.keep = m.keep.max(w);
                }
            }
        }
        let mut by_service: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, r) in rules.rules().iter().enumerate() {
            by_service
                .entry(r.config.service.clone())
                .or_default()
                .push(i);
        }
        let by_service = by_service
            .into_iter()
            .map(|(k, v)| (k, Arc::from(v)))
            .collect();
        let all = (0..rules.rules().len()).collect();
        Ok(Self {
            rules,
            meta,
            by_service,
            all,
            timestamps: Timestamps::new()?,
            sessions: HashMap::new(),
            never_flag,
            state,
            pending: Vec::new(),
            retry: Vec::new(),
            watermark: 0,
            stats: DetectStats::default(),
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> DetectStats {
        self.stats
    }

    /// The rule metadata (ids, windows) in rule order.
    pub fn meta(&self) -> &[RuleMeta] {
        &self.meta
    }

    /// Lines waiting for a session binding.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether matches are waiting for the shared state to come back.
    pub fn has_retry(&self) -> bool {
        !self.retry.is_empty()
    }

    /// Processes a batch (possibly empty: pending session lines are retried and expire) at
    /// arrival time `now` (Unix seconds).
    ///
    /// # Errors
    ///
    /// If the shared state is unreachable. The batch's matches are kept and retried with the
    /// next call (up to a bound, beyond which the oldest are counted as lost).
    pub async fn process(
        &mut self,
        records: Vec<LogRecord>,
        now: i64,
    ) -> Result<Vec<Verdict>, StateError> {
        let mut hits = std::mem::take(&mut self.retry);
        let mut binds = Vec::new();
        for record in records {
            self.stats.records += 1;
            metrics::counter!("mirage_server_records_total").increment(1);
            if !record.origin.may_produce_verdicts() {
                self.stats.untrusted += 1;
                metrics::counter!("mirage_server_untrusted_records_total").increment(1);
                tracing::debug!(
                    peer = %record.peer,
                    host = %record.host,
                    "Record from an untrusted source: logged only, never a verdict."
                );
                continue;
            }
            self.scan_record(&record, now, &mut hits, &mut binds);
        }
        if !binds.is_empty() {
            let bound = self.state.bind_sessions(binds).await;
            self.retry_on_error(bound, &mut hits)?;
        }
        let resolved = self.resolve_pending().await;
        let resolved = self.retry_on_error(resolved, &mut hits)?;
        hits.extend(resolved);
        if hits.is_empty() {
            return Ok(Vec::new());
        }
        let n = u64::try_from(hits.len()).unwrap_or(u64::MAX);
        // Only the shared backend can fail; only for it is a copy kept for the retry.
        let kept = matches!(self.state, State::Postgres(_)).then(|| hits.clone());
        let flags = match self.state.record(&self.meta, hits).await {
            Ok(flags) => flags,
            Err(err) => {
                self.keep_for_retry(kept.unwrap_or_default());
                return Err(err);
            }
        };
        self.stats.hits += n;
        metrics::counter!("mirage_server_matches_total").increment(n);
        let verdicts: Vec<Verdict> = flags.iter().filter_map(|f| self.verdict(f)).collect();
        self.stats.verdicts += u64::try_from(verdicts.len()).unwrap_or(u64::MAX);
        metrics::counter!("mirage_server_verdicts_total")
            .increment(u64::try_from(verdicts.len()).unwrap_or(u64::MAX));
        Ok(verdicts)
    }

    /// Forgets windows and sessions no rule can reach any more.
    ///
    /// # Errors
    ///
    /// If the shared state is unreachable.
    pub async fn sweep(&mut self) -> Result<u64, StateError> {
        let horizon = self.watermark.saturating_sub(86_400);
        self.sessions.retain(|_, (_, ts)| *ts > horizon);
        self.state.sweep(&self.meta, self.watermark).await
    }

    fn scan_record(
        &mut self,
        record: &LogRecord,
        now: i64,
        hits: &mut Vec<Hit>,
        binds: &mut Vec<(String, String, IpAddr, i64)>,
    ) {
        let selected = match &record.service {
            Some(s) => match self.by_service.get(s) {
                Some(list) => Arc::clone(list),
                None => return,
            },
            None => Arc::clone(&self.all),
        };
        let line = record.line.as_str();
        let mut ts = None;
        let rules = Arc::clone(&self.rules);
        for &idx in selected.iter() {
            let Some(rule) = rules.rules().get(idx) else {
                continue;
            };
            let Some((extracted, session)) = rule.extract(line) else {
                continue;
            };
            let ts = *ts.get_or_insert_with(|| {
                let t = self
                    .timestamps
                    .extract(line)
                    .or(record.timestamp)
                    .unwrap_or(now);
                if t > now.saturating_add(MAX_FUTURE_SECS) {
                    now
                } else {
                    t
                }
            });
            self.watermark = self.watermark.max(ts);
            let scope = || format!("{}/{}", record.host, rule.config.service);
            let addr = match extracted {
                Extracted::Addr(addr) => {
                    if let Some(session) = session {
                        let key = (scope(), session);
                        if self.sessions.len() >= MAX_SESSIONS && !self.sessions.contains_key(&key)
                        {
                            self.evict_sessions();
                        }
                        self.sessions.insert(key.clone(), (addr, ts));
                        binds.push((key.0, key.1, addr, ts));
                    }
                    addr
                }
                Extracted::Unparseable => {
                    self.stats.unparseable += 1;
                    continue;
                }
                Extracted::Session(id) => {
                    let key = (scope(), id);
                    match self.sessions.get(&key) {
                        Some((addr, _)) => *addr,
                        None => {
                            if self.pending.len() >= MAX_PENDING {
                                self.stats.unresolved += 1;
                                continue;
                            }
                            self.pending.push(Pending {
                                rule: idx,
                                scope: key.0,
                                session: key.1,
                                ts,
                                line: state::evidence_line(line),
                                deadline: Instant::now() + Duration::from_secs(SESSION_WAIT_SECS),
                            });
                            continue;
                        }
                    }
                }
            };
            if let Some(hit) = self.hit(idx, addr, ts, line) {
                hits.push(hit);
            }
        }
    }

    fn hit(&mut self, rule: usize, addr: IpAddr, ts: i64, line: &str) -> Option<Hit> {
        if self.never_flag.contains(addr) {
            self.stats.never_flag += 1;
            return None;
        }
        let prefix = self.rules.rules().get(rule)?.config.ipv6_prefix;
        Some(Hit {
            rule,
            key: source_key(addr, prefix),
            ts,
            line: state::evidence_line(line),
        })
    }

    /// Resolves waiting session lines: this process's bindings first, then the shared state's.
    async fn resolve_pending(&mut self) -> Result<Vec<Hit>, StateError> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let misses: Vec<(String, String)> = self
            .pending
            .iter()
            .filter(|p| {
                !self
                    .sessions
                    .contains_key(&(p.scope.clone(), p.session.clone()))
            })
            .map(|p| (p.scope.clone(), p.session.clone()))
            .collect();
        let shared = if misses.is_empty() {
            HashMap::new()
        } else {
            self.state.lookup_sessions(misses).await?
        };
        let now = Instant::now();
        let mut hits = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            let key = (p.scope.clone(), p.session.clone());
            let found = self
                .sessions
                .get(&key)
                .map(|(a, _)| *a)
                .or_else(|| shared.get(&key).copied());
            match found {
                Some(addr) => {
                    if let Some(h) = self.hit(p.rule, addr, p.ts, &p.line) {
                        hits.push(h);
                    }
                }
                None if p.deadline <= now => {
                    self.stats.unresolved += 1;
                    metrics::counter!("mirage_server_unresolved_sessions_total").increment(1);
                }
                None => self.pending.push(p),
            }
        }
        Ok(hits)
    }

    fn retry_on_error<T>(
        &mut self,
        result: Result<T, StateError>,
        hits: &mut Vec<Hit>,
    ) -> Result<T, StateError> {
        result.inspect_err(|_| self.keep_for_retry(std::mem::take(hits)))
    }

    fn keep_for_retry(&mut self, mut hits: Vec<Hit>) {
        if hits.len() > MAX_RETRY {
            let lost = hits.len() - MAX_RETRY;
            hits.drain(..lost);
            self.stats.lost += u64::try_from(lost).unwrap_or(u64::MAX);
            metrics::counter!("mirage_server_lost_matches_total")
                .increment(u64::try_from(lost).unwrap_or(u64::MAX));
            tracing::error!(
                lost,
                "Shared state unreachable for too long: oldest matches dropped."
            );
        }
        self.retry = hits;
    }

    fn evict_sessions(&mut self) {
        let mut times: Vec<i64> = self.sessions.values().map(|(_, t)| *t).collect();
        let n = (times.len() / 10).max(1);
        let (_, cut, _) = times.select_nth_unstable(n - 1);
        let cut = *cut;
        self.sessions.retain(|_, (_, t)| *t > cut);
    }

    fn verdict(&self, flag: &Flag) -> Option<Verdict> {
        let rule = &self.rules.rules().get(flag.rule)?.config;
        let addr = display_key(&flag.key);
        let at = format_rfc3339(flag.at);
        let digest = Sha256::new()
            .chain_update(rule.id.as_bytes())
            .chain_update([0])
            .chain_update(addr.as_bytes())
            .chain_update([0])
            .chain_update(flag.at.to_be_bytes())
            .finalize();
        let id = format!(
            "ms-{}",
            digest[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        tracing::info!(
            %addr, rule = %rule.id, count = flag.count, %at,
            "Source flagged."
        );
        Some(Verdict {
            id,
            addr,
            rule: rule.id.clone(),
            service: rule.service.clone(),
            severity: rule.severity.to_string(),
            action: rule.action.to_string(),
            count: flag.count,
            evidence: flag.evidence.clone(),
            at,
        })
    }
}

/// The counting key of an address under a rule: the address, or its IPv6 prefix.
pub fn source_key(addr: IpAddr, ipv6_prefix: Option<u8>) -> IpNet {
    match (addr, ipv6_prefix) {
        (IpAddr::V6(v6), Some(prefix)) => Ipv6Net::new(v6, prefix)
            .map(|n| IpNet::V6(n.trunc()))
            .unwrap_or_else(|_| IpNet::from(addr)),
        _ => IpNet::from(addr),
    }
}

/// An address as text, or a prefix in CIDR notation.
pub fn display_key(key: &IpNet) -> String {
    if key.prefix_len() == key.max_prefix_len() {
        key.addr().to_string()
    } else {
        key.to_string()
    }
}

#[cfg(test)]
mod tests;
