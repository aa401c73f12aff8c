//! Policy from the manager (`[manager]` in the configuration): one authenticated server-sent
//! event stream (`GET /api/v1/agent/stream`), whose `snapshot` and `delta` events are applied to
//! the kernel maps as they arrive; heartbeats with the kernel counters; the last applied policy
//! kept on disk. Without the manager nothing changes in the kernel: what was applied stays
//! enforced (the programs and maps are pinned), and the stream is retried with exponential
//! backoff.
//!
//! API: [`start`] (called by `mirage-agent run` when `[manager]` is set) spawns the tasks on the
//! running tokio runtime and returns a [`SyncHandle`] that stops them when dropped. The tasks
//! open their own handles on the pinned maps (`pin_dir`): they share nothing with the rest of the
//! agent but the kernel objects, and writes to one map element are atomic in the kernel.
//! [`enroll`] is `mirage-agent enroll`.
//!
//! Pieces: [`sse`] parses the stream, [`policy`] validates and translates what the manager sends,
//! [`state`] diffs it against what was applied, [`apply`] writes it to the maps, [`store`] keeps
//! it on disk, [`heartbeat`] reports, [`client`] is the HTTPS side.
//!
//! Revisions are the manager's global change log (every group's changes share it), so the
//! revisions one agent sees are increasing but not consecutive: a skipped number is another
//! group's change, not a loss. The stream itself is gapless (the manager reads the log from the
//! agent's position). What the agent treats as lost is a delta it cannot apply (an unknown
//! operation, an unreadable policy): it then reconnects without `Last-Event-ID` and gets a
//! snapshot.

pub mod apply;
pub mod client;
pub mod enroll;
pub mod heartbeat;
pub mod policy;
pub mod sse;
pub mod state;
pub mod store;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures_util::StreamExt as _;
use reqwest::{StatusCode, Url};
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tracing::{debug, error, info, warn};

use self::{
    apply::{Applier, ApplyError, DeltaOutcome},
    client::ClientError,
    policy::DeltaDoc,
    sse::SseParser,
    state::PolicyState,
    store::{Store, StoreError},
};
use crate::{
    addr::Net,
    config::AgentConfig,
    maps::{Maps, MapsError},
};

/// Metric names (the recorder and `/metrics` are installed elsewhere).
pub mod metric {
    /// Gauge: the last policy revision applied.
    pub const POLICY_REVISION: &str = "mirage_agent_policy_revision";
    /// Gauge: 1 while the policy stream is connected.
    pub const STREAM_CONNECTED: &str = "mirage_agent_stream_connected";
    /// Gauge: attacker networks in the applied policy.
    pub const ATTACKER_ENTRIES: &str = "mirage_agent_attacker_entries";
    /// Histogram (label `kind`: `snapshot` or `delta`): seconds to apply one update.
    pub const POLICY_APPLY_SECONDS: &str = "mirage_agent_policy_apply_seconds";
}

/// First reconnection delay (the ceiling of the first full-jitter draw).
pub const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Longest reconnection delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A stream that stayed up this long was healthy: the backoff starts over.
const HEALTHY: Duration = Duration::from_secs(10);
/// Delay between attempts while the manager refuses the credential (401/403): an operator has
/// to act, and retrying fast would only fill the logs.
const AUTH_RETRY: Duration = Duration::from_secs(60);
/// Delay between looks for a credential file while there is none (`mirage-agent enroll` may
/// write it any time).
const NO_CREDENTIAL_RETRY: Duration = Duration::from_secs(5);
/// Silence after which the stream is taken for dead (the manager sends a comment every 15 s).
const IDLE: Duration = Duration::from_secs(45);
/// Largest event accepted (a million-entry snapshot is about 70 MB).
const MAX_EVENT: usize = 1 << 30;

/// Errors starting the sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The manager settings are unusable.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The pinned maps could not be opened.
    #[error("opening the pinned maps for the policy sync")]
    Maps(#[source] MapsError),
    /// The state directory could not be created.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration's allowlist is invalid (already checked at load; kept for safety).
    #[error("the configuration's allowlist: {0}")]
    Allowlist(String),
}

/// What the stream task tells the heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    /// The last revision applied.
    pub revision: Option<i64>,
    /// Whether the stream is connected.
    pub connected: bool,
}

/// The running sync; dropping it stops the tasks (an apply in progress on the blocking pool
/// finishes first).
#[derive(Debug)]
pub struct SyncHandle {
    tasks: Vec<JoinHandle<()>>,
    status: watch::Receiver<Status>,
}

impl SyncHandle {
    /// The current status.
    pub fn status(&self) -> Status {
        *self.status.borrow()
    }
}

impl Drop for SyncHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Everything the tasks need to reach the manager.
#[derive(Debug, Clone)]
struct Link {
    http: reqwest::Client,
    base: Url,
    credential: PathBuf,
    /// `[server].address`, whose host is allowlisted too.
    server: Option<String>,
}

/// Starts the policy sync for `cfg` (nothing when it has no `[manager]`): restores the last
/// applied policy, then holds the stream and sends heartbeats. Must be called inside a tokio
/// runtime.
///
/// # Errors
///
/// When the manager URL or CA is unusable, the pinned maps cannot be opened or the state
/// directory cannot be created. An unreachable manager or a missing credential is not an error:
/// the tasks retry.
pub fn start(cfg: &AgentConfig, pin_dir: &Path) -> Result<Option<SyncHandle>, SyncError> {
    let Some(manager) = &cfg.manager else {
        return Ok(None);
    };
    ::metrics::describe_gauge!(
        metric::POLICY_REVISION,
        "The last policy revision applied from the manager."
    );
    ::metrics::describe_gauge!(
        metric::STREAM_CONNECTED,
        "1 while the policy stream to the manager is connected."
    );
    ::metrics::describe_gauge!(
        metric::ATTACKER_ENTRIES,
        "Attacker networks in the policy applied from the manager."
    );
    ::metrics::describe_histogram!(
        metric::POLICY_APPLY_SECONDS,
        ::metrics::Unit::Seconds,
        "Time to apply one policy update (snapshot or delta) to the kernel maps."
    );
    let base = client::manager_url(&manager.url)?;
    let http = client::client(manager.ca.as_deref())?;
    let credential = manager
        .credential_file
        .clone()
        .unwrap_or_else(|| cfg.state_dir.join("credential"));
    let protected: BTreeSet<Net> = cfg
        .allowlist_nets()
        .map_err(|e| SyncError::Allowlist(e.to_string()))?
        .into_iter()
        .collect();
    let maps = Maps::open_pinned(pin_dir).map_err(SyncError::Maps)?;
    let store = Store::open(&cfg.state_dir.join("policy"))?;
    let applier = Arc::new(Mutex::new(Applier::new(maps, store, protected)));
    let link = Link {
        http: http.clone(),
        base: base.clone(),
        credential: credential.clone(),
        server: cfg.server.as_ref().map(|s| s.address.clone()),
    };
    let (tx, rx) = watch::channel(Status::default());
    let stream = tokio::spawn(run_stream(applier, link, tx));
    let heartbeat = tokio::spawn(heartbeat::run(
        http,
        client::endpoint(&base, "api/v1/agent/heartbeat"),
        credential,
        pin_dir.to_owned(),
        Duration::from_secs(manager.heartbeat_secs),
        rx.clone(),
    ));
    info!(manager = %base, "Policy sync started.");
    Ok(Some(SyncHandle {
        tasks: vec![stream, heartbeat],
        status: rx,
    }))
}

/// The data-path settings of the policy this agent last applied from the manager, if it has
/// one on disk (read cheaply, without the attacker entries). `mirage-agent run` may write these
/// instead of the configuration file's fallback when it fills the maps at start, so that a
/// restart never switches the mode back to the file's for the moment before the sync restores
/// the policy.
pub fn persisted_data_plane(cfg: &AgentConfig) -> Option<policy::DataPlane> {
    cfg.manager.as_ref()?;
    Store::peek_policy(&cfg.state_dir.join("policy"))?
        .data_plane()
        .ok()
}

/// Locks the applier. A panic while it was held leaves a state that may not match the kernel,
/// but the next snapshot diff repairs that; the lock is taken over rather than the sync
/// stopping for good.
fn lock(applier: &Mutex<Applier>) -> MutexGuard<'_, Applier> {
    applier
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Exponential backoff with full jitter: the `n`th delay is uniform in `[0, min(cap, base *
/// 2^n)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base`, never above `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The ceiling of the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, drawn with `rng`.
    pub fn next_delay(&mut self, rng: &mut impl rand::Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.gen_range(0..=ms))
    }

    /// Starts over (after a healthy stream).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Why a stream ended.
#[derive(Debug)]
enum End {
    /// The manager refused the credential: retry slowly.
    Auth(String),
    /// There is no usable credential file: look for one again shortly.
    NoCredential(String),
    /// The agent needs a snapshot: reconnect without `Last-Event-ID`.
    Resync(String),
    /// Anything else: reconnect with backoff.
    Lost(String),
}

/// Restores the applied policy, then holds the stream forever.
async fn run_stream(applier: Arc<Mutex<Applier>>, link: Link, tx: watch::Sender<Status>) {
    let restored = {
        let applier = Arc::clone(&applier);
        tokio::task::spawn_blocking(move || lock(&applier).restore()).await
    };
    match restored {
        Ok(revision) => {
            tx.send_modify(|s| s.revision = revision);
        }
        Err(err) => error!(error = %err, "Restoring the applied policy failed."),
    }
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
    let mut want_snapshot = false;
    // Failed attempts in a row: the first is a warning, the rest are quieter until it works.
    let mut failures = 0u32;
    loop {
        refresh_auto_allowlist(&applier, &link).await;
        let opened = Instant::now();
        let end = stream_once(&applier, &link, &tx, want_snapshot).await;
        if tx.borrow().connected {
            failures = 0;
        }
        tx.send_modify(|s| s.connected = false);
        ::metrics::gauge!(metric::STREAM_CONNECTED).set(0.0);
        want_snapshot = false;
        if opened.elapsed() >= HEALTHY {
            backoff.reset();
            failures = 0;
        }
        let delay = match end {
            End::Auth(why) => {
                error!(
                    reason = %why,
                    "The manager refused this agent's credential; enforcement continues unchanged. Enroll again (`mirage-agent enroll --force`) or check the agent in the manager."
                );
                AUTH_RETRY
            }
            End::NoCredential(why) => {
                if failures == 0 {
                    error!(reason = %why, "No manager credential; enforcement continues unchanged.");
                }
                failures = failures.saturating_add(1);
                NO_CREDENTIAL_RETRY
            }
            End::Resync(why) => {
                warn!(reason = %why, "Requesting a policy snapshot.");
                want_snapshot = true;
                backoff.next_delay(&mut rand::thread_rng())
            }
            End::Lost(why) => {
                let delay = backoff.next_delay(&mut rand::thread_rng());
                failures = failures.saturating_add(1);
                if failures == 1 {
                    warn!(
                        reason = %why,
                        retry_in_ms = delay.as_millis() as u64,
                        "Policy stream to the manager lost; enforcement continues unchanged."
                    );
                } else {
                    info!(
                        reason = %why,
                        attempts = failures,
                        retry_in_ms = delay.as_millis() as u64,
                        "The manager is still unreachable; enforcement continues unchanged."
                    );
                }
                delay
            }
        };
        tokio::time::sleep(delay).await;
    }
}

/// One connection: open, read events and apply them until it ends.
async fn stream_once(
    applier: &Arc<Mutex<Applier>>,
    link: &Link,
    tx: &watch::Sender<Status>,
    want_snapshot: bool,
) -> End {
    let auth = match client::bearer(&link.credential) {
        Ok(v) => v,
        Err(err) => return End::NoCredential(err.to_string()),
    };
    let revision = lock(applier).revision();
    let mut req = link
        .http
        .get(client::endpoint(&link.base, "api/v1/agent/stream"))
        .header(reqwest::header::AUTHORIZATION, auth)
        .header(reqwest::header::ACCEPT, "text/event-stream");
    if let Some(rev) = revision.filter(|_| !want_snapshot) {
        req = req.header("last-event-id", rev.to_string());
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(err) => return End::Lost(format!("connecting: {}", error_chain(&err))),
    };
    match resp.status() {
        s if s.is_success() => {}
        s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => return End::Auth(s.to_string()),
        StatusCode::BAD_REQUEST if revision.is_some() && !want_snapshot => {
            return End::Resync("the manager refused our position".to_owned());
        }
        s => return End::Lost(format!("the manager answered {s}")),
    }
    info!(since = ?revision.filter(|_| !want_snapshot), "Policy stream connected.");
    tx.send_modify(|s| s.connected = true);
    ::metrics::gauge!(metric::STREAM_CONNECTED).set(1.0);
    let mut body = resp.bytes_stream();
    let mut parser = SseParser::new(MAX_EVENT);
    loop {
        let chunk = match tokio::time::timeout(IDLE, body.next()).await {
            Err(_) => return End::Lost(format!("no data for {} s", IDLE.as_secs())),
            Ok(None) => return End::Lost("the manager closed the stream".to_owned()),
            Ok(Some(Err(err))) => return End::Lost(format!("reading: {}", error_chain(&err))),
            Ok(Some(Ok(chunk))) => chunk,
        };
        if let Err(err) = parser.push(&chunk) {
            return End::Resync(err.to_string());
        }
        while let Some(event) = parser.next_event() {
            let outcome = match event.event.as_str() {
                "snapshot" => apply_snapshot(applier, event.data).await,
                "delta" => apply_delta(applier, &event.data, &event.id),
                other => {
                    debug!(event = other, "Ignored an unknown stream event.");
                    Ok(())
                }
            };
            if let Err(end) = outcome {
                return end;
            }
            let revision = lock(applier).revision();
            tx.send_modify(|s| s.revision = revision);
        }
        after_batch(applier).await;
    }
}

async fn apply_snapshot(applier: &Arc<Mutex<Applier>>, data: String) -> Result<(), End> {
    let applier = Arc::clone(applier);
    // Parsing and applying a million entries takes seconds: off the runtime thread, which
    // also reads the flow events.
    let done = tokio::task::spawn_blocking(move || {
        let parsed = PolicyState::from_snapshot(&data)
            .map_err(|e| End::Resync(format!("unreadable snapshot: {e}")))?;
        drop(data);
        lock(&applier)
            .apply_snapshot(parsed)
            .map_err(|e| End::Lost(error_chain(&e)))
    })
    .await;
    done.unwrap_or_else(|e| Err(End::Lost(format!("applying the snapshot: {e}"))))
}

fn apply_delta(applier: &Arc<Mutex<Applier>>, data: &str, id: &str) -> Result<(), End> {
    let delta: DeltaDoc = serde_json::from_str(data)
        .map_err(|e| End::Resync(format!("unreadable delta (id {id}): {e}")))?;
    if !id.is_empty() && id != delta.revision.to_string() {
        warn!(
            id,
            revision = delta.revision,
            "A delta's id and revision differ."
        );
    }
    match lock(applier).apply_delta(&delta) {
        Ok(DeltaOutcome::Applied) => {
            debug!(revision = delta.revision, op = delta.op, net = ?delta.net, "Delta applied.");
            Ok(())
        }
        Ok(DeltaOutcome::Stale) => {
            debug!(revision = delta.revision, "Delta already applied; skipped.");
            Ok(())
        }
        Err(ApplyError::Delta(err)) => Err(End::Resync(err.to_string())),
        Err(err @ ApplyError::Store(_)) => Err(End::Lost(error_chain(&err))),
    }
}

/// After the events of one chunk: fsync the journal off the runtime, and fold it into the state
/// file when it has grown long.
async fn after_batch(applier: &Arc<Mutex<Applier>>) {
    let (unsynced, compact) = {
        let mut a = lock(applier);
        (a.take_unsynced(), a.wants_compaction())
    };
    if let Some(file) = unsynced {
        tokio::task::spawn_blocking(move || {
            if let Err(err) = file.sync_data() {
                warn!(error = %err, "Syncing the policy journal failed.");
            }
        });
    }
    if compact {
        let applier = Arc::clone(applier);
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(err) = lock(&applier).compact() {
                warn!(error = %error_chain(&err), "Compacting the policy journal failed.");
            }
        })
        .await;
    }
}

/// An error and its causes, `: `-separated.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        s.push_str(": ");
        s.push_str(&e.to_string());
        source = e.source();
    }
    s
}

/// Resolves the manager's and the server's hosts and allowlists them (managed entries: they
/// follow the addresses when those change). A failed lookup keeps the previous addresses.
async fn refresh_auto_allowlist(applier: &Arc<Mutex<Applier>>, link: &Link) {
    let mut addrs: BTreeSet<Net> = BTreeSet::new();
    let mut complete = true;
    let manager = match client::literal_host(&link.base) {
        Some(ip) => Ok(vec![ip]),
        None => {
            let host = link.base.host_str().unwrap_or_default().to_owned();
            let port = link.base.port_or_known_default().unwrap_or(443);
            resolve(&format!("{host}:{port}")).await
        }
    };
    let server = match &link.server {
        Some(address) => resolve(address).await,
        None => Ok(Vec::new()),
    };
    for (what, result) in [("manager", manager), ("server", server)] {
        match result {
            Ok(ips) => addrs.extend(ips.into_iter().map(host_net)),
            Err(err) => {
                complete = false;
                warn!(what, error = %err, "Resolving an address to allowlist failed; keeping the previous ones.");
            }
        }
    }
    if !complete {
        return;
    }
    let applier = Arc::clone(applier);
    let done = tokio::task::spawn_blocking(move || lock(&applier).set_auto(addrs)).await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(err)) => warn!(error = %error_chain(&err), "Saving the automatic allowlist failed."),
        Err(err) => warn!(error = %err, "Updating the automatic allowlist failed."),
    }
}

async fn resolve(address: &str) -> std::io::Result<Vec<IpAddr>> {
    Ok(tokio::net::lookup_host(address)
        .await?
        .map(|sa| sa.ip())
        .collect())
}

/// The single-address network of `ip`.
fn host_net(ip: IpAddr) -> Net {
    match crate::addr::normalize(ip) {
        IpAddr::V4(a) => Net::V4(a, 32),
        IpAddr::V6(a) => Net::V6(a, 128),
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng as _;

    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_full_jitter() {
        let mut b = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            let c = b.ceiling();
            let d = b.next_delay(&mut rng);
            assert!(d <= c, "{d:?} > {c:?}");
            ceilings.push(c.as_millis());
        }
        assert_eq!(
            ceilings,
            vec![
                250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000, 30000
            ]
        );
        // Full jitter spreads the delays over the whole range.
        let draws: Vec<Duration> = (0..200).map(|_| b.next_delay(&mut rng)).collect();
        assert!(draws.iter().any(|d| *d < Duration::from_secs(10)));
        assert!(draws.iter().any(|d| *d > Duration::from_secs(20)));
        b.reset();
        assert_eq!(b.ceiling(), BACKOFF_BASE);
        for _ in 0..100 {
            b.next_delay(&mut rng);
        }
        assert_eq!(b.ceiling(), BACKOFF_CAP);
    }

    #[test]
    fn auto_allowlist_entries_are_hosts() {
        assert_eq!(
            host_net("127.0.0.1".parse().unwrap()),
            "127.0.0.1".parse().unwrap()
        );
        assert_eq!(
            host_net("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1".parse().unwrap()
        );
        assert_eq!(
            host_net("2001:db8::1".parse().unwrap()),
            "2001:db8::1/128".parse().unwrap()
        );
    }

    #[tokio::test]
    async fn resolves_literal_and_named_hosts() {
        assert_eq!(
            resolve("198.18.0.9:6514").await.unwrap(),
            vec!["198.18.0.9".parse::<IpAddr>().unwrap()]
        );
        assert!(
            resolve("[::1]:6514")
                .await
                .unwrap()
                .contains(&"::1".parse().unwrap())
        );
        assert!(!resolve("localhost:6514").await.unwrap().is_empty());
    }
}
