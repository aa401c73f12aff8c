//! The shipper: collected lines → the on-disk queue → the server, as RFC 5424 over TLS
//! (RFC 5425), each line exactly once and in order.
//!
//! ```text
//! collectors ──Sink──▶ appender ──append + fdatasync──▶ spool (state_dir/queue)
//!                        │ reply: durable                  │ peek          ▲ ack
//!                        ▼                                 ▼               │
//!                     (Full: wait for acks)          sender ──TLS──▶ server ──"ack N"──┘
//! ```
//!
//! * **Appender**: takes the requests of [`Sink::send`] (several at once when they queue up,
//!   so one `fdatasync` serves them all), encodes each line with
//!   [`syslog_wire::format_rfc5424_with`] (service, source path and sequence number in the
//!   `mirage@32473` element, the host in HOSTNAME), appends them to the spool and only then
//!   replies. While the spool is full (`queue_max_bytes`) it waits for acknowledgements instead
//!   of replying, so collectors pause and nothing is dropped.
//! * **Sequence numbers** are per agent, increasing, and stored in each queued record, so a
//!   resend carries the same number. They are reserved in blocks of [`SEQ_BLOCK`] in
//!   `state_dir/queue.seq` (one `fsync` per block, not per line); a restart skips the rest of
//!   the block. The first number of a run is at least the current Unix time in microseconds,
//!   so an agent whose state directory was lost starts above its old numbers (unless its clock
//!   went back, or it shipped more than a million lines a second on average).
//! * **Sender**: keeps one TLS connection with a client certificate; sends the queued records in
//!   order, at most a window ahead of the acknowledgements; reads `ack N` lines and moves the
//!   spool's consumer position past N (persisted at most every [`ShipOptions::ack_persist`]).
//!   After a disconnect it reconnects with full-jitter backoff (250 ms doubling to 30 s) and
//!   resends everything unacknowledged; the server drops numbers it already has. See the
//!   server's configuration reference for the protocol.
//!
//! Exactly once, precisely: nothing queued is lost while the server is away (up to
//! `queue_max_bytes`, then collectors wait), and a clean stop of either side doubles nothing.
//! Two crashes can double lines: a server that dies between handing messages to detection and
//! acknowledging them (at most 100 messages or 200 ms of this agent's traffic) gets them again,
//! as the new server process does not know their numbers; and an agent killed between a batch's
//! `fdatasync` here and its collector's position being saved reads that batch again after its
//! restart, and queues it under new numbers.
//!
//! Metrics: `mirage_agent_log_queue_records` and `mirage_agent_log_queue_bytes` (what waits on
//! disk), `mirage_agent_log_lines_queued_total`, `mirage_agent_log_lines_sent_total` (resends
//! included), `mirage_agent_log_lines_acked_total`, `mirage_agent_log_server_connected` (1 while
//! the connection is up) and `mirage_agent_log_connections_total`.

use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
};
use serde::{Deserialize, Serialize};
use spool::{Position, Spool, SpoolError, SpoolOptions};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
    sync::{Notify, mpsc, watch},
    task::JoinHandle,
    time::{sleep, timeout},
};
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use super::{LogLine, Request, Sink, SinkError, offsets};
use crate::config::links::ServerLink;

/// The queue's directory, under `state_dir`.
pub const QUEUE_DIR: &str = "queue";
/// The sequence-number reservation, under `state_dir`.
pub const SEQ_FILE: &str = "queue.seq";
/// Sequence numbers reserved at a time.
pub const SEQ_BLOCK: u64 = 1_000_000;
/// APP-NAME of shipped messages.
pub const APP_NAME: &str = "mirage-agent";

/// Batches waiting between the collectors and the appender.
const SINK_CAPACITY: usize = 64;
/// Most encoded bytes appended in one write (and one `fdatasync`).
const APPEND_MAX: usize = 4 * 1024 * 1024;

/// How the shipper behaves (the defaults are what `mirage-agent run` uses).
#[derive(Debug, Clone)]
pub struct ShipOptions {
    /// HOSTNAME of the messages. Default: this machine's host name.
    pub host: String,
    /// Spool options; `max_bytes` comes from `[server] queue_max_bytes`.
    pub spool: SpoolOptions,
    /// First reconnect delay (before jitter). Default 250 ms.
    pub backoff_min: Duration,
    /// Longest reconnect delay (before jitter). Default 30 s.
    pub backoff_max: Duration,
    /// TCP connect and TLS handshake limit. Default 10 s.
    pub connect_timeout: Duration,
    /// Most records sent and not yet acknowledged. Default 2000.
    pub window_records: usize,
    /// Most bytes sent and not yet acknowledged. Default 2 MiB.
    pub window_bytes: usize,
    /// With records in flight and no acknowledgement for this long, the connection is taken as
    /// dead and replaced. Default 60 s.
    pub ack_timeout: Duration,
    /// Least time between two persisted spool acknowledgements (each is an `fsync`). Default
    /// 100 ms.
    pub ack_persist: Duration,
}

impl Default for ShipOptions {
    fn default() -> Self {
        Self {
            host: host_name(),
            spool: SpoolOptions::default(),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            window_records: 2000,
            window_bytes: 2 * 1024 * 1024,
            ack_timeout: Duration::from_secs(60),
            ack_persist: Duration::from_millis(100),
        }
    }
}

/// This machine's host name (`/proc/sys/kernel/hostname`), or `-` (the NILVALUE).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".to_owned())
}

/// Errors starting the shipper.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// A PEM file could not be read or parsed.
    #[error("reading the {what} from {path}")]
    Pem {
        /// `CA certificate`, `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate is not a usable trust anchor.
    #[error("the CA certificate in {path} is unusable")]
    Ca {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the client certificate and key.
    #[error("the certificate {cert} and key {key} do not form a usable pair")]
    CertKey {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// `server_name` (or the host of `address`) is not a valid TLS server name.
    #[error("{name:?} is not a valid TLS server name")]
    ServerName {
        /// The name.
        name: String,
    },
    /// The queue could not be opened.
    #[error("opening the log queue")]
    Spool(#[source] SpoolError),
    /// The sequence-number file could not be read or written.
    #[error("reserving sequence numbers")]
    Seq(#[source] offsets::OffsetsError),
    /// A blocking start-up step panicked.
    #[error("the shipper's start-up task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// What the shipper has done, for logs, metrics and tests.
#[derive(Debug, Default)]
pub struct ShipStats {
    /// Lines queued since start.
    pub queued: AtomicU64,
    /// Records written to a connection since start (resends included).
    pub sent: AtomicU64,
    /// Records acknowledged by the server since start.
    pub acked: AtomicU64,
    /// Records in the queue, not yet acknowledged.
    pub queue_records: AtomicU64,
    /// Bytes in the queue (frames included).
    pub queue_bytes: AtomicU64,
    /// Connections made since start.
    pub connections: AtomicU64,
    /// Whether a connection is up.
    pub connected: AtomicBool,
}

/// The running shipper.
#[derive(Debug)]
pub struct Shipper {
    stop: watch::Sender<bool>,
    appender: JoinHandle<()>,
    sender: JoinHandle<()>,
    stats: Arc<ShipStats>,
}

/// Where the server is and how to talk to it.
#[derive(Clone)]
struct Target {
    address: String,
    name: ServerName<'static>,
    connector: TlsConnector,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("address", &self.address)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The sequence-number reservation file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SeqReservation {
    /// Every number up to this one may have been used.
    reserved: u64,
}

/// Numbers handed out by the appender.
#[derive(Debug)]
struct SeqGen {
    path: PathBuf,
    next: u64,
    reserved: u64,
}

impl SeqGen {
    fn open(path: PathBuf) -> Result<Self, offsets::OffsetsError> {
        let saved: SeqReservation = offsets::load(&path)?;
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let next = saved.reserved.saturating_add(1).max(now_us).max(1);
        let mut seqs = Self {
            path,
            next,
            reserved: next - 1,
        };
        seqs.reserve(0)?;
        Ok(seqs)
    }

    /// Makes sure `count` more numbers are reserved.
    fn reserve(&mut self, count: u64) -> Result<(), offsets::OffsetsError> {
        let last = self.next.saturating_add(count);
        if last <= self.reserved {
            return Ok(());
        }
        let reserved = last.saturating_add(SEQ_BLOCK);
        offsets::save(&self.path, &SeqReservation { reserved })?;
        self.reserved = reserved;
        Ok(())
    }
}

impl Shipper {
    /// Opens the queue in `state_dir/queue` and starts the appender and the sender; returns the
    /// sink collectors put lines into.
    ///
    /// # Errors
    ///
    /// Unreadable TLS files, a queue that cannot be opened (another agent has it), or a
    /// sequence-number file that cannot be written.
    pub async fn start(
        link: &ServerLink,
        state_dir: &Path,
        options: ShipOptions,
    ) -> Result<(Self, Sink), ShipError> {
        let target = target(link)?;
        let mut spool_options = options.spool.clone();
        spool_options.max_bytes = link.queue_max_bytes;
        let queue_dir = state_dir.join(QUEUE_DIR);
        let seq_path = state_dir.join(SEQ_FILE);
        let (spool, seq) = tokio::task::spawn_blocking(move || {
            let spool = Spool::open(&queue_dir, spool_options).map_err(ShipError::Spool)?;
            let seq = SeqGen::open(seq_path).map_err(ShipError::Seq)?;
            Ok::<_, ShipError>((spool, seq))
        })
        .await
        .map_err(ShipError::Task)??;
        let stats = Arc::new(ShipStats::default());
        let queued = spool.stats();
        stats.queue_records.store(queued.records, Ordering::Relaxed);
        stats.queue_bytes.store(queued.bytes, Ordering::Relaxed);
        if queued.records > 0 {
            info!(
                records = queued.records,
                bytes = queued.bytes,
                "Log lines queued before the restart will be sent first."
            );
        }
        let shared = Arc::new(Shared {
            spool: Mutex::new(spool),
            appended: Notify::new(),
            space: Notify::new(),
            stats: Arc::clone(&stats),
        });
        let (sink, rx) = Sink::channel(SINK_CAPACITY);
        let (stop, stop_rx) = watch::channel(false);
        let appender = tokio::spawn(run_appender(
            rx,
            Arc::clone(&shared),
            seq,
            options.host.clone(),
            stop_rx.clone(),
        ));
        let sender = tokio::spawn(run_sender(target, shared, options, stop_rx));
        Ok((
            Self {
                stop,
                appender,
                sender,
                stats,
            },
            sink,
        ))
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<ShipStats> {
        &self.stats
    }

    /// Stops: batches already waiting are still queued (their collectors get their answer),
    /// later ones get [`SinkError::Closed`]; the connection is closed. Unacknowledged records
    /// stay queued for the next start.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(err) = self.appender.await {
            warn!(error = %err, "The log appender task failed.");
        }
        if let Err(err) = self.sender.await {
            warn!(error = %err, "The log sender task failed.");
        }
    }
}

/// What the appender and the sender share.
#[derive(Debug)]
struct Shared {
    spool: Mutex<Spool>,
    /// Records were appended.
    appended: Notify,
    /// Records were acknowledged (room in the queue).
    space: Notify,
    stats: Arc<ShipStats>,
}

impl Shared {
    fn spool(&self) -> std::sync::MutexGuard<'_, Spool> {
        // Spool methods leave it consistent even when they fail, so a panic elsewhere while
        // holding the lock does not make it unusable.
        self.spool.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update_depth(&self, spool: &Spool) {
        let s = spool.stats();
        self.stats.queue_records.store(s.records, Ordering::Relaxed);
        self.stats.queue_bytes.store(s.bytes, Ordering::Relaxed);
        metrics::gauge!("mirage_agent_log_queue_records").set(s.records as f64);
        metrics::gauge!("mirage_agent_log_queue_bytes").set(s.bytes as f64);
    }
}

fn target(link: &ServerLink) -> Result<Target, ShipError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pem = |what, path: &Path| {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .map_err(|source| ShipError::Pem {
                what,
                path: path.to_owned(),
                source,
            })?;
        if certs.is_empty() {
            return Err(ShipError::NoCertificate {
                path: path.to_owned(),
            });
        }
        Ok(certs)
    };
    let mut roots = RootCertStore::empty();
    for ca in pem("CA certificate", &link.ca)? {
        roots.add(ca).map_err(|source| ShipError::Ca {
            path: link.ca.clone(),
            source,
        })?;
    }
    let chain = pem("certificate", &link.cert)?;
    let key = PrivateKeyDer::from_pem_file(&link.key).map_err(|source| ShipError::Pem {
        what: "private key",
        path: link.key.clone(),
        source,
    })?;
    let cert_key = |source| ShipError::CertKey {
        cert: link.cert.clone(),
        key: link.key.clone(),
        source,
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(cert_key)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(cert_key)?;
    let name = link.server_name.clone().unwrap_or_else(|| {
        let host = link
            .address
            .rsplit_once(':')
            .map_or(link.address.as_str(), |(h, _)| h);
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned()
    });
    let server_name =
        ServerName::try_from(name.clone()).map_err(|_| ShipError::ServerName { name })?;
    Ok(Target {
        address: link.address.clone(),
        name: server_name,
        connector: TlsConnector::from(Arc::new(config)),
    })
}

/// One queued record: the sequence number (8 bytes, little-endian), then the RFC 5424
/// message.
fn encode_record(seq: u64, host: &str, line: &LogLine) -> Vec<u8> {
    let seq_text = seq.to_string();
    let source_param = if line.source.starts_with('/') {
        "path"
    } else {
        "source"
    };
    let msg = syslog_wire::format_rfc5424_with(
        &line.service,
        host,
        APP_NAME,
        &line.line,
        line.read_at,
        &[
            (source_param, &line.source),
            (syslog_wire::SEQ_PARAM, &seq_text),
        ],
    );
    let mut out = Vec::with_capacity(8 + msg.len());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(msg.as_bytes());
    out
}

/// The sequence number and message of a queued record.
fn decode_record(record: &[u8]) -> Option<(u64, &[u8])> {
    let (seq, msg) = record.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*seq), msg))
}

async fn run_appender(
    mut rx: mpsc::Receiver<Request>,
    shared: Arc<Shared>,
    mut seq: SeqGen,
    host: String,
    mut stop: watch::Receiver<bool>,
) {
    let max_bytes = usize::try_from(shared.spool().options().max_bytes).unwrap_or(usize::MAX);
    // A batch never needs more than a quarter of the queue, so it fits once that much is
    // acknowledged.
    let chunk_max = APPEND_MAX.min(max_bytes / 4).max(1);
    let mut stopping = false;
    loop {
        let first = if stopping {
            match rx.try_recv() {
                Ok(r) => r,
                Err(_) => return,
            }
        } else {
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => r,
                    None => return,
                },
                _ = stop.changed() => {
                    // Batches already waiting are still queued; no more are taken.
                    rx.close();
                    stopping = true;
                    continue;
                }
            }
        };
        let mut group: Vec<Request> = vec![first];
        let mut raw: usize = group[0].0.iter().map(|l| l.line.len() + 128).sum();
        while raw < APPEND_MAX {
            match rx.try_recv() {
                Ok(r) => {
                    raw += r.0.iter().map(|l| l.line.len() + 128).sum::<usize>();
                    group.push(r);
                }
                Err(_) => break,
            }
        }
        // A collector that gave up waiting (it was stopped) will read these lines again.
        group.retain(|(_, done)| !done.is_closed());
        if group.is_empty() {
            continue;
        }
        let result = append_group(&shared, &mut seq, &host, &group, chunk_max, &mut stop).await;
        let lines: u64 = group.iter().map(|(l, _)| l.len() as u64).sum();
        match &result {
            Ok(()) => {
                shared.stats.queued.fetch_add(lines, Ordering::Relaxed);
                metrics::counter!("mirage_agent_log_lines_queued_total").increment(lines);
                shared.appended.notify_one();
            }
            Err(err) => warn!(error = %err, lines, "Queueing log lines failed."),
        }
        for (_, done) in group {
            let answer = match &result {
                Ok(()) => Ok(()),
                Err(SinkError::Closed) => Err(SinkError::Closed),
                Err(SinkError::Queue(msg)) => Err(SinkError::Queue(msg.clone())),
            };
            let _ = done.send(answer);
        }
    }
}

/// Encodes and appends a group of batches, waiting while the queue is full.
async fn append_group(
    shared: &Arc<Shared>,
    seq: &mut SeqGen,
    host: &str,
    group: &[Request],
    chunk_max: usize,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), SinkError> {
    let count: u64 = group.iter().map(|(l, _)| l.len() as u64).sum();
    if let Err(err) = seq.reserve(count) {
        return Err(SinkError::Queue(err.to_string()));
    }
    let mut records = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for (lines, _) in group {
        for line in lines {
            records.push(encode_record(seq.next, host, line));
            seq.next += 1;
        }
    }
    let mut start = 0;
    while start < records.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < records.len() && (end == start || bytes + records[end].len() <= chunk_max) {
            bytes += records[end].len();
            end += 1;
        }
        loop {
            let chunk: Vec<Vec<u8>> = records[start..end].to_vec();
            let shared2 = Arc::clone(shared);
            let appended = tokio::task::spawn_blocking(move || {
                let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
                let mut spool = shared2.spool();
                let r = spool.append_batch(&refs);
                shared2.update_depth(&spool);
                r
            })
            .await;
            match appended {
                Ok(Ok(_)) => break,
                Ok(Err(SpoolError::Full { .. })) => {
                    debug!("The log queue is full; collectors wait for the server.");
                    // Woken by an acknowledgement; the timeout covers a wake-up that came
                    // before we waited.
                    tokio::select! {
                        () = shared.space.notified() => {}
                        () = sleep(Duration::from_millis(250)) => {}
                        _ = stop.changed() => {}
                    }
                    if *stop.borrow() {
                        return Err(SinkError::Closed);
                    }
                }
                Ok(Err(err)) => return Err(SinkError::Queue(err.to_string())),
                Err(err) => return Err(SinkError::Queue(err.to_string())),
            }
        }
        start = end;
    }
    Ok(())
}

/// Full-jitter backoff: a random delay up to the current step; the step doubles to the cap.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
    rng: u64,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        Self {
            min,
            max,
            step: min,
            rng: seed | 1,
        }
    }

    fn reset(&mut self) {
        self.step = self.min;
    }

    fn next_delay(&mut self) -> Duration {
        // xorshift64*: enough to spread reconnects of many agents; nothing secret here.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let fraction = (r >> 11) as f64 / (1u64 << 53) as f64;
        let delay = self.step.mul_f64(fraction);
        self.step = (self.step * 2).min(self.max);
        delay
    }
}

async fn run_sender(
    target: Target,
    shared: Arc<Shared>,
    options: ShipOptions,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(options.backoff_min, options.backoff_max);
    let mut failures: u64 = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        match connect(&target, options.connect_timeout).await {
            Ok(stream) => {
                shared.stats.connections.fetch_add(1, Ordering::Relaxed);
                shared.stats.connected.store(true, Ordering::Relaxed);
                metrics::counter!("mirage_agent_log_connections_total").increment(1);
                metrics::gauge!("mirage_agent_log_server_connected").set(1.0);
                if failures > 0 {
                    info!(address = %target.address, failures, "Connected to the server again.");
                } else {
                    debug!(address = %target.address, "Connected to the server.");
                }
                failures = 0;
                let progressed = session(stream, &shared, &options, &mut stop).await;
                shared.stats.connected.store(false, Ordering::Relaxed);
                metrics::gauge!("mirage_agent_log_server_connected").set(0.0);
                if progressed {
                    backoff.reset();
                }
            }
            Err(err) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    warn!(
                        address = %target.address,
                        error = %err,
                        failures,
                        "Cannot reach the server; log lines stay queued on disk."
                    );
                }
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            () = sleep(delay) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn connect(
    target: &Target,
    limit: Duration,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    timeout(limit, async {
        let tcp = TcpStream::connect(&target.address).await?;
        tcp.set_nodelay(true)?;
        target.connector.connect(target.name.clone(), tcp).await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Records sent on this connection and not yet acknowledged.
#[derive(Debug, Default)]
struct InFlight {
    records: VecDeque<(u64, Position, usize)>,
    bytes: usize,
}

/// Sends queued records and reads acknowledgements until the connection ends or `stop`;
/// returns whether anything was acknowledged.
async fn session(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    shared: &Arc<Shared>,
    options: &ShipOptions,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let (read, mut write) = tokio::io::split(stream);
    let mut acks = BufReader::new(read).lines();
    let mut inflight = InFlight::default();
    let mut last_sent: Option<Position> = None;
    let mut to_persist: Option<Position> = None;
    let mut last_persist = Instant::now();
    let mut last_progress = Instant::now();
    let mut progressed = false;
    let end = loop {
        // Fill the window (refilling only below half of it, so each peek re-reads at most as
        // much as it brings).
        if inflight.records.len() <= options.window_records / 2
            && inflight.bytes <= options.window_bytes / 2
        {
            match fill(shared, options, &inflight, last_sent).await {
                Ok(batch) if !batch.is_empty() => {
                    let mut frames = Vec::new();
                    for (pos, record) in &batch {
                        let Some((seq, msg)) = decode_record(record) else {
                            continue;
                        };
                        frames.extend_from_slice(msg.len().to_string().as_bytes());
                        frames.push(b' ');
                        frames.extend_from_slice(msg);
                        inflight.records.push_back((seq, *pos, record.len()));
                        inflight.bytes += record.len();
                        last_sent = Some(*pos);
                    }
                    if inflight.records.len() == batch.len() {
                        last_progress = Instant::now();
                    }
                    let written = timeout(options.ack_timeout, async {
                        write.write_all(&frames).await?;
                        write.flush().await
                    })
                    .await;
                    match written {
                        Ok(Ok(())) => {
                            shared
                                .stats
                                .sent
                                .fetch_add(batch.len() as u64, Ordering::Relaxed);
                            metrics::counter!("mirage_agent_log_lines_sent_total")
                                .increment(batch.len() as u64);
                            continue;
                        }
                        Ok(Err(err)) => break format!("write failed: {err}"),
                        Err(_) => break "write timed out".to_owned(),
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    warn!(error = %err, "Reading the log queue failed; retrying.");
                    tokio::select! {
                        () = sleep(Duration::from_secs(1)) => continue,
                        _ = stop.changed() => break "stopping".to_owned(),
                    }
                }
            }
        }
        let persist_in = options.ack_persist.saturating_sub(last_persist.elapsed());
        let ack_wait = options.ack_timeout.saturating_sub(last_progress.elapsed());
        let room = inflight.records.len() < options.window_records
            && inflight.bytes < options.window_bytes;
        tokio::select! {
            _ = stop.changed() => break "stopping".to_owned(),
            line = acks.next_line() => match line {
                Ok(Some(line)) => {
                    let Some(n) = line.strip_prefix("ack ").and_then(|n| n.trim().parse::<u64>().ok()) else {
                        debug!(line, "Ignored an unexpected line from the server.");
                        continue;
                    };
                    let mut count = 0u64;
                    while let Some(&(seq, pos, len)) = inflight.records.front() {
                        if seq > n {
                            break;
                        }
                        inflight.records.pop_front();
                        inflight.bytes -= len;
                        to_persist = Some(pos);
                        count += 1;
                    }
                    if count > 0 {
                        shared.stats.acked.fetch_add(count, Ordering::Relaxed);
                        metrics::counter!("mirage_agent_log_lines_acked_total").increment(count);
                        progressed = true;
                        last_progress = Instant::now();
                    }
                }
                Ok(None) => break "the server closed the connection".to_owned(),
                Err(err) => break format!("read failed: {err}"),
            },
            () = shared.appended.notified(), if room => {}
            () = sleep(persist_in), if to_persist.is_some() => {
                if let Some(pos) = to_persist.take() {
                    persist_ack(shared, pos).await;
                    last_persist = Instant::now();
                }
            }
            () = sleep(ack_wait), if !inflight.records.is_empty() => {
                break "no acknowledgement in time".to_owned();
            }
        }
    };
    if let Some(pos) = to_persist {
        persist_ack(shared, pos).await;
    }
    if end != "stopping" {
        debug!(reason = %end, unacked = inflight.records.len(), "Connection to the server ended; unacknowledged lines will be resent.");
    }
    let _ = timeout(Duration::from_secs(1), write.shutdown()).await;
    progressed
}

/// The next records after `last_sent`, up to the window.
async fn fill(
    shared: &Arc<Shared>,
    options: &ShipOptions,
    inflight: &InFlight,
    last_sent: Option<Position>,
) -> Result<Vec<(Position, Vec<u8>)>, String> {
    let skip = inflight.records.len();
    let want = options.window_records - skip.min(options.window_records);
    let want_bytes = options.window_bytes.saturating_sub(inflight.bytes);
    let max_records = skip + want;
    let max_bytes = inflight.bytes + want_bytes;
    let shared = Arc::clone(shared);
    let peeked = tokio::task::spawn_blocking(move || shared.spool().peek(max_records, max_bytes))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(peeked
        .into_iter()
        .filter(|(pos, _)| last_sent.is_none_or(|last| *pos > last))
        .collect())
}

/// Moves the spool's consumer position to `pos` (persisted), freeing room.
async fn persist_ack(shared: &Arc<Shared>, pos: Position) {
    let shared2 = Arc::clone(shared);
    let acked = tokio::task::spawn_blocking(move || {
        let mut spool = shared2.spool();
        let r = spool.ack(pos);
        shared2.update_depth(&spool);
        r
    })
    .await;
    match acked {
        Ok(Ok(())) => shared.space.notify_one(),
        Ok(Err(err)) => {
            warn!(error = %err, "Recording acknowledged log lines failed; they may be sent again.")
        }
        Err(err) => warn!(error = %err, "Recording acknowledged log lines failed."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(source: &str, text: &str) -> LogLine {
        LogLine {
            service: "sshd".to_owned(),
            source: source.to_owned(),
            line: text.to_owned(),
            read_at: 1_795_831_163,
        }
    }

    #[test]
    fn records_carry_the_number_and_the_message() {
        let rec = encode_record(42, "web-1", &line("/var/log/auth.log", "Failed password"));
        let (seq, msg) = decode_record(&rec).unwrap();
        assert_eq!(seq, 42);
        assert_eq!(
            std::str::from_utf8(msg).unwrap(),
            "<14>1 2026-11-28T01:59:23Z web-1 mirage-agent - - [mirage@32473 service=\"sshd\" path=\"/var/log/auth.log\" seq=\"42\"] Failed password"
        );
        let rec = encode_record(7, "h", &line("journal:ssh.service", "x"));
        let msg = String::from_utf8(decode_record(&rec).unwrap().1.to_vec()).unwrap();
        assert!(
            msg.contains("source=\"journal:ssh.service\" seq=\"7\""),
            "{msg}"
        );
        assert_eq!(decode_record(b"short"), None);
    }

    #[test]
    fn sequence_numbers_survive_restarts_and_lost_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SEQ_FILE);
        let mut seqs = SeqGen::open(path.clone()).unwrap();
        let first = seqs.next;
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        assert!(
            first <= now_us && first > now_us - 60_000_000,
            "time-based start"
        );
        seqs.reserve(10).unwrap();
        seqs.next += 10;
        // A restart never reuses a number, even one reserved but unused.
        let again = SeqGen::open(path.clone()).unwrap();
        assert!(again.next > first + 10);
        assert!(again.next > seqs.reserved);
        // A reservation beyond the block is written before use.
        let mut seqs = again;
        let before = seqs.reserved;
        seqs.reserve(SEQ_BLOCK * 2).unwrap();
        assert!(seqs.reserved >= seqs.next + SEQ_BLOCK * 2);
        assert!(seqs.reserved > before);
        let on_disk: SeqReservation = offsets::load(&path).unwrap();
        assert_eq!(on_disk.reserved, seqs.reserved);
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut max_seen = Duration::ZERO;
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(30));
            max_seen = max_seen.max(d);
        }
        assert_eq!(b.step, Duration::from_secs(30));
        assert!(max_seen > Duration::from_millis(250), "it grows");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(250));
    }
}
