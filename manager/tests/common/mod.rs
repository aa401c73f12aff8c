//! HTTP helpers shared by the manager's integration test binaries: build a request, send it
//! through `app(state).oneshot`, read the reply as JSON, sign it as a logged-in user or an agent.

#![allow(
    dead_code,
    reason = "shared by several test binaries, each uses a part"
)]

use axum::{
    Router,
    body::Body,
    http::{HeaderMap, Method, Request, StatusCode, header},
};
use http_body_util::BodyExt as _;
use manager::{
    app,
    auth::{Role, password},
    db,
    test_util::TestDb,
};
use serde_json::Value;
use sqlx::PgPool;
use tower::ServiceExt as _;

/// A password that passes the manager's length rule.
pub const PASSWORD: &str = "a long enough password";

/// A reply: status, headers and the body as JSON (a JSON string if it was not JSON, null if
/// empty).
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

/// Sends `req` through the router.
pub async fn call(app: &Router, req: Request<Body>) -> Reply {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// A request with an optional JSON body.
pub fn request(method: Method, uri: &str, body: Option<&Value>) -> Request<Body> {
    let builder = Request::builder().method(method).uri(uri);
    match body {
        Some(body) => builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
        None => builder.body(Body::empty()).unwrap(),
    }
}

/// `req` with an agent's or a server's bearer credential.
pub fn bearer(mut req: Request<Body>, credential: &str) -> Request<Body> {
    req.headers_mut().insert(
        header::AUTHORIZATION,
        format!("Bearer {credential}").parse().unwrap(),
    );
    req
}

/// A logged-in client: its cookie and CSRF token.
#[derive(Clone)]
pub struct Login {
    pub cookie: String,
    pub csrf: String,
}

impl Login {
    /// `req` with the session cookie and the CSRF header.
    pub fn sign(&self, mut req: Request<Body>) -> Request<Body> {
        let headers = req.headers_mut();
        headers.insert(header::COOKIE, self.cookie.parse().unwrap());
        headers.insert("x-csrf-token", self.csrf.parse().unwrap());
        req
    }
}

/// Adds a user with [`PASSWORD`].
pub async fn add_user(pool: &PgPool, username: &str, role: Role) {
    let hash = password::hash(PASSWORD).unwrap();
    db::users::insert(pool, username, &hash, role)
        .await
        .unwrap();
}

/// Logs `username` in with [`PASSWORD`].
pub async fn login(app: &Router, username: &str) -> Login {
    let reply = call(
        app,
        request(
            Method::POST,
            "/api/v1/login",
            Some(&serde_json::json!({ "username": username, "password": PASSWORD })),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let cookie = reply.headers[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    Login {
        cookie,
        csrf: reply.body["csrf_token"].as_str().unwrap().to_owned(),
    }
}

/// A fresh database with an admin (`root`), an operator (`oper`) and a viewer (`view`), each
/// logged in, and the app over it.
pub struct Users {
    pub db: TestDb,
    pub app: Router,
    pub admin: Login,
    pub oper: Login,
    pub view: Login,
}

/// See [`Users`].
pub async fn users() -> Users {
    let db = TestDb::new().await;
    add_user(&db.pool, "root", Role::Admin).await;
    add_user(&db.pool, "oper", Role::Operator).await;
    add_user(&db.pool, "view", Role::Viewer).await;
    let app = app(db.state());
    let admin = login(&app, "root").await;
    let oper = login(&app, "oper").await;
    let view = login(&app, "view").await;
    Users {
        db,
        app,
        admin,
        oper,
        view,
    }
}

impl Users {
    /// `method uri` with `body`, signed as `who`.
    pub async fn send(&self, who: &Login, method: Method, uri: &str, body: Option<Value>) -> Reply {
        call(&self.app, who.sign(request(method, uri, body.as_ref()))).await
    }

    pub async fn get(&self, who: &Login, uri: &str) -> Reply {
        self.send(who, Method::GET, uri, None).await
    }

    pub async fn post(&self, who: &Login, uri: &str, body: Value) -> Reply {
        self.send(who, Method::POST, uri, Some(body)).await
    }

    pub async fn put(&self, who: &Login, uri: &str, body: Value) -> Reply {
        self.send(who, Method::PUT, uri, Some(body)).await
    }

    pub async fn delete(&self, who: &Login, uri: &str) -> Reply {
        self.send(who, Method::DELETE, uri, None).await
    }
}

/// One server-sent event with an id (the policy and detection streams give every event one).
#[derive(Debug)]
pub struct SseEvent {
    pub event: String,
    pub id: i64,
    pub data: Value,
}

/// Takes the next complete event with an id out of `buf` (skipping keep-alive comments and
/// other id-less blocks); `None` until one is complete.
pub fn take_event(buf: &mut String) -> Option<SseEvent> {
    while let Some(end) = buf.find("\n\n") {
        let block: String = buf.drain(..end + 2).collect();
        let (mut event, mut id, mut data) = (String::new(), None, String::new());
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event: ") {
                event = v.to_owned();
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.parse().unwrap());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push_str(v);
            }
        }
        if let Some(id) = id {
            return Some(SseEvent {
                event,
                id,
                data: serde_json::from_str(&data).unwrap(),
            });
        }
    }
    None
}
