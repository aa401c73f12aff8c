//! Declarative rule packs: TOML files of regexes with a per-source threshold and window.
//!
//! A rule pack is a file of `[[rule]]` tables (format in `docs/server-rules.md`). Every pattern
//! must capture the client address in a group named `addr`; the address is then parsed strictly
//! (`crate::addr`), so a pattern only says *where* the address is, never *what* counts as one.
//! `RuleSet::evaluate` is pure and sync: one line in, the matches out.

use std::{
    collections::HashSet,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::addr::parse_addr;

/// The packs shipped in `server/rules/`, compiled in so `mirage-server scan` works without them
/// on disk. `--rules DIR` adds more without recompiling.
pub const BUILTIN: &[(&str, &str)] = &[
    ("sshd.toml", include_str!("../../rules/sshd.toml")),
    ("vsftpd.toml", include_str!("../../rules/vsftpd.toml")),
    ("rsync.toml", include_str!("../../rules/rsync.toml")),
    ("mysql.toml", include_str!("../../rules/mysql.toml")),
    ("redis.toml", include_str!("../../rules/redis.toml")),
    ("mongodb.toml", include_str!("../../rules/mongodb.toml")),
    ("web.toml", include_str!("../../rules/web.toml")),
    ("mirage.toml", include_str!("../../rules/mirage.toml")),
];

/// The longest window a rule may have (30 days): longer ones would keep per-source state for
/// longer than any ban this system issues.
pub const MAX_WINDOW_SECS: u64 = 30 * 86_400;

/// Errors loading or validating rule packs.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// A rule file or directory could not be read.
    #[error("cannot read rules at {path}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A rule file is not valid TOML or has unknown or missing keys.
    #[error("invalid rule file {file}")]
    Parse {
        /// The file name.
        file: String,
        /// The TOML error (it names the key and line).
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A pattern does not compile.
    #[error("rule {rule} in {file}: pattern {index} does not compile")]
    Regex {
        /// The file name.
        file: String,
        /// The rule id.
        rule: String,
        /// The pattern's position in `patterns`, from 0.
        index: usize,
        /// The regex error.
        #[source]
        source: Box<regex::Error>,
    },
    /// A rule breaks a constraint (message says which).
    #[error("rule {rule} in {file}: {reason}")]
    Invalid {
        /// The file name.
        file: String,
        /// The rule id (or `?` when the id itself is missing).
        rule: String,
        /// What is wrong.
        reason: String,
    },
}

/// How serious a rule's verdict is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth recording; no action expected.
    Info,
    /// Noise-level attack (scans).
    Low,
    /// Brute force and probing.
    Medium,
    /// Successful abuse or exploitation attempts.
    High,
    /// Compromise or remote code execution.
    Critical,
}

/// What the rule suggests the agent does with the source (the manager's policy decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Drop the source's packets.
    Drop,
    /// Redirect the source to the sandbox.
    Redirect,
    /// Reflect the source's traffic back at it.
    Reflect,
    /// Whatever the policy's default action is.
    Default,
}

/// One file of rules as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFileConfig {
    rule: Vec<RuleConfig>,
}

/// One rule as written in a pack.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique id across all loaded packs, e.g. `sshd-failed-password`.
    pub id: String,
    /// Service name (`sshd`, `vsftpd`, `rsync`, `mysql`, `redis`, `mongodb`, `web`, or an
    /// operator's own): what `--service` selects.
    pub service: String,
    /// What the rule detects, for operators.
    pub description: String,
    /// Regexes over one log line; any one matching counts. Each captures `(?P<addr>...)`.
    pub patterns: Vec<String>,
    /// Matches from one source within `window` seconds that flag it (at least 1).
    pub threshold: u32,
    /// Sliding window in seconds (1 to 30 days).
    pub window: u64,
    /// Severity of the verdict.
    pub severity: Severity,
    /// Suggested action.
    pub action: Action,
    /// Count IPv6 sources per prefix of this length instead of per address (e.g. 64).
    #[serde(default)]
    pub ipv6_prefix: Option<u8>,
    /// Only count sources already flagged by this rule (same service, loaded earlier): the
    /// "success after failures" shape, e.g. a login accepted after a brute force.
    #[serde(default)]
    pub requires: Option<String>,
}

/// A validated rule with compiled patterns.
#[derive(Debug)]
pub struct Rule {
    /// The rule as written.
    pub config: RuleConfig,
    /// The file it came from.
    pub file: String,
    patterns: Vec<Regex>,
}

/// The outcome of one rule on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extracted {
    /// The pattern matched and the address parsed.
    Addr(IpAddr),
    /// The pattern matched but its `addr` text is not an address (the line does not count).
    Unparseable,
    /// The pattern has no `addr` but a `session` (a pid, thread or connection id): the address
    /// is the one an earlier line of the same file and service bound to that session.
    Session(String),
}

/// A rule that matched a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    /// Index of the rule in the `RuleSet`.
    pub rule: usize,
    /// The extracted address.
    pub addr: Extracted,
    /// The `session` capture, if the pattern has one. With a parsed address it binds the
    /// session to that address for later lines.
    pub session: Option<String>,
}

/// All loaded rules.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    /// The built-in packs.
    ///
    /// # Errors
    ///
    /// If a shipped pack is invalid (the unit tests load them, so this is a build-time bug).
    pub fn builtin() -> Result<Self, RuleError> {
        let mut set = Self::default();
        for (name, text) in BUILTIN {
            set.add_str(name, text)?;
        }
        Ok(set)
    }

    /// Adds the rules of one pack; `file` names it in errors.
    ///
    /// # Errors
    ///
    /// On TOML errors, unknown keys, invalid rules or an id already loaded.
    pub fn add_str(&mut self, file: &str, text: &str) -> Result<(), RuleError> {
        let parsed: RuleFileConfig = toml::from_str(text).map_err(|e| RuleError::Parse {
            file: file.to_owned(),
            source: Box::new(e),
        })?;
        let mut ids: HashSet<String> = self.rules.iter().map(|r| r.config.id.clone()).collect();
        let mut new = Vec::with_capacity(parsed.rule.len());
        for config in parsed.rule {
            let rule = Rule::new(file, config)?;
            if !ids.insert(rule.config.id.clone()) {
                return Err(invalid(file, &rule.config.id, "duplicate rule id".into()));
            }
            if let Some(req) = &rule.config.requires {
                let target = self.rules.iter().chain(&new).find(|r| &r.config.id == req);
                match target {
                    None => {
                        return Err(invalid(
                            file,
                            &rule.config.id,
                            format!("requires unknown rule {req:?} (it must be loaded earlier)"),
                        ));
                    }
                    Some(t) if t.config.service != rule.config.service => {
                        return Err(invalid(
                            file,
                            &rule.config.id,
                            format!("requires rule {req:?} of another service"),
                        ));
                    }
                    Some(_) => {}
                }
            }
            new.push(rule);
        }
        self.rules.extend(new);
        Ok(())
    }

    /// Adds every `*.toml` file of a directory, in name order.
    ///
    /// # Errors
    ///
    /// If the directory or a file cannot be read, or a pack is invalid.
    pub fn add_dir(&mut self, dir: &Path) -> Result<(), RuleError> {
        let read = |path: &Path, source| RuleError::Read {
            path: path.to_owned(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| read(dir, e))? {
            let path = entry.map_err(|e| read(dir, e))?.path();
            if path.extension().is_some_and(|e| e == "toml") {
                files.push(path);
            }
        }
        files.sort();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|e| read(&path, e))?;
            self.add_str(&path.display().to_string(), &text)?;
        }
        Ok(())
    }

    /// Keeps only the rules of one service.
    #[must_use]
    pub fn only_service(self, service: &str) -> Self {
        Self {
            rules: self
                .rules
                .into_iter()
                .filter(|r| r.config.service == service)
                .collect(),
        }
    }

    /// The rules, in load order (a `Match::rule` indexes this).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether no rule is loaded.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules matching one line. A line may match several rules (a scanner's 404 is both a
    /// scanner hit and part of a 404 burst); within a rule the first matching pattern wins.
    pub fn evaluate(&self, line: &str) -> Vec<Match> {
        self.rules
            .iter()
            .enumerate()
            .filter_map(|(idx, rule)| {
                rule.extract(line).map(|(addr, session)| Match {
                    rule: idx,
                    addr,
                    session,
                })
            })
            .collect()
    }
}

impl Rule {
    fn new(file: &str, config: RuleConfig) -> Result<Self, RuleError> {
        let id = config.id.clone();
        let bad = |reason: &str| Err(invalid(file, &id, reason.to_owned()));
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        };
        if !name_ok(&config.id) {
            return bad("id must be non-empty lowercase letters, digits and '-'");
        }
        if !name_ok(&config.service) {
            return bad("service must be non-empty lowercase letters, digits and '-'");
        }
        if config.description.trim().is_empty() {
            return bad("description is empty");
        }
        if config.patterns.is_empty() {
            return bad("patterns is empty");
        }
        if config.threshold == 0 {
            return bad("threshold must be at least 1");
        }
        if config.window == 0 || config.window > MAX_WINDOW_SECS {
            return bad("window must be between 1 second and 30 days (2592000)");
        }
        if let Some(p) = config.ipv6_prefix
            && !(1..=128).contains(&p)
        {
            return bad("ipv6_prefix must be between 1 and 128");
        }
        let mut patterns = Vec::with_capacity(config.patterns.len());
        for (index, pattern) in config.patterns.iter().enumerate() {
            let re = Regex::new(pattern).map_err(|e| RuleError::Regex {
                file: file.to_owned(),
                rule: id.clone(),
                index,
                source: Box::new(e),
            })?;
            if !re
                .capture_names()
                .any(|n| n == Some("addr") || n == Some("session"))
            {
                return Err(invalid(
                    file,
                    &id,
                    format!(
                        "pattern {index} has no named capture `(?P<addr>...)` (or `(?P<session>...)`)"
                    ),
                ));
            }
            patterns.push(re);
        }
        Ok(Self {
            config,
            file: file.to_owned(),
            patterns,
        })
    }

    /// The address (and session) this rule extracts from a line, if any pattern matches.
    pub fn extract(&self, line: &str) -> Option<(Extracted, Option<String>)> {
        let caps = self.patterns.iter().find_map(|re| re.captures(line))?;
        let session = caps.name("session").map(|m| m.as_str().to_owned());
        let addr = match (caps.name("addr"), &session) {
            (Some(m), _) => match parse_addr(m.as_str()) {
                Some(ip) => Extracted::Addr(ip),
                None => Extracted::Unparseable,
            },
            (None, Some(id)) => Extracted::Session(id.clone()),
            (None, None) => Extracted::Unparseable,
        };
        Some((addr, session))
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Info => "info",
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        };
        f.write_str(s)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Drop => "drop",
            Self::Redirect => "redirect",
            Self::Reflect => "reflect",
            Self::Default => "default",
        };
        f.write_str(s)
    }
}

fn invalid(file: &str, rule: &str, reason: String) -> RuleError {
    RuleError::Invalid {
        file: file.to_owned(),
        rule: rule.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests;
