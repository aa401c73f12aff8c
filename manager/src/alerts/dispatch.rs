//! The alert dispatcher.
//!
//! A pass ([`run_once`]) has three steps:
//!
//! 1. **Plan**, in one transaction holding the cursor row (`settings.alerts_cursor`), so that
//!    planners on several replicas never interleave: read the detections after the cursor (in id
//!    order, which is commit order: ingestion inserts under the policy head lock), and for each
//!    enabled channel
//!    - drop those below its `min_severity`;
//!    - group the rest by (rule, address); a group whose key was alerted on within
//!      `dedup_window_secs` becomes one `suppressed` row (counted, never sent);
//!    - queue one `alert` message per remaining group while the channel's budget lasts
//!      (`max_per_hour` messages queued in the last hour), keeping the last place for a digest;
//!    - fold every other group, detection by detection, into the channel's collecting `digest`.
//!
//!    then advance the cursor. The first pass ever starts at the newest detection, so history
//!    is not alerted on.
//! 2. **Release**: a collecting digest that is at least `digest_settle` old (so that a burst
//!    arriving over a few seconds ends up in one digest) takes its place in the budget when one
//!    is free, and becomes due.
//! 3. **Send** what is due: each channel on its own task, so a slow or failing receiver delays
//!    nobody else. A sender claims rows with a lease (their next attempt moves ahead), so even two
//!    dispatchers never send one message twice; a failure is retried with backoff
//!    ([`BACKOFF_SECS`]) up to [`MAX_ATTEMPTS`] times and the channel's other due messages wait
//!    with it.
//!
//! [`run`] is the background task: it repeats passes while it holds a session advisory lock on a
//! dedicated connection (one dispatcher among the replicas; another takes over within a poll
//! interval if it dies), woken by `NOTIFY mirage_detection` (sent by verdict ingestion) and
//! every `poll` as a fallback.

use std::{collections::HashMap, time::Duration};

use serde_json::{Value, json};
use sqlx::{
    Connection as _, PgConnection, PgPool, Row as _,
    postgres::{PgListener, PgRow},
};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::{
    channel::ChannelConfig,
    message::{self, Alert, ChannelInfo, Detection, Digest},
    send::Sender,
    severity_rank,
};
use crate::db::{
    self,
    alert_channels::AlertChannel,
    alert_deliveries::{Due, NewDelivery},
};

/// The `settings` key of the cursor: `{"detection_id": N}`, the last detection planned.
pub const CURSOR_KEY: &str = "alerts_cursor";
/// The channel verdict ingestion notifies (payload: the newest detection id).
pub const DETECTION_CHANNEL: &str = "mirage_detection";
/// The advisory lock the leading dispatcher holds (`mirageal` in ASCII).
pub const LOCK_KEY: i64 = 0x6d69_7261_6765_616c;
/// Seconds before the 2nd, 3rd, 4th and 5th attempt of a failed message.
pub const BACKOFF_SECS: [u64; 4] = [30, 120, 600, 1800];
/// Attempts before a message is given up (`failed`, no next attempt).
pub const MAX_ATTEMPTS: i32 = 5;
/// Deliveries one channel sends per pass (the next pass follows at once when there are more).
const SEND_PER_PASS: i64 = 20;
/// Messages sent, by kind and outcome.
pub const MESSAGES_METRIC: &str = "mirage_alert_messages_total";

/// Dispatcher settings.
#[derive(Debug, Clone)]
pub struct DispatchOptions {
    /// How often to look for work without a notification.
    pub poll: Duration,
    /// Longest one send may take (SMTP exchange or HTTP request).
    pub send_timeout: Duration,
    /// How long a digest collects before it may be sent.
    pub digest_settle: Duration,
    /// Detections planned per transaction.
    pub batch: i64,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(5),
            send_timeout: Duration::from_secs(10),
            digest_settle: Duration::from_secs(10),
            batch: 5000,
        }
    }
}

/// Errors of a pass.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// A query failed.
    #[error("alert dispatcher database access")]
    Db(#[from] sqlx::Error),
    /// A stored payload does not deserialize (edited by hand?).
    #[error("delivery {id} has an unreadable payload")]
    Payload {
        /// The delivery.
        id: i64,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// What a pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Detections read past the cursor.
    pub detections: usize,
    /// Alert messages queued.
    pub alerts: usize,
    /// Detections folded into earlier alerts (de-duplicated).
    pub suppressed: usize,
    /// Detections folded into digests.
    pub digested: usize,
    /// Digests released for sending.
    pub digests: usize,
    /// Messages sent.
    pub sent: usize,
    /// Send attempts that failed.
    pub failed: usize,
    /// Some channel had more due messages than one pass sends.
    pub more: bool,
}

/// One pass: plan every new detection, release settled digests, send what is due.
pub async fn run_once(
    pool: &PgPool,
    sender: &Sender,
    options: &DispatchOptions,
) -> Result<Pass, DispatchError> {
    let mut pass = Pass::default();
    loop {
        let read = plan(pool, options.batch, &mut pass).await?;
        if read < options.batch.max(1) as usize {
            break;
        }
    }
    pass.digests = release(pool, options.digest_settle).await?;
    send_due(pool, sender, options, &mut pass).await?;
    if pass.detections > 0 || pass.sent > 0 || pass.failed > 0 {
        debug!(?pass, "Alert pass done.");
    }
    Ok(pass)
}

/// Locks the cursor row (creating it at the newest detection on the first pass ever) and returns
/// it.
async fn lock_cursor(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query(
        "INSERT INTO settings (key, value) \
         SELECT $1, jsonb_build_object('detection_id', coalesce(max(id), 0)) FROM detections \
         ON CONFLICT (key) DO NOTHING",
    )
    .bind(CURSOR_KEY)
    .execute(&mut *conn)
    .await?;
    let cursor: Option<i64> = sqlx::query_scalar(
        "SELECT (value->>'detection_id')::bigint FROM settings WHERE key = $1 FOR UPDATE",
    )
    .bind(CURSOR_KEY)
    .fetch_one(&mut *conn)
    .await?;
    match cursor {
        Some(cursor) => Ok(cursor),
        // Unreadable (edited by hand): start from the newest, as on the first pass.
        None => {
            sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM detections")
                .fetch_one(&mut *conn)
                .await
        }
    }
}

async fn set_cursor(conn: &mut PgConnection, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE settings SET value = jsonb_build_object('detection_id', $2::bigint), \
         updated_at = now() WHERE key = $1",
    )
    .bind(CURSOR_KEY)
    .bind(id)
    .execute(conn)
    .await
    .map(drop)
}

fn detection_from_row(row: &PgRow) -> Result<Detection, sqlx::Error> {
    Ok(Detection {
        id: row.try_get("id")?,
        addr: row.try_get("attacker_addr")?,
        rule: row.try_get("rule")?,
        service: row.try_get("service")?,
        severity: row.try_get("severity")?,
        at: row.try_get("at")?,
        server: row.try_get("server_name")?,
        attacker_id: row.try_get("attacker_id")?,
        evidence: row.try_get("evidence")?,
    })
}

/// Plans one batch; returns how many detections it read.
async fn plan(pool: &PgPool, batch: i64, pass: &mut Pass) -> Result<usize, DispatchError> {
    let mut tx = pool.begin().await?;
    let cursor = lock_cursor(&mut tx).await?;
    let detections = sqlx::query(
        "SELECT id, attacker_addr, rule, service, severity, at, server_name, attacker_id, \
         evidence[1:5] AS evidence FROM detections WHERE id > $1 ORDER BY id LIMIT $2",
    )
    .bind(cursor)
    .bind(batch.max(1))
    .fetch_all(&mut *tx)
    .await?
    .iter()
    .map(detection_from_row)
    .collect::<Result<Vec<_>, _>>()?;
    let Some(last) = detections.last().map(|d| d.id) else {
        tx.commit().await?;
        return Ok(0);
    };
    for channel in db::alert_channels::enabled(&mut *tx).await? {
        plan_channel(&mut tx, &channel, &detections, pass).await?;
    }
    set_cursor(&mut tx, last).await?;
    tx.commit().await?;
    pass.detections += detections.len();
    Ok(detections.len())
}

fn dedup_key(d: &Detection) -> String {
    format!("{}|{}", d.rule, d.addr)
}

async fn plan_channel(
    conn: &mut PgConnection,
    channel: &AlertChannel,
    detections: &[Detection],
    pass: &mut Pass,
) -> Result<(), DispatchError> {
    let min = severity_rank(&channel.min_severity);
    let eligible = detections
        .iter()
        .filter(|d| severity_rank(&d.severity) >= min);
    // Groups in order of first appearance. Without a window every detection is its own alert.
    let mut groups: Vec<(String, Vec<&Detection>)> = Vec::new();
    if channel.dedup_window_secs > 0 {
        let mut index: HashMap<String, usize> = HashMap::new();
        for d in eligible {
            let key = dedup_key(d);
            match index.get(&key) {
                Some(&i) => groups[i].1.push(d),
                None => {
                    index.insert(key.clone(), groups.len());
                    groups.push((key, vec![d]));
                }
            }
        }
    } else {
        groups.extend(eligible.map(|d| (dedup_key(d), vec![d])));
    }
    if groups.is_empty() {
        return Ok(());
    }
    let recent: std::collections::HashSet<String> = if channel.dedup_window_secs > 0 {
        let keys: Vec<String> = groups.iter().map(|(k, _)| k.clone()).collect();
        db::alert_deliveries::recent_keys(&mut *conn, channel.id, channel.dedup_window_secs, &keys)
            .await?
            .into_iter()
            .collect()
    } else {
        Default::default()
    };
    let mut candidates = Vec::with_capacity(groups.len());
    for (key, group) in groups {
        if !recent.contains(&key) {
            candidates.push((key, group));
            continue;
        }
        let Some(alert) = Alert::new(&group) else {
            continue;
        };
        let payload = serde_json::to_value(&alert).unwrap_or_default();
        db::alert_deliveries::insert(
            &mut *conn,
            &NewDelivery {
                channel_id: channel.id,
                kind: "alert",
                dedup_key: &key,
                status: "suppressed",
                detection_count: group.len() as i64,
                first_detection: Some(alert.first_detection),
                last_detection: Some(alert.last_detection),
                payload: &payload,
                queue: false,
            },
        )
        .await?;
        pass.suppressed += group.len();
    }
    if candidates.is_empty() {
        return Ok(());
    }

    let used = db::alert_deliveries::budget_used(&mut *conn, channel.id).await?;
    let budget = usize::try_from(i64::from(channel.max_per_hour) - used).unwrap_or(0);
    let collecting = db::alert_deliveries::collecting_digest(&mut *conn, channel.id).await?;
    // While a digest collects, everything joins it (it holds the budget's last place); otherwise
    // alerts go one by one while the budget lasts, keeping its last place for the digest of the
    // rest.
    let individual = match collecting {
        Some(_) => 0,
        None if candidates.len() <= budget => candidates.len(),
        None => budget.saturating_sub(1),
    };
    let rest = candidates.split_off(individual);
    for (key, group) in &candidates {
        let Some(alert) = Alert::new(group) else {
            continue;
        };
        let payload = serde_json::to_value(&alert).unwrap_or_default();
        db::alert_deliveries::insert(
            &mut *conn,
            &NewDelivery {
                channel_id: channel.id,
                kind: "alert",
                dedup_key: key,
                status: "pending",
                detection_count: group.len() as i64,
                first_detection: Some(alert.first_detection),
                last_detection: Some(alert.last_detection),
                payload: &payload,
                queue: true,
            },
        )
        .await?;
        pass.alerts += 1;
    }
    if rest.is_empty() {
        return Ok(());
    }
    let (id, mut digest) = match collecting {
        Some((id, payload)) => (
            Some(id),
            serde_json::from_value::<Digest>(payload)
                .map_err(|source| DispatchError::Payload { id, source })?,
        ),
        None => (None, Digest::default()),
    };
    for (_, group) in &rest {
        for d in group {
            digest.add(d);
            pass.digested += 1;
        }
    }
    let payload = serde_json::to_value(&digest).unwrap_or_default();
    match id {
        Some(id) => {
            db::alert_deliveries::update_digest(
                &mut *conn,
                id,
                &payload,
                digest.total,
                digest.last_detection,
            )
            .await?;
        }
        None => {
            db::alert_deliveries::insert(
                &mut *conn,
                &NewDelivery {
                    channel_id: channel.id,
                    kind: "digest",
                    dedup_key: "digest",
                    status: "pending",
                    detection_count: digest.total,
                    first_detection: digest.first_detection,
                    last_detection: digest.last_detection,
                    payload: &payload,
                    queue: false,
                },
            )
            .await?;
        }
    }
    Ok(())
}

/// Releases settled digests whose channel has a free place in its budget; returns how many.
async fn release(pool: &PgPool, settle: Duration) -> Result<usize, DispatchError> {
    let mut tx = pool.begin().await?;
    // Serialized with planning.
    lock_cursor(&mut tx).await?;
    let mut released = 0;
    for (channel_id, id, max_per_hour) in
        db::alert_deliveries::settled_digests(&mut *tx, settle.as_secs_f64()).await?
    {
        let used = db::alert_deliveries::budget_used(&mut *tx, channel_id).await?;
        if used < i64::from(max_per_hour) {
            db::alert_deliveries::release_digest(&mut *tx, id).await?;
            released += 1;
        }
    }
    tx.commit().await?;
    Ok(released)
}

/// What a channel's sending task reports.
#[derive(Debug, Default)]
struct Sent {
    sent: usize,
    failed: usize,
    more: bool,
}

async fn send_due(
    pool: &PgPool,
    sender: &Sender,
    options: &DispatchOptions,
    pass: &mut Pass,
) -> Result<(), DispatchError> {
    let channels = db::alert_deliveries::due_channels(pool).await?;
    let mut tasks = JoinSet::new();
    for channel_id in channels {
        let (pool, sender) = (pool.clone(), sender.clone());
        // Long enough for every claimed message to time out once, and then some.
        let lease = options.send_timeout.as_secs_f64() * SEND_PER_PASS as f64 + 60.0;
        tasks.spawn(async move { send_channel(&pool, &sender, channel_id, lease).await });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(sent)) => {
                pass.sent += sent.sent;
                pass.failed += sent.failed;
                pass.more |= sent.more;
            }
            Ok(Err(err)) => warn!(error = %err, "Sending alerts of a channel failed."),
            Err(err) => warn!(error = %err, "An alert sending task panicked."),
        }
    }
    Ok(())
}

/// Sends one channel's due deliveries, in order, stopping at the first failure.
async fn send_channel(
    pool: &PgPool,
    sender: &Sender,
    channel_id: i64,
    lease: f64,
) -> Result<Sent, DispatchError> {
    let mut out = Sent::default();
    let Some(channel) = db::alert_channels::get(pool, channel_id).await? else {
        return Ok(out);
    };
    let due = db::alert_deliveries::claim_due(pool, channel_id, SEND_PER_PASS, lease).await?;
    out.more = due.len() as i64 == SEND_PER_PASS;
    if !channel.enabled {
        for d in &due {
            db::alert_deliveries::mark_suppressed(pool, d.id, "the channel was disabled").await?;
        }
        return Ok(out);
    }
    let config = ChannelConfig::parse(&channel.kind, &channel.config);
    let info = ChannelInfo {
        name: &channel.name,
        max_per_hour: channel.max_per_hour,
    };
    for (i, d) in due.iter().enumerate() {
        let result = match &config {
            Ok(config) => deliver(sender, config, info, d).await,
            Err(err) => Err(format!("the stored configuration is invalid: {err}")),
        };
        match result {
            Ok(()) => {
                db::alert_deliveries::mark_sent(pool, d.id).await?;
                metrics::counter!(MESSAGES_METRIC, "kind" => d.kind.clone(), "status" => "sent")
                    .increment(1);
                out.sent += 1;
            }
            Err(error) => {
                let attempts = d.attempts + 1;
                let retry = (attempts < MAX_ATTEMPTS).then(|| {
                    let step = usize::try_from(attempts - 1).unwrap_or_default();
                    BACKOFF_SECS[step.min(BACKOFF_SECS.len() - 1)] as f64
                });
                db::alert_deliveries::mark_failed(pool, d.id, &error, retry).await?;
                metrics::counter!(MESSAGES_METRIC, "kind" => d.kind.clone(), "status" => "failed")
                    .increment(1);
                warn!(
                    channel = %channel.name, delivery = d.id, attempts, retry_in_secs = retry,
                    error = %error, "Alert delivery failed."
                );
                out.failed += 1;
                // The receiver is failing: the channel's other messages wait as long.
                let rest: Vec<i64> = due[i + 1..].iter().map(|d| d.id).collect();
                if !rest.is_empty() {
                    db::alert_deliveries::postpone(
                        pool,
                        &rest,
                        retry.unwrap_or(BACKOFF_SECS[0] as f64),
                    )
                    .await?;
                }
                out.more = false;
                break;
            }
        }
    }
    Ok(out)
}

async fn deliver(
    sender: &Sender,
    config: &ChannelConfig,
    info: ChannelInfo<'_>,
    d: &Due,
) -> Result<(), String> {
    let message = message::render(&d.kind, &d.payload, info)
        .map_err(|e| format!("unreadable payload: {e}"))?;
    sender
        .send(config, &message, d.id)
        .await
        .map_err(|e| e.chain())
}

/// Sends a test message through `channel` now and records it (outside the budget); returns the
/// delivery id.
pub async fn send_test(
    pool: &PgPool,
    sender: &Sender,
    channel: &AlertChannel,
) -> Result<i64, DispatchError> {
    let payload = json!({});
    let id = db::alert_deliveries::insert(
        pool,
        &NewDelivery {
            channel_id: channel.id,
            kind: "test",
            dedup_key: "test",
            status: "pending",
            detection_count: 0,
            first_detection: None,
            last_detection: None,
            payload: &payload,
            queue: false,
        },
    )
    .await?;
    let info = ChannelInfo {
        name: &channel.name,
        max_per_hour: channel.max_per_hour,
    };
    let result = match ChannelConfig::parse(&channel.kind, &channel.config) {
        Ok(config) => {
            let due = Due {
                id,
                channel_id: channel.id,
                kind: "test".to_owned(),
                payload: Value::Null,
                attempts: 0,
            };
            deliver(sender, &config, info, &due).await
        }
        Err(err) => Err(format!("the stored configuration is invalid: {err}")),
    };
    match result {
        Ok(()) => db::alert_deliveries::mark_sent(pool, id).await?,
        // A test is not retried: the admin sees the result and tries again.
        Err(error) => db::alert_deliveries::mark_failed(pool, id, &error, None).await?,
    }
    Ok(id)
}

/// The background dispatcher: passes while this replica holds the dispatcher lock, woken by
/// `NOTIFY mirage_detection` or every `options.poll`. Runs until aborted.
pub async fn run(pool: PgPool, options: DispatchOptions) {
    let sender = match Sender::new(options.send_timeout) {
        Ok(sender) => sender,
        Err(err) => {
            warn!(error = %err, "Alert dispatcher cannot start; no alerts will be sent.");
            return;
        }
    };
    loop {
        if let Err(err) = lead(&pool, &sender, &options).await {
            warn!(error = %err, "Alert dispatcher stopped; retrying.");
        }
        tokio::time::sleep(options.poll).await;
    }
}

/// Waits for the dispatcher lock on a dedicated connection, then dispatches while holding it.
/// Returns when the lock's connection fails (another replica may then take over).
async fn lead(
    pool: &PgPool,
    sender: &Sender,
    options: &DispatchOptions,
) -> Result<(), sqlx::Error> {
    let mut lock = PgConnection::connect_with(&pool.connect_options()).await?;
    loop {
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK_KEY)
            .fetch_one(&mut lock)
            .await?;
        if got {
            break;
        }
        tokio::time::sleep(options.poll).await;
    }
    info!("Alert dispatcher running on this replica.");
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(DETECTION_CHANNEL).await?;
    loop {
        let more = match run_once(pool, sender, options).await {
            Ok(pass) => pass.more,
            Err(err) => {
                warn!(error = %err, "Alert pass failed.");
                false
            }
        };
        if !more {
            tokio::select! {
                notified = listener.try_recv() => {
                    if let Err(err) = notified {
                        warn!(error = %err, "Listening for detections failed.");
                        tokio::time::sleep(options.poll).await;
                    }
                }
                () = tokio::time::sleep(options.poll) => {}
            }
        }
        // Still the leader: the lock lives as long as its connection.
        sqlx::query("SELECT 1").execute(&mut lock).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_ends() {
        assert!(BACKOFF_SECS.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(BACKOFF_SECS.len() as i32, MAX_ATTEMPTS - 1);
    }
}
