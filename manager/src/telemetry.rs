//! Prometheus metrics (`GET /metrics`) through the `metrics` facade and
//! `metrics-exporter-prometheus` (without its HTTP listener: the manager serves the text itself),
//! and the per-request middleware that counts requests and opens the request span.

use std::{sync::OnceLock, time::Instant};

use axum::{
    extract::{MatchedPath, Request},
    middleware::Next,
    response::Response,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::Instrument as _;

/// Requests served, by method, route and status.
pub const HTTP_REQUESTS: &str = "mirage_manager_http_requests_total";
/// Request duration in seconds, by method and route.
pub const HTTP_DURATION: &str = "mirage_manager_http_request_duration_seconds";
/// Login attempts by outcome (`success`, `failure`, `throttled`).
pub const LOGINS: &str = "mirage_manager_logins_total";
/// Open agent policy streams on this replica.
pub const POLICY_STREAMS: &str = "mirage_manager_policy_streams";
/// Policy events sent to agent streams, by kind (`snapshot`, `delta`).
pub const POLICY_EVENTS: &str = "mirage_manager_policy_events_total";

/// Installs the process-wide recorder on first call and returns its handle (the `metrics`
/// facade has one global recorder, so every `AppState` in a process shares it).
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("Another metrics recorder is installed; /metrics will be empty.");
            }
            handle
        })
        .clone()
}

/// Middleware: a span per request (method, route), and the request counters.
pub async fn observe(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let span = tracing::info_span!("request", %method, route = %route);
    let started = Instant::now();
    let response = next.run(req).instrument(span).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(HTTP_REQUESTS, "method" => method.to_string(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(HTTP_DURATION, "method" => method.to_string(), "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
