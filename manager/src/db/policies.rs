//! The `policies` table: one row per agent group.

use ipnet::IpNet;
use serde::Serialize;
use sqlx::{PgExecutor, Row as _, postgres::PgRow};

/// A group's policy, as agents receive it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// The group.
    pub group_id: i64,
    /// `honeypot`, `unreal`, `reflect` or `firewall`.
    pub mode: String,
    /// `preserve-source` or `full-nat`.
    pub redirect_model: String,
    /// Sources never dropped, redirected or reflected.
    pub allowlist: Vec<IpNet>,
    /// Honeypot mode: ports left to the real services.
    pub allowlisted_ports: Vec<String>,
    /// Sandbox targets per port.
    pub sandbox_targets: serde_json::Value,
    /// NAT and reflect settings.
    pub nat: serde_json::Value,
    /// Lifetime of automatic entries.
    pub default_ttl_secs: Option<i64>,
    /// Action of automatic entries.
    pub default_action: String,
    /// The revision of its last change.
    pub revision: i64,
}

const COLUMNS: &str = "group_id, mode, redirect_model, allowlist, allowlisted_ports, \
                       sandbox_targets, nat, default_ttl_secs, default_action, revision";

impl Policy {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            group_id: row.try_get("group_id")?,
            mode: row.try_get("mode")?,
            redirect_model: row.try_get("redirect_model")?,
            allowlist: row.try_get("allowlist")?,
            allowlisted_ports: row.try_get("allowlisted_ports")?,
            sandbox_targets: row.try_get("sandbox_targets")?,
            nat: row.try_get("nat")?,
            default_ttl_secs: row.try_get("default_ttl_secs")?,
            default_action: row.try_get("default_action")?,
            revision: row.try_get("revision")?,
        })
    }
}

/// A group's policy.
pub async fn get(ex: impl PgExecutor<'_>, group_id: i64) -> Result<Option<Policy>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM policies WHERE group_id = $1"
    ))
    .bind(group_id)
    .fetch_optional(ex)
    .await?
    .as_ref()
    .map(Policy::from_row)
    .transpose()
}

/// Locks a group's policy for a change.
pub async fn lock(ex: impl PgExecutor<'_>, group_id: i64) -> Result<Option<Policy>, sqlx::Error> {
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM policies WHERE group_id = $1 FOR UPDATE"
    ))
    .bind(group_id)
    .fetch_optional(ex)
    .await?
    .as_ref()
    .map(Policy::from_row)
    .transpose()
}

/// Replaces a group's allowlist, stamping `revision`.
pub async fn set_allowlist(
    ex: impl PgExecutor<'_>,
    group_id: i64,
    allowlist: &[IpNet],
    revision: i64,
    user_id: Option<i64>,
) -> Result<Policy, sqlx::Error> {
    let row = sqlx::query(&format!(
        "UPDATE policies SET allowlist = $2::cidr[], revision = $3, updated_at = now(), \
         updated_by = $4 WHERE group_id = $1 RETURNING {COLUMNS}"
    ))
    .bind(group_id)
    .bind(allowlist)
    .bind(revision)
    .bind(user_id)
    .fetch_one(ex)
    .await?;
    Policy::from_row(&row)
}

/// The allowlist entry (of `group_id`'s policy, or of any group's when `None`) that overlaps
/// `net`, if any: an attacker entry there would be ignored by the kernel at best, and would
/// lock an admin out if the allowlist were ever bypassed.
pub async fn allowlist_overlap(
    ex: impl PgExecutor<'_>,
    net: IpNet,
    group_id: Option<i64>,
) -> Result<Option<IpNet>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT a FROM policies p, unnest(p.allowlist) AS a \
         WHERE ($2::bigint IS NULL OR p.group_id = $2) AND a && $1::cidr LIMIT 1",
    )
    .bind(net)
    .bind(group_id)
    .fetch_optional(ex)
    .await
}

/// Every group's allowlist entries, deduplicated and sorted (IPv4 first, then by address and
/// prefix length), and the policy head revision, read in one snapshot.
pub async fn allowlist_union(ex: impl PgExecutor<'_>) -> Result<(Vec<IpNet>, i64), sqlx::Error> {
    let row = sqlx::query(
        "SELECT (SELECT revision FROM policy_head) AS revision, \
                coalesce((SELECT array_agg(DISTINCT a ORDER BY a) \
                          FROM policies p, unnest(p.allowlist) AS a), '{}') AS networks",
    )
    .fetch_one(ex)
    .await?;
    Ok((row.try_get("networks")?, row.try_get("revision")?))
}

/// A whole policy as the editor writes it (validated and canonical, see
/// [`crate::policy::validate`]).
#[derive(Debug, Clone)]
pub struct NewPolicy<'a> {
    /// The mode.
    pub mode: &'a str,
    /// The redirect model.
    pub redirect_model: &'a str,
    /// The allowlist.
    pub allowlist: &'a [IpNet],
    /// Honeypot ports.
    pub allowlisted_ports: &'a [String],
    /// Sandbox targets (a JSON array).
    pub sandbox_targets: &'a serde_json::Value,
    /// NAT settings (a JSON object).
    pub nat: &'a serde_json::Value,
    /// TTL of automatic entries.
    pub default_ttl_secs: Option<i64>,
    /// Action of automatic entries.
    pub default_action: &'a str,
}

/// Replaces a group's policy, stamping `revision`.
pub async fn replace(
    ex: impl PgExecutor<'_>,
    group_id: i64,
    new: &NewPolicy<'_>,
    revision: i64,
    user_id: Option<i64>,
) -> Result<Policy, sqlx::Error> {
    let row = sqlx::query(&format!(
        "UPDATE policies SET mode = $2, redirect_model = $3, allowlist = $4::cidr[], \
         allowlisted_ports = $5, sandbox_targets = $6, nat = $7, default_ttl_secs = $8, \
         default_action = $9, revision = $10, updated_at = now(), updated_by = $11 \
         WHERE group_id = $1 RETURNING {COLUMNS}"
    ))
    .bind(group_id)
    .bind(new.mode)
    .bind(new.redirect_model)
    .bind(new.allowlist)
    .bind(new.allowlisted_ports)
    .bind(new.sandbox_targets)
    .bind(new.nat)
    .bind(new.default_ttl_secs)
    .bind(new.default_action)
    .bind(revision)
    .bind(user_id)
    .fetch_one(ex)
    .await?;
    Policy::from_row(&row)
}

/// A live attacker entry an allowlist entry overrides.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shadowed {
    /// The attacker entry's id.
    pub id: i64,
    /// Its network.
    pub net: IpNet,
    /// Its action (which agents will not apply to the allowlisted part).
    pub action: String,
    /// Its group; `None`: every group.
    pub group_id: Option<i64>,
    /// The allowlist entry that overlaps it.
    pub allowlisted_by: IpNet,
}

/// Live attacker entries that agents of `group_id` enforce (the group's and every group's) and
/// that overlap an entry of `allowlist`: the allowlist wins in the kernel, so they are shadowed
/// (in part, for a range).
pub async fn shadowed(
    ex: impl PgExecutor<'_>,
    group_id: i64,
    allowlist: &[IpNet],
) -> Result<Vec<Shadowed>, sqlx::Error> {
    if allowlist.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query(
        "SELECT DISTINCT ON (a.id) a.id, a.net, a.action, a.group_id, w AS allowlisted_by \
         FROM attackers a, unnest($2::cidr[]) AS w \
         WHERE (a.group_id IS NULL OR a.group_id = $1) \
           AND (a.expires_at IS NULL OR a.expires_at > now()) AND a.net && w \
         ORDER BY a.id, masklen(w) DESC",
    )
    .bind(group_id)
    .bind(allowlist)
    .fetch_all(ex)
    .await?
    .iter()
    .map(|row| {
        Ok(Shadowed {
            id: row.try_get("id")?,
            net: row.try_get("net")?,
            action: row.try_get("action")?,
            group_id: row.try_get("group_id")?,
            allowlisted_by: row.try_get("allowlisted_by")?,
        })
    })
    .collect()
}
