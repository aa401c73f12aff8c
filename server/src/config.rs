//! `mirage-server run` configuration file (TOML). Unknown keys are errors, so a typo never
//! silently falls back to a default; every value is range-checked by [`ServerConfig::validate`].
//! The reference is `docs/server-config.md`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnet::IpNet;
use serde::Deserialize;

/// Errors loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown keys.
    #[error("parsing configuration")]
    Parse(#[source] Box<toml::de::Error>),
    /// A key has a value outside its allowed range or format.
    #[error("`{key}`: {reason}")]
    Value {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn value(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Value {
        key,
        reason: reason.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where to listen.
    pub listen: ListenConfig,
    /// The TLS listener's certificate, key and the CA that signs agent certificates.
    pub tls: Option<TlsConfig>,
    /// Size, connection and rate limits.
    pub limits: LimitsConfig,
    /// Who may produce verdicts, and who is never flagged.
    pub trust: TrustConfig,
    /// Extra rule packs.
    pub rules: RulesConfig,
    /// Where verdicts go. Without it verdicts are only logged (and queued nowhere).
    pub manager: Option<ManagerConfig>,
    /// The on-disk verdict queue.
    pub queue: QueueConfig,
    /// Shared counting state (several servers behind one address). Without it, in memory.
    pub state: StateConfig,
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
}

/// `[listen]`: every list may be empty; at least one listener must be configured in total.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Plain syslog over UDP (RFC 5426), e.g. `0.0.0.0:514`. Trusted only from relay networks.
    pub udp: Vec<SocketAddr>,
    /// Plain syslog over TCP (RFC 6587, octet counting or newline framing). Trusted only from
    /// relay networks.
    pub tcp: Vec<SocketAddr>,
    /// Syslog over TLS (RFC 5425, octet counting), e.g. `0.0.0.0:6514`. Needs `[tls]`; peers
    /// presenting a certificate signed by `tls.client_ca` are authenticated agents.
    pub tls: Vec<SocketAddr>,
}

/// `[tls]`: PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
    /// CA certificate(s) that sign agent (and relay) client certificates.
    pub client_ca: PathBuf,
    /// Accept TLS clients without a certificate (their lines are at most logged, like any
    /// untrusted source). Default false: the handshake fails without one.
    #[serde(default)]
    pub allow_anonymous: bool,
}

/// `[limits]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Longest syslog message accepted, in bytes (longer ones are counted and dropped; on TCP
    /// an octet-counted one is skipped, a newline-framed one is discarded up to its end).
    /// Default 16384, range 480 to 1048576 (RFC 5425 requires at least 2048 to be accepted).
    pub max_message_bytes: usize,
    /// Open TCP and TLS connections at once, in total. Default 4096.
    pub max_connections: usize,
    /// Open TCP and TLS connections from one address. Default 64.
    pub max_connections_per_addr: usize,
    /// Messages per second one connection (or one UDP source address) may send; beyond that a
    /// TCP connection is slowed down (not read) and UDP datagrams are dropped and counted.
    /// Default 20000.
    pub messages_per_second: u32,
    /// Seconds a TCP/TLS connection may stay silent before it is closed. Default 600.
    pub idle_timeout_secs: u64,
    /// Seconds a TLS handshake may take. Default 10.
    pub handshake_timeout_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 16 * 1024,
            max_connections: 4096,
            max_connections_per_addr: 64,
            messages_per_second: 20_000,
            idle_timeout_secs: 600,
            handshake_timeout_secs: 10,
        }
    }
}

/// `[trust]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    /// Peers (rsyslog relays) whose plain UDP/TCP messages may produce verdicts. Default empty:
    /// only authenticated agents (TLS client certificates) count.
    pub relay_networks: Vec<IpNet>,
    /// Addresses never flagged whatever their logs say: the deployment's own servers,
    /// monitoring, NAT gateways. Loopback and unspecified addresses are always on it. The
    /// manager's allowlists are added to it at run time.
    pub never_flag: Vec<IpNet>,
    /// Only these client-certificate names (common name or DNS SAN) count as agents; empty:
    /// any certificate signed by `tls.client_ca`.
    pub agent_names: Vec<String>,
}

/// `[rules]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Load the packs compiled into the binary. Default true.
    pub builtin: bool,
    /// Directories of extra `*.toml` packs.
    pub dirs: Vec<PathBuf>,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            builtin: true,
            dirs: Vec::new(),
        }
    }
}

/// `[manager]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagerConfig {
    /// Base URL, e.g. `https://manager.example:8443`. `http://` only to a loopback address.
    pub url: String,
    /// File holding the service credential (`mirage-manager` → Service credentials), one line.
    pub credential_file: PathBuf,
    /// Extra CA certificate (PEM) to trust for the manager's HTTPS, besides the web PKI roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Most verdicts per request (1 to 1000). Default 500.
    #[serde(default = "default_batch")]
    pub batch_max: usize,
    /// Seconds between allowlist refreshes from the manager. Default 60.
    #[serde(default = "default_allowlist_refresh")]
    pub allowlist_refresh_secs: u64,
}

fn default_batch() -> usize {
    500
}

fn default_allowlist_refresh() -> u64 {
    60
}

/// `[queue]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Directory of the on-disk verdict queue. Default `/var/lib/mirage-server/queue`.
    pub dir: PathBuf,
    /// Most bytes the queue may hold; when full, new verdicts are refused (counted and
    /// logged) and the queued ones kept. Default 256 MiB.
    pub max_bytes: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/mirage-server/queue"),
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// `[state]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// PostgreSQL shared by every server behind one address, e.g.
    /// `postgres://mirage@db/mirage`. Unset: counting state lives in this process.
    pub database_url: Option<String>,
    /// File holding the URL instead (keeps the password out of the config file).
    pub database_url_file: Option<PathBuf>,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics on `http://ADDR/metrics`. Unset: none.
    pub listen: Option<SocketAddr>,
}

impl FromStr for ServerConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }
}

impl ServerConfig {
    /// Reads and validates a file.
    ///
    /// # Errors
    ///
    /// If the file cannot be read, does not parse, or a value is out of range.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        text.parse()
    }

    /// Range and consistency checks.
    ///
    /// # Errors
    ///
    /// The first value out of range, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.listen;
        if l.udp.is_empty() && l.tcp.is_empty() && l.tls.is_empty() {
            return Err(value(
                "listen",
                "no listener: set at least one of listen.udp, listen.tcp, listen.tls",
            ));
        }
        if !l.tls.is_empty() && self.tls.is_none() {
            return Err(value(
                "listen.tls",
                "needs a [tls] section (cert, key, client_ca)",
            ));
        }
        let lim = &self.limits;
        if !(480..=1024 * 1024).contains(&lim.max_message_bytes) {
            return Err(value(
                "limits.max_message_bytes",
                "must be between 480 and 1048576",
            ));
        }
        if lim.max_connections == 0 || lim.max_connections > 1_000_000 {
            return Err(value("limits.max_connections", "must be 1 to 1000000"));
        }
        if lim.max_connections_per_addr == 0 || lim.max_connections_per_addr > lim.max_connections {
            return Err(value(
                "limits.max_connections_per_addr",
                "must be 1 to limits.max_connections",
            ));
        }
        if lim.messages_per_second == 0 {
            return Err(value("limits.messages_per_second", "must be at least 1"));
        }
        if !(1..=86_400).contains(&lim.idle_timeout_secs) {
            return Err(value("limits.idle_timeout_secs", "must be 1 to 86400"));
        }
        if !(1..=300).contains(&lim.handshake_timeout_secs) {
            return Err(value("limits.handshake_timeout_secs", "must be 1 to 300"));
        }
        if self.trust.agent_names.iter().any(|n| n.trim().is_empty()) {
            return Err(value("trust.agent_names", "names must not be empty"));
        }
        if let Some(m) = &self.manager {
            let lower = m.url.to_ascii_lowercase();
            if !(lower.starts_with("https://") || lower.starts_with("http://")) {
                return Err(value("manager.url", "must start with https:// or http://"));
            }
            if !(1..=1000).contains(&m.batch_max) {
                return Err(value("manager.batch_max", "must be 1 to 1000"));
            }
            if !(5..=86_400).contains(&m.allowlist_refresh_secs) {
                return Err(value(
                    "manager.allowlist_refresh_secs",
                    "must be 5 to 86400",
                ));
            }
        }
        if self.queue.max_bytes < 1024 * 1024 {
            return Err(value("queue.max_bytes", "must be at least 1048576 (1 MiB)"));
        }
        if self.state.database_url.is_some() && self.state.database_url_file.is_some() {
            return Err(value(
                "state.database_url_file",
                "set database_url or database_url_file, not both",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_and_full_files_parse() {
        let c: ServerConfig = "[listen]\nudp = [\"127.0.0.1:5514\"]\n".parse().unwrap();
        assert_eq!(c.limits, LimitsConfig::default());
        assert!(c.rules.builtin);
        let full = r#"
[listen]
udp = ["0.0.0.0:514"]
tcp = ["0.0.0.0:514"]
tls = ["[::]:6514"]
[tls]
cert = "/etc/mirage/server.crt"
key = "/etc/mirage/server.key"
client_ca = "/etc/mirage/agents-ca.crt"
[limits]
max_message_bytes = 8192
[trust]
relay_networks = ["10.0.0.0/8"]
never_flag = ["203.0.113.0/24", "2001:db8::/32"]
agent_names = ["web-1"]
[rules]
dirs = ["/etc/mirage/rules.d"]
[manager]
url = "https://manager.example:8443"
credential_file = "/etc/mirage/server.credential"
[queue]
dir = "/tmp/q"
max_bytes = 10485760
[state]
database_url_file = "/etc/mirage/db-url"
[metrics]
listen = "127.0.0.1:9102"
"#;
        let c: ServerConfig = full.parse().unwrap();
        assert_eq!(c.trust.never_flag.len(), 2);
        assert_eq!(c.manager.unwrap().batch_max, 500);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("", "listen"),
            ("[listen]\ntls = [\"0.0.0.0:6514\"]\n", "listen.tls"),
            (
                "[listen]\nudp = [\"0.0.0.0:514\"]\n[limits]\nmax_message_bytes = 10\n",
                "limits.max_message_bytes",
            ),
            (
                "[listen]\nudp = [\"0.0.0.0:514\"]\n[manager]\nurl = \"ftp://x\"\ncredential_file = \"/c\"\n",
                "manager.url",
            ),
        ];
        for (text, key) in cases {
            match text.parse::<ServerConfig>() {
                Err(ConfigError::Value { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            "[listen]\nudp = [\"0.0.0.0:514\"]\nbogus = 1\n".parse::<ServerConfig>(),
            Err(ConfigError::Parse(_))
        ));
        assert!(matches!(
            "[trust]\nrelay_networks = [\"10.0.0.0/33\"]\n".parse::<ServerConfig>(),
            Err(ConfigError::Parse(_))
        ));
    }
}
