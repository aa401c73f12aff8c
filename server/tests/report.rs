//! The verdict reporter against a real manager (served in this process on a loopback port, over
//! a fresh database on the embedded PostgreSQL of `manager::test_util`): delivery, the queue
//! across restarts while the manager is away, de-duplication, refused verdicts, allowlists.
//!
//! A layer in front of the manager's router records the ids of every verdict request it
//! receives, so "sent once" is checked on the wire, not only in the database (which stores a
//! repeat once anyway).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{body::Body, extract::Request, middleware::Next};
use ipnet::IpNet;
use manager::{
    app,
    auth::{new_token, token_hash},
    db,
    test_util::TestDb,
};
use serde_json::Value;
use server::{
    config::{ManagerConfig, QueueConfig},
    report::{REJECTED_FILE, ReportError, Reporter},
    verdict::Verdict,
};
use spool::SpoolError;
use tokio::{net::TcpListener, task::JoinHandle};

/// The verdict ids of each `POST /api/v1/verdicts` the manager received, with its status.
type Seen = Arc<Mutex<Vec<(u16, Vec<String>)>>>;

/// A manager serving `db` on `listener` until dropped.
struct Manager {
    url: String,
    seen: Seen,
    task: JoinHandle<()>,
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Manager {
    async fn start(db: &TestDb, listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let record = seen.clone();
        let router = app(db.state()).layer(axum::middleware::from_fn(
            move |req: Request, next: Next| {
                let record = record.clone();
                async move {
                    if req.uri().path() != "/api/v1/verdicts" {
                        return next.run(req).await;
                    }
                    let (parts, body) = req.into_parts();
                    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
                    let ids: Vec<String> = serde_json::from_slice::<Value>(&bytes)
                        .ok()
                        .and_then(|v| v["verdicts"].as_array().cloned())
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|v| v["id"].as_str().map(str::to_owned))
                        .collect();
                    let resp = next
                        .run(Request::from_parts(parts, Body::from(bytes)))
                        .await;
                    record.lock().unwrap().push((resp.status().as_u16(), ids));
                    resp
                }
            },
        ));
        let task = tokio::spawn(async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .unwrap();
        });
        Self {
            url: format!("http://{addr}"),
            seen,
            task,
        }
    }

    /// How many times each id was sent (in any request) and stored (in a 2xx request).
    fn counts(&self) -> (HashMap<String, usize>, HashMap<String, usize>) {
        let (mut sent, mut stored) = (HashMap::new(), HashMap::new());
        for (status, ids) in self.seen.lock().unwrap().iter() {
            for id in ids {
                *sent.entry(id.clone()).or_default() += 1;
                if (200..300).contains(status) {
                    *stored.entry(id.clone()).or_default() += 1;
                }
            }
        }
        (sent, stored)
    }
}

/// A database with a service credential, written to a 0600 file, and a queue directory.
struct Setup {
    db: TestDb,
    dir: tempfile::TempDir,
    credential_file: PathBuf,
}

async fn setup() -> Setup {
    let db = TestDb::new().await;
    let credential = new_token();
    db::service_credentials::insert(&db.pool, "sensor-1", &token_hash(&credential), None)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let credential_file = dir.path().join("credential");
    std::fs::write(&credential_file, format!("{credential}\n")).unwrap();
    std::fs::set_permissions(&credential_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    Setup {
        db,
        dir,
        credential_file,
    }
}

impl Setup {
    fn queue_dir(&self) -> PathBuf {
        self.dir.path().join("queue")
    }

    fn reporter(&self, url: &str) -> Result<Reporter, ReportError> {
        self.reporter_with(url, &self.credential_file)
    }

    fn reporter_with(&self, url: &str, credential_file: &Path) -> Result<Reporter, ReportError> {
        let manager = ManagerConfig {
            url: url.to_owned(),
            credential_file: credential_file.to_owned(),
            ca: None,
            batch_max: 500,
            allowlist_refresh_secs: 60,
        };
        let queue = QueueConfig {
            dir: self.queue_dir(),
            max_bytes: 16 * 1024 * 1024,
        };
        Reporter::start(&manager, &queue)
    }

    async fn keys(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT idempotency_key FROM detections ORDER BY idempotency_key")
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }

    /// Waits until the manager holds `n` detections and the reporter's queue is empty.
    async fn until_stored(&self, reporter: &Reporter, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let keys = self.keys().await;
            if keys.len() == n && reporter.queued() == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after 60 s: {} stored ({keys:?}), {} queued",
                keys.len(),
                reporter.queued()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn verdict(id: &str, addr: &str) -> Verdict {
    Verdict {
        id: id.to_owned(),
        addr: addr.to_owned(),
        rule: "sshd-bruteforce".to_owned(),
        service: "sshd".to_owned(),
        severity: "high".to_owned(),
        action: "default".to_owned(),
        count: 5,
        evidence: vec![format!(
            "sshd[1]: Failed password for root from {addr} port 4711 ssh2"
        )],
        at: "2024-05-01T10:00:00Z".to_owned(),
    }
}

fn ids(n: std::ops::RangeInclusive<usize>) -> Vec<String> {
    n.map(|i| format!("k{i}")).collect()
}

/// A loopback port nothing listens on (bound, then released).
async fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test]
async fn verdicts_reach_a_running_manager_and_repeats_are_sent_once() {
    let s = setup().await;
    let manager = Manager::start(&s.db, TcpListener::bind("127.0.0.1:0").await.unwrap()).await;
    let reporter = s.reporter(&manager.url).unwrap();
    reporter
        .submit(vec![
            verdict("k1", "203.0.113.1"),
            verdict("k2", "203.0.113.2"),
            verdict("k2", "203.0.113.2"),
            verdict("k3", "2001:db8:1:2::/64"),
        ])
        .await
        .unwrap();
    // A repeat of a submitted verdict, and one new one.
    reporter
        .submit(vec![
            verdict("k3", "2001:db8:1:2::/64"),
            verdict("k4", "203.0.113.4"),
        ])
        .await
        .unwrap();
    s.until_stored(&reporter, 4).await;
    assert_eq!(s.keys().await, ids(1..=4));
    // Even after a while, each id went over the wire once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    reporter
        .submit(vec![verdict("k1", "203.0.113.1")])
        .await
        .unwrap();
    assert_eq!(reporter.queued(), 0);
    let (sent, stored) = manager.counts();
    assert_eq!(sent, stored);
    assert!(sent.values().all(|&n| n == 1), "{sent:?}");
    assert_eq!(sent.len(), 4);
    let net: String = sqlx::query_scalar("SELECT net::text FROM attackers WHERE masklen(net) = 64")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(net, "2001:db8:1:2::/64");
    reporter.shutdown().await;
    assert!(!s.queue_dir().join(REJECTED_FILE).exists());
}

#[tokio::test]
async fn verdicts_queued_while_the_manager_is_away_arrive_once_after_restarts() {
    let s = setup().await;
    let addr = free_port().await;
    let url = format!("http://{addr}");

    let first = s.reporter(&url).unwrap();
    first
        .submit(
            (1..=5)
                .map(|i| verdict(&format!("k{i}"), &format!("203.0.113.{i}")))
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(first.queued(), 5);
    // One process per queue.
    match s.reporter(&url) {
        Err(ReportError::Queue(SpoolError::Locked { .. })) => {}
        other => panic!("{other:?}"),
    }
    // Let it fail against the closed port a few times.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(first.queued(), 5);
    first.shutdown().await;

    // A restart: the queue is still there; a repeat of k1 (the new process has not seen it)
    // and two new verdicts join it.
    let second = s.reporter(&url).unwrap();
    assert_eq!(second.queued(), 5);
    second
        .submit(vec![
            verdict("k1", "203.0.113.1"),
            verdict("k6", "203.0.113.6"),
            verdict("k7", "2001:db8::7"),
        ])
        .await
        .unwrap();
    assert_eq!(second.queued(), 8);
    drop(second);
    // Dropping the last handle stops the sender too (and releases the queue).
    let deadline = Instant::now() + Duration::from_secs(10);
    let third = loop {
        match s.reporter(&url) {
            Ok(r) => break r,
            Err(ReportError::Queue(SpoolError::Locked { .. })) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => panic!("{err}"),
        }
    };
    assert_eq!(third.queued(), 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(s.keys().await.is_empty());

    // The manager comes up on that port: everything arrives, each id once.
    let manager = Manager::start(&s.db, TcpListener::bind(addr).await.unwrap()).await;
    s.until_stored(&third, 7).await;
    assert_eq!(s.keys().await, ids(1..=7));
    let (sent, stored) = manager.counts();
    assert_eq!(sent, stored);
    assert_eq!(sent.len(), 7);
    assert!(sent.values().all(|&n| n == 1), "{sent:?}");
    third.shutdown().await;
}

#[tokio::test]
async fn a_refused_verdict_is_set_aside_and_the_rest_are_stored() {
    let s = setup().await;
    let manager = Manager::start(&s.db, TcpListener::bind("127.0.0.1:0").await.unwrap()).await;
    let reporter = s.reporter(&manager.url).unwrap();
    let too_broad = verdict("k6", "2001:db8::/40");
    reporter
        .submit(vec![
            verdict("k1", "203.0.113.1"),
            verdict("k2", "203.0.113.2"),
            verdict("k3", "127.0.0.1"),
            verdict("k4", "203.0.113.4"),
            verdict("k5", "203.0.113.5"),
            too_broad,
            verdict("k7", "203.0.113.7"),
        ])
        .await
        .unwrap();
    s.until_stored(&reporter, 5).await;
    assert_eq!(s.keys().await, ["k1", "k2", "k4", "k5", "k7"]);
    let text = std::fs::read_to_string(s.queue_dir().join(REJECTED_FILE)).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["verdict"]["id"], "k3");
    assert_eq!(lines[0]["status"], 400);
    let error = lines[0]["error"].as_str().unwrap();
    assert!(error.contains("loopback"), "{error}");
    assert_eq!(lines[1]["verdict"]["id"], "k6");
    assert!(
        lines[1]["error"].as_str().unwrap().contains("/48"),
        "{}",
        lines[1]
    );
    // Whole verdicts are kept, to be replayed by hand once the cause is fixed.
    assert_eq!(lines[1]["verdict"]["addr"], "2001:db8::/40");
    assert!(lines[0]["at"].as_str().is_some());
    // Every stored verdict was stored once.
    let (_, stored) = manager.counts();
    assert!(stored.values().all(|&n| n == 1), "{stored:?}");
    assert_eq!(stored.len(), 5);
    reporter.shutdown().await;
}

#[tokio::test]
async fn allowlists_are_fetched_and_a_wrong_credential_keeps_verdicts_queued() {
    let s = setup().await;
    sqlx::query(
        "UPDATE policies SET allowlist = '{10.0.0.0/8, 2001:db8:ffff::/48, 192.0.2.7/32}' \
         WHERE group_id = (SELECT id FROM agent_groups WHERE name = 'default')",
    )
    .execute(&s.db.pool)
    .await
    .unwrap();
    let manager = Manager::start(&s.db, TcpListener::bind("127.0.0.1:0").await.unwrap()).await;
    let reporter = s.reporter(&manager.url).unwrap();
    let nets = reporter.fetch_allowlists().await.unwrap();
    let want: Vec<IpNet> = ["10.0.0.0/8", "192.0.2.7/32", "2001:db8:ffff::/48"]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(nets, want);
    reporter.shutdown().await;

    let wrong = s.dir.path().join("wrong");
    std::fs::write(&wrong, new_token()).unwrap();
    let reporter = s.reporter_with(&manager.url, &wrong).unwrap();
    match reporter.fetch_allowlists().await {
        Err(ReportError::Status { status: 401, .. }) => {}
        other => panic!("{other:?}"),
    }
    reporter
        .submit(vec![verdict("k1", "203.0.113.1")])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(reporter.queued(), 1);
    assert!(s.keys().await.is_empty());
    assert!(!s.queue_dir().join(REJECTED_FILE).exists());
    let (sent, stored) = manager.counts();
    assert!(sent.contains_key("k1") && stored.is_empty(), "{sent:?}");
    reporter.shutdown().await;
}

#[tokio::test]
async fn plain_http_to_a_remote_manager_is_refused() {
    let s = setup().await;
    match s.reporter("http://manager.example:8443") {
        Err(err @ ReportError::Url { .. }) => {
            assert!(err.to_string().contains("loopback"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    let empty = s.dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    assert!(matches!(
        s.reporter_with("https://manager.example", &empty),
        Err(ReportError::CredentialEmpty { .. })
    ));
}
