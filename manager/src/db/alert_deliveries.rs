//! The `alert_deliveries` table: one row per alert message (sent, failed or waiting), per
//! digest, per suppressed repeat and per test message. The dispatcher's budget, de-duplication and
//! retry state all live here, so any replica can pick up where another stopped.

use serde::Serialize;
use sqlx::{PgExecutor, Row as _, postgres::PgRow};
use time::OffsetDateTime;

/// One delivery, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    /// Row id.
    pub id: i64,
    /// The channel.
    pub channel_id: i64,
    /// The channel's name.
    pub channel: String,
    /// `alert`, `digest` or `test`.
    pub kind: String,
    /// `rule|address` for alerts and suppressed repeats, `digest`, `test`.
    pub dedup_key: String,
    /// `pending`, `sent`, `failed` (retried while `next_attempt_at` is set) or `suppressed`.
    pub status: String,
    /// Detections this row covers.
    pub detection_count: i32,
    /// The first detection covered.
    pub first_detection: Option<i64>,
    /// The last detection covered.
    pub last_detection: Option<i64>,
    /// The stored message (an alert, or a digest's counts).
    pub payload: serde_json::Value,
    /// Send attempts so far.
    pub attempts: i32,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it took its place in the hourly budget (`None`: suppressed, test, or a digest still
    /// collecting).
    #[serde(with = "time::serde::rfc3339::option")]
    pub queued_at: Option<OffsetDateTime>,
    /// When it was sent.
    #[serde(with = "time::serde::rfc3339::option")]
    pub sent_at: Option<OffsetDateTime>,
    /// The next attempt (`None`: nothing left to do).
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
}

const COLUMNS: &str = "d.id, d.channel_id, c.name AS channel, d.kind, d.dedup_key, d.status, \
                       d.detection_count, d.first_detection, d.last_detection, d.payload, \
                       d.attempts, d.last_error, d.created_at, d.queued_at, d.sent_at, \
                       d.next_attempt_at";

impl Delivery {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            channel_id: row.try_get("channel_id")?,
            channel: row.try_get("channel")?,
            kind: row.try_get("kind")?,
            dedup_key: row.try_get("dedup_key")?,
            status: row.try_get("status")?,
            detection_count: row.try_get("detection_count")?,
            first_detection: row.try_get("first_detection")?,
            last_detection: row.try_get("last_detection")?,
            payload: row.try_get("payload")?,
            attempts: row.try_get("attempts")?,
            last_error: row.try_get("last_error")?,
            created_at: row.try_get("created_at")?,
            queued_at: row.try_get("queued_at")?,
            sent_at: row.try_get("sent_at")?,
            next_attempt_at: row.try_get("next_attempt_at")?,
        })
    }
}

/// A page of deliveries, newest first: of one channel if given, below id `before` if given.
pub async fn list(
    ex: impl PgExecutor<'_>,
    channel_id: Option<i64>,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<Delivery>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM alert_deliveries d JOIN alert_channels c ON c.id = d.channel_id \
         WHERE ($1::bigint IS NULL OR d.channel_id = $1) AND ($2::bigint IS NULL OR d.id < $2) \
         ORDER BY d.id DESC LIMIT $3"
    ))
    .bind(channel_id)
    .bind(before)
    .bind(limit)
    .fetch_all(ex)
    .await?
    .iter()
    .map(Delivery::from_row)
    .collect()
}

/// One delivery.
pub async fn get(ex: impl PgExecutor<'_>, id: i64) -> Result<Option<Delivery>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM alert_deliveries d JOIN alert_channels c ON c.id = d.channel_id \
         WHERE d.id = $1"
    ))
    .bind(id)
    .fetch_optional(ex)
    .await?
    .as_ref()
    .map(Delivery::from_row)
    .transpose()
}

/// A new row.
#[derive(Debug, Clone)]
pub struct NewDelivery<'a> {
    /// The channel.
    pub channel_id: i64,
    /// `alert`, `digest` or `test`.
    pub kind: &'a str,
    /// The de-duplication key.
    pub dedup_key: &'a str,
    /// `pending` or `suppressed`.
    pub status: &'a str,
    /// Detections covered.
    pub detection_count: i64,
    /// The first detection.
    pub first_detection: Option<i64>,
    /// The last detection.
    pub last_detection: Option<i64>,
    /// The stored message.
    pub payload: &'a serde_json::Value,
    /// Take a place in the hourly budget now, and be due now.
    pub queue: bool,
}

/// Inserts a row; returns its id.
pub async fn insert(ex: impl PgExecutor<'_>, new: &NewDelivery<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO alert_deliveries (channel_id, kind, dedup_key, status, detection_count, \
         first_detection, last_detection, payload, queued_at, next_attempt_at) \
         VALUES ($1, $2, $3, $4, $5, \
                 (SELECT id FROM detections WHERE id = $6), $7, $8, \
                 CASE WHEN $9 THEN now() END, CASE WHEN $9 THEN now() END) \
         RETURNING id",
    )
    .bind(new.channel_id)
    .bind(new.kind)
    .bind(new.dedup_key)
    .bind(new.status)
    .bind(i32::try_from(new.detection_count).unwrap_or(i32::MAX))
    .bind(new.first_detection)
    .bind(new.last_detection)
    .bind(new.payload)
    .bind(new.queue)
    .fetch_one(ex)
    .await
}

/// The channel's digest that is still collecting, locked: `(id, payload)`.
pub async fn collecting_digest(
    ex: impl PgExecutor<'_>,
    channel_id: i64,
) -> Result<Option<(i64, serde_json::Value)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, payload FROM alert_deliveries \
         WHERE channel_id = $1 AND kind = 'digest' AND queued_at IS NULL AND status = 'pending' \
         FOR UPDATE",
    )
    .bind(channel_id)
    .fetch_optional(ex)
    .await
}

/// Stores a collecting digest's new counts.
pub async fn update_digest(
    ex: impl PgExecutor<'_>,
    id: i64,
    payload: &serde_json::Value,
    detection_count: i64,
    last_detection: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE alert_deliveries SET payload = $2, detection_count = $3, last_detection = $4 \
         WHERE id = $1",
    )
    .bind(id)
    .bind(payload)
    .bind(i32::try_from(detection_count).unwrap_or(i32::MAX))
    .bind(last_detection)
    .execute(ex)
    .await
    .map(drop)
}

/// Digests that are collecting, of enabled channels, created at least `settle_secs` ago:
/// `(channel id, delivery id, the channel's max_per_hour)`.
pub async fn settled_digests(
    ex: impl PgExecutor<'_>,
    settle_secs: f64,
) -> Result<Vec<(i64, i64, i32)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT d.channel_id, d.id, c.max_per_hour FROM alert_deliveries d \
         JOIN alert_channels c ON c.id = d.channel_id AND c.enabled \
         WHERE d.kind = 'digest' AND d.queued_at IS NULL AND d.status = 'pending' \
           AND d.created_at <= now() - make_interval(secs => $1) \
         ORDER BY d.id",
    )
    .bind(settle_secs)
    .fetch_all(ex)
    .await
}

/// Closes a collecting digest: it takes its place in the budget and is due now.
pub async fn release_digest(ex: impl PgExecutor<'_>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE alert_deliveries SET queued_at = now(), next_attempt_at = now() \
         WHERE id = $1 AND queued_at IS NULL",
    )
    .bind(id)
    .execute(ex)
    .await
    .map(drop)
}

/// Messages of the channel that took a place in its budget within the last hour.
pub async fn budget_used(ex: impl PgExecutor<'_>, channel_id: i64) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM alert_deliveries \
         WHERE channel_id = $1 AND queued_at > now() - interval '1 hour'",
    )
    .bind(channel_id)
    .fetch_one(ex)
    .await
}

/// Which of `keys` the channel alerted on (a message, not a suppressed repeat) within the last
/// `window_secs` seconds.
pub async fn recent_keys(
    ex: impl PgExecutor<'_>,
    channel_id: i64,
    window_secs: i32,
    keys: &[String],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT dedup_key FROM alert_deliveries \
         WHERE channel_id = $1 AND kind = 'alert' AND status <> 'suppressed' \
           AND created_at > now() - make_interval(secs => $2) AND dedup_key = ANY($3)",
    )
    .bind(channel_id)
    .bind(f64::from(window_secs))
    .bind(keys)
    .fetch_all(ex)
    .await
}

/// A claimed delivery.
#[derive(Debug, Clone)]
pub struct Due {
    /// Row id.
    pub id: i64,
    /// The channel.
    pub channel_id: i64,
    /// `alert`, `digest` or `test`.
    pub kind: String,
    /// The stored message.
    pub payload: serde_json::Value,
    /// Attempts so far.
    pub attempts: i32,
}

/// Channels with deliveries due.
pub async fn due_channels(ex: impl PgExecutor<'_>) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT DISTINCT channel_id FROM alert_deliveries \
         WHERE next_attempt_at <= now() AND status IN ('pending', 'failed') ORDER BY channel_id",
    )
    .fetch_all(ex)
    .await
}

/// Claims up to `limit` of a channel's due deliveries by moving their next attempt `lease_secs`
/// ahead, so that no other sender takes them meanwhile (and a sender that dies leaves them due
/// again after the lease). Oldest first.
pub async fn claim_due(
    ex: impl PgExecutor<'_>,
    channel_id: i64,
    limit: i64,
    lease_secs: f64,
) -> Result<Vec<Due>, sqlx::Error> {
    let rows = sqlx::query(
        "UPDATE alert_deliveries SET next_attempt_at = now() + make_interval(secs => $3) \
         WHERE id IN (SELECT id FROM alert_deliveries \
                      WHERE channel_id = $1 AND next_attempt_at <= now() \
                        AND status IN ('pending', 'failed') \
                      ORDER BY next_attempt_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) \
         RETURNING id, channel_id, kind, payload, attempts",
    )
    .bind(channel_id)
    .bind(limit)
    .bind(lease_secs)
    .fetch_all(ex)
    .await?;
    let mut due = rows
        .iter()
        .map(|row| {
            Ok(Due {
                id: row.try_get("id")?,
                channel_id: row.try_get("channel_id")?,
                kind: row.try_get("kind")?,
                payload: row.try_get("payload")?,
                attempts: row.try_get("attempts")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    due.sort_by_key(|d| d.id);
    Ok(due)
}

/// Moves claimed deliveries' next attempt to `secs` from now (their channel just failed).
pub async fn postpone(ex: impl PgExecutor<'_>, ids: &[i64], secs: f64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE alert_deliveries SET next_attempt_at = now() + make_interval(secs => $2) \
         WHERE id = ANY($1) AND next_attempt_at IS NOT NULL",
    )
    .bind(ids)
    .bind(secs)
    .execute(ex)
    .await
    .map(drop)
}

/// Records a successful send.
pub async fn mark_sent(ex: impl PgExecutor<'_>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE alert_deliveries SET status = 'sent', attempts = attempts + 1, sent_at = now(), \
         last_error = NULL, next_attempt_at = NULL WHERE id = $1",
    )
    .bind(id)
    .execute(ex)
    .await
    .map(drop)
}

/// Records a failed send; `retry_in_secs` schedules the next attempt (`None`: given up).
pub async fn mark_failed(
    ex: impl PgExecutor<'_>,
    id: i64,
    error: &str,
    retry_in_secs: Option<f64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE alert_deliveries SET status = 'failed', attempts = attempts + 1, last_error = $2, \
         next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .bind(retry_in_secs)
    .execute(ex)
    .await
    .map(drop)
}

/// Marks a delivery not to be sent (its channel was disabled), keeping its counts.
pub async fn mark_suppressed(
    ex: impl PgExecutor<'_>,
    id: i64,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE alert_deliveries SET status = 'suppressed', last_error = $2, \
         next_attempt_at = NULL WHERE id = $1",
    )
    .bind(id)
    .bind(reason)
    .execute(ex)
    .await
    .map(drop)
}
