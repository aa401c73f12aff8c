//! The OpenAPI document against the router, both ways: every route in `routes/mod.rs` is
//! documented with each of its methods, and every documented operation is served.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;

use std::collections::BTreeSet;

use axum::http::{Method, StatusCode};
use common::{call, request};
use manager::{app, openapi, test_util::TestDb};

/// `(METHOD, path)` of every `.route("path", get(..).post(..))` in the router's source.
fn routed() -> BTreeSet<(String, String)> {
    let source = include_str!("../src/routes/mod.rs");
    let mut out = BTreeSet::new();
    for chunk in source.split(".route(").skip(1) {
        let path = chunk
            .split('"')
            .nth(1)
            .expect("a route's first argument is a string literal");
        for method in ["get", "post", "put", "patch", "delete"] {
            let mut rest = chunk;
            while let Some(at) = rest.find(&format!("{method}(")) {
                let before = rest[..at].chars().last();
                // `get(` as a word: preceded by start, space, newline, `.` or `(`.
                if before.is_none_or(|c| " \n.(".contains(c)) {
                    out.insert((method.to_uppercase(), path.to_owned()));
                    break;
                }
                rest = &rest[at + 1..];
            }
        }
    }
    out
}

#[test]
fn every_route_is_documented() {
    let documented: BTreeSet<(String, String)> = openapi::operations().into_iter().collect();
    let routed = routed();
    assert!(routed.len() > 20, "parsed only {routed:?}");
    let api_routes: BTreeSet<_> = routed
        .iter()
        .filter(|(_, p)| p.starts_with("/api/") || p == "/healthz" || p == "/metrics")
        .cloned()
        .collect();
    let missing: Vec<_> = api_routes.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "routes missing from the OpenAPI document: {missing:?}"
    );
    let stale: Vec<_> = documented.difference(&api_routes).collect();
    assert!(
        stale.is_empty(),
        "documented but not in routes/mod.rs: {stale:?}"
    );
}

#[tokio::test]
async fn every_documented_operation_is_served() {
    let db = TestDb::new().await;
    let app = app(db.state());
    // The control: an unknown API path is a 404.
    let unknown = call(&app, request(Method::GET, "/api/v1/no-such-route", None)).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    for (method, path) in openapi::operations() {
        let uri = path.replace("{id}", "1").replace("{name}", "default");
        let method: Method = method.parse().unwrap();
        let reply = call(&app, request(method.clone(), &uri, None)).await;
        assert!(
            reply.status != StatusCode::NOT_FOUND && reply.status != StatusCode::METHOD_NOT_ALLOWED
                || reply.body.get("error").is_some(),
            "{method} {uri}: {} {}",
            reply.status,
            reply.body
        );
    }
}

#[tokio::test]
async fn the_document_is_served_and_well_formed() {
    let db = TestDb::new().await;
    let reply = call(
        &app(db.state()),
        request(Method::GET, "/api/v1/openapi.json", None),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["openapi"], "3.1.0");
    // Every $ref points at a defined schema.
    let text = reply.body.to_string();
    let schemas = reply.body["components"]["schemas"].as_object().unwrap();
    for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = piece.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "undefined schema {name}");
    }
}
