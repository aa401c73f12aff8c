//! The schema migrations in `manager/migrations/`, embedded in the binary and applied at start-up
//! with sqlx's migrator (which records them in `_sqlx_migrations`, checks their checksums and
//! holds an advisory lock, so replicas starting together apply each migration once).
//!
//! They are listed here with `include_str!` rather than through `sqlx::migrate!`, which would
//! pull in sqlx's proc-macro crate (and a second build of the PostgreSQL driver) for this alone;
//! a unit test checks that the list matches the directory.

use std::{borrow::Cow, future::Future, pin::Pin};

use sqlx::{
    PgPool,
    error::BoxDynError,
    migrate::{MigrateError, Migration, MigrationSource, MigrationType, Migrator},
};

/// (version, description, SQL), in version order.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "ingestion",
        include_str!("../../migrations/0002_ingestion.sql"),
    ),
    (
        3,
        "alerts",
        include_str!("../../migrations/0003_alerts.sql"),
    ),
    (4, "flows", include_str!("../../migrations/0004_flows.sql")),
];

/// The embedded migrations as a sqlx migration source.
#[derive(Debug, Clone, Copy)]
struct Embedded;

impl MigrationSource<'static> for Embedded {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 'static>> {
        Box::pin(async { Ok(migrations()) })
    }
}

fn migrations() -> Vec<Migration> {
    MIGRATIONS
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(
                version,
                Cow::Borrowed(description),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect()
}

/// Applies every migration not yet applied; a no-op when the schema is current.
pub async fn run(pool: &PgPool) -> Result<(), MigrateError> {
    Migrator::new(Embedded).await?.run(pool).await
}

/// The newest schema version this build knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_matches_the_directory() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS
            .iter()
            .map(|(v, d, _)| format!("{v:04}_{d}.sql"))
            .collect();
        assert_eq!(files, listed);
        assert!(MIGRATIONS.windows(2).all(|w| w[0].0 < w[1].0));
    }
}
