//! Attackers: `GET /api/v1/attackers?q=NET&limit=N&before=ID` (viewer; `q` finds entries that
//! contain the address or range or lie inside it), `POST /api/v1/attackers` (operator; block or
//! re-block) and `DELETE /api/v1/attackers/{id}` (operator; unblock). Each change takes the next
//! policy revision, writes its revision row and an audit row, and notifies the streams, all in
//! one transaction.

use axum::{
    Json,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use time::{Duration, OffsetDateTime};

use crate::{
    AppState,
    auth::{Operator, RequireRole, Role, Viewer},
    db::{
        self,
        attackers::{Attacker, ManualBlock},
        policy_revisions::Revision,
    },
    error::{ApiJson, AppError},
    policy::{self, net},
};

/// Most rows one page returns.
const MAX_LIMIT: i64 = 1000;
/// Longest TTL (a year); beyond that, leave `ttl_secs` out (no expiry).
const MAX_TTL_SECS: i64 = 366 * 24 * 3600;

/// `GET /api/v1/attackers` parameters.
#[derive(Debug, Deserialize)]
pub struct Params {
    /// An address or range: entries overlapping it.
    pub q: Option<String>,
    /// Page size (default 100, at most 1000).
    pub limit: Option<i64>,
    /// Only ids below this (the last id of the previous page).
    pub before: Option<i64>,
}

/// A page of entries, newest first.
pub async fn list(
    State(state): State<AppState>,
    _: RequireRole<Viewer>,
    Query(params): Query<Params>,
) -> Result<Json<Vec<Attacker>>, AppError> {
    let q = match params.q.as_deref().map(str::trim).filter(|q| !q.is_empty()) {
        // Any prefix is fine for a search.
        Some(q) => Some(net::parse(q, true).map_err(AppError::BadRequest)?),
        None => None,
    };
    let limit = params.limit.unwrap_or(100).clamp(1, MAX_LIMIT);
    Ok(Json(
        db::attackers::search(&state.db, q, limit, params.before).await?,
    ))
}

/// `POST /api/v1/attackers` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Block {
    /// Address or range.
    pub net: String,
    /// `drop`, `redirect`, `reflect` or `default` (the group's mode; the default).
    pub action: Option<String>,
    /// Lifetime; absent: until unblocked.
    pub ttl_secs: Option<i64>,
    /// Why (shown in the UI and the audit log).
    #[serde(default)]
    pub reason: String,
    /// Agent group name; absent: every group.
    pub group: Option<String>,
    /// Admins only: allow ranges broader than /16 (IPv4) or /32 (IPv6).
    #[serde(default)]
    pub force: bool,
}

/// Resolves a group name; `None` stays `None`.
pub(crate) async fn group(state: &AppState, name: Option<&str>) -> Result<Option<i64>, AppError> {
    match name {
        None => Ok(None),
        Some(name) => db::agents::group_id(&state.db, name)
            .await?
            .map(Some)
            .ok_or_else(|| AppError::BadRequest(format!("no agent group `{name}`"))),
    }
}

/// Checks `force`: admins only.
pub(crate) fn check_force(force: bool, role: Role) -> Result<(), AppError> {
    if force && role < Role::Admin {
        return Err(AppError::Forbidden(
            "`force` (ranges broader than /16 or /32) needs the admin role".to_owned(),
        ));
    }
    Ok(())
}

/// Blocks an address or range (or changes an existing entry for it).
pub async fn create(
    State(state): State<AppState>,
    user: RequireRole<Operator>,
    ApiJson(body): ApiJson<Block>,
) -> Result<Response, AppError> {
    check_force(body.force, user.user.role)?;
    let net = net::parse(&body.net, body.force).map_err(AppError::BadRequest)?;
    let action = body.action.as_deref().unwrap_or("default");
    if !["default", "drop", "redirect", "reflect"].contains(&action) {
        return Err(AppError::BadRequest(format!(
            "unknown action `{action}` (drop, redirect, reflect or default)"
        )));
    }
    let expires_at = match body.ttl_secs {
        Some(ttl) if !(1..=MAX_TTL_SECS).contains(&ttl) => {
            return Err(AppError::BadRequest(format!(
                "ttl_secs must be between 1 and {MAX_TTL_SECS}; leave it out for no expiry"
            )));
        }
        Some(ttl) => Some(OffsetDateTime::now_utc() + Duration::seconds(ttl)),
        None => None,
    };
    if body.reason.len() > 1000 {
        return Err(AppError::BadRequest(
            "reason is longer than 1000 bytes".to_owned(),
        ));
    }
    let group_id = group(&state, body.group.as_deref()).await?;
    let mut tx = state.db.begin().await?;
    let revision = db::policy_revisions::next(&mut *tx).await?;
    if let Some(allowed) = db::policies::allowlist_overlap(&mut *tx, net, group_id).await? {
        return Err(AppError::BadRequest(format!(
            "`{net}` overlaps the allowlist entry `{allowed}`; allowlisted sources are never \
             blocked (remove the allowlist entry first)"
        )));
    }
    let block = ManualBlock {
        group_id,
        net,
        action,
        reason: &body.reason,
        expires_at,
        created_by: Some(user.user.id),
        revision,
    };
    let attacker = db::attackers::upsert_manual(&mut *tx, &block).await?;
    let rev = Revision {
        revision,
        group_id,
        op: "add".to_owned(),
        net: Some(net),
        action: Some(action.to_owned()),
        expires_at,
        details: serde_json::json!({ "id": attacker.id }),
    };
    policy::record(&mut tx, &rev).await?;
    db::audit_log::record(
        &mut *tx,
        &user.actor(),
        "attacker.block",
        Some(&format!("net:{net}")),
        serde_json::json!({
            "id": attacker.id, "action": action, "group_id": group_id, "revision": revision,
            "ttl_secs": body.ttl_secs, "reason": body.reason, "force": body.force,
        }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(%net, action, revision, by = %user.user.username, "Attacker blocked.");
    Ok((StatusCode::CREATED, Json(attacker)).into_response())
}

/// Unblocks an entry.
pub async fn delete(
    State(state): State<AppState>,
    user: RequireRole<Operator>,
    Path(id): Path<i64>,
) -> Result<StatusCode, AppError> {
    let mut tx = state.db.begin().await?;
    let revision = db::policy_revisions::next(&mut *tx).await?;
    let attacker = db::attackers::delete(&mut *tx, id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no attacker {id}")))?;
    let rev = Revision {
        revision,
        group_id: attacker.group_id,
        op: "remove".to_owned(),
        net: Some(attacker.net),
        action: Some(attacker.action.clone()),
        expires_at: attacker.expires_at,
        details: serde_json::json!({ "id": id }),
    };
    policy::record(&mut tx, &rev).await?;
    db::audit_log::record(
        &mut *tx,
        &user.actor(),
        "attacker.unblock",
        Some(&format!("net:{}", attacker.net)),
        serde_json::json!({ "id": id, "revision": revision }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(net = %attacker.net, revision, by = %user.user.username, "Attacker unblocked.");
    Ok(StatusCode::NO_CONTENT)
}
