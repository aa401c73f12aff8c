//! The attack log: `GET /api/v1/detections?attacker_id=&addr=&service=&rule=&limit=&before=`
//! (viewer; newest first, keyset paging by id: pass the last id of a page as `before`).

use axum::{
    Json,
    extract::{Query, State},
};
use serde::Deserialize;

use crate::{
    AppState,
    auth::{RequireRole, Viewer},
    db::{
        self,
        detections::{Detection, Filter},
    },
    error::AppError,
    routes::sandbox_sessions::addr_filter,
};

/// Most rows one page returns.
const MAX_LIMIT: i64 = 1000;

/// `GET /api/v1/detections` parameters.
#[derive(Debug, Deserialize)]
pub struct Params {
    /// Counted against this attacker entry.
    pub attacker_id: Option<i64>,
    /// From this address or range.
    pub addr: Option<String>,
    /// This service.
    pub service: Option<String>,
    /// This rule.
    pub rule: Option<String>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<i64>,
    /// Only ids below this.
    pub before: Option<i64>,
}

/// A page of detections, newest first.
pub async fn list(
    State(state): State<AppState>,
    _: RequireRole<Viewer>,
    Query(params): Query<Params>,
) -> Result<Json<Vec<Detection>>, AppError> {
    let non_empty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    let filter = Filter {
        attacker_id: params.attacker_id,
        net: addr_filter(params.addr.as_deref())?,
        service: non_empty(params.service),
        rule: non_empty(params.rule),
        before: params.before,
    };
    let limit = params.limit.unwrap_or(100).clamp(1, MAX_LIMIT);
    Ok(Json(db::detections::list(&state.db, &filter, limit).await?))
}
