//! The `alert_channels` table. `config` holds secrets as given (see
//! [`crate::alerts::channel`]); rows leave this module unredacted, and the API redacts them.

use sqlx::{PgExecutor, Row as _, postgres::PgRow};
use time::OffsetDateTime;

/// One channel, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertChannel {
    /// Row id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// `email`, `webhook` or `slack`.
    pub kind: String,
    /// Kind-specific configuration, secrets included.
    pub config: serde_json::Value,
    /// Detections below this severity are not sent.
    pub min_severity: String,
    /// Whether the channel sends anything.
    pub enabled: bool,
    /// Repeats of one (rule, address) within this many seconds fold into the first alert.
    pub dedup_window_secs: i32,
    /// Messages per rolling hour; beyond it, a digest.
    pub max_per_hour: i32,
    /// Creation time.
    pub created_at: OffsetDateTime,
    /// Last change.
    pub updated_at: OffsetDateTime,
}

const COLUMNS: &str = "id, name, kind, config, min_severity, enabled, dedup_window_secs, \
                       max_per_hour, created_at, updated_at";

impl AlertChannel {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            kind: row.try_get("kind")?,
            config: row.try_get("config")?,
            min_severity: row.try_get("min_severity")?,
            enabled: row.try_get("enabled")?,
            dedup_window_secs: row.try_get("dedup_window_secs")?,
            max_per_hour: row.try_get("max_per_hour")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

/// A channel's settable fields.
#[derive(Debug, Clone)]
pub struct ChannelFields<'a> {
    /// Name.
    pub name: &'a str,
    /// Kind.
    pub kind: &'a str,
    /// Configuration.
    pub config: &'a serde_json::Value,
    /// Minimum severity.
    pub min_severity: &'a str,
    /// Enabled.
    pub enabled: bool,
    /// De-duplication window.
    pub dedup_window_secs: i32,
    /// Hourly budget.
    pub max_per_hour: i32,
}

/// Every channel, by name.
pub async fn list(ex: impl PgExecutor<'_>) -> Result<Vec<AlertChannel>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM alert_channels ORDER BY name"
    ))
    .fetch_all(ex)
    .await?
    .iter()
    .map(AlertChannel::from_row)
    .collect()
}

/// Enabled channels, by id.
pub async fn enabled(ex: impl PgExecutor<'_>) -> Result<Vec<AlertChannel>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM alert_channels WHERE enabled ORDER BY id"
    ))
    .fetch_all(ex)
    .await?
    .iter()
    .map(AlertChannel::from_row)
    .collect()
}

/// One channel.
pub async fn get(ex: impl PgExecutor<'_>, id: i64) -> Result<Option<AlertChannel>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM alert_channels WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(ex)
    .await?
    .as_ref()
    .map(AlertChannel::from_row)
    .transpose()
}

/// One channel, locked for a change.
pub async fn lock(ex: impl PgExecutor<'_>, id: i64) -> Result<Option<AlertChannel>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM alert_channels WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(ex)
    .await?
    .as_ref()
    .map(AlertChannel::from_row)
    .transpose()
}

/// Inserts a channel; a taken name is a unique violation.
pub async fn insert(
    ex: impl PgExecutor<'_>,
    f: &ChannelFields<'_>,
) -> Result<AlertChannel, sqlx::Error> {
    let row = sqlx::query(&format!(
        "INSERT INTO alert_channels (name, kind, config, min_severity, enabled, \
         dedup_window_secs, max_per_hour) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COLUMNS}"
    ))
    .bind(f.name)
    .bind(f.kind)
    .bind(f.config)
    .bind(f.min_severity)
    .bind(f.enabled)
    .bind(f.dedup_window_secs)
    .bind(f.max_per_hour)
    .fetch_one(ex)
    .await?;
    AlertChannel::from_row(&row)
}

/// Replaces a channel's fields; a taken name is a unique violation.
pub async fn update(
    ex: impl PgExecutor<'_>,
    id: i64,
    f: &ChannelFields<'_>,
) -> Result<AlertChannel, sqlx::Error> {
    let row = sqlx::query(&format!(
        "UPDATE alert_channels SET name = $2, kind = $3, config = $4, min_severity = $5, \
         enabled = $6, dedup_window_secs = $7, max_per_hour = $8, updated_at = now() \
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(f.name)
    .bind(f.kind)
    .bind(f.config)
    .bind(f.min_severity)
    .bind(f.enabled)
    .bind(f.dedup_window_secs)
    .bind(f.max_per_hour)
    .fetch_one(ex)
    .await?;
    AlertChannel::from_row(&row)
}

/// Deletes a channel (its deliveries go with it); `None` if there was none.
pub async fn delete(ex: impl PgExecutor<'_>, id: i64) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("DELETE FROM alert_channels WHERE id = $1 RETURNING name")
        .bind(id)
        .fetch_optional(ex)
        .await
}
