//! `mirage-agent` configuration file (TOML). The file says *what* to enforce; command-line flags
//! say *how* to run. Unknown keys are errors, so a typo never silently weakens protection.

use std::{path::Path, str::FromStr};

use agent_common::Mode;
use serde::Deserialize;

use crate::addr::{AddrError, Net};

/// Errors loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is invalid or has unknown keys.
    #[error("parsing configuration")]
    Parse(#[source] toml::de::Error),
    /// An allowlist entry is invalid.
    #[error("allowlist entry `{entry}`")]
    Allow {
        /// The entry.
        entry: String,
        /// The cause.
        #[source]
        source: AddrError,
    },
}

/// A mode as written in configuration and on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ModeName {
    /// Attackers go to the sandbox (needs the redirect data path).
    Unreal,
    /// Everyone but the allowlist goes to the sandbox (needs the redirect data path).
    Honeypot,
    /// Attackers are connected back to themselves (needs the reflect data path).
    Reflect,
    /// Attackers are dropped.
    #[default]
    Firewall,
}

impl From<ModeName> for Mode {
    fn from(m: ModeName) -> Mode {
        match m {
            ModeName::Unreal => Mode::Unreal,
            ModeName::Honeypot => Mode::Honeypot,
            ModeName::Reflect => Mode::Reflect,
            ModeName::Firewall => Mode::Firewall,
        }
    }
}

/// XDP attach mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum XdpModeName {
    /// Generic (SKB) mode on veth, where it is faster; elsewhere native (driver) mode, falling
    /// back to generic mode with a warning.
    #[default]
    Auto,
    /// Native (driver) mode only.
    Native,
    /// Generic (SKB) mode only.
    Generic,
}

/// The agent's configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Data-path mode; `--mode` overrides it.
    pub mode: ModeName,
    /// XDP attach mode.
    pub xdp_mode: XdpModeName,
    /// Source ranges that always pass, whatever the attacker maps say (`ADDR[/LEN]`). Applied at
    /// start; entries added later with `mirage-agent allow` are kept.
    pub allowlist: Vec<String>,
    /// Accept allowlist ranges broader than /16 (IPv4) or /32 (IPv6).
    pub allow_broad_ranges: bool,
}

impl FromStr for AgentConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let cfg: AgentConfig = toml::from_str(s).map_err(ConfigError::Parse)?;
        cfg.validate()?;
        Ok(cfg)
    }
}

impl AgentConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        text.parse()
    }

    /// Checks every field that `from_str` cannot check by type.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.allowlist_nets().map(|_| ())
    }

    /// The allowlist, parsed and validated.
    pub fn allowlist_nets(&self) -> Result<Vec<Net>, ConfigError> {
        self.allowlist
            .iter()
            .map(|entry| {
                entry
                    .parse::<Net>()
                    .and_then(|n| n.check_breadth(self.allow_broad_ranges))
                    .map_err(|source| ConfigError::Allow {
                        entry: entry.clone(),
                        source,
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_firewall_with_empty_allowlist() {
        let c: AgentConfig = "".parse().unwrap();
        assert_eq!(c, AgentConfig::default());
        assert_eq!(c.mode, ModeName::Firewall);
    }

    #[test]
    fn parses_a_full_file() {
        let c: AgentConfig = r#"
            mode = "firewall"
            xdp_mode = "generic"
            allowlist = ["198.18.0.0/24", "2001:db8::/48", "::ffff:192.0.2.1"]
        "#
        .parse()
        .unwrap();
        assert_eq!(c.xdp_mode, XdpModeName::Generic);
        assert_eq!(c.allowlist_nets().unwrap().len(), 3);
    }

    #[test]
    fn refuses_unknown_keys_and_bad_entries() {
        assert!(matches!(
            "mdoe = \"firewall\"".parse::<AgentConfig>(),
            Err(ConfigError::Parse(_))
        ));
        assert!(matches!(
            "allowlist = [\"0.0.0.0/0\"]".parse::<AgentConfig>(),
            Err(ConfigError::Allow { .. })
        ));
        assert!(
            "allowlist = [\"0.0.0.0/0\"]\nallow_broad_ranges = true"
                .parse::<AgentConfig>()
                .is_ok()
        );
        assert!(matches!(
            "allowlist = [\"198.18.0.1/24\"]".parse::<AgentConfig>(),
            Err(ConfigError::Allow { .. })
        ));
    }
}
