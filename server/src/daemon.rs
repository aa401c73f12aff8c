//! `mirage-server run`: the listeners, the detector and the verdict reporter wired together.
//!
//! ```text
//! listeners ──LogRecord──▶ detection task ──Verdict──▶ reporter (on-disk queue ▶ manager)
//!  (UDP/TCP/TLS)   mpsc       (Detector, batches)   └──▶ subscribers (tests, logs)
//! ```
//!
//! The detection task takes up to [`BATCH`] records at a time (waiting at most [`BATCH_WAIT`]
//! for a batch to fill), so the shared backend pays one transaction per batch, not per line.
//! While the shared state is unreachable the detector keeps the matches and retries; the
//! listeners keep reading (TCP/TLS readers slow down when the channel is full).

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    sync::{broadcast, mpsc, watch},
    task::JoinHandle,
};

use crate::{
    RuleSet,
    config::ServerConfig,
    detect::{Detector, MemoryState, NeverFlag, State, StateError, pg::PgState},
    record::LogRecord,
    report::{ReportError, Reporter},
    rules::RuleError,
    syslog::listen::{self, ListenError, Listeners, Transport},
    verdict::Verdict,
};

/// Most records the detector takes at once.
pub const BATCH: usize = 1000;
/// Longest wait for a batch to fill.
pub const BATCH_WAIT: Duration = Duration::from_millis(20);
/// Records buffered between the listeners and the detector.
const CHANNEL: usize = 20_000;
/// Windows held by the in-memory backend.
const MEMORY_KEYS: usize = 2_000_000;
/// Seconds between sweeps of old windows.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A rule pack is invalid.
    #[error("loading rule packs")]
    Rules(#[from] RuleError),
    /// The built-in timestamp patterns did not compile.
    #[error("compiling timestamp patterns")]
    Timestamps(#[from] regex::Error),
    /// `state.database_url_file` could not be read.
    #[error("reading {path}")]
    DatabaseUrl {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The shared state could not be opened.
    #[error("opening the shared counting state")]
    State(#[from] StateError),
    /// The reporter could not start.
    #[error("starting the verdict reporter")]
    Report(#[from] ReportError),
    /// A listener could not start.
    #[error("starting the listeners")]
    Listen(#[from] ListenError),
}

/// A running server.
pub struct Running {
    listeners: Listeners,
    detection: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
    reporter: Option<Reporter>,
    stop: watch::Sender<bool>,
    verdicts: broadcast::Sender<Verdict>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("listeners", &self.listeners.local_addrs())
            .finish_non_exhaustive()
    }
}

/// Starts every part of the server.
///
/// # Errors
///
/// If a rule pack, the shared state, the reporter or a listener cannot start; nothing is left
/// running then.
pub async fn start(config: &ServerConfig) -> Result<Running, DaemonError> {
    let mut rules = if config.rules.builtin {
        RuleSet::builtin()?
    } else {
        RuleSet::default()
    };
    for dir in &config.rules.dirs {
        rules.add_dir(dir)?;
    }
    if rules.is_empty() {
        tracing::warn!("No rules loaded: nothing will ever be flagged.");
    }
    let state = match database_url(config)? {
        Some(url) => State::Postgres(PgState::connect(&url).await?),
        None => State::Memory(MemoryState::new(MEMORY_KEYS)),
    };
    let never_flag = NeverFlag::new(config.trust.never_flag.clone());
    let detector = Detector::new(Arc::new(rules), state, never_flag.clone())?;
    let (stop, stop_rx) = watch::channel(false);
    let (verdicts, _) = broadcast::channel(4096);

    let reporter = match (&config.manager, config.manager.is_some()) {
        (Some(m), true) => Some(Reporter::start(m, &config.queue)?),
        _ => None,
    };
    let mut tasks = Vec::new();
    if let (Some(r), Some(m)) = (&reporter, &config.manager) {
        tasks.push(tokio::spawn(refresh_allowlists(
            r.clone(),
            never_flag,
            Duration::from_secs(m.allowlist_refresh_secs),
            stop_rx.clone(),
        )));
    }

    let (tx, rx) = mpsc::channel(CHANNEL);
    let listeners = match listen::spawn(config, tx).await {
        Ok(l) => l,
        Err(err) => {
            let _ = stop.send(true);
            for t in tasks {
                t.abort();
            }
            if let Some(r) = reporter {
                r.shutdown().await;
            }
            return Err(err.into());
        }
    };
    for (transport, addr) in listeners.local_addrs() {
        tracing::info!(transport = transport.as_str(), %addr, "Listening.");
    }
    let detection = tokio::spawn(detect_loop(
        detector,
        rx,
        reporter.clone(),
        verdicts.clone(),
    ));
    Ok(Running {
        listeners,
        detection,
        tasks,
        reporter,
        stop,
        verdicts,
    })
}

impl Running {
    /// Bound addresses (port 0 in the configuration becomes the real port here).
    pub fn local_addrs(&self) -> Vec<(Transport, std::net::SocketAddr)> {
        self.listeners.local_addrs()
    }

    /// Every verdict from now on (slow subscribers miss the oldest; the reporter never does).
    pub fn subscribe(&self) -> broadcast::Receiver<Verdict> {
        self.verdicts.subscribe()
    }

    /// Stops accepting, lets the detector finish what it received, flushes the reporter
    /// briefly (the queue keeps the rest) and stops.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        // Closing the listeners drops the channel's senders, which ends the detection loop
        // once it has drained the channel.
        self.listeners.shutdown().await;
        if let Err(err) = self.detection.await {
            tracing::error!(%err, "Detection task failed.");
        }
        for t in self.tasks {
            t.abort();
        }
        if let Some(r) = self.reporter {
            r.shutdown().await;
        }
    }
}

fn database_url(config: &ServerConfig) -> Result<Option<String>, DaemonError> {
    if let Some(url) = &config.state.database_url {
        return Ok(Some(url.clone()));
    }
    match &config.state.database_url_file {
        Some(path) => std::fs::read_to_string(path)
            .map(|s| Some(s.trim().to_owned()))
            .map_err(|source| DaemonError::DatabaseUrl {
                path: path.clone(),
                source,
            }),
        None => Ok(None),
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

async fn detect_loop(
    mut detector: Detector,
    mut rx: mpsc::Receiver<LogRecord>,
    reporter: Option<Reporter>,
    verdicts: broadcast::Sender<Verdict>,
) {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry_delay = Duration::from_millis(250);
    let mut closed = false;
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        if !closed {
            let idle = detector.pending() == 0 && !detector.has_retry();
            tokio::select! {
                n = rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        closed = true;
                    }
                }
                _ = tokio::time::sleep(Duration::from_secs(1)), if !idle => {}
                _ = tokio::time::sleep(Duration::from_secs(3600)), if idle => {}
                _ = sweep.tick() => {
                    if let Err(err) = detector.sweep().await {
                        tracing::warn!(error = %err, "Sweeping the counting state failed.");
                    }
                    continue;
                }
            }
            // Let a burst fill the batch a little.
            if !batch.is_empty() && batch.len() < BATCH {
                let deadline = tokio::time::sleep(BATCH_WAIT);
                tokio::pin!(deadline);
                while batch.len() < BATCH {
                    let room = BATCH - batch.len();
                    tokio::select! {
                        n = rx.recv_many(&mut batch, room) => if n == 0 { closed = true; break; },
                        () = &mut deadline => break,
                    }
                }
            }
        }
        match detector.process(batch, unix_now()).await {
            Ok(found) => {
                retry_delay = Duration::from_millis(250);
                if !found.is_empty() {
                    deliver(found, reporter.as_ref(), &verdicts).await;
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?retry_delay, "Counting failed; matches kept for a retry.");
                tokio::time::sleep(retry_delay).await;
                retry_delay = (retry_delay * 2).min(Duration::from_secs(30));
            }
        }
        if closed && detector.pending() == 0 && !detector.has_retry() {
            break;
        }
        if closed {
            // Draining after shutdown: give pending lines their last chance, then stop.
            if let Ok(found) = detector.process(Vec::new(), unix_now()).await
                && !found.is_empty()
            {
                deliver(found, reporter.as_ref(), &verdicts).await;
            }
            break;
        }
    }
    let s = detector.stats();
    tracing::info!(
        records = s.records,
        untrusted = s.untrusted,
        matches = s.hits,
        verdicts = s.verdicts,
        "Detection stopped."
    );
}

async fn deliver(
    found: Vec<Verdict>,
    reporter: Option<&Reporter>,
    verdicts: &broadcast::Sender<Verdict>,
) {
    for v in &found {
        let _ = verdicts.send(v.clone());
    }
    match reporter {
        Some(r) => {
            if let Err(err) = r.submit(found).await {
                metrics::counter!("mirage_server_verdicts_refused_total").increment(1);
                tracing::error!(error = %err, "Verdicts could not be queued for the manager.");
            }
        }
        None => {
            for v in found {
                tracing::warn!(addr = %v.addr, rule = %v.rule, "Verdict (no manager configured).");
            }
        }
    }
}

async fn refresh_allowlists(
    reporter: Reporter,
    never_flag: NeverFlag,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match reporter.fetch_allowlists().await {
            Ok(nets) => {
                tracing::debug!(
                    networks = nets.len(),
                    "Allowlists refreshed from the manager."
                );
                never_flag.set_manager(nets);
            }
            Err(err) => {
                tracing::warn!(error = %err, "Could not refresh the manager's allowlists; keeping the last ones.")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}
