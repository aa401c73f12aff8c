//! `GET /api/v1/stats?hours=24` (viewer): the dashboard's numbers in one answer.
//!
//! ```json
//! {"hours": 24, "total": 1234,
//!  "attacks_over_time": [{"t": "2024-05-01T10:00:00Z", "count": 12}, ...],
//!  "top_attackers": [{"addr": "203.0.113.5", "count": 40, "attacker_id": 7}, ...],
//!  "per_service": [{"service": "sshd", "count": 50}, ...],
//!  "per_severity": [{"severity": "info", "count": 0}, ... "critical"],
//!  "agents": {"total": 3, "online": 2, "stale": 0, "revoked": 1},
//!  "attackers": {"live": 10, "manual": 2, "automatic": 8}}
//! ```
//!
//! `attacks_over_time` lists every hour of the window (the current one last), zeros included;
//! `per_severity` lists every severity, least first; detection counts are detections (rows), in
//! the window. An agent is online with a heartbeat in the last 2 minutes.

use axum::{
    Json,
    extract::{Query, State},
};
use serde::{Deserialize, Serialize};

use crate::{
    AppState,
    auth::{RequireRole, Viewer},
    db::{
        self,
        stats::{AgentHealth, AttackerCounts, Bucket, Column, TopAttacker},
    },
    error::AppError,
    evidence::verdicts::SEVERITIES,
};

/// Longest window: 30 days.
const MAX_HOURS: i64 = 30 * 24;
/// Addresses in `top_attackers`.
const TOP: i64 = 10;
/// An agent heard from within this long is online.
const ONLINE_SECS: i64 = 120;

/// Query parameters.
#[derive(Debug, Deserialize)]
pub struct Params {
    /// The window in hours, 1 to 720 (default 24).
    pub hours: Option<i64>,
}

/// Detections of one service.
#[derive(Debug, Serialize)]
pub struct ServiceCount {
    /// The service.
    pub service: String,
    /// Its detections.
    pub count: i64,
}

/// Detections of one severity.
#[derive(Debug, Serialize)]
pub struct SeverityCount {
    /// The severity.
    pub severity: String,
    /// Its detections.
    pub count: i64,
}

/// The answer.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// The window.
    pub hours: i64,
    /// Detections in it.
    pub total: i64,
    /// Detections per hour.
    pub attacks_over_time: Vec<Bucket>,
    /// The addresses with most detections.
    pub top_attackers: Vec<TopAttacker>,
    /// Detections per service, most first.
    pub per_service: Vec<ServiceCount>,
    /// Detections per severity, least severe first.
    pub per_severity: Vec<SeverityCount>,
    /// Agents by health.
    pub agents: AgentHealth,
    /// Live attacker entries.
    pub attackers: AttackerCounts,
}

/// The dashboard's numbers.
pub async fn get(
    State(state): State<AppState>,
    _: RequireRole<Viewer>,
    Query(params): Query<Params>,
) -> Result<Json<Stats>, AppError> {
    let hours = params.hours.unwrap_or(24);
    if !(1..=MAX_HOURS).contains(&hours) {
        return Err(AppError::BadRequest(format!(
            "hours must be between 1 and {MAX_HOURS}"
        )));
    }
    let db = &state.db;
    let attacks_over_time = db::stats::per_hour(db, hours).await?;
    let per_severity = db::stats::per_column(db, Column::Severity, hours).await?;
    let per_severity = SEVERITIES
        .iter()
        .map(|&severity| SeverityCount {
            severity: severity.to_owned(),
            count: per_severity
                .iter()
                .find(|(s, _)| s == severity)
                .map_or(0, |(_, n)| *n),
        })
        .collect();
    Ok(Json(Stats {
        hours,
        total: attacks_over_time.iter().map(|b| b.count).sum(),
        attacks_over_time,
        top_attackers: db::stats::top_attackers(db, hours, TOP).await?,
        per_service: db::stats::per_column(db, Column::Service, hours)
            .await?
            .into_iter()
            .map(|(service, count)| ServiceCount { service, count })
            .collect(),
        per_severity,
        agents: db::stats::agents(db, ONLINE_SECS).await?,
        attackers: db::stats::attackers(db).await?,
    }))
}
