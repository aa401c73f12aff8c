//! The Redis collector: a `MONITOR` client and periodic `ACL LOG` reads.
//!
//! `MONITOR` alone misses what matters most: Redis never feeds it administrative commands
//! (`CONFIG`, `SAVE`, `REPLICAOF`, `MODULE`, `FLUSHALL`...) and it cannot tell a failed `AUTH`
//! from a good one (see the corpus MANIFEST). `ACL LOG` records every failed `AUTH` and ACL
//! denial with the client's address; the Redis log file (collected by the file collector, a
//! `[[logs]] service = "redis"` entry) names the clients behind `REPLICAOF` and the last command
//! of every closing connection. Together they cover what the server's `redis` rule pack needs.
//!
//! Two connections run side by side, each with its own reconnect loop (exponential backoff
//! from 250 ms to 30 s with full jitter, reset once connected): one sends `AUTH` and `MONITOR`
//! and ships every line (source `redis:monitor`), the other sends `ACL LOG 1024` every
//! `acl_log_secs` and ships only new or grown entries (source `redis:acl-log`; see [`acl`]).
//! The password is read from `password_file` at every connection attempt, so a rotated password
//! is picked up by the next reconnect.
//!
//! Metrics: `mirage_agent_redis_connected{conn="monitor"|"acl-log"}` (1 while that connection
//! is established), `mirage_agent_redis_lines_total{source="monitor"|"acl-log"}` (lines handed
//! to the shipper), `mirage_agent_redis_dropped_total` (`MONITOR` lines dropped because the
//! shipper did not keep up; see `monitor_session`) and `mirage_agent_redis_errors_total{kind}`
//! (see [`RedisError::kind`]).

mod acl;
mod conn;
mod monitor;
pub mod resp;

use std::{
    error::Error as _,
    fmt, io,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::{mpsc, watch};

use self::{
    acl::AclState,
    conn::{Conn, Credential, expect_ok, read_password},
    monitor::OwnConns,
    resp::{RespError, Value},
};
use super::{LogLine, Sink, SinkError};
use crate::config::links::RedisSource;

/// The service name the server's rules for these lines are filed under.
pub const SERVICE: &str = "redis";
/// [`LogLine::source`] of `MONITOR` lines.
pub const SOURCE_MONITOR: &str = "redis:monitor";
/// [`LogLine::source`] of `ACL LOG` entries.
pub const SOURCE_ACL_LOG: &str = "redis:acl-log";

/// Most `MONITOR` lines handed to the sink at once.
const MAX_BATCH: usize = 1024;
/// Most `MONITOR` lines read and waiting for the sink (at most 8 KiB each, 32 MiB in all).
const MONITOR_BUFFER: usize = 4096;

/// First reconnect delay (before jitter).
const BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Longest reconnect delay (before jitter).
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often an unchanged, repeating failure is logged at WARN (it is at DEBUG in between).
const REPEAT_WARN: Duration = Duration::from_secs(600);

/// Why a Redis connection ended.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The TCP connection could not be made.
    #[error("connecting to {address}")]
    Connect {
        /// `redis.address`.
        address: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// Redis did not answer in time.
    #[error("{op} timed out")]
    Timeout {
        /// `connect`, or the command.
        op: &'static str,
    },
    /// Reading or writing the connection failed.
    #[error("{op} on the redis connection")]
    Io {
        /// `read`, `write`.
        op: &'static str,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// Redis closed the connection (restart, `CLIENT KILL`, output buffer limit).
    #[error("redis closed the connection")]
    Closed,
    /// The byte stream is not RESP2 or broke a limit.
    #[error("redis protocol")]
    Protocol(
        /// What was wrong.
        #[from]
        #[source]
        RespError,
    ),
    /// Redis refused the credentials (`WRONGPASS`), or wants some (`NOAUTH`).
    #[error(
        "redis refused the collector's credentials ({message}); check redis.username and redis.password_file"
    )]
    Auth {
        /// Redis's message.
        message: String,
    },
    /// The collector's ACL user may not run a command (`NOPERM`).
    #[error(
        "the collector's redis user may not run {command} ({message}); it needs +monitor and +acl|log"
    )]
    Permission {
        /// The command.
        command: &'static str,
        /// Redis's message.
        message: String,
    },
    /// Another error reply.
    #[error("{command} failed: {message}")]
    Reply {
        /// The command.
        command: &'static str,
        /// Redis's message.
        message: String,
    },
    /// A reply of the wrong shape.
    #[error("unexpected reply to {command}: {got}")]
    Unexpected {
        /// The command.
        command: &'static str,
        /// What came instead.
        got: String,
    },
    /// The password file could not be read.
    #[error("reading the redis password file {}", .path.display())]
    Password {
        /// `redis.password_file`.
        path: PathBuf,
        /// The file error.
        #[source]
        source: io::Error,
    },
    /// The shipper refused the lines.
    #[error("queueing redis lines")]
    Sink(
        /// Why.
        #[source]
        SinkError,
    ),
    /// The `ACL LOG` state could not be saved.
    #[error("saving the ACL LOG state {}", .path.display())]
    State {
        /// `state_dir/redis-acl.json`.
        path: PathBuf,
        /// The file error.
        #[source]
        source: io::Error,
    },
}

impl RedisError {
    /// The `kind` label of `mirage_agent_redis_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::Timeout { .. } => "timeout",
            Self::Io { .. } | Self::Closed => "io",
            Self::Protocol(_) | Self::Unexpected { .. } => "protocol",
            Self::Auth { .. } => "auth",
            Self::Permission { .. } => "permission",
            Self::Reply { .. } => "reply",
            Self::Password { .. } => "password-file",
            Self::Sink(_) => "sink",
            Self::State { .. } => "state",
        }
    }
}

/// An error with its sources, `a: b: c`, for logs.
struct Chain<'a>(&'a RedisError);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

/// Runs the collector until `stop` becomes true (or every sender of it is dropped), or the
/// sink closes. Never returns early on a Redis error: every failure is logged, counted and
/// retried with backoff. The `ACL LOG` state is kept in `state_dir`.
pub async fn run(cfg: RedisSource, sink: Sink, state_dir: PathBuf, stop: watch::Receiver<bool>) {
    let ctx = Ctx {
        cfg,
        sink,
        own: OwnConns::default(),
        mode_warned: AtomicBool::new(false),
    };
    tracing::info!(address = %ctx.cfg.address, acl_log_secs = ctx.cfg.acl_log_secs, "Redis collector started.");
    if ctx.cfg.username.is_some() && ctx.cfg.password_file.is_none() {
        tracing::warn!("redis.username is set but redis.password_file is not: no AUTH is sent.");
    }
    let acl = async {
        if ctx.cfg.acl_log_secs > 0 {
            acl_loop(&ctx, &state_dir, stop.clone()).await;
        }
    };
    tokio::join!(monitor_loop(&ctx, stop.clone()), acl);
    tracing::info!("Redis collector stopped.");
}

/// What both connections share.
struct Ctx {
    cfg: RedisSource,
    sink: Sink,
    own: OwnConns,
    /// The password file's loose mode was reported.
    mode_warned: AtomicBool,
}

impl Ctx {
    /// The credential to send, read from the password file now; `None` without one.
    fn credential(&self) -> Result<Option<Credential>, RedisError> {
        let Some(path) = &self.cfg.password_file else {
            return Ok(None);
        };
        let (password, loose) = read_password(path)?;
        if loose && !self.mode_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(path = %path.display(), "The Redis password file is readable by group or others; chmod 600 it.");
        }
        Ok(Some(Credential {
            username: self.cfg.username.clone(),
            password,
        }))
    }

    /// Connects and authenticates; `register` adds the connection to the own set first.
    async fn open(&self, register: bool) -> Result<(Conn, Option<monitor::OwnConn>), RedisError> {
        let cred = self.credential()?;
        let mut conn = Conn::connect(&self.cfg.address).await?;
        let own = register.then(|| self.own.register(conn.local_addr()));
        if let Some(cred) = &cred {
            conn.auth(cred).await?;
        }
        Ok((conn, own))
    }
}

/// How a session ended without an error.
enum Ended {
    /// `stop` fired.
    Stopped,
    /// The shipper has stopped: nothing can be shipped any more.
    SinkClosed,
}

/// Runs `fut` unless `stop` fires first.
async fn or_stop<T>(
    stop: &mut watch::Receiver<bool>,
    fut: impl Future<Output = Result<T, RedisError>>,
) -> Result<Result<T, Ended>, RedisError> {
    tokio::select! {
        () = stopped(stop) => Ok(Err(Ended::Stopped)),
        r = fut => r.map(Ok),
    }
}

/// Waits until `stop` is true or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs `session` again and again until it ends without an error.
/// Each session watches `stop` itself, so that it ends only where it is safe to.
async fn reconnect_loop<F, Fut>(conn: &'static str, mut stop: watch::Receiver<bool>, mut session: F)
where
    F: FnMut(watch::Receiver<bool>, Connected) -> Fut,
    Fut: Future<Output = Result<Ended, RedisError>>,
{
    let mut backoff = Backoff::default();
    let mut report = Report::new(conn);
    loop {
        if *stop.borrow() {
            return;
        }
        let connected = Connected::new(conn);
        let established = connected.flag.clone();
        let result = session(stop.clone(), connected).await;
        if established.load(Ordering::Relaxed) {
            backoff.reset();
            report.recovered();
        }
        match result {
            Ok(Ended::Stopped) => return,
            Ok(Ended::SinkClosed) => {
                tracing::info!(conn, "The log shipper has stopped; Redis collection ends.");
                return;
            }
            Err(err) => {
                metrics::counter!("mirage_agent_redis_errors_total", "kind" => err.kind())
                    .increment(1);
                let delay = backoff.next_delay();
                report.failed(&err, delay);
                tokio::select! {
                    () = stopped(&mut stop) => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Marks a session established (gauge to 1, backoff reset); the gauge returns to 0 on drop.
struct Connected {
    conn: &'static str,
    flag: std::sync::Arc<AtomicBool>,
}

impl Connected {
    fn new(conn: &'static str) -> Self {
        Self {
            conn,
            flag: std::sync::Arc::new(AtomicBool::new(false)),
        }
    }

    fn established(&self, address: &str) {
        if !self.flag.swap(true, Ordering::Relaxed) {
            metrics::gauge!("mirage_agent_redis_connected", "conn" => self.conn).set(1.0);
            tracing::info!(conn = self.conn, address, "Connected to Redis.");
        }
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        if self.flag.load(Ordering::Relaxed) {
            metrics::gauge!("mirage_agent_redis_connected", "conn" => self.conn).set(0.0);
        }
    }
}

/// The `MONITOR` connection, reconnected forever.
async fn monitor_loop(ctx: &Ctx, stop: watch::Receiver<bool>) {
    reconnect_loop("monitor", stop, |mut stop, connected| async move {
        // Anywhere is a safe place to stop: `MONITOR` has no position to save (lines read but
        // not yet queued are lost, as any output after the collector stops is).
        match or_stop(&mut stop, monitor_session(ctx, connected)).await? {
            Ok(ended) | Err(ended) => Ok(ended),
        }
    })
    .await;
}

async fn monitor_session(ctx: &Ctx, connected: Connected) -> Result<Ended, RedisError> {
    let (mut conn, _) = ctx.open(false).await?;
    let reply = conn.call("MONITOR", &[b"MONITOR"]).await?;
    expect_ok("MONITOR", reply)?;
    connected.established(&ctx.cfg.address);
    // The socket is read all the time, whatever the shipper does. Redis buffers a monitor's
    // output without limit (a monitor is a `normal` client: `client-output-buffer-limit normal
    // 0 0 0`), so a collector that stopped reading while the shipper's queue is full (the
    // server unreachable for hours) would grow the production Redis until it runs out of
    // memory. Lines that do not fit in the buffer are dropped and counted instead.
    let (tx, mut rx) = mpsc::channel(MONITOR_BUFFER);
    let ship_all = async {
        let mut lines = Vec::with_capacity(MAX_BATCH);
        loop {
            // Everything waiting goes in one batch: one durable append per batch keeps up
            // with a busy server.
            if rx.recv_many(&mut lines, MAX_BATCH).await == 0 {
                return Err(RedisError::Closed);
            }
            let n = lines.len() as u64;
            if let Some(ended) = ship(ctx, std::mem::take(&mut lines)).await? {
                return Ok(ended);
            }
            metrics::counter!("mirage_agent_redis_lines_total", "source" => "monitor").increment(n);
        }
    };
    tokio::select! {
        r = read_monitor(ctx, &mut conn, tx) => r,
        r = ship_all => r,
    }
}

/// Reads the `MONITOR` stream into `tx` until the connection fails.
async fn read_monitor(
    ctx: &Ctx,
    conn: &mut Conn,
    tx: mpsc::Sender<LogLine>,
) -> Result<Ended, RedisError> {
    let mut dropped: u64 = 0;
    loop {
        let value = conn.read().await?;
        let Some(line) = monitor_line(ctx, value)? else {
            continue;
        };
        match tx.try_send(line) {
            Ok(()) if dropped > 0 => {
                tracing::warn!(
                    dropped,
                    "The shipper caught up; MONITOR lines were dropped meanwhile."
                );
                dropped = 0;
            }
            Ok(()) => {}
            Err(_) => {
                if dropped == 0 {
                    tracing::warn!(
                        "The shipper is not keeping up; MONITOR lines are dropped (Redis is read on, so that it does not buffer them)."
                    );
                }
                dropped += 1;
                metrics::counter!("mirage_agent_redis_dropped_total").increment(1);
            }
        }
    }
}

/// One value of the `MONITOR` stream as a line (`None`: one of the collector's own).
fn monitor_line(ctx: &Ctx, value: Value) -> Result<Option<LogLine>, RedisError> {
    let (raw, truncated) = match value {
        Value::Simple(raw) => (raw, false),
        Value::LongSimple(raw) => (raw, true),
        // Redis ends a monitor with an error only when it closes it.
        Value::Error(msg) => {
            return Err(RedisError::Reply {
                command: "MONITOR",
                message: monitor::sanitize(&msg),
            });
        }
        other => return Err(conn::unexpected("MONITOR", &other)),
    };
    Ok(
        monitor::line(&raw, truncated, &ctx.own).map(|line| LogLine {
            service: SERVICE.to_owned(),
            source: SOURCE_MONITOR.to_owned(),
            line,
            read_at: now(),
        }),
    )
}

/// Hands `lines` to the sink; `Some` if the session must end instead.
async fn ship(ctx: &Ctx, lines: Vec<LogLine>) -> Result<Option<Ended>, RedisError> {
    match ctx.sink.send(lines).await {
        Ok(()) => Ok(None),
        Err(SinkError::Closed) => Ok(Some(Ended::SinkClosed)),
        Err(err) => Err(RedisError::Sink(err)),
    }
}

/// The `ACL LOG` connection, reconnected forever; the state lives across reconnects.
async fn acl_loop(ctx: &Ctx, state_dir: &std::path::Path, stop: watch::Receiver<bool>) {
    let state = tokio::sync::Mutex::new(AclState::load(state_dir, &ctx.cfg.address));
    reconnect_loop("acl-log", stop, |stop, connected| {
        acl_session(ctx, &state, stop, connected)
    })
    .await;
}

async fn acl_session(
    ctx: &Ctx,
    state: &tokio::sync::Mutex<AclState>,
    mut stop: watch::Receiver<bool>,
    connected: Connected,
) -> Result<Ended, RedisError> {
    // `stop` is obeyed while connecting, waiting for Redis, waiting for the sink (the lines
    // are then shipped again after a restart: at least once) and sleeping; never between the
    // sink's acknowledgement and the saved state, so a clean shutdown re-ships nothing.
    let mut state = state.lock().await;
    let (mut conn, _own) = match or_stop(&mut stop, ctx.open(true)).await? {
        Ok(c) => c,
        Err(ended) => return Ok(ended),
    };
    let interval = Duration::from_secs(ctx.cfg.acl_log_secs);
    loop {
        let reply = match or_stop(
            &mut stop,
            conn.call("ACL LOG", &[b"ACL", b"LOG", acl::READ_COUNT]),
        )
        .await?
        {
            Ok(reply) => reply,
            Err(ended) => return Ok(ended),
        };
        connected.established(&ctx.cfg.address);
        let entries = acl::parse(&reply)?;
        if state.first_sight() {
            tracing::info!(
                entries = entries.len(),
                "First ACL LOG read: existing entries recorded as seen, only later ones are shipped."
            );
        }
        let lines: Vec<LogLine> = state
            .new_lines(&entries)
            .into_iter()
            .map(|line| LogLine {
                service: SERVICE.to_owned(),
                source: SOURCE_ACL_LOG.to_owned(),
                line,
                read_at: now(),
            })
            .collect();
        let n = lines.len() as u64;
        match or_stop(&mut stop, ship(ctx, lines)).await? {
            Ok(None) => {}
            Ok(Some(ended)) | Err(ended) => return Ok(ended),
        }
        metrics::counter!("mirage_agent_redis_lines_total", "source" => "acl-log").increment(n);
        state.record(&entries);
        // A state that cannot be saved is not a reason to stop collecting: the entries are
        // remembered in memory, and the save is retried after the next read.
        if let Err(err) = state.save().await {
            metrics::counter!("mirage_agent_redis_errors_total", "kind" => err.kind()).increment(1);
            tracing::warn!(error = %Chain(&err), "ACL LOG state not saved; entries may be shipped again after an agent restart.");
        }
        tokio::select! {
            () = stopped(&mut stop) => return Ok(Ended::Stopped),
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Unix seconds now.
fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Exponential backoff with full jitter: attempt `n` waits a uniformly random time in
/// `[0, min(BACKOFF_MAX, BACKOFF_MIN * 2^n)]` (AWS Architecture Blog, "Exponential Backoff
/// And Jitter"), so agents on many hosts do not reconnect to a restarted Redis in lockstep.
#[derive(Debug, Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// The ceiling of the next delay (before jitter).
    fn ceiling(&self) -> Duration {
        BACKOFF_MIN
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(BACKOFF_MAX)
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(random() % (millis + 1))
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A random number for jitter (std's per-process random SipHash keys; no need for a CSPRNG).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Logs failures without flooding: a failure is logged at WARN when it differs from the last
/// one or every [`REPEAT_WARN`] while it repeats, at DEBUG otherwise; recovery at INFO.
struct Report {
    conn: &'static str,
    last: Option<String>,
    warned_at: Option<Instant>,
    repeats: u64,
}

impl Report {
    fn new(conn: &'static str) -> Self {
        Self {
            conn,
            last: None,
            warned_at: None,
            repeats: 0,
        }
    }

    fn failed(&mut self, err: &RedisError, retry_in: Duration) {
        let text = Chain(err).to_string();
        let same = self.last.as_deref() == Some(text.as_str());
        self.repeats = if same { self.repeats + 1 } else { 1 };
        let due = self.warned_at.is_none_or(|t| t.elapsed() >= REPEAT_WARN);
        if !same || due {
            tracing::warn!(conn = self.conn, kind = err.kind(), failures = self.repeats, retry_in = ?retry_in, error = %text, "Redis connection failed; retrying.");
            self.warned_at = Some(Instant::now());
        } else {
            tracing::debug!(conn = self.conn, kind = err.kind(), failures = self.repeats, retry_in = ?retry_in, error = %text, "Redis connection failed again; retrying.");
        }
        self.last = Some(text);
    }

    fn recovered(&mut self) {
        self.last = None;
        self.warned_at = None;
        self.repeats = 0;
    }
}

#[cfg(test)]
mod tests;
