//! Verdict reporting: verdicts go to an on-disk queue ([`spool`]) before [`Reporter::submit`]
//! returns, and a background task sends them to the manager (`POST /api/v1/verdicts`) in
//! authenticated batches, in order, until each is stored or set aside; nothing is lost while the
//! manager is unreachable, across restarts, or when it refuses a verdict.
//!
//! - **De-duplication**: the detector may produce the same verdict (same `id`) again, e.g. when
//!   a window is re-evaluated; the last [`RECENT_IDS`] ids submitted are remembered and repeats
//!   dropped before they are queued. What slips through (a repeat after a restart) is harmless:
//!   ids are the manager's idempotency keys.
//! - **Delivery**: at least once from the queue (a batch is acked only after a 2xx), exactly
//!   once in the manager thanks to the ids.
//! - **Retries**: network errors, 5xx, 429, 401/403 (a wrong or revoked credential: logged as
//!   errors, since only an operator can fix it) and any other unexpected status are retried
//!   with exponential backoff (250 ms doubling to 30 s, full jitter); the batch stays queued.
//! - **Refusals**: a 400 (or 413/422) means the manager will never take the batch as it is (a
//!   bug in this server or a version mismatch): the batch is bisected until the refused
//!   verdicts are isolated; each is appended with the manager's message to
//!   `<queue dir>/rejected.jsonl`, then acked, and the rest is delivered.
//! - **Shutdown**: [`Reporter::shutdown`] sends what it can for a few seconds, then stops; the
//!   queue keeps the rest for the next start.
//!
//! The queue holds one JSON verdict per record; a batch body is those records joined, so a
//! retried batch is byte-for-byte what was queued.

use std::{
    collections::{HashSet, VecDeque},
    fs::{self, OpenOptions},
    hash::{BuildHasher as _, Hasher as _},
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ipnet::IpNet;
use reqwest::{
    StatusCode, Url,
    header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue},
};
use serde::Deserialize;
use spool::{Position, Spool, SpoolError, SpoolOptions};
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
    time::Instant,
};

use crate::{
    config::{ManagerConfig, QueueConfig},
    verdict::Verdict,
};

/// Gauge: verdicts in the queue, not yet stored by the manager.
pub const VERDICTS_QUEUED: &str = "mirage_server_verdicts_queued";
/// Counter: verdicts the manager acknowledged (stored, or already stored).
pub const VERDICTS_SENT: &str = "mirage_server_verdicts_sent_total";
/// Counter: verdicts the manager refused, set aside in `rejected.jsonl`.
pub const VERDICTS_REJECTED: &str = "mirage_server_verdicts_rejected_total";
/// Counter: failures, by `kind`: `network`, `server` (5xx), `throttled` (429), `auth`
/// (401/403), `status` (another unexpected status), `queue_full`, `queue` (disk),
/// `rejected_file`.
pub const REPORT_ERRORS: &str = "mirage_server_report_errors_total";

/// How many submitted ids are remembered for de-duplication.
pub const RECENT_IDS: usize = 100_000;
/// Name of the file refused verdicts are set aside in, in the queue directory.
pub const REJECTED_FILE: &str = "rejected.jsonl";
/// First retry delay (before jitter).
const BACKOFF_START: Duration = Duration::from_millis(250);
/// Longest retry delay.
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// How long [`Reporter::shutdown`] keeps sending.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);
/// Largest request body, in verdict bytes (the manager takes up to 16 MiB).
const MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Queue segment size: small queues get small segments, so that the disk bound stays close to
/// `max_bytes`.
const MAX_SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// Longest manager error message kept.
const MAX_ERROR_TEXT: usize = 2048;

/// Errors of the reporter.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The credential file could not be read.
    #[error("reading the manager credential {}", .path.display())]
    CredentialRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The credential file holds nothing.
    #[error("the manager credential file {} is empty", .path.display())]
    CredentialEmpty {
        /// The file.
        path: PathBuf,
    },
    /// The credential cannot be sent in a header (control characters).
    #[error("the manager credential in {} is not a valid header value", .path.display())]
    CredentialInvalid {
        /// The file.
        path: PathBuf,
    },
    /// The CA file could not be read.
    #[error("reading the manager CA {}", .path.display())]
    CaRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The CA file holds no usable certificate.
    #[error("the manager CA {} holds no usable PEM certificate", .path.display())]
    Ca {
        /// The file.
        path: PathBuf,
        /// The parser's error, if it gave one.
        #[source]
        source: Option<reqwest::Error>,
    },
    /// The manager URL is unusable.
    #[error("manager.url `{url}`: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// Why.
        reason: &'static str,
    },
    /// The HTTP client could not be built.
    #[error("building the HTTP client")]
    Client(#[source] reqwest::Error),
    /// Not called within a Tokio runtime.
    #[error("the reporter must be started within a Tokio runtime")]
    NoRuntime,
    /// The queue could not be opened, read or written.
    #[error("verdict queue")]
    Queue(#[source] SpoolError),
    /// The queue is full: these verdicts were not queued (the queued ones are kept).
    #[error(
        "the verdict queue {} is full ({queued} of {max_bytes} bytes): {refused} verdicts not queued",
        .dir.display()
    )]
    Full {
        /// The queue directory.
        dir: PathBuf,
        /// Verdicts refused.
        refused: usize,
        /// Bytes queued.
        queued: u64,
        /// The bound (`queue.max_bytes`).
        max_bytes: u64,
    },
    /// A verdict could not be encoded.
    #[error("encoding a verdict")]
    Encode(#[source] serde_json::Error),
    /// A request got no answer.
    #[error("request to {url}")]
    Request {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The manager answered with an error status.
    #[error("{url} answered {status}: {message}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: u16,
        /// The manager's message.
        message: String,
    },
    /// The answer could not be read or parsed.
    #[error("reading the answer of {url}")]
    Reply {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// A blocking queue task panicked or was cancelled.
    #[error("verdict queue task")]
    Task(#[source] tokio::task::JoinError),
}

/// Sends verdicts to the manager through an on-disk queue. Cheap to clone; the background
/// task stops (after a short flush) when [`Self::shutdown`] is called or every clone is dropped.
#[derive(Debug, Clone)]
pub struct Reporter {
    handle: Arc<Handle>,
}

/// Signals the sender task to stop when the last [`Reporter`] clone goes.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
    }
}

/// What the submitters and the sender task share.
#[derive(Debug)]
struct Shared {
    spool: Mutex<Spool>,
    recent: Mutex<RecentIds>,
    wake: Notify,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
    client: reqwest::Client,
    verdicts_url: Url,
    allowlists_url: Url,
    auth: HeaderValue,
    batch_max: usize,
    rejected: PathBuf,
}

/// The manager's answer to a batch.
#[derive(Debug, Deserialize)]
struct Outcome {
    accepted: u64,
    duplicates: u64,
    allowlisted: u64,
}

/// The manager's answer to `GET /api/v1/allowlists`.
#[derive(Debug, Deserialize)]
struct Allowlists {
    networks: Vec<IpNet>,
    revision: i64,
}

impl Reporter {
    /// Opens the queue in `queue.dir` (checking every queued record: this blocks, at start
    /// only), reads the credential, builds the HTTPS client and starts the sender task, which
    /// begins with whatever an earlier run left queued.
    ///
    /// # Errors
    ///
    /// If the queue cannot be opened (another process has it: [`SpoolError::Locked`]), the
    /// credential file is unreadable or empty, the CA file is unusable, the URL is not
    /// `https://` (or `http://` to a loopback address), or there is no Tokio runtime.
    pub fn start(manager: &ManagerConfig, queue: &QueueConfig) -> Result<Self, ReportError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ReportError::NoRuntime)?;
        let base = base_url(&manager.url)?;
        let url_err = |reason| ReportError::Url {
            url: manager.url.clone(),
            reason,
        };
        let verdicts_url = base
            .join("api/v1/verdicts")
            .map_err(|_| url_err("cannot be joined with api/v1/verdicts"))?;
        let allowlists_url = base
            .join("api/v1/allowlists")
            .map_err(|_| url_err("cannot be joined with api/v1/allowlists"))?;
        let auth = read_credential(&manager.credential_file)?;
        let client = client(manager.ca.as_deref())?;
        let options = SpoolOptions {
            max_bytes: queue.max_bytes,
            segment_bytes: (queue.max_bytes / 16).clamp(64 * 1024, MAX_SEGMENT_BYTES),
            sync: true,
        };
        let spool = Spool::open(&queue.dir, options).map_err(ReportError::Queue)?;
        let queued = spool.stats().records;
        metrics::gauge!(VERDICTS_QUEUED).set(queued as f64);
        if queued > 0 {
            tracing::info!(
                queue = %queue.dir.display(),
                verdicts = queued,
                "Verdicts queued by an earlier run will be sent first."
            );
        }
        let (stop, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            spool: Mutex::new(spool),
            recent: Mutex::new(RecentIds::new(RECENT_IDS)),
            wake: Notify::new(),
            stop,
            task: Mutex::new(None),
            client,
            verdicts_url,
            allowlists_url,
            auth,
            batch_max: manager.batch_max.clamp(1, 1000),
            rejected: queue.dir.join(REJECTED_FILE),
        });
        let task = runtime.spawn(send_loop(shared.clone(), stop_rx));
        *lock(&shared.task) = Some(task);
        Ok(Self {
            handle: Arc::new(Handle { shared }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Queues verdicts (durably: on disk and synced before this returns), dropping any whose id
    /// was submitted recently, and wakes the sender.
    ///
    /// # Errors
    ///
    /// [`ReportError::Full`] when the queue has no room for them (none is queued; count and
    /// log it); [`ReportError::Queue`] if the disk fails.
    pub async fn submit(&self, verdicts: Vec<Verdict>) -> Result<(), ReportError> {
        if verdicts.is_empty() {
            return Ok(());
        }
        let shared = self.shared().clone();
        let queued = tokio::task::spawn_blocking(move || shared.enqueue(verdicts))
            .await
            .map_err(ReportError::Task)??;
        if queued > 0 {
            self.shared().wake.notify_one();
        }
        Ok(())
    }

    /// Verdicts in the queue, not yet acknowledged by the manager.
    pub fn queued(&self) -> u64 {
        lock(&self.shared().spool).stats().records
    }

    /// The union of every agent group's allowlist (`GET /api/v1/allowlists`): sources never to
    /// flag.
    ///
    /// # Errors
    ///
    /// If the manager cannot be reached, refuses the credential, or answers something else.
    pub async fn fetch_allowlists(&self) -> Result<Vec<IpNet>, ReportError> {
        let shared = self.shared();
        let url = shared.allowlists_url.to_string();
        let resp = shared
            .client
            .get(shared.allowlists_url.clone())
            .header(AUTHORIZATION, shared.auth.clone())
            .send()
            .await
            .map_err(|source| ReportError::Request {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let message = error_message(resp).await;
            return Err(ReportError::Status {
                url,
                status: status.as_u16(),
                message,
            });
        }
        let body: Allowlists = resp
            .json()
            .await
            .map_err(|source| ReportError::Reply { url, source })?;
        tracing::debug!(
            networks = body.networks.len(),
            revision = body.revision,
            "Fetched the manager's allowlists."
        );
        Ok(body.networks)
    }

    /// Stops the sender after sending what it can within a few seconds; the queue keeps the
    /// rest for the next start. Other clones can still submit (to the queue) until dropped.
    pub async fn shutdown(self) {
        let shared = self.shared().clone();
        shared.stop.send_replace(true);
        let task = lock(&shared.task).take();
        if let Some(task) = task {
            let abort = task.abort_handle();
            match tokio::time::timeout(SHUTDOWN_FLUSH + Duration::from_secs(1), task).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => tracing::error!(error = %err, "Verdict sender task failed."),
                Err(_) => {
                    abort.abort();
                    tracing::warn!("Verdict sender did not stop in time; stopped it.");
                }
            }
        }
        let left = lock(&shared.spool).stats().records;
        if left > 0 {
            tracing::info!(verdicts = left, "Verdicts left queued for the next start.");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the spool consistent (its state changes only after
    // each write succeeded), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The manager URL, checked: `https://`, or `http://` only to a loopback host; with a trailing
/// slash so that `join` appends.
fn base_url(url: &str) -> Result<Url, ReportError> {
    let err = |reason| ReportError::Url {
        url: url.to_owned(),
        reason,
    };
    let mut parsed = Url::parse(url).map_err(|_| err("not a URL"))?;
    let host = parsed.host_str().ok_or_else(|| err("has no host"))?;
    match parsed.scheme() {
        "https" => {}
        "http" => {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = bare.eq_ignore_ascii_case("localhost")
                || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(err(
                    "plain http:// is allowed only to a loopback address (the credential and \
                     the verdicts would cross the network in clear); use https://",
                ));
            }
        }
        _ => {
            return Err(err(
                "must start with https:// (or http:// to a loopback address)",
            ));
        }
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(err("must not have a query or fragment"));
    }
    if !parsed.path().ends_with('/') {
        let path = format!("{}/", parsed.path());
        parsed.set_path(&path);
    }
    Ok(parsed)
}

/// Reads the credential (one line, trimmed) as a sensitive `Bearer` header value.
fn read_credential(path: &Path) -> Result<HeaderValue, ReportError> {
    let read_err = |source| ReportError::CredentialRead {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(read_err)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "The manager credential file is readable by group or others; chmod 600 it."
        );
    }
    let text = fs::read_to_string(path).map_err(read_err)?;
    let credential = text.trim();
    if credential.is_empty() {
        return Err(ReportError::CredentialEmpty {
            path: path.to_owned(),
        });
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {credential}")).map_err(|_| {
        ReportError::CredentialInvalid {
            path: path.to_owned(),
        }
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// The HTTPS client: rustls with the web PKI roots plus `ca`, no redirects (the credential is
/// for the configured manager only), bounded connect and request times.
fn client(ca: Option<&Path>) -> Result<reqwest::Client, ReportError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("mirage-server/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca {
        let pem = fs::read(path).map_err(|source| ReportError::CaRead {
            path: path.to_owned(),
            source,
        })?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| ReportError::Ca {
                path: path.to_owned(),
                source: Some(source),
            })?;
        if certs.is_empty() {
            return Err(ReportError::Ca {
                path: path.to_owned(),
                source: None,
            });
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(ReportError::Client)
}

/// The manager's `{"error": ...}` message, or the start of the body.
async fn error_message(resp: reqwest::Response) -> String {
    let text = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or(text);
    truncate(message, MAX_ERROR_TEXT)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

impl Shared {
    /// De-duplicates and appends (blocking; called through `spawn_blocking`). Returns how many
    /// were queued.
    fn enqueue(&self, verdicts: Vec<Verdict>) -> Result<usize, ReportError> {
        // The recent-ids lock is held across the append, so two submitters of the same id
        // cannot both queue it.
        let mut recent = lock(&self.recent);
        let mut batch_ids: HashSet<&str> = HashSet::with_capacity(verdicts.len());
        let mut fresh: Vec<&Verdict> = Vec::with_capacity(verdicts.len());
        for v in &verdicts {
            if !recent.contains(&v.id) && batch_ids.insert(&v.id) {
                fresh.push(v);
            }
        }
        let repeated = verdicts.len() - fresh.len();
        if repeated > 0 {
            tracing::debug!(repeated, "Dropped verdicts submitted recently.");
        }
        if fresh.is_empty() {
            return Ok(0);
        }
        let records = fresh
            .iter()
            .map(serde_json::to_vec)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ReportError::Encode)?;
        let refs: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
        let mut spool = lock(&self.spool);
        match spool.append_batch(&refs) {
            Ok(_) => {}
            Err(SpoolError::Full {
                dir,
                queued,
                max_bytes,
                ..
            }) => {
                metrics::counter!(REPORT_ERRORS, "kind" => "queue_full").increment(1);
                return Err(ReportError::Full {
                    dir,
                    refused: fresh.len(),
                    queued,
                    max_bytes,
                });
            }
            Err(err) => {
                metrics::counter!(REPORT_ERRORS, "kind" => "queue").increment(1);
                return Err(ReportError::Queue(err));
            }
        }
        metrics::gauge!(VERDICTS_QUEUED).set(spool.stats().records as f64);
        drop(spool);
        for v in &fresh {
            recent.insert(&v.id);
        }
        Ok(fresh.len())
    }

    /// The next batch (oldest first).
    async fn peek(self: &Arc<Self>) -> Result<Vec<(Position, Vec<u8>)>, ReportError> {
        let shared = self.clone();
        tokio::task::spawn_blocking(move || {
            lock(&shared.spool)
                .peek(shared.batch_max, MAX_REQUEST_BYTES)
                .map_err(ReportError::Queue)
        })
        .await
        .map_err(ReportError::Task)?
    }

    /// Consumes the queue up to `pos`.
    async fn ack(self: &Arc<Self>, pos: Position) -> Result<(), ReportError> {
        let shared = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut spool = lock(&shared.spool);
            spool.ack(pos).map_err(ReportError::Queue)?;
            metrics::gauge!(VERDICTS_QUEUED).set(spool.stats().records as f64);
            Ok(())
        })
        .await
        .map_err(ReportError::Task)?
    }

    /// Appends a refused verdict, with the manager's message, to `rejected.jsonl` (synced).
    async fn set_aside(
        self: &Arc<Self>,
        record: Vec<u8>,
        status: u16,
        message: String,
    ) -> Result<(), ReportError> {
        let path = self.rejected.clone();
        tokio::task::spawn_blocking(move || {
            let verdict =
                serde_json::from_slice::<serde_json::Value>(&record).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&record).into_owned())
                });
            let at = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            let mut line = serde_json::to_vec(&serde_json::json!({
                "at": at, "status": status, "error": message, "verdict": verdict,
            }))
            .map_err(ReportError::Encode)?;
            line.push(b'\n');
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| {
                    f.write_all(&line)?;
                    f.sync_data()
                })
                .map_err(|source| {
                    ReportError::Queue(SpoolError::Io {
                        op: "appending to",
                        path: path.clone(),
                        source,
                    })
                })
        })
        .await
        .map_err(ReportError::Task)?
    }
}

/// Why a batch was not delivered this time; it stays queued.
#[derive(Debug)]
struct Retry;

/// What one request did.
enum Sent {
    /// 2xx: stored (or already stored).
    Stored(Option<Outcome>),
    /// 400/413/422: never acceptable as it is.
    Refused { status: u16, message: String },
    /// Try again later.
    Retry,
}

/// The sender task: drain the queue to the manager, wait for submissions, back off on failure.
async fn send_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::default();
    let mut deadline: Option<Instant> = None;
    loop {
        if deadline.is_none() && *stop.borrow_and_update() {
            deadline = Some(Instant::now() + SHUTDOWN_FLUSH);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let result = match shared.peek().await {
            Ok(batch) if batch.is_empty() => {
                if deadline.is_some() {
                    break;
                }
                tokio::select! {
                    () = shared.wake.notified() => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            Ok(batch) => deliver(&shared, &batch, deadline).await,
            Err(err) => {
                metrics::counter!(REPORT_ERRORS, "kind" => "queue").increment(1);
                tracing::error!(error = %err, "Reading the verdict queue failed.");
                Err(Retry)
            }
        };
        match result {
            Ok(()) => {
                if backoff.failures > 0 {
                    tracing::info!(
                        failures = backoff.failures,
                        "Delivering verdicts to the manager again."
                    );
                }
                backoff = Backoff::default();
            }
            Err(Retry) => {
                if deadline.is_some() {
                    // Shutting down: what is left stays queued.
                    break;
                }
                let wait = backoff.next_delay();
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
    tracing::debug!("Verdict sender stopped.");
}

/// Sends a batch, bisecting it when the manager refuses it, and acks as it goes (in queue
/// order, so each ack covers exactly what is done).
async fn deliver(
    shared: &Arc<Shared>,
    batch: &[(Position, Vec<u8>)],
    deadline: Option<Instant>,
) -> Result<(), Retry> {
    // Ranges still to send, the next on top.
    let mut pending: Vec<std::ops::Range<usize>> = Vec::with_capacity(16);
    pending.push(0..batch.len());
    while let Some(range) = pending.pop() {
        let Some(part) = batch.get(range.clone()) else {
            continue;
        };
        let Some((last, _)) = part.last() else {
            continue;
        };
        match post(shared, part, deadline).await {
            Sent::Stored(outcome) => {
                if let Some(o) = &outcome {
                    tracing::debug!(
                        verdicts = part.len(),
                        accepted = o.accepted,
                        duplicates = o.duplicates,
                        allowlisted = o.allowlisted,
                        "Verdicts delivered."
                    );
                }
                metrics::counter!(VERDICTS_SENT).increment(part.len() as u64);
                ack(shared, *last).await?;
            }
            Sent::Refused { status, message } if part.len() > 1 => {
                tracing::debug!(
                    verdicts = part.len(),
                    status,
                    error = %message,
                    "Manager refused a batch; bisecting it."
                );
                let mid = range.start + part.len() / 2;
                pending.push(mid..range.end);
                pending.push(range.start..mid);
            }
            Sent::Refused { status, message } => {
                let record = part.first().map(|(_, r)| r.clone()).unwrap_or_default();
                let id = serde_json::from_slice::<Verdict>(&record)
                    .map(|v| v.id)
                    .unwrap_or_default();
                if let Err(err) = shared.set_aside(record, status, message.clone()).await {
                    metrics::counter!(REPORT_ERRORS, "kind" => "rejected_file").increment(1);
                    tracing::error!(
                        error = %err,
                        "Could not set a refused verdict aside; keeping it queued."
                    );
                    return Err(Retry);
                }
                metrics::counter!(VERDICTS_REJECTED).increment(1);
                tracing::error!(
                    id,
                    status,
                    error = %message,
                    file = %shared.rejected.display(),
                    "Manager refused a verdict; set aside."
                );
                ack(shared, *last).await?;
            }
            Sent::Retry => return Err(Retry),
        }
    }
    Ok(())
}

async fn ack(shared: &Arc<Shared>, pos: Position) -> Result<(), Retry> {
    shared.ack(pos).await.map_err(|err| {
        metrics::counter!(REPORT_ERRORS, "kind" => "queue").increment(1);
        tracing::error!(error = %err, "Acknowledging delivered verdicts in the queue failed.");
        Retry
    })
}

/// Just a queued verdict's id.
#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

/// `{"verdicts":[<record>,<record>,...]}`: the queued JSON as it is, without the records whose
/// id came earlier in the batch (the manager refuses a batch repeating an id; the repeat adds
/// nothing, the id being the idempotency key). Repeats reach the queue when the same verdict is
/// submitted again after a restart, which forgets the recent ids.
fn body(part: &[(Position, Vec<u8>)]) -> Vec<u8> {
    let len: usize = part.iter().map(|(_, r)| r.len() + 1).sum();
    let mut body = Vec::with_capacity(len + 16);
    body.extend_from_slice(b"{\"verdicts\":[");
    let mut ids = HashSet::with_capacity(part.len());
    let mut first = true;
    for (_, record) in part {
        // A record that does not parse goes as it is: the manager's 400 sets it aside.
        if let Ok(v) = serde_json::from_slice::<IdOnly>(record)
            && !ids.insert(v.id)
        {
            continue;
        }
        if !first {
            body.push(b',');
        }
        first = false;
        body.extend_from_slice(record);
    }
    body.extend_from_slice(b"]}");
    body
}

/// One `POST /api/v1/verdicts`, classified.
async fn post(
    shared: &Arc<Shared>,
    part: &[(Position, Vec<u8>)],
    deadline: Option<Instant>,
) -> Sent {
    let request = shared
        .client
        .post(shared.verdicts_url.clone())
        .header(AUTHORIZATION, shared.auth.clone())
        .header(CONTENT_TYPE, "application/json")
        .body(body(part))
        .send();
    let sent = match deadline {
        Some(d) => match tokio::time::timeout_at(d, request).await {
            Ok(sent) => sent,
            Err(_) => return Sent::Retry,
        },
        None => request.await,
    };
    let resp = match sent {
        Ok(resp) => resp,
        Err(err) => {
            metrics::counter!(REPORT_ERRORS, "kind" => "network").increment(1);
            tracing::warn!(
                url = %shared.verdicts_url,
                verdicts = part.len(),
                error = %ErrorChain(&err),
                "Manager unreachable; verdicts stay queued."
            );
            return Sent::Retry;
        }
    };
    let status = resp.status();
    if status.is_success() {
        return Sent::Stored(resp.json::<Outcome>().await.ok());
    }
    let message = error_message(resp).await;
    let code = status.as_u16();
    match status {
        StatusCode::BAD_REQUEST
        | StatusCode::PAYLOAD_TOO_LARGE
        | StatusCode::UNPROCESSABLE_ENTITY => Sent::Refused {
            status: code,
            message,
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            metrics::counter!(REPORT_ERRORS, "kind" => "auth").increment(1);
            tracing::error!(
                status = code,
                error = %message,
                "Manager refused the service credential (wrong or revoked?); verdicts stay \
                 queued."
            );
            Sent::Retry
        }
        StatusCode::TOO_MANY_REQUESTS => {
            metrics::counter!(REPORT_ERRORS, "kind" => "throttled").increment(1);
            tracing::warn!("Manager is throttling; verdicts stay queued.");
            Sent::Retry
        }
        s if s.is_server_error() => {
            metrics::counter!(REPORT_ERRORS, "kind" => "server").increment(1);
            tracing::warn!(
                status = code,
                error = %message,
                "Manager failed; verdicts stay queued."
            );
            Sent::Retry
        }
        _ => {
            metrics::counter!(REPORT_ERRORS, "kind" => "status").increment(1);
            tracing::error!(
                status = code,
                url = %shared.verdicts_url,
                error = %message,
                "Unexpected answer from the manager (is manager.url right?); verdicts stay \
                 queued."
            );
            Sent::Retry
        }
    }
}

/// An error with its sources, `a: b: c` (reqwest's own message hides the cause, e.g.
/// "connection refused").
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// Exponential backoff with full jitter: the n-th delay is uniform in
/// `0..=min(cap, start * 2^n)`, which spreads many servers retrying against one manager.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn ceiling(&self) -> Duration {
        let factor = 1u32 << self.failures.min(16);
        BACKOFF_START.saturating_mul(factor).min(BACKOFF_CAP)
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(random() % nanos.saturating_add(1))
    }
}

/// A random `u64` from the standard library's randomly keyed SipHash (enough for jitter; no
/// extra dependency).
fn random() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

/// The last `cap` ids, oldest evicted first.
#[derive(Debug)]
struct RecentIds {
    set: HashSet<Arc<str>>,
    order: VecDeque<Arc<str>>,
    cap: usize,
}

impl RecentIds {
    fn new(cap: usize) -> Self {
        Self {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    fn insert(&mut self, id: &str) {
        if self.cap == 0 || self.set.contains(id) {
            return;
        }
        if self.order.len() >= self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        let id: Arc<str> = Arc::from(id);
        self.set.insert(id.clone());
        self.order.push_back(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_or_loopback_http() {
        for (url, want) in [
            (
                "https://manager.example:8443",
                "https://manager.example:8443/api/v1/verdicts",
            ),
            (
                "https://manager.example/mirage",
                "https://manager.example/mirage/api/v1/verdicts",
            ),
            (
                "http://127.0.0.1:8443/",
                "http://127.0.0.1:8443/api/v1/verdicts",
            ),
            ("http://[::1]:8443", "http://[::1]:8443/api/v1/verdicts"),
            (
                "http://localhost:8443",
                "http://localhost:8443/api/v1/verdicts",
            ),
        ] {
            let base = base_url(url).unwrap();
            assert_eq!(base.join("api/v1/verdicts").unwrap().as_str(), want);
        }
        for (url, needle) in [
            ("http://manager.example:8443", "only to a loopback"),
            ("http://10.0.0.1", "only to a loopback"),
            ("ftp://manager.example", "must start with https://"),
            ("manager.example", "not a URL"),
            ("https://manager.example/?x=1", "query"),
        ] {
            let err = base_url(url).unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains("manager.url"),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn credentials_are_one_trimmed_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credential");
        fs::write(&path, "  abc123\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let value = read_credential(&path).unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer abc123");
        assert!(value.is_sensitive());
        fs::write(&path, " \n").unwrap();
        assert!(matches!(
            read_credential(&path),
            Err(ReportError::CredentialEmpty { .. })
        ));
        // Too open: accepted with a warning.
        fs::write(&path, "abc").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_credential(&path).is_ok());
        assert!(matches!(
            read_credential(&dir.path().join("missing")),
            Err(ReportError::CredentialRead { .. })
        ));
    }

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        fs::write(&path, "not a certificate").unwrap();
        assert!(matches!(client(Some(&path)), Err(ReportError::Ca { .. })));
        let cert = rcgen::generate_simple_self_signed(vec!["manager.example".to_owned()])
            .unwrap()
            .cert;
        fs::write(&path, cert.pem()).unwrap();
        client(Some(&path)).unwrap();
        client(None).unwrap();
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_full_jitter() {
        let mut b = Backoff::default();
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            let ceiling = b.ceiling();
            let delay = b.next_delay();
            assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(
            ceilings,
            [
                250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000, 30000
            ]
        );
        // Jitter: not always the same delay.
        let delays: HashSet<Duration> = (0..20)
            .map(|_| Backoff { failures: 5 }.next_delay())
            .collect();
        assert!(delays.len() > 1);
    }

    #[test]
    fn recent_ids_forget_the_oldest() {
        let mut r = RecentIds::new(3);
        for id in ["a", "b", "c", "a", "d"] {
            r.insert(id);
        }
        assert!(!r.contains("a"));
        assert!(r.contains("b") && r.contains("c") && r.contains("d"));
        assert_eq!(r.order.len(), 3);
    }

    #[test]
    fn batch_bodies_join_the_queued_json() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Spool::open(
            dir.path(),
            SpoolOptions {
                sync: false,
                ..SpoolOptions::default()
            },
        )
        .unwrap();
        q.append_batch(&[
            br#"{"id":"a"}"#,
            br#"{"id":"b","x":1}"#,
            br#"{"id":"a","x":2}"#,
            b"not json",
        ])
        .unwrap();
        let part = q.peek(10, usize::MAX).unwrap();
        assert_eq!(
            String::from_utf8(body(&part)).unwrap(),
            r#"{"verdicts":[{"id":"a"},{"id":"b","x":1},not json]}"#
        );
        assert_eq!(truncate("héllo".to_owned(), 2), "h…");
    }
}
