//! Agents: `POST /api/v1/enrollment-tokens` (operator; the token is shown once),
//! `POST /api/v1/agent/enroll` (the agent trades the token for its credential),
//! `POST /api/v1/agent/heartbeat` (the agent reports its mode, version and applied revision),
//! `GET /api/v1/agents` (viewer) and `DELETE /api/v1/agents/{id}` (operator; revokes).

use std::net::IpAddr;

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::{
    AppState,
    auth::{AgentAuth, Operator, RequireRole, Viewer, new_token, token_hash},
    db::{
        self,
        agents::{Agent, NewAgent},
        audit_log::Actor,
        users::is_unique_violation,
    },
    error::{ApiJson, AppError},
};

/// Default lifetime of an enrollment token.
const DEFAULT_TOKEN_TTL_SECS: i64 = 3600;
/// Longest lifetime of an enrollment token (a week).
const MAX_TOKEN_TTL_SECS: i64 = 7 * 24 * 3600;

/// `POST /api/v1/enrollment-tokens` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// The group the agent joins (default `default`).
    pub group: Option<String>,
    /// Lifetime in seconds (default 3600, at most a week).
    pub ttl_secs: Option<i64>,
}

/// `POST /api/v1/enrollment-tokens` response.
#[derive(Debug, Serialize)]
pub struct CreatedToken {
    /// Row id.
    pub id: i64,
    /// The token, shown this once.
    pub token: String,
    /// The group.
    pub group: String,
    /// Expiry.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Creates a one-time enrollment token.
pub async fn create_token(
    State(state): State<AppState>,
    user: RequireRole<Operator>,
    ApiJson(body): ApiJson<CreateToken>,
) -> Result<Response, AppError> {
    let group = body.group.unwrap_or_else(|| "default".to_owned());
    let ttl = body.ttl_secs.unwrap_or(DEFAULT_TOKEN_TTL_SECS);
    if !(1..=MAX_TOKEN_TTL_SECS).contains(&ttl) {
        return Err(AppError::BadRequest(format!(
            "ttl_secs must be between 1 and {MAX_TOKEN_TTL_SECS}"
        )));
    }
    let token = new_token();
    let expires_at = OffsetDateTime::now_utc() + Duration::seconds(ttl);
    let mut tx = state.db.begin().await?;
    let group_id = db::agents::group_id(&mut *tx, &group)
        .await?
        .ok_or_else(|| AppError::BadRequest(format!("no agent group `{group}`")))?;
    let id = db::agents::insert_enrollment_token(
        &mut *tx,
        &token_hash(&token),
        group_id,
        Some(user.user.id),
        expires_at,
    )
    .await?;
    db::audit_log::record(
        &mut *tx,
        &user.actor(),
        "enrollment_token.create",
        Some(&format!("group:{group}")),
        serde_json::json!({ "id": id, "expires_at": expires_at.unix_timestamp() }),
    )
    .await?;
    tx.commit().await?;
    let body = CreatedToken {
        id,
        token,
        group,
        expires_at,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `POST /api/v1/agent/enroll` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enroll {
    /// The enrollment token.
    pub token: String,
    /// The agent's hostname.
    pub hostname: String,
    /// Its addresses.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// Its version.
    pub version: Option<String>,
}

/// `POST /api/v1/agent/enroll` response.
#[derive(Debug, Serialize)]
pub struct Enrolled {
    /// The new agent's id.
    pub agent_id: i64,
    /// Its name.
    pub name: String,
    /// Its credential, for `Authorization: Bearer`; shown this once.
    pub credential: String,
}

/// Trades a live enrollment token for an agent credential: 401 for an unknown, used or expired
/// token (one answer for all three).
pub async fn enroll(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Enroll>,
) -> Result<Response, AppError> {
    let hostname = body.hostname.trim();
    let hostname_ok = (1..=253).contains(&hostname.len())
        && hostname
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if !hostname_ok {
        return Err(AppError::BadRequest(
            "hostname must be 1 to 253 characters of letters, digits, `-`, `.` and `_`".to_owned(),
        ));
    }
    let credential = new_token();
    let mut tx = state.db.begin().await?;
    let (token_id, group_id) =
        db::agents::consume_enrollment_token(&mut *tx, &token_hash(&body.token))
            .await?
            .ok_or(AppError::BadBearer(
                "unknown, used or expired enrollment token",
            ))?;
    // The name is the hostname unless another agent has it; then the hostname and the token id
    // (unique) tell them apart.
    let name = if db::agents::name_taken(&mut *tx, hostname).await? {
        format!("{hostname}-{token_id}")
    } else {
        hostname.to_owned()
    };
    let new = NewAgent {
        group_id,
        name: &name,
        hostname,
        addresses: &body.addresses,
        version: body.version.as_deref(),
        credential_hash: &token_hash(&credential),
    };
    let agent = match db::agents::insert(&mut *tx, &new).await {
        Ok(agent) => agent,
        Err(err) if is_unique_violation(&err) => {
            return Err(AppError::Conflict(format!("agent name `{name}` is taken")));
        }
        Err(err) => return Err(err.into()),
    };
    db::agents::set_token_agent(&mut *tx, token_id, agent.id).await?;
    let actor = Actor {
        user_id: None,
        name: format!("agent:{}", agent.name),
        ip: None,
    };
    db::audit_log::record(
        &mut *tx,
        &actor,
        "agent.enroll",
        Some(&format!("agent:{}", agent.name)),
        serde_json::json!({ "id": agent.id, "group_id": group_id, "token_id": token_id }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(agent = %agent.name, id = agent.id, "Agent enrolled.");
    let body = Enrolled {
        agent_id: agent.id,
        name: agent.name,
        credential,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// Every agent, with its last counters report.
pub async fn list(
    State(state): State<AppState>,
    _: RequireRole<Viewer>,
) -> Result<Json<Vec<AgentView>>, AppError> {
    Ok(Json(
        db::agents::list_with_counters(&state.db)
            .await?
            .into_iter()
            .map(|(agent, counters)| AgentView { agent, counters })
            .collect(),
    ))
}

/// Revokes an agent: its credential fails from its next call on, and its open streams end.
pub async fn revoke(
    State(state): State<AppState>,
    user: RequireRole<Operator>,
    Path(id): Path<i64>,
) -> Result<StatusCode, AppError> {
    let mut tx = state.db.begin().await?;
    let agent = db::agents::revoke(&mut *tx, id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no agent {id}")))?;
    db::audit_log::record(
        &mut *tx,
        &user.actor(),
        "agent.revoke",
        Some(&format!("agent:{}", agent.name)),
        serde_json::json!({ "id": id }),
    )
    .await?;
    db::policy_revisions::notify_revoked(&mut *tx, id).await?;
    tx.commit().await?;
    tracing::info!(agent = %agent.name, by = %user.user.username, "Agent revoked.");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/agent/heartbeat` body: what the agent reports (every field optional).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Its effective mode.
    pub mode: Option<String>,
    /// Its version.
    pub version: Option<String>,
    /// The last policy revision it applied.
    pub applied_revision: Option<i64>,
    /// Its kernel counters: global ones and the top sources (what `mirage-agent top --json`
    /// prints).
    pub counters: Option<CountersReport>,
}

/// Most sources one report may carry.
pub const MAX_SOURCES: usize = 1000;
/// Most global counters one report may carry.
const MAX_GLOBAL: usize = 64;

/// An agent's counters report.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountersReport {
    /// Global counters by name.
    #[serde(default)]
    pub global: std::collections::BTreeMap<String, u64>,
    /// The busiest sources.
    #[serde(default)]
    pub sources: Vec<SourceReport>,
}

/// One source's counters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceReport {
    /// The source address.
    pub addr: IpAddr,
    /// Packets per action.
    #[serde(default)]
    pub packets: PerAction,
    /// Bytes per action.
    #[serde(default)]
    pub bytes: PerAction,
    /// Sums over the actions (ignored: recomputed).
    #[serde(default)]
    pub total_packets: u64,
    /// Sums over the actions (ignored: recomputed).
    #[serde(default)]
    pub total_bytes: u64,
    /// Seconds since the agent last saw it.
    pub last_seen_secs_ago: Option<f64>,
}

/// Counters per action.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerAction {
    /// Passed.
    #[serde(default)]
    pub pass: u64,
    /// Dropped.
    #[serde(default)]
    pub drop: u64,
    /// Redirected.
    #[serde(default)]
    pub redirect: u64,
    /// Reflected.
    #[serde(default)]
    pub reflect: u64,
}

impl CountersReport {
    /// Validates the report and turns it into what is stored and shown:
    /// `{"global": {...}, "sources": [{"addr", "actions": {"drop": {"packets", "bytes"}, ...},
    /// "total_packets", "total_bytes", "last_seen"}]}` (actions with no traffic left out, the
    /// relative last-seen made absolute with the manager's clock).
    fn stored(&self, now: OffsetDateTime) -> Result<serde_json::Value, AppError> {
        if self.sources.len() > MAX_SOURCES {
            return Err(AppError::BadRequest(format!(
                "`counters.sources`: {} sources, at most {MAX_SOURCES}",
                self.sources.len()
            )));
        }
        if self.global.len() > MAX_GLOBAL {
            return Err(AppError::BadRequest(format!(
                "`counters.global`: {} counters, at most {MAX_GLOBAL}",
                self.global.len()
            )));
        }
        if let Some(name) = self.global.keys().find(|k| {
            k.is_empty()
                || k.len() > 64
                || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        }) {
            return Err(AppError::BadRequest(format!(
                "`counters.global`: invalid counter name `{name}` (1 to 64 of a-z, 0-9, _)"
            )));
        }
        let mut sources = Vec::with_capacity(self.sources.len());
        for (i, src) in self.sources.iter().enumerate() {
            let addr = match src.addr {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                v4 => v4,
            };
            let mut actions = serde_json::Map::new();
            for (name, packets, bytes) in [
                ("pass", src.packets.pass, src.bytes.pass),
                ("drop", src.packets.drop, src.bytes.drop),
                ("redirect", src.packets.redirect, src.bytes.redirect),
                ("reflect", src.packets.reflect, src.bytes.reflect),
            ] {
                if packets > 0 || bytes > 0 {
                    actions.insert(
                        name.to_owned(),
                        serde_json::json!({ "packets": packets, "bytes": bytes }),
                    );
                }
            }
            let last_seen = match src.last_seen_secs_ago {
                Some(ago) if !(0.0..=1e9).contains(&ago) => {
                    return Err(AppError::BadRequest(format!(
                        "`counters.sources[{i}].last_seen_secs_ago`: {ago} is not a number of \
                         seconds"
                    )));
                }
                Some(ago) => (now - time::Duration::seconds_f64(ago))
                    .format(&time::format_description::well_known::Rfc3339)
                    .ok(),
                None => None,
            };
            let p = &src.packets;
            let b = &src.bytes;
            sources.push(serde_json::json!({
                "addr": addr,
                "actions": actions,
                "total_packets": p.pass.saturating_add(p.drop).saturating_add(p.redirect).saturating_add(p.reflect),
                "total_bytes": b.pass.saturating_add(b.drop).saturating_add(b.redirect).saturating_add(b.reflect),
                "last_seen": last_seen,
            }));
        }
        Ok(serde_json::json!({ "global": self.global, "sources": sources }))
    }
}

/// An agent as `GET /api/v1/agents` lists it: the record and its last counters report.
#[derive(Debug, serde::Serialize)]
pub struct AgentView {
    /// The record.
    #[serde(flatten)]
    pub agent: Agent,
    /// The last counters report (`{}` before the first).
    pub counters: serde_json::Value,
}

/// Records a heartbeat (the authentication itself already set `last_heartbeat`) and returns the
/// agent's record.
pub async fn heartbeat(
    State(state): State<AppState>,
    AgentAuth(agent): AgentAuth,
    ApiJson(body): ApiJson<Heartbeat>,
) -> Result<Json<Agent>, AppError> {
    if let Some(mode) = &body.mode
        && !["honeypot", "unreal", "reflect", "firewall"].contains(&mode.as_str())
    {
        return Err(AppError::BadRequest(format!(
            "unknown mode `{mode}` (honeypot, unreal, reflect or firewall)"
        )));
    }
    let counters = body
        .counters
        .as_ref()
        .map(|c| c.stored(OffsetDateTime::now_utc()))
        .transpose()?;
    let agent = db::agents::report(
        &state.db,
        agent.id,
        body.mode.as_deref(),
        body.version.as_deref(),
        body.applied_revision,
        counters.as_ref(),
    )
    .await?
    .ok_or(AppError::BadBearer("revoked credential"))?;
    Ok(Json(agent))
}
