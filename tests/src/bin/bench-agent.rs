//! `bench-agent`: how fast the manager's decisions reach the kernel through the agent's policy
//! sync. A real manager (in this process, on its embedded PostgreSQL, as `bench-manager` runs
//! it) and a real `mirage-agent run` in the lab's host namespace; the agent reaches the manager
//! through a listener the manager opens inside that namespace, and the bench reads the agent's
//! pinned kernel map directly.
//!
//! Cases (one JSON line each on stdout, progress on stderr):
//! - `verdict-to-map/N`: N verdicts posted one by one as `mirage-server` posts them (`POST
//!   /api/v1/verdicts`, service credential), each for a new address; the delay from the 2xx of
//!   the POST until the entry is in the pinned `ATTACKERS_V4` map (polled every 50 µs), `p50_ms`
//!   and `p99_ms`. The baseline, measured in the same run over the same verdicts, is the
//!   original's design: an agent polling the manager every 10 s (`POST /api/v1/agent/policy`,
//!   random phase) and counted as done the moment its poll returns the change, before it would
//!   rebuild any table. Also `p99_ms_from_request`: from sending the POST.
//! - `snapshot/1000000`: 1,000,000 entries seeded into the manager's database, the revision
//!   log emptied so the agent's resume position is gone, and the agent restarted: `total_ms`
//!   from starting the agent until the last of the million is in the kernel map (process start,
//!   the manager's snapshot query and transfer, parsing, the state file, the map writes),
//!   `fill_ms` from the first of them in the map to the last, the agent's own `apply_ms`, and
//!   `absent_samples` of an entry present before: it is looked up throughout and must never be
//!   missing (0), because a snapshot is diffed, never cleared and refilled.
//!
//! Everything listens on loopback (the root namespace's and the lab host's); the lab, the pins,
//! the agent's state and the cluster are removed at the end and on Ctrl-C.
#![allow(
    clippy::print_stdout,
    reason = "benchmark results go to stdout by contract"
)]

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use agent_common::{AttackerEntry, maps as names};
use anyhow::{Context as _, Result, bail, ensure};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use manager::{AppState, ManagerConfig, app, db::Database, test_util};
use rand::Rng as _;
use serde_json::{Value, json};
use tests::{
    bench::{Record, attacker_addr, median, note},
    lab::{Agent, Lab, binary},
    netns::{cleanup_on_interrupt, unique_tag},
    operator::Operator,
    probe::in_netns,
};
use tokio::sync::{mpsc, oneshot};

const BENCH: &str = "agent";
/// Verdicts measured one by one.
const VERDICTS: usize = 200;
/// Pause between two verdicts: the N verdicts then span more than one poll interval, so the
/// baseline sees every phase.
const VERDICT_GAP: Duration = Duration::from_millis(60);
/// The original's poll interval.
const POLL_INTERVAL: Duration = Duration::from_secs(10);
/// Entries in the snapshot case.
const SNAPSHOT_ENTRIES: u32 = 1_000_000;
/// First address of the snapshot case (clear of the verdicts').
const SNAPSHOT_BASE: Ipv4Addr = Ipv4Addr::new(100, 64, 16, 0);

fn main() -> Result<()> {
    if let Err(err) = cleanup_on_interrupt() {
        note(format!("warning: Ctrl-C will not clean up: {err:#}"));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = test_util::temp_dir();
    let config = ManagerConfig {
        data_dir: dir.path().to_owned(),
        cookie_secure: false,
        ..ManagerConfig::default()
    };
    note("bench-agent: starting the embedded PostgreSQL cluster");
    let database = rt
        .block_on(Database::open(&config))
        .context("opening the database")?;
    let result = run(&rt, &config, &database);
    rt.block_on(database.close());
    result
}

/// The manager, served on loopback in the root namespace (for the bench) and in the lab host's
/// namespace (for the agent) until dropped.
struct Server {
    base: String,
    agent_base: String,
    stop: Option<oneshot::Sender<()>>,
}

impl Server {
    fn start(
        rt: &tokio::runtime::Runtime,
        config: &ManagerConfig,
        pool: &sqlx::PgPool,
        ns: &str,
    ) -> Result<Self> {
        let state = AppState::new(pool.clone(), config.clone());
        let outside = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        // A socket belongs to the namespace it was created in: this one serves the agent.
        let inside = in_netns(ns, || std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))??;
        let base = format!("http://{}", outside.local_addr()?);
        let agent_base = format!("http://{}", inside.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let (stop_tx, _) = tokio::sync::watch::channel(false);
        let bus = state.bus.clone();
        for listener in [outside, inside] {
            listener.set_nonblocking(true)?;
            let state = state.clone();
            let mut stop_rx = stop_tx.subscribe();
            rt.spawn(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let served = axum::serve(
                    listener,
                    app(state).into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                })
                .await;
                if let Err(err) = served {
                    note(format!("bench-agent: server error: {err}"));
                }
            });
        }
        rt.spawn(async move {
            let _ = stopped.await;
            bus.close();
            let _ = stop_tx.send(true);
        });
        Ok(Self {
            base,
            agent_base,
            stop: Some(stop),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The agent's exact IPv4 attacker map, opened from its pin.
fn attackers_v4(pin_dir: &Path) -> Result<BpfHashMap<MapData, [u8; 4], AttackerEntry>> {
    let data = MapData::from_pin(pin_dir.join(names::ATTACKERS_V4))
        .context("opening the pinned ATTACKERS_V4")?;
    Ok(BpfHashMap::try_from(Map::HashMap(data))?)
}

/// Waits until `addr` is in `map`, polling every 50 µs; returns when it was first seen.
fn wait_present(
    map: &BpfHashMap<MapData, [u8; 4], AttackerEntry>,
    addr: Ipv4Addr,
    timeout: Duration,
) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if map.get(&addr.octets(), 0).is_ok() {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("{addr} did not reach the kernel map within {timeout:?}");
        }
        std::thread::sleep(Duration::from_micros(50));
    }
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

fn emit(record: &Record) -> Result<()> {
    println!("{}", record.to_json()?);
    Ok(())
}

/// Removes a directory on drop.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(rt: &tokio::runtime::Runtime, config: &ManagerConfig, database: &Database) -> Result<()> {
    note("bench-agent: building the lab");
    let lab = Lab::new()?;
    let server = Server::start(rt, config, &database.pool, lab.host.name())?;
    let http = reqwest::Client::new();
    let op = rt.block_on(Operator::login(&http, &server.base, &database.pool))?;
    let service = rt.block_on(op.post(
        "/api/v1/service-credentials",
        &json!({ "name": "bench-server" }),
    ))?;
    let service = service["credential"]
        .as_str()
        .context("no service credential")?
        .to_owned();

    let tag = unique_tag();
    let state = DirGuard(std::env::temp_dir().join(format!("mirage-agent-{tag}-state")));
    let config_file = DirGuard(std::env::temp_dir().join(format!("mirage-agent-{tag}.toml")));
    let token = rt.block_on(op.token())?;
    let enrolled = std::process::Command::new(binary("mirage-agent"))
        .env("MIRAGE_NETNS", lab.host.name())
        .env("MIRAGE_ENROLL_TOKEN", &token)
        .args([
            "enroll",
            "--name",
            "bench-host",
            "--manager",
            &server.agent_base,
            "--state-dir",
        ])
        .arg(&state.0)
        .output()?;
    ensure!(
        enrolled.status.success(),
        "mirage-agent enroll: {}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    std::fs::write(
        &config_file.0,
        format!(
            "mode = \"firewall\"\nstate_dir = \"{}\"\n\n[manager]\nurl = \"{}\"\nheartbeat_secs = 5\n",
            state.0.display(),
            server.agent_base
        ),
    )?;
    let cfg_arg = config_file.0.display().to_string();
    let args = ["--config", cfg_arg.as_str()];
    note("bench-agent: starting the agent");
    let mut agent = Agent::start(&lab.host, &args)?;
    let pin_dir = agent::loader::pin_dir(agent.root());
    // Synced once its first heartbeat reports a revision.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let agents = rt.block_on(op.get("/api/v1/agents"))?;
        let synced = agents
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["name"] == "bench-host" && a["applied_revision"].is_i64());
        if synced {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the agent never synced\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    verdicts(rt, &op, &service, &pin_dir, &agent)?;
    snapshot(&database.pool, rt, &mut agent, &args, &pin_dir)?;
    drop(agent);
    drop(server);
    Ok(())
}

/// Verdict → kernel map, with the 10 s poller beside it.
fn verdicts(
    rt: &tokio::runtime::Runtime,
    op: &Operator,
    service: &str,
    pin_dir: &Path,
    agent: &Agent,
) -> Result<()> {
    // The baseline: one more (made-up) agent that polls every 10 s.
    let poller_credential = rt.block_on(op.enroll("bench-poller"))?;
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let poller = {
        let http = op.http().clone();
        let base = op.base().to_owned();
        rt.spawn(async move {
            let mut since: Option<i64> = None;
            let phase = rand::thread_rng().gen_range(0..POLL_INTERVAL.as_millis() as u64);
            tokio::time::sleep(Duration::from_millis(phase)).await;
            let mut tick = tokio::time::interval(POLL_INTERVAL);
            loop {
                tick.tick().await;
                let Ok(resp) = http
                    .post(format!("{base}/api/v1/agent/policy"))
                    .bearer_auth(&poller_credential)
                    .json(&json!({ "since": since }))
                    .send()
                    .await
                else {
                    continue;
                };
                let Ok(body) = resp.json::<Value>().await else {
                    continue;
                };
                let now = Instant::now();
                for d in body["deltas"].as_array().into_iter().flatten() {
                    if let Some(net) = d["net"].as_str() {
                        let _ = seen_tx.send((net.to_owned(), now));
                    }
                }
                since = body["revision"].as_i64().or(since);
            }
        })
    };
    // Let the poller take its first (snapshot) answer.
    std::thread::sleep(POLL_INTERVAL + Duration::from_secs(1));

    let map = attackers_v4(pin_dir)?;
    let at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .context("formatting the time")?;
    note(format!("bench-agent: {VERDICTS} verdicts, one by one"));
    let mut from_ok = Vec::with_capacity(VERDICTS);
    let mut from_request = Vec::with_capacity(VERDICTS);
    let mut accepted_at: HashMap<String, Instant> = HashMap::new();
    for i in 0..VERDICTS {
        let addr = attacker_addr(i as u32);
        let body = json!({ "verdicts": [{
            "id": format!("bench-{i}"), "addr": addr.to_string(), "rule": "sshd-failed-password",
            "service": "sshd", "severity": "high", "action": "drop", "count": 5, "at": at,
            "evidence": [format!("Failed password for root from {addr} port 50022 ssh2")],
        }]});
        let sent = Instant::now();
        let answer: Value = rt.block_on(async {
            let resp = op
                .http()
                .post(format!("{}/api/v1/verdicts", op.base()))
                .bearer_auth(service)
                .json(&body)
                .send()
                .await?;
            ensure!(resp.status().is_success(), "verdicts: {}", resp.status());
            Ok::<_, anyhow::Error>(resp.json().await?)
        })?;
        let ok = Instant::now();
        ensure!(
            answer["accepted"] == 1,
            "verdict {i} not accepted: {answer}"
        );
        let found = wait_present(&map, addr, Duration::from_secs(10))
            .with_context(|| format!("verdict {i}\n{}", agent.log()))?;
        from_ok.push(ms(found.saturating_duration_since(ok)));
        from_request.push(ms(found.saturating_duration_since(sent)));
        accepted_at.insert(format!("{addr}/32"), ok);
        std::thread::sleep(VERDICT_GAP);
    }

    note("bench-agent: waiting for the 10 s poller to see them all");
    let mut polled = Vec::with_capacity(VERDICTS);
    let deadline = Instant::now() + POLL_INTERVAL * 3;
    while polled.len() < VERDICTS && Instant::now() < deadline {
        let next = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(1), seen_rx.recv()).await });
        if let Ok(Some((net, at))) = next
            && let Some(ok) = accepted_at.remove(&net)
        {
            polled.push(ms(at.saturating_duration_since(ok)));
        }
    }
    poller.abort();
    ensure!(
        polled.len() == VERDICTS,
        "the poller saw only {} of {VERDICTS} verdicts",
        polled.len()
    );
    for v in [&mut from_ok, &mut from_request, &mut polled] {
        v.sort_by(f64::total_cmp);
    }
    let case = format!("verdict-to-map/{VERDICTS}");
    for (metric, p) in [("p50_ms", 50.0), ("p99_ms", 99.0)] {
        emit(&Record::cost(
            BENCH,
            case.clone(),
            metric,
            percentile(&from_ok, p),
            "poll-10s",
            percentile(&polled, p),
        ))?;
    }
    emit(&Record::alone(
        BENCH,
        case,
        "p99_ms_from_request",
        percentile(&from_request, 99.0),
    ))?;
    note(format!(
        "bench-agent: verdict to map: median {:.2} ms, max {:.2} ms (from the request: median {:.2} ms)",
        median(&from_ok),
        from_ok.last().copied().unwrap_or(0.0),
        median(&from_request)
    ));
    Ok(())
}

/// A million-entry snapshot, applied while an entry from before is watched.
fn snapshot(
    pool: &sqlx::PgPool,
    rt: &tokio::runtime::Runtime,
    agent: &mut Agent,
    args: &[&str],
    pin_dir: &Path,
) -> Result<()> {
    agent.stop()?;
    note(format!(
        "bench-agent: inserting {SNAPSHOT_ENTRIES} attacker entries"
    ));
    let t = Instant::now();
    rt.block_on(async {
        // Straight into the table, as bench-manager does; then the revision log is emptied
        // (and the head moved on), so the agent's position is gone and it gets a snapshot.
        sqlx::query(
            "INSERT INTO attackers (net, action, reason, manual) \
             SELECT set_masklen($1::inet + g, 32)::cidr, 'drop', 'bench', false \
             FROM generate_series(0, $2 - 1) AS g",
        )
        .bind(SNAPSHOT_BASE.to_string())
        .bind(i64::from(SNAPSHOT_ENTRIES))
        .execute(pool)
        .await
        .context("inserting the snapshot entries")?;
        sqlx::query("ANALYZE attackers").execute(pool).await?;
        sqlx::query("DELETE FROM policy_revisions")
            .execute(pool)
            .await?;
        sqlx::query("UPDATE policy_head SET revision = revision + 1")
            .execute(pool)
            .await?;
        Ok::<_, anyhow::Error>(())
    })?;
    note(format!(
        "bench-agent: inserted in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    let first = SNAPSHOT_BASE;
    let last = Ipv4Addr::from(u32::from(SNAPSHOT_BASE) + SNAPSHOT_ENTRIES - 1);
    let before = attacker_addr(0);

    // Watch an entry from before for the whole run.
    let map = attackers_v4(pin_dir)?;
    ensure!(
        map.get(&before.octets(), 0).is_ok(),
        "{before} is not in the map"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let absent = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (stop, absent, samples) = (stop.clone(), absent.clone(), samples.clone());
        let map = attackers_v4(pin_dir)?;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if map.get(&before.octets(), 0).is_err() {
                    absent.fetch_add(1, Ordering::Relaxed);
                }
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };

    note(
        "bench-agent: restarting the agent; it resumes, finds its position gone, and gets the snapshot",
    );
    let start = Instant::now();
    agent.spawn(args)?;
    let first_at =
        wait_present(&map, first, Duration::from_secs(300)).with_context(|| agent.log())?;
    let last_at =
        wait_present(&map, last, Duration::from_secs(300)).with_context(|| agent.log())?;
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    let total = last_at.saturating_duration_since(start);
    let fill = last_at.saturating_duration_since(first_at);
    let count = map.keys().filter(Result::is_ok).count();
    ensure!(
        count >= SNAPSHOT_ENTRIES as usize,
        "the map holds {count} entries, expected at least {SNAPSHOT_ENTRIES}"
    );
    // The agent's own measure, from its log line.
    let apply_ms = agent
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("Policy snapshot applied."))
        .and_then(|l| l.split("took_ms=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    let case = format!("snapshot/{SNAPSHOT_ENTRIES}");
    emit(&Record::alone(BENCH, case.clone(), "total_ms", ms(total)))?;
    emit(&Record::alone(BENCH, case.clone(), "fill_ms", ms(fill)))?;
    emit(&Record::alone(BENCH, case.clone(), "apply_ms", apply_ms))?;
    emit(&Record::alone(
        BENCH,
        case,
        "absent_samples",
        absent.load(Ordering::Relaxed) as f64,
    ))?;
    note(format!(
        "bench-agent: {count} entries in the map; {} lookups of {before} during the snapshot, {} missed",
        samples.load(Ordering::Relaxed),
        absent.load(Ordering::Relaxed)
    ));
    Ok(())
}
