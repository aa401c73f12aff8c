//! Single-flight policy reads: when one notification wakes a thousand streams of one group at
//! the same position, one of them reads the database and the others share its answer, instead
//! of a thousand identical repeatable-read transactions queueing on the pool.
//!
//! Sharing must never hand a stream an answer older than the wake it reacts to: a stream joins a
//! read only if that read *started after* the stream was woken. The wake arrives after the
//! change committed, so such a read sees the change. Anything else starts a fresh read.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use sqlx::PgPool;
use tokio::{sync::OnceCell, time::Instant};

use super::{LoadError, Update, load};

/// A read's outcome, shared by every stream that joined it.
pub type Shared = Result<Arc<Update>, Arc<LoadError>>;

/// Finished reads are kept this long for late joiners (who still need `started > woke`), then
/// dropped when the next read is registered.
const KEEP: Duration = Duration::from_secs(2);

/// The reads in flight (or just finished), per `(group, since)`.
#[derive(Debug, Default)]
pub struct SharedLoads {
    flights: Mutex<HashMap<(i64, Option<i64>), Flight>>,
}

#[derive(Debug, Clone)]
struct Flight {
    started: Instant,
    cell: Arc<OnceCell<Shared>>,
}

impl SharedLoads {
    /// [`load`]`(pool, group_id, since)` as of some moment after `woke`, shared with every other
    /// caller that can accept the same answer.
    pub async fn load(
        &self,
        pool: &PgPool,
        group_id: i64,
        since: Option<i64>,
        woke: Instant,
    ) -> Shared {
        let key = (group_id, since);
        let cell = {
            let mut flights = match self.flights.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            match flights.get(&key) {
                Some(flight) if flight.started > woke => Arc::clone(&flight.cell),
                _ => {
                    let now = Instant::now();
                    flights.retain(|_, f| now.duration_since(f.started) < KEEP);
                    let cell = Arc::new(OnceCell::new());
                    flights.insert(
                        key,
                        Flight {
                            started: now,
                            cell: Arc::clone(&cell),
                        },
                    );
                    cell
                }
            }
        };
        // If the caller that started the read goes away mid-read, the next waiter runs it.
        cell.get_or_init(|| async {
            load(pool, group_id, since)
                .await
                .map(Arc::new)
                .map_err(Arc::new)
        })
        .await
        .clone()
    }
}
