//! The schema and the HTTP API against a real PostgreSQL (one embedded cluster for this test binary, a fresh
//! database per test), driven with `app(state).oneshot(req)`.

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
use serde_json::Value;
use tower::ServiceExt as _;

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

/// A request as it comes from `peer` through the real listener.
#[tokio::test]
async fn migrations_apply_and_reapply() {
    let db = TestDb::unmigrated().await;
    db::migrate::run(&db.pool).await.unwrap();
    db::migrate::run(&db.pool).await.unwrap();
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(applied, [db::migrate::latest_version()]);
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name NOT LIKE '\\_sqlx%' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            "agent_groups",
            "agents",
            "alert_channels",
            "alert_deliveries",
            "attackers",
            "audit_log",
            "detections",
            "enrollment_tokens",
            "login_attempts",
            "policies",
            "policy_head",
            "policy_revisions",
            "sandbox_sessions",
            "service_credentials",
            "sessions",
            "settings",
            "users",
        ]
    );
    let (group, mode): (String, String) = sqlx::query_as(
        "SELECT g.name, p.mode FROM policies p JOIN agent_groups g ON g.id = p.group_id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((group.as_str(), mode.as_str()), ("default", "unreal"));
    // The last line against an over-broad attacker entry.
    let broad = sqlx::query("INSERT INTO attackers (net) VALUES ('0.0.0.0/0')")
        .execute(&db.pool)
        .await;
    assert!(broad.is_err());
    sqlx::query("INSERT INTO attackers (net) VALUES ('203.0.113.7/32'), ('2001:db8::/48')")
        .execute(&db.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn first_start_bootstraps_one_admin() {
    let db = TestDb::new().await;
    let (user, password) = manager::admin::bootstrap_admin(&db.pool)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((user.username.as_str(), user.role), ("admin", Role::Admin));
    assert!(
        manager::admin::bootstrap_admin(&db.pool)
            .await
            .unwrap()
            .is_none()
    );
    let (_, stored) = db::users::find_with_hash(&db.pool, "admin")
        .await
        .unwrap()
        .unwrap();
    assert!(stored.starts_with("$argon2id$") && !stored.contains(&password));
    assert!(password::verify(&password, &stored));
    let actor: String =
        sqlx::query_scalar("SELECT actor FROM audit_log WHERE action = 'user.create'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(actor, "system");
}

#[tokio::test]
async fn health_and_metrics() {
    let db = TestDb::new().await;
    let app = app(db.state());
    let health = call(&app, request(Method::GET, "/healthz", None)).await;
    assert_eq!(health.status, StatusCode::OK);
    let metrics = call(&app, request(Method::GET, "/metrics", None)).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = metrics.body.as_str().unwrap();
    assert!(
        text.contains(
            "mirage_manager_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"}"
        ),
        "{text}"
    );
    let missing = call(&app, request(Method::GET, "/nowhere", None)).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}
