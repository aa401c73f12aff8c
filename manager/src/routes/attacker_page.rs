//! `GET /api/v1/attackers/{id}` (viewer): one attacker entry with the evidence that caught it and
//! what it then did in the sandbox: `{"attacker": {...}, "detections": [...], "sessions": [...]}`,
//! each list the newest 200 rows counted against the entry *or* from an address inside its
//! network (so detections from before the entry existed, or counted against an entry since
//! removed, still show).

use axum::{
    Json,
    extract::{Path, State},
};
use serde::Serialize;

use crate::{
    AppState,
    auth::{RequireRole, Viewer},
    db::{self, attackers::Attacker, detections::Detection, sandbox_sessions::SandboxSession},
    error::AppError,
};

/// Rows per list.
const LIMIT: i64 = 200;

/// The page.
#[derive(Debug, Serialize)]
pub struct AttackerPage {
    /// The entry.
    pub attacker: Attacker,
    /// Its detections, newest first.
    pub detections: Vec<Detection>,
    /// Its sandbox sessions, newest first.
    pub sessions: Vec<SandboxSession>,
}

/// The entry with its evidence; 404 if unknown.
pub async fn get(
    State(state): State<AppState>,
    _: RequireRole<Viewer>,
    Path(id): Path<i64>,
) -> Result<Json<AttackerPage>, AppError> {
    let attacker = db::evidence::attacker(&state.db, id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no attacker {id}")))?;
    let detections = db::detections::for_attacker(&state.db, id, attacker.net, LIMIT).await?;
    let sessions = db::sandbox_sessions::for_attacker(&state.db, id, attacker.net, LIMIT).await?;
    Ok(Json(AttackerPage {
        attacker,
        detections,
        sessions,
    }))
}
