//! Retention settings: `GET /api/v1/settings/retention` (viewer) and `PUT` (admin; audited).
//!
//! Shape (both the answer and the `PUT` body; in a `PUT` every key is optional and the others
//! keep their value): `{"detections_days": 90, "sandbox_sessions_days": 90,
//! "audit_log_days": 365, "login_attempts_days": 30, "policy_revisions_days": 30}`, each 1 to
//! 3650. The hourly sweep ([`crate::evidence::retention`]) applies them.

use axum::{Json, extract::State};
use serde::Deserialize;

use crate::{
    AppState,
    auth::{Admin, RequireRole, Viewer},
    db::{self, retention::Retention},
    error::{ApiJson, AppError},
};

/// Longest retention: ten years.
pub const MAX_DAYS: i64 = 3650;

/// `PUT` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// Detections.
    pub detections_days: Option<i64>,
    /// Sandbox sessions.
    pub sandbox_sessions_days: Option<i64>,
    /// Audit log.
    pub audit_log_days: Option<i64>,
    /// Login attempts.
    pub login_attempts_days: Option<i64>,
    /// Policy revisions.
    pub policy_revisions_days: Option<i64>,
}

/// The current setting.
pub async fn get(
    State(state): State<AppState>,
    _: RequireRole<Viewer>,
) -> Result<Json<Retention>, AppError> {
    Ok(Json(db::retention::get(&state.db).await?))
}

/// Changes the setting; returns the new one.
pub async fn put(
    State(state): State<AppState>,
    admin: RequireRole<Admin>,
    ApiJson(body): ApiJson<Change>,
) -> Result<Json<Retention>, AppError> {
    for (key, value) in [
        ("detections_days", body.detections_days),
        ("sandbox_sessions_days", body.sandbox_sessions_days),
        ("audit_log_days", body.audit_log_days),
        ("login_attempts_days", body.login_attempts_days),
        ("policy_revisions_days", body.policy_revisions_days),
    ] {
        if let Some(days) = value
            && !(1..=MAX_DAYS).contains(&days)
        {
            return Err(AppError::BadRequest(format!(
                "{key} must be between 1 and {MAX_DAYS} days"
            )));
        }
    }
    let mut tx = state.db.begin().await?;
    let current = db::retention::get(&mut *tx).await?;
    let new = Retention {
        detections_days: body.detections_days.unwrap_or(current.detections_days),
        sandbox_sessions_days: body
            .sandbox_sessions_days
            .unwrap_or(current.sandbox_sessions_days),
        audit_log_days: body.audit_log_days.unwrap_or(current.audit_log_days),
        login_attempts_days: body
            .login_attempts_days
            .unwrap_or(current.login_attempts_days),
        policy_revisions_days: body
            .policy_revisions_days
            .unwrap_or(current.policy_revisions_days),
    };
    let before = db::retention::set(&mut tx, &new, Some(admin.user.id)).await?;
    db::audit_log::record(
        &mut *tx,
        &admin.actor(),
        "settings.retention",
        Some("settings:retention"),
        serde_json::json!({ "before": before, "after": new }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(by = %admin.user.username, "Retention settings changed.");
    Ok(Json(new))
}
