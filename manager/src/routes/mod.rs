//! The HTTP routes, one module per resource. JSON API under `/api/v1`; `/healthz` and `/metrics`
//! at the root.

pub mod audit_log;
pub mod auth;
pub mod health;
pub mod users;

use axum::{
    Router,
    routing::{get, patch, post},
};

use crate::AppState;

/// Every route.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(health::metrics))
        .route("/api/v1/login", post(auth::login))
        .route("/api/v1/logout", post(auth::logout))
        .route("/api/v1/me", get(auth::me))
        .route("/api/v1/users", get(users::list).post(users::create))
        .route(
            "/api/v1/users/{id}",
            patch(users::update).delete(users::delete),
        )
        .route("/api/v1/audit-log", get(audit_log::list))
}
