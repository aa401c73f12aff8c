//! `mirage-agent` configuration file (TOML). The file says *what* to enforce; command-line flags
//! say *how* to run. Unknown keys are errors, so a typo never silently weakens protection.
//!
//! Everything the data path reads is derived here, purely: [`AgentConfig::data_path`] (the
//! `CONFIG` entry), [`AgentConfig::targets`] (`TARGETS`) and [`AgentConfig::allow_port_keys`]
//! (`ALLOW_PORTS`). Validation runs on the *effective* configuration, after `--mode` has been
//! applied ([`AgentConfig::parse`]), so that `--mode firewall` with a file that has no sandbox is
//! accepted and `--mode unreal` without one is refused.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    str::FromStr,
};

use agent_common::{DataPathConfig, Mode, PortKey, RedirectModel, Target, TargetKey, family};
use serde::Deserialize;

use crate::addr::{self, AddrError, Net};

/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// Default `nat_ports`. They are source ports on `snat_v4`/`snat_v6`; the range overlaps Linux's
/// ephemeral ports (32768-60999), which matters only if this host also opens connections of its
/// own from that address to the sandbox (then narrow one of the two ranges).
pub const DEFAULT_NAT_PORTS: [u16; 2] = [20000, 59999];
/// Default `reflect_pps`.
pub const DEFAULT_REFLECT_PPS: u32 = 100;
/// Lowest port `nat_ports` may start at: below it are the well-known and privileged services the
/// host (or the sandbox) may listen on.
pub const MIN_NAT_PORT: u16 = 1024;

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
    /// An address-valued key (a sandbox target, `snat_v4`, `snat_v6`) is not a usable unicast
    /// host address.
    #[error("`{key}` = `{value}`: {reason}")]
    Address {
        /// The key, e.g. `sandbox[1].target`.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A key has a value outside its allowed range or format.
    #[error("`{key}` = `{value}`: {reason}")]
    Value {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two sandbox entries claim the same port, protocol and family.
    #[error(
        "`sandbox[{second}]` repeats the {proto} {family} target of port {port} already set by \
         `sandbox[{first}]`"
    )]
    DuplicateTarget {
        /// Index of the first entry.
        first: usize,
        /// Index of the repeating entry.
        second: usize,
        /// The protected port (0: default target).
        port: u16,
        /// `tcp` or `udp`.
        proto: &'static str,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
    /// A mode that sends traffic to the sandbox has no sandbox to send it to.
    #[error(
        "mode `{mode}` sends traffic to the sandbox, but no `[[sandbox]]` target is configured; \
         add one (see docs/config.md) or use mode `firewall`"
    )]
    NoTargets {
        /// The mode.
        mode: &'static str,
    },
    /// `full-nat` has a target of a family without a source address for that family.
    #[error(
        "`redirect_model = \"full-nat\"` with an {family} sandbox target needs `{key}` (this \
         host's {family} address toward the sandbox)"
    )]
    MissingSnat {
        /// `snat_v4` or `snat_v6`.
        key: &'static str,
        /// `IPv4` or `IPv6`.
        family: &'static str,
    },
}

/// A mode as written in configuration and on the command line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ModeName {
    /// Attackers go to the sandbox; everyone else is untouched (the default).
    #[default]
    Unreal,
    /// Everyone but allowlisted sources and ports goes to the sandbox.
    Honeypot,
    /// Attackers are connected back to themselves, rate-capped per source.
    Reflect,
    /// Attackers are dropped.
    Firewall,
}

impl ModeName {
    /// Whether the mode sends traffic to the sandbox by default, and so needs a target.
    pub fn needs_targets(self) -> bool {
        matches!(self, ModeName::Unreal | ModeName::Honeypot)
    }
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

/// The redirect model as written in configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RedirectModelName {
    /// DNAT only: the sandbox sees the attacker's address and routes its replies back through
    /// this host.
    #[default]
    PreserveSource,
    /// DNAT and SNAT to `snat_v4`/`snat_v6` with a per-flow port from `nat_ports`: the sandbox
    /// can be anywhere.
    FullNat,
}

impl From<RedirectModelName> for RedirectModel {
    fn from(m: RedirectModelName) -> RedirectModel {
        match m {
            RedirectModelName::PreserveSource => RedirectModel::PreserveSource,
            RedirectModelName::FullNat => RedirectModel::FullNat,
        }
    }
}

/// Name of a redirect model in configuration, logs and JSON.
pub fn model_name(m: RedirectModel) -> &'static str {
    match m {
        RedirectModel::PreserveSource => "preserve-source",
        RedirectModel::FullNat => "full-nat",
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

/// Protocol selector of a sandbox entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProtoName {
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
    /// Both TCP and UDP.
    #[default]
    Any,
}

impl ProtoName {
    fn protos(self) -> &'static [u8] {
        match self {
            ProtoName::Tcp => &[IPPROTO_TCP],
            ProtoName::Udp => &[IPPROTO_UDP],
            ProtoName::Any => &[IPPROTO_TCP, IPPROTO_UDP],
        }
    }
}

/// Name of an IP protocol number as used in configuration and JSON (`tcp`, `udp`), `None` for
/// any other.
pub fn proto_name(proto: u8) -> Option<&'static str> {
    match proto {
        IPPROTO_TCP => Some("tcp"),
        IPPROTO_UDP => Some("udp"),
        _ => None,
    }
}

/// Human name of a [`family`] tag.
pub fn family_name(f: u8) -> &'static str {
    match f {
        family::V4 => "IPv4",
        family::V6 => "IPv6",
        _ => "unknown family",
    }
}

/// One `[[sandbox]]` entry: where attackers' traffic to a protected port goes.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SandboxConfig {
    /// Protected port; omitted or 0: the default target, used for every port without its own.
    #[serde(default)]
    pub port: u16,
    /// `tcp`, `udp` or `any` (both, the default).
    #[serde(default)]
    pub proto: ProtoName,
    /// Sandbox `ADDR[:PORT]` (`[V6ADDR]:PORT` for IPv6). Without a port the protected port is
    /// kept. The address's family is the family of the attackers it serves: an IPv4 attacker
    /// goes to an IPv4 sandbox, an IPv6 attacker to an IPv6 one.
    pub target: String,
}

/// The agent's configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Data-path mode: the default action for attackers (and, in `honeypot`, for everyone);
    /// `--mode` overrides it.
    pub mode: ModeName,
    /// XDP attach mode; `--xdp-mode` overrides it.
    pub xdp_mode: XdpModeName,
    /// Source ranges that always pass, whatever the attacker maps say (`ADDR[/LEN]`). Applied at
    /// start; entries added later with `mirage-agent allow` are kept.
    pub allowlist: Vec<String>,
    /// Accept allowlist ranges broader than /16 (IPv4) or /32 (IPv6).
    pub allow_broad_ranges: bool,
    /// How redirected packets reach the sandbox: `preserve-source` (DNAT only) or `full-nat`
    /// (DNAT and SNAT).
    pub redirect_model: RedirectModelName,
    /// `full-nat`: this host's IPv4 address toward the sandbox, the source IPv4 sandboxes see.
    /// Required with `full-nat` when any sandbox target is IPv4.
    pub snat_v4: Option<String>,
    /// `full-nat`: this host's IPv6 address toward the sandbox. Required with `full-nat` when any
    /// sandbox target is IPv6.
    pub snat_v6: Option<String>,
    /// `full-nat` source port range, inclusive: `[min, max]`, `min >= 1024`.
    #[serde(deserialize_with = "port_pair")]
    pub nat_ports: [u16; 2],
    /// Reflected packets allowed per source and second, enforced in the kernel; 0 disables
    /// reflection (reflect actions then pass).
    pub reflect_pps: u32,
    /// Ports `honeypot` mode leaves to the real services: `"tcp/22"`, `"udp/53"`, or a bare
    /// `"80"` for both protocols.
    pub honeypot_allow_ports: Vec<String>,
    /// Sandbox targets, per protected port and protocol, plus default targets (port 0).
    pub sandbox: Vec<SandboxConfig>,
    /// Directory the agent keeps its state in: the manager credential, the last applied policy,
    /// log offsets and the shipping queue. Default `/var/lib/mirage-agent`.
    pub state_dir: std::path::PathBuf,
    /// Policy from the manager (it then replaces the data-path settings above, which stay the
    /// fallback until the first policy arrives).
    pub manager: Option<links::ManagerLink>,
    /// Log shipping to a mirage-server.
    pub server: Option<links::ServerLink>,
    /// Log files to collect, per service.
    pub logs: Vec<links::LogSource>,
    /// The Redis collector.
    pub redis: Option<links::RedisSource>,
    /// systemd journal sources.
    pub journal: Vec<links::JournalSource>,
    /// Serve Prometheus metrics on `http://ADDR/metrics`.
    pub metrics: Option<SocketAddr>,
}

/// Deserializes exactly two ports. serde's `[u16; 2]` would take the first two elements of a
/// longer TOML array and silently drop the rest.
fn port_pair<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u16; 2], D::Error> {
    let v = Vec::<u16>::deserialize(d)?;
    <[u16; 2]>::try_from(v.as_slice())
        .map_err(|_| serde::de::Error::invalid_length(v.len(), &"two ports, [min, max]"))
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            mode: ModeName::default(),
            xdp_mode: XdpModeName::default(),
            allowlist: Vec::new(),
            allow_broad_ranges: false,
            redirect_model: RedirectModelName::default(),
            snat_v4: None,
            snat_v6: None,
            nat_ports: DEFAULT_NAT_PORTS,
            reflect_pps: DEFAULT_REFLECT_PPS,
            honeypot_allow_ports: Vec::new(),
            sandbox: Vec::new(),
            state_dir: std::path::PathBuf::from(links::DEFAULT_STATE_DIR),
            manager: None,
            server: None,
            logs: Vec::new(),
            redis: None,
            journal: Vec::new(),
            metrics: None,
        }
    }
}

impl FromStr for AgentConfig {
    type Err = ConfigError;

    /// Parses and validates a file as is (no `--mode` override).
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        Self::parse(s, None)
    }
}

/// A resolved sandbox target, for display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetAddr {
    /// Sandbox address (IPv4-mapped folded to IPv4).
    pub addr: IpAddr,
    /// Sandbox port; 0 keeps the protected port.
    pub port: u16,
}

impl fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.addr, self.port) {
            (a, 0) => write!(f, "{a}"),
            (a, p) => write!(f, "{}", SocketAddr::new(a, p)),
        }
    }
}

impl From<TargetAddr> for Target {
    fn from(t: TargetAddr) -> Target {
        Target {
            addr: addr_bytes(t.addr),
            port: t.port,
            _pad: [0; 2],
        }
    }
}

/// The 16-byte map form of an address: IPv4 in the first 4 bytes, the rest zero.
pub fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// The address held in a 16-byte map field of the given [`family`]; `None` for an unknown
/// family.
pub fn addr_from_bytes(fam: u8, b: [u8; 16]) -> Option<IpAddr> {
    match fam {
        family::V4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        family::V6 => Some(IpAddr::V6(Ipv6Addr::from(b))),
        _ => None,
    }
}

/// The [`family`] tag of an address.
pub fn family_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => family::V4,
        IpAddr::V6(_) => family::V6,
    }
}

/// Checks that `ip` (already folded) can be a packet destination we rewrite toward: a unicast
/// host address, not unspecified, multicast, broadcast or loopback.
fn check_unicast(ip: IpAddr) -> Result<IpAddr, String> {
    let host = match ip {
        IpAddr::V4(a) => Net::V4(a, 32),
        IpAddr::V6(a) => Net::V6(a, 128),
    };
    if let Err(AddrError::NotASource { what, .. }) = host.check_source() {
        return Err(format!("{what} is not a unicast host address"));
    }
    if ip.is_loopback() {
        // The kernel drops packets from the wire that are addressed to loopback (martians), so
        // a rewrite toward one could never be delivered.
        return Err("a loopback address cannot be reached from the wire".to_owned());
    }
    Ok(ip)
}

/// Parses a target: `ADDR`, `ADDR:PORT` or `[V6ADDR]:PORT`.
fn parse_target(s: &str) -> Result<TargetAddr, String> {
    let s = s.trim();
    let (ip, port) = if let Ok(sa) = s.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err("port 0 is not a port; omit the port to keep the protected one".into());
        }
        (sa.ip(), sa.port())
    } else if let Ok(ip) = s.parse::<IpAddr>() {
        (ip, 0)
    } else if s.starts_with('[') && s.ends_with(']') {
        let ip = s[1..s.len() - 1]
            .parse::<Ipv6Addr>()
            .map_err(|_| "not an address".to_owned())?;
        (IpAddr::V6(ip), 0)
    } else {
        return Err("expected ADDR, ADDR:PORT or [V6ADDR]:PORT".into());
    };
    let ip = check_unicast(addr::normalize(ip))?;
    Ok(TargetAddr { addr: ip, port })
}

/// Parses a honeypot allow-port entry: `tcp/N`, `udp/N` or `N` (both).
fn parse_port_entry(s: &str) -> Result<Vec<PortKey>, String> {
    let s = s.trim();
    let (protos, port): (&[u8], &str) = match s.split_once('/') {
        Some((p, n)) => match p.to_ascii_lowercase().as_str() {
            "tcp" => (&[IPPROTO_TCP], n),
            "udp" => (&[IPPROTO_UDP], n),
            _ => return Err("protocol must be `tcp` or `udp`".into()),
        },
        None => (&[IPPROTO_TCP, IPPROTO_UDP], s),
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 && !port.starts_with('+') => p,
        _ => return Err("port must be 1-65535".into()),
    };
    Ok(protos
        .iter()
        .map(|&proto| PortKey {
            port,
            proto,
            _pad: 0,
        })
        .collect())
}

impl AgentConfig {
    /// Parses a file, applies the `--mode` override if any, and validates the result.
    pub fn parse(text: &str, mode: Option<ModeName>) -> Result<Self, ConfigError> {
        let mut cfg: AgentConfig = toml::from_str(text).map_err(ConfigError::Parse)?;
        if let Some(m) = mode {
            cfg.mode = m;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a file (or starts from the defaults when there is none), applies the `--mode`
    /// override if any, and validates the result.
    pub fn load(path: Option<&Path>, mode: Option<ModeName>) -> Result<Self, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?,
            None => String::new(),
        };
        Self::parse(&text, mode)
    }

    /// Checks every field that deserialization cannot check by type.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.allowlist_nets()?;
        self.data_path()?;
        self.allow_port_keys()?;
        links::validate(
            self.manager.as_ref(),
            self.server.as_ref(),
            &self.logs,
            self.redis.as_ref(),
            &self.journal,
        )
        .map_err(|(key, reason)| ConfigError::Value {
            key,
            value: String::new(),
            reason,
        })?;
        let targets = self.targets()?;
        // With a manager, its policy brings the targets; the file's mode is only the fallback.
        if self.mode.needs_targets() && targets.is_empty() && self.manager.is_none() {
            return Err(ConfigError::NoTargets {
                mode: Mode::from(self.mode).name(),
            });
        }
        if self.redirect_model == RedirectModelName::FullNat {
            let has = |f| targets.iter().any(|(k, _)| k.family == f);
            if has(family::V4) && self.snat_v4.is_none() {
                return Err(ConfigError::MissingSnat {
                    key: "snat_v4",
                    family: "IPv4",
                });
            }
            if has(family::V6) && self.snat_v6.is_none() {
                return Err(ConfigError::MissingSnat {
                    key: "snat_v6",
                    family: "IPv6",
                });
            }
        }
        Ok(())
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

    /// `snat_v4`, parsed and validated.
    pub fn snat_v4_addr(&self) -> Result<Option<Ipv4Addr>, ConfigError> {
        match self.snat_addr("snat_v4", self.snat_v4.as_deref())? {
            None => Ok(None),
            Some(IpAddr::V4(a)) => Ok(Some(a)),
            Some(IpAddr::V6(_)) => Err(self.bad_addr("snat_v4", "not an IPv4 address")),
        }
    }

    /// `snat_v6`, parsed and validated.
    pub fn snat_v6_addr(&self) -> Result<Option<Ipv6Addr>, ConfigError> {
        match self.snat_addr("snat_v6", self.snat_v6.as_deref())? {
            None => Ok(None),
            Some(IpAddr::V6(a)) => Ok(Some(a)),
            Some(IpAddr::V4(_)) => Err(self.bad_addr(
                "snat_v6",
                "not an IPv6 address (IPv4-mapped addresses count as IPv4)",
            )),
        }
    }

    fn bad_addr(&self, key: &'static str, reason: &str) -> ConfigError {
        let value = match key {
            "snat_v4" => self.snat_v4.clone(),
            _ => self.snat_v6.clone(),
        };
        ConfigError::Address {
            key: key.to_owned(),
            value: value.unwrap_or_default(),
            reason: reason.to_owned(),
        }
    }

    fn snat_addr(&self, key: &str, value: Option<&str>) -> Result<Option<IpAddr>, ConfigError> {
        let Some(value) = value else { return Ok(None) };
        let err = |reason: String| ConfigError::Address {
            key: key.to_owned(),
            value: value.to_owned(),
            reason,
        };
        let ip: IpAddr = value
            .trim()
            .parse()
            .map_err(|_| err("not an IP address".into()))?;
        check_unicast(addr::normalize(ip)).map(Some).map_err(err)
    }

    /// The `CONFIG` map entry for the configured mode, with the data path enabled.
    pub fn data_path(&self) -> Result<DataPathConfig, ConfigError> {
        let [min, max] = self.nat_ports;
        if min < MIN_NAT_PORT || min > max {
            return Err(ConfigError::Value {
                key: "nat_ports".into(),
                value: format!("[{min}, {max}]"),
                reason: format!("must be [min, max] with {MIN_NAT_PORT} <= min <= max"),
            });
        }
        let snat_v4 = self.snat_v4_addr()?.map(|a| a.octets()).unwrap_or_default();
        let snat_v6 = self.snat_v6_addr()?.map(|a| a.octets()).unwrap_or_default();
        Ok(DataPathConfig {
            mode: Mode::from(self.mode) as u8,
            flags: DataPathConfig::ENABLED,
            model: RedirectModel::from(self.redirect_model) as u8,
            _pad0: 0,
            reflect_pps: self.reflect_pps,
            nat_port_min: min,
            nat_port_max: max,
            snat_v4,
            snat_v6,
        })
    }

    /// The `ALLOW_PORTS` entries, sorted and without duplicates.
    pub fn allow_port_keys(&self) -> Result<Vec<PortKey>, ConfigError> {
        let mut out = BTreeSet::new();
        for (i, entry) in self.honeypot_allow_ports.iter().enumerate() {
            let keys = parse_port_entry(entry).map_err(|reason| ConfigError::Value {
                key: format!("honeypot_allow_ports[{i}]"),
                value: entry.clone(),
                reason,
            })?;
            out.extend(keys.into_iter().map(|k| (k.port, k.proto)));
        }
        Ok(out
            .into_iter()
            .map(|(port, proto)| PortKey {
                port,
                proto,
                _pad: 0,
            })
            .collect())
    }

    /// The `TARGETS` entries: one per (port, protocol, family), `proto = "any"` expanded to TCP
    /// and UDP. A repeated (port, protocol, family) is an error.
    pub fn targets(&self) -> Result<Vec<(TargetKey, TargetAddr)>, ConfigError> {
        let mut out: Vec<(TargetKey, TargetAddr, usize)> = Vec::new();
        for (i, s) in self.sandbox.iter().enumerate() {
            let t = parse_target(&s.target).map_err(|reason| ConfigError::Address {
                key: format!("sandbox[{i}].target"),
                value: s.target.clone(),
                reason,
            })?;
            for &proto in s.proto.protos() {
                let key = TargetKey {
                    port: s.port,
                    proto,
                    family: family_of(t.addr),
                };
                if let Some((_, _, first)) = out.iter().find(|(k, _, _)| *k == key) {
                    return Err(ConfigError::DuplicateTarget {
                        first: *first,
                        second: i,
                        port: s.port,
                        proto: proto_name(proto).unwrap_or("?"),
                        family: family_name(key.family),
                    });
                }
                out.push((key, t, i));
            }
        }
        out.sort_by_key(|(k, _, _)| (k.family, k.proto, k.port));
        Ok(out.into_iter().map(|(k, t, _)| (k, t)).collect())
    }

    /// The address families whose forwarding this configuration relies on in its mode: those
    /// with a sandbox target in `unreal` and `honeypot`, both in `reflect` (an attacker of
    /// either family is sent back out), none in `firewall`. Returns `(IPv4, IPv6)`.
    pub fn forwarding_needed(&self) -> Result<(bool, bool), ConfigError> {
        let targets = self.targets()?;
        let has = |f| targets.iter().any(|(k, _)| k.family == f);
        Ok(match self.mode {
            ModeName::Firewall => (false, false),
            ModeName::Reflect => (true, true),
            ModeName::Unreal | ModeName::Honeypot => (has(family::V4), has(family::V6)),
        })
    }
}

pub mod links;

#[cfg(test)]
mod tests;
