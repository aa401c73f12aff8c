//! `mirage-manager` configuration file (TOML). The file says *what* to run (where to listen, which
//! database, how long sessions last); flags say *how* (`--config FILE`). Unknown keys are errors,
//! so a typo never silently falls back to a default.
//!
//! [`ManagerConfig::from_str`] is the test entry point; [`ManagerConfig::load`] reads a file. Both
//! validate.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::Deserialize;

/// Default `listen`: loopback only, plain HTTP (see [`ManagerConfig::listen`]).
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8443);
/// Default `data_dir`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/mirage-manager";
/// Default `postgres_bin_dir`: Debian's `postgresql-15` package.
pub const DEFAULT_POSTGRES_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// Default `session_ttl`.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Default `login_throttle.max_failures`.
pub const DEFAULT_MAX_FAILURES: u32 = 5;
/// Default `login_throttle.window`.
pub const DEFAULT_THROTTLE_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Longest `session_ttl` accepted: a stolen cookie should not outlive a month.
const MAX_SESSION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

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
    Parse(#[source] toml::de::Error),
    /// A key has a value outside its allowed range or format.
    #[error("`{key}`: {reason}")]
    Value {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManagerConfig {
    /// Address and port of the HTTP API and web UI. Without `[tls]` the manager speaks plain
    /// HTTP and this must be a loopback address (or put a TLS reverse proxy in front); with
    /// `[tls]` it may be any address. Default `127.0.0.1:8443`.
    pub listen: SocketAddr,
    /// Serve HTTPS with this certificate and key (PEM). Required to listen on anything but
    /// loopback. Default: unset (plain HTTP on loopback).
    pub tls: Option<TlsConfig>,
    /// Directory the manager owns. With no `database_url` the embedded PostgreSQL cluster lives
    /// in `data_dir/postgres` (created on first start). Default `/var/lib/mirage-manager`.
    pub data_dir: PathBuf,
    /// PostgreSQL server to use, e.g. `postgres://mirage:PASSWORD@db.example/mirage` (a Unix
    /// socket: `postgres://mirage@localhost/mirage?host=/run/postgresql`). When unset the manager starts,
    /// owns and stops a private cluster under `data_dir`. Default: unset.
    pub database_url: Option<String>,
    /// Directory holding `initdb`, `pg_ctl` and `postgres` for the embedded cluster. Default
    /// `/usr/lib/postgresql/15/bin`.
    pub postgres_bin_dir: PathBuf,
    /// Mark the session cookie `Secure` (sent over HTTPS only, and named with the `__Host-`
    /// prefix). Browsers treat `http://localhost` and `http://127.0.0.1` as secure, so the default
    /// works for a local browser; set `false` only for clients that are strict about it (tests,
    /// curl over plain HTTP to another name). Default `true`.
    pub cookie_secure: bool,
    /// Lifetime of a login session, counted from the login (not sliding): `30m`, `12h`, `7d`.
    /// At most 30 days. Default `12h`.
    #[serde(with = "duration_str")]
    pub session_ttl: Duration,
    /// Login throttling.
    pub login_throttle: LoginThrottleConfig,
}

/// The listener's certificate chain and private key, PEM files read at start.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first (`fullchain.pem`).
    pub cert: PathBuf,
    /// Private key of the leaf (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Login throttling: after `max_failures` failed logins for one username, or from one client
/// address, within `window`, further attempts get `429 Too Many Requests` with `Retry-After` until
/// the oldest of those failures leaves the window. Refused attempts are not counted, so an attacker
/// cannot keep a user locked out past the window by continuing to try.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoginThrottleConfig {
    /// Failed logins allowed per username and per client address within `window`. Default `5`.
    pub max_failures: u32,
    /// The sliding window failures are counted in: `15m`, `1h`. Default `15m`.
    #[serde(with = "duration_str")]
    pub window: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            tls: None,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            database_url: None,
            postgres_bin_dir: PathBuf::from(DEFAULT_POSTGRES_BIN_DIR),
            cookie_secure: true,
            session_ttl: DEFAULT_SESSION_TTL,
            login_throttle: LoginThrottleConfig::default(),
        }
    }
}

impl Default for LoginThrottleConfig {
    fn default() -> Self {
        Self {
            max_failures: DEFAULT_MAX_FAILURES,
            window: DEFAULT_THROTTLE_WINDOW,
        }
    }
}

impl FromStr for ManagerConfig {
    type Err = ConfigError;

    /// Parses and validates a configuration file's contents.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let config: Self = toml::from_str(s).map_err(ConfigError::Parse)?;
        config.validate()?;
        Ok(config)
    }
}

impl ManagerConfig {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        text.parse()
    }

    /// Checks what the types cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tls.is_none() && !self.listen.ip().is_loopback() {
            return Err(value(
                "listen",
                format!(
                    "{} is not a loopback address and `[tls]` is not set: session cookies, \
                     passwords and agent credentials would cross the network in clear; set \
                     `[tls] cert`/`key`, or listen on 127.0.0.1 or [::1] behind a TLS reverse proxy",
                    self.listen
                ),
            ));
        }
        if let Some(tls) = &self.tls {
            for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
                if !path.is_absolute() {
                    return Err(value(
                        key,
                        format!("{} must be an absolute path", path.display()),
                    ));
                }
            }
        }
        if !self.data_dir.is_absolute() {
            return Err(value(
                "data_dir",
                format!("{} must be an absolute path", self.data_dir.display()),
            ));
        }
        if let Some(url) = &self.database_url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(value(
                "database_url",
                "must start with postgres:// or postgresql://".to_owned(),
            ));
        }
        if self.database_url.is_none() && !self.postgres_bin_dir.is_absolute() {
            return Err(value(
                "postgres_bin_dir",
                format!(
                    "{} must be an absolute path",
                    self.postgres_bin_dir.display()
                ),
            ));
        }
        if self.session_ttl < Duration::from_secs(60) || self.session_ttl > MAX_SESSION_TTL {
            return Err(value(
                "session_ttl",
                format!(
                    "{} is outside 1m..30d",
                    humantime::format_duration(self.session_ttl)
                ),
            ));
        }
        if self.login_throttle.max_failures == 0 {
            return Err(value(
                "login_throttle.max_failures",
                "must be at least 1".to_owned(),
            ));
        }
        if self.login_throttle.window < Duration::from_secs(1)
            || self.login_throttle.window > Duration::from_secs(24 * 3600)
        {
            return Err(value(
                "login_throttle.window",
                format!(
                    "{} is outside 1s..24h",
                    humantime::format_duration(self.login_throttle.window)
                ),
            ));
        }
        Ok(())
    }
}

fn value(key: &'static str, reason: String) -> ConfigError {
    ConfigError::Value { key, reason }
}

/// Durations written as humantime strings (`90s`, `15m`, `12h`, `7d`).
mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, de::Error as _};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| D::Error::custom(format!("`{s}`: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(
            "".parse::<ManagerConfig>().unwrap(),
            ManagerConfig::default()
        );
    }

    #[test]
    fn parses_every_key() {
        let config: ManagerConfig = r#"
            listen = "[::1]:9000"
            data_dir = "/srv/mirage"
            database_url = "postgres://mirage@localhost/mirage?host=/run/postgresql"
            postgres_bin_dir = "/opt/pg/bin"
            cookie_secure = false
            session_ttl = "2h"
            [login_throttle]
            max_failures = 3
            window = "5m"
        "#
        .parse()
        .unwrap();
        assert_eq!(config.listen, "[::1]:9000".parse().unwrap());
        assert_eq!(config.data_dir, Path::new("/srv/mirage"));
        assert!(config.database_url.is_some());
        assert!(!config.cookie_secure);
        assert_eq!(config.session_ttl, Duration::from_secs(7200));
        assert_eq!(config.login_throttle.max_failures, 3);
        assert_eq!(config.login_throttle.window, Duration::from_secs(300));
        let tls: ManagerConfig =
            "listen = \"0.0.0.0:8443\"\n[tls]\ncert = \"/etc/m/c.pem\"\nkey = \"/etc/m/k.pem\""
                .parse()
                .unwrap();
        assert_eq!(tls.tls.unwrap().key, Path::new("/etc/m/k.pem"));
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        for (text, needle) in [
            ("listn = \"127.0.0.1:1\"", "unknown field"),
            ("listen = \"0.0.0.0:8443\"", "not a loopback"),
            ("[tls]\ncert = \"c.pem\"\nkey = \"/k.pem\"", "absolute"),
            ("[tls]\ncert = \"/c.pem\"", "missing field `key`"),
            ("data_dir = \"relative\"", "absolute"),
            ("database_url = \"mysql://x\"", "postgres://"),
            ("session_ttl = \"5s\"", "outside"),
            ("session_ttl = \"soon\"", "soon"),
            ("[login_throttle]\nmax_failures = 0", "at least 1"),
            ("[login_throttle]\nwindow = \"2d\"", "outside"),
        ] {
            let err = text.parse::<ManagerConfig>().unwrap_err();
            let chain = format!(
                "{err}: {}",
                std::error::Error::source(&err)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            );
            assert!(chain.contains(needle), "{text}: {chain}");
        }
    }
}
