//! The `users` table.

use serde::Serialize;
use sqlx::{PgExecutor, Row as _, postgres::PgRow};
use time::OffsetDateTime;

use crate::auth::Role;

/// A user, without the password hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    /// Row id.
    pub id: i64,
    /// Lower-case login name.
    pub username: String,
    /// What the user may do.
    pub role: Role,
    /// A disabled user cannot log in and its sessions stop working.
    pub disabled: bool,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// The columns [`User::from_row`] reads, for `SELECT`s and `RETURNING`s.
pub const COLUMNS: &str = "id, username, role, disabled, created_at, updated_at";

impl User {
    /// Reads [`COLUMNS`] from a row (prefixed columns too: `u.id` is read as `id`).
    pub fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        let role: String = row.try_get("role")?;
        Ok(Self {
            id: row.try_get("id")?,
            username: row.try_get("username")?,
            role: role.parse().map_err(|e| sqlx::Error::ColumnDecode {
                index: "role".to_owned(),
                source: Box::new(e),
            })?,
            disabled: row.try_get("disabled")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

/// Every user, by name.
pub async fn list(ex: impl PgExecutor<'_>) -> Result<Vec<User>, sqlx::Error> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM users ORDER BY username"))
        .fetch_all(ex)
        .await?
        .iter()
        .map(User::from_row)
        .collect()
}

/// One user.
pub async fn get(ex: impl PgExecutor<'_>, id: i64) -> Result<Option<User>, sqlx::Error> {
    sqlx::query(&format!("SELECT {COLUMNS} FROM users WHERE id = $1"))
        .bind(id)
        .fetch_optional(ex)
        .await?
        .as_ref()
        .map(User::from_row)
        .transpose()
}

/// A user and its password hash, by name.
pub async fn find_with_hash(
    ex: impl PgExecutor<'_>,
    username: &str,
) -> Result<Option<(User, String)>, sqlx::Error> {
    let Some(row) = sqlx::query(&format!(
        "SELECT {COLUMNS}, password_hash FROM users WHERE username = $1"
    ))
    .bind(username)
    .fetch_optional(ex)
    .await?
    else {
        return Ok(None);
    };
    Ok(Some((User::from_row(&row)?, row.try_get("password_hash")?)))
}

/// Inserts a user; a taken username is a unique violation (see [`is_unique_violation`]).
pub async fn insert(
    ex: impl PgExecutor<'_>,
    username: &str,
    password_hash: &str,
    role: Role,
) -> Result<User, sqlx::Error> {
    let row = sqlx::query(&format!(
        "INSERT INTO users (username, password_hash, role) VALUES ($1, $2, $3) RETURNING {COLUMNS}"
    ))
    .bind(username)
    .bind(password_hash)
    .bind(role.as_str())
    .fetch_one(ex)
    .await?;
    User::from_row(&row)
}

/// Inserts the first admin if the table is empty; `None` if there was a user already (or
/// another replica won the race).
pub async fn insert_first_admin(
    ex: impl PgExecutor<'_>,
    username: &str,
    password_hash: &str,
) -> Result<Option<User>, sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO users (username, password_hash, role) \
         SELECT $1, $2, 'admin' WHERE NOT EXISTS (SELECT 1 FROM users) \
         ON CONFLICT (username) DO NOTHING RETURNING {COLUMNS}"
    ))
    .bind(username)
    .bind(password_hash)
    .fetch_optional(ex)
    .await?
    .as_ref()
    .map(User::from_row)
    .transpose()
}

/// The changes [`update`] applies; `None` leaves a column as it is.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// New role.
    pub role: Option<Role>,
    /// New disabled flag.
    pub disabled: Option<bool>,
    /// New password hash.
    pub password_hash: Option<String>,
}

/// Applies `changes` to user `id`; `None` if there is no such user.
pub async fn update(
    ex: impl PgExecutor<'_>,
    id: i64,
    changes: &Changes,
) -> Result<Option<User>, sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE users SET role = coalesce($2, role), disabled = coalesce($3, disabled), \
         password_hash = coalesce($4, password_hash), updated_at = now() \
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(changes.role.map(Role::as_str))
    .bind(changes.disabled)
    .bind(changes.password_hash.as_deref())
    .fetch_optional(ex)
    .await?
    .as_ref()
    .map(User::from_row)
    .transpose()
}

/// Deletes user `id` (its sessions go with it); whether it existed.
pub async fn delete(ex: impl PgExecutor<'_>, id: i64) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM users WHERE id = $1")
        .bind(id)
        .execute(ex)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Ids of the enabled admins, row-locked until the transaction ends: two concurrent requests
/// that each remove a different admin are serialized here, so the second sees the first's effect
/// and the last admin always stays.
pub async fn lock_enabled_admins(ex: impl PgExecutor<'_>) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM users WHERE role = 'admin' AND NOT disabled FOR UPDATE")
        .fetch_all(ex)
        .await
}

/// Number of users.
pub async fn count(ex: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(ex)
        .await
}

/// Whether `err` is a unique-constraint violation (SQLSTATE 23505).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "23505")
}
