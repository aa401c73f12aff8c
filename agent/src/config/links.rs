//! The parts of the agent's configuration that connect it to the rest of Mirage: the manager
//! (policy stream, heartbeats), the server (log shipping), and the log sources it collects.
//! All optional: without `[manager]` the agent enforces its file and CLI entries only; without
//! `[server]` nothing is shipped and the collectors do not run.

use std::{net::SocketAddr, path::PathBuf};

use serde::Deserialize;

/// Default `state_dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/mirage-agent";

/// `[manager]`: where policy comes from.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ManagerLink {
    /// Base URL, e.g. `https://manager.example:8443`; `http://` only to a loopback address.
    pub url: String,
    /// The agent's bearer credential (written by `mirage-agent enroll`, mode 0600). Default
    /// `state_dir/credential`.
    #[serde(default)]
    pub credential_file: Option<PathBuf>,
    /// Extra CA certificate (PEM) for the manager's HTTPS, besides the web PKI roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Seconds between heartbeats (with the kernel counters). Default 15, range 1 to 3600.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
}

fn default_heartbeat() -> u64 {
    15
}

/// `[server]`: where service logs go (RFC 5424 over TLS, RFC 5425).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerLink {
    /// The server's TLS syslog address, `HOST:PORT` (e.g. `server.example:6514`).
    pub address: String,
    /// Name to verify the server's certificate against; default: HOST of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// CA certificate(s) (PEM) that sign the server's certificate.
    pub ca: PathBuf,
    /// The agent's client certificate chain (PEM), signed by the server's `tls.client_ca`.
    pub cert: PathBuf,
    /// The agent's private key (PEM).
    pub key: PathBuf,
    /// Most bytes of log lines queued on disk while the server is unreachable; when full,
    /// collectors pause (nothing is skipped). Default 256 MiB.
    #[serde(default = "default_queue_bytes")]
    pub queue_max_bytes: u64,
}

fn default_queue_bytes() -> u64 {
    256 * 1024 * 1024
}

/// One `[[logs]]` entry: files of one service.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LogSource {
    /// The service whose rules apply on the server (`sshd`, `vsftpd`, `rsync`, `mysql`,
    /// `redis`, `mongodb`, `web`, or an operator's own).
    pub service: String,
    /// Files or globs (`/var/log/nginx/*access.log`); new matches are picked up while running.
    pub paths: Vec<String>,
}

/// `[redis]`: the Redis collector (`MONITOR`, `ACL LOG`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RedisSource {
    /// `HOST:PORT` of the Redis server to watch (usually `127.0.0.1:6379`).
    pub address: String,
    /// ACL user (Redis 6+); omitted: `AUTH password` (requirepass).
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (mode 0600); omitted: no AUTH.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Seconds between `ACL LOG` reads (new entries only). Default 10; 0 disables them.
    #[serde(default = "default_acl_log")]
    pub acl_log_secs: u64,
}

fn default_acl_log() -> u64 {
    10
}

/// `[journal]`: the systemd journal, for hosts where a service logs only there.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JournalSource {
    /// The service whose rules apply (e.g. `sshd`).
    pub service: String,
    /// systemd units to follow (e.g. `ssh.service`).
    pub units: Vec<String>,
}

/// Validates the link sections; the error is `(key, reason)`.
pub fn validate(
    manager: Option<&ManagerLink>,
    server: Option<&ServerLink>,
    logs: &[LogSource],
    redis: Option<&RedisSource>,
    journal: &[JournalSource],
) -> Result<(), (String, String)> {
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    if let Some(m) = manager {
        let lower = m.url.to_ascii_lowercase();
        if !(lower.starts_with("https://") || lower.starts_with("http://")) {
            return Err((
                "manager.url".into(),
                "must start with https:// or http://".into(),
            ));
        }
        if !(1..=3600).contains(&m.heartbeat_secs) {
            return Err(("manager.heartbeat_secs".into(), "must be 1 to 3600".into()));
        }
    }
    if let Some(s) = server {
        if s.address.parse::<SocketAddr>().is_err()
            && s.address
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(("server.address".into(), "must be HOST:PORT".into()));
        }
        if s.queue_max_bytes < 1024 * 1024 {
            return Err((
                "server.queue_max_bytes".into(),
                "must be at least 1048576".into(),
            ));
        }
    }
    let collects = !logs.is_empty() || redis.is_some() || !journal.is_empty();
    if collects && server.is_none() {
        return Err((
            "server".into(),
            "log sources are configured but no [server] to ship them to".into(),
        ));
    }
    for (i, l) in logs.iter().enumerate() {
        if !name_ok(&l.service) {
            return Err((
                format!("logs[{i}].service"),
                "lowercase letters, digits and '-'".into(),
            ));
        }
        if l.paths.is_empty() || l.paths.iter().any(|p| !p.starts_with('/')) {
            return Err((
                format!("logs[{i}].paths"),
                "absolute paths or globs, at least one".into(),
            ));
        }
    }
    for (i, j) in journal.iter().enumerate() {
        if !name_ok(&j.service) {
            return Err((
                format!("journal[{i}].service"),
                "lowercase letters, digits and '-'".into(),
            ));
        }
        if j.units.is_empty() {
            return Err((format!("journal[{i}].units"), "at least one unit".into()));
        }
    }
    if let Some(r) = redis
        && r.address
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(("redis.address".into(), "must be HOST:PORT".into()));
    }
    Ok(())
}
