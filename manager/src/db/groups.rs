//! The `agent_groups` table, as the policy editor sees it: groups with their agent counts, and
//! what keeps a group from being deleted.

use serde::Serialize;
use sqlx::{PgExecutor, Row as _, postgres::PgRow};
use time::OffsetDateTime;

/// The group every agent enrolled without one joins; it cannot be deleted.
pub const DEFAULT_GROUP: &str = "default";

/// A group with its agent counts.
#[derive(Debug, Clone, Serialize)]
pub struct Group {
    /// Row id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Enrolled agents that are not revoked.
    pub agents: i64,
    /// Revoked agents still recorded in the group.
    pub revoked_agents: i64,
}

const SELECT: &str = "SELECT g.id, g.name, g.description, g.created_at, \
     (SELECT count(*) FROM agents a WHERE a.group_id = g.id AND a.revoked_at IS NULL) AS agents, \
     (SELECT count(*) FROM agents a WHERE a.group_id = g.id AND a.revoked_at IS NOT NULL) \
       AS revoked_agents \
     FROM agent_groups g";

impl Group {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            description: row.try_get("description")?,
            created_at: row.try_get("created_at")?,
            agents: row.try_get("agents")?,
            revoked_agents: row.try_get("revoked_agents")?,
        })
    }
}

/// Every group, by name.
pub async fn list(ex: impl PgExecutor<'_>) -> Result<Vec<Group>, sqlx::Error> {
    sqlx::query(&format!("{SELECT} ORDER BY g.name"))
        .fetch_all(ex)
        .await?
        .iter()
        .map(Group::from_row)
        .collect()
}

/// One group by name.
pub async fn get(ex: impl PgExecutor<'_>, name: &str) -> Result<Option<Group>, sqlx::Error> {
    sqlx::query(&format!("{SELECT} WHERE g.name = $1"))
        .bind(name)
        .fetch_optional(ex)
        .await?
        .as_ref()
        .map(Group::from_row)
        .transpose()
}

/// Creates a group and its policy (the schema's defaults: `unreal`, `preserve-source`, nothing
/// allowlisted, no sandbox target yet). A taken name is a unique violation.
pub async fn insert(
    conn: &mut sqlx::PgConnection,
    name: &str,
    description: &str,
) -> Result<i64, sqlx::Error> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO agent_groups (name, description) VALUES ($1, $2) RETURNING id",
    )
    .bind(name)
    .bind(description)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query("INSERT INTO policies (group_id) VALUES ($1)")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(id)
}

/// Locks a group row (against a concurrent enrollment or token creation) and returns its id.
pub async fn lock(ex: impl PgExecutor<'_>, name: &str) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM agent_groups WHERE name = $1 FOR UPDATE")
        .bind(name)
        .fetch_optional(ex)
        .await
}

/// What still uses a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Agents that are not revoked.
    pub agents: i64,
    /// Unused, unexpired enrollment tokens.
    pub tokens: i64,
}

/// What uses group `id`.
pub async fn usage(ex: impl PgExecutor<'_>, id: i64) -> Result<Usage, sqlx::Error> {
    let (agents, tokens): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM agents WHERE group_id = $1 AND revoked_at IS NULL), \
                (SELECT count(*) FROM enrollment_tokens \
                 WHERE group_id = $1 AND used_at IS NULL AND expires_at > now())",
    )
    .bind(id)
    .fetch_one(ex)
    .await?;
    Ok(Usage { agents, tokens })
}

/// Moves group `from`'s revoked agents to group `to` (their records outlive the group); returns
/// how many.
pub async fn move_revoked_agents(
    ex: impl PgExecutor<'_>,
    from: i64,
    to: i64,
) -> Result<u64, sqlx::Error> {
    sqlx::query("UPDATE agents SET group_id = $2 WHERE group_id = $1 AND revoked_at IS NOT NULL")
        .bind(from)
        .bind(to)
        .execute(ex)
        .await
        .map(|r| r.rows_affected())
}

/// Deletes a group; its policy, its attacker entries, its policy revisions and its used or
/// expired enrollment tokens go with it (foreign keys cascade). Returns how many attacker entries
/// were removed.
pub async fn delete(conn: &mut sqlx::PgConnection, id: i64) -> Result<u64, sqlx::Error> {
    let attackers = sqlx::query("DELETE FROM attackers WHERE group_id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    sqlx::query("DELETE FROM agent_groups WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(attackers)
}

/// When a group's policy last changed and by whom (the username, if the user still exists).
pub async fn policy_meta(
    ex: impl PgExecutor<'_>,
    group_id: i64,
) -> Result<Option<(OffsetDateTime, Option<String>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT p.updated_at, u.username FROM policies p LEFT JOIN users u ON u.id = p.updated_by \
         WHERE p.group_id = $1",
    )
    .bind(group_id)
    .fetch_optional(ex)
    .await
}
