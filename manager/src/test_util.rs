//! Test harness (feature `test-util`): one embedded PostgreSQL cluster per test binary, in a
//! temporary directory, and a fresh migrated database per test.
//!
//! The cluster starts on first use and is stopped, and its directory removed, when the test
//! binary exits (an `atexit` hook: Rust never drops statics, and the test harness ends the process
//! with `exit`, which runs the hook also when tests failed). Each [`TestDb`] is a new database
//! `test_<n>` in it, so tests share one ~2 s `initdb` and still see nothing of each other.
#![expect(
    clippy::expect_used,
    reason = "test harness: a set-up failure is the test's failure, with the message"
)]

use std::{
    path::Path,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use sqlx::{PgPool, postgres::PgConnectOptions};
use tempfile::TempDir;

use crate::{
    AppState, ManagerConfig,
    config::DEFAULT_POSTGRES_BIN_DIR,
    db::{self, embedded::EmbeddedOptions, embedded::EmbeddedPostgres},
};

/// The cluster and its directory (the cluster is declared first so it stops before the
/// directory is removed).
struct Cluster {
    pg: EmbeddedPostgres,
    _dir: TempDir,
}

static CLUSTER: OnceLock<Mutex<Option<Cluster>>> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

extern "C" fn stop_cluster() {
    if let Some(cell) = CLUSTER.get() {
        let cluster = match cell.lock() {
            Ok(mut guard) => guard.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(cluster);
    }
}

/// A temporary directory the `postgres` user can enter (tempfile makes them 0700).
pub fn temp_dir() -> TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::Builder::new()
        .prefix("mirage-manager-test-")
        .tempdir()
        .expect("creating a temporary directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod of the temporary directory");
    dir
}

/// Options for throw-away clusters: the Debian binaries, no fsync.
pub fn test_options() -> EmbeddedOptions {
    EmbeddedOptions {
        durable: false,
        ..EmbeddedOptions::new(DEFAULT_POSTGRES_BIN_DIR)
    }
}

/// Starts a cluster in `dir/postgres` (for tests of the cluster itself).
pub fn start_cluster(dir: &Path) -> EmbeddedPostgres {
    EmbeddedPostgres::start(&dir.join("postgres"), &test_options())
        .expect("starting an embedded PostgreSQL cluster")
}

/// Connection options for `database` on the shared cluster, starting it on first use.
fn shared_options(database: &str) -> (PgConnectOptions, String) {
    let cell = CLUSTER.get_or_init(|| {
        let dir = temp_dir();
        let pg = start_cluster(dir.path());
        // SAFETY: `stop_cluster` is a plain `extern "C" fn` with no arguments that stays valid for
        // the life of the process; atexit only stores the pointer.
        let rc = unsafe { libc::atexit(stop_cluster) };
        assert_eq!(rc, 0, "atexit");
        Mutex::new(Some(Cluster { pg, _dir: dir }))
    });
    let guard = cell.lock().expect("cluster lock");
    let cluster = guard.as_ref().expect("the cluster is stopped");
    (
        cluster.pg.connect_options(database),
        cluster.pg.url(database),
    )
}

/// A fresh, migrated database on the shared cluster.
#[derive(Debug)]
pub struct TestDb {
    /// A pool on it.
    pub pool: PgPool,
    /// Its name.
    pub name: String,
    /// A `postgres://` URL for it (Unix socket), for configs and child processes.
    pub url: String,
}

impl TestDb {
    /// Creates `test_<n>` and applies the migrations.
    pub async fn new() -> Self {
        let db = Self::unmigrated().await;
        db::migrate::run(&db.pool).await.expect("migrations");
        db
    }

    /// Creates `test_<n>` without applying the migrations.
    pub async fn unmigrated() -> Self {
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let (admin, _) = shared_options("postgres");
        db::create_database(admin, &name)
            .await
            .expect("creating the test database");
        let (options, url) = shared_options(&name);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("connecting to the test database");
        Self { pool, name, url }
    }

    /// App state over this database with [`test_config`].
    pub fn state(&self) -> AppState {
        self.state_with(test_config())
    }

    /// App state over this database with `config`.
    pub fn state_with(&self, config: ManagerConfig) -> AppState {
        AppState::new(self.pool.clone(), config)
    }
}

/// The configuration tests use: cookies without `Secure` (the `oneshot` client does not care,
/// but the cookie name differs), everything else default.
pub fn test_config() -> ManagerConfig {
    ManagerConfig {
        cookie_secure: false,
        ..ManagerConfig::default()
    }
}
