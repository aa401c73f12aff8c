//! The agents' policy: `GET /api/v1/agent/stream` (server-sent events) and
//! `POST /api/v1/agent/policy` {since} (the poll interface), both with [`AgentAuth`].
//!
//! The stream starts with the deltas after `Last-Event-ID` (or `?since=`) when the revision log
//! still holds them, otherwise with a `snapshot` event; then one `delta` event per revision.
//! Every event's `id:` is its revision, so the browser-standard reconnect (which sends the last
//! id back) resumes without missing or repeating one. The stream subscribes to the
//! [`PolicyBus`](crate::policy::bus::PolicyBus) *before* it reads the database, so a change
//! committed in between still wakes it; every wake re-reads from its own position.

use std::{convert::Infallible, time::Duration};

use axum::{
    Json,
    extract::{Query, State},
    http::HeaderMap,
    response::sse::{Event, KeepAlive, Sse},
};
use futures_util::Stream;
use serde::Deserialize;
use tokio::{
    sync::{broadcast::error::RecvError, mpsc},
    time::MissedTickBehavior,
};

use crate::{
    AppState,
    auth::AgentAuth,
    db,
    error::{ApiJson, AppError},
    policy::{self, LoadError, Update, bus::Wake},
    telemetry,
};

/// Keepalive comment interval; also how often a stream re-checks the database without a wake
/// (a lost notification costs at most this long) and whether its agent was revoked (revocation
/// also notifies `revoke:<id>`, which ends the agent's streams on every replica at once; this
/// check covers a lost notification).
pub const KEEPALIVE: Duration = Duration::from_secs(15);

/// `GET /api/v1/agent/stream` parameters.
#[derive(Debug, Deserialize)]
pub struct StreamParams {
    /// The last revision applied (`Last-Event-ID` wins when both are given).
    pub since: Option<i64>,
}

/// `POST /api/v1/agent/policy` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Poll {
    /// The last revision applied; absent: a snapshot.
    pub since: Option<i64>,
}

fn load_error(err: LoadError) -> AppError {
    match err {
        LoadError::Db(err) => AppError::Database(err),
        other => AppError::internal(other),
    }
}

/// The poll: snapshot or deltas as JSON.
pub async fn poll(
    State(state): State<AppState>,
    AgentAuth(agent): AgentAuth,
    ApiJson(body): ApiJson<Poll>,
) -> Result<Json<Update>, AppError> {
    policy::load(&state.db, agent.group_id, body.since)
        .await
        .map(Json)
        .map_err(load_error)
}

/// The stream.
pub async fn stream(
    State(state): State<AppState>,
    AgentAuth(agent): AgentAuth,
    headers: HeaderMap,
    Query(params): Query<StreamParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, AppError> {
    let last_event_id = match headers.get("last-event-id") {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .ok_or_else(|| {
                    AppError::BadRequest("Last-Event-ID must be a revision number".to_owned())
                })?,
        ),
        None => None,
    };
    let since = last_event_id.or(params.since);
    let mut wake = state.bus.subscribe().await?;
    // The first answer is loaded here, so a database failure is a 5xx rather than an empty stream.
    // Through the shared reads too: after a restart, every agent reconnects at once and most
    // ask for the same thing. Any read that starts after the subscription sees what it may miss.
    let first = state
        .bus
        .load(agent.group_id, since, tokio::time::Instant::now())
        .await
        .map_err(AppError::internal)?;
    let (tx, rx) = mpsc::channel::<Event>(16);
    tracing::info!(agent = %agent.name, since, "Policy stream opened.");
    tokio::spawn(async move {
        metrics::gauge!(telemetry::POLICY_STREAMS).increment(1.0);
        // An interval rather than a sleep per wait: under a steady flow of wakes the revocation
        // check still runs every KEEPALIVE.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut update = first;
        loop {
            let full_page = matches!(&*update, Update::Deltas { deltas, .. } if deltas.len() as i64 == policy::MAX_DELTAS);
            let Some(position) = send(&tx, &update).await else {
                break;
            };
            // A full page means more are waiting: read on without waiting for a wake.
            if !full_page {
                tokio::select! {
                    woke = wake.recv() => match woke {
                        Ok(Wake::Revoked(id)) if id == agent.id => break,
                        Err(RecvError::Closed) => break,
                        _ => {}
                    },
                    _ = tick.tick() => {
                        match db::agents::is_live(&state.db, agent.id).await {
                            Ok(true) => {}
                            Ok(false) => break,
                            Err(err) => tracing::warn!(error = %err, "Agent check failed."),
                        }
                    }
                    () = tx.closed() => break,
                    () = state.bus.closed() => break,
                }
            }
            // Woken (or paging on): any read that starts from now on sees what woke us.
            let woke = tokio::time::Instant::now();
            update = loop {
                match state.bus.load(agent.group_id, Some(position), woke).await {
                    Ok(update) => break update,
                    Err(err) => {
                        tracing::warn!(agent = %agent.name, error = %err, "Loading policy deltas failed; retrying.");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
        }
        metrics::gauge!(telemetry::POLICY_STREAMS).decrement(1.0);
        tracing::info!(agent = %agent.name, "Policy stream closed.");
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (Ok(event), rx))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEPALIVE)))
}

/// Sends an update as events; returns the revision the stream is now at, or `None` once the
/// client is gone.
async fn send(tx: &mpsc::Sender<Event>, update: &Update) -> Option<i64> {
    match update {
        Update::Snapshot(snapshot) => {
            let event = Event::default()
                .event("snapshot")
                .id(snapshot.revision.to_string())
                .json_data(snapshot)
                .ok()?;
            tx.send(event).await.ok()?;
            metrics::counter!(telemetry::POLICY_EVENTS, "kind" => "snapshot").increment(1);
            Some(snapshot.revision)
        }
        Update::Deltas { revision, deltas } => {
            for delta in deltas {
                let event = Event::default()
                    .event("delta")
                    .id(delta.revision.to_string())
                    .json_data(delta)
                    .ok()?;
                tx.send(event).await.ok()?;
            }
            metrics::counter!(telemetry::POLICY_EVENTS, "kind" => "delta")
                .increment(deltas.len() as u64);
            Some(*revision)
        }
    }
}
