//! Prometheus metrics of a running agent (`metrics = "ADDR"` in the configuration).
//!
//! The `metrics` facade is recorded by `metrics-exporter-prometheus` (without its own HTTP
//! listener: a one-route axum server renders it, as the manager does). Other parts of the agent
//! (policy sync, collectors, shipper) emit their own metrics through the facade; this module adds
//! the kernel's view, read from the pinned maps every [`KERNEL_EVERY`]:
//!
//! - `mirage_agent_kernel_packets_total{counter}`: the data path's global counters (per action
//!   and per reason: `pass`, `drop`, `redirect`, `reflect`, `no_target`, ...), summed over CPUs;
//! - `mirage_agent_allowlist_entries`, `mirage_agent_flows`: map sizes;
//! - `mirage_agent_tracked_sources`: sources with per-source counters.

use std::{net::SocketAddr, time::Duration};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::maps::Maps;

/// How often the kernel counters and map sizes are read.
pub const KERNEL_EVERY: Duration = Duration::from_secs(10);

/// Errors starting the metrics listener.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// Another recorder is installed in this process.
    #[error("a metrics recorder is already installed")]
    Recorder,
    /// The listener could not bind.
    #[error("binding the metrics listener {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Installs the recorder and serves `GET /metrics` on `addr` (on the current runtime).
///
/// # Errors
///
/// If a recorder is already installed or the address cannot be bound.
pub async fn serve(addr: SocketAddr) -> Result<PrometheusHandle, TelemetryError> {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| TelemetryError::Recorder)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let render = handle.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move { render.render() }
        }),
    );
    tracing::info!(%addr, "Serving metrics.");
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(%err, "Metrics listener failed.");
        }
    });
    Ok(handle)
}

/// Reads the kernel counters and map sizes into the metrics (errors are logged: a failed read
/// must never disturb enforcement).
pub fn record_kernel(maps: &Maps) {
    match maps.global() {
        Ok(counters) => {
            for (name, value) in counters {
                metrics::counter!("mirage_agent_kernel_packets_total", "counter" => name)
                    .absolute(value);
            }
        }
        Err(err) => tracing::debug!(error = %err, "Reading the global counters failed."),
    }
    let gauge = |name: &'static str, n: Result<usize, crate::maps::MapsError>| match n {
        Ok(n) => metrics::gauge!(name).set(n as f64),
        Err(err) => tracing::debug!(error = %err, metric = name, "Reading a map size failed."),
    };
    gauge(
        "mirage_agent_allowlist_entries",
        maps.allowlist().map(|v| v.len()),
    );
    gauge("mirage_agent_flows", maps.flows().map(|v| v.len()));
    gauge(
        "mirage_agent_tracked_sources",
        maps.sources().map(|v| v.len()),
    );
}
