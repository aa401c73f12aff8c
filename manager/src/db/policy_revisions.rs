//! `policy_head` and `policy_revisions`: the gapless, ordered change log agents resume from.
//!
//! Every change to what agents enforce runs, in one transaction: [`next`] (locks the head row and
//! takes the next revision), the change itself, [`insert`], and [`notify`]. The lock serializes
//! writers until commit, so revisions commit in order and without gaps; `pg_notify` inside the
//! transaction is delivered only at commit, so a woken stream always finds the row.

use ipnet::IpNet;
use serde::Serialize;
use sqlx::{PgExecutor, Row as _, postgres::PgRow};
use time::OffsetDateTime;

/// The LISTEN/NOTIFY channel; the payload is the revision, or `revoke:<agent id>`.
pub const CHANNEL: &str = "mirage_policy";

/// One change, as agents receive it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Revision {
    /// Its revision number.
    pub revision: i64,
    /// The group it concerns; `None`: every group.
    pub group_id: Option<i64>,
    /// `add`, `remove`, `update` (an attacker entry) or `policy` (the group's policy row).
    pub op: String,
    /// The attacker's network (absent for `policy`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub net: Option<IpNet>,
    /// The attacker's action.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The attacker's expiry.
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
    /// More: for `policy`, the new policy.
    pub details: serde_json::Value,
}

/// The columns [`Revision::from_row`] reads.
const COLUMNS: &str = "revision, group_id, op, net, action, expires_at, details";

impl Revision {
    /// Reads [`COLUMNS`] from a row.
    pub fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            revision: row.try_get("revision")?,
            group_id: row.try_get("group_id")?,
            op: row.try_get("op")?,
            net: row.try_get("net")?,
            action: row.try_get("action")?,
            expires_at: row.try_get("expires_at")?,
            details: row.try_get("details")?,
        })
    }
}

/// Locks the head and takes the next revision. Call it first in the writing transaction.
pub async fn next(ex: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("UPDATE policy_head SET revision = revision + 1 RETURNING revision")
        .fetch_one(ex)
        .await
}

/// The current revision.
pub async fn head(ex: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT revision FROM policy_head")
        .fetch_one(ex)
        .await
}

/// The oldest revision still in the log, if any.
pub async fn oldest(ex: impl PgExecutor<'_>) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT min(revision) FROM policy_revisions")
        .fetch_one(ex)
        .await
}

/// Writes a revision row.
pub async fn insert(ex: impl PgExecutor<'_>, rev: &Revision) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO policy_revisions (revision, group_id, op, net, action, expires_at, details) \
         VALUES ($1, $2, $3, $4::cidr, $5, $6, $7)",
    )
    .bind(rev.revision)
    .bind(rev.group_id)
    .bind(&rev.op)
    .bind(rev.net)
    .bind(&rev.action)
    .bind(rev.expires_at)
    .bind(&rev.details)
    .execute(ex)
    .await
    .map(drop)
}

/// Queues `NOTIFY mirage_policy, '<revision>'`, sent when the transaction commits.
pub async fn notify(ex: impl PgExecutor<'_>, revision: i64) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(revision.to_string())
        .execute(ex)
        .await
        .map(drop)
}

/// Queues `NOTIFY mirage_policy, 'revoke:<agent id>'`: the agent's open streams end.
pub async fn notify_revoked(ex: impl PgExecutor<'_>, agent_id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(format!("revoke:{agent_id}"))
        .execute(ex)
        .await
        .map(drop)
}

/// Revisions after `since` for an agent of `group_id` (its group's and every group's), in
/// order, at most `limit`.
pub async fn after(
    ex: impl PgExecutor<'_>,
    since: i64,
    group_id: i64,
    limit: i64,
) -> Result<Vec<Revision>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM policy_revisions \
         WHERE revision > $1 AND (group_id IS NULL OR group_id = $2) \
         ORDER BY revision LIMIT $3"
    ))
    .bind(since)
    .bind(group_id)
    .bind(limit)
    .fetch_all(ex)
    .await?
    .iter()
    .map(Revision::from_row)
    .collect()
}
