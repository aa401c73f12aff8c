//! Users: `GET/POST /api/v1/users`, `PATCH/DELETE /api/v1/users/{id}`, admins only. The last
//! enabled admin can be neither deleted, demoted nor disabled. Disabling a user or changing its
//! password ends its sessions.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};

use crate::{
    AppState,
    auth::{Admin, RequireRole, Role, normalize_username, password, validate_username},
    db::{
        self,
        users::{Changes, User, is_unique_violation},
    },
    error::{ApiJson, AppError},
};

/// `POST /api/v1/users` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// Login name (stored lower-case).
    pub username: String,
    /// Role.
    pub role: Role,
    /// Password; when absent, one is generated and returned once.
    pub password: Option<String>,
}

/// `POST /api/v1/users` response.
#[derive(Debug, Serialize)]
pub struct Created {
    /// The new user.
    pub user: User,
    /// The generated password, shown this once (absent when the request set one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// `PATCH /api/v1/users/{id}` body: any of the fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    /// New role.
    pub role: Option<Role>,
    /// Disable or enable.
    pub disabled: Option<bool>,
    /// New password.
    pub password: Option<String>,
}

/// Every user.
pub async fn list(
    State(state): State<AppState>,
    _: RequireRole<Admin>,
) -> Result<Json<Vec<User>>, AppError> {
    Ok(Json(db::users::list(&state.db).await?))
}

/// Creates a user.
pub async fn create(
    State(state): State<AppState>,
    admin: RequireRole<Admin>,
    ApiJson(body): ApiJson<CreateUser>,
) -> Result<Response, AppError> {
    let username = normalize_username(&body.username);
    validate_username(&username).map_err(AppError::BadRequest)?;
    let (password, generated) = match body.password {
        Some(p) => {
            password::validate(&p).map_err(AppError::BadRequest)?;
            (p, false)
        }
        None => (password::generate(), true),
    };
    let hash = password::hash_async(password.clone())
        .await
        .map_err(AppError::internal)?;
    let mut tx = state.db.begin().await?;
    let user = match db::users::insert(&mut *tx, &username, &hash, body.role).await {
        Ok(user) => user,
        Err(err) if is_unique_violation(&err) => {
            return Err(AppError::Conflict(format!("user `{username}` exists")));
        }
        Err(err) => return Err(err.into()),
    };
    db::audit_log::record(
        &mut *tx,
        &admin.actor(),
        "user.create",
        Some(&format!("user:{username}")),
        serde_json::json!({ "id": user.id, "role": user.role }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(username = %user.username, role = %user.role, by = %admin.user.username, "User created.");
    let body = Created {
        user,
        password: generated.then_some(password),
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Changes a user's role, disabled flag or password.
pub async fn update(
    State(state): State<AppState>,
    admin: RequireRole<Admin>,
    Path(id): Path<i64>,
    ApiJson(body): ApiJson<UpdateUser>,
) -> Result<Json<User>, AppError> {
    if body.role.is_none() && body.disabled.is_none() && body.password.is_none() {
        return Err(AppError::BadRequest(
            "nothing to change: give role, disabled or password".to_owned(),
        ));
    }
    let password_hash = match &body.password {
        Some(p) => {
            password::validate(p).map_err(AppError::BadRequest)?;
            Some(
                password::hash_async(p.clone())
                    .await
                    .map_err(AppError::internal)?,
            )
        }
        None => None,
    };
    let mut tx = state.db.begin().await?;
    let admins = db::users::lock_enabled_admins(&mut *tx).await?;
    let before = db::users::get(&mut *tx, id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no user {id}")))?;
    let loses_admin = body.role.is_some_and(|r| r != Role::Admin) || body.disabled == Some(true);
    if admins == [id] && loses_admin {
        return Err(AppError::Conflict(format!(
            "`{}` is the last enabled admin; make another admin first",
            before.username
        )));
    }
    let changes = Changes {
        role: body.role,
        disabled: body.disabled,
        password_hash,
    };
    let user = db::users::update(&mut *tx, id, &changes)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no user {id}")))?;
    let mut ended = 0;
    if changes.password_hash.is_some() || body.disabled == Some(true) {
        ended = db::sessions::delete_for_user(&mut *tx, id).await?;
    }
    db::audit_log::record(
        &mut *tx,
        &admin.actor(),
        "user.update",
        Some(&format!("user:{}", user.username)),
        serde_json::json!({
            "id": id,
            "role": body.role.map(|r| serde_json::json!({ "from": before.role, "to": r })),
            "disabled": body.disabled,
            "password_changed": changes.password_hash.is_some(),
            "sessions_ended": ended,
        }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(username = %user.username, by = %admin.user.username, "User updated.");
    Ok(Json(user))
}

/// Deletes a user (and its sessions).
pub async fn delete(
    State(state): State<AppState>,
    admin: RequireRole<Admin>,
    Path(id): Path<i64>,
) -> Result<StatusCode, AppError> {
    let mut tx = state.db.begin().await?;
    let admins = db::users::lock_enabled_admins(&mut *tx).await?;
    let user = db::users::get(&mut *tx, id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no user {id}")))?;
    if admins == [id] {
        return Err(AppError::Conflict(format!(
            "`{}` is the last enabled admin and cannot be deleted",
            user.username
        )));
    }
    // Audit first: an admin deleting itself is the row's actor, and the delete then sets
    // actor_user_id to NULL (the actor's name stays).
    db::audit_log::record(
        &mut *tx,
        &admin.actor(),
        "user.delete",
        Some(&format!("user:{}", user.username)),
        serde_json::json!({ "id": id, "role": user.role }),
    )
    .await?;
    db::users::delete(&mut *tx, id).await?;
    tx.commit().await?;
    tracing::info!(username = %user.username, by = %admin.user.username, "User deleted.");
    Ok(StatusCode::NO_CONTENT)
}
