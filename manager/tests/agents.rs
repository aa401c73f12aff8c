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
    http::{Method, StatusCode, header},
};
use http_body_util::BodyExt as _;
mod common;

use common::{Reply, SseEvent, Users as Setup, bearer, call, request, take_event, users as setup};
use manager::{app, db};
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt as _;

impl Setup {
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
    assert!(again.body["error"].as_str().unwrap().contains("used"));
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
    // Swept a day after expiry.
    let swept = db::agents::delete_stale_enrollment_tokens(&s.db.pool).await;
    assert_eq!(swept.unwrap(), 0);
    sqlx::query("UPDATE enrollment_tokens SET expires_at = now() - interval '2 days'")
        .execute(&s.db.pool)
        .await
        .unwrap();
    let swept = db::agents::delete_stale_enrollment_tokens(&s.db.pool).await;
    assert_eq!(swept.unwrap(), 1);
}

#[tokio::test]
async fn agents_report_their_counters_and_the_agents_page_lists_them() {
    let s = setup().await;
    let (id, credential) = s.agent("web-1").await;
    let report = json!({
        "mode": "unreal", "applied_revision": 0,
        "counters": {
            "global": { "rx_packets": 1200, "dropped": 40 },
            "sources": [
                { "addr": "::ffff:203.0.113.7",
                  "packets": { "pass": 0, "drop": 40, "redirect": 2, "reflect": 0 },
                  "bytes": { "pass": 0, "drop": 2400, "redirect": 180, "reflect": 0 },
                  "total_packets": 42, "total_bytes": 2580, "last_seen_secs_ago": 3.5 },
                { "addr": "2001:db8::9", "packets": { "pass": 7 }, "bytes": { "pass": 700 } },
            ],
        },
    });
    let req = request(Method::POST, "/api/v1/agent/heartbeat", Some(&report));
    let beat = call(&s.app, bearer(req, &credential)).await;
    assert_eq!(beat.status, StatusCode::OK, "{}", beat.body);
    assert_eq!(beat.body["applied_revision"], 0);
    assert!(beat.body["counters_at"].is_string());

    let listed = s.get(&s.view, "/api/v1/agents").await;
    let agent = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id)
        .unwrap()
        .clone();
    assert_eq!(agent["mode"], "unreal");
    let counters = &agent["counters"];
    assert_eq!(counters["global"]["dropped"], 40);
    let first = &counters["sources"][0];
    // IPv4-mapped folded; only actions with traffic; totals recomputed; last seen made absolute.
    assert_eq!(first["addr"], "203.0.113.7");
    assert_eq!(
        first["actions"],
        json!({
            "drop": { "packets": 40, "bytes": 2400 },
            "redirect": { "packets": 2, "bytes": 180 },
        })
    );
    assert_eq!(
        (
            first["total_packets"].as_u64(),
            first["total_bytes"].as_u64()
        ),
        (Some(42), Some(2580))
    );
    assert!(first["last_seen"].is_string());
    assert_eq!(counters["sources"][1]["actions"]["pass"]["packets"], 7);
    assert!(counters["sources"][1]["last_seen"].is_null());

    // A heartbeat without counters keeps the last report.
    s.heartbeat(&credential).await;
    let listed = s.get(&s.view, "/api/v1/agents").await;
    assert_eq!(listed.body[0]["counters"]["global"]["rx_packets"], 1200);

    // Bounded and validated, naming the field.
    let too_many: Vec<Value> = (0..1001)
        .map(|i| json!({ "addr": format!("10.0.{}.{}", i / 256, i % 256) }))
        .collect();
    for (body, needle) in [
        (
            json!({ "counters": { "sources": too_many } }),
            "at most 1000",
        ),
        (
            json!({ "counters": { "global": { "bad name": 1 } } }),
            "invalid counter name",
        ),
        (
            json!({ "counters": { "sources": [{ "addr": "10.0.0.1", "last_seen_secs_ago": -1.0 }] } }),
            "last_seen_secs_ago",
        ),
        (
            json!({ "counters": { "sources": [{ "addr": "not an address" }] } }),
            "addr",
        ),
        (
            json!({ "counters": { "sources": [], "extra": 1 } }),
            "unknown field",
        ),
    ] {
        let req = request(Method::POST, "/api/v1/agent/heartbeat", Some(&body));
        let reply = call(&s.app, bearer(req, &credential)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            reply.body["error"].as_str().unwrap().contains(needle),
            "{}",
            reply.body
        );
    }
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
    let mut stream = SseReader::open(&s.app, &credential, None).await;
    assert_eq!(stream.next().await.event, "snapshot");
    assert_eq!(
        s.delete(&s.oper, &format!("/api/v1/agents/{id}"))
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    // The open stream ends at once (not at the next 15 s check).
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while let Some(frame) = stream.body.frame().await {
            frame.unwrap();
        }
    })
    .await;
    assert!(end.is_ok(), "the revoked agent's stream is still open");
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

async fn revisions(pool: &PgPool) -> Vec<(i64, String, Option<String>)> {
    sqlx::query_as("SELECT revision, op, net::text FROM policy_revisions ORDER BY revision")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn viewers_cannot_block_and_operators_cannot_force() {
    let s = setup().await;
    let viewer = s
        .post(
            &s.view,
            "/api/v1/attackers",
            json!({ "net": "198.51.100.7" }),
        )
        .await;
    assert_eq!(viewer.status, StatusCode::FORBIDDEN);
    let force = s
        .post(
            &s.oper,
            "/api/v1/attackers",
            json!({ "net": "10.0.0.0/8", "force": true }),
        )
        .await;
    assert_eq!(force.status, StatusCode::FORBIDDEN);
    assert!(force.body["error"].as_str().unwrap().contains("admin"));
    let admin = s
        .post(
            &s.admin,
            "/api/v1/attackers",
            json!({ "net": "10.0.0.0/8", "force": true }),
        )
        .await;
    assert_eq!(admin.status, StatusCode::CREATED, "{}", admin.body);
    let id = admin.body["id"].as_i64().unwrap();
    let unblock = s.delete(&s.view, &format!("/api/v1/attackers/{id}")).await;
    assert_eq!(unblock.status, StatusCode::FORBIDDEN);
    assert_eq!(
        s.get(&s.view, "/api/v1/attackers").await.body[0]["net"],
        "10.0.0.0/8"
    );
}

#[tokio::test]
async fn attacker_input_is_validated() {
    let s = setup().await;
    for (body, needle) in [
        (
            json!({ "net": "198.51.100.7/24" }),
            "did you mean `198.51.100.0/24`",
        ),
        (json!({ "net": "10.0.0.0/8" }), "broader than /16"),
        (json!({ "net": "2001:d00::/24" }), "broader than /32"),
        (json!({ "net": "0.0.0.0/0", "force": false }), "too broad"),
        (json!({ "net": "nope" }), "not an IPv4"),
        (
            json!({ "net": "198.51.100.7", "action": "nuke" }),
            "unknown action",
        ),
        (json!({ "net": "198.51.100.7", "ttl_secs": 0 }), "ttl_secs"),
        (
            json!({ "net": "198.51.100.7", "group": "nope" }),
            "no agent group",
        ),
        (json!({ "address": "198.51.100.7" }), "unknown field"),
    ] {
        let reply = s.post(&s.oper, "/api/v1/attackers", body.clone()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        let message = reply.body["error"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: {message}");
    }
    // IPv4-mapped addresses fold to IPv4.
    let mapped = s
        .post(
            &s.oper,
            "/api/v1/attackers",
            json!({ "net": "::ffff:198.51.100.7", "action": "drop", "reason": "scan" }),
        )
        .await;
    assert_eq!(mapped.status, StatusCode::CREATED, "{}", mapped.body);
    assert_eq!(mapped.body["net"], "198.51.100.7/32");

    // The allowlist is never bypassed: exact matches, addresses inside and ranges around.
    let allow = s
        .post(
            &s.oper,
            "/api/v1/allowlist",
            json!({ "net": "192.0.2.0/28" }),
        )
        .await;
    assert_eq!(allow.status, StatusCode::OK, "{}", allow.body);
    assert_eq!(allow.body["allowlist"], json!(["192.0.2.0/28"]));
    for net in [
        "192.0.2.0/28",
        "192.0.2.5",
        "192.0.2.0/24",
        "::ffff:192.0.2.1",
    ] {
        for group in [None, Some("default")] {
            let reply = s
                .post(
                    &s.admin,
                    "/api/v1/attackers",
                    json!({ "net": net, "group": group }),
                )
                .await;
            assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{net}");
            assert!(
                reply.body["error"].as_str().unwrap().contains("allowlist"),
                "{}",
                reply.body
            );
        }
    }
    let dup = s
        .post(
            &s.oper,
            "/api/v1/allowlist",
            json!({ "net": "192.0.2.0/28" }),
        )
        .await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    let bad = s
        .post(
            &s.oper,
            "/api/v1/allowlist",
            json!({ "net": "192.0.2.1/24" }),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let removed = s
        .delete(&s.oper, "/api/v1/allowlist?net=192.0.2.0/28")
        .await;
    assert_eq!(removed.status, StatusCode::OK, "{}", removed.body);
    assert_eq!(removed.body["allowlist"], json!([]));
    let now_ok = s
        .post(&s.oper, "/api/v1/attackers", json!({ "net": "192.0.2.5" }))
        .await;
    assert_eq!(now_ok.status, StatusCode::CREATED);
}

#[tokio::test]
async fn revisions_are_gapless_and_every_change_audited() {
    let s = setup().await;
    let a = s
        .post(
            &s.oper,
            "/api/v1/attackers",
            json!({ "net": "198.51.100.1" }),
        )
        .await;
    assert_eq!(a.body["revision"], 1);
    // A refused change takes no revision.
    let refused = s
        .post(&s.oper, "/api/v1/attackers", json!({ "net": "10.0.0.0/8" }))
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    s.post(&s.oper, "/api/v1/allowlist", json!({ "net": "192.0.2.1" }))
        .await;
    let id = a.body["id"].as_i64().unwrap();
    assert_eq!(
        s.delete(&s.oper, &format!("/api/v1/attackers/{id}"))
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.delete(&s.oper, &format!("/api/v1/attackers/{id}"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // Concurrent writers still get consecutive revisions.
    let writes = (0..12).map(|i| {
        let s = &s;
        async move {
            s.post(
                &s.oper,
                "/api/v1/attackers",
                json!({ "net": format!("203.0.113.{i}"), "action": "drop" }),
            )
            .await
            .status
        }
    });
    for status in futures_util::future::join_all(writes).await {
        assert_eq!(status, StatusCode::CREATED);
    }
    let revs = revisions(&s.db.pool).await;
    let numbers: Vec<i64> = revs.iter().map(|r| r.0).collect();
    assert_eq!(numbers, (1..=15).collect::<Vec<_>>());
    assert_eq!(
        revs[0],
        (1, "add".to_owned(), Some("198.51.100.1/32".to_owned()))
    );
    assert_eq!(revs[1].1, "policy");
    assert_eq!(
        revs[2],
        (3, "remove".to_owned(), Some("198.51.100.1/32".to_owned()))
    );
    let head: i64 = sqlx::query_scalar("SELECT revision FROM policy_head")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(head, 15);
    let actions = audit_actions(&s.db.pool).await;
    assert_eq!(actions.len(), 15);
    assert_eq!(
        actions[..3],
        ["attacker.block", "allowlist.add", "attacker.unblock"]
    );

    // Search by containment, and paging.
    let hits = s.get(&s.view, "/api/v1/attackers?q=203.0.113.0/24").await;
    assert_eq!(hits.body.as_array().unwrap().len(), 12);
    let one = s.get(&s.view, "/api/v1/attackers?q=203.0.113.5").await;
    assert_eq!(one.body.as_array().unwrap().len(), 1);
    let page = s.get(&s.view, "/api/v1/attackers?limit=5").await;
    let last = page.body[4]["id"].as_i64().unwrap();
    let next = s
        .get(
            &s.view,
            &format!("/api/v1/attackers?limit=100&before={last}"),
        )
        .await;
    assert_eq!(next.body.as_array().unwrap().len(), 7);
    let bad = s.get(&s.view, "/api/v1/attackers?q=zzz").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn polling_agents_get_a_snapshot_then_deltas() {
    let s = setup().await;
    let (_, credential) = s.agent("web-1").await;
    s.post(
        &s.oper,
        "/api/v1/attackers",
        json!({ "net": "198.51.100.1", "action": "drop" }),
    )
    .await;
    let poll = |since: Option<i64>| {
        let req = request(
            Method::POST,
            "/api/v1/agent/policy",
            Some(&json!({ "since": since })),
        );
        call(&s.app, bearer(req, &credential))
    };
    let snapshot = poll(None).await;
    assert_eq!(snapshot.status, StatusCode::OK, "{}", snapshot.body);
    assert_eq!(snapshot.body["kind"], "snapshot");
    assert_eq!(snapshot.body["revision"], 1);
    assert_eq!(snapshot.body["policy"]["mode"], "unreal");
    assert_eq!(
        snapshot.body["attackers"],
        json!([{ "net": "198.51.100.1/32", "action": "drop", "group_id": null }])
    );
    s.post(
        &s.oper,
        "/api/v1/attackers",
        json!({ "net": "198.51.100.2", "ttl_secs": 60 }),
    )
    .await;
    let deltas = poll(Some(1)).await;
    assert_eq!(deltas.body["kind"], "deltas");
    assert_eq!(deltas.body["revision"], 2);
    assert_eq!(deltas.body["deltas"][0]["op"], "add");
    assert_eq!(deltas.body["deltas"][0]["net"], "198.51.100.2/32");
    assert!(deltas.body["deltas"][0]["expires_at"].is_string());
    let current = poll(Some(2)).await;
    assert_eq!(
        current.body,
        json!({ "kind": "deltas", "revision": 2, "deltas": [] })
    );
    // Blocking the same network again changes the entry (same id) under a new revision.
    let again = s
        .post(
            &s.oper,
            "/api/v1/attackers",
            json!({ "net": "198.51.100.1", "action": "redirect" }),
        )
        .await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
    assert_eq!(again.body["revision"], 3);
    assert_eq!(again.body["action"], "redirect");
    let listed = s.get(&s.view, "/api/v1/attackers?q=198.51.100.1").await;
    assert_eq!(listed.body.as_array().unwrap().len(), 1);
    assert_eq!(listed.body[0]["id"], again.body["id"]);
    let changed = poll(Some(2)).await;
    assert_eq!(changed.body["deltas"][0]["action"], "redirect");
    // Ahead of the head (another database?) or pruned from the log: a snapshot.
    assert_eq!(poll(Some(99)).await.body["kind"], "snapshot");
    sqlx::query("DELETE FROM policy_revisions WHERE revision = 1")
        .execute(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(poll(Some(0)).await.body["kind"], "snapshot");
    assert_eq!(poll(Some(1)).await.body["kind"], "deltas");
    assert_eq!(poll(Some(1)).await.body["revision"], 3);
}

/// Reads events from a streaming response body.
struct SseReader {
    body: Body,
    buf: String,
}

impl SseReader {
    /// Opens `GET /api/v1/agent/stream` on `app` for `credential`, with `Last-Event-ID` if given.
    async fn open(app: &Router, credential: &str, last_event_id: Option<i64>) -> Self {
        let mut req = bearer(
            request(Method::GET, "/api/v1/agent/stream", None),
            credential,
        );
        if let Some(id) = last_event_id {
            req.headers_mut()
                .insert("last-event-id", id.to_string().parse().unwrap());
        }
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
        Self {
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next event (comments skipped), failing after `secs` seconds.
    async fn next_within(&mut self, secs: u64) -> SseEvent {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Some(event) = take_event(&mut self.buf) {
                return event;
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .expect("no event in time")
                .expect("stream ended")
                .unwrap();
            if let Ok(bytes) = frame.into_data() {
                self.buf.push_str(std::str::from_utf8(&bytes).unwrap());
            }
        }
    }

    async fn next(&mut self) -> SseEvent {
        self.next_within(10).await
    }
}

#[tokio::test]
async fn streams_a_snapshot_then_deltas_and_resumes() {
    let s = setup().await;
    let (_, credential) = s.agent("web-1").await;
    s.post(
        &s.oper,
        "/api/v1/attackers",
        json!({ "net": "198.51.100.1", "action": "drop" }),
    )
    .await;
    let mut stream = SseReader::open(&s.app, &credential, None).await;
    let snapshot = stream.next().await;
    assert_eq!((snapshot.event.as_str(), snapshot.id), ("snapshot", 1));
    assert_eq!(snapshot.data["attackers"][0]["net"], "198.51.100.1/32");
    assert_eq!(snapshot.data["policy"]["redirect_model"], "preserve-source");

    let blocked = s
        .post(
            &s.oper,
            "/api/v1/attackers",
            json!({ "net": "2001:db8::66", "action": "redirect" }),
        )
        .await;
    let delta = stream.next().await;
    assert_eq!((delta.event.as_str(), delta.id), ("delta", 2));
    assert_eq!(delta.data["op"], "add");
    assert_eq!(delta.data["net"], "2001:db8::66/128");
    assert_eq!(delta.data["action"], "redirect");
    drop(stream);

    // Missed while disconnected: an unblock and an allowlist change.
    let id = blocked.body["id"].as_i64().unwrap();
    s.delete(&s.oper, &format!("/api/v1/attackers/{id}")).await;
    s.post(&s.oper, "/api/v1/allowlist", json!({ "net": "192.0.2.1" }))
        .await;
    let mut resumed = SseReader::open(&s.app, &credential, Some(2)).await;
    let first = resumed.next().await;
    assert_eq!((first.event.as_str(), first.id), ("delta", 3));
    assert_eq!(first.data["op"], "remove");
    let second = resumed.next().await;
    assert_eq!(second.id, 4);
    assert_eq!(second.data["op"], "policy");
    assert_eq!(second.data["details"]["allowlist"], json!(["192.0.2.1/32"]));
    // Nothing repeated, and the next change arrives as revision 5.
    s.post(
        &s.oper,
        "/api/v1/attackers",
        json!({ "net": "198.51.100.9" }),
    )
    .await;
    assert_eq!(resumed.next().await.id, 5);

    // A revision no longer in the log: a snapshot instead.
    sqlx::query("DELETE FROM policy_revisions WHERE revision <= 3")
        .execute(&s.db.pool)
        .await
        .unwrap();
    let mut fresh = SseReader::open(&s.app, &credential, Some(1)).await;
    let snapshot = fresh.next().await;
    assert_eq!((snapshot.event.as_str(), snapshot.id), ("snapshot", 5));
    assert_eq!(snapshot.data["attackers"].as_array().unwrap().len(), 2);

    // Bad or missing credentials.
    let req = request(Method::GET, "/api/v1/agent/stream", None);
    assert_eq!(call(&s.app, req).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn many_streams_at_one_position_all_get_every_delta() {
    // The streams share their re-reads (policy::shared): each must still get every revision,
    // in order, including changes that land while a shared read is in flight.
    let s = setup().await;
    let (_, credential) = s.agent("web-1").await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut stream = SseReader::open(&s.app, &credential, None).await;
        assert_eq!(stream.next().await.event, "snapshot");
        streams.push(stream);
    }
    for i in 1..=5 {
        s.post(
            &s.oper,
            "/api/v1/attackers",
            json!({ "net": format!("198.51.100.{i}") }),
        )
        .await;
    }
    for stream in &mut streams {
        for revision in 1..=5 {
            let delta = stream.next_within(5).await;
            assert_eq!((delta.event.as_str(), delta.id), ("delta", revision));
            assert_eq!(delta.data["net"], format!("198.51.100.{revision}/32"));
        }
    }
}

#[tokio::test]
async fn a_change_on_one_replica_reaches_a_stream_on_another() {
    let s = setup().await;
    let (_, credential) = s.agent("web-1").await;
    // A second manager: its own pool, state and LISTEN connection, on the same database.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&s.db.url)
        .await
        .unwrap();
    let replica = app(manager::AppState::new(
        pool,
        manager::test_util::test_config(),
    ));
    let mut stream = SseReader::open(&replica, &credential, None).await;
    assert_eq!(stream.next().await.event, "snapshot");
    s.post(
        &s.oper,
        "/api/v1/attackers",
        json!({ "net": "198.51.100.1" }),
    )
    .await;
    // Well before the 15 s re-check: only NOTIFY can have woken it.
    let delta = stream.next_within(5).await;
    assert_eq!((delta.event.as_str(), delta.id), ("delta", 1));
    assert_eq!(delta.data["net"], "198.51.100.1/32");
}

#[tokio::test]
async fn the_expiry_sweep_writes_remove_revisions() {
    let s = setup().await;
    let (_, credential) = s.agent("web-1").await;
    s.post(
        &s.oper,
        "/api/v1/attackers",
        json!({ "net": "198.51.100.1", "ttl_secs": 3600 }),
    )
    .await;
    s.post(
        &s.oper,
        "/api/v1/attackers",
        json!({ "net": "198.51.100.2" }),
    )
    .await;
    assert_eq!(
        manager::policy::expiry::sweep_once(&s.db.pool)
            .await
            .unwrap(),
        0
    );
    let mut stream = SseReader::open(&s.app, &credential, Some(2)).await;
    sqlx::query(
        "UPDATE attackers SET expires_at = now() - interval '1 second' WHERE net = '198.51.100.1'",
    )
    .execute(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(
        manager::policy::expiry::sweep_once(&s.db.pool)
            .await
            .unwrap(),
        1
    );
    let delta = stream.next().await;
    assert_eq!((delta.event.as_str(), delta.id), ("delta", 3));
    assert_eq!(delta.data["op"], "remove");
    assert_eq!(delta.data["net"], "198.51.100.1/32");
    let left = s.get(&s.view, "/api/v1/attackers").await;
    assert_eq!(left.body.as_array().unwrap().len(), 1);
    assert_eq!(left.body[0]["net"], "198.51.100.2/32");
    assert_eq!(
        revisions(&s.db.pool).await[2],
        (3, "remove".to_owned(), Some("198.51.100.1/32".to_owned()))
    );
    assert_eq!(
        audit_actions(&s.db.pool).await.last().unwrap(),
        "attacker.expire"
    );
}

#[tokio::test]
async fn a_stream_far_behind_gets_every_page_without_waiting() {
    let s = setup().await;
    let (_, credential) = s.agent("web-1").await;
    let total = manager::policy::MAX_DELTAS + 5;
    sqlx::query(
        "INSERT INTO policy_revisions (revision, op, net, action) \
         SELECT n, 'add', ('10.0.0.0'::inet + n)::cidr, 'drop' FROM generate_series(1, $1) n",
    )
    .bind(total)
    .execute(&s.db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE policy_head SET revision = $1")
        .bind(total)
        .execute(&s.db.pool)
        .await
        .unwrap();
    let mut stream = SseReader::open(&s.app, &credential, Some(0)).await;
    for want in 1..=total {
        let event = stream.next_within(5).await;
        assert_eq!((event.event.as_str(), event.id), ("delta", want));
    }
}

#[tokio::test]
async fn agent_flows_attribute_full_nat_sandbox_sessions() {
    let s = setup().await;
    let (_, agent) = s.agent("web-1").await;
    let flow = |attacker: &str, nat: &str| {
        json!({
            "kind": "redirect", "model": "full-nat", "proto": "tcp", "attacker": attacker,
            "orig_dst": "192.0.2.10:22", "target": "198.18.0.2:22", "nat": nat, "ts_ns": 1,
        })
    };
    let report = |body: Value, credential: &str| {
        bearer(
            request(Method::POST, "/api/v1/agent/flows", Some(&body)),
            credential,
        )
    };
    // Validated whole, the error naming the field.
    for (bad, field) in [
        (json!({ "flows": [] }), "1 to 1000"),
        (
            json!({ "flows": [flow("203.0.113.9:1", "not-an-addr")] }),
            "flows[0].nat",
        ),
        (
            json!({ "flows": [flow("203.0.113.9:1", "198.18.0.1:20001"), {"kind": "x"}] }),
            "flows[1]",
        ),
    ] {
        let r = call(&s.app, report(bad, &agent)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
        assert!(r.body.to_string().contains(field), "{}", r.body);
    }
    // Agents only.
    let r = call(
        &s.app,
        request(
            Method::POST,
            "/api/v1/agent/flows",
            Some(&json!({ "flows": [flow("203.0.113.9:1", "198.18.0.1:1")] })),
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = call(
        &s.app,
        report(
            json!({ "flows": [
                flow("203.0.113.9:40001", "198.18.0.1:20001"),
                flow("[2001:db8::66]:40002", "198.18.0.1:20002"),
            ] }),
            &agent,
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["accepted"], 2);

    // The sandbox saw the NAT address; the session lands on the attacker.
    let sandbox = manager::auth::new_token();
    db::service_credentials::insert(
        &s.db.pool,
        "sandbox-1",
        &manager::auth::token_hash(&sandbox),
        None,
    )
    .await
    .unwrap();
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let session = |id: &str, nat: &str| {
        json!({
            "id": id, "sandbox": "sb-1", "addr": "198.18.0.1", "service": "ssh",
            "nat_mapping": { "nat": nat }, "started_at": now,
        })
    };
    let req = request(
        Method::POST,
        "/api/v1/sandbox-sessions",
        Some(&json!({ "sessions": [
            session("s1", "198.18.0.1:20001"),
            session("s2", "198.18.0.1:20002"),
            session("s3", "198.18.0.1:29999"),
        ] })),
    );
    let r = call(&s.app, bearer(req, &sandbox)).await;
    assert!(r.status.is_success(), "{}", r.body);
    let addrs: Vec<(String, String)> = sqlx::query_as(
        "SELECT idempotency_key, host(attacker_addr) FROM sandbox_sessions ORDER BY idempotency_key",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(
        addrs,
        vec![
            ("s1".to_owned(), "203.0.113.9".to_owned()),
            ("s2".to_owned(), "2001:db8::66".to_owned()),
            ("s3".to_owned(), "198.18.0.1".to_owned()),
        ]
    );
}
