//! The policy editor: agent groups, the whole-policy PUT (validation, optimistic concurrency,
//! revisions, audit, shadowed attackers) and the deltas it sends to the group's agents only,
//! against a real PostgreSQL (one embedded cluster for this test binary, a fresh database per
//! test).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use axum::{
    Router,
    body::Body,
    http::{Method, StatusCode},
};
use http_body_util::BodyExt as _;
mod common;

use common::{SseEvent, Users as Setup, bearer, call, request, take_event, users as setup};
use serde_json::{Value, json};
use sqlx::PgPool;
use tower::ServiceExt as _;

impl Setup {
    async fn create_group(&self, name: &str) {
        let reply = self
            .post(&self.admin, "/api/v1/groups", json!({ "name": name }))
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    }

    /// An enrolled agent of `group`: `(id, credential)`.
    async fn agent(&self, hostname: &str, group: &str) -> (i64, String) {
        let token = self
            .post(
                &self.oper,
                "/api/v1/enrollment-tokens",
                json!({ "group": group }),
            )
            .await;
        assert_eq!(token.status, StatusCode::CREATED, "{}", token.body);
        let body = json!({ "token": token.body["token"], "hostname": hostname });
        let reply = call(
            &self.app,
            request(Method::POST, "/api/v1/agent/enroll", Some(&body)),
        )
        .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        (
            reply.body["agent_id"].as_i64().unwrap(),
            reply.body["credential"].as_str().unwrap().to_owned(),
        )
    }

    async fn head(&self) -> i64 {
        sqlx::query_scalar("SELECT revision FROM policy_head")
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }
}

/// A valid policy body, with `patch`'s keys replaced.
fn policy(patch: Value) -> Value {
    let mut base = json!({
        "mode": "unreal",
        "redirect_model": "preserve-source",
        "allowlist": ["192.0.2.0/28"],
        "allowlisted_ports": [],
        "sandbox_targets": [
            { "proto": "tcp", "port": 22, "target": "198.18.1.2:2222" },
            { "target": "198.18.1.2" },
        ],
        "nat": { "reflect_pps": 50 },
        "default_ttl_secs": 86400,
        "default_action": "default",
    });
    for (k, v) in patch.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

async fn audit(pool: &PgPool, action: &str) -> Vec<Value> {
    sqlx::query_scalar("SELECT details FROM audit_log WHERE action = $1 ORDER BY id")
        .bind(action)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn groups_are_listed_and_only_admins_create_or_delete_them() {
    let s = setup().await;
    let list = s.get(&s.view, "/api/v1/groups").await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.body);
    assert_eq!(list.body.as_array().unwrap().len(), 1);
    assert_eq!(list.body[0]["name"], "default");
    assert_eq!(list.body[0]["agents"], 0);
    assert_eq!(list.body[0]["policy"]["mode"], "unreal");
    assert_eq!(list.body[0]["policy"]["group"], "default");

    for who in [&s.view, &s.oper] {
        let denied = s
            .post(who, "/api/v1/groups", json!({ "name": "web" }))
            .await;
        assert_eq!(denied.status, StatusCode::FORBIDDEN);
    }
    for (body, needle) in [
        (json!({ "name": "Web" }), "invalid group name"),
        (json!({ "name": "" }), "invalid group name"),
        (json!({ "name": "a b" }), "invalid group name"),
        (json!({ "name": "web", "mode": "unreal" }), "unknown field"),
    ] {
        let reply = s.post(&s.admin, "/api/v1/groups", body.clone()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            reply.body["error"].as_str().unwrap().contains(needle),
            "{body}: {}",
            reply.body
        );
    }
    let created = s
        .post(
            &s.admin,
            "/api/v1/groups",
            json!({ "name": "web", "description": "front ends" }),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert_eq!(created.body["description"], "front ends");
    assert_eq!(created.body["policy"]["mode"], "unreal");
    assert_eq!(created.body["policy"]["revision"], 0);
    let dup = s
        .post(&s.admin, "/api/v1/groups", json!({ "name": "web" }))
        .await;
    assert_eq!(dup.status, StatusCode::CONFLICT);

    // `default` is never deleted; a group in use is not either.
    let default = s.delete(&s.admin, "/api/v1/groups/default").await;
    assert_eq!(default.status, StatusCode::CONFLICT);
    assert!(default.body["error"].as_str().unwrap().contains("default"));
    let (agent_id, _) = s.agent("web-1", "web").await;
    let listed = s.get(&s.view, "/api/v1/groups").await;
    let web = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "web")
        .unwrap();
    assert_eq!(web["agents"], 1);
    let in_use = s.delete(&s.admin, "/api/v1/groups/web").await;
    assert_eq!(in_use.status, StatusCode::CONFLICT);
    assert!(
        in_use.body["error"]
            .as_str()
            .unwrap()
            .contains("1 agent(s) and 0 unused enrollment token(s)"),
        "{}",
        in_use.body
    );
    assert_eq!(
        s.delete(&s.oper, &format!("/api/v1/agents/{agent_id}"))
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    // An unused token keeps it too.
    s.post(
        &s.oper,
        "/api/v1/enrollment-tokens",
        json!({ "group": "web" }),
    )
    .await;
    let token = s.delete(&s.admin, "/api/v1/groups/web").await;
    assert_eq!(token.status, StatusCode::CONFLICT);
    assert!(token.body["error"].as_str().unwrap().contains("1 unused"));
    sqlx::query("UPDATE enrollment_tokens SET expires_at = now() - interval '1 second'")
        .execute(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(
        s.delete(&s.oper, "/api/v1/groups/web").await.status,
        StatusCode::FORBIDDEN
    );
    let deleted = s.delete(&s.admin, "/api/v1/groups/web").await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{}", deleted.body);
    assert_eq!(
        s.delete(&s.admin, "/api/v1/groups/web").await.status,
        StatusCode::NOT_FOUND
    );
    // The revoked agent's record stays, now in `default`.
    let agents = s.get(&s.view, "/api/v1/agents").await;
    assert_eq!(agents.body[0]["name"], "web-1");
    assert_eq!(agents.body[0]["group_id"], list.body[0]["id"]);
    let deletes = audit(&s.db.pool, "group.delete").await;
    assert_eq!(deletes[0]["revoked_agents_moved_to_default"], 1);
    assert_eq!(audit(&s.db.pool, "group.create").await.len(), 1);
}

#[tokio::test]
async fn policy_input_is_validated_naming_the_field() {
    let s = setup().await;
    let uri = "/api/v1/groups/default/policy";
    for (patch, needle) in [
        (
            json!({ "mode": "mirror" }),
            "`mode`: unknown value `mirror`",
        ),
        (json!({ "redirect_model": "nat" }), "`redirect_model`"),
        (json!({ "default_action": "nuke" }), "`default_action`"),
        (
            json!({ "allowlist": ["10.0.0.0/8"] }),
            "`allowlist[0]`: `10.0.0.0/8` is broader than /16",
        ),
        (
            json!({ "allowlist": ["192.0.2.1", "192.0.2.1/32"] }),
            "`allowlist[1]`: `192.0.2.1/32` repeats allowlist[0]",
        ),
        (
            json!({ "allowlisted_ports": ["tcp/0"] }),
            "`allowlisted_ports[0]`",
        ),
        (
            json!({ "sandbox_targets": [{ "target": "198.18.1.2" }, { "port": 70000, "target": "198.18.1.3" }] }),
            "`sandbox_targets[1].port`: 70000 is not a port",
        ),
        (
            json!({ "sandbox_targets": [{ "target": "127.0.0.1" }] }),
            "`sandbox_targets[0].target`",
        ),
        (
            json!({ "sandbox_targets": [{ "target": "198.18.1.2" }, { "target": "198.18.1.3" }] }),
            "`sandbox_targets[1]`: repeats",
        ),
        (
            json!({ "sandbox_targets": [{ "port": 22, "target": "198.18.1.2" }] }),
            "`sandbox_targets`: mode `unreal` redirects traffic to the sandbox and needs a default target",
        ),
        (json!({ "default_ttl_secs": 10 }), "`default_ttl_secs`"),
        (
            json!({ "redirect_model": "full-nat" }),
            "`nat`: redirect_model `full-nat` needs `snat_v4` or `snat_v6`",
        ),
        (
            json!({ "nat": { "nat_ports": "100-200" } }),
            "`nat.nat_ports`",
        ),
        (json!({ "nat": { "bogus": 1 } }), "unknown field"),
        (json!({ "revision": 3 }), "unknown field"),
    ] {
        let body = policy(patch.clone());
        let reply = s.put(&s.oper, uri, body).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{patch}");
        let message = reply.body["error"].as_str().unwrap();
        assert!(message.contains(needle), "{patch}: {message}");
    }
    let missing = s.put(&s.oper, uri, json!({ "mode": "unreal" })).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert!(
        missing.body["error"]
            .as_str()
            .unwrap()
            .contains("missing field")
    );
    assert_eq!(
        s.put(&s.view, uri, policy(json!({}))).await.status,
        StatusCode::FORBIDDEN
    );
    let unknown = s
        .put(&s.oper, "/api/v1/groups/nope/policy", policy(json!({})))
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    // No refused PUT took a revision or changed the row.
    assert_eq!(s.head().await, 0);
    let current = s.get(&s.view, uri).await;
    assert_eq!(current.body["revision"], 0);
    assert_eq!(current.body["sandbox_targets"], json!([]));
}

#[tokio::test]
async fn a_honeypot_with_nothing_allowlisted_needs_an_admins_force() {
    let s = setup().await;
    let uri = "/api/v1/groups/default/policy";
    let lockout = policy(json!({ "mode": "honeypot", "allowlist": [] }));
    let refused = s.put(&s.oper, uri, lockout.clone()).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(
        refused.body["error"]
            .as_str()
            .unwrap()
            .contains("lock yourself out"),
        "{}",
        refused.body
    );
    let mut forced = lockout.clone();
    forced["force"] = json!(true);
    assert_eq!(
        s.put(&s.oper, uri, forced.clone()).await.status,
        StatusCode::FORBIDDEN
    );
    let ok = s.put(&s.admin, uri, forced).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(ok.body["policy"]["mode"], "honeypot");
    assert_eq!(audit(&s.db.pool, "policy.update").await[0]["force"], true);
    // With an allowlisted admin port an operator may do it.
    let ports = policy(json!({
        "mode": "honeypot", "allowlist": [], "allowlisted_ports": ["tcp/22", "443"],
    }));
    let ok = s.put(&s.oper, uri, ports).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(
        ok.body["policy"]["allowlisted_ports"],
        json!(["tcp/22", "tcp/443", "udp/443"])
    );
}

#[tokio::test]
async fn each_change_takes_one_revision_and_is_audited_field_by_field() {
    let s = setup().await;
    let uri = "/api/v1/groups/default/policy";
    let first = s.put(&s.oper, uri, policy(json!({}))).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.body["changed"], true);
    let p = &first.body["policy"];
    assert_eq!(p["revision"], 1);
    assert_eq!(p["group"], "default");
    assert_eq!(p["updated_by"], "oper");
    assert_eq!(p["allowlist"], json!(["192.0.2.0/28"]));
    assert_eq!(
        p["sandbox_targets"],
        json!([
            { "target": "198.18.1.2" },
            { "port": 22, "proto": "tcp", "target": "198.18.1.2:2222" },
        ])
    );
    assert_eq!(p["nat"], json!({ "reflect_pps": 50 }));
    assert_eq!(p["default_ttl_secs"], 86400);
    let (op, details): (String, Value) =
        sqlx::query_as("SELECT op, details FROM policy_revisions WHERE revision = 1")
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(op, "policy");
    assert_eq!(details["sandbox_targets"], p["sandbox_targets"]);
    assert_eq!(details["revision"], 1);
    let changes = &audit(&s.db.pool, "policy.update").await[0]["changes"];
    assert_eq!(changes["allowlist"]["added"], json!(["192.0.2.0/28"]));
    assert!(changes.get("mode").is_none(), "{changes}");
    assert_eq!(
        changes["default_ttl_secs"],
        json!({ "from": null, "to": 86400 })
    );

    // The same policy again (in another order): no revision, no audit row.
    let same = policy(json!({
        "sandbox_targets": [
            { "target": "198.18.1.2" },
            { "proto": "tcp", "port": 22, "target": "198.18.1.2:2222" },
        ],
    }));
    let again = s.put(&s.oper, uri, same).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.body);
    assert_eq!(again.body["changed"], false);
    assert_eq!(again.body["policy"]["revision"], 1);
    assert_eq!(s.head().await, 1);
    assert_eq!(audit(&s.db.pool, "policy.update").await.len(), 1);

    // Optimistic concurrency: an editor that started at revision 0 is refused.
    let stale = s
        .put(
            &s.oper,
            uri,
            policy(json!({ "mode": "firewall", "expected_revision": 0 })),
        )
        .await;
    assert_eq!(stale.status, StatusCode::CONFLICT);
    assert!(
        stale.body["error"].as_str().unwrap().contains("revision 1"),
        "{}",
        stale.body
    );
    assert_eq!(s.head().await, 1);
    let fresh = s
        .put(
            &s.oper,
            uri,
            policy(json!({
                "mode": "firewall", "expected_revision": 1, "allowlist": ["192.0.2.0/28", "2001:db8::/64"],
            })),
        )
        .await;
    assert_eq!(fresh.status, StatusCode::OK, "{}", fresh.body);
    assert_eq!(fresh.body["policy"]["revision"], 2);
    assert_eq!(
        fresh.body["changes"],
        json!({
            "mode": { "from": "unreal", "to": "firewall" },
            "allowlist": { "added": ["2001:db8::/64"], "removed": [] },
        })
    );
    let audited = audit(&s.db.pool, "policy.update").await;
    assert_eq!(audited.len(), 2);
    assert_eq!(audited[1]["changes"], fresh.body["changes"]);
    assert_eq!(audited[1]["revision"], 2);
    let read = s.get(&s.view, uri).await;
    assert_eq!(read.body["mode"], "firewall");
    assert_eq!(read.body["revision"], 2);
}

#[tokio::test]
async fn an_allowlist_over_live_attackers_is_accepted_and_reports_them() {
    let s = setup().await;
    s.create_group("web").await;
    let every = s
        .post(
            &s.oper,
            "/api/v1/attackers",
            json!({ "net": "198.51.100.7", "action": "drop" }),
        )
        .await;
    assert_eq!(every.status, StatusCode::CREATED, "{}", every.body);
    let mine = s
        .post(
            &s.oper,
            "/api/v1/attackers",
            json!({ "net": "198.51.100.128/25", "group": "default" }),
        )
        .await;
    assert_eq!(mine.status, StatusCode::CREATED, "{}", mine.body);
    // Another group's entry is not shadowed by this group's allowlist.
    let other = s
        .post(
            &s.oper,
            "/api/v1/attackers",
            json!({ "net": "198.51.100.9", "group": "web" }),
        )
        .await;
    assert_eq!(other.status, StatusCode::CREATED);
    let reply = s
        .put(
            &s.oper,
            "/api/v1/groups/default/policy",
            policy(json!({ "allowlist": ["198.51.100.0/24"] })),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let shadowed = reply.body["shadowed"].as_array().unwrap();
    assert_eq!(shadowed.len(), 2, "{}", reply.body);
    assert_eq!(shadowed[0]["id"], every.body["id"]);
    assert_eq!(shadowed[0]["net"], "198.51.100.7/32");
    assert_eq!(shadowed[0]["group_id"], Value::Null);
    assert_eq!(shadowed[0]["allowlisted_by"], "198.51.100.0/24");
    assert_eq!(shadowed[1]["id"], mine.body["id"]);
    // The attackers stay (the allowlist wins in the kernel).
    let left = s.get(&s.view, "/api/v1/attackers").await;
    assert_eq!(left.body.as_array().unwrap().len(), 3);
    let audited = audit(&s.db.pool, "policy.update").await;
    assert_eq!(audited[0]["shadowed"].as_array().unwrap().len(), 2);
}

/// Reads events from an agent's policy stream.
struct SseReader {
    body: Body,
    buf: String,
}

impl SseReader {
    async fn open(app: &Router, credential: &str) -> Self {
        let req = bearer(
            request(Method::GET, "/api/v1/agent/stream", None),
            credential,
        );
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        Self {
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next event, or `None` if none comes within `secs` seconds.
    async fn next_within(&mut self, secs: u64) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Some(event) = take_event(&mut self.buf) {
                return Some(event);
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .ok()?
                .expect("stream ended")
                .unwrap();
            if let Ok(bytes) = frame.into_data() {
                self.buf.push_str(std::str::from_utf8(&bytes).unwrap());
            }
        }
    }
}

#[tokio::test]
async fn a_policy_change_reaches_the_groups_agents_and_no_others() {
    let s = setup().await;
    s.create_group("web").await;
    let (_, default_agent) = s.agent("db-1", "default").await;
    let (_, web_agent) = s.agent("web-1", "web").await;
    let mut a = SseReader::open(&s.app, &default_agent).await;
    let mut b = SseReader::open(&s.app, &web_agent).await;
    assert_eq!(a.next_within(10).await.unwrap().event, "snapshot");
    let snapshot = b.next_within(10).await.unwrap();
    assert_eq!(snapshot.event, "snapshot");
    assert_eq!(snapshot.data["policy"]["sandbox_targets"], json!([]));

    let reply = s
        .put(
            &s.oper,
            "/api/v1/groups/default/policy",
            policy(json!({ "mode": "firewall" })),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let delta = a
        .next_within(10)
        .await
        .expect("no delta for the group's agent");
    assert_eq!((delta.event.as_str(), delta.id), ("delta", 1));
    assert_eq!(delta.data["op"], "policy");
    assert_eq!(delta.data["details"]["mode"], "firewall");
    assert_eq!(
        delta.data["details"]["sandbox_targets"],
        reply.body["policy"]["sandbox_targets"]
    );
    assert_eq!(delta.data["details"]["allowlist"], json!(["192.0.2.0/28"]));
    // The other group's agent gets nothing...
    assert!(b.next_within(2).await.is_none(), "web agent got a delta");
    // ...until its own group changes: revision 2, having skipped 1.
    let web = s
        .put(
            &s.oper,
            "/api/v1/groups/web/policy",
            policy(json!({ "mode": "honeypot", "allowlisted_ports": ["tcp/22"] })),
        )
        .await;
    assert_eq!(web.status, StatusCode::OK, "{}", web.body);
    let delta = b.next_within(10).await.unwrap();
    assert_eq!((delta.event.as_str(), delta.id), ("delta", 2));
    assert_eq!(delta.data["details"]["mode"], "honeypot");
    assert!(
        a.next_within(2).await.is_none(),
        "default agent got web's delta"
    );

    // The poll agrees.
    let poll = |credential: &str| {
        let req = request(
            Method::POST,
            "/api/v1/agent/policy",
            Some(&json!({ "since": 0 })),
        );
        call(&s.app, bearer(req, credential))
    };
    let polled = poll(&web_agent).await;
    assert_eq!(polled.body["kind"], "deltas");
    assert_eq!(polled.body["revision"], 2);
    let deltas = polled.body["deltas"].as_array().unwrap();
    assert_eq!(deltas.len(), 1);
    assert_eq!(deltas[0]["details"]["mode"], "honeypot");
    let polled = poll(&default_agent).await;
    assert_eq!(polled.body["deltas"].as_array().unwrap().len(), 1);
    assert_eq!(polled.body["deltas"][0]["details"]["mode"], "firewall");
}
