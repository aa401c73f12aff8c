//! The `agents`, `agent_groups` and `enrollment_tokens` tables.

use std::net::IpAddr;

use serde::Serialize;
use sqlx::{PgExecutor, Row as _, postgres::PgRow};
use time::OffsetDateTime;

/// An enrolled agent, without its credential hash.
#[derive(Debug, Clone, Serialize)]
pub struct Agent {
    /// Row id.
    pub id: i64,
    /// Its group.
    pub group_id: i64,
    /// Unique name (the hostname, suffixed when taken).
    pub name: String,
    /// Hostname as reported at enrollment.
    pub hostname: String,
    /// Addresses as reported at enrollment.
    pub addresses: Vec<IpAddr>,
    /// Effective mode as reported by the agent.
    pub mode: Option<String>,
    /// Agent version.
    pub version: Option<String>,
    /// Enrollment time.
    #[serde(with = "time::serde::rfc3339")]
    pub enrolled_at: OffsetDateTime,
    /// Revocation time; a revoked agent's credential no longer works.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// Last authenticated call.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_heartbeat: Option<OffsetDateTime>,
    /// The last policy revision the agent reported applied.
    pub applied_revision: Option<i64>,
    /// When the agent last reported its counters.
    #[serde(with = "time::serde::rfc3339::option")]
    pub counters_at: Option<OffsetDateTime>,
}

/// The columns [`Agent::from_row`] reads (not the counters report: every authenticated agent
/// call reads an agent, and only the agents page needs the report).
pub const COLUMNS: &str = "id, group_id, name, hostname, addresses, mode, version, enrolled_at, \
                           revoked_at, last_heartbeat, applied_revision, counters_at";

impl Agent {
    /// Reads [`COLUMNS`] from a row.
    pub fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            group_id: row.try_get("group_id")?,
            name: row.try_get("name")?,
            hostname: row.try_get("hostname")?,
            addresses: row.try_get("addresses")?,
            mode: row.try_get("mode")?,
            version: row.try_get("version")?,
            enrolled_at: row.try_get("enrolled_at")?,
            revoked_at: row.try_get("revoked_at")?,
            last_heartbeat: row.try_get("last_heartbeat")?,
            applied_revision: row.try_get("applied_revision")?,
            counters_at: row.try_get("counters_at")?,
        })
    }
}

/// A group's id by name.
pub async fn group_id(ex: impl PgExecutor<'_>, name: &str) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM agent_groups WHERE name = $1")
        .bind(name)
        .fetch_optional(ex)
        .await
}

/// Stores a new enrollment token (its hash) for `group_id`, valid until `expires_at`.
pub async fn insert_enrollment_token(
    ex: impl PgExecutor<'_>,
    token_hash: &[u8],
    group_id: i64,
    created_by: Option<i64>,
    expires_at: OffsetDateTime,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO enrollment_tokens (token_hash, group_id, created_by, expires_at) \
         VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(token_hash)
    .bind(group_id)
    .bind(created_by)
    .bind(expires_at)
    .fetch_one(ex)
    .await
}

/// Marks a live (unused, unexpired) token used and returns `(token id, group id)`; `None` for an
/// unknown, used or expired token. One `UPDATE ... WHERE used_at IS NULL`: two concurrent
/// enrollments with one token cannot both succeed.
pub async fn consume_enrollment_token(
    ex: impl PgExecutor<'_>,
    token_hash: &[u8],
) -> Result<Option<(i64, i64)>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE enrollment_tokens SET used_at = now() \
         WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now() \
         RETURNING id, group_id",
    )
    .bind(token_hash)
    .fetch_optional(ex)
    .await
}

/// Deletes unused tokens that expired more than a day ago (through the partial index on
/// `expires_at`); used ones stay as the record of which token enrolled which agent.
pub async fn delete_stale_enrollment_tokens(ex: impl PgExecutor<'_>) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "DELETE FROM enrollment_tokens \
         WHERE used_at IS NULL AND expires_at < now() - interval '1 day'",
    )
    .execute(ex)
    .await
    .map(|r| r.rows_affected())
}

/// Records which agent a token enrolled.
pub async fn set_token_agent(
    ex: impl PgExecutor<'_>,
    token_id: i64,
    agent_id: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE enrollment_tokens SET used_by_agent = $2 WHERE id = $1")
        .bind(token_id)
        .bind(agent_id)
        .execute(ex)
        .await
        .map(drop)
}

/// What an agent reports at enrollment.
#[derive(Debug, Clone)]
pub struct NewAgent<'a> {
    /// Its group.
    pub group_id: i64,
    /// Unique name.
    pub name: &'a str,
    /// Hostname.
    pub hostname: &'a str,
    /// Addresses.
    pub addresses: &'a [IpAddr],
    /// Version.
    pub version: Option<&'a str>,
    /// SHA-256 of the credential.
    pub credential_hash: &'a [u8],
}

/// Inserts an agent.
pub async fn insert(ex: impl PgExecutor<'_>, new: &NewAgent<'_>) -> Result<Agent, sqlx::Error> {
    let row = sqlx::query(&format!(
        "INSERT INTO agents (group_id, name, hostname, addresses, version, credential_hash) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLUMNS}"
    ))
    .bind(new.group_id)
    .bind(new.name)
    .bind(new.hostname)
    .bind(new.addresses)
    .bind(new.version)
    .bind(new.credential_hash)
    .fetch_one(ex)
    .await?;
    Agent::from_row(&row)
}

/// Whether an agent has this name.
pub async fn name_taken(ex: impl PgExecutor<'_>, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM agents WHERE name = $1)")
        .bind(name)
        .fetch_one(ex)
        .await
}

/// Every agent with its last counters report (`{}` before the first), by name.
pub async fn list_with_counters(
    ex: impl PgExecutor<'_>,
) -> Result<Vec<(Agent, serde_json::Value)>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS}, counters FROM agents ORDER BY name"
    ))
    .fetch_all(ex)
    .await?
    .iter()
    .map(|row| Ok((Agent::from_row(row)?, row.try_get("counters")?)))
    .collect()
}

/// Revokes an agent (idempotent); `None` if there is no such agent.
pub async fn revoke(ex: impl PgExecutor<'_>, id: i64) -> Result<Option<Agent>, sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE agents SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 \
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .fetch_optional(ex)
    .await?
    .as_ref()
    .map(Agent::from_row)
    .transpose()
}

/// The live (not revoked) agent holding a credential, recording the call as a heartbeat.
pub async fn authenticate(
    ex: impl PgExecutor<'_>,
    credential_hash: &[u8],
) -> Result<Option<Agent>, sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE agents SET last_heartbeat = now() \
         WHERE credential_hash = $1 AND revoked_at IS NULL RETURNING {COLUMNS}"
    ))
    .bind(credential_hash)
    .fetch_optional(ex)
    .await?
    .as_ref()
    .map(Agent::from_row)
    .transpose()
}

/// Stores what a live agent reports; `None` if it is gone or revoked.
pub async fn report(
    ex: impl PgExecutor<'_>,
    id: i64,
    mode: Option<&str>,
    version: Option<&str>,
    applied_revision: Option<i64>,
    counters: Option<&serde_json::Value>,
) -> Result<Option<Agent>, sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE agents SET mode = coalesce($2, mode), version = coalesce($3, version), \
         applied_revision = coalesce($4, applied_revision), last_heartbeat = now(), \
         counters = coalesce($5, counters), \
         counters_at = CASE WHEN $5::jsonb IS NULL THEN counters_at ELSE now() END \
         WHERE id = $1 AND revoked_at IS NULL RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(mode)
    .bind(version)
    .bind(applied_revision)
    .bind(counters)
    .fetch_optional(ex)
    .await?
    .as_ref()
    .map(Agent::from_row)
    .transpose()
}

/// Whether an agent exists and is not revoked.
pub async fn is_live(ex: impl PgExecutor<'_>, id: i64) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM agents WHERE id = $1 AND revoked_at IS NULL)")
        .bind(id)
        .fetch_one(ex)
        .await
}
