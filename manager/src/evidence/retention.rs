//! The retention sweep: deletes detections, sandbox sessions, audit rows, login attempts and
//! policy revisions older than the `retention` setting, in statements of at most [`BATCH`] rows
//! (each its own transaction, so no lock is held long and no table is locked whole).
//!
//! Policy revisions go only as a prefix of the log and never the head's row
//! ([`db::retention::revisions_keep_from`]): an agent whose position is no longer in the log gets
//! a snapshot from [`crate::policy::load`], as it does after any pruning.

use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;

use crate::db::{
    self,
    audit_log::Actor,
    retention::{Retention, Table},
};

/// Rows per delete statement.
pub const BATCH: i64 = 10_000;
/// How often `serve` sweeps.
pub const INTERVAL: Duration = Duration::from_secs(3600);

/// Rows one sweep deleted, per table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Swept {
    /// Detections.
    pub detections: u64,
    /// Sandbox sessions.
    pub sandbox_sessions: u64,
    /// Audit log rows.
    pub audit_log: u64,
    /// Login attempts.
    pub login_attempts: u64,
    /// Policy revisions.
    pub policy_revisions: u64,
}

impl Swept {
    /// Every row deleted.
    pub fn total(&self) -> u64 {
        self.detections
            + self.sandbox_sessions
            + self.audit_log
            + self.login_attempts
            + self.policy_revisions
    }

    fn slot(&mut self, table: Table) -> &mut u64 {
        match table {
            Table::Detections => &mut self.detections,
            Table::SandboxSessions => &mut self.sandbox_sessions,
            Table::AuditLog => &mut self.audit_log,
            Table::LoginAttempts => &mut self.login_attempts,
        }
    }
}

/// Deletes everything older than the current setting; what it deleted. The sweep records itself
/// in the audit log when it deleted anything.
pub async fn sweep_once(pool: &PgPool) -> Result<Swept, sqlx::Error> {
    let retention = db::retention::get(pool).await?;
    let swept = sweep_with(pool, &retention).await?;
    if swept.total() > 0 {
        db::audit_log::record(
            pool,
            &Actor::system(),
            "retention.sweep",
            None,
            serde_json::json!({ "deleted": swept, "retention": retention }),
        )
        .await?;
    }
    Ok(swept)
}

async fn sweep_with(pool: &PgPool, retention: &Retention) -> Result<Swept, sqlx::Error> {
    let mut swept = Swept::default();
    for table in Table::ALL {
        let days = table.days(retention);
        loop {
            let n = db::retention::delete_older(pool, table, days, BATCH).await?;
            *swept.slot(table) += n;
            metrics::counter!(super::RETENTION_DELETED, "table" => table.name()).increment(n);
            if n < BATCH as u64 {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    let keep_from =
        db::retention::revisions_keep_from(pool, retention.policy_revisions_days).await?;
    loop {
        let n = db::retention::delete_revisions_before(pool, keep_from, BATCH).await?;
        swept.policy_revisions += n;
        metrics::counter!(super::RETENTION_DELETED, "table" => "policy_revisions").increment(n);
        if n < BATCH as u64 {
            break;
        }
        tokio::task::yield_now().await;
    }
    // Agents' flow reports only serve attributing sessions that start soon after; a week is
    // ample and not an operator setting.
    let flows = db::flows::prune(pool, time::OffsetDateTime::now_utc() - FLOWS_KEEP).await?;
    metrics::counter!(super::RETENTION_DELETED, "table" => "agent_flows").increment(flows);
    Ok(swept)
}

/// How long agents' flow reports are kept.
const FLOWS_KEEP: time::Duration = time::Duration::days(7);

/// Sweeps every `interval` (the first time at once) until the task is aborted.
pub async fn run(pool: PgPool, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        match sweep_once(&pool).await {
            Ok(swept) if swept.total() == 0 => {}
            Ok(swept) => tracing::info!(
                detections = swept.detections,
                sandbox_sessions = swept.sandbox_sessions,
                audit_log = swept.audit_log,
                login_attempts = swept.login_attempts,
                policy_revisions = swept.policy_revisions,
                "Old records deleted."
            ),
            Err(err) => tracing::warn!(error = %err, "Retention sweep failed."),
        }
    }
}
