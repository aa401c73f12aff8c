//! `GET /api/v1/events` (viewer, session cookie): server-sent events for the web UI's live attack
//! log. Each new detection is one `event: detection` whose `id:` is the detection id and whose
//! data is the detection's JSON (as in `GET /api/v1/detections`); a comment keeps the connection
//! alive every 15 s.
//!
//! It starts after `Last-Event-ID` (the browser's `EventSource` sends it back on reconnect), or
//! `?since=ID`, or else after the newest detection at connect time (the page loads the backlog
//! from `GET /api/v1/detections`). The stream subscribes to the
//! [`DetectionBus`](crate::evidence::bus::DetectionBus) before it reads the database, so nothing
//! committed in between is missed; every wake (and every 15 s, in case a notification was lost)
//! re-reads from its own position, [`BATCH`] detections at a time. It ends at shutdown, when the
//! session ends (logout, expiry, user disabled), or when the client goes away.

use std::{convert::Infallible, time::Duration};

use axum::{
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
    auth::{RequireRole, Viewer},
    db,
    error::AppError,
    evidence,
};

/// Keep-alive interval, and how often the stream re-reads without a wake and re-checks its
/// session.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Most detections read per query; a stream further behind reads on without waiting.
pub const BATCH: i64 = 500;

/// `GET /api/v1/events` parameters.
#[derive(Debug, Deserialize)]
pub struct Params {
    /// Start after this detection id (`Last-Event-ID` wins when both are given).
    pub since: Option<i64>,
}

/// The stream.
pub async fn stream(
    State(state): State<AppState>,
    user: RequireRole<Viewer>,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, AppError> {
    let last_event_id = match headers.get("last-event-id") {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<i64>().ok())
                .ok_or_else(|| {
                    AppError::BadRequest("Last-Event-ID must be a detection id".to_owned())
                })?,
        ),
        None => None,
    };
    let mut wake = state.detections.subscribe().await?;
    let mut position = match last_event_id.or(params.since) {
        Some(since) => since,
        None => db::detections::newest_id(&state.db).await?,
    };
    let session_id = user.id;
    let username = user.user.username.clone();
    let (tx, rx) = mpsc::channel::<Event>(64);
    tracing::debug!(user = %username, position, "Event stream opened.");
    tokio::spawn(async move {
        metrics::gauge!(evidence::EVENT_STREAMS).increment(1.0);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        'stream: loop {
            // Everything after our position, a page at a time.
            loop {
                let page = match db::detections::after(&state.db, position, BATCH).await {
                    Ok(page) => page,
                    Err(err) => {
                        tracing::warn!(error = %err, "Reading new detections failed; retrying.");
                        break;
                    }
                };
                let full = page.len() as i64 == BATCH;
                for detection in &page {
                    let Ok(event) = Event::default()
                        .event("detection")
                        .id(detection.id.to_string())
                        .json_data(detection)
                    else {
                        continue;
                    };
                    if tx.send(event).await.is_err() {
                        break 'stream;
                    }
                    position = detection.id;
                }
                if !full {
                    break;
                }
            }
            tokio::select! {
                woke = wake.recv() => {
                    if let Err(RecvError::Closed) = woke {
                        break;
                    }
                }
                _ = tick.tick() => {
                    match db::evidence::session_is_live(&state.db, session_id).await {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(err) => tracing::warn!(error = %err, "Session check failed."),
                    }
                }
                () = tx.closed() => break,
                () = state.bus.closed() => break,
            }
        }
        metrics::gauge!(evidence::EVENT_STREAMS).decrement(1.0);
        tracing::debug!(user = %username, "Event stream closed.");
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (Ok(event), rx))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEPALIVE)))
}
