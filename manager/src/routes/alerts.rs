//! Alert channels and their deliveries:
//!
//! - `GET /api/v1/alert-channels` (viewer): every channel, secrets redacted (`"********"`);
//! - `POST /api/v1/alert-channels` (admin): a new channel;
//! - `PATCH /api/v1/alert-channels/{id}` (admin): change fields; a redacted secret sent back
//!   unchanged keeps the stored one;
//! - `DELETE /api/v1/alert-channels/{id}` (admin);
//! - `POST /api/v1/alert-channels/{id}/test` (admin): send a test message now; the answer is the
//!   recorded delivery (`status` `sent` or `failed` with `last_error`);
//! - `GET /api/v1/alert-deliveries?channel_id=&limit=&before=` (viewer): the message log, newest
//!   first.
//!
//! See [`crate::alerts`] for what the dispatcher does with the channels.

use axum::{
    Json,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::{
    AppState,
    alerts::{
        SEVERITIES,
        channel::{ChannelConfig, REDACTED},
        dispatch::{self, DispatchOptions},
        message::{self, ChannelInfo},
        send::Sender,
    },
    auth::{Admin, RequireRole, Viewer},
    db::{
        self,
        alert_channels::{AlertChannel, ChannelFields},
        alert_deliveries::Delivery,
        users::is_unique_violation,
    },
    error::{ApiJson, AppError},
};

/// Longest channel name, in characters.
const MAX_NAME: usize = 100;
/// Longest de-duplication window (a week).
const MAX_DEDUP_WINDOW_SECS: i64 = 7 * 24 * 3600;
/// Largest hourly budget (one a second).
const MAX_PER_HOUR: i64 = 3600;
/// Most deliveries one page returns.
const MAX_LIMIT: i64 = 1000;

/// A channel as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ChannelView {
    /// Row id.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// `email`, `webhook` or `slack`.
    pub kind: String,
    /// The configuration, secrets redacted.
    pub config: Value,
    /// Detections below this severity are not sent.
    pub min_severity: String,
    /// Whether the channel sends anything.
    pub enabled: bool,
    /// Repeats of one (rule, address) within this many seconds fold into the first alert.
    pub dedup_window_secs: i32,
    /// Messages per rolling hour; beyond it, one digest.
    pub max_per_hour: i32,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Last change.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// Redacts what looks secret in a configuration that no longer parses (edited by hand).
fn redact_unparsed(mut config: Value) -> Value {
    if let Some(obj) = config.as_object_mut() {
        for (key, value) in obj.iter_mut() {
            if ["password", "secret", "url"].contains(&key.as_str()) {
                *value = REDACTED.into();
            }
        }
    }
    config
}

impl From<AlertChannel> for ChannelView {
    fn from(c: AlertChannel) -> Self {
        let config = match ChannelConfig::parse(&c.kind, &c.config) {
            Ok(parsed) => parsed.redacted(),
            Err(_) => redact_unparsed(c.config),
        };
        Self {
            id: c.id,
            name: c.name,
            kind: c.kind,
            config,
            min_severity: c.min_severity,
            enabled: c.enabled,
            dedup_window_secs: c.dedup_window_secs,
            max_per_hour: c.max_per_hour,
            created_at: c.created_at,
            updated_at: c.updated_at,
        }
    }
}

/// Every channel.
pub async fn list(
    State(state): State<AppState>,
    _: RequireRole<Viewer>,
) -> Result<Json<Vec<ChannelView>>, AppError> {
    let channels = db::alert_channels::list(&state.db).await?;
    Ok(Json(channels.into_iter().map(ChannelView::from).collect()))
}

/// `POST /api/v1/alert-channels` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewChannel {
    /// Unique name.
    pub name: String,
    /// `email`, `webhook` or `slack`.
    pub kind: String,
    /// Kind-specific configuration.
    pub config: Value,
    /// Default `medium`.
    pub min_severity: Option<String>,
    /// Default `true`.
    pub enabled: Option<bool>,
    /// Default 600.
    pub dedup_window_secs: Option<i64>,
    /// Default 12.
    pub max_per_hour: Option<i64>,
}

/// `PATCH /api/v1/alert-channels/{id}` body: the fields to change.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelPatch {
    /// New name.
    pub name: Option<String>,
    /// Must equal the current kind if given (a channel does not change kind).
    pub kind: Option<String>,
    /// The whole new configuration (redacted secrets keep the stored ones).
    pub config: Option<Value>,
    /// New minimum severity.
    pub min_severity: Option<String>,
    /// Enable or disable.
    pub enabled: Option<bool>,
    /// New de-duplication window.
    pub dedup_window_secs: Option<i64>,
    /// New hourly budget.
    pub max_per_hour: Option<i64>,
}

/// Validated fields, ready to store.
struct Fields {
    name: String,
    kind: String,
    config: ChannelConfig,
    min_severity: String,
    enabled: bool,
    dedup_window_secs: i32,
    max_per_hour: i32,
}

impl Fields {
    fn check(&self) -> Result<(), AppError> {
        let bad =
            |field: &str, reason: String| AppError::BadRequest(format!("`{field}`: {reason}"));
        let chars = self.name.chars().count();
        if self.name.trim() != self.name
            || !(1..=MAX_NAME).contains(&chars)
            || self.name.chars().any(char::is_control)
        {
            return Err(bad(
                "name",
                format!("1 to {MAX_NAME} characters, no control characters or surrounding spaces"),
            ));
        }
        if !SEVERITIES.contains(&self.min_severity.as_str()) {
            return Err(bad(
                "min_severity",
                format!(
                    "unknown severity `{}` (one of {})",
                    self.min_severity,
                    SEVERITIES.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

fn window(value: i64) -> Result<i32, AppError> {
    if (0..=MAX_DEDUP_WINDOW_SECS).contains(&value) {
        Ok(i32::try_from(value).unwrap_or_default())
    } else {
        Err(AppError::BadRequest(format!(
            "`dedup_window_secs`: {value} is outside 0..={MAX_DEDUP_WINDOW_SECS} (0: no \
             de-duplication)"
        )))
    }
}

fn per_hour(value: i64) -> Result<i32, AppError> {
    if (1..=MAX_PER_HOUR).contains(&value) {
        Ok(i32::try_from(value).unwrap_or_default())
    } else {
        Err(AppError::BadRequest(format!(
            "`max_per_hour`: {value} is outside 1..={MAX_PER_HOUR}"
        )))
    }
}

fn parse_config(kind: &str, config: &Value) -> Result<ChannelConfig, AppError> {
    ChannelConfig::parse(kind, config).map_err(|e| AppError::BadRequest(e.to_string()))
}

async fn store(
    ex: impl sqlx::PgExecutor<'_>,
    id: Option<i64>,
    fields: &Fields,
) -> Result<AlertChannel, AppError> {
    let config = fields.config.to_value();
    let stored = ChannelFields {
        name: &fields.name,
        kind: &fields.kind,
        config: &config,
        min_severity: &fields.min_severity,
        enabled: fields.enabled,
        dedup_window_secs: fields.dedup_window_secs,
        max_per_hour: fields.max_per_hour,
    };
    let result = match id {
        None => db::alert_channels::insert(ex, &stored).await,
        Some(id) => db::alert_channels::update(ex, id, &stored).await,
    };
    result.map_err(|err| {
        if is_unique_violation(&err) {
            AppError::Conflict(format!("a channel named `{}` exists", fields.name))
        } else {
            err.into()
        }
    })
}

/// Creates a channel.
pub async fn create(
    State(state): State<AppState>,
    user: RequireRole<Admin>,
    ApiJson(body): ApiJson<NewChannel>,
) -> Result<Response, AppError> {
    let fields = Fields {
        config: parse_config(&body.kind, &body.config)?,
        name: body.name,
        kind: body.kind,
        min_severity: body.min_severity.unwrap_or_else(|| "medium".to_owned()),
        enabled: body.enabled.unwrap_or(true),
        dedup_window_secs: window(body.dedup_window_secs.unwrap_or(600))?,
        max_per_hour: per_hour(body.max_per_hour.unwrap_or(12))?,
    };
    fields.check()?;
    let mut tx = state.db.begin().await?;
    let channel = store(&mut *tx, None, &fields).await?;
    let view = ChannelView::from(channel);
    db::audit_log::record(
        &mut *tx,
        &user.actor(),
        "alert_channel.create",
        Some(&format!("alert_channel:{}", view.id)),
        json!({ "name": view.name, "kind": view.kind, "config": view.config }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(channel = %view.name, kind = %view.kind, by = %user.user.username, "Alert channel created.");
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// Changes a channel.
pub async fn update(
    State(state): State<AppState>,
    user: RequireRole<Admin>,
    Path(id): Path<i64>,
    ApiJson(patch): ApiJson<ChannelPatch>,
) -> Result<Json<ChannelView>, AppError> {
    let mut tx = state.db.begin().await?;
    let current = db::alert_channels::lock(&mut *tx, id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no alert channel {id}")))?;
    if let Some(kind) = &patch.kind
        && *kind != current.kind
    {
        return Err(AppError::BadRequest(format!(
            "`kind`: a channel does not change kind ({} to {kind}); create a new channel",
            current.kind
        )));
    }
    let config = match patch.config {
        Some(new) => {
            // Secrets sent back redacted keep the stored ones.
            let restored = match ChannelConfig::parse(&current.kind, &current.config) {
                Ok(stored) => stored
                    .restore_secrets(new)
                    .map_err(|e| AppError::BadRequest(e.to_string()))?,
                Err(_) => new,
            };
            parse_config(&current.kind, &restored)?
        }
        None => parse_config(&current.kind, &current.config)?,
    };
    let fields = Fields {
        name: patch.name.unwrap_or_else(|| current.name.clone()),
        kind: current.kind.clone(),
        config,
        min_severity: patch
            .min_severity
            .unwrap_or_else(|| current.min_severity.clone()),
        enabled: patch.enabled.unwrap_or(current.enabled),
        dedup_window_secs: match patch.dedup_window_secs {
            Some(v) => window(v)?,
            None => current.dedup_window_secs,
        },
        max_per_hour: match patch.max_per_hour {
            Some(v) => per_hour(v)?,
            None => current.max_per_hour,
        },
    };
    fields.check()?;
    let channel = store(&mut *tx, Some(id), &fields).await?;
    let mut changed = Vec::new();
    if channel.name != current.name {
        changed.push("name");
    }
    if channel.config != current.config {
        changed.push("config");
    }
    if channel.min_severity != current.min_severity {
        changed.push("min_severity");
    }
    if channel.enabled != current.enabled {
        changed.push("enabled");
    }
    if channel.dedup_window_secs != current.dedup_window_secs {
        changed.push("dedup_window_secs");
    }
    if channel.max_per_hour != current.max_per_hour {
        changed.push("max_per_hour");
    }
    let view = ChannelView::from(channel);
    db::audit_log::record(
        &mut *tx,
        &user.actor(),
        "alert_channel.update",
        Some(&format!("alert_channel:{id}")),
        json!({ "name": view.name, "changed": changed, "config": view.config }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(channel = %view.name, by = %user.user.username, "Alert channel changed.");
    Ok(Json(view))
}

/// Deletes a channel and its delivery log.
pub async fn delete(
    State(state): State<AppState>,
    user: RequireRole<Admin>,
    Path(id): Path<i64>,
) -> Result<StatusCode, AppError> {
    let mut tx = state.db.begin().await?;
    let name = db::alert_channels::delete(&mut *tx, id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no alert channel {id}")))?;
    db::audit_log::record(
        &mut *tx,
        &user.actor(),
        "alert_channel.delete",
        Some(&format!("alert_channel:{id}")),
        json!({ "name": name }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(channel = %name, by = %user.user.username, "Alert channel deleted.");
    Ok(StatusCode::NO_CONTENT)
}

/// A delivery as the API shows it: the row and its rendered subject.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryView {
    /// The row.
    #[serde(flatten)]
    pub delivery: Delivery,
    /// The message's subject line.
    pub subject: Option<String>,
}

impl From<Delivery> for DeliveryView {
    fn from(delivery: Delivery) -> Self {
        let info = ChannelInfo {
            name: &delivery.channel,
            max_per_hour: 0,
        };
        let subject = message::render(&delivery.kind, &delivery.payload, info)
            .ok()
            .map(|m| m.subject);
        Self { delivery, subject }
    }
}

/// Sends a test message now.
pub async fn test(
    State(state): State<AppState>,
    user: RequireRole<Admin>,
    Path(id): Path<i64>,
) -> Result<Json<DeliveryView>, AppError> {
    let channel = db::alert_channels::get(&state.db, id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no alert channel {id}")))?;
    let sender =
        Sender::new(DispatchOptions::default().send_timeout).map_err(AppError::internal)?;
    let delivery_id = dispatch::send_test(&state.db, &sender, &channel)
        .await
        .map_err(AppError::internal)?;
    let delivery = db::alert_deliveries::get(&state.db, delivery_id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no delivery {delivery_id}")))?;
    db::audit_log::record(
        &state.db,
        &user.actor(),
        "alert_channel.test",
        Some(&format!("alert_channel:{id}")),
        json!({ "name": channel.name, "delivery": delivery_id, "status": delivery.status }),
    )
    .await?;
    Ok(Json(DeliveryView::from(delivery)))
}

/// `GET /api/v1/alert-deliveries` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryParams {
    /// Only this channel's.
    pub channel_id: Option<i64>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<i64>,
    /// Only ids below this (the last id of the previous page).
    pub before: Option<i64>,
}

/// A page of the delivery log, newest first.
pub async fn deliveries(
    State(state): State<AppState>,
    _: RequireRole<Viewer>,
    Query(params): Query<DeliveryParams>,
) -> Result<Json<Vec<DeliveryView>>, AppError> {
    let limit = params.limit.unwrap_or(100).clamp(1, MAX_LIMIT);
    let rows =
        db::alert_deliveries::list(&state.db, params.channel_id, limit, params.before).await?;
    Ok(Json(rows.into_iter().map(DeliveryView::from).collect()))
}
