//! Service log collection and shipping.
//!
//! Collectors (log files, the systemd journal, Redis) read lines and hand them to a [`Sink`];
//! the shipper behind it appends them to the on-disk queue (`spool`) and sends them to the
//! server as RFC 5424 over TLS. A collector's [`Sink::send`] returns once its lines are durably
//! queued, so a collector that remembers where it is (a file offset, the last `ACL LOG` entry)
//! saves that position only after `send` returned: nothing is read twice or skipped across
//! restarts. While the queue is full `send` waits (collectors pause; nothing is dropped).

pub mod files;
pub mod journal;
pub mod offsets;
pub mod redis;
pub mod ship;

use std::time::Duration;

use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::warn;

use crate::config::AgentConfig;

/// Now, in Unix seconds (a line's `read_at`).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// One collected line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The service whose rules apply on the server (`sshd`, `redis`, ..., `mirage-flow`).
    pub service: String,
    /// Where it came from: a file path, `journal:UNIT`, `redis:monitor`, `redis:acl-log`.
    pub source: String,
    /// The line as read (no trailing newline), sent to the server verbatim.
    pub line: String,
    /// When it was read (Unix seconds): the syslog header's timestamp.
    pub read_at: i64,
}

/// Why a batch could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The shipper has stopped (the agent is shutting down).
    #[error("the log shipper has stopped")]
    Closed,
    /// The queue refused the batch (a disk error; the message says which).
    #[error("queueing log lines: {0}")]
    Queue(String),
}

/// A batch waiting to be queued, with the channel its collector waits on.
pub type Request = (Vec<LogLine>, oneshot::Sender<Result<(), SinkError>>);

/// Where collectors put lines (cheap to clone).
#[derive(Debug, Clone)]
pub struct Sink {
    tx: mpsc::Sender<Request>,
}

impl Sink {
    /// A sink and the receiving end the shipper (or a test) drains.
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self { tx }, rx)
    }

    /// Queues `lines` durably, in order; returns once they are on disk.
    ///
    /// # Errors
    ///
    /// If the shipper has stopped or the queue failed; the collector must not advance its
    /// position then.
    pub async fn send(&self, lines: Vec<LogLine>) -> Result<(), SinkError> {
        if lines.is_empty() {
            return Ok(());
        }
        let (done, wait) = oneshot::channel();
        self.tx
            .send((lines, done))
            .await
            .map_err(|_| SinkError::Closed)?;
        wait.await.map_err(|_| SinkError::Closed)?
    }
}

/// The running log pipeline: the shipper and every collector.
#[derive(Debug)]
pub struct Handles {
    shipper: ship::Shipper,
    /// For lines that are not collected from a source (the kernel's flow events).
    sink: Sink,
    stop: watch::Sender<bool>,
    collectors: Vec<(&'static str, JoinHandle<()>)>,
}

/// How long collectors get to finish their batch when the agent stops.
const COLLECTOR_GRACE: Duration = Duration::from_secs(5);

/// Starts log shipping and collection when `[server]` is configured (`None` otherwise): the
/// shipper (queue in `state_dir/queue`), the files collector for `[[logs]]`, one journal
/// collector per `[[journal]]`, and the Redis collector for `[redis]`.
///
/// # Errors
///
/// If the shipper cannot start (TLS files, the queue). Collector problems are logged and
/// retried by the collectors themselves.
pub async fn start(cfg: &AgentConfig) -> Result<Option<Handles>, ship::ShipError> {
    let Some(link) = &cfg.server else {
        return Ok(None);
    };
    let (shipper, sink) =
        ship::Shipper::start(link, &cfg.state_dir, ship::ShipOptions::default()).await?;
    let (stop, stop_rx) = watch::channel(false);
    let mut collectors = Vec::new();
    if !cfg.logs.is_empty() {
        let (sources, sink, dir, stop) = (
            cfg.logs.clone(),
            sink.clone(),
            cfg.state_dir.clone(),
            stop_rx.clone(),
        );
        collectors.push((
            "files",
            tokio::spawn(async move {
                let options = files::FilesOptions::default();
                if let Err(err) = files::run(&sources, sink, &dir, options, stop).await {
                    warn!(error = %err, "The log-file collector stopped.");
                }
            }),
        ));
    }
    for source in &cfg.journal {
        let (source, sink, dir, stop) = (
            source.clone(),
            sink.clone(),
            cfg.state_dir.clone(),
            stop_rx.clone(),
        );
        collectors.push((
            "journal",
            tokio::spawn(async move {
                let options = journal::JournalOptions::default();
                journal::run(&source, sink, &dir, options, stop).await;
            }),
        ));
    }
    // ---- Redis collector (agent/src/logs/redis) ----------------------------------------
    if let Some(redis_cfg) = cfg.redis.clone() {
        let (sink, dir, stop) = (sink.clone(), cfg.state_dir.clone(), stop_rx.clone());
        collectors.push((
            "redis",
            tokio::spawn(crate::logs::redis::run(redis_cfg, sink, dir, stop)),
        ));
    }
    // -------------------------------------------------------------------------------------
    Ok(Some(Handles {
        shipper,
        sink,
        stop,
        collectors,
    }))
}

impl Handles {
    /// The shipper's counters.
    pub fn ship_stats(&self) -> &std::sync::Arc<ship::ShipStats> {
        self.shipper.stats()
    }

    /// A sink into the shipper, for lines the agent makes itself (flow events).
    pub fn sink(&self) -> Sink {
        self.sink.clone()
    }

    /// Stops the collectors (each finishes the batch it is queueing and saves its position),
    /// then the shipper. Whatever is still queued is sent after the next start.
    pub async fn shutdown(self) {
        drop(self.sink);
        let _ = self.stop.send(true);
        for (name, mut task) in self.collectors {
            if tokio::time::timeout(COLLECTOR_GRACE, &mut task)
                .await
                .is_err()
            {
                warn!(
                    collector = name,
                    "A log collector did not stop in time; stopped."
                );
                task.abort();
            }
        }
        self.shipper.shutdown().await;
    }
}
