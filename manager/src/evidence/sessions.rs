//! Sandbox session reports: what an attacker did inside the sandbox, reported by
//! `mirage-sandbox` (with a service credential) while the session is open and when it ends.
//!
//! Idempotent by the sandbox's key: a repeated key replaces the session's lists and end (and NAT
//! mapping, if given). A new session is attributed to the most specific live attacker entry that
//! contains its address, so the attacker page shows what the attacker did after being caught.

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use super::{check_nul, check_text, parse_addr, parse_time};
use crate::db::{self, sandbox_sessions::Reports};

/// Most sessions in one batch.
pub const MAX_BATCH: usize = 500;
/// Most credentials per session.
pub const MAX_CREDENTIALS: usize = 1000;
/// Most commands per session.
pub const MAX_COMMANDS: usize = 5000;
/// Most files per session.
pub const MAX_FILES: usize = 500;
/// Longest user name or password, in bytes.
pub const MAX_CREDENTIAL_FIELD: usize = 1024;
/// Longest command, in bytes.
pub const MAX_COMMAND: usize = 4096;
/// Longest file path, in bytes.
pub const MAX_PATH: usize = 4096;
/// Largest NAT mapping, as JSON bytes.
pub const MAX_NAT_MAPPING: usize = 4096;

/// `POST /api/v1/sandbox-sessions` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    /// 1 to [`MAX_BATCH`] sessions.
    pub sessions: Vec<SessionInput>,
}

/// One session report.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionInput {
    /// Idempotency key chosen by the sandbox (1 to 128 characters).
    pub id: String,
    /// The sandbox's name.
    pub sandbox: String,
    /// The attacker's address.
    pub addr: String,
    /// The emulated service.
    pub service: String,
    /// Credentials tried.
    #[serde(default)]
    pub credentials: Vec<Credential>,
    /// Commands run.
    #[serde(default)]
    pub commands: Vec<Command>,
    /// Files uploaded or created.
    #[serde(default)]
    pub files: Vec<File>,
    /// full-nat: how the flow was translated.
    #[serde(default)]
    pub nat_mapping: Option<serde_json::Map<String, serde_json::Value>>,
    /// Start (RFC 3339).
    pub started_at: String,
    /// End (RFC 3339); absent while open.
    #[serde(default)]
    pub ended_at: Option<String>,
}

/// A credential tried.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
    /// When (RFC 3339).
    pub at: String,
}

/// A command run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// The input line.
    pub input: String,
    /// When (RFC 3339).
    pub at: String,
}

/// A file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Its path in the sandbox.
    pub path: String,
    /// SHA-256 of its content, lower-case hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// When (RFC 3339).
    pub at: String,
}

/// Validates a whole batch into rows; the error names the first bad item.
pub fn validate(batch: Batch) -> Result<Reports, String> {
    let n = batch.sessions.len();
    if n == 0 || n > MAX_BATCH {
        return Err(format!(
            "a batch holds 1 to {MAX_BATCH} sessions; this one has {n}"
        ));
    }
    let mut seen = std::collections::HashMap::with_capacity(n);
    for (i, s) in batch.sessions.iter().enumerate() {
        if let Some(first) = seen.insert(s.id.as_str(), i) {
            return Err(format!(
                "sessions[{i}].id: `{}` is also the id of sessions[{first}]",
                s.id
            ));
        }
    }
    let mut rows = Reports::default();
    for (i, s) in batch.sessions.into_iter().enumerate() {
        session(i, s, &mut rows)?;
    }
    Ok(rows)
}

fn session(i: usize, s: SessionInput, rows: &mut Reports) -> Result<(), String> {
    let at = |field: &str| format!("sessions[{i}].{field}");
    check_text(&at("id"), &s.id, 1, super::verdicts::MAX_KEY)?;
    check_text(&at("sandbox"), &s.sandbox, 0, 128)?;
    let addr = parse_addr(&at("addr"), &s.addr)?;
    check_text(&at("service"), &s.service, 1, 64)?;
    let started = parse_time(&at("started_at"), &s.started_at)?;
    let ended = match &s.ended_at {
        Some(end) => {
            let end = parse_time(&at("ended_at"), end)?;
            if end < started {
                return Err(format!("{} is before started_at", at("ended_at")));
            }
            Some(end)
        }
        None => None,
    };
    check_len(&at("credentials"), s.credentials.len(), MAX_CREDENTIALS)?;
    for (j, c) in s.credentials.iter().enumerate() {
        let what = format!("sessions[{i}].credentials[{j}]");
        check_bytes(&format!("{what}.user"), &c.user, MAX_CREDENTIAL_FIELD)?;
        check_bytes(
            &format!("{what}.password"),
            &c.password,
            MAX_CREDENTIAL_FIELD,
        )?;
        parse_time(&format!("{what}.at"), &c.at)?;
    }
    check_len(&at("commands"), s.commands.len(), MAX_COMMANDS)?;
    for (j, c) in s.commands.iter().enumerate() {
        let what = format!("sessions[{i}].commands[{j}]");
        check_bytes(&format!("{what}.input"), &c.input, MAX_COMMAND)?;
        parse_time(&format!("{what}.at"), &c.at)?;
    }
    check_len(&at("files"), s.files.len(), MAX_FILES)?;
    for (j, f) in s.files.iter().enumerate() {
        let what = format!("sessions[{i}].files[{j}]");
        check_bytes(&format!("{what}.path"), &f.path, MAX_PATH)?;
        if f.sha256.len() != 64
            || !f
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!("{what}.sha256 must be 64 lower-case hex digits"));
        }
        if i64::try_from(f.size).is_err() {
            return Err(format!("{what}.size is too large"));
        }
        parse_time(&format!("{what}.at"), &f.at)?;
    }
    let nat = match s.nat_mapping {
        Some(map) => {
            let value = serde_json::Value::Object(map);
            let text = value.to_string();
            if text.len() > MAX_NAT_MAPPING {
                return Err(format!(
                    "{} is larger than {MAX_NAT_MAPPING} bytes of JSON",
                    at("nat_mapping")
                ));
            }
            // jsonb cannot hold \u0000 in any string, key or value.
            if text.contains("\\u0000") {
                return Err(format!("{} contains a NUL character", at("nat_mapping")));
            }
            Some(value)
        }
        None => None,
    };
    rows.keys.push(s.id);
    rows.sandboxes.push(s.sandbox);
    rows.addrs.push(addr);
    rows.services.push(s.service);
    rows.credentials.push(serde_json::json!(s.credentials));
    rows.commands.push(serde_json::json!(s.commands));
    rows.files.push(serde_json::json!(s.files));
    rows.nat_mappings.push(nat);
    rows.started.push(started);
    rows.ended.push(ended);
    Ok(())
}

fn check_len(what: &str, len: usize, max: usize) -> Result<(), String> {
    if len > max {
        return Err(format!("{what}: at most {max} entries; this one has {len}"));
    }
    Ok(())
}

fn check_bytes(what: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max {
        return Err(format!("{what} is longer than {max} bytes"));
    }
    check_nul(what, value)
}

/// What a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// New sessions.
    pub inserted: u64,
    /// Known sessions updated.
    pub updated: u64,
}

/// Stores a validated batch (one statement, after the NAT attribution lookup).
///
/// A session whose `nat_mapping.nat` names the `addr:port` the sandbox saw is attributed to the
/// attacker of the newest agent-reported flow translated to that address and port (within the
/// hour before the session started): with `full-nat` the sandbox only ever sees this host's
/// NAT address, and the agent's flow report is what ties it back to the attacker. Its `addr`
/// becomes the attacker's.
pub async fn store(pool: &PgPool, rows: &Reports) -> Result<Outcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    db::evidence::no_jit(&mut *tx).await?;
    let nats: Vec<(usize, (std::net::IpAddr, u16, time::OffsetDateTime))> = rows
        .nat_mappings
        .iter()
        .zip(&rows.started)
        .enumerate()
        .filter_map(|(i, (m, started))| {
            let nat = m.as_ref()?.get("nat")?.as_str()?;
            let sock = nat.parse::<std::net::SocketAddr>().ok()?;
            Some((i, (sock.ip().to_canonical(), sock.port(), *started)))
        })
        .collect();
    let mut attributed = None;
    if !nats.is_empty() {
        let keys: Vec<_> = nats.iter().map(|(_, k)| *k).collect();
        let found = db::flows::attackers_behind(&mut *tx, &keys).await?;
        let mut copy = rows.clone();
        for ((i, _), attacker) in nats.iter().zip(found) {
            if let (Some(attacker), Some(slot)) = (attacker, copy.addrs.get_mut(*i)) {
                *slot = attacker;
            }
        }
        attributed = Some(copy);
    }
    let rows = attributed.as_ref().unwrap_or(rows);
    let (inserted, updated) = db::sandbox_sessions::upsert(&mut *tx, rows).await?;
    tx.commit().await?;
    metrics::counter!(super::SANDBOX_SESSIONS, "outcome" => "inserted").increment(inserted);
    metrics::counter!(super::SANDBOX_SESSIONS, "outcome" => "updated").increment(updated);
    Ok(Outcome { inserted, updated })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn item() -> serde_json::Value {
        json!({
            "id": "s1", "sandbox": "sb-1", "addr": "203.0.113.5", "service": "ssh",
            "credentials": [{ "user": "root", "password": "123456", "at": "2024-05-01T10:00:00Z" }],
            "commands": [{ "input": "uname -a", "at": "2024-05-01T10:00:01Z" }],
            "files": [{ "path": "/tmp/x", "sha256": "a".repeat(64), "size": 12, "at": "2024-05-01T10:00:02Z" }],
            "nat_mapping": { "nat": "198.18.1.1:20001" },
            "started_at": "2024-05-01T10:00:00Z", "ended_at": null,
        })
    }

    fn check(items: serde_json::Value) -> Result<Reports, String> {
        validate(serde_json::from_value(json!({ "sessions": items })).unwrap())
    }

    #[test]
    fn validates() {
        let rows = check(json!([item()])).unwrap();
        assert_eq!(rows.commands[0][0]["input"], "uname -a");
        assert_eq!(rows.ended, [None]);
        for (path, value, needle) in [
            ("/addr", json!("::1"), "sessions[0].addr"),
            (
                "/files/0/sha256",
                json!("xyz"),
                "sessions[0].files[0].sha256",
            ),
            (
                "/commands/0/input",
                json!("x".repeat(4097)),
                "commands[0].input is longer",
            ),
            ("/credentials/0/at", json!("then"), "credentials[0].at"),
            (
                "/ended_at",
                json!("2024-04-01T00:00:00Z"),
                "before started_at",
            ),
            (
                "/commands",
                json!(vec![
                    json!({"input": "x", "at": "2024-05-01T10:00:01Z"});
                    5001
                ]),
                "at most 5000",
            ),
            ("/nat_mapping", json!({ "a": "x\u{0}" }), "NUL"),
        ] {
            let mut v = item();
            *v.pointer_mut(path).unwrap() = value;
            let err = check(json!([v])).unwrap_err();
            assert!(err.contains(needle), "{path}: {err}");
        }
        assert!(
            check(json!([item(), item()]))
                .unwrap_err()
                .contains("also the id")
        );
        assert!(check(json!([])).is_err());
    }
}
