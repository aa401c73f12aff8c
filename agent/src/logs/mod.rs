//! Service log collection and shipping.
//!
//! Collectors (log files, the systemd journal, Redis) read lines and hand them to a [`Sink`];
//! the shipper behind it appends them to the on-disk queue (`spool`) and sends them to the
//! server as RFC 5424 over TLS. A collector's [`Sink::send`] returns once its lines are durably
//! queued, so a collector that remembers where it is (a file offset, the last `ACL LOG` entry)
//! saves that position only after `send` returned: nothing is read twice or skipped across
//! restarts. While the queue is full `send` waits (collectors pause; nothing is dropped).

use tokio::sync::{mpsc, oneshot};

pub mod redis;

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
