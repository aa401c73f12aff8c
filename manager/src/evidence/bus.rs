//! [`DetectionBus`]: one `LISTEN mirage_detection` connection per manager, fanned out to every
//! open live attack-log stream, the same way [`crate::policy::bus::PolicyBus`] fans out policy
//! changes. A notification only wakes streams; each reads the detections after its own position
//! from the database, so a lost or coalesced notification, or a lagging receiver, costs a query,
//! never a detection. Kept apart from the policy bus so that a flood of detections never wakes
//! the agents' policy streams.

use std::{sync::Arc, time::Duration};

use sqlx::{PgPool, postgres::PgListener};
use tokio::sync::{OnceCell, broadcast};

use crate::db::detections::CHANNEL;

/// Wake-ups buffered per stream; a stream further behind sees `Lagged` and simply re-reads.
const CAPACITY: usize = 64;

/// The fan-out of `mirage_detection` notifications. Each wake carries the newest detection id
/// (0: notifications may have been lost; re-read).
#[derive(Debug, Clone)]
pub struct DetectionBus {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    tx: broadcast::Sender<i64>,
    listening: OnceCell<()>,
}

impl DetectionBus {
    /// A bus over `pool`'s database; it starts listening on the first
    /// [`DetectionBus::subscribe`].
    pub fn new(pool: PgPool) -> Self {
        let (tx, _) = broadcast::channel(CAPACITY);
        Self {
            inner: Arc::new(Inner {
                pool,
                tx,
                listening: OnceCell::new(),
            }),
        }
    }

    /// A receiver of wake-ups. When this returns the LISTEN is in place, so a caller that
    /// subscribes before reading the database misses nothing.
    pub async fn subscribe(&self) -> Result<broadcast::Receiver<i64>, sqlx::Error> {
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
}

/// Forwards notifications until the process ends (sqlx re-establishes a lost connection and its
/// LISTEN; streams are woken to re-read what may have been missed meanwhile).
async fn relay(mut listener: PgListener, tx: broadcast::Sender<i64>) {
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => {
                let _ = tx.send(notification.payload().parse().unwrap_or(0));
            }
            Ok(None) => {
                tracing::warn!("The detection LISTEN connection was lost and re-established.");
                let _ = tx.send(0);
            }
            Err(err) => {
                tracing::warn!(error = %err, "Detection LISTEN failed; retrying in 1 s.");
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = tx.send(0);
            }
        }
    }
}
