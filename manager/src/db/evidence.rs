//! The multi-row statements verdict ingestion runs against `attackers`, `policies`,
//! `policy_head` and `policy_revisions` (one statement per step, whatever the batch size), and the
//! small reads the evidence pages need. The single-row writes of the policy side stay in
//! [`super::attackers`] and [`super::policy_revisions`].

use ipnet::IpNet;
use sqlx::{PgExecutor, Row as _};
use time::OffsetDateTime;

use super::{
    attackers::{Attacker, COLUMNS},
    policy_revisions::Revision,
};

/// Switches JIT compilation off for the rest of the transaction. Its cost estimates for the
/// `UNNEST` joins of a batch are high (the planner guesses hundreds of matches per address where
/// there is one), so PostgreSQL would spend 10-150 ms compiling plans that run in a few.
pub async fn no_jit(ex: impl PgExecutor<'_>) -> Result<(), sqlx::Error> {
    sqlx::query("SET LOCAL jit = off")
        .execute(ex)
        .await
        .map(drop)
}

/// An entry by id.
pub async fn attacker(ex: impl PgExecutor<'_>, id: i64) -> Result<Option<Attacker>, sqlx::Error> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM attackers WHERE id = $1"))
        .bind(id)
        .fetch_optional(ex)
        .await?
        .as_ref()
        .map(Attacker::from_row)
        .transpose()
}

/// The indexes (0-based) of `nets` that overlap an allowlist entry of any group's policy (for
/// a single address: that lie inside one; for a prefix: any of whose addresses does).
pub async fn allowlisted(
    ex: impl PgExecutor<'_>,
    nets: &[IpNet],
) -> Result<Vec<usize>, sqlx::Error> {
    let found: Vec<i64> = sqlx::query_scalar(
        "SELECT v.i FROM unnest($1::inet[]) WITH ORDINALITY AS v(net, i) \
         WHERE EXISTS (SELECT 1 FROM policies p, unnest(p.allowlist) AS a WHERE a && v.net)",
    )
    .bind(nets)
    .fetch_all(ex)
    .await?;
    Ok(found.iter().map(|&i| index(i)).collect())
}

/// What automatic entries of a group get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// The group (`None`: the `default` group's policy, used for every-group entries).
    pub group_id: Option<i64>,
    /// Lifetime; `None`: until removed.
    pub ttl_secs: Option<i64>,
    /// Action.
    pub action: String,
}

/// The defaults of each of `group_ids`, and of the `default` group (as `group_id: None`).
pub async fn defaults(
    ex: impl PgExecutor<'_>,
    group_ids: &[i64],
) -> Result<Vec<Defaults>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT p.group_id, g.name = 'default' AS is_default, p.default_ttl_secs, \
                p.default_action \
         FROM policies p JOIN agent_groups g ON g.id = p.group_id \
         WHERE p.group_id = ANY($1) OR g.name = 'default'",
    )
    .bind(group_ids)
    .fetch_all(ex)
    .await?;
    let mut out = Vec::with_capacity(rows.len() + 1);
    for row in &rows {
        let group_id: i64 = row.try_get("group_id")?;
        let ttl_secs: Option<i64> = row.try_get("default_ttl_secs")?;
        let action: String = row.try_get("default_action")?;
        if row.try_get::<bool, _>("is_default")? {
            out.push(Defaults {
                group_id: None,
                ttl_secs,
                action: action.clone(),
            });
        }
        out.push(Defaults {
            group_id: Some(group_id),
            ttl_secs,
            action,
        });
    }
    Ok(out)
}

/// The entries whose `(group, net)` is one of the keys (`groups[i]`, `nets[i]`), locked, each
/// with its key's index.
///
/// Every-group keys and group keys are looked up apart, each as an equality the unique
/// `(group_id, net)` btree answers directly (`IS NOT DISTINCT FROM` would not use it, and the
/// GiST index is slow for equality over many entries).
pub async fn lock_exact(
    conn: &mut sqlx::PgConnection,
    groups: &[Option<i64>],
    nets: &[IpNet],
) -> Result<Vec<(usize, Attacker)>, sqlx::Error> {
    let (mut every, mut every_at) = (Vec::new(), Vec::new());
    let (mut grouped, mut grouped_ids, mut grouped_at) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (group, net)) in groups.iter().zip(nets).enumerate() {
        match group {
            None => {
                every.push(*net);
                every_at.push(i as i64);
            }
            Some(id) => {
                grouped.push(*net);
                grouped_ids.push(*id);
                grouped_at.push(i as i64);
            }
        }
    }
    let mut rows = Vec::new();
    if !every.is_empty() {
        rows.extend(
            sqlx::query(&format!(
                "SELECT v.i, {COLUMNS} FROM unnest($1::cidr[], $2::bigint[]) AS v(n, i) \
                 JOIN attackers ON group_id IS NULL AND net = v.n FOR UPDATE OF attackers"
            ))
            .bind(&every)
            .bind(&every_at)
            .fetch_all(&mut *conn)
            .await?,
        );
    }
    if !grouped.is_empty() {
        rows.extend(
            sqlx::query(&format!(
                "SELECT v.i, {COLUMNS} FROM unnest($1::bigint[], $2::cidr[], $3::bigint[]) \
                 AS v(g, n, i) JOIN attackers ON group_id = v.g AND net = v.n \
                 FOR UPDATE OF attackers"
            ))
            .bind(&grouped_ids)
            .bind(&grouped)
            .bind(&grouped_at)
            .fetch_all(&mut *conn)
            .await?,
        );
    }
    rows.iter()
        .map(|row| {
            let i: i64 = row.try_get("i")?;
            Ok((
                usize::try_from(i).unwrap_or(usize::MAX),
                Attacker::from_row(row)?,
            ))
        })
        .collect()
}

/// For each key (`groups[i]`, `nets[i]`), the most specific live *manual* entry that applies to
/// it (its group's or every group's; for an every-group key, every group's only) and contains
/// the whole network (for a single address: the address): `(key index, entry id)`.
pub async fn covering_manual(
    ex: impl PgExecutor<'_>,
    groups: &[Option<i64>],
    nets: &[IpNet],
) -> Result<Vec<(usize, i64)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT DISTINCT ON (v.i) v.i, a.id \
         FROM unnest($1::bigint[], $2::inet[]) WITH ORDINALITY AS v(g, net, i) \
         JOIN attackers a ON a.net >>= v.net AND a.manual \
              AND (a.group_id IS NULL OR a.group_id = v.g) \
              AND (a.expires_at IS NULL OR a.expires_at > now()) \
         ORDER BY v.i, masklen(a.net) DESC, a.id DESC",
    )
    .bind(groups)
    .bind(nets)
    .fetch_all(ex)
    .await?;
    rows.iter()
        .map(|row| Ok((index(row.try_get("i")?), row.try_get("id")?)))
        .collect()
}

/// New automatic entries, one vector per column.
#[derive(Debug, Default)]
pub struct NewEntries {
    /// Groups.
    pub groups: Vec<Option<i64>>,
    /// Networks (single addresses, or IPv6 prefixes).
    pub nets: Vec<IpNet>,
    /// Actions.
    pub actions: Vec<String>,
    /// Reasons.
    pub reasons: Vec<String>,
    /// Rules.
    pub rules: Vec<String>,
    /// Services.
    pub services: Vec<String>,
    /// Evidence counts.
    pub counts: Vec<i64>,
    /// Expiries.
    pub expires: Vec<Option<OffsetDateTime>>,
    /// Revisions.
    pub revisions: Vec<i64>,
}

/// Inserts automatic entries reported by `server`; returns their ids in order.
pub async fn insert_automatic(
    ex: impl PgExecutor<'_>,
    server: &str,
    rows: &NewEntries,
) -> Result<Vec<i64>, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO attackers (group_id, net, action, reason, rule, service, evidence_count, \
         expires_at, manual, reported_by, revision) \
         SELECT g, n, act, reason, rule, svc, c, exp, false, ARRAY[$1::text], rev \
         FROM unnest($2::bigint[], $3::cidr[], $4::text[], $5::text[], $6::text[], $7::text[], \
                     $8::bigint[], $9::timestamptz[], $10::bigint[]) WITH ORDINALITY \
              AS v(g, n, act, reason, rule, svc, c, exp, rev, ord) \
         ORDER BY ord RETURNING id, revision",
    )
    .bind(server)
    .bind(&rows.groups)
    .bind(&rows.nets)
    .bind(&rows.actions)
    .bind(&rows.reasons)
    .bind(&rows.rules)
    .bind(&rows.services)
    .bind(&rows.counts)
    .bind(&rows.expires)
    .bind(&rows.revisions)
    .fetch_all(ex)
    .await?;
    // Revisions are unique per row: order the ids by them rather than trusting RETURNING's order.
    let mut pairs = inserted
        .iter()
        .map(|row| Ok((row.try_get::<i64, _>("revision")?, row.try_get("id")?)))
        .collect::<Result<Vec<(i64, i64)>, sqlx::Error>>()?;
    pairs.sort_unstable();
    Ok(pairs.into_iter().map(|(_, id)| id).collect())
}

/// Changes to existing entries that agents must learn (action, expiry; a manual entry that had
/// expired becomes automatic), one vector per column.
#[derive(Debug, Default)]
pub struct Updates {
    /// Entry ids.
    pub ids: Vec<i64>,
    /// New actions.
    pub actions: Vec<String>,
    /// New expiries.
    pub expires: Vec<Option<OffsetDateTime>>,
    /// Evidence to add.
    pub counts: Vec<i64>,
    /// Rules (kept if the entry has one).
    pub rules: Vec<String>,
    /// Services (kept if the entry has one).
    pub services: Vec<String>,
    /// Revisions.
    pub revisions: Vec<i64>,
}

/// Applies [`Updates`] reported by `server`.
pub async fn update_automatic(
    ex: impl PgExecutor<'_>,
    server: &str,
    rows: &Updates,
) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "UPDATE attackers a SET action = v.act, expires_at = v.exp, manual = false, \
             evidence_count = a.evidence_count + v.c, last_seen = now(), \
             rule = coalesce(a.rule, v.rule), service = coalesce(a.service, v.svc), \
             reported_by = CASE WHEN $1::text = ANY(a.reported_by) THEN a.reported_by \
                                ELSE a.reported_by || $1::text END, \
             revision = v.rev \
         FROM unnest($2::bigint[], $3::text[], $4::timestamptz[], $5::bigint[], $6::text[], \
                     $7::text[], $8::bigint[]) AS v(id, act, exp, c, rule, svc, rev) \
         WHERE a.id = v.id",
    )
    .bind(server)
    .bind(&rows.ids)
    .bind(&rows.actions)
    .bind(&rows.expires)
    .bind(&rows.counts)
    .bind(&rows.rules)
    .bind(&rows.services)
    .bind(&rows.revisions)
    .execute(ex)
    .await
    .map(|r| r.rows_affected())
}

/// Adds evidence to entries without changing what agents enforce (manual entries, and automatic
/// ones whose action and expiry stay): `ids[i]` gets `counts[i]` (ids unique), `last_seen` now,
/// and `server` in `reported_by` once.
pub async fn add_evidence(
    ex: impl PgExecutor<'_>,
    server: &str,
    ids: &[i64],
    counts: &[i64],
) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "UPDATE attackers a SET evidence_count = a.evidence_count + v.c, last_seen = now(), \
             reported_by = CASE WHEN $1::text = ANY(a.reported_by) THEN a.reported_by \
                                ELSE a.reported_by || $1::text END \
         FROM unnest($2::bigint[], $3::bigint[]) AS v(id, c) WHERE a.id = v.id",
    )
    .bind(server)
    .bind(ids)
    .bind(counts)
    .execute(ex)
    .await
    .map(|r| r.rows_affected())
}

/// Advances the (locked) head by `n` and returns the new head: the caller's revisions are
/// `head - n + 1 ..= head`.
pub async fn advance_head(ex: impl PgExecutor<'_>, n: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("UPDATE policy_head SET revision = revision + $1 RETURNING revision")
        .bind(n)
        .fetch_one(ex)
        .await
}

/// Writes revision rows in one statement (the multi-row [`super::policy_revisions::insert`]).
pub async fn insert_revisions(
    ex: impl PgExecutor<'_>,
    revs: &[Revision],
) -> Result<(), sqlx::Error> {
    let revision: Vec<i64> = revs.iter().map(|r| r.revision).collect();
    let group_id: Vec<Option<i64>> = revs.iter().map(|r| r.group_id).collect();
    let op: Vec<&str> = revs.iter().map(|r| r.op.as_str()).collect();
    let net: Vec<Option<IpNet>> = revs.iter().map(|r| r.net).collect();
    let action: Vec<Option<&str>> = revs.iter().map(|r| r.action.as_deref()).collect();
    let expires_at: Vec<Option<OffsetDateTime>> = revs.iter().map(|r| r.expires_at).collect();
    let details: Vec<&serde_json::Value> = revs.iter().map(|r| &r.details).collect();
    sqlx::query(
        "INSERT INTO policy_revisions (revision, group_id, op, net, action, expires_at, details) \
         SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::cidr[], $5::text[], \
                              $6::timestamptz[], $7::jsonb[])",
    )
    .bind(revision)
    .bind(group_id)
    .bind(op)
    .bind(net)
    .bind(action)
    .bind(expires_at)
    .bind(details)
    .execute(ex)
    .await
    .map(drop)
}

/// Whether session `id` is still live (unexpired, its user enabled): long-lived event streams
/// re-check it, so a logout or a disabled user ends them.
pub async fn session_is_live(ex: impl PgExecutor<'_>, id: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sessions s JOIN users u ON u.id = s.user_id \
         WHERE s.id = $1 AND s.expires_at > now() AND NOT u.disabled)",
    )
    .bind(id)
    .fetch_one(ex)
    .await
}

/// A 1-based `WITH ORDINALITY` number as a 0-based index.
fn index(ordinality: i64) -> usize {
    usize::try_from(ordinality.saturating_sub(1)).unwrap_or(usize::MAX)
}
