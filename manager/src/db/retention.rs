//! Retention: the `retention` row of `settings` (days to keep each kind of record) and the
//! bounded deletes the sweep ([`crate::evidence::retention`]) runs with it.
//!
//! Every delete removes at most `limit` rows per statement, picked through the table's time index
//! with `FOR UPDATE SKIP LOCKED`: no statement locks or rewrites a whole table, and two replicas
//! sweeping at once skip each other's rows instead of waiting on them.

use serde::{Deserialize, Serialize};
use sqlx::{PgExecutor, types::Json};

/// The `settings` key.
pub const KEY: &str = "retention";

/// Days to keep each kind of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Retention {
    /// Detections (by their time).
    pub detections_days: i64,
    /// Sandbox sessions (by their start).
    pub sandbox_sessions_days: i64,
    /// Audit log rows.
    pub audit_log_days: i64,
    /// Login attempts.
    pub login_attempts_days: i64,
    /// Policy revisions (agents further behind get a snapshot instead of deltas).
    pub policy_revisions_days: i64,
}

impl Default for Retention {
    /// The values the first migration seeds.
    fn default() -> Self {
        Self {
            detections_days: 90,
            sandbox_sessions_days: 90,
            audit_log_days: 365,
            login_attempts_days: 30,
            policy_revisions_days: 30,
        }
    }
}

/// The current setting (the defaults if the row is missing; missing keys take their default).
pub async fn get(ex: impl PgExecutor<'_>) -> Result<Retention, sqlx::Error> {
    let value: Option<Json<Retention>> =
        sqlx::query_scalar("SELECT value FROM settings WHERE key = $1")
            .bind(KEY)
            .fetch_optional(ex)
            .await?;
    Ok(value.map(|v| v.0).unwrap_or_default())
}

/// Stores the setting, locking the row first; returns the previous one.
pub async fn set(
    conn: &mut sqlx::PgConnection,
    retention: &Retention,
    user_id: Option<i64>,
) -> Result<Retention, sqlx::Error> {
    let before: Option<Json<Retention>> =
        sqlx::query_scalar("SELECT value FROM settings WHERE key = $1 FOR UPDATE")
            .bind(KEY)
            .fetch_optional(&mut *conn)
            .await?;
    sqlx::query(
        "INSERT INTO settings (key, value, updated_by) VALUES ($1, $2, $3) \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now(), \
         updated_by = EXCLUDED.updated_by",
    )
    .bind(KEY)
    .bind(Json(retention))
    .bind(user_id)
    .execute(&mut *conn)
    .await?;
    Ok(before.map(|v| v.0).unwrap_or_default())
}

/// A table the sweep prunes by age.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `detections`, by `at`.
    Detections,
    /// `sandbox_sessions`, by `started_at`.
    SandboxSessions,
    /// `audit_log`, by `at`.
    AuditLog,
    /// `login_attempts`, by `at`.
    LoginAttempts,
}

impl Table {
    /// Every table [`delete_older`] handles.
    pub const ALL: [Self; 4] = [
        Self::Detections,
        Self::SandboxSessions,
        Self::AuditLog,
        Self::LoginAttempts,
    ];

    /// The table's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Detections => "detections",
            Self::SandboxSessions => "sandbox_sessions",
            Self::AuditLog => "audit_log",
            Self::LoginAttempts => "login_attempts",
        }
    }

    /// Its indexed time column.
    fn time_column(self) -> &'static str {
        match self {
            Self::SandboxSessions => "started_at",
            _ => "at",
        }
    }

    /// Its days in `retention`.
    pub fn days(self, retention: &Retention) -> i64 {
        match self {
            Self::Detections => retention.detections_days,
            Self::SandboxSessions => retention.sandbox_sessions_days,
            Self::AuditLog => retention.audit_log_days,
            Self::LoginAttempts => retention.login_attempts_days,
        }
    }
}

/// Deletes up to `limit` rows of `table` older than `days`; how many.
pub async fn delete_older(
    ex: impl PgExecutor<'_>,
    table: Table,
    days: i64,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    // Both names are constants of this module, never input.
    let (name, at) = (table.name(), table.time_column());
    sqlx::query(&format!(
        "DELETE FROM {name} WHERE id IN (SELECT id FROM {name} \
         WHERE {at} < now() - make_interval(days => $1::int) LIMIT $2 FOR UPDATE SKIP LOCKED)"
    ))
    .bind(days)
    .bind(limit)
    .execute(ex)
    .await
    .map(|r| r.rows_affected())
}

/// The first policy revision to keep: the oldest revision younger than `days`, or the head when
/// every row is older. [`delete_revisions_before`] deletes everything before it.
///
/// Only ever a prefix of the log goes, because [`crate::policy::load`] decides whether an agent
/// can resume from the *oldest* revision still held: a hole in the middle would hand an agent
/// deltas with a gap. Revision times are transaction start times, which need not ascend with the
/// revision, so the cut is "before the first revision young enough to keep", not "every old row";
/// and it is at most the head, so the head's row stays.
pub async fn revisions_keep_from(ex: impl PgExecutor<'_>, days: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT coalesce( \
             (SELECT revision FROM policy_revisions \
              WHERE at >= now() - make_interval(days => $1::int) ORDER BY revision LIMIT 1), \
             (SELECT revision FROM policy_head))",
    )
    .bind(days)
    .fetch_one(ex)
    .await
}

/// Deletes up to `limit` policy revisions below `keep_from`; how many.
pub async fn delete_revisions_before(
    ex: impl PgExecutor<'_>,
    keep_from: i64,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "DELETE FROM policy_revisions WHERE revision IN (SELECT revision FROM policy_revisions \
         WHERE revision < $1 ORDER BY revision LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(keep_from)
    .bind(limit)
    .execute(ex)
    .await
    .map(|r| r.rows_affected())
}
