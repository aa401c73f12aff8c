//! The `sandbox_sessions` table: what attackers did inside the sandbox (credentials tried,
//! commands, files), attributed to the attacker entry that sent them there.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;
use sqlx::{PgExecutor, Row as _, postgres::PgRow};
use time::OffsetDateTime;

/// One session, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SandboxSession {
    /// Row id.
    pub id: i64,
    /// The idempotency key the sandbox chose.
    pub key: Option<String>,
    /// The reporting sandbox's name.
    pub sandbox: String,
    /// The attacker's address.
    pub addr: IpAddr,
    /// The attacker entry it is attributed to (the most specific live entry containing `addr`
    /// when it was first reported).
    pub attacker_id: Option<i64>,
    /// The emulated service (`ssh`, `ftp`...).
    pub service: String,
    /// `[{"user", "password", "at"}]`.
    pub credentials: serde_json::Value,
    /// `[{"input", "at"}]`.
    pub commands: serde_json::Value,
    /// `[{"path", "sha256", "size", "at"}]`.
    pub files: serde_json::Value,
    /// full-nat: how the flow was translated.
    pub nat_mapping: Option<serde_json::Value>,
    /// Start.
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// End; `None` while open.
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended_at: Option<OffsetDateTime>,
}

/// The columns [`SandboxSession::from_row`] reads.
const COLUMNS: &str = "id, idempotency_key, sandbox_name, attacker_addr, attacker_id, service, \
                       credentials, commands, files, nat_mapping, started_at, ended_at";

impl SandboxSession {
    /// Reads [`COLUMNS`] from a row.
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            key: row.try_get("idempotency_key")?,
            sandbox: row.try_get("sandbox_name")?,
            addr: row.try_get("attacker_addr")?,
            attacker_id: row.try_get("attacker_id")?,
            service: row.try_get("service")?,
            credentials: row.try_get("credentials")?,
            commands: row.try_get("commands")?,
            files: row.try_get("files")?,
            nat_mapping: row.try_get("nat_mapping")?,
            started_at: row.try_get("started_at")?,
            ended_at: row.try_get("ended_at")?,
        })
    }
}

/// Reported sessions, one vector per column (all the same length).
#[derive(Debug, Default, Clone)]
pub struct Reports {
    /// Idempotency keys (unique within the batch).
    pub keys: Vec<String>,
    /// Sandbox names.
    pub sandboxes: Vec<String>,
    /// Addresses.
    pub addrs: Vec<IpAddr>,
    /// Services.
    pub services: Vec<String>,
    /// Credentials (JSON arrays).
    pub credentials: Vec<serde_json::Value>,
    /// Commands (JSON arrays).
    pub commands: Vec<serde_json::Value>,
    /// Files (JSON arrays).
    pub files: Vec<serde_json::Value>,
    /// NAT mappings.
    pub nat_mappings: Vec<Option<serde_json::Value>>,
    /// Starts.
    pub started: Vec<OffsetDateTime>,
    /// Ends.
    pub ended: Vec<Option<OffsetDateTime>>,
}

/// Inserts new sessions and updates known ones (their lists, NAT mapping and end: sessions are
/// reported while still open) in one statement; returns `(inserted, updated)`.
///
/// A new session is attributed to the most specific live attacker entry containing its address;
/// a known one keeps its attribution (or gains one if it had none).
pub async fn upsert(ex: impl PgExecutor<'_>, rows: &Reports) -> Result<(u64, u64), sqlx::Error> {
    let inserted: Vec<bool> = sqlx::query_scalar(
        "INSERT INTO sandbox_sessions AS s (idempotency_key, sandbox_name, attacker_addr, \
         attacker_id, service, credentials, commands, files, nat_mapping, started_at, ended_at) \
         SELECT k, sb, addr, \
                (SELECT a.id FROM attackers a WHERE a.net >>= v.addr \
                 AND (a.expires_at IS NULL OR a.expires_at > now()) \
                 ORDER BY masklen(a.net) DESC, a.id DESC LIMIT 1), \
                svc, cred, cmd, files, nat, started, ended \
         FROM unnest($1::text[], $2::text[], $3::inet[], $4::text[], $5::jsonb[], $6::jsonb[], \
                     $7::jsonb[], $8::jsonb[], $9::timestamptz[], $10::timestamptz[]) \
              AS v(k, sb, addr, svc, cred, cmd, files, nat, started, ended) \
         ON CONFLICT (idempotency_key) DO UPDATE SET \
             credentials = EXCLUDED.credentials, commands = EXCLUDED.commands, \
             files = EXCLUDED.files, nat_mapping = coalesce(EXCLUDED.nat_mapping, s.nat_mapping), \
             ended_at = coalesce(EXCLUDED.ended_at, s.ended_at), \
             attacker_id = coalesce(s.attacker_id, EXCLUDED.attacker_id) \
         RETURNING (xmax = 0)",
    )
    .bind(&rows.keys)
    .bind(&rows.sandboxes)
    .bind(&rows.addrs)
    .bind(&rows.services)
    .bind(&rows.credentials)
    .bind(&rows.commands)
    .bind(&rows.files)
    .bind(&rows.nat_mappings)
    .bind(&rows.started)
    .bind(&rows.ended)
    .fetch_all(ex)
    .await?;
    let new = inserted.iter().filter(|&&i| i).count() as u64;
    Ok((new, inserted.len() as u64 - new))
}

/// What a page of sessions is filtered by.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Attributed to this attacker entry.
    pub attacker_id: Option<i64>,
    /// From an address inside this network.
    pub net: Option<IpNet>,
    /// Ids below this (the last id of the previous page).
    pub before: Option<i64>,
}

/// A page, newest first.
pub async fn list(
    ex: impl PgExecutor<'_>,
    filter: &Filter,
    limit: i64,
) -> Result<Vec<SandboxSession>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM sandbox_sessions \
         WHERE ($1::bigint IS NULL OR attacker_id = $1) \
           AND ($2::cidr IS NULL OR attacker_addr <<= $2::cidr) \
           AND ($3::bigint IS NULL OR id < $3) \
         ORDER BY id DESC LIMIT $4"
    ))
    .bind(filter.attacker_id)
    .bind(filter.net)
    .bind(filter.before)
    .bind(limit)
    .fetch_all(ex)
    .await?
    .iter()
    .map(SandboxSession::from_row)
    .collect()
}

/// The newest `limit` sessions attributed to attacker `id` or from inside `net`.
pub async fn for_attacker(
    ex: impl PgExecutor<'_>,
    id: i64,
    net: IpNet,
    limit: i64,
) -> Result<Vec<SandboxSession>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM sandbox_sessions \
         WHERE attacker_id = $1 OR attacker_addr <<= $2::cidr ORDER BY id DESC LIMIT $3"
    ))
    .bind(id)
    .bind(net)
    .bind(limit)
    .fetch_all(ex)
    .await?
    .iter()
    .map(SandboxSession::from_row)
    .collect()
}
