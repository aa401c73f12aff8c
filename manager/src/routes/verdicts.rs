//! `POST /api/v1/verdicts` ([`ServiceAuth`]: a `mirage-server`'s credential): a batch of
//! detections, idempotent on retry. See [`crate::evidence::verdicts`] for what it stores and how
//! verdicts become attacker entries.
//!
//! Body `{"verdicts": [{"id", "addr", "rule", "service", "severity", "action"?, "count"?,
//! "evidence"?, "at", "group"?}, ...]}` (1 to 1000); answer
//! `{"accepted", "duplicates", "allowlisted", "revision"}`. One bad item is a 400 naming it
//! (`verdicts[3].addr: ...`) and nothing is stored.

use axum::{Json, extract::State};

use crate::{
    AppState,
    auth::ServiceAuth,
    error::{ApiJson, AppError},
    evidence::verdicts::{self, Batch, IngestError, Outcome},
};

/// Largest request body: 1000 verdicts with a few KiB of evidence each (the per-item limits
/// still apply; the default 2 MiB would refuse legitimate full batches).
pub const MAX_BODY: usize = 16 * 1024 * 1024;

/// Ingests a batch.
pub async fn ingest(
    State(state): State<AppState>,
    server: ServiceAuth,
    ApiJson(batch): ApiJson<Batch>,
) -> Result<Json<Outcome>, AppError> {
    let items = verdicts::validate(batch).map_err(AppError::BadRequest)?;
    verdicts::ingest(&state.db, &server.0.name, &server.actor(), &items)
        .await
        .map(Json)
        .map_err(|err| match err {
            IngestError::UnknownGroup(msg) => AppError::BadRequest(msg),
            IngestError::Db(err) => AppError::Database(err),
            IngestError::Raced => AppError::internal(err),
        })
}
