//! The session extractors: [`Session`] (any logged-in user; checks CSRF on state-changing
//! methods) and [`RequireRole`] (a minimum role), plus the cookie and client-address helpers.

use std::{marker::PhantomData, net::IpAddr, net::SocketAddr, ops::Deref, time::Duration};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::{HeaderMap, HeaderValue, Method, header, request::Parts},
};
use time::OffsetDateTime;

use super::{CSRF_HEADER, Role, constant_time_eq, token_hash};
use crate::{AppState, db, db::users::User, error::AppError};

/// Cookie name when `cookie_secure` is on: the `__Host-` prefix makes browsers refuse it unless
/// it is `Secure`, has `Path=/` and no `Domain`, so a sibling subdomain cannot plant one.
const SECURE_COOKIE: &str = "__Host-mirage_session";
/// Cookie name without `Secure` (the prefix would be rejected).
const PLAIN_COOKIE: &str = "mirage_session";

/// The session cookie's name for this configuration.
pub fn cookie_name(secure: bool) -> &'static str {
    if secure { SECURE_COOKIE } else { PLAIN_COOKIE }
}

/// `Set-Cookie` for a new session.
pub fn session_cookie(secure: bool, token: &str, ttl: Duration) -> Option<HeaderValue> {
    let secure_attr = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{}={token}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{secure_attr}",
        cookie_name(secure),
        ttl.as_secs()
    ))
    .ok()
}

/// `Set-Cookie` that deletes the session cookie.
pub fn clear_cookie(secure: bool) -> Option<HeaderValue> {
    let secure_attr = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{secure_attr}",
        cookie_name(secure)
    ))
    .ok()
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// The client's address, from the listener's connection info (absent in `oneshot` tests that do
/// not insert it). Behind a reverse proxy this is the proxy's address.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
        ))
    }
}

/// A logged-in user's live session.
#[derive(Debug, Clone)]
pub struct Session {
    /// The session's row id.
    pub id: i64,
    /// Its user (enabled: a disabled user's sessions do not authenticate).
    pub user: User,
    /// The CSRF token state-changing requests must carry.
    pub csrf_token: String,
    /// When it ends.
    pub expires_at: OffsetDateTime,
    /// The client's address.
    pub ip: Option<IpAddr>,
}

/// Methods that change nothing and so need no CSRF token.
fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

impl FromRequestParts<AppState> for Session {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let token = cookie_value(&parts.headers, cookie_name(state.config.cookie_secure))
            .ok_or(AppError::Unauthorized)?;
        let row = db::sessions::find_live(&state.db, &token_hash(token))
            .await?
            .ok_or(AppError::Unauthorized)?;
        if !is_safe(&parts.method) {
            let sent = parts
                .headers
                .get(CSRF_HEADER)
                .map(HeaderValue::as_bytes)
                .unwrap_or_default();
            if !constant_time_eq(sent, row.csrf_token.as_bytes()) {
                return Err(AppError::Forbidden(
                    "missing or wrong X-CSRF-Token header (take it from the login response or \
                     GET /api/v1/me)"
                        .to_owned(),
                ));
            }
        }
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        Ok(Self {
            id: row.id,
            user: row.user,
            csrf_token: row.csrf_token,
            expires_at: row.expires_at,
            ip,
        })
    }
}

/// A minimum role, as a type for [`RequireRole`].
pub trait MinRole {
    /// The least role allowed.
    const ROLE: Role;
}

/// Any logged-in user.
#[derive(Debug)]
pub struct Viewer;
/// Operators and admins.
#[derive(Debug)]
pub struct Operator;
/// Admins only.
#[derive(Debug)]
pub struct Admin;

impl MinRole for Viewer {
    const ROLE: Role = Role::Viewer;
}
impl MinRole for Operator {
    const ROLE: Role = Role::Operator;
}
impl MinRole for Admin {
    const ROLE: Role = Role::Admin;
}

/// A session whose user has at least role `R`: 401 without a live session, 403 with too small
/// a role (or a missing CSRF token on a state-changing request).
#[derive(Debug)]
pub struct RequireRole<R>(pub Session, PhantomData<R>);

impl<R> Deref for RequireRole<R> {
    type Target = Session;

    fn deref(&self) -> &Session {
        &self.0
    }
}

impl<R: MinRole + Send + Sync> FromRequestParts<AppState> for RequireRole<R> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let session = Session::from_request_parts(parts, state).await?;
        if session.user.role < R::ROLE {
            return Err(AppError::Forbidden(format!(
                "this needs the {} role; you are {}",
                R::ROLE,
                session.user.role
            )));
        }
        Ok(Self(session, PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cookies() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; mirage_session=tok"),
        );
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie_value(&headers, "mirage_session"), Some("tok"));
        assert_eq!(cookie_value(&headers, "b"), Some("2"));
        assert_eq!(cookie_value(&headers, "c"), None);
    }

    #[test]
    fn builds_cookies() {
        let c = session_cookie(true, "t", Duration::from_secs(60)).unwrap();
        assert_eq!(
            c.to_str().unwrap(),
            "__Host-mirage_session=t; Path=/; Max-Age=60; HttpOnly; SameSite=Strict; Secure"
        );
        let c = clear_cookie(false).unwrap();
        assert_eq!(
            c.to_str().unwrap(),
            "mirage_session=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
        );
    }
}
