//! The `detections` table: what `mirage-server` instances reported, with the raw evidence lines.
//!
//! Rows are written only by verdict ingestion ([`crate::evidence::verdicts`]), many per statement
//! (`UNNEST` of one array per column), and read newest first with keyset paging by id.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;
use sqlx::{PgExecutor, Row as _, postgres::PgRow};
use time::OffsetDateTime;

/// The LISTEN/NOTIFY channel new detections are announced on; the payload is the newest id.
pub const CHANNEL: &str = "mirage_detection";

/// One detection, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    /// Row id (ascending in commit order: ingestion holds the policy head lock while it inserts).
    pub id: i64,
    /// The idempotency key the server chose.
    pub key: String,
    /// The reporting server's credential name.
    pub server: String,
    /// The attacker's address.
    pub addr: IpAddr,
    /// The attacker entry it was counted against; `None` when allowlisted, or since removed.
    pub attacker_id: Option<i64>,
    /// The detection rule.
    pub rule: String,
    /// The attacked service.
    pub service: String,
    /// `info`, `low`, `medium`, `high` or `critical`.
    pub severity: String,
    /// The action the server suggested, if any.
    pub action: Option<String>,
    /// How many matches the verdict counts.
    pub count: i64,
    /// The raw log lines that matched.
    pub evidence: Vec<String>,
    /// The agent group the server named; `None`: every group.
    pub group: Option<String>,
    /// The address was on an allowlist: recorded, but never made an attacker entry.
    pub allowlisted: bool,
    /// When it happened (the server's clock).
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// When the manager got it.
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
}

/// The columns [`Detection::from_row`] reads.
const COLUMNS: &str = "id, idempotency_key, server_name, attacker_addr, attacker_id, rule, service, \
                       severity, suggested_action, count, evidence, group_name, allowlisted, at, \
                       received_at";

impl Detection {
    /// Reads [`COLUMNS`] from a row.
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            key: row.try_get("idempotency_key")?,
            server: row.try_get("server_name")?,
            addr: row.try_get("attacker_addr")?,
            attacker_id: row.try_get("attacker_id")?,
            rule: row.try_get("rule")?,
            service: row.try_get("service")?,
            severity: row.try_get("severity")?,
            action: row.try_get("suggested_action")?,
            count: row.try_get("count")?,
            evidence: row.try_get("evidence")?,
            group: row.try_get("group_name")?,
            allowlisted: row.try_get("allowlisted")?,
            at: row.try_get("at")?,
            received_at: row.try_get("received_at")?,
        })
    }
}

/// New rows, one vector per column (all the same length), for one multi-row insert.
#[derive(Debug, Default)]
pub struct NewDetections {
    /// Idempotency keys.
    pub keys: Vec<String>,
    /// Addresses.
    pub addrs: Vec<IpAddr>,
    /// Attacker entries.
    pub attacker_ids: Vec<Option<i64>>,
    /// Rules.
    pub rules: Vec<String>,
    /// Services.
    pub services: Vec<String>,
    /// Severities.
    pub severities: Vec<String>,
    /// Suggested actions.
    pub actions: Vec<Option<String>>,
    /// Match counts.
    pub counts: Vec<i64>,
    /// Evidence lines, each row's as a JSON array of strings (`text[]` cannot be unnested per
    /// row when the rows' arrays differ in length; `jsonb` can).
    pub evidence: Vec<serde_json::Value>,
    /// Group names.
    pub groups: Vec<Option<String>>,
    /// Allowlisted flags.
    pub allowlisted: Vec<bool>,
    /// Times.
    pub ats: Vec<OffsetDateTime>,
}

/// Which of `keys` are already stored.
pub async fn existing_keys(
    ex: impl PgExecutor<'_>,
    keys: &[String],
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT idempotency_key FROM detections WHERE idempotency_key = ANY($1)")
        .bind(keys)
        .fetch_all(ex)
        .await
}

/// Inserts the rows in their order (ids ascend with it), skipping keys already stored; returns
/// the new ids, ascending.
pub async fn insert(
    ex: impl PgExecutor<'_>,
    server: &str,
    rows: &NewDetections,
) -> Result<Vec<i64>, sqlx::Error> {
    let mut ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO detections (idempotency_key, server_name, attacker_addr, attacker_id, rule, \
         service, severity, suggested_action, count, evidence, group_name, allowlisted, at) \
         SELECT k, $1::text, addr, aid, rule, svc, sev, act, c, \
                ARRAY(SELECT jsonb_array_elements_text(ev)), grp, allow, at \
         FROM unnest($2::text[], $3::inet[], $4::bigint[], $5::text[], $6::text[], $7::text[], \
                     $8::text[], $9::bigint[], $10::jsonb[], $11::text[], $12::bool[], \
                     $13::timestamptz[]) WITH ORDINALITY \
              AS v(k, addr, aid, rule, svc, sev, act, c, ev, grp, allow, at, ord) \
         ORDER BY ord \
         ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
    )
    .bind(server)
    .bind(&rows.keys)
    .bind(&rows.addrs)
    .bind(&rows.attacker_ids)
    .bind(&rows.rules)
    .bind(&rows.services)
    .bind(&rows.severities)
    .bind(&rows.actions)
    .bind(&rows.counts)
    .bind(&rows.evidence)
    .bind(&rows.groups)
    .bind(&rows.allowlisted)
    .bind(&rows.ats)
    .fetch_all(ex)
    .await?;
    ids.sort_unstable();
    Ok(ids)
}

/// Queues `NOTIFY mirage_detection, '<id>'`, sent when the transaction commits.
pub async fn notify(ex: impl PgExecutor<'_>, newest: i64) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(newest.to_string())
        .execute(ex)
        .await
        .map(drop)
}

/// What a page of the attack log is filtered by.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Counted against this attacker entry.
    pub attacker_id: Option<i64>,
    /// From an address inside this network.
    pub net: Option<IpNet>,
    /// This service.
    pub service: Option<String>,
    /// This rule.
    pub rule: Option<String>,
    /// Ids below this (the last id of the previous page).
    pub before: Option<i64>,
}

/// A page, newest first.
pub async fn list(
    ex: impl PgExecutor<'_>,
    filter: &Filter,
    limit: i64,
) -> Result<Vec<Detection>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM detections \
         WHERE ($1::bigint IS NULL OR attacker_id = $1) \
           AND ($2::cidr IS NULL OR attacker_addr <<= $2::cidr) \
           AND ($3::text IS NULL OR service = $3) \
           AND ($4::text IS NULL OR rule = $4) \
           AND ($5::bigint IS NULL OR id < $5) \
         ORDER BY id DESC LIMIT $6"
    ))
    .bind(filter.attacker_id)
    .bind(filter.net)
    .bind(filter.service.as_deref())
    .bind(filter.rule.as_deref())
    .bind(filter.before)
    .bind(limit)
    .fetch_all(ex)
    .await?
    .iter()
    .map(Detection::from_row)
    .collect()
}

/// The newest `limit` detections counted against attacker `id` or from inside `net`.
pub async fn for_attacker(
    ex: impl PgExecutor<'_>,
    id: i64,
    net: IpNet,
    limit: i64,
) -> Result<Vec<Detection>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM detections WHERE attacker_id = $1 OR attacker_addr <<= $2::cidr \
         ORDER BY id DESC LIMIT $3"
    ))
    .bind(id)
    .bind(net)
    .bind(limit)
    .fetch_all(ex)
    .await?
    .iter()
    .map(Detection::from_row)
    .collect()
}

/// Detections after id `since`, oldest first, at most `limit`.
pub async fn after(
    ex: impl PgExecutor<'_>,
    since: i64,
    limit: i64,
) -> Result<Vec<Detection>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM detections WHERE id > $1 ORDER BY id LIMIT $2"
    ))
    .bind(since)
    .bind(limit)
    .fetch_all(ex)
    .await?
    .iter()
    .map(Detection::from_row)
    .collect()
}

/// The newest id (0 when there is none).
pub async fn newest_id(ex: impl PgExecutor<'_>) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM detections")
        .fetch_one(ex)
        .await
}
