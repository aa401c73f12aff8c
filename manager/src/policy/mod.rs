//! What agents enforce, and how it reaches them: validation ([`net`]), the change log
//! (`db::policy_revisions`), the LISTEN/NOTIFY fan-out ([`bus`]), the snapshot-or-deltas answer
//! both the stream and the poll endpoint give ([`load`]), and the expiry sweep ([`expiry`]).
//!
//! Lock order for every writer: the `policy_head` row first (through
//! `db::policy_revisions::next` or [`lock_head`]), then attacker or policy rows. One order means
//! no deadlock between the API, the sweep and other replicas.

pub mod bus;
pub mod expiry;
pub mod net;
pub mod shared;
pub mod validate;

use ipnet::IpNet;
use serde::Serialize;
use sqlx::{PgConnection, PgExecutor, PgPool};
use time::OffsetDateTime;

use crate::db::{
    self,
    policies::Policy,
    policy_revisions::{self, Revision},
};

/// Most deltas one answer carries; an agent further behind gets them in pages (the poll) or in
/// consecutive batches (the stream).
pub const MAX_DELTAS: i64 = 10_000;

/// One attacker entry in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// Address or range.
    pub net: IpNet,
    /// `default`, `drop`, `redirect` or `reflect`.
    pub action: String,
    /// Expiry (enforced by the kernel too).
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
    /// The entry's group; `null`: every group (an agent tells which row a later delta changes
    /// when an address has both).
    pub group_id: Option<i64>,
}

/// Everything an agent enforces, as of `revision`.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// The revision it reflects: resume from here.
    pub revision: i64,
    /// The group's policy.
    pub policy: Policy,
    /// Every live attacker entry for the group.
    pub attackers: Vec<Entry>,
}

/// The answer to "what changed since N".
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Update {
    /// N is unknown or no longer in the log: start over from this.
    Snapshot(Box<Snapshot>),
    /// The changes after N, in order.
    Deltas {
        /// Resume from here (the last delta's revision, or the head if there were fewer than
        /// [`MAX_DELTAS`]: later revisions belonged to other groups).
        revision: i64,
        /// The changes.
        deltas: Vec<Revision>,
    },
}

/// Errors loading an update.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The query failed.
    #[error("loading the policy")]
    Db(#[from] sqlx::Error),
    /// The agent's group has no policy row (cannot happen: policies cascade with groups).
    #[error("group {0} has no policy")]
    NoPolicy(i64),
}

/// Locks the head without advancing it (the sweep takes it before it knows whether it will
/// write).
pub async fn lock_head(ex: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT revision FROM policy_head FOR UPDATE")
        .fetch_one(ex)
        .await
}

/// Writes the revision row and queues the notification: the last step of every change, in the
/// change's transaction.
pub async fn record(conn: &mut PgConnection, rev: &Revision) -> Result<(), sqlx::Error> {
    policy_revisions::insert(&mut *conn, rev).await?;
    policy_revisions::notify(&mut *conn, rev.revision).await
}

/// What an agent of `group_id` that has applied `since` needs: the deltas after it if the log
/// still holds them, otherwise a snapshot. Read in one repeatable-read transaction, so the head,
/// the attackers and the policy are one consistent state.
pub async fn load(pool: &PgPool, group_id: i64, since: Option<i64>) -> Result<Update, LoadError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let head = policy_revisions::head(&mut *tx).await?;
    if let Some(since) = since {
        let oldest = policy_revisions::oldest(&mut *tx).await?;
        // Resumable: not ahead of us, and every revision after it still in the log.
        let resumable = (0..=head).contains(&since)
            && (since == head || oldest.is_some_and(|oldest| oldest <= since + 1));
        if resumable {
            let deltas = policy_revisions::after(&mut *tx, since, group_id, MAX_DELTAS).await?;
            let revision = match deltas.last() {
                Some(last) if deltas.len() as i64 == MAX_DELTAS => last.revision,
                _ => head,
            };
            tx.commit().await?;
            return Ok(Update::Deltas { revision, deltas });
        }
    }
    let policy = db::policies::get(&mut *tx, group_id)
        .await?
        .ok_or(LoadError::NoPolicy(group_id))?;
    let attackers = db::attackers::live_entries_for_group(&mut *tx, group_id)
        .await?
        .into_iter()
        .map(|(net, action, expires_at, group_id)| Entry {
            net,
            action,
            expires_at,
            group_id,
        })
        .collect();
    tx.commit().await?;
    Ok(Update::Snapshot(Box::new(Snapshot {
        revision: head,
        policy,
        attackers,
    })))
}
