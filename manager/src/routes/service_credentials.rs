//! Service credentials for `mirage-server`: `GET/POST /api/v1/service-credentials` and
//! `DELETE /api/v1/service-credentials/{id}` (revoke), admins only. The credential is shown once.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};

use crate::{
    AppState,
    auth::{Admin, RequireRole, new_token, token_hash, validate_username},
    db::{self, service_credentials::ServiceCredential, users::is_unique_violation},
    error::{ApiJson, AppError},
};

/// `POST /api/v1/service-credentials` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Create {
    /// The server's name (same rules as a username).
    pub name: String,
}

/// `POST /api/v1/service-credentials` response.
#[derive(Debug, Serialize)]
pub struct Created {
    /// The new row.
    #[serde(flatten)]
    pub row: ServiceCredential,
    /// The credential, for `Authorization: Bearer`; shown this once.
    pub credential: String,
}

/// Every credential.
pub async fn list(
    State(state): State<AppState>,
    _: RequireRole<Admin>,
) -> Result<Json<Vec<ServiceCredential>>, AppError> {
    Ok(Json(db::service_credentials::list(&state.db).await?))
}

/// Creates a credential.
pub async fn create(
    State(state): State<AppState>,
    admin: RequireRole<Admin>,
    ApiJson(body): ApiJson<Create>,
) -> Result<Response, AppError> {
    let name = body.name.trim().to_lowercase();
    validate_username(&name).map_err(|_| {
        AppError::BadRequest(format!(
            "invalid name `{name}`: 1 to 64 characters of a-z, 0-9, `.`, `_`, `@`, `-`"
        ))
    })?;
    let credential = new_token();
    let mut tx = state.db.begin().await?;
    let row = match db::service_credentials::insert(
        &mut *tx,
        &name,
        &token_hash(&credential),
        Some(admin.user.id),
    )
    .await
    {
        Ok(row) => row,
        Err(err) if is_unique_violation(&err) => {
            return Err(AppError::Conflict(format!(
                "a service credential `{name}` exists"
            )));
        }
        Err(err) => return Err(err.into()),
    };
    db::audit_log::record(
        &mut *tx,
        &admin.actor(),
        "service_credential.create",
        Some(&format!("server:{name}")),
        serde_json::json!({ "id": row.id }),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(Created { row, credential })).into_response())
}

/// Revokes a credential.
pub async fn revoke(
    State(state): State<AppState>,
    admin: RequireRole<Admin>,
    Path(id): Path<i64>,
) -> Result<StatusCode, AppError> {
    let mut tx = state.db.begin().await?;
    let row = db::service_credentials::revoke(&mut *tx, id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no service credential {id}")))?;
    db::audit_log::record(
        &mut *tx,
        &admin.actor(),
        "service_credential.revoke",
        Some(&format!("server:{}", row.name)),
        serde_json::json!({ "id": id }),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}
