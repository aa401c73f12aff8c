//! Agents, service credentials, attackers, the policy log and the agents' policy stream, against a
//! real PostgreSQL (one embedded cluster for this test binary, a fresh database per test).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use axum::{
    Router,
    body::Body,
    http::{Method, Request, StatusCode, header},
};
use http_body_util::BodyExt as _;
use manager::{
    app,
    auth::{Role, password},
    db,
    test_util::TestDb,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt as _;

const PASSWORD: &str = "a long enough password";

struct Reply {
    status: StatusCode,
    body: Value,
}

async fn call(app: &Router, req: Request<Body>) -> Reply {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Reply { status, body }
}

fn request(method: Method, uri: &str, body: Option<&Value>) -> Request<Body> {
    let builder = Request::builder().method(method).uri(uri);
    match body {
        Some(body) => builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
        None => builder.body(Body::empty()).unwrap(),
    }
}

fn bearer(mut req: Request<Body>, credential: &str) -> Request<Body> {
    req.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {credential}").parse().unwrap(),
    );
    req
}

/// A logged-in client: its cookie and CSRF token.
#[derive(Clone)]
struct Login {
    cookie: String,
    csrf: String,
}

impl Login {
    /// `req` with the session cookie and the CSRF header.
    fn sign(&self, mut req: Request<Body>) -> Request<Body> {
        let headers = req.headers_mut();
        headers.insert(header::COOKIE, self.cookie.parse().unwrap());
        headers.insert("x-csrf-token", self.csrf.parse().unwrap());
        req
    }
}

async fn login(app: &Router, username: &str) -> Login {
    let req = request(
        Method::POST,
        "/api/v1/login",
        Some(&json!({ "username": username, "password": PASSWORD })),
    );
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let cookie = resp.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    Login {
        cookie,
        csrf: body["csrf_token"].as_str().unwrap().to_owned(),
    }
}

async fn add_user(pool: &PgPool, username: &str, role: Role) {
    let hash = password::hash(PASSWORD).unwrap();
    db::users::insert(pool, username, &hash, role)
        .await
        .unwrap();
}

/// A fresh database with an admin, an operator and a viewer, the app over it, and their logins.
struct Setup {
    db: TestDb,
    app: Router,
    admin: Login,
    oper: Login,
    view: Login,
}

async fn setup() -> Setup {
    let db = TestDb::new().await;
    add_user(&db.pool, "root", Role::Admin).await;
    add_user(&db.pool, "oper", Role::Operator).await;
    add_user(&db.pool, "view", Role::Viewer).await;
    let app = app(db.state());
    let admin = login(&app, "root").await;
    let oper = login(&app, "oper").await;
    let view = login(&app, "view").await;
    Setup {
        db,
        app,
        admin,
        oper,
        view,
    }
}

impl Setup {
    async fn post(&self, who: &Login, uri: &str, body: Value) -> Reply {
        call(&self.app, who.sign(request(Method::POST, uri, Some(&body)))).await
    }

    async fn get(&self, who: &Login, uri: &str) -> Reply {
        call(&self.app, who.sign(request(Method::GET, uri, None))).await
    }

    async fn delete(&self, who: &Login, uri: &str) -> Reply {
        call(&self.app, who.sign(request(Method::DELETE, uri, None))).await
    }

    async fn enrollment_token(&self) -> String {
        let reply = self
            .post(&self.oper, "/api/v1/enrollment-tokens", json!({}))
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        reply.body["token"].as_str().unwrap().to_owned()
    }

    async fn enroll(&self, token: &str, hostname: &str) -> Reply {
        let body = json!({
            "token": token, "hostname": hostname,
            "addresses": ["192.0.2.10", "2001:db8::10"], "version": "0.1.0",
        });
        call(
            &self.app,
            request(Method::POST, "/api/v1/agent/enroll", Some(&body)),
        )
        .await
    }

    /// An enrolled agent's `(id, credential)`.
    async fn agent(&self, hostname: &str) -> (i64, String) {
        let token = self.enrollment_token().await;
        let reply = self.enroll(&token, hostname).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        (
            reply.body["agent_id"].as_i64().unwrap(),
            reply.body["credential"].as_str().unwrap().to_owned(),
        )
    }

    async fn heartbeat(&self, credential: &str) -> Reply {
        let req = request(
            Method::POST,
            "/api/v1/agent/heartbeat",
            Some(&json!({ "mode": "unreal", "applied_revision": 0 })),
        );
        call(&self.app, bearer(req, credential)).await
    }
}

async fn audit_actions(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT action FROM audit_log WHERE action <> 'login' ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn enrollment_tokens_are_single_use() {
    let s = setup().await;
    let token = s.enrollment_token().await;
    let first = s.enroll(&token, "web-1").await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    assert_eq!(first.body["name"], "web-1");
    assert_eq!(first.body["credential"].as_str().unwrap().len(), 64);
    let again = s.enroll(&token, "web-2").await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED);
    let garbage = s.enroll("not-a-token", "web-3").await;
    assert_eq!(garbage.status, StatusCode::UNAUTHORIZED);
    // A second agent with the same hostname gets a distinct name.
    let other = s.enroll(&s.enrollment_token().await, "web-1").await;
    assert_eq!(other.status, StatusCode::CREATED);
    assert_ne!(other.body["name"], "web-1");

    let agents = s.get(&s.view, "/api/v1/agents").await;
    assert_eq!(agents.status, StatusCode::OK);
    assert_eq!(agents.body.as_array().unwrap().len(), 2);
    assert_eq!(
        agents.body[0]["addresses"],
        json!(["192.0.2.10", "2001:db8::10"])
    );
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT credential_hash FROM agents")
        .fetch_all(&s.db.pool)
        .await
        .unwrap();
    assert!(stored.iter().all(|h| h.len() == 32));
    assert_eq!(
        audit_actions(&s.db.pool).await,
        [
            "enrollment_token.create",
            "agent.enroll",
            "enrollment_token.create",
            "agent.enroll"
        ]
    );
}

#[tokio::test]
async fn expired_enrollment_tokens_are_refused() {
    let s = setup().await;
    let token = s.enrollment_token().await;
    sqlx::query("UPDATE enrollment_tokens SET expires_at = now() - interval '1 second'")
        .execute(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(
        s.enroll(&token, "web-1").await.status,
        StatusCode::UNAUTHORIZED
    );
    let bad = s
        .post(
            &s.oper,
            "/api/v1/enrollment-tokens",
            json!({ "group": "nope" }),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body["error"].as_str().unwrap().contains("nope"));
    let viewer = s
        .post(&s.view, "/api/v1/enrollment-tokens", json!({}))
        .await;
    assert_eq!(viewer.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn revoked_agents_get_401() {
    let s = setup().await;
    let (id, credential) = s.agent("web-1").await;
    let beat = s.heartbeat(&credential).await;
    assert_eq!(beat.status, StatusCode::OK, "{}", beat.body);
    assert_eq!(beat.body["mode"], "unreal");
    assert!(beat.body["last_heartbeat"].is_string());
    assert_eq!(s.heartbeat("wrong").await.status, StatusCode::UNAUTHORIZED);
    let no_auth = call(
        &s.app,
        request(Method::POST, "/api/v1/agent/heartbeat", Some(&json!({}))),
    )
    .await;
    assert_eq!(no_auth.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        s.delete(&s.view, &format!("/api/v1/agents/{id}"))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        s.delete(&s.oper, &format!("/api/v1/agents/{id}"))
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.heartbeat(&credential).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        s.delete(&s.oper, "/api/v1/agents/999").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn service_credentials_are_admin_only_and_revocable() {
    let s = setup().await;
    let denied = s
        .post(
            &s.oper,
            "/api/v1/service-credentials",
            json!({ "name": "srv-1" }),
        )
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    let created = s
        .post(
            &s.admin,
            "/api/v1/service-credentials",
            json!({ "name": "srv-1" }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["id"].as_i64().unwrap();
    let credential = created.body["credential"].as_str().unwrap().to_owned();
    let dup = s
        .post(
            &s.admin,
            "/api/v1/service-credentials",
            json!({ "name": "srv-1" }),
        )
        .await;
    assert_eq!(dup.status, StatusCode::CONFLICT);

    let state = s.db.state();
    let check = |cred: String| {
        let state = state.clone();
        async move {
            use axum::extract::FromRequestParts as _;
            let (mut parts, _) = bearer(request(Method::GET, "/", None), &cred).into_parts();
            manager::auth::ServiceAuth::from_request_parts(&mut parts, &state)
                .await
                .map(|a| a.0.name)
        }
    };
    assert_eq!(check(credential.clone()).await.unwrap(), "srv-1");
    assert!(check("wrong".to_owned()).await.is_err());
    let list = s.get(&s.admin, "/api/v1/service-credentials").await;
    assert_eq!(list.body[0]["name"], "srv-1");
    assert!(list.body[0].get("credential").is_none());
    assert_eq!(
        s.delete(&s.admin, &format!("/api/v1/service-credentials/{id}"))
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert!(check(credential).await.is_err());
}
