//! The policy allowlist: `POST /api/v1/allowlist` {net, group?, force?} and
//! `DELETE /api/v1/allowlist?net=NET&group=NAME` (operator). Same address validation as
//! attackers; each change is a `policy` revision carrying the group's new policy.
//!
//! `GET /api/v1/allowlists` ([`ServiceAuth`]) gives a `mirage-server` the union of every group's
//! allowlist, which it never flags: a verdict for those sources would be stored but never
//! enforced, so not producing it saves both sides the work and keeps the attack log to what
//! matters.

use axum::{
    Json,
    extract::{Query, State},
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    AppState,
    auth::{Operator, RequireRole, ServiceAuth},
    db::{self, policies::Policy, policy_revisions::Revision},
    error::{ApiJson, AppError},
    policy::{self, net},
    routes::attackers::{check_force, group},
};

/// `POST /api/v1/allowlist` body and `DELETE` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    /// Address or range.
    pub net: String,
    /// Agent group name (default `default`).
    pub group: Option<String>,
    /// Admins only: allow ranges broader than /16 (IPv4) or /32 (IPv6).
    #[serde(default)]
    pub force: bool,
}

/// `GET /api/v1/allowlists` reply.
#[derive(Debug, Serialize)]
pub struct Union {
    /// Every group's allowlist entries, deduplicated and sorted.
    pub networks: Vec<IpNet>,
    /// The policy head revision they were read at.
    pub revision: i64,
}

/// The union of every group's allowlist, for a `mirage-server`.
pub async fn union(
    State(state): State<AppState>,
    _server: ServiceAuth,
) -> Result<Json<Union>, AppError> {
    let (networks, revision) = db::policies::allowlist_union(&state.db).await?;
    Ok(Json(Union { networks, revision }))
}

/// Adds an entry; returns the group's policy.
pub async fn add(
    State(state): State<AppState>,
    user: RequireRole<Operator>,
    ApiJson(body): ApiJson<Change>,
) -> Result<Json<Policy>, AppError> {
    change(state, user, body, true).await
}

/// Removes an entry; returns the group's policy.
pub async fn remove(
    State(state): State<AppState>,
    user: RequireRole<Operator>,
    Query(body): Query<Change>,
) -> Result<Json<Policy>, AppError> {
    change(state, user, body, false).await
}

async fn change(
    state: AppState,
    user: RequireRole<Operator>,
    body: Change,
    add: bool,
) -> Result<Json<Policy>, AppError> {
    check_force(body.force, user.user.role)?;
    let net = net::parse(&body.net, body.force || !add).map_err(AppError::BadRequest)?;
    let name = body.group.as_deref().unwrap_or("default");
    let group_id = group(&state, Some(name))
        .await?
        .ok_or_else(|| AppError::BadRequest(format!("no agent group `{name}`")))?;
    let mut tx = state.db.begin().await?;
    let revision = db::policy_revisions::next(&mut *tx).await?;
    let before = db::policies::lock(&mut *tx, group_id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("group `{name}` has no policy")))?;
    let mut allowlist = before.allowlist.clone();
    if add {
        if allowlist.contains(&net) {
            return Err(AppError::Conflict(format!(
                "`{net}` is already on the allowlist of `{name}`"
            )));
        }
        allowlist.push(net);
    } else {
        let len = allowlist.len();
        allowlist.retain(|n| *n != net);
        if allowlist.len() == len {
            return Err(AppError::NotFound(format!(
                "`{net}` is not on the allowlist of `{name}`"
            )));
        }
    }
    let policy =
        db::policies::set_allowlist(&mut *tx, group_id, &allowlist, revision, Some(user.user.id))
            .await?;
    let rev = Revision {
        revision,
        group_id: Some(group_id),
        op: "policy".to_owned(),
        net: None,
        action: None,
        expires_at: None,
        details: serde_json::to_value(&policy).map_err(AppError::internal)?,
    };
    policy::record(&mut tx, &rev).await?;
    let action = if add {
        "allowlist.add"
    } else {
        "allowlist.remove"
    };
    db::audit_log::record(
        &mut *tx,
        &user.actor(),
        action,
        Some(&format!("group:{name}")),
        serde_json::json!({ "net": net, "revision": revision }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(%net, group = name, revision, by = %user.user.username, "Allowlist changed.");
    Ok(Json(policy))
}
