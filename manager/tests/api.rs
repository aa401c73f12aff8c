//! The HTTP API against a real PostgreSQL (one embedded cluster for this test binary, a fresh
//! database per test), driven with `app(state).oneshot(req)`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::net::SocketAddr;

use axum::{
    Router,
    body::Body,
    extract::ConnectInfo,
    http::{Method, Request, StatusCode, header},
};
mod common;

use common::{Login, PASSWORD, Reply, call, request};
use manager::{
    app,
    auth::{Role, password},
    db,
    test_util::{TestDb, test_config},
};
use serde_json::{Value, json};
use sqlx::PgPool;

/// A request as it comes from `peer` through the real listener.
fn from_peer(mut req: Request<Body>, peer: &str) -> Request<Body> {
    let addr: SocketAddr = format!("{peer}:40000").parse().unwrap();
    req.extensions_mut().insert(ConnectInfo(addr));
    req
}

fn login_request(username: &str, password: &str) -> Request<Body> {
    request(
        Method::POST,
        "/api/v1/login",
        Some(&json!({ "username": username, "password": password })),
    )
}

impl Login {
    /// `req` with the cookie only.
    fn cookie_only(&self, mut req: Request<Body>) -> Request<Body> {
        req.headers_mut()
            .insert(header::COOKIE, self.cookie.parse().unwrap());
        req
    }
}

fn set_cookie(reply: &Reply) -> &str {
    reply.headers[header::SET_COOKIE].to_str().unwrap()
}

async fn login(app: &Router, username: &str, password: &str) -> Login {
    let reply = call(app, login_request(username, password)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let cookie = set_cookie(&reply).split(';').next().unwrap().to_owned();
    Login {
        cookie,
        csrf: reply.body["csrf_token"].as_str().unwrap().to_owned(),
    }
}

async fn add_user(pool: &PgPool, username: &str, role: Role) -> i64 {
    let hash = password::hash(PASSWORD).unwrap();
    db::users::insert(pool, username, &hash, role)
        .await
        .unwrap()
        .id
}

async fn audit_actions(pool: &PgPool) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as("SELECT actor, action, target FROM audit_log ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// A fresh database with an admin, an operator and a viewer, and the app over it.
async fn setup() -> (TestDb, Router) {
    let db = TestDb::new().await;
    add_user(&db.pool, "root", Role::Admin).await;
    add_user(&db.pool, "oper", Role::Operator).await;
    add_user(&db.pool, "view", Role::Viewer).await;
    let app = app(db.state());
    (db, app)
}

#[tokio::test]
async fn migrations_apply_and_reapply() {
    let db = TestDb::unmigrated().await;
    db::migrate::run(&db.pool).await.unwrap();
    db::migrate::run(&db.pool).await.unwrap();
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let want: Vec<i64> = (1..=db::migrate::latest_version()).collect();
    assert_eq!(applied, want);
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
            "agent_flows",
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
async fn login_sets_a_strict_http_only_cookie_and_me_answers() {
    let (db, app) = setup().await;
    let reply = call(&app, login_request("Root", PASSWORD)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let cookie = set_cookie(&reply);
    assert!(cookie.starts_with("mirage_session="), "{cookie}");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
    assert!(!cookie.contains("Secure"), "cookie_secure = false in tests");
    assert_eq!(reply.body["user"]["username"], "root");
    assert_eq!(reply.body["user"]["role"], "admin");
    assert!(reply.body["user"].get("password_hash").is_none());

    let session = login(&app, "root", PASSWORD).await;
    let me = call(
        &app,
        session.cookie_only(request(Method::GET, "/api/v1/me", None)),
    )
    .await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.body["user"]["username"], "root");
    assert_eq!(me.body["csrf_token"], session.csrf.as_str());

    // Only the token's hash is stored.
    let token = session.cookie.split_once('=').unwrap().1;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions WHERE token_hash = $1")
        .bind(manager::auth::token_hash(token))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 1);
    let plain: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sessions WHERE encode(token_hash, 'hex') = $1")
            .bind(token)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(plain, 0);
    let logins = audit_actions(&db.pool).await;
    assert_eq!(logins.len(), 2);
    assert!(
        logins
            .iter()
            .all(|(actor, action, _)| actor == "root" && action == "login")
    );
}

#[tokio::test]
async fn secure_cookies_use_the_host_prefix() {
    let db = TestDb::new().await;
    add_user(&db.pool, "root", Role::Admin).await;
    let mut config = test_config();
    config.cookie_secure = true;
    let app = app(db.state_with(config));
    let reply = call(&app, login_request("root", PASSWORD)).await;
    let cookie = set_cookie(&reply);
    assert!(cookie.starts_with("__Host-mirage_session="), "{cookie}");
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    let token = cookie.split(';').next().unwrap();
    let me = call(
        &app,
        Login {
            cookie: token.to_owned(),
            csrf: String::new(),
        }
        .cookie_only(request(Method::GET, "/api/v1/me", None)),
    )
    .await;
    assert_eq!(me.status, StatusCode::OK);
}

#[tokio::test]
async fn bad_passwords_and_unknown_users_get_the_same_401() {
    let (db, app) = setup().await;
    let wrong = call(&app, login_request("root", "not the password")).await;
    let unknown = call(&app, login_request("nobody", PASSWORD)).await;
    for reply in [&wrong, &unknown] {
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert_eq!(reply.body["error"], "wrong username or password");
        assert!(reply.headers.get(header::SET_COOKIE).is_none());
    }
    let malformed = call(
        &app,
        request(
            Method::POST,
            "/api/v1/login",
            Some(&json!({ "username": "root" })),
        ),
    )
    .await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert!(
        malformed.body["error"]
            .as_str()
            .unwrap()
            .contains("password")
    );
    let failures: i64 =
        sqlx::query_scalar("SELECT count(*) FROM login_attempts WHERE outcome = 'failure'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(failures, 2);
}

#[tokio::test]
async fn throttles_a_username_after_five_failures() {
    let (db, app) = setup().await;
    for i in 0..5 {
        let peer = format!("198.51.100.{i}");
        let reply = call(
            &app,
            from_peer(login_request("root", "wrong password"), &peer),
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    // Even the right password, from a new address, waits.
    let reply = call(
        &app,
        from_peer(login_request("root", PASSWORD), "198.51.100.99"),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        reply.body
    );
    let retry: u64 = reply.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=900).contains(&retry), "{retry}");
    // Other users are not affected.
    login(&app, "oper", PASSWORD).await;
    let throttled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM login_attempts WHERE outcome = 'throttled'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(throttled, 1);

    // Once the failures leave the window, the user may log in again.
    sqlx::query("UPDATE login_attempts SET at = at - interval '16 minutes'")
        .execute(&db.pool)
        .await
        .unwrap();
    login(&app, "root", PASSWORD).await;
}

#[tokio::test]
async fn throttles_an_address_after_five_failures() {
    let (_db, app) = setup().await;
    for i in 0..5 {
        let reply = call(
            &app,
            from_peer(login_request(&format!("guess{i}"), "x"), "203.0.113.9"),
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    let reply = call(
        &app,
        from_peer(login_request("root", PASSWORD), "203.0.113.9"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    let reply = call(
        &app,
        from_peer(login_request("root", PASSWORD), "203.0.113.10"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn missing_expired_or_garbage_sessions_get_401() {
    let (db, app) = setup().await;
    let me = || request(Method::GET, "/api/v1/me", None);
    assert_eq!(call(&app, me()).await.status, StatusCode::UNAUTHORIZED);
    let garbage = Login {
        cookie: "mirage_session=deadbeef".to_owned(),
        csrf: String::new(),
    };
    assert_eq!(
        call(&app, garbage.cookie_only(me())).await.status,
        StatusCode::UNAUTHORIZED
    );

    let session = login(&app, "view", PASSWORD).await;
    assert_eq!(
        call(&app, session.cookie_only(me())).await.status,
        StatusCode::OK
    );
    sqlx::query("UPDATE sessions SET expires_at = now() - interval '1 second'")
        .execute(&db.pool)
        .await
        .unwrap();
    let reply = call(&app, session.cookie_only(me())).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.body["error"], "authentication required");
    assert_eq!(db::sessions::delete_expired(&db.pool).await.unwrap(), 1);
}

#[tokio::test]
async fn logout_ends_the_session() {
    let (db, app) = setup().await;
    let session = login(&app, "oper", PASSWORD).await;
    let other = login(&app, "oper", PASSWORD).await;
    let reply = call(
        &app,
        session.sign(request(Method::POST, "/api/v1/logout", None)),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert!(set_cookie(&reply).contains("Max-Age=0"));
    let me = |s: &Login| s.cookie_only(request(Method::GET, "/api/v1/me", None));
    assert_eq!(
        call(&app, me(&session)).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Logging out again is a 401 too; the user's other session lives on.
    let again = call(
        &app,
        session.sign(request(Method::POST, "/api/v1/logout", None)),
    )
    .await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED);
    assert_eq!(call(&app, me(&other)).await.status, StatusCode::OK);
    let actions: Vec<String> = audit_actions(&db.pool)
        .await
        .into_iter()
        .map(|(_, action, _)| action)
        .collect();
    assert_eq!(actions, ["login", "login", "logout"]);
}

#[tokio::test]
async fn state_changes_need_the_csrf_token() {
    let (db, app) = setup().await;
    let session = login(&app, "root", PASSWORD).await;
    let create = || {
        request(
            Method::POST,
            "/api/v1/users",
            Some(&json!({ "username": "new", "role": "viewer" })),
        )
    };
    let missing = call(&app, session.cookie_only(create())).await;
    assert_eq!(missing.status, StatusCode::FORBIDDEN);
    assert!(
        missing.body["error"]
            .as_str()
            .unwrap()
            .contains("X-CSRF-Token")
    );
    let wrong = Login {
        csrf: "0".repeat(64),
        ..session.clone()
    };
    assert_eq!(
        call(&app, wrong.sign(create())).await.status,
        StatusCode::FORBIDDEN
    );
    let logout = call(
        &app,
        session.cookie_only(request(Method::POST, "/api/v1/logout", None)),
    )
    .await;
    assert_eq!(logout.status, StatusCode::FORBIDDEN);
    // Another session's token does not do either.
    let other = login(&app, "root", PASSWORD).await;
    let crossed = Login {
        csrf: other.csrf.clone(),
        ..session.clone()
    };
    assert_eq!(
        call(&app, crossed.sign(create())).await.status,
        StatusCode::FORBIDDEN
    );
    // Reads need none.
    let list = call(
        &app,
        session.cookie_only(request(Method::GET, "/api/v1/users", None)),
    )
    .await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(
        call(&app, session.sign(create())).await.status,
        StatusCode::CREATED
    );
    assert_eq!(db::users::count(&db.pool).await.unwrap(), 4);
}

#[tokio::test]
async fn only_admins_manage_users() {
    let (db, app) = setup().await;
    let viewer = login(&app, "view", PASSWORD).await;
    let operator = login(&app, "oper", PASSWORD).await;
    let admin = login(&app, "root", PASSWORD).await;
    let body = json!({ "username": "eve", "role": "admin", "password": PASSWORD });
    let root_id: i64 = sqlx::query_scalar("SELECT id FROM users WHERE username = 'root'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    for who in [&viewer, &operator] {
        for req in [
            request(Method::POST, "/api/v1/users", Some(&body)),
            request(Method::GET, "/api/v1/users", None),
            request(
                Method::PATCH,
                &format!("/api/v1/users/{root_id}"),
                Some(&json!({ "disabled": true })),
            ),
            request(Method::DELETE, &format!("/api/v1/users/{root_id}"), None),
            request(Method::GET, "/api/v1/audit-log", None),
        ] {
            let reply = call(&app, who.sign(req)).await;
            assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
            assert!(reply.body["error"].as_str().unwrap().contains("admin role"));
        }
    }
    assert_eq!(db::users::count(&db.pool).await.unwrap(), 3);

    let created = call(
        &app,
        admin.sign(request(Method::POST, "/api/v1/users", Some(&body))),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.body["user"]["role"], "admin");
    assert!(created.body.get("password").is_none());
    let list = call(
        &app,
        admin.sign(request(Method::GET, "/api/v1/users", None)),
    )
    .await;
    let names: Vec<&str> = list
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["username"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["eve", "oper", "root", "view"]);
    login(&app, "eve", PASSWORD).await;

    // A generated password is returned once and works.
    let generated = call(
        &app,
        admin.sign(request(
            Method::POST,
            "/api/v1/users",
            Some(&json!({ "username": "Gen", "role": "viewer" })),
        )),
    )
    .await;
    assert_eq!(generated.status, StatusCode::CREATED);
    assert_eq!(generated.body["user"]["username"], "gen");
    let pw = generated.body["password"].as_str().unwrap().to_owned();
    login(&app, "gen", &pw).await;
}

#[tokio::test]
async fn user_input_is_validated() {
    let (_db, app) = setup().await;
    let admin = login(&app, "root", PASSWORD).await;
    for (body, status, needle) in [
        (
            json!({ "username": "a b", "role": "viewer" }),
            StatusCode::BAD_REQUEST,
            "invalid username",
        ),
        (
            json!({ "username": "ok", "role": "god" }),
            StatusCode::BAD_REQUEST,
            "unknown variant",
        ),
        (
            json!({ "username": "ok", "role": "viewer", "password": "short" }),
            StatusCode::BAD_REQUEST,
            "at least 12",
        ),
        (
            json!({ "username": "ok", "role": "viewer", "admin": true }),
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        (
            json!({ "username": "OPER", "role": "viewer" }),
            StatusCode::CONFLICT,
            "exists",
        ),
    ] {
        let reply = call(
            &app,
            admin.sign(request(Method::POST, "/api/v1/users", Some(&body))),
        )
        .await;
        assert_eq!(reply.status, status, "{body}: {}", reply.body);
        assert!(
            reply.body["error"].as_str().unwrap().contains(needle),
            "{}",
            reply.body
        );
    }
    let empty = call(
        &app,
        admin.sign(request(Method::PATCH, "/api/v1/users/1", Some(&json!({})))),
    )
    .await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);
    let missing = call(
        &app,
        admin.sign(request(Method::DELETE, "/api/v1/users/999999", None)),
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_last_admin_stays() {
    let (db, app) = setup().await;
    let admin = login(&app, "root", PASSWORD).await;
    let id_of = |name: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT id FROM users WHERE username = $1")
                .bind(name)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let root = id_of("root").await;
    let uri = format!("/api/v1/users/{root}");
    for req in [
        request(Method::DELETE, &uri, None),
        request(Method::PATCH, &uri, Some(&json!({ "role": "operator" }))),
        request(Method::PATCH, &uri, Some(&json!({ "disabled": true }))),
    ] {
        let reply = call(&app, admin.sign(req)).await;
        assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.body);
        assert!(
            reply.body["error"]
                .as_str()
                .unwrap()
                .contains("last enabled admin")
        );
    }
    // With a second admin, the first can go (even by its own hand).
    let oper = id_of("oper").await;
    let promoted = call(
        &app,
        admin.sign(request(
            Method::PATCH,
            &format!("/api/v1/users/{oper}"),
            Some(&json!({ "role": "admin" })),
        )),
    )
    .await;
    assert_eq!(promoted.status, StatusCode::OK);
    assert_eq!(promoted.body["role"], "admin");
    let deleted = call(&app, admin.sign(request(Method::DELETE, &uri, None))).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    // Its session went with it.
    let me = call(
        &app,
        admin.cookie_only(request(Method::GET, "/api/v1/me", None)),
    )
    .await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED);
    let new_admin = login(&app, "oper", PASSWORD).await;
    let last = call(
        &app,
        new_admin.sign(request(
            Method::DELETE,
            &format!("/api/v1/users/{oper}"),
            None,
        )),
    )
    .await;
    assert_eq!(last.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn disabling_or_a_new_password_ends_sessions() {
    let (db, app) = setup().await;
    let admin = login(&app, "root", PASSWORD).await;
    let viewer = login(&app, "view", PASSWORD).await;
    let view_id: i64 = sqlx::query_scalar("SELECT id FROM users WHERE username = 'view'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let uri = format!("/api/v1/users/{view_id}");
    let me = |s: &Login| s.cookie_only(request(Method::GET, "/api/v1/me", None));

    let reply = call(
        &app,
        admin.sign(request(
            Method::PATCH,
            &uri,
            Some(&json!({ "disabled": true })),
        )),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        call(&app, me(&viewer)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&app, login_request("view", PASSWORD)).await.status,
        StatusCode::UNAUTHORIZED
    );

    let new_password = "another long password";
    let reply = call(
        &app,
        admin.sign(request(
            Method::PATCH,
            &uri,
            Some(&json!({ "disabled": false, "password": new_password })),
        )),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let viewer = login(&app, "view", new_password).await;
    let reply = call(
        &app,
        admin.sign(request(
            Method::PATCH,
            &uri,
            Some(&json!({ "password": "yet another password" })),
        )),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        call(&app, me(&viewer)).await.status,
        StatusCode::UNAUTHORIZED
    );

    // A role change applies to live sessions at once.
    let viewer = login(&app, "view", "yet another password").await;
    let reply = call(
        &app,
        admin.sign(request(
            Method::PATCH,
            &uri,
            Some(&json!({ "role": "admin" })),
        )),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let list = call(
        &app,
        viewer.sign(request(Method::GET, "/api/v1/users", None)),
    )
    .await;
    assert_eq!(list.status, StatusCode::OK);
}

#[tokio::test]
async fn every_change_is_audited() {
    let (db, app) = setup().await;
    let admin = login(&app, "root", PASSWORD).await;
    let created = call(
        &app,
        from_peer(
            admin.sign(request(
                Method::POST,
                "/api/v1/users",
                Some(&json!({ "username": "tmp", "role": "viewer", "password": PASSWORD })),
            )),
            "192.0.2.44",
        ),
    )
    .await;
    let id = created.body["user"]["id"].as_i64().unwrap();
    let uri = format!("/api/v1/users/{id}");
    call(
        &app,
        admin.sign(request(
            Method::PATCH,
            &uri,
            Some(&json!({ "role": "operator", "password": "a new long password" })),
        )),
    )
    .await;
    call(&app, admin.sign(request(Method::DELETE, &uri, None))).await;
    call(
        &app,
        admin.sign(request(Method::POST, "/api/v1/logout", None)),
    )
    .await;
    let rows = audit_actions(&db.pool).await;
    let expected = [
        ("root", "login", None),
        ("root", "user.create", Some("user:tmp")),
        ("root", "user.update", Some("user:tmp")),
        ("root", "user.delete", Some("user:tmp")),
        ("root", "logout", None),
    ];
    assert_eq!(rows.len(), expected.len(), "{rows:?}");
    for (row, (actor, action, target)) in rows.iter().zip(expected) {
        assert_eq!(
            (row.0.as_str(), row.1.as_str(), row.2.as_deref()),
            (actor, action, target)
        );
    }
    let (ip, details): (Option<String>, Value) =
        sqlx::query_as("SELECT host(ip), details FROM audit_log WHERE action = 'user.create'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(ip.as_deref(), Some("192.0.2.44"));
    assert_eq!(details["role"], "viewer");
    let update: Value =
        sqlx::query_scalar("SELECT details FROM audit_log WHERE action = 'user.update'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        update["role"],
        json!({ "from": "viewer", "to": "operator" })
    );
    assert_eq!(update["password_changed"], true);
    assert!(!update.to_string().contains("a new long password"));

    // The audit API pages newest first.
    let admin = login(&app, "root", PASSWORD).await;
    let page = call(
        &app,
        admin.sign(request(Method::GET, "/api/v1/audit-log?limit=2", None)),
    )
    .await;
    assert_eq!(page.status, StatusCode::OK);
    let page = page.body.as_array().unwrap().clone();
    assert_eq!(page.len(), 2);
    assert_eq!(page[0]["action"], "login");
    assert_eq!(page[1]["action"], "logout");
    let before = page[1]["id"].as_i64().unwrap();
    let next = call(
        &app,
        admin.sign(request(
            Method::GET,
            &format!("/api/v1/audit-log?limit=1&before={before}"),
            None,
        )),
    )
    .await;
    assert_eq!(next.body[0]["action"], "user.delete");
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
    let stored: String = sqlx::query_scalar("SELECT password_hash FROM users")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(stored.starts_with("$argon2id$") && !stored.contains(&password));
    let app = app(db.state());
    login(&app, "admin", &password).await;
    let rows = audit_actions(&db.pool).await;
    assert_eq!(
        rows[0],
        (
            "system".to_owned(),
            "user.create".to_owned(),
            Some("user:admin".to_owned())
        )
    );
}

#[tokio::test]
async fn create_admin_creates_refuses_and_resets() {
    let db = TestDb::new().await;
    let app = app(db.state());
    let created = manager::admin::create_admin(&db.pool, "Boss", None, false)
        .await
        .unwrap();
    let generated = created.generated_password.unwrap();
    let session = login(&app, "boss", &generated).await;
    let exists =
        manager::admin::create_admin(&db.pool, "boss", Some(PASSWORD.to_owned()), false).await;
    assert!(exists.unwrap_err().to_string().contains("--reset"));
    let short =
        manager::admin::create_admin(&db.pool, "other", Some("short".to_owned()), false).await;
    assert!(short.is_err());
    let reset = manager::admin::create_admin(&db.pool, "boss", Some(PASSWORD.to_owned()), true)
        .await
        .unwrap();
    assert!(reset.generated_password.is_none());
    let me = call(
        &app,
        session.cookie_only(request(Method::GET, "/api/v1/me", None)),
    )
    .await;
    assert_eq!(me.status, StatusCode::UNAUTHORIZED, "a reset ends sessions");
    login(&app, "boss", PASSWORD).await;
    let actions: Vec<(String, String)> = audit_actions(&db.pool)
        .await
        .into_iter()
        .filter(|(_, action, _)| action != "login")
        .map(|(actor, action, _)| (actor, action))
        .collect();
    assert_eq!(
        actions,
        [
            ("cli".to_owned(), "user.create".to_owned()),
            ("cli".to_owned(), "user.reset_admin".to_owned())
        ]
    );
}

#[tokio::test]
async fn health_and_metrics() {
    let (_db, app) = setup().await;
    let health = call(&app, request(Method::GET, "/healthz", None)).await;
    assert_eq!(health.status, StatusCode::OK);
    call(&app, login_request("root", "wrong password")).await;
    let metrics = call(&app, request(Method::GET, "/metrics", None)).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = metrics.body.as_str().unwrap();
    assert!(
        text.contains(
            "mirage_manager_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"}"
        ),
        "{text}"
    );
    assert!(
        text.contains("mirage_manager_logins_total{outcome=\"failure\"}"),
        "{text}"
    );
    let missing = call(&app, request(Method::GET, "/nowhere", None)).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}
