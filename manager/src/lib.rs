//! `mirage-manager`: the control plane. It keeps users, agents, policies, attackers, attack logs
//! and sandbox sessions in PostgreSQL and serves them over a JSON API and a web UI
//! ([`routes::ui`], `docs/ui.md`), and streams policy deltas to the agents ([`policy`]). It sits
//! at the top of the data path: `mirage-server` reports verdicts to it, and it pushes policy to
//! every `mirage-agent`.
//!
//! Run it with `mirage-manager serve [--config FILE]`; with no `database_url` it starts and owns a
//! private PostgreSQL cluster under `data_dir` ([`db::embedded`]). The first admin comes from
//! `mirage-manager create-admin --username NAME`, or from a random password printed once at the
//! first start. [`app`] builds the router; tests drive it with `tower::ServiceExt::oneshot`.

pub mod admin;
pub mod alerts;
pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod evidence;
pub mod openapi;
pub mod policy;
pub mod routes;
pub mod telemetry;
#[cfg(feature = "test-util")]
pub mod test_util;
pub mod tls;

use std::sync::Arc;

use axum::{Router, middleware};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

pub use crate::{config::ManagerConfig, error::AppError};
use crate::{evidence::bus::DetectionBus, policy::bus::PolicyBus};

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The database pool.
    pub db: PgPool,
    /// The configuration.
    pub config: Arc<ManagerConfig>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Policy change wake-ups for the agents' streams (this replica's LISTEN connection).
    pub bus: PolicyBus,
    /// New-detection wake-ups for the web UI's live attack log (this replica's LISTEN
    /// connection on `mirage_detection`). Its streams end with [`PolicyBus::close`] too.
    pub detections: DetectionBus,
}

impl AppState {
    /// State over `db` with `config`, using the process-wide metrics recorder.
    pub fn new(db: PgPool, config: ManagerConfig) -> Self {
        Self {
            bus: PolicyBus::new(db.clone()),
            detections: DetectionBus::new(db.clone()),
            db,
            config: Arc::new(config),
            metrics: telemetry::install(),
        }
    }
}

/// The HTTP application: every route, with the request span and metrics middleware.
pub fn app(state: AppState) -> Router {
    routes::router()
        .layer(middleware::from_fn(telemetry::observe))
        .with_state(state)
}
