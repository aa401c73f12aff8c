//! `bench-manager`: the manager's policy delivery and verdict ingestion, over real HTTP on
//! loopback against a real manager (in this process) and its embedded PostgreSQL (a private,
//! durable cluster in a temporary directory, exactly what `mirage-manager serve` starts).
//!
//! Cases (one JSON line each on stdout, progress on stderr):
//! - `delta-fanout/1000`: 1,000 agents hold a policy stream each; an operator blocks one address
//!   through the API; the delay from sending that request until each stream has the delta
//!   (`p50_ms`, `p99_ms`, and `last_ms`: until the last of the 1,000 has it), over several rounds.
//!   The baseline, run in the same process right after, is the original's design: the same
//!   1,000 agents polling every 10 s (`POST /api/v1/agent/policy`, phases spread over the
//!   interval).
//! - `snapshot/1000000`: one agent opens a stream while 1,000,000 attacker entries are live; the
//!   time until the whole snapshot event is received and parsed, and its size.
//! - `ingest/batch-1000`: verdicts per second through `POST /api/v1/verdicts` in batches of
//!   1,000 distinct addresses (each a new detection, attacker entry and policy revision), on top
//!   of the snapshot case's million entries, and the median time per batch.
//!
//! The client runs in the same process and on the same two cores as the manager and PostgreSQL,
//! so every figure includes the client's own cost. Everything listens on 127.0.0.1 only; the
//! cluster and its directory are removed on exit.
#![allow(
    clippy::print_stdout,
    reason = "benchmark results go to stdout by contract"
)]

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::{StreamExt as _, stream};
use manager::{AppState, ManagerConfig, app, db::Database, test_util};
use rand::Rng as _;
use serde_json::{Value, json};
use tests::{
    bench::{Record, attacker_addr, median, note},
    operator::Operator,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
};

const BENCH: &str = "manager";
/// Agents holding a stream in the fan-out case.
const AGENTS: usize = 1000;
/// Deltas measured in the fan-out case (each reaches every stream).
const ROUNDS: usize = 5;
/// The original's poll interval.
const POLL_INTERVAL: Duration = Duration::from_secs(10);
/// Entries in the snapshot case.
const SNAPSHOT_ENTRIES: i64 = 1_000_000;
/// Verdicts per ingestion batch, and batches.
const BATCH: usize = 1000;
const BATCHES: usize = 50;
/// Concurrent requests while setting up.
const SETUP_CONCURRENCY: usize = 32;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    raise_nofile(16_384)?;
    let dir = test_util::temp_dir();
    let config = ManagerConfig {
        data_dir: dir.path().to_owned(),
        cookie_secure: false,
        ..ManagerConfig::default()
    };
    note("bench-manager: starting the embedded PostgreSQL cluster");
    let database = Database::open(&config)
        .await
        .context("opening the database")?;
    let result = run(&config, &database).await;
    database.close().await;
    result
}

/// 1,000 streams need more than the default 1,024 descriptors (each is a client and a server
/// socket in this process).
fn raise_nofile(want: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if lim.rlim_cur < want {
            lim.rlim_cur = want.max(lim.rlim_cur);
            lim.rlim_max = lim.rlim_max.max(lim.rlim_cur);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                bail!(
                    "raising RLIMIT_NOFILE to {want}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
    Ok(())
}

/// The manager under test, served on loopback until dropped.
struct Server {
    base: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(config: &ManagerConfig, database: &Database) -> Result<Self> {
        let state = AppState::new(database.pool.clone(), config.clone());
        let bus = state.bus.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(
                listener,
                app(state).into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
                bus.close();
            })
            .await;
            if let Err(err) = served {
                note(format!("bench-manager: server error: {err}"));
            }
        });
        Ok(Self {
            base: format!("http://{addr}"),
            stop: Some(stop),
            task,
        })
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

/// One server-sent event.
struct SseEvent {
    event: String,
    id: Option<i64>,
    data: String,
}

/// Splits a byte stream into events.
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let mut ev = SseEvent {
                event: String::new(),
                id: None,
                data: String::new(),
            };
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    v.trim().clone_into(&mut ev.event);
                } else if let Some(v) = line.strip_prefix("id:") {
                    ev.id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("data:") {
                    ev.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            if !ev.event.is_empty() {
                out.push(ev);
            }
        }
        out
    }
}

/// What a stream reports.
enum StreamNote {
    /// Its snapshot arrived.
    Ready,
    /// A delta with this revision arrived at this instant.
    Delta(i64, Instant),
}

/// Holds one agent's stream, reporting its snapshot and every delta.
async fn hold_stream(
    http: reqwest::Client,
    base: String,
    credential: String,
    notes: mpsc::UnboundedSender<StreamNote>,
) -> Result<()> {
    let resp = http
        .get(format!("{base}/api/v1/agent/stream"))
        .bearer_auth(&credential)
        .send()
        .await?;
    ensure!(resp.status().is_success(), "stream: {}", resp.status());
    let mut body = resp.bytes_stream();
    let mut parser = SseParser::default();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        let now = Instant::now();
        for ev in parser.push(&chunk) {
            let note = match ev.event.as_str() {
                "snapshot" => StreamNote::Ready,
                "delta" => StreamNote::Delta(ev.id.unwrap_or(-1), now),
                _ => continue,
            };
            if notes.send(note).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The `p`-th percentile (0..=100) of sorted `v`, nearest rank.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn run(config: &ManagerConfig, database: &Database) -> Result<()> {
    let server = Server::start(config, database).await?;
    let result = cases(&server.base, &database.pool).await;
    server.shutdown().await;
    result
}

async fn cases(base: &str, pool: &sqlx::PgPool) -> Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(AGENTS + 16)
        .build()?;
    let op = Arc::new(Operator::login(&http, base, pool).await?);

    note(format!("bench-manager: enrolling {AGENTS} agents"));
    let credentials: Vec<String> = stream::iter(0..AGENTS)
        .map(|n| {
            let op = Arc::clone(&op);
            async move { op.enroll(&format!("bench-{n}")).await }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;

    let stream_delays = fanout_streams(&http, base, &op, &credentials).await?;
    let poll_delays = fanout_poll(&http, base, &op, &credentials).await?;
    for (metric, p) in [("p50_ms", 50.0), ("p99_ms", 99.0)] {
        let value = percentile(&stream_delays.all, p);
        let baseline = percentile(&poll_delays.all, p);
        emit(&Record::cost(
            BENCH,
            format!("delta-fanout/{AGENTS}"),
            metric,
            value,
            "poll-10s",
            baseline,
        ))?;
    }
    emit(&Record::cost(
        BENCH,
        format!("delta-fanout/{AGENTS}"),
        "last_ms",
        median(&stream_delays.last),
        "poll-10s",
        median(&poll_delays.last),
    ))?;

    snapshot(&http, base, &op, pool).await?;
    ingest(&http, base, &op).await?;
    Ok(())
}

fn emit(record: &Record) -> Result<()> {
    println!("{}", record.to_json()?);
    Ok(())
}

/// Delays of one fan-out measurement: every delivery, and the last one of each round.
struct Delays {
    all: Vec<f64>,
    last: Vec<f64>,
}

/// Blocks an address per round and measures until every stream has the delta.
async fn fanout_streams(
    http: &reqwest::Client,
    base: &str,
    op: &Operator,
    credentials: &[String],
) -> Result<Delays> {
    note(format!(
        "bench-manager: opening {} streams",
        credentials.len()
    ));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::with_capacity(credentials.len());
    // Open them in waves so the snapshot loads do not all queue on the pool at once.
    for chunk in credentials.chunks(SETUP_CONCURRENCY) {
        for credential in chunk {
            let (http, base, credential, tx) = (
                http.clone(),
                base.to_owned(),
                credential.clone(),
                tx.clone(),
            );
            tasks.push(tokio::spawn(async move {
                if let Err(err) = hold_stream(http, base, credential, tx).await {
                    note(format!("bench-manager: stream failed: {err:#}"));
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(tx);
    let mut ready = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while ready < credentials.len() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(StreamNote::Ready)) => ready += 1,
            Ok(Some(StreamNote::Delta(..))) => {}
            Ok(None) => bail!("streams ended before all were ready ({ready})"),
            Err(_) => bail!("only {ready} of {} streams ready", credentials.len()),
        }
    }
    note(format!(
        "bench-manager: {ready} streams hold their snapshot"
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut delays = Delays {
        all: Vec::new(),
        last: Vec::new(),
    };
    for round in 0..ROUNDS {
        let start = Instant::now();
        let revision = op.block(&attacker_addr(round as u32).to_string()).await?;
        let answered = start.elapsed();
        let mut got = 0;
        let mut last = Duration::ZERO;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while got < credentials.len() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(StreamNote::Delta(rev, at))) => {
                    ensure!(
                        rev == revision,
                        "a stream got revision {rev}, expected {revision}"
                    );
                    let d = at.saturating_duration_since(start);
                    delays.all.push(ms(d));
                    last = last.max(d);
                    got += 1;
                }
                Ok(Some(StreamNote::Ready)) => {}
                Ok(None) => bail!("streams ended during round {round}"),
                Err(_) => bail!("round {round}: only {got} streams got the delta"),
            }
        }
        delays.last.push(ms(last));
        note(format!(
            "bench-manager: round {round}: API answered in {:.1} ms, last stream after {:.1} ms",
            ms(answered),
            ms(last)
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for task in tasks {
        task.abort();
    }
    delays.all.sort_by(f64::total_cmp);
    Ok(delays)
}

/// The original's design beside it: every agent polls every 10 s (phases spread evenly at
/// random over the interval); one block; the delay until each poller has seen it.
async fn fanout_poll(
    http: &reqwest::Client,
    base: &str,
    op: &Operator,
    credentials: &[String],
) -> Result<Delays> {
    note(format!(
        "bench-manager: baseline: {} agents polling every {} s",
        credentials.len(),
        POLL_INTERVAL.as_secs()
    ));
    let head: i64 = {
        let resp = http
            .post(format!("{base}/api/v1/agent/policy"))
            .bearer_auth(&credentials[0])
            .json(&json!({}))
            .send()
            .await?;
        let body: Value = resp.json().await?;
        body["revision"].as_i64().context("no revision")?
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    let mut tasks = Vec::new();
    for credential in credentials {
        let (http, base, credential, tx) = (
            http.clone(),
            base.to_owned(),
            credential.clone(),
            tx.clone(),
        );
        let phase = Duration::from_millis(
            rand::thread_rng().gen_range(0..POLL_INTERVAL.as_millis() as u64),
        );
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(phase).await;
            let mut tick = tokio::time::interval(POLL_INTERVAL);
            loop {
                tick.tick().await;
                let Ok(resp) = http
                    .post(format!("{base}/api/v1/agent/policy"))
                    .bearer_auth(&credential)
                    .json(&json!({ "since": head }))
                    .send()
                    .await
                else {
                    continue;
                };
                let Ok(body) = resp.json::<Value>().await else {
                    continue;
                };
                let changed = body["deltas"].as_array().is_some_and(|d| !d.is_empty());
                if changed {
                    let _ = tx.send(Instant::now());
                    return;
                }
            }
        }));
    }
    drop(tx);
    // Let every poller reach its steady rhythm first.
    tokio::time::sleep(POLL_INTERVAL + Duration::from_secs(1)).await;
    let start = Instant::now();
    op.block(&attacker_addr(ROUNDS as u32 + 1).to_string())
        .await?;
    let mut all = Vec::with_capacity(credentials.len());
    let deadline = tokio::time::Instant::now() + POLL_INTERVAL * 3;
    while all.len() < credentials.len() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(at)) => all.push(ms(at.saturating_duration_since(start))),
            Ok(None) => break,
            Err(_) => break,
        }
    }
    for task in tasks {
        task.abort();
    }
    ensure!(
        all.len() == credentials.len(),
        "only {} of {} pollers saw the change",
        all.len(),
        credentials.len()
    );
    all.sort_by(f64::total_cmp);
    let last = all.last().copied().unwrap_or(0.0);
    Ok(Delays {
        all,
        last: vec![last],
    })
}

/// A fresh agent's stream with `SNAPSHOT_ENTRIES` live entries.
async fn snapshot(
    http: &reqwest::Client,
    base: &str,
    op: &Operator,
    pool: &sqlx::PgPool,
) -> Result<()> {
    note(format!(
        "bench-manager: inserting {SNAPSHOT_ENTRIES} attacker entries"
    ));
    // Straight into the table: the case measures the snapshot, not a million API calls.
    // Addresses from 100.64.16.0 on (RFC 6598, clear of the fan-out rounds' addresses).
    let t = Instant::now();
    sqlx::query(
        "INSERT INTO attackers (net, action, reason, manual) \
         SELECT set_masklen('100.64.16.0'::inet + g, 32)::cidr, 'default', 'bench', false \
         FROM generate_series(0, $1 - 1) AS g",
    )
    .bind(SNAPSHOT_ENTRIES)
    .execute(pool)
    .await
    .context("inserting the snapshot entries")?;
    // What autovacuum would do shortly after such a load; without it the planner still
    // believes the table is empty for a while.
    sqlx::query("ANALYZE attackers")
        .execute(pool)
        .await
        .context("analyzing attackers")?;
    note(format!(
        "bench-manager: inserted and analyzed in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let credential = op.enroll(&format!("bench-{}", AGENTS + 1)).await?;
    let mut times = Vec::new();
    let mut size = 0usize;
    for round in 0..3 {
        let start = Instant::now();
        let resp = http
            .get(format!("{base}/api/v1/agent/stream"))
            .bearer_auth(&credential)
            .send()
            .await?;
        ensure!(resp.status().is_success(), "stream: {}", resp.status());
        let mut body = resp.bytes_stream();
        let mut parser = SseParser::default();
        let mut received = 0usize;
        let snapshot = 'read: loop {
            let chunk = body
                .next()
                .await
                .context("stream ended before the snapshot")??;
            received += chunk.len();
            for ev in parser.push(&chunk) {
                if ev.event == "snapshot" {
                    break 'read ev;
                }
            }
        };
        let parsed: Value = serde_json::from_str(&snapshot.data).context("snapshot JSON")?;
        let n = parsed["attackers"].as_array().map_or(0, Vec::len);
        ensure!(
            n as i64 >= SNAPSHOT_ENTRIES,
            "snapshot has {n} entries, expected at least {SNAPSHOT_ENTRIES}"
        );
        let took = start.elapsed();
        drop(body);
        size = received;
        times.push(ms(took));
        note(format!(
            "bench-manager: snapshot round {round}: {n} entries, {:.1} MB in {:.0} ms",
            received as f64 / 1e6,
            ms(took)
        ));
    }
    emit(&Record::alone(
        BENCH,
        format!("snapshot/{SNAPSHOT_ENTRIES}"),
        "ms",
        median(&times),
    ))?;
    emit(&Record::alone(
        BENCH,
        format!("snapshot/{SNAPSHOT_ENTRIES}"),
        "megabytes",
        size as f64 / 1e6,
    ))?;
    Ok(())
}

/// Verdict ingestion through the API in batches.
async fn ingest(http: &reqwest::Client, base: &str, op: &Operator) -> Result<()> {
    let created = op
        .post("/api/v1/service-credentials", &json!({ "name": "bench" }))
        .await?;
    let credential = created["credential"]
        .as_str()
        .context("no service credential")?
        .to_owned();
    note(format!(
        "bench-manager: ingesting {BATCHES} batches of {BATCH} verdicts"
    ));
    let at = time_now_rfc3339()?;
    let start = Instant::now();
    let mut batch_ms = Vec::with_capacity(BATCHES);
    for b in 0..BATCHES {
        let verdicts: Vec<Value> = (0..BATCH)
            .map(|i| {
                // 100.112.0.0 on: clear of the snapshot case's entries.
                let n = 0x0003_0000 + (b * BATCH + i) as u32;
                json!({
                    "id": format!("bench-{b}-{i}"),
                    "addr": attacker_addr(n).to_string(),
                    "rule": "sshd-bruteforce",
                    "service": "sshd",
                    "severity": "high",
                    "count": 5,
                    "evidence": ["Failed password for root from 100.64.0.1 port 22 ssh2"],
                    "at": at,
                })
            })
            .collect();
        let sent = Instant::now();
        let resp = http
            .post(format!("{base}/api/v1/verdicts"))
            .bearer_auth(&credential)
            .json(&json!({ "verdicts": verdicts }))
            .send()
            .await?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        ensure!(status.is_success(), "verdicts: {status}: {body}");
        ensure!(
            body["accepted"].as_u64() == Some(BATCH as u64),
            "batch {b} accepted {}",
            body["accepted"]
        );
        batch_ms.push(ms(sent.elapsed()));
    }
    let took = start.elapsed().as_secs_f64();
    let rate = (BATCHES * BATCH) as f64 / took;
    note(format!(
        "bench-manager: {} verdicts in {took:.1} s",
        BATCHES * BATCH
    ));
    emit(&Record::alone(
        BENCH,
        format!("ingest/batch-{BATCH}"),
        "verdicts_per_second",
        rate,
    ))?;
    emit(&Record::alone(
        BENCH,
        format!("ingest/batch-{BATCH}"),
        "batch_p50_ms",
        median(&batch_ms),
    ))
}

fn time_now_rfc3339() -> Result<String> {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .context("formatting the time")
}
