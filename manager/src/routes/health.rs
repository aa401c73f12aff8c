//! `GET /healthz` (the database answers) and `GET /metrics` (Prometheus text format). Both are
//! unauthenticated, like any scrape target: they reveal counts, not data, and the listener is
//! loopback-only in this build.

use axum::{
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
};

use crate::AppState;

/// 200 `ok` when a database round trip works, 503 otherwise.
pub async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    match sqlx::query("SELECT 1").execute(&state.db).await {
        Ok(_) => (StatusCode::OK, "ok\n"),
        Err(err) => {
            tracing::warn!(error = %err, "Health check: the database does not answer.");
            (StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n")
        }
    }
}

/// The metrics in Prometheus text exposition format.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    // Without the exporter's own HTTP listener nothing else drains histogram buffers.
    state.metrics.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
