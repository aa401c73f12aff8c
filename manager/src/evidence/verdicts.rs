//! Verdict ingestion: a `mirage-server`'s batch of detections becomes detection rows and, for
//! every address not on an allowlist, an automatic attacker entry that agents enforce.
//!
//! A verdict's source is one address or, for rules that aggregate IPv6 sources by prefix (one
//! host hopping through its /64), an IPv6 network of /48 to /128 ([`parse_source`]). A network
//! is handled as a whole: it is allowlisted if it *overlaps* any allowlist entry (an entry for
//! it would cover an allowlisted source), a manual entry counts only if it contains all of it,
//! and its automatic entry is the network itself. Its detection rows record the network's first
//! address (the attack log's `addr` is a single address; the entry it was counted against
//! carries the prefix).
//!
//! The whole batch is validated first ([`validate`]); then one transaction, whatever the batch
//! size, runs a fixed number of statements (each a multi-row `UNNEST`):
//!
//! 1. lock the policy head. Every writer of attacker entries takes it first (see
//!    [`crate::policy`]), so the entries read next cannot change under us; it also serializes
//!    ingestion, so detection ids commit in ascending order and a live log reading "ids after
//!    N" never skips one that commits late;
//! 2. drop the verdicts whose idempotency key is already stored (a retried batch stores nothing
//!    twice and changes no entry);
//! 3. find which sources are allowlisted (recorded, never made entries), the exact entries and
//!    the covering manual entries of the rest, and the groups' defaults;
//! 4. plan one change per `(group, source)`: a live manual entry covering the address only
//!    counts the evidence (a manual entry is never downgraded); an automatic entry gets the
//!    verdict's action or keeps its own, and an expiry of now + the policy's TTL (never earlier
//!    than it had); otherwise a new automatic entry;
//! 5. take one revision per entry added or changed (`add`/`update`), write the entries, the
//!    revision rows and `NOTIFY mirage_policy`; write the detections with their `attacker_id`,
//!    `NOTIFY mirage_detection`, and one audit row.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv6Net};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use time::{Duration, OffsetDateTime};

use super::{check_nul, check_text, parse_addr, parse_time};
use crate::{
    db::{
        self,
        audit_log::Actor,
        detections::NewDetections,
        evidence::{Defaults, NewEntries, Updates},
        policy_revisions::Revision,
    },
    policy,
};

/// Most verdicts in one batch.
pub const MAX_BATCH: usize = 1000;
/// Most evidence lines per verdict.
pub const MAX_EVIDENCE_LINES: usize = 100;
/// Longest evidence line, in bytes.
pub const MAX_EVIDENCE_LINE: usize = 4096;
/// Longest idempotency key, in characters.
pub const MAX_KEY: usize = 128;
/// Largest `count` of one verdict (keeps sums far from overflowing).
pub const MAX_COUNT: i64 = 1_000_000_000;
/// Severities, least first.
pub const SEVERITIES: [&str; 5] = ["info", "low", "medium", "high", "critical"];
/// Actions a server may suggest.
pub const ACTIONS: [&str; 4] = ["default", "drop", "redirect", "reflect"];
/// Broadest IPv6 prefix a verdict may name (a site; anything broader is many unrelated hosts).
pub const MIN_PREFIX_V6: u8 = 48;
/// Attempts when a concurrent writer inserted one of our keys between our check and our insert.
const ATTEMPTS: usize = 3;

/// `POST /api/v1/verdicts` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// 1 to [`MAX_BATCH`] verdicts.
    pub verdicts: Vec<VerdictInput>,
}

/// One verdict as a server sends it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerdictInput {
    /// Idempotency key chosen by the server (1 to 128 characters).
    pub id: String,
    /// The attacker's address, or an IPv6 prefix of /48 to /128 (`2001:db8:1:2::/64`, host bits
    /// zero) for rules that aggregate IPv6 sources.
    pub addr: String,
    /// The detection rule, e.g. `sshd-bruteforce`.
    pub rule: String,
    /// The attacked service, e.g. `sshd`.
    pub service: String,
    /// `info`, `low`, `medium`, `high` or `critical`.
    pub severity: String,
    /// Suggested action: `default`, `drop`, `redirect` or `reflect`.
    #[serde(default)]
    pub action: Option<String>,
    /// Matches this verdict counts (default 1).
    #[serde(default = "one")]
    pub count: i64,
    /// The raw log lines that matched.
    #[serde(default)]
    pub evidence: Vec<String>,
    /// When it happened (RFC 3339).
    pub at: String,
    /// Agent group name; absent: every group.
    #[serde(default)]
    pub group: Option<String>,
}

fn one() -> i64 {
    1
}

/// A validated verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Idempotency key.
    pub key: String,
    /// Canonical address: the source's, or its network's first address (what the detection row
    /// records).
    pub addr: IpAddr,
    /// The source as a network: the address as a /32 or /128, or the IPv6 prefix.
    pub net: IpNet,
    /// Rule.
    pub rule: String,
    /// Service.
    pub service: String,
    /// Severity.
    pub severity: String,
    /// Suggested action.
    pub action: Option<String>,
    /// Count (at least 1).
    pub count: i64,
    /// Evidence lines.
    pub evidence: Vec<String>,
    /// Time.
    pub at: OffsetDateTime,
    /// Group name.
    pub group: Option<String>,
}

/// Validates a whole batch; the error names the first bad item (`verdicts[3].addr: ...`).
pub fn validate(batch: Batch) -> Result<Vec<Verdict>, String> {
    let n = batch.verdicts.len();
    if n == 0 || n > MAX_BATCH {
        return Err(format!(
            "a batch holds 1 to {MAX_BATCH} verdicts; this one has {n}"
        ));
    }
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(n);
    for (i, v) in batch.verdicts.iter().enumerate() {
        if let Some(first) = seen.insert(v.id.as_str(), i) {
            return Err(format!(
                "verdicts[{i}].id: `{}` is also the id of verdicts[{first}]; ids are idempotency \
                 keys and must be unique",
                v.id
            ));
        }
    }
    batch
        .verdicts
        .into_iter()
        .enumerate()
        .map(|(i, v)| verdict(i, v))
        .collect()
}

fn verdict(i: usize, v: VerdictInput) -> Result<Verdict, String> {
    let at = |field: &str| format!("verdicts[{i}].{field}");
    check_text(&at("id"), &v.id, 1, MAX_KEY)?;
    let net = parse_source(&at("addr"), &v.addr)?;
    check_text(&at("rule"), &v.rule, 1, 128)?;
    check_text(&at("service"), &v.service, 1, 64)?;
    if !SEVERITIES.contains(&v.severity.as_str()) {
        return Err(format!(
            "{}: unknown severity `{}` (info, low, medium, high or critical)",
            at("severity"),
            v.severity
        ));
    }
    if let Some(action) = &v.action
        && !ACTIONS.contains(&action.as_str())
    {
        return Err(format!(
            "{}: unknown action `{action}` (default, drop, redirect or reflect)",
            at("action")
        ));
    }
    if !(1..=MAX_COUNT).contains(&v.count) {
        return Err(format!(
            "{}: must be between 1 and {MAX_COUNT}",
            at("count")
        ));
    }
    if v.evidence.len() > MAX_EVIDENCE_LINES {
        return Err(format!(
            "{}: at most {MAX_EVIDENCE_LINES} lines; this one has {}",
            at("evidence"),
            v.evidence.len()
        ));
    }
    for (j, line) in v.evidence.iter().enumerate() {
        let what = format!("verdicts[{i}].evidence[{j}]");
        if line.len() > MAX_EVIDENCE_LINE {
            return Err(format!("{what} is longer than {MAX_EVIDENCE_LINE} bytes"));
        }
        check_nul(&what, line)?;
    }
    let time = parse_time(&at("at"), &v.at)?;
    if let Some(group) = &v.group {
        check_text(&at("group"), group, 1, 64)?;
    }
    Ok(Verdict {
        key: v.id,
        addr: net.network(),
        net,
        rule: v.rule,
        service: v.service,
        severity: v.severity,
        action: v.action,
        count: v.count,
        evidence: v.evidence,
        at: time,
        group: v.group,
    })
}

/// Parses a verdict's source: one address (as [`parse_addr`]: IPv4-mapped IPv6 folded to IPv4,
/// never unspecified, loopback, multicast or broadcast), or an IPv6 network of
/// [`MIN_PREFIX_V6`] to /128. IPv4 only as a single address (`/32` accepted): servers aggregate
/// IPv6 sources only, where one host may hold a whole /64.
///
/// A network's host bits must be zero: `2001:db8::5/64` is refused naming `2001:db8::/64`
/// rather than truncated, because a server that sends it has a bug (did it mean the host or
/// the prefix?) and the batch's 400 makes that visible instead of silently widening an entry.
pub fn parse_source(what: &str, value: &str) -> Result<IpNet, String> {
    let trimmed = value.trim();
    let Some((addr, len)) = trimmed.split_once('/') else {
        return parse_addr(what, value).map(IpNet::from);
    };
    let len: u8 = len
        .parse()
        .map_err(|_| format!("{what}: `{value}`: the prefix length is not a number"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{what}: `{value}` is not an IPv4 or IPv6 address or prefix"))?;
    let v6 = match addr {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => v6,
        // IPv4, plain or mapped: a single address only.
        _ if len == if addr.is_ipv4() { 32 } else { 128 } => {
            return parse_addr(what, &addr.to_string()).map(IpNet::from);
        }
        _ => {
            return Err(format!(
                "{what}: `{value}`: an IPv4 source is a single address (or /32); only IPv6 \
                 sources may be prefixes"
            ));
        }
    };
    if len > 128 {
        return Err(format!(
            "{what}: `{value}`: the prefix length must be at most /128"
        ));
    }
    if len < MIN_PREFIX_V6 {
        return Err(format!(
            "{what}: `{value}` is broader than /{MIN_PREFIX_V6}: an IPv6 source prefix must be \
             /{MIN_PREFIX_V6} to /128"
        ));
    }
    let net = Ipv6Net::new(v6, len)
        .map_err(|_| format!("{what}: `{value}`: the prefix length must be at most /128"))?;
    if net.network() != v6 {
        return Err(format!(
            "{what}: `{value}` has host bits set; did you mean `{}`?",
            net.trunc()
        ));
    }
    // The network's first address decides: within a /48 or longer every address shares the
    // unspecified (`::`), loopback or multicast (`ff00::/8`) nature of the first.
    let first: Ipv6Addr = net.network();
    parse_addr(what, &first.to_string())?;
    Ok(IpNet::V6(net))
}

/// What a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// New detections stored.
    pub accepted: usize,
    /// Verdicts whose key was already stored (nothing done for them).
    pub duplicates: usize,
    /// New detections from allowlisted addresses (stored, never made attacker entries).
    pub allowlisted: usize,
    /// The policy head after the batch.
    pub revision: i64,
    /// Attacker entries added.
    #[serde(skip)]
    pub added: usize,
    /// Attacker entries whose action or expiry changed.
    #[serde(skip)]
    pub updated: usize,
}

/// Errors ingesting a batch.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A verdict names an agent group that does not exist.
    #[error("{0}")]
    UnknownGroup(String),
    /// The database failed.
    #[error("storing verdicts")]
    Db(#[from] sqlx::Error),
    /// Another writer stored one of the batch's keys after our duplicate check, every attempt.
    #[error("concurrent writers kept storing this batch's keys")]
    Raced,
}

/// Stores a validated batch reported by `server` (its credential name), audited as `actor`.
pub async fn ingest(
    pool: &PgPool,
    server: &str,
    actor: &Actor,
    verdicts: &[Verdict],
) -> Result<Outcome, IngestError> {
    let groups = resolve_groups(pool, verdicts).await?;
    let mut attempt = 1;
    loop {
        match attempt_once(pool, server, actor, verdicts, &groups).await {
            Err(IngestError::Raced) if attempt < ATTEMPTS => {
                tracing::warn!(
                    attempt,
                    "Verdict keys stored concurrently; retrying the batch."
                );
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// Group names to ids; an unknown name is an error naming the first verdict that uses it.
async fn resolve_groups(
    pool: &PgPool,
    verdicts: &[Verdict],
) -> Result<HashMap<String, i64>, IngestError> {
    let names: Vec<String> = verdicts
        .iter()
        .filter_map(|v| v.group.clone())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if names.is_empty() {
        return Ok(HashMap::new());
    }
    let found: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT name, id FROM agent_groups WHERE name = ANY($1)",
    )
    .bind(&names)
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    for (i, v) in verdicts.iter().enumerate() {
        if let Some(group) = &v.group
            && !found.contains_key(group)
        {
            return Err(IngestError::UnknownGroup(format!(
                "verdicts[{i}].group: no agent group `{group}`"
            )));
        }
    }
    Ok(found)
}

/// One `(group, source)` the batch reports.
#[derive(Debug)]
struct Target {
    group_id: Option<i64>,
    /// The source: a /32, a /128 or an IPv6 prefix.
    net: IpNet,
    count: i64,
    rule: String,
    service: String,
    /// The last suggested action in batch order.
    action: Option<String>,
}

/// What happens to a target's entry.
#[derive(Debug)]
enum Plan {
    /// Count the evidence against entry `id`; agents see no change.
    Evidence(i64),
    /// Change entry `id`'s action or expiry (a new revision).
    Update {
        id: i64,
        action: String,
        expires_at: Option<OffsetDateTime>,
    },
    /// A new automatic entry (a new revision).
    Add {
        action: String,
        expires_at: Option<OffsetDateTime>,
    },
}

async fn attempt_once(
    pool: &PgPool,
    server: &str,
    actor: &Actor,
    verdicts: &[Verdict],
    groups: &HashMap<String, i64>,
) -> Result<Outcome, IngestError> {
    let mut tx = pool.begin().await?;
    db::evidence::no_jit(&mut *tx).await?;
    let head = policy::lock_head(&mut *tx).await?;
    let keys: Vec<String> = verdicts.iter().map(|v| v.key.clone()).collect();
    let stored: HashSet<String> = db::detections::existing_keys(&mut *tx, &keys)
        .await?
        .into_iter()
        .collect();
    let fresh: Vec<(&Verdict, Option<i64>)> = verdicts
        .iter()
        .filter(|v| !stored.contains(&v.key))
        .map(|v| (v, v.group.as_ref().and_then(|g| groups.get(g).copied())))
        .collect();
    let duplicates = verdicts.len() - fresh.len();
    if fresh.is_empty() {
        tx.rollback().await?;
        metrics::counter!(super::VERDICTS, "outcome" => "duplicate").increment(duplicates as u64);
        return Ok(Outcome {
            accepted: 0,
            duplicates,
            allowlisted: 0,
            revision: head,
            added: 0,
            updated: 0,
        });
    }

    // Allowlisted sources, and one target per (group, source) for the rest.
    let nets: Vec<IpNet> = fresh.iter().map(|(v, _)| v.net).collect();
    let allowlisted: HashSet<usize> = db::evidence::allowlisted(&mut *tx, &nets)
        .await?
        .into_iter()
        .collect();
    let mut targets: Vec<Target> = Vec::new();
    let mut index: HashMap<(Option<i64>, IpNet), usize> = HashMap::new();
    let mut target_of: Vec<Option<usize>> = vec![None; fresh.len()];
    for (i, &(v, group_id)) in fresh.iter().enumerate() {
        if allowlisted.contains(&i) {
            continue;
        }
        let t = *index.entry((group_id, v.net)).or_insert_with(|| {
            targets.push(Target {
                group_id,
                net: v.net,
                count: 0,
                rule: v.rule.clone(),
                service: v.service.clone(),
                action: None,
            });
            targets.len() - 1
        });
        if let Some(target) = targets.get_mut(t) {
            target.count = target.count.saturating_add(v.count);
            if v.action.is_some() {
                target.action.clone_from(&v.action);
            }
        }
        if let Some(slot) = target_of.get_mut(i) {
            *slot = Some(t);
        }
    }

    // The entries the targets touch, and what each target does.
    let t_groups: Vec<Option<i64>> = targets.iter().map(|t| t.group_id).collect();
    let t_nets: Vec<IpNet> = targets.iter().map(|t| t.net).collect();
    let (exact, covering, defaults) = if targets.is_empty() {
        Default::default()
    } else {
        let exact: HashMap<usize, db::attackers::Attacker> =
            db::evidence::lock_exact(&mut tx, &t_groups, &t_nets)
                .await?
                .into_iter()
                .collect();
        let covering: HashMap<usize, i64> =
            db::evidence::covering_manual(&mut *tx, &t_groups, &t_nets)
                .await?
                .into_iter()
                .collect();
        let ids: Vec<i64> = t_groups
            .iter()
            .flatten()
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let defaults: HashMap<Option<i64>, Defaults> = db::evidence::defaults(&mut *tx, &ids)
            .await?
            .into_iter()
            .map(|d| (d.group_id, d))
            .collect();
        (exact, covering, defaults)
    };
    let now = OffsetDateTime::now_utc();
    let plans: Vec<Plan> = targets
        .iter()
        .enumerate()
        .map(|(t, target)| {
            plan(
                target,
                covering.get(&t).copied(),
                exact.get(&t),
                defaults.get(&target.group_id),
                now,
            )
        })
        .collect();

    // Revisions for the changes, in target order.
    let changes = plans
        .iter()
        .filter(|p| !matches!(p, Plan::Evidence(_)))
        .count();
    let revision = if changes > 0 {
        db::evidence::advance_head(&mut *tx, changes as i64).await?
    } else {
        head
    };
    let mut next_revision = revision - changes as i64 + 1;
    let mut new_entries = NewEntries::default();
    let mut updates = Updates::default();
    let mut evidence: HashMap<i64, i64> = HashMap::new();
    // Per target: its entry id (known now, or after the insert) and its revision, if any.
    let mut entry_of: Vec<Option<i64>> = vec![None; targets.len()];
    let mut revision_of: Vec<Option<i64>> = vec![None; targets.len()];
    for (t, (target, plan)) in targets.iter().zip(&plans).enumerate() {
        match plan {
            Plan::Evidence(id) => {
                *evidence.entry(*id).or_default() += target.count;
                entry_of[t] = Some(*id);
            }
            Plan::Update {
                id,
                action,
                expires_at,
            } => {
                updates.ids.push(*id);
                updates.actions.push(action.clone());
                updates.expires.push(*expires_at);
                updates.counts.push(target.count);
                updates.rules.push(target.rule.clone());
                updates.services.push(target.service.clone());
                updates.revisions.push(next_revision);
                entry_of[t] = Some(*id);
                revision_of[t] = Some(next_revision);
                next_revision += 1;
            }
            Plan::Add { action, expires_at } => {
                new_entries.groups.push(target.group_id);
                new_entries.nets.push(target.net);
                new_entries.actions.push(action.clone());
                new_entries
                    .reasons
                    .push(format!("{} on {}", target.rule, target.service));
                new_entries.rules.push(target.rule.clone());
                new_entries.services.push(target.service.clone());
                new_entries.counts.push(target.count);
                new_entries.expires.push(*expires_at);
                new_entries.revisions.push(next_revision);
                revision_of[t] = Some(next_revision);
                next_revision += 1;
            }
        }
    }
    if !new_entries.nets.is_empty() {
        let ids = db::evidence::insert_automatic(&mut *tx, server, &new_entries).await?;
        // Both in revision order, which is target order.
        let added = plans
            .iter()
            .enumerate()
            .filter(|(_, p)| matches!(p, Plan::Add { .. }))
            .map(|(t, _)| t);
        for (t, id) in added.zip(ids) {
            entry_of[t] = Some(id);
        }
    }
    if !updates.ids.is_empty() {
        db::evidence::update_automatic(&mut *tx, server, &updates).await?;
    }
    if !evidence.is_empty() {
        let (ids, counts): (Vec<i64>, Vec<i64>) = evidence.into_iter().unzip();
        db::evidence::add_evidence(&mut *tx, server, &ids, &counts).await?;
    }
    let mut revs = Vec::with_capacity(changes);
    let mut changed = Vec::with_capacity(changes);
    for (t, (target, plan)) in targets.iter().zip(&plans).enumerate() {
        let (op, action, expires_at) = match plan {
            Plan::Evidence(_) => continue,
            Plan::Update {
                action, expires_at, ..
            } => ("update", action, *expires_at),
            Plan::Add { action, expires_at } => ("add", action, *expires_at),
        };
        let (Some(id), Some(rev)) = (entry_of[t], revision_of[t]) else {
            continue;
        };
        let net = target.net;
        revs.push(Revision {
            revision: rev,
            group_id: target.group_id,
            op: op.to_owned(),
            net: Some(net),
            action: Some(action.clone()),
            expires_at,
            details: serde_json::json!({ "id": id, "rule": target.rule, "server": server }),
        });
        changed.push(serde_json::json!({ "id": id, "net": net, "op": op, "revision": rev }));
    }
    if let Some(last) = revs.last().map(|r| r.revision) {
        db::evidence::insert_revisions(&mut *tx, &revs).await?;
        db::policy_revisions::notify(&mut *tx, last).await?;
    }

    // The detections, with the entry each was counted against.
    let mut rows = NewDetections::default();
    for (i, &(v, _)) in fresh.iter().enumerate() {
        rows.keys.push(v.key.clone());
        rows.addrs.push(v.addr);
        rows.attacker_ids
            .push(target_of[i].and_then(|t| entry_of.get(t).copied().flatten()));
        rows.rules.push(v.rule.clone());
        rows.services.push(v.service.clone());
        rows.severities.push(v.severity.clone());
        rows.actions.push(v.action.clone());
        rows.counts.push(v.count);
        rows.evidence.push(serde_json::json!(v.evidence));
        rows.groups.push(v.group.clone());
        rows.allowlisted.push(allowlisted.contains(&i));
        rows.ats.push(v.at);
    }
    let ids = db::detections::insert(&mut *tx, server, &rows).await?;
    if ids.len() != fresh.len() {
        tx.rollback().await?;
        return Err(IngestError::Raced);
    }
    if let Some(&newest) = ids.last() {
        db::detections::notify(&mut *tx, newest).await?;
    }
    let added = plans
        .iter()
        .filter(|p| matches!(p, Plan::Add { .. }))
        .count();
    let outcome = Outcome {
        accepted: fresh.len(),
        duplicates,
        allowlisted: allowlisted.len(),
        revision,
        added,
        updated: changes - added,
    };
    db::audit_log::record(
        &mut *tx,
        actor,
        "verdicts.ingest",
        None,
        serde_json::json!({
            "accepted": outcome.accepted, "duplicates": duplicates,
            "allowlisted": outcome.allowlisted, "revision": revision,
            "detections": [ids.first(), ids.last()], "attackers": changed,
        }),
    )
    .await?;
    tx.commit().await?;

    metrics::counter!(super::VERDICTS, "outcome" => "accepted")
        .increment((outcome.accepted - outcome.allowlisted) as u64);
    metrics::counter!(super::VERDICTS, "outcome" => "allowlisted")
        .increment(outcome.allowlisted as u64);
    metrics::counter!(super::VERDICTS, "outcome" => "duplicate").increment(duplicates as u64);
    metrics::counter!(super::AUTOMATIC_ENTRIES, "op" => "add").increment(added as u64);
    metrics::counter!(super::AUTOMATIC_ENTRIES, "op" => "update").increment(outcome.updated as u64);
    if changes > 0 {
        tracing::info!(
            server,
            accepted = outcome.accepted,
            added,
            updated = outcome.updated,
            revision,
            "Verdicts changed attacker entries."
        );
    } else {
        tracing::debug!(server, accepted = outcome.accepted, "Verdicts stored.");
    }
    Ok(outcome)
}

/// Decides a target's change (see the module documentation).
fn plan(
    target: &Target,
    covering_manual: Option<i64>,
    exact: Option<&db::attackers::Attacker>,
    defaults: Option<&Defaults>,
    now: OffsetDateTime,
) -> Plan {
    if let Some(id) = covering_manual {
        return Plan::Evidence(id);
    }
    let (ttl_secs, default_action) =
        defaults.map_or((None, "default"), |d| (d.ttl_secs, d.action.as_str()));
    // `None`: until removed. A TTL too large to represent is no expiry either.
    let new_expiry = ttl_secs.and_then(|ttl| now.checked_add(Duration::seconds(ttl)));
    let Some(entry) = exact else {
        return Plan::Add {
            action: target
                .action
                .clone()
                .unwrap_or_else(|| default_action.to_owned()),
            expires_at: new_expiry,
        };
    };
    // A live automatic entry keeps what it has unless the verdict says more; an expired one (or
    // an expired manual one, which no covering check found) starts over as a new automatic entry.
    let live_automatic = !entry.manual && entry.expires_at.is_none_or(|at| at > now);
    let action = match (&target.action, live_automatic) {
        (Some(action), _) => action.clone(),
        (None, true) => entry.action.clone(),
        (None, false) => default_action.to_owned(),
    };
    let expires_at = match (new_expiry, live_automatic) {
        (None, _) => None,
        (Some(_), true) if entry.expires_at.is_none() => None,
        (Some(new), true) => entry.expires_at.map(|old| old.max(new)),
        (Some(new), false) => Some(new),
    };
    if live_automatic && action == entry.action && expires_at == entry.expires_at {
        Plan::Evidence(entry.id)
    } else {
        Plan::Update {
            id: entry.id,
            action,
            expires_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn batch(items: serde_json::Value) -> Batch {
        serde_json::from_value(json!({ "verdicts": items })).unwrap()
    }

    fn item() -> serde_json::Value {
        json!({
            "id": "k1", "addr": "::ffff:203.0.113.5", "rule": "sshd-bruteforce",
            "service": "sshd", "severity": "high", "evidence": ["Failed password for root"],
            "at": "2024-05-01T10:00:00Z",
        })
    }

    #[test]
    fn validates_and_normalizes() {
        let v = validate(batch(json!([item()]))).unwrap();
        assert_eq!(v[0].addr.to_string(), "203.0.113.5");
        assert_eq!(v[0].count, 1);
        assert_eq!(v[0].action, None);
    }

    #[test]
    fn names_the_bad_item() {
        let mut bad = item();
        bad["id"] = json!("k2");
        bad["addr"] = json!("127.0.0.1");
        let err = validate(batch(json!([item(), bad]))).unwrap_err();
        assert!(
            err.starts_with("verdicts[1].addr") && err.contains("loopback"),
            "{err}"
        );
        for (field, value, needle) in [
            ("severity", json!("urgent"), "verdicts[0].severity"),
            ("action", json!("pass"), "verdicts[0].action"),
            ("count", json!(0), "verdicts[0].count"),
            ("id", json!(""), "verdicts[0].id must not be empty"),
            ("id", json!("x".repeat(129)), "verdicts[0].id is longer"),
            ("at", json!("now"), "verdicts[0].at"),
            (
                "evidence",
                json!(["a\u{0}b"]),
                "verdicts[0].evidence[0] contains a NUL",
            ),
            (
                "evidence",
                json!(["x".repeat(4097)]),
                "verdicts[0].evidence[0] is longer",
            ),
            ("evidence", json!(vec!["l"; 101]), "at most 100 lines"),
        ] {
            let mut v = item();
            v[field] = value;
            let err = validate(batch(json!([v]))).unwrap_err();
            assert!(err.contains(needle), "{field}: {err}");
        }
        let err = validate(batch(json!([item(), item()]))).unwrap_err();
        assert!(err.contains("also the id of verdicts[0]"), "{err}");
        assert!(validate(batch(json!([]))).is_err());
        assert!(validate(batch(json!(vec![item(); 1001]))).is_err());
        let unknown: Result<Batch, _> =
            serde_json::from_value(json!({ "verdicts": [item()], "extra": 1 }));
        assert!(unknown.is_err());
    }

    #[test]
    fn sources_are_addresses_or_ipv6_prefixes() {
        for (input, want) in [
            ("203.0.113.5", "203.0.113.5/32"),
            ("::ffff:203.0.113.5", "203.0.113.5/32"),
            ("203.0.113.5/32", "203.0.113.5/32"),
            ("::ffff:203.0.113.5/128", "203.0.113.5/32"),
            ("2001:db8::66", "2001:db8::66/128"),
            (" 2001:db8:1:2::/64 ", "2001:db8:1:2::/64"),
            ("2001:db8:1::/48", "2001:db8:1::/48"),
            ("2001:db8::66/128", "2001:db8::66/128"),
        ] {
            let net = parse_source("verdicts[0].addr", input).unwrap();
            assert_eq!(net.to_string(), want, "{input}");
        }
        for (input, needle) in [
            ("2001:db8::/40", "broader than /48"),
            ("2001:db8::/0", "broader than /48"),
            ("2001:db8::5/64", "did you mean `2001:db8::/64`"),
            ("2001:db8::/129", "at most /128"),
            ("203.0.113.0/24", "IPv4 source is a single address"),
            ("::ffff:203.0.113.0/120", "IPv4 source is a single address"),
            ("::/64", "unspecified"),
            ("::1/128", "loopback"),
            ("ff02::/64", "multicast"),
            ("127.0.0.1/32", "loopback"),
            ("2001:db8::/x", "not a number"),
            ("example.org/64", "not an IPv4 or IPv6"),
        ] {
            let err = parse_source("verdicts[0].addr", input).unwrap_err();
            assert!(
                err.starts_with("verdicts[0].addr") && err.contains(needle),
                "{input}: {err}"
            );
        }
        let v = validate(batch(json!([{
            "id": "p", "addr": "2001:db8:1:2::/64", "rule": "r", "service": "s",
            "severity": "low", "at": "2024-05-01T10:00:00Z",
        }])))
        .unwrap();
        assert_eq!(v[0].net.to_string(), "2001:db8:1:2::/64");
        assert_eq!(v[0].addr.to_string(), "2001:db8:1:2::");
    }

    fn target(action: Option<&str>) -> Target {
        Target {
            group_id: None,
            net: "203.0.113.5/32".parse().unwrap(),
            count: 2,
            rule: "r".to_owned(),
            service: "s".to_owned(),
            action: action.map(str::to_owned),
        }
    }

    fn entry(
        manual: bool,
        action: &str,
        expires_at: Option<OffsetDateTime>,
    ) -> db::attackers::Attacker {
        let now = OffsetDateTime::now_utc();
        db::attackers::Attacker {
            id: 7,
            group_id: None,
            net: "203.0.113.5/32".parse().unwrap(),
            action: action.to_owned(),
            reason: String::new(),
            rule: None,
            service: None,
            evidence_count: 1,
            first_seen: now,
            last_seen: now,
            expires_at,
            manual,
            reported_by: vec![],
            revision: 1,
        }
    }

    #[test]
    fn plans_changes() {
        let now = OffsetDateTime::now_utc();
        let ttl = Defaults {
            group_id: None,
            ttl_secs: Some(3600),
            action: "redirect".to_owned(),
        };
        let forever = Defaults {
            ttl_secs: None,
            ..ttl.clone()
        };
        // Covered by a manual entry: evidence only.
        assert!(matches!(
            plan(&target(Some("drop")), Some(3), None, Some(&ttl), now),
            Plan::Evidence(3)
        ));
        // New: the suggestion, else the policy's action; now + TTL.
        match plan(&target(None), None, None, Some(&ttl), now) {
            Plan::Add { action, expires_at } => {
                assert_eq!(action, "redirect");
                assert_eq!(expires_at, Some(now + Duration::hours(1)));
            }
            other => panic!("{other:?}"),
        }
        // Live automatic, nothing new to enforce: evidence only.
        let e = entry(false, "drop", None);
        assert!(matches!(
            plan(&target(None), None, Some(&e), Some(&forever), now),
            Plan::Evidence(7)
        ));
        // Live automatic with an expiry: extended, never shortened.
        let later = now + Duration::hours(5);
        let e = entry(false, "drop", Some(now + Duration::minutes(1)));
        assert!(matches!(
            plan(&target(None), None, Some(&e), Some(&ttl), now),
            Plan::Update { expires_at: Some(x), ref action, .. } if x == now + Duration::hours(1) && action == "drop"
        ));
        let e = entry(false, "drop", Some(later));
        assert!(matches!(
            plan(&target(Some("reflect")), None, Some(&e), Some(&ttl), now),
            Plan::Update { expires_at: Some(x), ref action, .. } if x == later && action == "reflect"
        ));
        // An expired manual entry starts over as automatic.
        let e = entry(true, "pass", Some(now - Duration::minutes(1)));
        assert!(matches!(
            plan(&target(None), None, Some(&e), Some(&ttl), now),
            Plan::Update { ref action, .. } if action == "redirect"
        ));
        // No policy found: the mode's default, no expiry.
        assert!(matches!(
            plan(&target(None), None, None, None, now),
            Plan::Add { ref action, expires_at: None } if action == "default"
        ));
    }
}
