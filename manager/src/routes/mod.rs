//! The HTTP routes, one module per resource. JSON API under `/api/v1`; `/healthz` and `/metrics`
//! at the root.

pub mod health;

use axum::{Router, routing::get};

use crate::AppState;

/// Every route.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(health::metrics))
}
