//! Alerts end to end, against a real PostgreSQL (one embedded cluster for this test binary, a
//! fresh database per test), a local SMTP receiver (a small SMTP server below, enough for lettre
//! without TLS) and a local webhook receiver (axum on 127.0.0.1:0): the channel API, and the
//! dispatcher's severity filter, de-duplication, hourly budget and digest, signatures, retries,
//! and its single-leader background task woken by NOTIFY.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, header},
    routing::post,
};
use hmac::{Hmac, Mac as _};
mod common;

use common::{Login, Reply, Users, bearer, call, request, users};
use manager::{
    alerts::{
        dispatch::{self, DispatchOptions, Pass},
        send::Sender,
    },
    test_util::TestDb,
};
use serde_json::{Value, json};
use sha2::Sha256;
use sqlx::Connection as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpListener,
};

// Receivers ---------------------------------------------------------------------------------------

/// A message the SMTP receiver accepted.
#[derive(Debug, Clone)]
struct Mail {
    from: String,
    to: Vec<String>,
    /// The `AUTH PLAIN` argument (base64 of `\0user\0password`), if the client logged in.
    auth: Option<String>,
    data: String,
}

impl Mail {
    fn subject(&self) -> &str {
        self.data
            .lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .unwrap_or_default()
    }
}

/// A local SMTP server: EHLO/HELO, AUTH PLAIN, MAIL, RCPT, DATA, RSET, NOOP, QUIT; records every
/// message.
struct SmtpReceiver {
    addr: SocketAddr,
    mails: Arc<Mutex<Vec<Mail>>>,
}

impl SmtpReceiver {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mails = Arc::new(Mutex::new(Vec::new()));
        let recorded = mails.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(smtp_session(socket, recorded.clone()));
            }
        });
        Self { addr, mails }
    }

    fn mails(&self) -> Vec<Mail> {
        self.mails.lock().unwrap().clone()
    }
}

async fn smtp_session(socket: tokio::net::TcpStream, mails: Arc<Mutex<Vec<Mail>>>) {
    let (read, mut write) = socket.into_split();
    let mut read = BufReader::new(read);
    let reply = async |w: &mut tokio::net::tcp::OwnedWriteHalf, text: &str| {
        w.write_all(text.as_bytes()).await.is_ok()
    };
    if !reply(&mut write, "220 localhost test SMTP ready\r\n").await {
        return;
    }
    let (mut from, mut to, mut auth) = (String::new(), Vec::new(), None);
    loop {
        let mut line = String::new();
        if read.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let command = line.trim_end().to_owned();
        let upper = command.to_ascii_uppercase();
        let answer = if upper.starts_with("EHLO") {
            "250-localhost\r\n250-8BITMIME\r\n250-AUTH PLAIN\r\n250 SMTPUTF8\r\n".to_owned()
        } else if let Some(credentials) = command.strip_prefix("AUTH PLAIN ") {
            auth = Some(credentials.to_owned());
            "235 2.7.0 Authentication successful\r\n".to_owned()
        } else if upper.starts_with("HELO") || upper == "RSET" || upper == "NOOP" {
            "250 OK\r\n".to_owned()
        } else if let Some(rest) = upper.strip_prefix("MAIL FROM:") {
            from = command[command.len() - rest.len()..]
                .trim_matches(['<', '>', ' '])
                .to_owned();
            to.clear();
            "250 OK\r\n".to_owned()
        } else if let Some(rest) = upper.strip_prefix("RCPT TO:") {
            to.push(
                command[command.len() - rest.len()..]
                    .trim_matches(['<', '>', ' '])
                    .to_owned(),
            );
            "250 OK\r\n".to_owned()
        } else if upper == "DATA" {
            if !reply(&mut write, "354 End data with <CR><LF>.<CR><LF>\r\n").await {
                return;
            }
            let mut data = String::new();
            loop {
                let mut line = String::new();
                if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                if line == ".\r\n" {
                    break;
                }
                data.push_str(line.strip_prefix('.').unwrap_or(&line));
            }
            mails.lock().unwrap().push(Mail {
                from: from.clone(),
                to: to.clone(),
                auth: auth.clone(),
                data,
            });
            "250 OK queued\r\n".to_owned()
        } else if upper == "QUIT" {
            let _ = reply(&mut write, "221 Bye\r\n").await;
            return;
        } else {
            "502 Command not implemented\r\n".to_owned()
        };
        if !reply(&mut write, &answer).await {
            return;
        }
    }
}

/// One request the webhook receiver got.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Hit {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A local webhook receiver: records every POST, answers with `status` after `delay_ms`.
#[derive(Clone)]
struct WebhookReceiver {
    base: String,
    hits: Arc<Mutex<Vec<Hit>>>,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
}

impl WebhookReceiver {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Self {
            base: format!("http://{}", listener.local_addr().unwrap()),
            hits: Arc::default(),
            status: Arc::new(AtomicU16::new(200)),
            delay_ms: Arc::default(),
        };
        let app = Router::new()
            .route("/{*path}", post(webhook))
            .with_state(receiver.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        receiver
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }

    fn hits(&self, path: &str) -> Vec<Hit> {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.path == format!("/{path}"))
            .cloned()
            .collect()
    }
}

async fn webhook(
    State(receiver): State<WebhookReceiver>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    receiver.hits.lock().unwrap().push(Hit {
        path: uri.path().to_owned(),
        headers,
        body,
    });
    let delay = receiver.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    StatusCode::from_u16(receiver.status.load(Ordering::Relaxed)).unwrap()
}

// Manager side ------------------------------------------------------------------------------------

struct Setup {
    db: TestDb,
    app: Router,
    admin: Login,
    oper: Login,
    view: Login,
    sender: Sender,
    options: DispatchOptions,
}

async fn setup() -> Setup {
    let Users {
        db,
        app,
        admin,
        oper,
        view,
    } = users().await;
    let options = DispatchOptions {
        poll: Duration::from_secs(1),
        send_timeout: Duration::from_secs(2),
        digest_settle: Duration::ZERO,
        // Small batches, so a wave is planned over several transactions.
        batch: 300,
    };
    Setup {
        db,
        app,
        admin,
        oper,
        view,
        sender: Sender::new(options.send_timeout).unwrap(),
        options,
    }
}

impl Setup {
    async fn send(&self, who: &Login, method: Method, uri: &str, body: Option<Value>) -> Reply {
        call(&self.app, who.sign(request(method, uri, body.as_ref()))).await
    }

    /// Creates a channel as the admin; returns its id.
    async fn channel(&self, body: Value) -> i64 {
        let reply = self
            .send(
                &self.admin,
                Method::POST,
                "/api/v1/alert-channels",
                Some(body),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
        reply.body["id"].as_i64().unwrap()
    }

    async fn pass(&self) -> Pass {
        dispatch::run_once(&self.db.pool, &self.sender, &self.options)
            .await
            .unwrap()
    }

    /// Inserts detections `(address, rule, service, severity)` the way ingestion would.
    async fn detect(&self, rows: &[(String, &str, &str, &str)]) {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let keys: Vec<String> = rows
            .iter()
            .map(|_| format!("k{}", NEXT.fetch_add(1, Ordering::Relaxed)))
            .collect();
        let addrs: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        let rules: Vec<&str> = rows.iter().map(|r| r.1).collect();
        let services: Vec<&str> = rows.iter().map(|r| r.2).collect();
        let severities: Vec<&str> = rows.iter().map(|r| r.3).collect();
        sqlx::query(
            "INSERT INTO detections (idempotency_key, server_name, attacker_addr, rule, service, \
             severity, evidence, at) \
             SELECT k, 'srv-1', a::inet, r, s, sev, \
                    ARRAY['Failed password for root from ' || a || ' port 22 ssh2'], now() \
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) \
                  WITH ORDINALITY AS t(k, a, r, s, sev, n) ORDER BY n",
        )
        .bind(&keys)
        .bind(&addrs)
        .bind(&rules)
        .bind(&services)
        .bind(&severities)
        .execute(&self.db.pool)
        .await
        .unwrap();
    }

    /// `(kind, status, detection_count, attempts)` of a channel's deliveries, oldest first.
    async fn deliveries(&self, channel: i64) -> Vec<(String, String, i32, i32)> {
        sqlx::query_as(
            "SELECT kind, status, detection_count, attempts FROM alert_deliveries \
             WHERE channel_id = $1 ORDER BY id",
        )
        .bind(channel)
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
    }
}

fn email_channel(name: &str, smtp: &SmtpReceiver, max_per_hour: i64) -> Value {
    json!({
        "name": name, "kind": "email", "min_severity": "low", "max_per_hour": max_per_hour,
        "config": {
            "host": "127.0.0.1", "port": smtp.addr.port(), "tls": "none",
            "from": "Mirage <mirage@example.org>", "to": ["soc@example.org", "oncall@example.org"],
        },
    })
}

fn webhook_channel(name: &str, url: &str, max_per_hour: i64) -> Value {
    json!({
        "name": name, "kind": "webhook", "min_severity": "low", "max_per_hour": max_per_hour,
        "config": { "url": url, "secret": "0123456789abcdef-secret" },
    })
}

const RULES: [(&str, &str); 4] = [
    ("ssh-bruteforce", "ssh"),
    ("ftp-bruteforce", "ftp"),
    ("redis-unauth", "redis"),
    ("mysql-bruteforce", "mysql"),
];

/// `n` detections from `n` distinct addresses in `10.<net>.0.0/16`, over four rules, half
/// `high` and half `medium`.
fn wave(net: u8, n: usize) -> Vec<(String, &'static str, &'static str, &'static str)> {
    (0..n)
        .map(|i| {
            let (rule, service) = RULES[i % 4];
            let severity = if i % 2 == 0 { "high" } else { "medium" };
            (
                format!("10.{net}.{}.{}", i / 250, i % 250 + 1),
                rule,
                service,
                severity,
            )
        })
        .collect()
}

fn sum(map: &Value) -> i64 {
    map.as_object()
        .unwrap()
        .values()
        .map(|v| v.as_i64().unwrap())
        .sum()
}

// Tests -------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_wave_of_1000_detections_yields_a_bounded_digest() {
    let s = setup().await;
    let smtp = SmtpReceiver::start().await;
    let hooks = WebhookReceiver::start().await;
    let max_per_hour = 5;
    let mail = s
        .channel(email_channel("soc mail", &smtp, max_per_hour))
        .await;
    let hook = s
        .channel(webhook_channel("siem", &hooks.url("siem"), max_per_hour))
        .await;
    // The first pass only places the cursor.
    assert_eq!(s.pass().await, Pass::default());

    s.detect(&wave(1, 1000)).await;
    let pass = s.pass().await;
    assert_eq!(pass.detections, 1000);
    // Per channel: max_per_hour - 1 alerts, and the rest in one digest.
    assert_eq!(pass.alerts, 2 * 4);
    assert_eq!(pass.digested, 2 * 996);
    assert_eq!((pass.digests, pass.sent, pass.failed), (2, 10, 0));

    let mails = smtp.mails();
    assert_eq!(
        mails.len(),
        5,
        "1,000 detections must not make 1,000 e-mails"
    );
    assert!(mails.len() as i64 <= max_per_hour + 1);
    assert!(mails.iter().all(|m| m.from == "mirage@example.org"));
    assert!(
        mails
            .iter()
            .all(|m| m.to == ["soc@example.org", "oncall@example.org"])
    );
    let subjects: Vec<&str> = mails.iter().map(Mail::subject).collect();
    assert_eq!(
        subjects
            .iter()
            .filter(|s| s.contains(" from 10.1."))
            .count(),
        4,
        "{subjects:?}"
    );
    assert!(
        subjects[4].starts_with("[Mirage] digest: 996 detections from 996 address(es)"),
        "{subjects:?}"
    );

    let hits = hooks.hits("siem");
    assert_eq!(hits.len(), 5);
    let bodies: Vec<Value> = hits.iter().map(Hit::json).collect();
    let alerts: i64 = bodies
        .iter()
        .filter(|b| b["kind"] == "alert")
        .map(|b| b["alert"]["count"].as_i64().unwrap())
        .sum();
    let digest = &bodies.iter().find(|b| b["kind"] == "digest").unwrap()["digest"];
    assert_eq!(digest["total"], 996);
    assert_eq!(alerts + digest["total"].as_i64().unwrap(), 1000);
    for counts in ["by_rule", "by_service", "by_severity"] {
        assert_eq!(sum(&digest[counts]), 996, "{counts}: {}", digest[counts]);
    }
    assert_eq!(digest["by_rule"]["ssh-bruteforce"], 249);
    assert_eq!(digest["distinct_addresses"], 996);
    assert_eq!(digest["top_addresses"].as_array().unwrap().len(), 10);
    assert_eq!(digest["max_per_hour"], 5);

    // Every detection is counted in exactly one row of each channel.
    for channel in [mail, hook] {
        let rows = s.deliveries(channel).await;
        assert_eq!(rows.len(), 5);
        assert!(rows.iter().all(|r| r.1 == "sent" && r.3 == 1), "{rows:?}");
        assert_eq!(rows.iter().map(|r| i64::from(r.2)).sum::<i64>(), 1000);
        assert_eq!(rows[4].0, "digest");
    }

    // Nothing new: nothing sent.
    let idle = s.pass().await;
    assert_eq!((idle.detections, idle.sent), (0, 0));

    // A second wave within the hour: the budget is spent, so it collects in a new digest...
    s.detect(&wave(2, 200)).await;
    let pass = s.pass().await;
    assert_eq!((pass.alerts, pass.digested, pass.sent), (0, 400, 0));
    assert_eq!(smtp.mails().len(), 5);
    // ...which goes out once the first messages are an hour old.
    sqlx::query("UPDATE alert_deliveries SET queued_at = queued_at - interval '61 minutes'")
        .execute(&s.db.pool)
        .await
        .unwrap();
    let pass = s.pass().await;
    assert_eq!((pass.digests, pass.sent), (2, 2));
    let mails = smtp.mails();
    assert_eq!(mails.len(), 6, "1,200 detections in all: 6 e-mails");
    assert!(mails[5].subject().contains("digest: 200 detections"));
    let second = hooks.hits("siem")[5].json();
    assert_eq!(second["digest"]["total"], 200);
    for channel in [mail, hook] {
        let rows = s.deliveries(channel).await;
        assert_eq!(rows.iter().map(|r| i64::from(r.2)).sum::<i64>(), 1200);
    }
}

#[tokio::test]
async fn severity_filter_and_deduplication() {
    let s = setup().await;
    let hooks = WebhookReceiver::start().await;
    let high = s
        .channel(json!({
            "name": "high only", "kind": "webhook", "min_severity": "high",
            "dedup_window_secs": 600, "max_per_hour": 100,
            "config": { "url": hooks.url("high") },
        }))
        .await;
    let every = s
        .channel(json!({
            "name": "everything", "kind": "webhook", "min_severity": "info",
            "dedup_window_secs": 0, "max_per_hour": 100,
            "config": { "url": hooks.url("every") },
        }))
        .await;
    s.pass().await;
    let a = "198.51.100.7".to_owned();
    let b = "198.51.100.8".to_owned();
    s.detect(&[
        (a.clone(), "ssh-bruteforce", "ssh", "high"),
        (a.clone(), "ssh-bruteforce", "ssh", "critical"),
        (b.clone(), "ssh-bruteforce", "ssh", "medium"),
        (a.clone(), "ftp-bruteforce", "ftp", "high"),
    ])
    .await;
    s.pass().await;
    // `high only`: the medium one is dropped; the two ssh ones from `a` are one alert.
    let hits = hooks.hits("high");
    assert_eq!(hits.len(), 2);
    let first = hits[0].json();
    assert_eq!(first["alert"]["rule"], "ssh-bruteforce");
    assert_eq!(first["alert"]["address"], "198.51.100.7");
    assert_eq!(first["alert"]["count"], 2);
    assert_eq!(first["alert"]["severity"], "critical");
    assert!(
        first["subject"]
            .as_str()
            .unwrap()
            .starts_with("[Mirage] CRITICAL: ssh-bruteforce from 198.51.100.7")
    );
    assert_eq!(hits[1].json()["alert"]["rule"], "ftp-bruteforce");
    // `everything`, without a window: one message per detection.
    assert_eq!(hooks.hits("every").len(), 4);

    // Repeats within the window are counted, not sent.
    s.detect(&vec![(a.clone(), "ssh-bruteforce", "ssh", "high"); 3])
        .await;
    let pass = s.pass().await;
    assert_eq!(pass.suppressed, 3);
    assert_eq!(hooks.hits("high").len(), 2);
    assert_eq!(hooks.hits("every").len(), 7);
    assert_eq!(
        s.deliveries(high).await,
        [
            ("alert".to_owned(), "sent".to_owned(), 2, 1),
            ("alert".to_owned(), "sent".to_owned(), 1, 1),
            ("alert".to_owned(), "suppressed".to_owned(), 3, 0),
        ]
    );
    assert_eq!(s.deliveries(every).await.len(), 7);

    // After the window, the same (rule, address) alerts again.
    sqlx::query("UPDATE alert_deliveries SET created_at = created_at - interval '11 minutes'")
        .execute(&s.db.pool)
        .await
        .unwrap();
    s.detect(&[(a.clone(), "ssh-bruteforce", "ssh", "high")])
        .await;
    s.pass().await;
    let hits = hooks.hits("high");
    assert_eq!(hits.len(), 3);
    assert_eq!(hits[2].json()["alert"]["count"], 1);
    // All 7 eligible detections are counted once for `high only`.
    let counted: i64 = s
        .deliveries(high)
        .await
        .iter()
        .map(|r| i64::from(r.2))
        .sum();
    assert_eq!(counted, 7);
}

#[tokio::test]
async fn webhooks_are_signed_and_slack_gets_its_payload() {
    let s = setup().await;
    let hooks = WebhookReceiver::start().await;
    let secret = "0123456789abcdef-secret";
    s.channel(webhook_channel("siem", &hooks.url("siem"), 10))
        .await;
    s.channel(json!({
        "name": "chat", "kind": "slack", "min_severity": "low",
        "config": { "url": hooks.url("services/T000/B000/XXXX") },
    }))
    .await;
    s.channel(json!({
        "name": "unsigned", "kind": "webhook", "min_severity": "low",
        "config": { "url": hooks.url("plain") },
    }))
    .await;
    s.pass().await;
    s.detect(&[(
        "2001:db8::66".to_owned(),
        "redis-unauth",
        "redis",
        "critical",
    )])
    .await;
    let pass = s.pass().await;
    assert_eq!(pass.sent, 3);

    let hit = &hooks.hits("siem")[0];
    assert_eq!(hit.headers[header::CONTENT_TYPE], "application/json");
    assert!(hit.headers.contains_key("x-mirage-delivery"));
    let signature = hit.headers["x-mirage-signature"].to_str().unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&hit.body);
    let want = format!(
        "sha256={}",
        manager::auth::hex(&mac.finalize().into_bytes())
    );
    assert_eq!(signature, want);
    // A tampered body does not verify.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&[&hit.body[..], b" "].concat());
    assert_ne!(
        format!(
            "sha256={}",
            manager::auth::hex(&mac.finalize().into_bytes())
        ),
        signature
    );
    let body = hit.json();
    assert_eq!(body["kind"], "alert");
    assert_eq!(body["channel"], "siem");
    assert_eq!(body["alert"]["address"], "2001:db8::66");
    assert_eq!(body["alert"]["severity"], "critical");
    assert_eq!(
        body["alert"]["evidence"][0],
        "Failed password for root from 2001:db8::66 port 22 ssh2"
    );
    assert!(body["text"].as_str().unwrap().contains("redis-unauth"));
    assert!(
        !hooks.hits("plain")[0]
            .headers
            .contains_key("x-mirage-signature")
    );

    let slack = hooks.hits("services/T000/B000/XXXX")[0].json();
    let object = slack.as_object().unwrap();
    assert_eq!(object.keys().collect::<Vec<_>>(), ["text"], "{slack}");
    let text = slack["text"].as_str().unwrap();
    assert!(
        text.starts_with("*[Mirage] CRITICAL: redis-unauth from 2001:db8::66 (redis)*\n"),
        "{text}"
    );
}

#[tokio::test]
async fn a_failing_webhook_is_retried_without_blocking_email() {
    let s = setup().await;
    let smtp = SmtpReceiver::start().await;
    let failing = WebhookReceiver::start().await;
    failing.status.store(500, Ordering::Relaxed);
    let stuck = WebhookReceiver::start().await;
    stuck.delay_ms.store(30_000, Ordering::Relaxed);
    let broken = s
        .channel(webhook_channel("broken", &failing.url("hook"), 10))
        .await;
    let slow = s
        .channel(webhook_channel("slow", &stuck.url("hook"), 10))
        .await;
    let mail = s.channel(email_channel("mail", &smtp, 10)).await;
    s.pass().await;
    s.detect(&[("203.0.113.5".to_owned(), "ssh-bruteforce", "ssh", "high")])
        .await;
    let started = Instant::now();
    let pass = s.pass().await;
    // The stuck receiver costs its own channel the 2 s timeout, not the others.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_eq!((pass.sent, pass.failed), (1, 2));
    assert_eq!(smtp.mails().len(), 1);
    assert_eq!(failing.hits("hook").len(), 1);

    let row = |channel: i64| {
        let pool = s.db.pool.clone();
        async move {
            let row: (String, i32, Option<String>, bool) = sqlx::query_as(
                "SELECT status, attempts, last_error, next_attempt_at IS NOT NULL \
                 FROM alert_deliveries WHERE channel_id = $1",
            )
            .bind(channel)
            .fetch_one(&pool)
            .await
            .unwrap();
            row
        }
    };
    let (status, attempts, error, retry) = row(broken).await;
    assert_eq!((status.as_str(), attempts, retry), ("failed", 1, true));
    assert!(error.unwrap().contains("HTTP 500"));
    let (status, _, error, retry) = row(slow).await;
    assert_eq!((status.as_str(), retry), ("failed", true));
    let error = error.unwrap();
    assert!(
        error.contains("timed out") || error.contains("no answer"),
        "{error}"
    );
    assert_eq!(row(mail).await.0, "sent");

    // Not due yet: no new attempt.
    let pass = s.pass().await;
    assert_eq!((pass.sent, pass.failed), (0, 0));
    assert_eq!(failing.hits("hook").len(), 1);

    // Due again, and the receiver recovered: sent on the second attempt.
    failing.status.store(200, Ordering::Relaxed);
    stuck.delay_ms.store(0, Ordering::Relaxed);
    sqlx::query("UPDATE alert_deliveries SET next_attempt_at = now() WHERE channel_id = $1")
        .bind(broken)
        .execute(&s.db.pool)
        .await
        .unwrap();
    let pass = s.pass().await;
    assert_eq!((pass.sent, pass.failed), (1, 0));
    let (status, attempts, error, retry) = row(broken).await;
    assert_eq!(
        (status.as_str(), attempts, error, retry),
        ("sent", 2, None, false)
    );
    assert_eq!(failing.hits("hook").len(), 2);
    // The e-mail went once.
    assert_eq!(smtp.mails().len(), 1);

    // The last attempt fails: given up, but still on record with its count.
    stuck.status.store(503, Ordering::Relaxed);
    sqlx::query(
        "UPDATE alert_deliveries SET next_attempt_at = now(), attempts = $2 - 1 \
         WHERE channel_id = $1",
    )
    .bind(slow)
    .bind(dispatch::MAX_ATTEMPTS)
    .execute(&s.db.pool)
    .await
    .unwrap();
    let pass = s.pass().await;
    assert_eq!(pass.failed, 1);
    let (status, attempts, error, retry) = row(slow).await;
    assert_eq!(
        (status.as_str(), attempts, retry),
        ("failed", dispatch::MAX_ATTEMPTS, false)
    );
    assert!(error.unwrap().contains("HTTP 503"));
    assert_eq!(s.deliveries(slow).await[0].2, 1);
}

#[tokio::test]
async fn channel_api_checks_roles_redacts_secrets_and_validates() {
    let s = setup().await;
    let smtp = SmtpReceiver::start().await;
    let uri = "/api/v1/alert-channels";
    let body = json!({
        "name": "mail", "kind": "email", "min_severity": "high",
        "config": {
            "host": "localhost", "port": smtp.addr.port(), "tls": "none",
            "username": "mirage", "password": "hunter2-hunter2",
            "from": "mirage@example.org", "to": ["soc@example.org"],
        },
    });
    for who in [&s.view, &s.oper] {
        let denied = s.send(who, Method::POST, uri, Some(body.clone())).await;
        assert_eq!(denied.status, StatusCode::FORBIDDEN);
    }
    let created = s
        .send(&s.admin, Method::POST, uri, Some(body.clone()))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["id"].as_i64().unwrap();
    assert_eq!(created.body["config"]["password"], "********");
    assert_eq!(created.body["dedup_window_secs"], 600);
    assert_eq!(created.body["max_per_hour"], 12);
    assert_eq!(created.body["enabled"], true);
    let hook = s
        .channel(json!({
            "name": "siem", "kind": "webhook",
            "config": { "url": "https://siem.example/hook", "secret": "0123456789abcdef" },
        }))
        .await;
    s.channel(json!({
        "name": "chat", "kind": "slack",
        "config": { "url": "https://hooks.slack.com/services/T0/B0/secretpath" },
    }))
    .await;

    // Viewers see every channel, never a secret.
    let list = s.send(&s.view, Method::GET, uri, None).await;
    assert_eq!(list.status, StatusCode::OK);
    let text = list.body.to_string();
    for secret in ["hunter2", "0123456789abcdef", "secretpath"] {
        assert!(!text.contains(secret), "{text}");
    }
    let by_name = |name: &str| {
        list.body
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(by_name("siem")["config"]["secret"], "********");
    assert_eq!(
        by_name("siem")["config"]["url"],
        "https://siem.example/hook"
    );
    assert_eq!(
        by_name("chat")["config"]["url"],
        "https://hooks.slack.com/********"
    );
    let mail = by_name("mail");
    assert_eq!(mail["config"]["username"], "mirage");
    // Stored as given: it must be replayed to the SMTP server (see docs/alerts.md).
    let stored: Value = sqlx::query_scalar("SELECT config FROM alert_channels WHERE id = $1")
        .bind(id)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(stored["password"], "hunter2-hunter2");

    // PATCH: the redacted configuration sent back keeps the secret.
    let item = format!("{uri}/{id}");
    let mut config = mail["config"].clone();
    config["to"] = json!(["soc@example.org", "cto@example.org"]);
    for who in [&s.view, &s.oper] {
        let denied = s
            .send(who, Method::PATCH, &item, Some(json!({ "enabled": false })))
            .await;
        assert_eq!(denied.status, StatusCode::FORBIDDEN);
    }
    let patched = s
        .send(
            &s.admin,
            Method::PATCH,
            &item,
            Some(json!({ "config": config, "max_per_hour": 30 })),
        )
        .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.body);
    assert_eq!(patched.body["config"]["password"], "********");
    assert_eq!(patched.body["max_per_hour"], 30);
    let stored: Value = sqlx::query_scalar("SELECT config FROM alert_channels WHERE id = $1")
        .bind(id)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(stored["password"], "hunter2-hunter2");
    assert_eq!(stored["to"], json!(["soc@example.org", "cto@example.org"]));
    let slack_id = by_name("chat")["id"].as_i64().unwrap();
    let kept = s
        .send(
            &s.admin,
            Method::PATCH,
            &format!("{uri}/{slack_id}"),
            Some(json!({ "config": by_name("chat")["config"], "name": "chat-ops" })),
        )
        .await;
    assert_eq!(kept.status, StatusCode::OK, "{}", kept.body);
    let stored: Value = sqlx::query_scalar("SELECT config FROM alert_channels WHERE id = $1")
        .bind(slack_id)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(
        stored["url"],
        "https://hooks.slack.com/services/T0/B0/secretpath"
    );

    // Validation names the field.
    for (body, needle) in [
        (
            json!({ "name": "x", "kind": "pager", "config": {} }),
            "`kind`",
        ),
        (
            json!({ "name": "x", "kind": "webhook", "config": { "url": "ftp://h/" } }),
            "`config.url`: `ftp` URLs are not allowed",
        ),
        (
            json!({ "name": "x", "kind": "slack", "config": { "url": "javascript:alert(1)" } }),
            "`config.url`",
        ),
        (
            json!({ "name": "x", "kind": "email", "config": {
                "host": "smtp.example.org", "port": 0, "tls": "tls",
                "from": "a@example.org", "to": ["b@example.org"] } }),
            "`config.port`",
        ),
        (
            json!({ "name": "x", "kind": "email", "config": {
                "host": "smtp.example.org", "port": 25, "tls": "none", "username": "u",
                "password": "p", "from": "a@example.org", "to": ["b@example.org"] } }),
            "`config.tls`",
        ),
        (
            json!({ "name": "x", "kind": "email", "config": {
                "host": "smtp.example.org", "port": 587, "tls": "starttls",
                "from": "a@example.org", "to": [] } }),
            "`config.to`",
        ),
        (
            json!({ "name": "x", "kind": "webhook", "config": { "url": "https://h/" },
                    "min_severity": "urgent" }),
            "`min_severity`",
        ),
        (
            json!({ "name": "x", "kind": "webhook", "config": { "url": "https://h/" },
                    "max_per_hour": 0 }),
            "`max_per_hour`",
        ),
        (
            json!({ "name": "x", "kind": "webhook", "config": { "url": "https://h/" },
                    "dedup_window_secs": -1 }),
            "`dedup_window_secs`",
        ),
        (
            json!({ "name": "", "kind": "webhook", "config": { "url": "https://h/" } }),
            "`name`",
        ),
        (
            json!({ "name": "x", "kind": "webhook", "config": { "url": "https://h/" },
                    "colour": "red" }),
            "unknown field",
        ),
    ] {
        let reply = s
            .send(&s.admin, Method::POST, uri, Some(body.clone()))
            .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        let message = reply.body["error"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: {message}");
    }
    let dup = s.send(&s.admin, Method::POST, uri, Some(body)).await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    let kind = s
        .send(
            &s.admin,
            Method::PATCH,
            &item,
            Some(json!({ "kind": "webhook" })),
        )
        .await;
    assert_eq!(kind.status, StatusCode::BAD_REQUEST);
    let placeholder = s
        .send(
            &s.admin,
            Method::PATCH,
            &format!("{uri}/{hook}"),
            Some(json!({ "config": { "url": "https://other.example/", "secret": "********" } })),
        )
        .await;
    assert_eq!(placeholder.status, StatusCode::OK, "{}", placeholder.body);
    let missing = s
        .send(
            &s.admin,
            Method::PATCH,
            &format!("{uri}/999"),
            Some(json!({ "enabled": false })),
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);

    // Test messages: one that arrives, one that cannot.
    let test = format!("{item}/test");
    assert_eq!(
        s.send(&s.view, Method::POST, &test, None).await.status,
        StatusCode::FORBIDDEN
    );
    let sent = s.send(&s.admin, Method::POST, &test, None).await;
    assert_eq!(sent.status, StatusCode::OK, "{}", sent.body);
    assert_eq!(sent.body["status"], "sent", "{}", sent.body);
    assert_eq!(sent.body["kind"], "test");
    assert_eq!(sent.body["attempts"], 1);
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].subject(), "[Mirage] test message for channel mail");
    assert_eq!(mails[0].to, ["soc@example.org", "cto@example.org"]);
    // The stored password was replayed (base64 of "\0mirage\0hunter2-hunter2").
    assert_eq!(
        mails[0].auth.as_deref(),
        Some("AG1pcmFnZQBodW50ZXIyLWh1bnRlcjI=")
    );
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let dead = s
        .channel(json!({ "name": "dead", "kind": "webhook", "config": { "url": dead_url } }))
        .await;
    let failed = s
        .send(&s.admin, Method::POST, &format!("{uri}/{dead}/test"), None)
        .await;
    assert_eq!(failed.status, StatusCode::OK, "{}", failed.body);
    assert_eq!(failed.body["status"], "failed");
    assert!(
        failed.body["last_error"]
            .as_str()
            .unwrap()
            .contains("POST to 127.0.0.1 failed")
    );
    assert_eq!(failed.body["next_attempt_at"], Value::Null);

    // The delivery log, for viewers, by channel, in pages.
    let log = s
        .send(&s.view, Method::GET, "/api/v1/alert-deliveries", None)
        .await;
    assert_eq!(log.status, StatusCode::OK);
    assert_eq!(log.body.as_array().unwrap().len(), 2);
    assert_eq!(log.body[0]["channel"], "dead");
    assert_eq!(
        log.body[1]["subject"],
        "[Mirage] test message for channel mail"
    );
    let one = s
        .send(
            &s.view,
            Method::GET,
            &format!("/api/v1/alert-deliveries?channel_id={id}"),
            None,
        )
        .await;
    assert_eq!(one.body.as_array().unwrap().len(), 1);
    let newest = log.body[0]["id"].as_i64().unwrap();
    let page = s
        .send(
            &s.view,
            Method::GET,
            &format!("/api/v1/alert-deliveries?limit=1&before={newest}"),
            None,
        )
        .await;
    assert_eq!(page.body.as_array().unwrap().len(), 1);
    assert_eq!(page.body[0]["channel"], "mail");

    // Delete.
    assert_eq!(
        s.send(&s.view, Method::DELETE, &item, None).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        s.send(&s.admin, Method::DELETE, &item, None).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.send(&s.admin, Method::DELETE, &item, None).await.status,
        StatusCode::NOT_FOUND
    );
    let actions: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE action LIKE 'alert_channel.%' ORDER BY id",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(
        actions,
        [
            "alert_channel.create",
            "alert_channel.create",
            "alert_channel.create",
            "alert_channel.update",
            "alert_channel.update",
            "alert_channel.update",
            "alert_channel.test",
            "alert_channel.create",
            "alert_channel.test",
            "alert_channel.delete",
        ]
    );
    let audit_text: String =
        sqlx::query_scalar("SELECT string_agg(details::text, ' ') FROM audit_log")
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert!(!audit_text.contains("hunter2"), "{audit_text}");
}

#[tokio::test]
async fn one_dispatcher_runs_woken_by_notify_and_history_is_not_alerted() {
    let s = setup().await;
    let hooks = WebhookReceiver::start().await;
    s.channel(webhook_channel("siem", &hooks.url("siem"), 100))
        .await;
    // History from before the first dispatcher start.
    s.detect(&wave(3, 50)).await;
    // Two replicas' dispatchers; a poll so slow that only NOTIFY can wake them in time.
    let options = DispatchOptions {
        poll: Duration::from_secs(60),
        ..s.options.clone()
    };
    let first = tokio::spawn(dispatch::run(s.db.pool.clone(), options.clone()));
    let second = tokio::spawn(dispatch::run(s.db.pool.clone(), options));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cursor: Option<Value> =
            sqlx::query_scalar("SELECT value FROM settings WHERE key = 'alerts_cursor'")
                .fetch_optional(&s.db.pool)
                .await
                .unwrap();
        if let Some(cursor) = cursor {
            let newest: i64 = sqlx::query_scalar("SELECT max(id) FROM detections")
                .fetch_one(&s.db.pool)
                .await
                .unwrap();
            assert_eq!(cursor["detection_id"], newest);
            break;
        }
        assert!(Instant::now() < deadline, "no dispatcher started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Exactly one of them holds the lock.
    let mut probe = sqlx::PgConnection::connect(&s.db.url).await.unwrap();
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(dispatch::LOCK_KEY)
        .fetch_one(&mut probe)
        .await
        .unwrap();
    assert!(!free, "no dispatcher holds the lock");

    s.detect(&[("192.0.2.99".to_owned(), "ssh-bruteforce", "ssh", "high")])
        .await;
    sqlx::query("SELECT pg_notify('mirage_detection', (SELECT max(id) FROM detections)::text)")
        .execute(&s.db.pool)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while hooks.hits("siem").is_empty() {
        assert!(
            Instant::now() < deadline,
            "NOTIFY did not wake the dispatcher"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let hits = hooks.hits("siem");
    assert_eq!(hits.len(), 1, "history alerted or a message sent twice");
    assert_eq!(hits[0].json()["alert"]["address"], "192.0.2.99");
    first.abort();
    second.abort();
}

#[tokio::test]
async fn verdicts_posted_by_a_server_are_alerted_at_once() {
    let s = setup().await;
    let hooks = WebhookReceiver::start().await;
    s.channel(webhook_channel("siem", &hooks.url("siem"), 100))
        .await;
    let created = s
        .send(
            &s.admin,
            Method::POST,
            "/api/v1/service-credentials",
            Some(json!({ "name": "srv-1" })),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let credential = created.body["credential"].as_str().unwrap().to_owned();
    let options = DispatchOptions {
        poll: Duration::from_secs(60),
        ..s.options.clone()
    };
    let dispatcher = tokio::spawn(dispatch::run(s.db.pool.clone(), options));
    let deadline = Instant::now() + Duration::from_secs(10);
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM settings WHERE key = 'alerts_cursor'")
        .fetch_one(&s.db.pool)
        .await
        .unwrap()
        == 0
    {
        assert!(Instant::now() < deadline, "the dispatcher did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let verdict = |id: &str, addr: &str| {
        json!({
            "id": id, "addr": addr, "rule": "sshd-bruteforce", "service": "sshd",
            "severity": "high", "count": 5,
            "evidence": [format!("sshd[1]: Failed password for root from {addr} port 4711 ssh2")],
            "at": "2024-05-01T10:00:00Z",
        })
    };
    let body = json!({ "verdicts": [
        verdict("v1", "198.51.100.20"),
        verdict("v2", "198.51.100.20"),
        verdict("v3", "198.51.100.21"),
    ] });
    let req = bearer(
        request(Method::POST, "/api/v1/verdicts", Some(&body)),
        &credential,
    );
    let reply = call(&s.app, req).await;
    assert!(
        reply.status.is_success(),
        "{}: {}",
        reply.status,
        reply.body
    );
    // Ingestion's NOTIFY wakes the dispatcher long before its 60 s poll.
    let deadline = Instant::now() + Duration::from_secs(10);
    while hooks.hits("siem").len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no alert within 10 s of the verdicts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut alerts: Vec<Value> = hooks
        .hits("siem")
        .iter()
        .map(|h| h.json()["alert"].clone())
        .collect();
    alerts.sort_by_key(|a| a["address"].as_str().unwrap().to_owned());
    assert_eq!(alerts.len(), 2);
    assert_eq!(alerts[0]["address"], "198.51.100.20");
    assert_eq!(alerts[0]["count"], 2);
    assert_eq!(alerts[0]["server"], "srv-1");
    assert_eq!(alerts[1]["address"], "198.51.100.21");
    dispatcher.abort();
}
