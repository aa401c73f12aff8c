//! PostgreSQL access: opening the database (the configured server, or the embedded cluster),
//! migrations, and one module of queries per table. Queries are plain `sqlx::query` strings
//! checked at run time (against the real schema by the tests), so building needs no database.

pub mod agents;
pub mod alert_channels;
pub mod alert_deliveries;
pub mod attackers;
pub mod audit_log;
pub mod detections;
pub mod embedded;
pub mod evidence;
pub mod flows;
pub mod groups;
pub mod login_attempts;
pub mod migrate;
pub mod policies;
pub mod policy_revisions;
pub mod retention;
pub mod sandbox_sessions;
pub mod service_credentials;
pub mod sessions;
pub mod stats;
pub mod users;

use std::{os::unix::fs::DirBuilderExt as _, path::PathBuf, str::FromStr as _};

use sqlx::{
    Connection as _, Executor as _, PgPool,
    postgres::{PgConnectOptions, PgConnection, PgPoolOptions},
};
use tracing::info;

use self::embedded::{EmbeddedError, EmbeddedOptions, EmbeddedPostgres};
use crate::config::ManagerConfig;

/// The database the embedded cluster serves the manager from.
pub const EMBEDDED_DATABASE: &str = "mirage";
/// Connections in the pool.
const MAX_CONNECTIONS: u32 = 16;

/// Errors opening the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// `database_url` could not be parsed.
    #[error("database_url is not a valid PostgreSQL URL")]
    Url(#[source] sqlx::Error),
    /// Connecting or a set-up query failed.
    #[error("connecting to PostgreSQL ({what})")]
    Connect {
        /// Which server.
        what: String,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("applying the schema migrations")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// The embedded cluster could not be started.
    #[error("starting the embedded PostgreSQL cluster")]
    Embedded(#[source] EmbeddedError),
    /// The data directory could not be created.
    #[error("creating data_dir {path}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The blocking start-up task panicked or was cancelled.
    #[error("the embedded cluster's start-up task failed")]
    Join(#[source] tokio::task::JoinError),
}

/// The open database: a pool, and the embedded cluster when the manager owns one.
#[derive(Debug)]
pub struct Database {
    /// The connection pool.
    pub pool: PgPool,
    /// The embedded cluster, stopped by [`Database::close`] (or on drop).
    pub embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Connects to `database_url`, or starts (or attaches to) the embedded cluster under
    /// `data_dir`, then applies the migrations.
    pub async fn open(config: &ManagerConfig) -> Result<Self, DbError> {
        let (pool, embedded) = match &config.database_url {
            Some(url) => {
                let options = PgConnectOptions::from_str(url).map_err(DbError::Url)?;
                let pool = pool(options).await.map_err(|source| DbError::Connect {
                    what: "database_url".to_owned(),
                    source,
                })?;
                (pool, None)
            }
            None => {
                let dir = config.data_dir.join("postgres");
                // The postgres user must be able to enter data_dir (but not list it).
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o711)
                    .create(&config.data_dir)
                    .map_err(|source| DbError::DataDir {
                        path: config.data_dir.clone(),
                        source,
                    })?;
                let options = EmbeddedOptions::new(&config.postgres_bin_dir);
                let pg =
                    tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&dir, &options))
                        .await
                        .map_err(DbError::Join)?
                        .map_err(DbError::Embedded)?;
                let what = format!("embedded cluster in {}", pg.socket_dir().display());
                create_database(pg.connect_options("postgres"), EMBEDDED_DATABASE)
                    .await
                    .map_err(|source| DbError::Connect {
                        what: what.clone(),
                        source,
                    })?;
                let pool = pool(pg.connect_options(EMBEDDED_DATABASE))
                    .await
                    .map_err(|source| DbError::Connect { what, source })?;
                (pool, Some(pg))
            }
        };
        migrate::run(&pool).await.map_err(DbError::Migrate)?;
        info!(schema = migrate::latest_version(), "Database ready.");
        Ok(Self { pool, embedded })
    }

    /// Closes the pool, then stops the embedded cluster if this process owns it.
    pub async fn close(self) {
        self.pool.close().await;
        if let Some(mut pg) = self.embedded {
            let stopped = tokio::task::spawn_blocking(move || pg.stop()).await;
            match stopped {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "Stopping embedded PostgreSQL failed.");
                }
                Err(err) => tracing::warn!(error = %err, "Stopping embedded PostgreSQL failed."),
            }
        }
    }
}

async fn pool(options: PgConnectOptions) -> Result<PgPool, sqlx::Error> {
    PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .connect_with(options)
        .await
}

/// Creates database `name` unless it exists (through a connection to a maintenance database).
pub async fn create_database(admin: PgConnectOptions, name: &str) -> Result<(), sqlx::Error> {
    let mut conn = PgConnection::connect_with(&admin).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        // Identifiers cannot be bound; `name` is ours (a constant or `test_<n>`), quoted anyway.
        conn.execute(format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")).as_str())
            .await?;
        info!(database = name, "Database created.");
    }
    conn.close().await
}
