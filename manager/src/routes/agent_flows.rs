//! `POST /api/v1/agent/flows` ([`AgentAuth`]): the new redirected or reflected flows an agent's
//! kernel program created (from its ring buffer), so a sandbox session seen from a full-NAT
//! address and port is attributed to the attacker whose flow was translated to it (see
//! [`crate::evidence::sessions`]).

use std::net::SocketAddr;

use axum::{Json, extract::State};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    AppState,
    auth::AgentAuth,
    db::{self, flows::NewFlows},
    error::{ApiJson, AppError},
};

/// Most flows per report.
pub const MAX_FLOWS: usize = 1000;

/// `POST /api/v1/agent/flows` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// 1 to [`MAX_FLOWS`] flows.
    pub flows: Vec<FlowInput>,
}

/// One flow, as the agent's flow log writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowInput {
    /// `redirect` or `reflect`.
    pub kind: String,
    /// `preserve-source` or `full-nat`.
    pub model: String,
    /// `tcp` or `udp`.
    pub proto: String,
    /// The attacker's `addr:port`.
    pub attacker: String,
    /// The original destination `addr:port`.
    pub orig_dst: String,
    /// Where the flow went, `addr:port`.
    pub target: String,
    /// The source `addr:port` the target saw.
    pub nat: String,
    /// Kernel time (ignored: the manager stamps its own).
    #[serde(default)]
    pub ts_ns: Option<u64>,
}

/// Reply.
#[derive(Debug, Serialize)]
pub struct Accepted {
    /// Flows stored.
    pub accepted: u64,
}

fn sock(what: &str, v: &str) -> Result<SocketAddr, String> {
    v.parse::<SocketAddr>()
        .map_err(|_| format!("{what}: `{v}` is not ADDR:PORT ([V6]:PORT for IPv6)"))
}

fn one_of(what: &str, v: &str, allowed: &[&str]) -> Result<String, String> {
    if allowed.contains(&v) {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "{what}: `{v}` is not one of {}",
            allowed.join(", ")
        ))
    }
}

/// Validates a whole report; the error names the first bad field (`flows[3].nat: ...`).
pub fn validate(report: Report) -> Result<NewFlows, String> {
    let n = report.flows.len();
    if n == 0 || n > MAX_FLOWS {
        return Err(format!(
            "a report holds 1 to {MAX_FLOWS} flows; this one has {n}"
        ));
    }
    let mut f = NewFlows::default();
    for (i, flow) in report.flows.into_iter().enumerate() {
        let at = |field: &str| format!("flows[{i}].{field}");
        f.kinds
            .push(one_of(&at("kind"), &flow.kind, &["redirect", "reflect"])?);
        f.models.push(one_of(
            &at("model"),
            &flow.model,
            &["preserve-source", "full-nat"],
        )?);
        f.protos
            .push(one_of(&at("proto"), &flow.proto, &["tcp", "udp"])?);
        let attacker = sock(&at("attacker"), &flow.attacker)?;
        let nat = sock(&at("nat"), &flow.nat)?;
        let orig = sock(&at("orig_dst"), &flow.orig_dst)?;
        let target = sock(&at("target"), &flow.target)?;
        f.attacker_addrs
            .push(IpNet::from(attacker.ip().to_canonical()));
        f.attacker_ports.push(i32::from(attacker.port()));
        f.nat_addrs.push(IpNet::from(nat.ip().to_canonical()));
        f.nat_ports.push(i32::from(nat.port()));
        f.orig_dsts.push(orig.to_string());
        f.targets.push(target.to_string());
    }
    Ok(f)
}

/// Stores an agent's flow report.
pub async fn report(
    State(state): State<AppState>,
    AgentAuth(agent): AgentAuth,
    ApiJson(body): ApiJson<Report>,
) -> Result<Json<Accepted>, AppError> {
    let flows = validate(body).map_err(AppError::BadRequest)?;
    let accepted = db::flows::insert(&state.db, agent.id, &flows).await?;
    Ok(Json(Accepted { accepted }))
}
