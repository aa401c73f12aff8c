//! The manager's policy as it arrives on the stream (`snapshot` and `delta` events, see
//! `manager/src/routes/agent_policy.rs`), validated and translated into what the kernel maps
//! hold. Pure: no I/O, so every rule is unit-tested.
//!
//! The manager validates a policy with the agent's own rules before it accepts it
//! (`manager/src/policy/validate.rs`); the agent checks again anyway, with the same code that
//! checks its configuration file ([`AgentConfig`]), because a map entry is the last line of
//! defence: an address or range that fails here never reaches a kernel map.

use std::borrow::Cow;

use agent_common::{
    Action, DataPathConfig, Mode, PortKey, RedirectModel, Target, TargetKey, family,
};
use serde::{Deserialize, Deserializer, Serialize, de::IntoDeserializer as _};

use crate::{
    addr::{AddrError, Net},
    config::{AgentConfig, ConfigError, ModeName, ProtoName, RedirectModelName, SandboxConfig},
};

/// Broadest IPv4 prefix accepted from the manager at all (its schema's CHECK): nothing like
/// `0.0.0.0/0` is ever installed, whatever arrives.
pub const FLOOR_PREFIX_V4: u8 = 8;
/// Broadest IPv6 prefix accepted from the manager at all.
pub const FLOOR_PREFIX_V6: u8 = 16;

/// Why part of a policy was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A field has a value the agent does not know.
    #[error("policy field `{field}`: {reason}")]
    Field {
        /// The field, e.g. `mode`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The data-path settings do not pass the configuration checks.
    #[error("policy data-path settings")]
    Config(#[source] ConfigError),
    /// An address or range was refused.
    #[error("address `{input}`")]
    Net {
        /// What was given.
        input: String,
        /// Why.
        #[source]
        source: AddrError,
    },
    /// A range broader than the floor.
    #[error("`{input}` is broader than /{floor}, which the agent never installs")]
    TooBroad {
        /// What was given.
        input: String,
        /// The floor for its family.
        floor: u8,
    },
    /// An expiry that is not RFC 3339.
    #[error("expiry `{input}` is not an RFC 3339 time")]
    Expiry {
        /// What was given.
        input: String,
    },
    /// A delta the agent cannot apply (an unknown operation, or one missing its fields).
    #[error("revision {revision}: {reason}")]
    Delta {
        /// The delta's revision.
        revision: i64,
        /// What is wrong.
        reason: String,
    },
}

/// A group's policy, as the manager sends it (`db::policies::Policy`). Unknown fields are
/// ignored, so a newer manager's additions do not break an older agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDoc {
    /// The agent's group.
    pub group_id: i64,
    /// `honeypot`, `unreal`, `reflect` or `firewall`.
    pub mode: String,
    /// `preserve-source` or `full-nat`.
    pub redirect_model: String,
    /// Sources never dropped, redirected or reflected.
    #[serde(default)]
    pub allowlist: Vec<String>,
    /// Honeypot mode: ports left to the real services (`tcp/22`).
    #[serde(default)]
    pub allowlisted_ports: Vec<String>,
    /// Sandbox targets.
    #[serde(default)]
    pub sandbox_targets: Vec<TargetDoc>,
    /// NAT and reflect settings; absent keys take the agent's defaults.
    #[serde(default)]
    pub nat: NatDoc,
    /// Lifetime of automatic entries (the manager applies it when it creates them).
    #[serde(default)]
    pub default_ttl_secs: Option<i64>,
    /// Action of automatic entries (likewise applied by the manager).
    #[serde(default)]
    pub default_action: Option<String>,
    /// The revision of the policy's last change.
    #[serde(default)]
    pub revision: i64,
}

/// One sandbox target (`{port?, proto?, target}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetDoc {
    /// Protected port; absent: the default target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `tcp` or `udp`; absent: both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
    /// `ADDR[:PORT]`.
    pub target: String,
}

/// NAT and reflect settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatDoc {
    /// `full-nat` IPv4 source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_v4: Option<String>,
    /// `full-nat` IPv6 source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_v6: Option<String>,
    /// `[min, max]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_ports: Option<[u16; 2]>,
    /// Reflected packets per source and second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reflect_pps: Option<u32>,
}

/// A `snapshot` event. Strings borrow from the event's text where they can: a million entries
/// are a million small strings otherwise.
#[derive(Debug, Deserialize)]
pub struct SnapshotDoc<'a> {
    /// The revision it reflects.
    pub revision: i64,
    /// The group's policy.
    pub policy: PolicyDoc,
    /// Every live attacker entry of the group (and of every group).
    #[serde(borrow)]
    pub attackers: Vec<EntryDoc<'a>>,
}

/// One attacker entry of a snapshot.
#[derive(Debug, Deserialize)]
pub struct EntryDoc<'a> {
    /// Address or range (`198.18.0.3/32`).
    #[serde(borrow)]
    pub net: Cow<'a, str>,
    /// `default`, `drop`, `redirect`, `reflect` or `pass`.
    #[serde(borrow)]
    pub action: Cow<'a, str>,
    /// RFC 3339 expiry.
    #[serde(borrow, default)]
    pub expires_at: Option<Cow<'a, str>>,
    /// The entry's group, if the manager says (`null`: every group). Today's snapshots leave it
    /// out; see [`Scope::Unknown`].
    #[serde(default, deserialize_with = "present")]
    pub group_id: Option<Option<i64>>,
}

/// Tells an absent field (`None`, through `default`) from `null` (`Some(None)`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
}

/// A `delta` event (`db::policy_revisions::Revision`); also the journal's line format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaDoc {
    /// Its revision.
    pub revision: i64,
    /// Its group; `None`: every group.
    #[serde(default)]
    pub group_id: Option<i64>,
    /// `add`, `update`, `remove` or `policy`.
    pub op: String,
    /// The attacker's network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<String>,
    /// The attacker's action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The attacker's expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// For `policy`: the new policy.
    #[serde(default)]
    pub details: serde_json::Value,
}

/// Which attacker row of the manager an entry comes from, as far as the agent can tell. The
/// manager keys entries by `(group, net)`, so one address may have an entry for the agent's
/// group and one for every group; the kernel holds one per address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Scope {
    /// From a snapshot, which does not say.
    Unknown = 0,
    /// Every group's.
    All = 1,
    /// The agent's group's.
    Group = 2,
}

impl Scope {
    /// The scope of an entry with this `group_id`.
    pub fn of(group_id: Option<i64>) -> Self {
        match group_id {
            Some(_) => Scope::Group,
            None => Scope::All,
        }
    }

    /// One-letter form for the state file.
    pub fn letter(self) -> char {
        match self {
            Scope::Unknown => 'u',
            Scope::All => 'a',
            Scope::Group => 'g',
        }
    }

    /// Parses [`Scope::letter`].
    pub fn from_letter(s: &str) -> Option<Self> {
        match s {
            "u" => Some(Scope::Unknown),
            "a" => Some(Scope::All),
            "g" => Some(Scope::Group),
            _ => None,
        }
    }
}

/// What the kernel should hold for one attacker address or range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    /// Expiry as wall-clock Unix nanoseconds; 0 never. Converted to `CLOCK_BOOTTIME` only when
    /// written, so a state restored after a reboot still expires at the right moment.
    pub expires: i64,
    /// The action. [`Action::Pass`] (the manager's "record only") is never installed.
    pub action: Action,
}

impl Want {
    /// Whether this belongs in the kernel at wall-clock `now` (Unix nanoseconds).
    pub fn installs(&self, now: i64) -> bool {
        self.action != Action::Pass && (self.expires == 0 || self.expires > now)
    }
}

/// A validated attacker entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Address or range.
    pub net: Net,
    /// Action and expiry.
    pub want: Want,
}

/// Parses an action name.
pub fn parse_action(s: &str) -> Option<Action> {
    [
        Action::Default,
        Action::Pass,
        Action::Drop,
        Action::Redirect,
        Action::Reflect,
    ]
    .into_iter()
    .find(|a| a.name() == s)
}

/// Parses and checks an address or range from the manager: canonical form (the agent's own
/// parser: host bits zero, IPv4-mapped folded), nothing broader than the floor.
pub fn parse_net(input: &str) -> Result<Net, PolicyError> {
    let net: Net = input.parse().map_err(|source| PolicyError::Net {
        input: input.to_owned(),
        source,
    })?;
    let floor = match net {
        Net::V4(..) => FLOOR_PREFIX_V4,
        Net::V6(..) => FLOOR_PREFIX_V6,
    };
    if net.prefix() < floor {
        return Err(PolicyError::TooBroad {
            input: input.to_owned(),
            floor,
        });
    }
    Ok(net)
}

/// Parses an RFC 3339 expiry into Unix nanoseconds (0 stays "never" only for `None`; an expiry
/// at or before the epoch becomes 1, long expired).
pub fn parse_expiry(input: Option<&str>) -> Result<i64, PolicyError> {
    let Some(input) = input else { return Ok(0) };
    let t = time::OffsetDateTime::parse(input, &time::format_description::well_known::Rfc3339)
        .map_err(|_| PolicyError::Expiry {
            input: input.to_owned(),
        })?;
    let ns = t.unix_timestamp_nanos();
    Ok(i64::try_from(ns).unwrap_or(i64::MAX).max(1))
}

/// Validates one attacker entry: the address (also as a packet source: no multicast,
/// unspecified or broadcast entries), the action and the expiry.
pub fn parse_entry(
    net: &str,
    action: &str,
    expires_at: Option<&str>,
) -> Result<Entry, PolicyError> {
    let net = parse_net(net)?
        .check_source()
        .map_err(|source| PolicyError::Net {
            input: net.to_owned(),
            source,
        })?;
    let action = parse_action(action).ok_or_else(|| PolicyError::Field {
        field: "action",
        reason: format!("unknown action `{action}`"),
    })?;
    Ok(Entry {
        net,
        want: Want {
            expires: parse_expiry(expires_at)?,
            action,
        },
    })
}

/// One change a delta makes.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// An entry added or changed (`add`, `update`).
    Upsert {
        /// The entry.
        entry: Entry,
        /// Whose entry.
        scope: Scope,
    },
    /// An entry removed.
    Remove {
        /// Its network.
        net: Net,
        /// Whose entry.
        scope: Scope,
    },
    /// The group's policy replaced.
    Policy(Box<PolicyDoc>),
    /// Nothing the kernel holds: an entry the agent refuses (logged by the caller), or a change
    /// for another group.
    Ignore(String),
}

impl DeltaDoc {
    /// What this delta changes for an agent of `group`. An unknown operation or a `policy`
    /// delta without a readable policy is an error: the agent cannot know what it missed, and
    /// resynchronizes from a snapshot.
    pub fn change(&self, group: Option<i64>) -> Result<Change, PolicyError> {
        let bad = |reason: String| PolicyError::Delta {
            revision: self.revision,
            reason,
        };
        if let (Some(mine), Some(theirs)) = (group, self.group_id)
            && mine != theirs
        {
            return Ok(Change::Ignore(format!(
                "for group {theirs}, not ours ({mine})"
            )));
        }
        let scope = Scope::of(self.group_id);
        match self.op.as_str() {
            "add" | "update" => {
                let net = self.net.as_deref().ok_or_else(|| bad("no `net`".into()))?;
                let action = self
                    .action
                    .as_deref()
                    .ok_or_else(|| bad("no `action`".into()))?;
                match parse_entry(net, action, self.expires_at.as_deref()) {
                    Ok(entry) => Ok(Change::Upsert { entry, scope }),
                    Err(err) => Ok(Change::Ignore(err.to_string())),
                }
            }
            "remove" => {
                let net = self.net.as_deref().ok_or_else(|| bad("no `net`".into()))?;
                match parse_net(net) {
                    Ok(net) => Ok(Change::Remove { net, scope }),
                    // Never installed, so nothing to remove.
                    Err(err) => Ok(Change::Ignore(err.to_string())),
                }
            }
            "policy" => serde_json::from_value::<PolicyDoc>(self.details.clone())
                .map(|p| Change::Policy(Box::new(p)))
                .map_err(|err| bad(format!("unreadable policy: {err}"))),
            other => Err(bad(format!("unknown operation `{other}`"))),
        }
    }
}

/// What the data path is told by a policy, besides the attacker entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataPlane {
    /// The `CONFIG` entry.
    pub config: DataPathConfig,
    /// The `TARGETS` entries.
    pub targets: Vec<(TargetKey, Target)>,
    /// The `ALLOW_PORTS` entries.
    pub allow_ports: Vec<PortKey>,
}

impl DataPlane {
    /// The mode.
    pub fn mode(&self) -> Mode {
        Mode::try_from(self.config.mode).unwrap_or(Mode::Firewall)
    }
}

fn by_name<'de, T: Deserialize<'de>>(
    field: &'static str,
    value: &'de str,
) -> Result<T, PolicyError> {
    T::deserialize(value.into_deserializer()).map_err(|e: serde::de::value::Error| {
        PolicyError::Field {
            field,
            reason: e.to_string(),
        }
    })
}

impl PolicyDoc {
    /// The data-path settings, checked as the agent checks its configuration file.
    pub fn data_plane(&self) -> Result<DataPlane, PolicyError> {
        let mut cfg = AgentConfig {
            mode: by_name::<ModeName>("mode", &self.mode)?,
            redirect_model: by_name::<RedirectModelName>("redirect_model", &self.redirect_model)?,
            snat_v4: self.nat.snat_v4.clone(),
            snat_v6: self.nat.snat_v6.clone(),
            honeypot_allow_ports: self.allowlisted_ports.clone(),
            ..AgentConfig::default()
        };
        if let Some(ports) = self.nat.nat_ports {
            cfg.nat_ports = ports;
        }
        if let Some(pps) = self.nat.reflect_pps {
            cfg.reflect_pps = pps;
        }
        for t in &self.sandbox_targets {
            cfg.sandbox.push(SandboxConfig {
                port: t.port.unwrap_or(0),
                proto: match t.proto.as_deref() {
                    None => ProtoName::Any,
                    Some(p) => by_name::<ProtoName>("sandbox_targets.proto", p)?,
                },
                target: t.target.clone(),
            });
        }
        let config = cfg.data_path().map_err(PolicyError::Config)?;
        let targets = cfg.targets().map_err(PolicyError::Config)?;
        if cfg.redirect_model == RedirectModelName::FullNat {
            for (fam, snat, key) in [
                (family::V4, &cfg.snat_v4, "nat.snat_v4"),
                (family::V6, &cfg.snat_v6, "nat.snat_v6"),
            ] {
                if snat.is_none() && targets.iter().any(|(k, _)| k.family == fam) {
                    return Err(PolicyError::Field {
                        field: "nat",
                        reason: format!("`full-nat` with a target of this family needs `{key}`"),
                    });
                }
            }
        }
        debug_assert!(RedirectModel::try_from(config.model).is_ok());
        Ok(DataPlane {
            config,
            targets: targets.into_iter().map(|(k, t)| (k, t.into())).collect(),
            allow_ports: cfg.allow_port_keys().map_err(PolicyError::Config)?,
        })
    }

    /// The allowlist entries that pass the checks, and the errors of those that do not.
    pub fn allowlist_nets(&self) -> (Vec<Net>, Vec<PolicyError>) {
        let mut ok = Vec::with_capacity(self.allowlist.len());
        let mut bad = Vec::new();
        for entry in &self.allowlist {
            match parse_net(entry) {
                Ok(net) => ok.push(net),
                Err(err) => bad.push(err),
            }
        }
        (ok, bad)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::config::IPPROTO_TCP;

    fn policy(json: serde_json::Value) -> PolicyDoc {
        serde_json::from_value(json).unwrap()
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "group_id": 1, "mode": "unreal", "redirect_model": "preserve-source",
            "allowlist": ["192.0.2.0/28", "2001:db8::/64"],
            "allowlisted_ports": ["tcp/22", "udp/53"],
            "sandbox_targets": [{"target": "198.18.1.2"},
                                {"port": 22, "proto": "tcp", "target": "198.18.1.2:2222"}],
            "nat": {"nat_ports": [20000, 29999], "reflect_pps": 50},
            "default_ttl_secs": 86400, "default_action": "default", "revision": 12,
            "updated_by": "alice"
        })
    }

    #[test]
    fn translates_a_policy_like_the_config_file() {
        let dp = policy(base()).data_plane().unwrap();
        assert_eq!(dp.mode(), Mode::Unreal);
        assert_eq!(dp.config.flags, DataPathConfig::ENABLED);
        assert_eq!(dp.config.model, RedirectModel::PreserveSource as u8);
        assert_eq!(
            (dp.config.nat_port_min, dp.config.nat_port_max),
            (20000, 29999)
        );
        assert_eq!(dp.config.reflect_pps, 50);
        // Default target for TCP and UDP, plus tcp/22.
        assert_eq!(dp.targets.len(), 3);
        let ssh = dp.targets.iter().find(|(k, _)| k.port == 22).unwrap();
        assert_eq!(ssh.0.proto, IPPROTO_TCP);
        assert_eq!(ssh.1.port, 2222);
        assert_eq!(&ssh.1.addr[..4], &Ipv4Addr::new(198, 18, 1, 2).octets());
        assert_eq!(dp.allow_ports.len(), 2);
        let (nets, bad) = policy(base()).allowlist_nets();
        assert!(bad.is_empty());
        assert_eq!(
            nets,
            vec![
                "192.0.2.0/28".parse().unwrap(),
                "2001:db8::/64".parse().unwrap()
            ]
        );
    }

    #[test]
    fn defaults_apply_when_nat_is_empty() {
        let mut p = base();
        p["nat"] = serde_json::json!({});
        p["mode"] = "firewall".into();
        let dp = policy(p).data_plane().unwrap();
        assert_eq!(dp.mode(), Mode::Firewall);
        assert_eq!(dp.config.reflect_pps, crate::config::DEFAULT_REFLECT_PPS);
    }

    #[test]
    fn refuses_what_the_config_file_refuses() {
        for (key, value) in [
            ("mode", serde_json::json!("nope")),
            ("redirect_model", serde_json::json!("full-nat")),
            (
                "sandbox_targets",
                serde_json::json!([{"target": "127.0.0.1"}]),
            ),
            (
                "sandbox_targets",
                serde_json::json!([{"target": "224.0.0.1"}]),
            ),
            (
                "sandbox_targets",
                serde_json::json!([{"proto": "sctp", "target": "198.18.1.2"}]),
            ),
            ("allowlisted_ports", serde_json::json!(["tcp/0"])),
            ("nat", serde_json::json!({"nat_ports": [80, 90]})),
        ] {
            let mut p = base();
            p[key] = value.clone();
            assert!(policy(p).data_plane().is_err(), "{key} = {value}");
        }
    }

    #[test]
    fn never_installs_broad_or_odd_entries() {
        for (net, action) in [
            ("0.0.0.0/0", "drop"),
            ("10.0.0.0/7", "drop"),
            ("::/0", "drop"),
            ("2001::/15", "drop"),
            ("198.18.0.7/24", "drop"),
            ("224.0.0.1/32", "drop"),
            ("0.0.0.0/32", "drop"),
            ("not an address", "drop"),
            ("198.18.0.7/32", "explode"),
        ] {
            assert!(parse_entry(net, action, None).is_err(), "{net} {action}");
        }
        let e = parse_entry(
            "::ffff:198.18.0.7/128",
            "drop",
            Some("2030-01-01T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(e.net, "198.18.0.7".parse().unwrap());
        assert_eq!(e.want.action, Action::Drop);
        assert_eq!(e.want.expires, 1_893_456_000_000_000_000);
        assert!(parse_entry("10.0.0.0/8", "default", None).is_ok());
        let (nets, bad) = policy(serde_json::json!({
            "group_id": 1, "mode": "unreal", "redirect_model": "preserve-source",
            "allowlist": ["0.0.0.0/0", "192.0.2.1"]
        }))
        .allowlist_nets();
        assert_eq!(nets, vec!["192.0.2.1".parse().unwrap()]);
        assert_eq!(bad.len(), 1);
    }

    #[test]
    fn installs_only_live_non_pass_entries() {
        let w = |action, expires| Want { expires, action };
        assert!(w(Action::Drop, 0).installs(100));
        assert!(w(Action::Drop, 101).installs(100));
        assert!(!w(Action::Drop, 100).installs(100));
        assert!(!w(Action::Pass, 0).installs(100));
    }

    #[test]
    fn reads_deltas() {
        let d = |v: serde_json::Value| serde_json::from_value::<DeltaDoc>(v).unwrap();
        let add = d(
            serde_json::json!({"revision": 5, "group_id": 1, "op": "add",
            "net": "198.18.0.3/32", "action": "drop", "details": {"id": 9}}),
        );
        assert_eq!(
            add.change(Some(1)).unwrap(),
            Change::Upsert {
                entry: parse_entry("198.18.0.3", "drop", None).unwrap(),
                scope: Scope::Group
            }
        );
        assert!(matches!(add.change(Some(2)).unwrap(), Change::Ignore(_)));
        let remove = d(
            serde_json::json!({"revision": 6, "group_id": null, "op": "remove",
            "net": "198.18.0.3/32", "action": "drop", "details": {}}),
        );
        assert_eq!(
            remove.change(Some(1)).unwrap(),
            Change::Remove {
                net: "198.18.0.3".parse().unwrap(),
                scope: Scope::All
            }
        );
        let broad = d(
            serde_json::json!({"revision": 7, "op": "add", "net": "0.0.0.0/0",
            "action": "drop", "details": {}}),
        );
        assert!(matches!(broad.change(None).unwrap(), Change::Ignore(_)));
        let pol = d(
            serde_json::json!({"revision": 8, "group_id": 1, "op": "policy",
            "details": base()}),
        );
        assert!(matches!(pol.change(Some(1)).unwrap(), Change::Policy(_)));
        let unknown = d(serde_json::json!({"revision": 9, "op": "truncate", "details": {}}));
        assert!(unknown.change(None).is_err());
        let broken = d(serde_json::json!({"revision": 10, "op": "policy", "details": {"x": 1}}));
        assert!(broken.change(None).is_err());
    }

    #[test]
    fn snapshot_entries_borrow_and_tell_null_from_absent() {
        let text = r#"{"revision": 3, "policy": {"group_id": 1, "mode": "firewall",
            "redirect_model": "preserve-source"},
            "attackers": [{"net": "198.18.0.3/32", "action": "drop"},
                          {"net": "198.18.0.4/32", "action": "default", "group_id": null,
                           "expires_at": "2030-01-01T00:00:00.5+01:00"},
                          {"net": "198.18.0.5/32", "action": "default", "group_id": 1}]}"#;
        let s: SnapshotDoc<'_> = serde_json::from_str(text).unwrap();
        assert!(matches!(s.attackers[0].net, Cow::Borrowed(_)));
        assert_eq!(s.attackers[0].group_id, None);
        assert_eq!(s.attackers[1].group_id, Some(None));
        assert_eq!(s.attackers[2].group_id, Some(Some(1)));
        assert_eq!(
            parse_expiry(s.attackers[1].expires_at.as_deref()).unwrap(),
            1_893_452_400_500_000_000
        );
    }
}
