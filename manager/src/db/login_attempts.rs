//! The `login_attempts` table: every login attempt, for throttling and the record.

use std::{net::IpAddr, time::Duration};

use sqlx::{PgExecutor, Row as _};

/// How a login attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Logged in.
    Success,
    /// Wrong password, unknown or disabled user.
    Failure,
    /// Refused by the throttle before the password was checked (not counted as a failure).
    Throttled,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Throttled => "throttled",
        }
    }
}

/// Failures in the window.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// How many.
    pub count: i64,
    /// Seconds until the oldest leaves the window (`None` when there is none).
    pub seconds_until_oldest_leaves: Option<f64>,
}

/// Records an attempt.
pub async fn record(
    ex: impl PgExecutor<'_>,
    username: &str,
    ip: Option<IpAddr>,
    outcome: Outcome,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO login_attempts (username, ip, outcome) VALUES ($1, $2, $3)")
        .bind(username)
        .bind(ip)
        .bind(outcome.as_str())
        .execute(ex)
        .await
        .map(drop)
}

/// The failure count and wait for one key; `$1` is the key, `$2` the window in seconds.
macro_rules! failures_sql {
    ($filter:literal) => {
        concat!(
            "SELECT count(*) AS count, \
                    extract(epoch FROM min(at) + make_interval(secs => $2) - now())::float8 AS wait \
             FROM login_attempts \
             WHERE outcome = 'failure' AND ",
            $filter,
            " AND at > now() - make_interval(secs => $2)"
        )
    };
}

/// Failures for `username` within `window`.
pub async fn failures_for_username(
    ex: impl PgExecutor<'_>,
    username: &str,
    window: Duration,
) -> Result<Window, sqlx::Error> {
    let row = sqlx::query(failures_sql!("username = $1"))
        .bind(username)
        .bind(window.as_secs_f64())
        .fetch_one(ex)
        .await?;
    window_of(&row)
}

/// Failures from `ip` within `window`.
pub async fn failures_for_ip(
    ex: impl PgExecutor<'_>,
    ip: IpAddr,
    window: Duration,
) -> Result<Window, sqlx::Error> {
    let row = sqlx::query(failures_sql!("ip = $1"))
        .bind(ip)
        .bind(window.as_secs_f64())
        .fetch_one(ex)
        .await?;
    window_of(&row)
}

fn window_of(row: &sqlx::postgres::PgRow) -> Result<Window, sqlx::Error> {
    Ok(Window {
        count: row.try_get("count")?,
        seconds_until_oldest_leaves: row.try_get("wait")?,
    })
}

/// Deletes attempts older than `keep`; how many.
pub async fn delete_older_than(
    ex: impl PgExecutor<'_>,
    keep: Duration,
) -> Result<u64, sqlx::Error> {
    sqlx::query("DELETE FROM login_attempts WHERE at < now() - make_interval(secs => $1)")
        .bind(keep.as_secs_f64())
        .execute(ex)
        .await
        .map(|r| r.rows_affected())
}
