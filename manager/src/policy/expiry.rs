//! The expiry sweep: removes expired attacker entries, each with a `remove` revision, found
//! through the `attackers_expires_at` partial index (never a full scan). Agents also expire
//! entries in the kernel on their own; the sweep keeps the database, the snapshot and the
//! agents' maps from accumulating dead entries.

use std::time::Duration;

use sqlx::PgPool;

use crate::{
    db::{self, audit_log::Actor, policy_revisions::Revision},
    policy,
};

/// Entries removed per transaction.
const BATCH: i64 = 500;

/// Removes every expired entry; returns how many.
pub async fn sweep_once(pool: &PgPool) -> Result<usize, sqlx::Error> {
    let mut total = 0;
    loop {
        let mut tx = pool.begin().await?;
        policy::lock_head(&mut *tx).await?;
        let expired = db::attackers::lock_expired(&mut *tx, BATCH).await?;
        if expired.is_empty() {
            tx.rollback().await?;
            return Ok(total);
        }
        let mut removed = Vec::with_capacity(expired.len());
        for attacker in &expired {
            let revision = db::policy_revisions::next(&mut *tx).await?;
            db::attackers::delete(&mut *tx, attacker.id).await?;
            let rev = Revision {
                revision,
                group_id: attacker.group_id,
                op: "remove".to_owned(),
                net: Some(attacker.net),
                action: Some(attacker.action.clone()),
                expires_at: attacker.expires_at,
                details: serde_json::json!({ "id": attacker.id, "reason": "expired" }),
            };
            db::policy_revisions::insert(&mut *tx, &rev).await?;
            removed.push(
                serde_json::json!({ "id": attacker.id, "net": attacker.net, "revision": revision }),
            );
        }
        if let Some(last) = removed.last().and_then(|r| r["revision"].as_i64()) {
            db::policy_revisions::notify(&mut *tx, last).await?;
        }
        db::audit_log::record(
            &mut *tx,
            &Actor::system(),
            "attacker.expire",
            None,
            serde_json::json!({ "removed": removed }),
        )
        .await?;
        tx.commit().await?;
        total += expired.len();
        if (expired.len() as i64) < BATCH {
            return Ok(total);
        }
    }
}

/// Sweeps every `interval` until the task is aborted.
pub async fn run(pool: PgPool, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        match sweep_once(&pool).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "Expired attackers removed."),
            Err(err) => tracing::warn!(error = %err, "Expiry sweep failed."),
        }
    }
}
