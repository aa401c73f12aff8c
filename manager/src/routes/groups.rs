//! Agent groups and the policy editor:
//!
//! - `GET /api/v1/groups` (viewer): every group with its agent counts and its policy;
//! - `POST /api/v1/groups` {name, description?} (admin): a new group with the default policy;
//! - `DELETE /api/v1/groups/{name}` (admin): refused (409) for `default` and while live agents or
//!   unused enrollment tokens belong to the group;
//! - `GET /api/v1/groups/{name}/policy` (viewer) and `PUT` (operator): the whole policy, validated
//!   by [`crate::policy::validate`], with optional optimistic concurrency (`expected_revision`).
//!
//! A PUT that changes something takes the next policy revision, replaces the row, records an
//! `op = 'policy'` revision carrying the new policy (which every agent of the group receives as a
//! delta) and audits the changed fields, in one transaction. A PUT that changes nothing rolls back
//! and so takes no revision.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::{
    AppState,
    auth::{Admin, Operator, RequireRole, Role, Viewer},
    db::{
        self,
        groups::{DEFAULT_GROUP, Group},
        policies::{NewPolicy, Policy, Shadowed},
        policy_revisions::Revision,
        users::is_unique_violation,
    },
    error::{ApiJson, AppError},
    policy::{
        self,
        validate::{PolicyBody, PolicyError, ValidPolicy},
    },
};

/// Longest group description, in bytes.
const MAX_DESCRIPTION: usize = 1000;

/// A group's policy as the editor shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyView {
    /// The group's name.
    pub group: String,
    /// The policy, as agents receive it (`group_id`, `mode`, ..., `revision`).
    #[serde(flatten)]
    pub policy: Policy,
    /// When it last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// Who changed it last (`None`: never changed, or the user was deleted).
    pub updated_by: Option<String>,
}

/// A group in `GET /api/v1/groups`.
#[derive(Debug, Clone, Serialize)]
pub struct GroupView {
    /// Id, name, description, creation time and agent counts.
    #[serde(flatten)]
    pub group: Group,
    /// Its policy.
    pub policy: PolicyView,
}

/// `PUT /api/v1/groups/{name}/policy` response.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyChange {
    /// The policy now in force.
    pub policy: PolicyView,
    /// Whether this PUT changed it (and so took a revision).
    pub changed: bool,
    /// The changed fields (`{"mode": {"from", "to"}, "allowlist": {"added", "removed"}...}`).
    pub changes: Value,
    /// Live attacker entries of the group (or of every group) that the allowlist overrides: the
    /// agents will not act on them where they overlap.
    pub shadowed: Vec<Shadowed>,
}

/// Checks a group name: 1 to 64 characters of `a-z 0-9 . _ -`, starting with a letter or digit.
pub fn validate_group_name(name: &str) -> Result<(), AppError> {
    let ok_len = (1..=64).contains(&name.len());
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    let ok_start = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok_len && ok_chars && ok_start {
        Ok(())
    } else {
        Err(AppError::BadRequest(format!(
            "`name`: invalid group name `{name}`: 1 to 64 characters of a-z, 0-9, `.`, `_`, `-`, \
             starting with a letter or digit"
        )))
    }
}

async fn policy_view(
    ex: &mut sqlx::PgConnection,
    name: &str,
    group_id: i64,
) -> Result<PolicyView, AppError> {
    let policy = db::policies::get(&mut *ex, group_id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("group `{name}` has no policy")))?;
    let (updated_at, updated_by) = db::groups::policy_meta(&mut *ex, group_id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("group `{name}` has no policy")))?;
    Ok(PolicyView {
        group: name.to_owned(),
        policy,
        updated_at,
        updated_by,
    })
}

/// Every group with its policy.
pub async fn list(
    State(state): State<AppState>,
    _: RequireRole<Viewer>,
) -> Result<Json<Vec<GroupView>>, AppError> {
    // One snapshot for the groups and their policies.
    let mut tx = state.db.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let groups = db::groups::list(&mut *tx).await?;
    let mut out = Vec::with_capacity(groups.len());
    for group in groups {
        let policy = policy_view(&mut tx, &group.name, group.id).await?;
        out.push(GroupView { group, policy });
    }
    tx.commit().await?;
    Ok(Json(out))
}

/// `POST /api/v1/groups` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewGroup {
    /// Unique name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// Creates a group with the default policy.
pub async fn create(
    State(state): State<AppState>,
    user: RequireRole<Admin>,
    ApiJson(body): ApiJson<NewGroup>,
) -> Result<Response, AppError> {
    validate_group_name(&body.name)?;
    if body.description.len() > MAX_DESCRIPTION {
        return Err(AppError::BadRequest(format!(
            "`description`: longer than {MAX_DESCRIPTION} bytes"
        )));
    }
    let mut tx = state.db.begin().await?;
    let id = match db::groups::insert(&mut tx, &body.name, &body.description).await {
        Ok(id) => id,
        Err(err) if is_unique_violation(&err) => {
            return Err(AppError::Conflict(format!(
                "a group named `{}` exists",
                body.name
            )));
        }
        Err(err) => return Err(err.into()),
    };
    db::audit_log::record(
        &mut *tx,
        &user.actor(),
        "group.create",
        Some(&format!("group:{}", body.name)),
        json!({ "id": id, "description": body.description }),
    )
    .await?;
    let group = db::groups::get(&mut *tx, &body.name)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no group `{}`", body.name)))?;
    let policy = policy_view(&mut tx, &body.name, id).await?;
    tx.commit().await?;
    tracing::info!(group = %body.name, by = %user.user.username, "Group created.");
    Ok((StatusCode::CREATED, Json(GroupView { group, policy })).into_response())
}

/// Deletes a group that nothing uses any more. Its revoked agents' records move to `default`;
/// its attacker entries and policy revisions go with it (no live agent enforces them).
pub async fn delete(
    State(state): State<AppState>,
    user: RequireRole<Admin>,
    Path(name): Path<String>,
) -> Result<StatusCode, AppError> {
    if name == DEFAULT_GROUP {
        return Err(AppError::Conflict(
            "the `default` group cannot be deleted: agents enrolled without a group join it"
                .to_owned(),
        ));
    }
    let mut tx = state.db.begin().await?;
    let id = db::groups::lock(&mut *tx, &name)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no group `{name}`")))?;
    let usage = db::groups::usage(&mut *tx, id).await?;
    if usage.agents > 0 || usage.tokens > 0 {
        return Err(AppError::Conflict(format!(
            "group `{name}` is in use by {} agent(s) and {} unused enrollment token(s); revoke \
             the agents and let the tokens expire first",
            usage.agents, usage.tokens
        )));
    }
    let default_id = db::agents::group_id(&mut *tx, DEFAULT_GROUP)
        .await?
        .ok_or_else(|| AppError::Conflict("the `default` group is missing".to_owned()))?;
    let moved = db::groups::move_revoked_agents(&mut *tx, id, default_id).await?;
    let attackers = db::groups::delete(&mut tx, id).await?;
    db::audit_log::record(
        &mut *tx,
        &user.actor(),
        "group.delete",
        Some(&format!("group:{name}")),
        json!({ "id": id, "revoked_agents_moved_to_default": moved, "attackers_removed": attackers }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(group = %name, by = %user.user.username, "Group deleted.");
    Ok(StatusCode::NO_CONTENT)
}

async fn group_id(state: &AppState, name: &str) -> Result<i64, AppError> {
    db::agents::group_id(&state.db, name)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no group `{name}`")))
}

/// A group's policy.
pub async fn get_policy(
    State(state): State<AppState>,
    _: RequireRole<Viewer>,
    Path(name): Path<String>,
) -> Result<Json<PolicyView>, AppError> {
    let id = group_id(&state, &name).await?;
    let mut conn = state.db.acquire().await?;
    Ok(Json(policy_view(&mut conn, &name, id).await?))
}

/// Replaces a group's policy.
pub async fn put_policy(
    State(state): State<AppState>,
    user: RequireRole<Operator>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<PolicyBody>,
) -> Result<Json<PolicyChange>, AppError> {
    let group_id = group_id(&state, &name).await?;
    let new =
        policy::validate::validate(&body, user.user.role >= Role::Admin).map_err(
            |err| match err {
                PolicyError::ForceNeedsAdmin => AppError::Forbidden(err.to_string()),
                PolicyError::Invalid { .. } => AppError::BadRequest(err.to_string()),
            },
        )?;
    let mut tx = state.db.begin().await?;
    let revision = db::policy_revisions::next(&mut *tx).await?;
    let before = db::policies::lock(&mut *tx, group_id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("group `{name}` has no policy")))?;
    if let Some(expected) = body.expected_revision
        && expected != before.revision
    {
        return Err(AppError::Conflict(format!(
            "the policy of `{name}` changed since revision {expected} (it is at revision {} now); \
             reload it and apply your changes again",
            before.revision
        )));
    }
    let shadowed = db::policies::shadowed(&mut *tx, group_id, &new.allowlist).await?;
    let changes = diff(&before, &new)?;
    if changes.as_object().is_none_or(serde_json::Map::is_empty) {
        // Nothing changed: give the revision back (the rollback undoes the head's increment).
        let policy = policy_view(&mut tx, &name, group_id).await?;
        tx.rollback().await?;
        return Ok(Json(PolicyChange {
            policy,
            changed: false,
            changes,
            shadowed,
        }));
    }
    let sandbox_targets = serde_json::to_value(&new.sandbox_targets).map_err(AppError::internal)?;
    let nat = serde_json::to_value(&new.nat).map_err(AppError::internal)?;
    let stored = NewPolicy {
        mode: &new.mode,
        redirect_model: &new.redirect_model,
        allowlist: &new.allowlist,
        allowlisted_ports: &new.allowlisted_ports,
        sandbox_targets: &sandbox_targets,
        nat: &nat,
        default_ttl_secs: new.default_ttl_secs,
        default_action: &new.default_action,
    };
    let policy =
        db::policies::replace(&mut *tx, group_id, &stored, revision, Some(user.user.id)).await?;
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
    db::audit_log::record(
        &mut *tx,
        &user.actor(),
        "policy.update",
        Some(&format!("group:{name}")),
        json!({
            "revision": revision, "changes": changes, "force": body.force,
            "shadowed": shadowed.iter().map(|s| s.id).collect::<Vec<_>>(),
        }),
    )
    .await?;
    let view = policy_view(&mut tx, &name, group_id).await?;
    tx.commit().await?;
    tracing::info!(
        group = %name, revision, shadowed = shadowed.len(), by = %user.user.username,
        "Policy changed."
    );
    Ok(Json(PolicyChange {
        policy: view,
        changed: true,
        changes,
        shadowed,
    }))
}

/// The fields of `new` that differ from `before`: `{"from", "to"}` for values,
/// `{"added", "removed"}` for the allowlist and the ports (whose order carries no meaning).
fn diff(before: &Policy, new: &ValidPolicy) -> Result<Value, AppError> {
    let mut out = serde_json::Map::new();
    let mut value = |field: &str, from: Value, to: Value| {
        if from != to {
            out.insert(field.to_owned(), json!({ "from": from, "to": to }));
        }
    };
    value("mode", json!(before.mode), json!(new.mode));
    value(
        "redirect_model",
        json!(before.redirect_model),
        json!(new.redirect_model),
    );
    value(
        "sandbox_targets",
        before.sandbox_targets.clone(),
        serde_json::to_value(&new.sandbox_targets).map_err(AppError::internal)?,
    );
    value(
        "nat",
        before.nat.clone(),
        serde_json::to_value(&new.nat).map_err(AppError::internal)?,
    );
    value(
        "default_ttl_secs",
        json!(before.default_ttl_secs),
        json!(new.default_ttl_secs),
    );
    value(
        "default_action",
        json!(before.default_action),
        json!(new.default_action),
    );
    let nets = set_diff::<IpNet>(&before.allowlist, &new.allowlist);
    if let Some(nets) = nets {
        out.insert("allowlist".to_owned(), nets);
    }
    if let Some(ports) = set_diff::<String>(&before.allowlisted_ports, &new.allowlisted_ports) {
        out.insert("allowlisted_ports".to_owned(), ports);
    }
    Ok(Value::Object(out))
}

fn set_diff<T: Ord + Clone + Serialize>(before: &[T], after: &[T]) -> Option<Value> {
    use std::collections::BTreeSet;
    let before: BTreeSet<&T> = before.iter().collect();
    let after: BTreeSet<&T> = after.iter().collect();
    let added: Vec<&T> = after.difference(&before).copied().collect();
    let removed: Vec<&T> = before.difference(&after).copied().collect();
    (!added.is_empty() || !removed.is_empty())
        .then(|| json!({ "added": added, "removed": removed }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_group_names() {
        for ok in ["default", "web", "dmz-2", "eu.west_1"] {
            validate_group_name(ok).unwrap();
        }
        for bad in ["", "Web", "-x", "a b", "é", &"a".repeat(65)] {
            assert!(validate_group_name(bad).is_err(), "{bad}");
        }
    }
}
