//! Machine credentials: [`AgentAuth`] for `mirage-agent` and [`ServiceAuth`] for
//! `mirage-server`, both `Authorization: Bearer <credential>`.
//!
//! A credential is a 256-bit random token ([`super::new_token`]) and the database keeps only its
//! SHA-256. A slow password hash (argon2) exists to make guessing a *low-entropy* secret
//! expensive; guessing a 256-bit random value is infeasible at any hash speed, so SHA-256 loses
//! nothing and lets the lookup be one indexed equality on the digest (no per-row verify), which
//! matters for an endpoint that every agent calls. No CSRF check: a bearer header is never sent
//! by a browser on its own.

use axum::{
    extract::FromRequestParts,
    http::{header, request::Parts},
};

use super::token_hash;
use crate::{
    AppState,
    db::{self, agents::Agent, audit_log::Actor, service_credentials::ServiceCredential},
    error::AppError,
};

/// The 401 for a missing, unknown or revoked credential.
const BAD_CREDENTIAL: AppError =
    AppError::BadBearer("missing, unknown or revoked credential (Authorization: Bearer ...)");

/// The bearer token of a request, if any.
pub fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// An enrolled, unrevoked agent: 401 otherwise. Each authenticated call is its heartbeat.
#[derive(Debug, Clone)]
pub struct AgentAuth(pub Agent);

impl AgentAuth {
    /// The audit actor: `agent:NAME`.
    pub fn actor(&self) -> Actor {
        Actor {
            user_id: None,
            name: format!("agent:{}", self.0.name),
            ip: None,
        }
    }
}

impl FromRequestParts<AppState> for AgentAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let token = bearer(parts).ok_or(BAD_CREDENTIAL)?;
        db::agents::authenticate(&state.db, &token_hash(token))
            .await?
            .map(Self)
            .ok_or(BAD_CREDENTIAL)
    }
}

/// A `mirage-server` with a live service credential: 401 otherwise.
#[derive(Debug, Clone)]
pub struct ServiceAuth(pub ServiceCredential);

impl ServiceAuth {
    /// The audit actor: `server:NAME`.
    pub fn actor(&self) -> Actor {
        Actor {
            user_id: None,
            name: format!("server:{}", self.0.name),
            ip: None,
        }
    }
}

impl FromRequestParts<AppState> for ServiceAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let token = bearer(parts).ok_or(BAD_CREDENTIAL)?;
        db::service_credentials::authenticate(&state.db, &token_hash(token))
            .await?
            .map(Self)
            .ok_or(BAD_CREDENTIAL)
    }
}
