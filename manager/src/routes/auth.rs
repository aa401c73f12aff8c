//! `POST /api/v1/login`, `POST /api/v1/logout`, `GET /api/v1/me`.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{
    AppState,
    auth::{
        Session, new_token, normalize_username, password,
        session::{ClientIp, clear_cookie, session_cookie},
        throttle::{self, Verdict},
        token_hash,
    },
    db::{
        self,
        audit_log::Actor,
        login_attempts::{self, Outcome},
        sessions::NewSession,
        users::User,
    },
    error::{ApiJson, AppError},
    telemetry,
};

/// Login request body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// The username (case-insensitive).
    pub username: String,
    /// The password.
    pub password: String,
}

/// What login and `/me` return.
#[derive(Debug, Serialize)]
pub struct SessionInfo {
    /// The logged-in user.
    pub user: User,
    /// Echo it in `X-CSRF-Token` on every POST, PATCH, PUT and DELETE.
    pub csrf_token: String,
    /// When the session ends.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Checks the throttle, then the password; on success opens a session and sets its cookie.
pub async fn login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    ApiJson(body): ApiJson<LoginRequest>,
) -> Result<Response, AppError> {
    let username = normalize_username(&body.username);
    if username.is_empty() || username.len() > 256 {
        return Err(AppError::BadCredentials);
    }
    let limits = &state.config.login_throttle;
    if let Verdict::Refuse { retry_after } =
        throttle::check(&state.db, limits, &username, ip).await?
    {
        login_attempts::record(&state.db, &username, ip, Outcome::Throttled).await?;
        metrics::counter!(telemetry::LOGINS, "outcome" => "throttled").increment(1);
        tracing::warn!(username = %username, ip = ?ip, retry_after, "Login throttled.");
        return Err(AppError::TooManyRequests { retry_after });
    }

    let found = db::users::find_with_hash(&state.db, &username).await?;
    let (user, hash) = match found {
        Some((user, hash)) if !user.disabled => (Some(user), Some(hash)),
        // Disabled and unknown users cost the same argon2 time as real ones.
        _ => (None, None),
    };
    let ok = password::verify_async(body.password, hash).await;
    let Some(user) = user.filter(|_| ok) else {
        login_attempts::record(&state.db, &username, ip, Outcome::Failure).await?;
        metrics::counter!(telemetry::LOGINS, "outcome" => "failure").increment(1);
        tracing::info!(username = %username, ip = ?ip, "Login failed.");
        return Err(AppError::BadCredentials);
    };

    let token = new_token();
    let csrf_token = new_token();
    let ttl = state.config.session_ttl;
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(|ua| ua.chars().take(512).collect::<String>());
    let mut tx = state.db.begin().await?;
    let (_, expires_at) = db::sessions::create(
        &mut *tx,
        &NewSession {
            token_hash: &token_hash(&token),
            user_id: user.id,
            csrf_token: &csrf_token,
            ttl,
            ip,
            user_agent: user_agent.as_deref(),
        },
    )
    .await?;
    login_attempts::record(&mut *tx, &username, ip, Outcome::Success).await?;
    let actor = actor_of(&user, ip);
    db::audit_log::record(&mut *tx, &actor, "login", None, serde_json::json!({})).await?;
    tx.commit().await?;
    metrics::counter!(telemetry::LOGINS, "outcome" => "success").increment(1);
    tracing::info!(username = %user.username, ip = ?ip, "Logged in.");

    let cookie = session_cookie(state.config.cookie_secure, &token, ttl)
        .ok_or_else(|| AppError::Internal("session cookie is not a valid header".into()))?;
    let mut response = Json(SessionInfo {
        user,
        csrf_token,
        expires_at,
    })
    .into_response();
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

/// Ends the session and clears the cookie (needs the CSRF token, like every POST).
pub async fn logout(State(state): State<AppState>, session: Session) -> Result<Response, AppError> {
    let mut tx = state.db.begin().await?;
    db::sessions::delete(&mut *tx, session.id).await?;
    let actor = actor_of(&session.user, session.ip);
    db::audit_log::record(&mut *tx, &actor, "logout", None, serde_json::json!({})).await?;
    tx.commit().await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Some(cookie) = clear_cookie(state.config.cookie_secure) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    Ok(response)
}

/// The session's user and CSRF token.
pub async fn me(session: Session) -> Json<SessionInfo> {
    Json(SessionInfo {
        user: session.user,
        csrf_token: session.csrf_token,
        expires_at: session.expires_at,
    })
}

/// The audit actor for a user acting from `ip`.
pub fn actor_of(user: &User, ip: Option<std::net::IpAddr>) -> Actor {
    Actor {
        user_id: Some(user.id),
        name: user.username.clone(),
        ip,
    }
}

impl Session {
    /// The audit actor for this session.
    pub fn actor(&self) -> Actor {
        actor_of(&self.user, self.ip)
    }
}
