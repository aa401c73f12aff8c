//! The `sessions` table. Only the SHA-256 of a session token is stored.

use std::{net::IpAddr, time::Duration};

use sqlx::{PgExecutor, Row as _};
use time::OffsetDateTime;

use super::users::User;

/// A live session joined to its (enabled) user.
#[derive(Debug, Clone)]
pub struct LiveSession {
    /// Row id.
    pub id: i64,
    /// The user.
    pub user: User,
    /// The session's CSRF token.
    pub csrf_token: String,
    /// When it ends.
    pub expires_at: OffsetDateTime,
}

/// A new session row.
#[derive(Debug)]
pub struct NewSession<'a> {
    /// SHA-256 of the cookie token.
    pub token_hash: &'a [u8],
    /// Its user.
    pub user_id: i64,
    /// Its CSRF token.
    pub csrf_token: &'a str,
    /// Lifetime from now.
    pub ttl: Duration,
    /// Client address.
    pub ip: Option<IpAddr>,
    /// Client `User-Agent`.
    pub user_agent: Option<&'a str>,
}

/// Inserts a session; returns its id and expiry.
pub async fn create(
    ex: impl PgExecutor<'_>,
    new: &NewSession<'_>,
) -> Result<(i64, OffsetDateTime), sqlx::Error> {
    let row = sqlx::query(
        "INSERT INTO sessions (token_hash, user_id, csrf_token, expires_at, ip, user_agent) \
         VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5, $6) \
         RETURNING id, expires_at",
    )
    .bind(new.token_hash)
    .bind(new.user_id)
    .bind(new.csrf_token)
    .bind(new.ttl.as_secs_f64())
    .bind(new.ip)
    .bind(new.user_agent)
    .fetch_one(ex)
    .await?;
    Ok((row.try_get("id")?, row.try_get("expires_at")?))
}

/// The unexpired session with this token hash, if its user is enabled.
pub async fn find_live(
    ex: impl PgExecutor<'_>,
    token_hash: &[u8],
) -> Result<Option<LiveSession>, sqlx::Error> {
    let Some(row) = sqlx::query(
        "SELECT s.id AS session_id, s.csrf_token, s.expires_at, \
                u.id, u.username, u.role, u.disabled, u.created_at, u.updated_at \
         FROM sessions s JOIN users u ON u.id = s.user_id \
         WHERE s.token_hash = $1 AND s.expires_at > now() AND NOT u.disabled",
    )
    .bind(token_hash)
    .fetch_optional(ex)
    .await?
    else {
        return Ok(None);
    };
    Ok(Some(LiveSession {
        id: row.try_get("session_id")?,
        user: User::from_row(&row)?,
        csrf_token: row.try_get("csrf_token")?,
        expires_at: row.try_get("expires_at")?,
    }))
}

/// Ends one session.
pub async fn delete(ex: impl PgExecutor<'_>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM sessions WHERE id = $1")
        .bind(id)
        .execute(ex)
        .await
        .map(drop)
}

/// Ends every session of a user (password change, disabling); how many there were.
pub async fn delete_for_user(ex: impl PgExecutor<'_>, user_id: i64) -> Result<u64, sqlx::Error> {
    sqlx::query("DELETE FROM sessions WHERE user_id = $1")
        .bind(user_id)
        .execute(ex)
        .await
        .map(|r| r.rows_affected())
}

/// Deletes expired sessions (through the `expires_at` index); how many.
pub async fn delete_expired(ex: impl PgExecutor<'_>) -> Result<u64, sqlx::Error> {
    sqlx::query("DELETE FROM sessions WHERE expires_at <= now()")
        .execute(ex)
        .await
        .map(|r| r.rows_affected())
}
