//! The `service_credentials` table: credentials of `mirage-server` instances.

use serde::Serialize;
use sqlx::{PgExecutor, Row as _, postgres::PgRow};
use time::OffsetDateTime;

/// A service credential, without its hash.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceCredential {
    /// Row id.
    pub id: i64,
    /// Unique name of the server it belongs to.
    pub name: String,
    /// Creation time.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Revocation time.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    /// Last authenticated call.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
}

/// The columns [`ServiceCredential::from_row`] reads.
pub const COLUMNS: &str = "id, name, created_at, revoked_at, last_used_at";

impl ServiceCredential {
    /// Reads [`COLUMNS`] from a row.
    pub fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            created_at: row.try_get("created_at")?,
            revoked_at: row.try_get("revoked_at")?,
            last_used_at: row.try_get("last_used_at")?,
        })
    }
}

/// Inserts a credential.
pub async fn insert(
    ex: impl PgExecutor<'_>,
    name: &str,
    credential_hash: &[u8],
    created_by: Option<i64>,
) -> Result<ServiceCredential, sqlx::Error> {
    let row = sqlx::query(&format!(
        "INSERT INTO service_credentials (name, credential_hash, created_by) \
         VALUES ($1, $2, $3) RETURNING {COLUMNS}"
    ))
    .bind(name)
    .bind(credential_hash)
    .bind(created_by)
    .fetch_one(ex)
    .await?;
    ServiceCredential::from_row(&row)
}

/// Every credential, by name.
pub async fn list(ex: impl PgExecutor<'_>) -> Result<Vec<ServiceCredential>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM service_credentials ORDER BY name"
    ))
    .fetch_all(ex)
    .await?
    .iter()
    .map(ServiceCredential::from_row)
    .collect()
}

/// Revokes a credential; `None` if there is none with this id.
pub async fn revoke(
    ex: impl PgExecutor<'_>,
    id: i64,
) -> Result<Option<ServiceCredential>, sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE service_credentials SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 \
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .fetch_optional(ex)
    .await?
    .as_ref()
    .map(ServiceCredential::from_row)
    .transpose()
}

/// The live credential with this hash, recording its use.
pub async fn authenticate(
    ex: impl PgExecutor<'_>,
    credential_hash: &[u8],
) -> Result<Option<ServiceCredential>, sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE service_credentials SET last_used_at = now() \
         WHERE credential_hash = $1 AND revoked_at IS NULL RETURNING {COLUMNS}"
    ))
    .bind(credential_hash)
    .fetch_optional(ex)
    .await?
    .as_ref()
    .map(ServiceCredential::from_row)
    .transpose()
}
