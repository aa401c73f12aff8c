//! `GET /api/v1/audit-log?limit=N&before=ID`: the newest audit rows, admins only.

use axum::{
    Json,
    extract::{Query, State},
};
use serde::Deserialize;

use crate::{
    AppState,
    auth::{Admin, RequireRole},
    db::{self, audit_log::Entry},
    error::AppError,
};

/// Most rows one request returns.
const MAX_LIMIT: i64 = 1000;

/// Query parameters.
#[derive(Debug, Deserialize)]
pub struct Params {
    /// How many rows (default 100, at most 1000).
    pub limit: Option<i64>,
    /// Only rows with a smaller id (the last id of the previous page).
    pub before: Option<i64>,
}

/// The newest rows first.
pub async fn list(
    State(state): State<AppState>,
    _: RequireRole<Admin>,
    Query(params): Query<Params>,
) -> Result<Json<Vec<Entry>>, AppError> {
    let limit = params.limit.unwrap_or(100).clamp(1, MAX_LIMIT);
    Ok(Json(
        db::audit_log::list(&state.db, limit, params.before).await?,
    ))
}
