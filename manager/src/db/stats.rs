//! The dashboard's aggregates over `detections`, `agents` and `attackers`. Detection counts read
//! only the requested window, through `detections_at`.

use std::net::IpAddr;

use serde::Serialize;
use sqlx::{PgExecutor, Row as _};
use time::OffsetDateTime;

/// Detections in one hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// The hour's start.
    #[serde(with = "time::serde::rfc3339")]
    pub t: OffsetDateTime,
    /// Detections in it.
    pub count: i64,
}

/// Detections per hour for the last `hours` hours (the current one included), every hour listed.
pub async fn per_hour(ex: impl PgExecutor<'_>, hours: i64) -> Result<Vec<Bucket>, sqlx::Error> {
    let rows = sqlx::query(
        "WITH hours AS ( \
             SELECT generate_series(date_trunc('hour', now()) - make_interval(hours => $1::int - 1), \
                                    date_trunc('hour', now()), interval '1 hour') AS t), \
         counts AS ( \
             SELECT date_trunc('hour', at) AS t, count(*) AS n FROM detections \
             WHERE at >= (SELECT min(t) FROM hours) GROUP BY 1) \
         SELECT h.t, coalesce(c.n, 0) AS count FROM hours h LEFT JOIN counts c USING (t) \
         ORDER BY h.t",
    )
    .bind(hours)
    .fetch_all(ex)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Bucket {
                t: row.try_get("t")?,
                count: row.try_get("count")?,
            })
        })
        .collect()
}

/// One of the addresses with most detections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopAttacker {
    /// The address.
    pub addr: IpAddr,
    /// Its detections in the window.
    pub count: i64,
    /// The attacker entry its newest detection was counted against.
    pub attacker_id: Option<i64>,
}

/// The `limit` addresses with most detections in the last `hours` hours.
pub async fn top_attackers(
    ex: impl PgExecutor<'_>,
    hours: i64,
    limit: i64,
) -> Result<Vec<TopAttacker>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT attacker_addr, count(*) AS count, \
                (array_agg(attacker_id ORDER BY id DESC) \
                   FILTER (WHERE attacker_id IS NOT NULL))[1] AS attacker_id \
         FROM detections WHERE at >= date_trunc('hour', now()) - make_interval(hours => $1::int - 1) \
         GROUP BY attacker_addr ORDER BY count DESC, attacker_addr LIMIT $2",
    )
    .bind(hours)
    .bind(limit)
    .fetch_all(ex)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(TopAttacker {
                addr: row.try_get("attacker_addr")?,
                count: row.try_get("count")?,
                attacker_id: row.try_get("attacker_id")?,
            })
        })
        .collect()
}

/// Detections per value of `service` or `severity` in the last `hours` hours, most first.
pub async fn per_column(
    ex: impl PgExecutor<'_>,
    column: Column,
    hours: i64,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let column = column.name();
    sqlx::query_as(&format!(
        "SELECT {column}, count(*) FROM detections \
         WHERE at >= date_trunc('hour', now()) - make_interval(hours => $1::int - 1) \
         GROUP BY 1 ORDER BY 2 DESC, 1"
    ))
    .bind(hours)
    .fetch_all(ex)
    .await
}

/// A column [`per_column`] groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// `service`.
    Service,
    /// `severity`.
    Severity,
}

impl Column {
    fn name(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Severity => "severity",
        }
    }
}

/// Agents by health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AgentHealth {
    /// Every enrolled agent.
    pub total: i64,
    /// Unrevoked, heard from within `online_secs`.
    pub online: i64,
    /// Unrevoked, not heard from within `online_secs` (or never).
    pub stale: i64,
    /// Revoked.
    pub revoked: i64,
}

/// Agents by health; online means a heartbeat within `online_secs`.
pub async fn agents(ex: impl PgExecutor<'_>, online_secs: i64) -> Result<AgentHealth, sqlx::Error> {
    let row = sqlx::query(
        "SELECT count(*) AS total, \
                count(*) FILTER (WHERE revoked_at IS NULL \
                    AND last_heartbeat > now() - make_interval(secs => $1::double precision)) \
                    AS online, \
                count(*) FILTER (WHERE revoked_at IS NOT NULL) AS revoked \
         FROM agents",
    )
    .bind(online_secs as f64)
    .fetch_one(ex)
    .await?;
    let (total, online, revoked): (i64, i64, i64) = (
        row.try_get("total")?,
        row.try_get("online")?,
        row.try_get("revoked")?,
    );
    Ok(AgentHealth {
        total,
        online,
        stale: total - online - revoked,
        revoked,
    })
}

/// Live attacker entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AttackerCounts {
    /// Unexpired entries.
    pub live: i64,
    /// Of those, blocked by hand.
    pub manual: i64,
    /// Of those, from verdicts.
    pub automatic: i64,
}

/// Live attacker entries by origin.
pub async fn attackers(ex: impl PgExecutor<'_>) -> Result<AttackerCounts, sqlx::Error> {
    let (live, manual): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE manual) FROM attackers \
         WHERE expires_at IS NULL OR expires_at > now()",
    )
    .fetch_one(ex)
    .await?;
    Ok(AttackerCounts {
        live,
        manual,
        automatic: live - manual,
    })
}
