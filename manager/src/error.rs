//! [`AppError`]: what a handler can fail with, and how it becomes a response. A 4xx carries a
//! JSON body `{"error": "..."}` with a message the client can act on; a 5xx has an empty body
//! (nothing about the database leaks to the client) and its cause is logged once, here, inside the
//! request's span.

use axum::{
    Json,
    extract::{FromRequest, Request, rejection::JsonRejection},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// 400: the request is malformed or a value is invalid.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no live session (missing, expired or revoked credentials).
    #[error("authentication required")]
    Unauthorized,
    /// 401 for a machine (agent, server, enrolling agent): a missing, unknown, used, expired or
    /// revoked bearer credential or token, with a `Bearer` challenge.
    #[error("{0}")]
    BadBearer(&'static str),
    /// 401 on login: wrong username or password (one message for both, on purpose).
    #[error("wrong username or password")]
    BadCredentials,
    /// 403: authenticated, but not allowed (role, CSRF).
    #[error("{0}")]
    Forbidden(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409: the change conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// 429 with `Retry-After`.
    #[error("too many failed logins; retry in {retry_after} s")]
    TooManyRequests {
        /// Seconds until a retry may succeed.
        retry_after: u64,
    },
    /// 500: the database failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// 500: anything else that should not happen.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl AppError {
    /// The response status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized | Self::BadCredentials | Self::BadBearer(_) => {
                StatusCode::UNAUTHORIZED
            }
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Database(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Wraps any error as a 500.
    pub fn internal(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Internal(Box::new(err))
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %ErrorChain(&self), "Request failed.");
            return status.into_response();
        }
        let mut response = (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response();
        match self {
            Self::TooManyRequests { retry_after } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            Self::Unauthorized | Self::BadCredentials => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Cookie realm=\"mirage-manager\""),
                );
            }
            Self::BadBearer(_) => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"mirage-manager\""),
                );
            }
            _ => {}
        }
        response
    }
}

/// Displays an error with its sources: `database error: error returned from database: ...`.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

/// `axum::Json` whose rejection is an [`AppError::BadRequest`] with serde's message, so every
/// error body has the same shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(match rejection {
                JsonRejection::MissingJsonContentType(_) => AppError::BadRequest(
                    "expected a JSON body with `Content-Type: application/json`".to_owned(),
                ),
                other => AppError::BadRequest(other.body_text()),
            }),
        }
    }
}
