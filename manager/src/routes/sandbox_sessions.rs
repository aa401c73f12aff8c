//! Sandbox sessions: `POST /api/v1/sandbox-sessions` ([`ServiceAuth`]: the sandbox's service
//! credential; see [`crate::evidence::sessions`]) and
//! `GET /api/v1/sandbox-sessions?attacker_id=&addr=&limit=&before=` (viewer; newest first,
//! keyset paging by id).

use axum::{
    Json,
    extract::{Query, State},
};
use serde::Deserialize;

use crate::{
    AppState,
    auth::{RequireRole, ServiceAuth, Viewer},
    db::{
        self,
        sandbox_sessions::{Filter, SandboxSession},
    },
    error::{ApiJson, AppError},
    evidence::sessions::{self, Batch, Outcome},
    policy::net,
};

/// Largest request body (the per-session limits still apply).
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Most rows one page returns.
const MAX_LIMIT: i64 = 1000;

/// Stores a batch of session reports; answers `{"inserted", "updated"}`.
pub async fn report(
    State(state): State<AppState>,
    _: ServiceAuth,
    ApiJson(batch): ApiJson<Batch>,
) -> Result<Json<Outcome>, AppError> {
    let rows = sessions::validate(batch).map_err(AppError::BadRequest)?;
    Ok(Json(sessions::store(&state.db, &rows).await?))
}

/// `GET /api/v1/sandbox-sessions` parameters.
#[derive(Debug, Deserialize)]
pub struct Params {
    /// Attributed to this attacker entry.
    pub attacker_id: Option<i64>,
    /// From this address or range.
    pub addr: Option<String>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<i64>,
    /// Only ids below this (the last id of the previous page).
    pub before: Option<i64>,
}

/// A page of sessions, newest first.
pub async fn list(
    State(state): State<AppState>,
    _: RequireRole<Viewer>,
    Query(params): Query<Params>,
) -> Result<Json<Vec<SandboxSession>>, AppError> {
    let filter = Filter {
        attacker_id: params.attacker_id,
        net: addr_filter(params.addr.as_deref())?,
        before: params.before,
    };
    let limit = params.limit.unwrap_or(100).clamp(1, MAX_LIMIT);
    Ok(Json(
        db::sandbox_sessions::list(&state.db, &filter, limit).await?,
    ))
}

/// Parses an `addr` filter: an address or a range (any prefix), empty meaning none.
pub(crate) fn addr_filter(addr: Option<&str>) -> Result<Option<ipnet::IpNet>, AppError> {
    match addr.map(str::trim).filter(|a| !a.is_empty()) {
        Some(addr) => net::parse(addr, true)
            .map(Some)
            .map_err(AppError::BadRequest),
        None => Ok(None),
    }
}
