//! The HTTP routes, one module per resource. JSON API under `/api/v1`; `/healthz` and `/metrics`
//! at the root.

pub mod agent_flows;
pub mod agent_policy;
pub mod agents;
pub mod alerts;
pub mod allowlist;
pub mod attacker_page;
pub mod attackers;
pub mod audit_log;
pub mod auth;
pub mod detections;
pub mod events;
pub mod groups;
pub mod health;
pub mod retention;
pub mod sandbox_sessions;
pub mod service_credentials;
pub mod stats;
pub mod ui;
pub mod users;
pub mod verdicts;

use axum::{
    Router,
    extract::DefaultBodyLimit,
    routing::{delete, get, patch, post},
};

use crate::AppState;

/// Every route.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(ui::index))
        .route("/ui/{*path}", get(ui::asset))
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(health::metrics))
        .route("/api/v1/openapi.json", get(crate::openapi::serve))
        .route("/api/v1/login", post(auth::login))
        .route("/api/v1/logout", post(auth::logout))
        .route("/api/v1/me", get(auth::me))
        .route("/api/v1/users", get(users::list).post(users::create))
        .route(
            "/api/v1/users/{id}",
            patch(users::update).delete(users::delete),
        )
        .route("/api/v1/audit-log", get(audit_log::list))
        .route("/api/v1/enrollment-tokens", post(agents::create_token))
        .route("/api/v1/agent/enroll", post(agents::enroll))
        .route("/api/v1/agent/heartbeat", post(agents::heartbeat))
        .route("/api/v1/agent/stream", get(agent_policy::stream))
        .route("/api/v1/agent/policy", post(agent_policy::poll))
        .route("/api/v1/agent/flows", post(agent_flows::report))
        .route("/api/v1/agents", get(agents::list))
        .route("/api/v1/agents/{id}", delete(agents::revoke))
        .route(
            "/api/v1/attackers",
            get(attackers::list).post(attackers::create),
        )
        .route(
            "/api/v1/attackers/{id}",
            get(attacker_page::get).delete(attackers::delete),
        )
        .route(
            "/api/v1/allowlist",
            post(allowlist::add).delete(allowlist::remove),
        )
        .route("/api/v1/allowlists", get(allowlist::union))
        .route(
            "/api/v1/alert-channels",
            get(alerts::list).post(alerts::create),
        )
        .route(
            "/api/v1/alert-channels/{id}",
            patch(alerts::update).delete(alerts::delete),
        )
        .route("/api/v1/alert-channels/{id}/test", post(alerts::test))
        .route("/api/v1/alert-deliveries", get(alerts::deliveries))
        .route("/api/v1/groups", get(groups::list).post(groups::create))
        .route("/api/v1/groups/{name}", delete(groups::delete))
        .route(
            "/api/v1/groups/{name}/policy",
            get(groups::get_policy).put(groups::put_policy),
        )
        .route(
            "/api/v1/verdicts",
            post(verdicts::ingest).layer(DefaultBodyLimit::max(verdicts::MAX_BODY)),
        )
        .route(
            "/api/v1/sandbox-sessions",
            get(sandbox_sessions::list)
                .post(sandbox_sessions::report)
                .layer(DefaultBodyLimit::max(sandbox_sessions::MAX_BODY)),
        )
        .route("/api/v1/detections", get(detections::list))
        .route("/api/v1/events", get(events::stream))
        .route("/api/v1/stats", get(stats::get))
        .route(
            "/api/v1/settings/retention",
            get(retention::get).put(retention::put),
        )
        .route(
            "/api/v1/service-credentials",
            get(service_credentials::list).post(service_credentials::create),
        )
        .route(
            "/api/v1/service-credentials/{id}",
            delete(service_credentials::revoke),
        )
}
