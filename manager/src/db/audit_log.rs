//! The `audit_log` table: who changed what, when.

use std::net::IpAddr;

use serde::Serialize;
use sqlx::{PgExecutor, Row as _};
use time::OffsetDateTime;

/// Who did something.
#[derive(Debug, Clone)]
pub struct Actor {
    /// The user, if a user did it.
    pub user_id: Option<i64>,
    /// Name recorded: the username, or `system`, `cli`...
    pub name: String,
    /// Client address, for requests.
    pub ip: Option<IpAddr>,
}

impl Actor {
    /// The manager itself (start-up tasks).
    pub fn system() -> Self {
        Self {
            user_id: None,
            name: "system".to_owned(),
            ip: None,
        }
    }

    /// The command line (`mirage-manager create-admin`).
    pub fn cli() -> Self {
        Self {
            user_id: None,
            name: "cli".to_owned(),
            ip: None,
        }
    }
}

/// One audit row.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Row id.
    pub id: i64,
    /// The acting user's id (`None` for system actions or once the user is deleted).
    pub actor_user_id: Option<i64>,
    /// The actor's name at the time.
    pub actor: String,
    /// What was done: `login`, `logout`, `user.create`, `user.update`, `user.delete`...
    pub action: String,
    /// On what: `user:alice`...
    pub target: Option<String>,
    /// Details (never secrets).
    pub details: serde_json::Value,
    /// Client address.
    pub ip: Option<IpAddr>,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// Appends a row. Call it in the same transaction as the change it records.
pub async fn record(
    ex: impl PgExecutor<'_>,
    actor: &Actor,
    action: &str,
    target: Option<&str>,
    details: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_log (actor_user_id, actor, action, target, details, ip) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(actor.user_id)
    .bind(&actor.name)
    .bind(action)
    .bind(target)
    .bind(details)
    .bind(actor.ip)
    .execute(ex)
    .await
    .map(drop)
}

/// The newest rows, newest first, below id `before` if given.
pub async fn list(
    ex: impl PgExecutor<'_>,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<Entry>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, actor_user_id, actor, action, target, details, ip, at FROM audit_log \
         WHERE ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $1",
    )
    .bind(limit)
    .bind(before)
    .fetch_all(ex)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Entry {
                id: row.try_get("id")?,
                actor_user_id: row.try_get("actor_user_id")?,
                actor: row.try_get("actor")?,
                action: row.try_get("action")?,
                target: row.try_get("target")?,
                details: row.try_get("details")?,
                ip: row.try_get("ip")?,
                at: row.try_get("at")?,
            })
        })
        .collect()
}
