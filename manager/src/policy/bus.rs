//! [`PolicyBus`]: one `LISTEN mirage_policy` connection per manager, fanned out to every open
//! agent stream through a tokio broadcast channel. A notification only wakes streams; each stream
//! then reads the revisions after its own position from the database, so a lost or coalesced
//! notification, or a lagging receiver, costs a query, never a revision. Replicas on one
//! database wake each other the same way: the NOTIFY comes from whichever replica committed.

use std::{sync::Arc, time::Duration};

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::{OnceCell, broadcast, watch};

use super::shared::{Shared, SharedLoads};
use crate::db::policy_revisions::CHANNEL;

/// Wake-ups buffered per stream; a stream further behind sees `Lagged` and simply re-reads.
const CAPACITY: usize = 64;

/// What a notification says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A revision was committed: re-read from your position.
    Revision(i64),
    /// An agent was revoked: its streams end (payload `revoke:<id>`).
    Revoked(i64),
    /// Notifications may have been lost (the LISTEN connection was re-established): re-read.
    Resync,
}

impl Wake {
    /// Parses a `mirage_policy` payload; anything unknown is a resync (harmless: a re-read).
    pub fn parse(payload: &str) -> Self {
        if let Some(id) = payload.strip_prefix("revoke:") {
            return id.parse().map_or(Self::Resync, Self::Revoked);
        }
        payload.parse().map_or(Self::Resync, Self::Revision)
    }
}

/// The fan-out of policy notifications.
#[derive(Debug, Clone)]
pub struct PolicyBus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    tx: broadcast::Sender<Wake>,
    listening: OnceCell<()>,
    /// Set at shutdown: streams end, so that graceful shutdown is not held open by them.
    closed: watch::Sender<bool>,
    /// The re-reads wake-ups cause, shared between streams.
    loads: SharedLoads,
}

impl PolicyBus {
    /// A bus over `pool`'s database; it starts listening on the first [`PolicyBus::subscribe`].
    pub fn new(pool: PgPool) -> Self {
        let (tx, _) = broadcast::channel(CAPACITY);
        Self {
            inner: Arc::new(Inner {
                pool,
                tx,
                listening: OnceCell::new(),
                closed: watch::Sender::new(false),
                loads: SharedLoads::default(),
            }),
        }
    }

    /// A receiver of wake-ups. When this returns, the LISTEN is in
    /// place: anything committed afterwards wakes the receiver, so a caller that subscribes
    /// before reading the database misses nothing.
    pub async fn subscribe(&self) -> Result<broadcast::Receiver<Wake>, sqlx::Error> {
        let rx = self.inner.tx.subscribe();
        self.inner
            .listening
            .get_or_try_init(|| async {
                let mut listener = PgListener::connect_with(&self.inner.pool).await?;
                listener.listen(CHANNEL).await?;
                tokio::spawn(relay(listener, self.inner.tx.clone()));
                Ok::<_, sqlx::Error>(())
            })
            .await?;
        Ok(rx)
    }

    /// Ends every stream (at shutdown: an open event stream would otherwise hold the graceful
    /// shutdown forever). Agents reconnect, to another replica or after the restart, and resume.
    pub fn close(&self) {
        self.inner.closed.send_replace(true);
    }

    /// Resolves once [`PolicyBus::close`] was called.
    pub async fn closed(&self) {
        let mut rx = self.inner.closed.subscribe();
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// What an agent of `group_id` at `since` needs, read after `woke` (the moment the caller
    /// was woken), shared with the other streams woken by the same change
    /// ([`SharedLoads`]).
    pub async fn load(
        &self,
        group_id: i64,
        since: Option<i64>,
        woke: tokio::time::Instant,
    ) -> Shared {
        self.inner
            .loads
            .load(&self.inner.pool, group_id, since, woke)
            .await
    }

    /// Wakes this manager's streams (tests, and after local changes made without NOTIFY).
    pub fn wake(&self, wake: Wake) {
        let _ = self.inner.tx.send(wake);
    }
}

/// Forwards notifications until the process ends. sqlx reconnects a lost connection and
/// re-issues the LISTEN; notifications sent meanwhile are lost, so streams are woken to re-read.
async fn relay(mut listener: PgListener, tx: broadcast::Sender<Wake>) {
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => {
                let _ = tx.send(Wake::parse(notification.payload()));
            }
            Ok(None) => {
                tracing::warn!("The LISTEN connection was lost and re-established.");
                let _ = tx.send(Wake::Resync);
            }
            Err(err) => {
                tracing::warn!(error = %err, "LISTEN failed; retrying in 1 s.");
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = tx.send(Wake::Resync);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_payloads() {
        assert_eq!(Wake::parse("42"), Wake::Revision(42));
        assert_eq!(Wake::parse("revoke:7"), Wake::Revoked(7));
        assert_eq!(Wake::parse("revoke:x"), Wake::Resync);
        assert_eq!(Wake::parse(""), Wake::Resync);
    }
}
