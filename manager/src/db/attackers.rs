//! The `attackers` table: the addresses and ranges agents act on.

use ipnet::IpNet;
use serde::Serialize;
use sqlx::{PgExecutor, Row as _, postgres::PgRow};
use time::OffsetDateTime;

/// One attacker entry.
#[derive(Debug, Clone, Serialize)]
pub struct Attacker {
    /// Row id.
    pub id: i64,
    /// The group it applies to; `None`: every group.
    pub group_id: Option<i64>,
    /// Address (/32, /128) or range.
    pub net: IpNet,
    /// `default` (the mode's), `drop`, `redirect`, `reflect`.
    pub action: String,
    /// Why.
    pub reason: String,
    /// The detection rule that triggered it (automatic entries).
    pub rule: Option<String>,
    /// The service it attacked (automatic entries).
    pub service: Option<String>,
    /// Detections counted against it.
    pub evidence_count: i64,
    /// First seen.
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    /// Last seen.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// Expiry; `None`: until removed.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// Blocked by hand.
    pub manual: bool,
    /// Servers and agents that reported it.
    pub reported_by: Vec<String>,
    /// The revision of its last change.
    pub revision: i64,
}

/// The columns [`Attacker::from_row`] reads.
pub const COLUMNS: &str = "id, group_id, net, action, reason, rule, service, evidence_count, \
                           first_seen, last_seen, expires_at, manual, reported_by, revision";

impl Attacker {
    /// Reads [`COLUMNS`] from a row.
    pub fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            group_id: row.try_get("group_id")?,
            net: row.try_get("net")?,
            action: row.try_get("action")?,
            reason: row.try_get("reason")?,
            rule: row.try_get("rule")?,
            service: row.try_get("service")?,
            evidence_count: row.try_get("evidence_count")?,
            first_seen: row.try_get("first_seen")?,
            last_seen: row.try_get("last_seen")?,
            expires_at: row.try_get("expires_at")?,
            manual: row.try_get("manual")?,
            reported_by: row.try_get("reported_by")?,
            revision: row.try_get("revision")?,
        })
    }
}

/// A manual block.
#[derive(Debug, Clone)]
pub struct ManualBlock<'a> {
    /// Group, or every group.
    pub group_id: Option<i64>,
    /// The network (canonical).
    pub net: IpNet,
    /// The action.
    pub action: &'a str,
    /// Why.
    pub reason: &'a str,
    /// Expiry.
    pub expires_at: Option<OffsetDateTime>,
    /// The user.
    pub created_by: Option<i64>,
    /// The revision this change takes.
    pub revision: i64,
}

/// Inserts a manual block, or updates the entry for the same group and network.
pub async fn upsert_manual(
    ex: impl PgExecutor<'_>,
    block: &ManualBlock<'_>,
) -> Result<Attacker, sqlx::Error> {
    let row = sqlx::query(&format!(
        "INSERT INTO attackers (group_id, net, action, reason, expires_at, manual, created_by, \
         revision) VALUES ($1, $2::cidr, $3, $4, $5, true, $6, $7) \
         ON CONFLICT (group_id, net) DO UPDATE SET action = EXCLUDED.action, \
         reason = EXCLUDED.reason, expires_at = EXCLUDED.expires_at, manual = true, \
         last_seen = now(), revision = EXCLUDED.revision \
         RETURNING {COLUMNS}"
    ))
    .bind(block.group_id)
    .bind(block.net)
    .bind(block.action)
    .bind(block.reason)
    .bind(block.expires_at)
    .bind(block.created_by)
    .bind(block.revision)
    .fetch_one(ex)
    .await?;
    Attacker::from_row(&row)
}

/// Deletes an entry and returns it.
pub async fn delete(ex: impl PgExecutor<'_>, id: i64) -> Result<Option<Attacker>, sqlx::Error> {
    sqlx::query(&format!(
        "DELETE FROM attackers WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .fetch_optional(ex)
    .await?
    .as_ref()
    .map(Attacker::from_row)
    .transpose()
}

/// Locks an entry for a change.
pub async fn lock(ex: impl PgExecutor<'_>, id: i64) -> Result<Option<Attacker>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM attackers WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(ex)
    .await?
    .as_ref()
    .map(Attacker::from_row)
    .transpose()
}

/// A page of entries, newest id first: those overlapping `net` (containing it or inside it) if
/// given, below id `before` if given.
pub async fn search(
    ex: impl PgExecutor<'_>,
    net: Option<IpNet>,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<Attacker>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM attackers \
         WHERE ($1::cidr IS NULL OR net && $1::cidr) AND ($2::bigint IS NULL OR id < $2) \
         ORDER BY id DESC LIMIT $3"
    ))
    .bind(net)
    .bind(before)
    .bind(limit)
    .fetch_all(ex)
    .await?
    .iter()
    .map(Attacker::from_row)
    .collect()
}

/// Up to `limit` expired entries, locked (skipping rows another sweeper holds), found through
/// the `attackers_expires_at` index: no full scan.
pub async fn lock_expired(
    ex: impl PgExecutor<'_>,
    limit: i64,
) -> Result<Vec<Attacker>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM attackers WHERE expires_at IS NOT NULL AND expires_at <= now() \
         ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED"
    ))
    .bind(limit)
    .fetch_all(ex)
    .await?
    .iter()
    .map(Attacker::from_row)
    .collect()
}

/// The live entries of a group (and of every group) as `(net, action, expires_at, group_id)`,
/// in id order: only what a snapshot carries, so a million-entry snapshot reads and decodes four
/// columns instead of fourteen.
pub async fn live_entries_for_group(
    ex: impl PgExecutor<'_>,
    group_id: i64,
) -> Result<Vec<(IpNet, String, Option<OffsetDateTime>, Option<i64>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT net, action, expires_at, group_id FROM attackers \
         WHERE (group_id IS NULL OR group_id = $1) \
         AND (expires_at IS NULL OR expires_at > now()) ORDER BY id",
    )
    .bind(group_id)
    .fetch_all(ex)
    .await
}
