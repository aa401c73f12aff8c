//! Validation of a whole group policy as the editor sends it (`PUT /api/v1/groups/{name}/policy`):
//! pure, so every rule is unit-tested here and the route only maps [`PolicyError`] to a status.
//!
//! The JSON names follow the agent's configuration file where the two overlap (`mode`,
//! `redirect_model`, `allowlist`, `snat_v4`, `snat_v6`, `nat_ports`, `reflect_pps`, and a sandbox
//! target's `port`, `proto`, `target`), and so do the checks: a target is a unicast,
//! non-loopback `ADDR[:PORT]`; two targets may not claim the same port, protocol and address
//! family; `full-nat` needs a source address for each family it redirects; `nat_ports` starts at
//! 1024 or above. A policy that passes here is one an agent accepts. Names that differ:
//! `allowlisted_ports` is the agent's `honeypot_allow_ports`, `sandbox_targets` its `[[sandbox]]`.
//!
//! Everything is stored in one canonical form (sorted, IPv4-mapped addresses folded, `tcp/N`
//! ports, `[min, max]` NAT ports), so that a PUT that changes nothing is recognised as such and
//! creates no revision.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::net;

/// Modes, as agents name them.
pub const MODES: [&str; 4] = ["honeypot", "unreal", "reflect", "firewall"];
/// Redirect models.
pub const REDIRECT_MODELS: [&str; 2] = ["preserve-source", "full-nat"];
/// Actions of automatic attacker entries (`default`: the mode's; `pass`: record only).
pub const ACTIONS: [&str; 5] = ["default", "drop", "redirect", "reflect", "pass"];
/// Most allowlist entries (the agent's LPM map has room for more; an editor does not need it).
pub const MAX_ALLOWLIST: usize = 4096;
/// Most allowlisted ports.
pub const MAX_PORTS: usize = 1024;
/// Most sandbox targets.
pub const MAX_TARGETS: usize = 256;
/// Shortest default TTL of automatic entries (a minute).
pub const MIN_TTL_SECS: i64 = 60;
/// Longest default TTL (366 days); `null` means no expiry.
pub const MAX_TTL_SECS: i64 = 366 * 24 * 3600;
/// Lowest first NAT port: below it are the well-known and privileged services (as the agent).
pub const MIN_NAT_PORT: u16 = 1024;
/// Highest `reflect_pps`.
pub const MAX_REFLECT_PPS: u32 = 1_000_000;

/// `PUT /api/v1/groups/{name}/policy` body: the whole policy. The lists and names are required
/// (an editor that forgot one must not wipe it); `nat` defaults to `{}` and `default_ttl_secs`
/// to `null`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    /// `honeypot`, `unreal`, `reflect` or `firewall`.
    pub mode: String,
    /// `preserve-source` or `full-nat`.
    pub redirect_model: String,
    /// Source addresses and ranges never dropped, redirected or reflected.
    pub allowlist: Vec<String>,
    /// Honeypot mode: ports left to the real services, `tcp/22`, `udp/53`, or `80` (both).
    pub allowlisted_ports: Vec<String>,
    /// Sandbox targets per port and protocol; one without `port` is the default target.
    pub sandbox_targets: Vec<TargetBody>,
    /// NAT and reflect settings.
    #[serde(default)]
    pub nat: NatBody,
    /// Lifetime of automatic attacker entries in seconds; `null`: until removed.
    #[serde(default)]
    pub default_ttl_secs: Option<i64>,
    /// Action of automatic attacker entries.
    pub default_action: String,
    /// The `revision` the editor started from: the PUT fails with 409 if the policy changed
    /// since.
    #[serde(default)]
    pub expected_revision: Option<i64>,
    /// Admins only: accept ranges broader than /16 or /32 and a honeypot with nothing allowlisted.
    #[serde(default)]
    pub force: bool,
}

/// One sandbox target as sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetBody {
    /// `tcp`, `udp`, or absent/`any` (both).
    #[serde(default)]
    pub proto: Option<String>,
    /// Protected port; absent: the default target for every port without its own.
    #[serde(default)]
    pub port: Option<i64>,
    /// Sandbox `ADDR`, `ADDR:PORT` or `[V6ADDR]:PORT`; without a port the protected one is kept.
    pub target: String,
}

/// `nat` as sent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatBody {
    /// `full-nat`: this host's IPv4 source address toward the sandbox.
    #[serde(default)]
    pub snat_v4: Option<String>,
    /// `full-nat`: this host's IPv6 source address toward the sandbox.
    #[serde(default)]
    pub snat_v6: Option<String>,
    /// `full-nat` source ports: `"20000-29999"` or `[20000, 29999]`.
    #[serde(default)]
    pub nat_ports: Option<serde_json::Value>,
    /// Reflected packets per source and second (0 switches reflection off).
    #[serde(default)]
    pub reflect_pps: Option<i64>,
}

/// A sandbox target in canonical form (stored in `policies.sandbox_targets`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SandboxTarget {
    /// Protected port; absent: the default target.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub port: Option<u16>,
    /// `tcp` or `udp`; absent: both.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub proto: Option<String>,
    /// `ADDR` or `ADDR:PORT` (`[V6]:PORT`), IPv4-mapped folded to IPv4.
    pub target: String,
}

/// `nat` in canonical form (stored in `policies.nat`); absent keys take the agent's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nat {
    /// IPv4 SNAT source.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub snat_v4: Option<Ipv4Addr>,
    /// IPv6 SNAT source.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub snat_v6: Option<Ipv6Addr>,
    /// `[min, max]`, inclusive, as in the agent's file.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub nat_ports: Option<[u16; 2]>,
    /// Reflect cap per source.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reflect_pps: Option<u32>,
}

/// A validated policy in canonical form, ready to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidPolicy {
    /// The mode.
    pub mode: String,
    /// The redirect model.
    pub redirect_model: String,
    /// Sorted, without duplicates.
    pub allowlist: Vec<IpNet>,
    /// `tcp/N` and `udp/N`, sorted by protocol then port.
    pub allowlisted_ports: Vec<String>,
    /// Sorted by port (default first), protocol, target.
    pub sandbox_targets: Vec<SandboxTarget>,
    /// NAT settings.
    pub nat: Nat,
    /// TTL of automatic entries.
    pub default_ttl_secs: Option<i64>,
    /// Action of automatic entries.
    pub default_action: String,
}

/// Why a policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A field is invalid (400).
    #[error("`{field}`: {reason}")]
    Invalid {
        /// The field, e.g. `sandbox_targets[1].port`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `force` was set by someone who is not an admin (403).
    #[error("`force` needs the admin role")]
    ForceNeedsAdmin,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn one_of(field: &str, value: &str, allowed: &[&str]) -> Result<String, PolicyError> {
    if allowed.contains(&value) {
        Ok(value.to_owned())
    } else {
        Err(invalid(
            field,
            format!("unknown value `{value}` (one of {})", allowed.join(", ")),
        ))
    }
}

/// Validates `body`; `admin` says whether the caller may use `force`.
pub fn validate(body: &PolicyBody, admin: bool) -> Result<ValidPolicy, PolicyError> {
    if body.force && !admin {
        return Err(PolicyError::ForceNeedsAdmin);
    }
    let mode = one_of("mode", &body.mode, &MODES)?;
    let redirect_model = one_of("redirect_model", &body.redirect_model, &REDIRECT_MODELS)?;
    let default_action = one_of("default_action", &body.default_action, &ACTIONS)?;
    let allowlist = allowlist(&body.allowlist, body.force)?;
    let allowlisted_ports = ports(&body.allowlisted_ports)?;
    let sandbox_targets = targets(&body.sandbox_targets)?;
    let nat = nat(&body.nat)?;
    if let Some(ttl) = body.default_ttl_secs
        && !(MIN_TTL_SECS..=MAX_TTL_SECS).contains(&ttl)
    {
        return Err(invalid(
            "default_ttl_secs",
            format!(
                "{ttl} is outside {MIN_TTL_SECS}..={MAX_TTL_SECS} (a minute to 366 days); use \
                 null for no expiry"
            ),
        ));
    }

    // Rules across fields.
    if mode == "honeypot" && allowlisted_ports.is_empty() && allowlist.is_empty() && !body.force {
        return Err(invalid(
            "allowlisted_ports",
            "honeypot mode sends everything that is not allowlisted to the sandbox, and both \
             `allowlist` and `allowlisted_ports` are empty: your own admin traffic (SSH included) \
             would be redirected and you could lock yourself out of these hosts; allowlist your \
             admin addresses or ports, or have an admin set `force`",
        ));
    }
    let has_default = sandbox_targets.iter().any(|t| t.port.is_none());
    if matches!(mode.as_str(), "unreal" | "honeypot") && !has_default {
        return Err(invalid(
            "sandbox_targets",
            format!(
                "mode `{mode}` redirects traffic to the sandbox and needs a default target (an \
                 entry without `port`, e.g. {{\"target\": \"198.18.1.2\"}}); or use mode \
                 `firewall`"
            ),
        ));
    }
    if default_action == "redirect" && !has_default {
        return Err(invalid(
            "sandbox_targets",
            "default_action `redirect` needs a default target (an entry without `port`)",
        ));
    }
    let reflects = mode == "reflect" || default_action == "reflect";
    if reflects && nat.reflect_pps == Some(0) {
        return Err(invalid(
            "nat.reflect_pps",
            "0 switches reflection off, but the mode or default_action is `reflect`",
        ));
    }
    if redirect_model == "full-nat" {
        if nat.snat_v4.is_none() && nat.snat_v6.is_none() {
            return Err(invalid(
                "nat",
                "redirect_model `full-nat` needs `snat_v4` or `snat_v6` (this host's address \
                 toward the sandbox)",
            ));
        }
        for t in &sandbox_targets {
            let ip = target_ip(&t.target);
            if ip.is_some_and(|ip| ip.is_ipv4()) && nat.snat_v4.is_none() {
                return Err(invalid(
                    "nat.snat_v4",
                    format!("`full-nat` with the IPv4 target `{}` needs it", t.target),
                ));
            }
            if ip.is_some_and(|ip| ip.is_ipv6()) && nat.snat_v6.is_none() {
                return Err(invalid(
                    "nat.snat_v6",
                    format!("`full-nat` with the IPv6 target `{}` needs it", t.target),
                ));
            }
        }
    }
    Ok(ValidPolicy {
        mode,
        redirect_model,
        allowlist,
        allowlisted_ports,
        sandbox_targets,
        nat,
        default_ttl_secs: body.default_ttl_secs,
        default_action,
    })
}

fn allowlist(entries: &[String], force: bool) -> Result<Vec<IpNet>, PolicyError> {
    if entries.len() > MAX_ALLOWLIST {
        return Err(invalid(
            "allowlist",
            format!("{} entries; at most {MAX_ALLOWLIST}", entries.len()),
        ));
    }
    let mut seen: BTreeMap<IpNet, usize> = BTreeMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let net = net::parse(entry, force).map_err(|e| invalid(format!("allowlist[{i}]"), e))?;
        if let Some(first) = seen.insert(net, i) {
            return Err(invalid(
                format!("allowlist[{i}]"),
                format!("`{net}` repeats allowlist[{first}]"),
            ));
        }
    }
    Ok(seen.into_keys().collect())
}

/// Parses a port number given as a string or a JSON number: 1..=65535.
fn port_number(text: &str) -> Option<u16> {
    if text.starts_with('+') {
        return None;
    }
    text.parse::<u16>().ok().filter(|&p| p != 0)
}

fn ports(entries: &[String]) -> Result<Vec<String>, PolicyError> {
    if entries.len() > MAX_PORTS {
        return Err(invalid(
            "allowlisted_ports",
            format!("{} entries; at most {MAX_PORTS}", entries.len()),
        ));
    }
    // (proto, port) -> index of the entry that set it.
    let mut seen: BTreeMap<(&'static str, u16), usize> = BTreeMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let field = format!("allowlisted_ports[{i}]");
        let entry = entry.trim();
        let (protos, port): (&[&'static str], &str) = match entry.split_once('/') {
            Some((proto, port)) => match proto.to_ascii_lowercase().as_str() {
                "tcp" => (&["tcp"], port),
                "udp" => (&["udp"], port),
                _ => {
                    return Err(invalid(
                        field,
                        format!("`{entry}`: the protocol must be `tcp` or `udp`"),
                    ));
                }
            },
            None => (&["tcp", "udp"], entry),
        };
        let port = port_number(port).ok_or_else(|| {
            invalid(
                &field,
                format!("`{entry}`: the port must be 1-65535 (write `tcp/22`, `udp/53` or `80`)"),
            )
        })?;
        for &proto in protos {
            if let Some(first) = seen.insert((proto, port), i) {
                return Err(invalid(
                    field,
                    format!("`{proto}/{port}` repeats allowlisted_ports[{first}]"),
                ));
            }
        }
    }
    Ok(seen
        .into_keys()
        .map(|(proto, port)| format!("{proto}/{port}"))
        .collect())
}

/// Checks that `ip` (already folded) can be a destination packets are rewritten toward: a unicast
/// host address, not unspecified, multicast, broadcast or loopback (the kernel drops packets from
/// the wire addressed to loopback, so such a rewrite could never be delivered).
fn check_unicast(ip: IpAddr) -> Result<IpAddr, String> {
    let what = match ip {
        IpAddr::V4(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V4(a) if a.is_loopback() => Some("a loopback address"),
        IpAddr::V6(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V6(a) if a.is_loopback() => Some("a loopback address"),
        _ => None,
    };
    match what {
        Some(what) => Err(format!(
            "`{ip}` is {what}, not a unicast host address that can be reached from the wire"
        )),
        None => Ok(ip),
    }
}

/// Folds an IPv4-mapped IPv6 address to IPv4 (the agent keys IPv4 as IPv4).
fn fold(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Parses a target into its canonical text: `ADDR`, `ADDR:PORT` or `[V6ADDR]:PORT`.
fn parse_target(text: &str) -> Result<String, String> {
    let text = text.trim();
    let (ip, port) = if let Ok(sa) = text.parse::<SocketAddr>() {
        if sa.port() == 0 {
            return Err(
                "port 0 is not a port; leave the port out to keep the protected one".into(),
            );
        }
        (sa.ip(), sa.port())
    } else if let Ok(ip) = text.parse::<IpAddr>() {
        (ip, 0)
    } else if let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        let ip = inner
            .parse::<Ipv6Addr>()
            .map_err(|_| format!("`{text}` is not an address"))?;
        (IpAddr::V6(ip), 0)
    } else {
        return Err(format!(
            "`{text}`: expected ADDR, ADDR:PORT or [V6ADDR]:PORT"
        ));
    };
    let ip = check_unicast(fold(ip))?;
    Ok(match port {
        0 => ip.to_string(),
        port => SocketAddr::new(ip, port).to_string(),
    })
}

/// The address of a canonical target.
fn target_ip(target: &str) -> Option<IpAddr> {
    target
        .parse::<SocketAddr>()
        .map(|sa| sa.ip())
        .or_else(|_| target.parse::<IpAddr>())
        .ok()
}

fn targets(entries: &[TargetBody]) -> Result<Vec<SandboxTarget>, PolicyError> {
    if entries.len() > MAX_TARGETS {
        return Err(invalid(
            "sandbox_targets",
            format!("{} entries; at most {MAX_TARGETS}", entries.len()),
        ));
    }
    // (port, proto, IPv6?) -> index: one target per port, protocol and address family, as the
    // agent's TARGETS map holds them (an IPv4 attacker goes to an IPv4 sandbox, an IPv6 one to an
    // IPv6 sandbox, so a port may have one of each).
    let mut seen: BTreeMap<(u16, &'static str, bool), usize> = BTreeMap::new();
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let protos: &[&'static str] = match entry.proto.as_deref() {
            None | Some("any") => &["tcp", "udp"],
            Some("tcp") => &["tcp"],
            Some("udp") => &["udp"],
            Some(other) => {
                return Err(invalid(
                    format!("sandbox_targets[{i}].proto"),
                    format!("unknown protocol `{other}` (tcp, udp, or leave it out for both)"),
                ));
            }
        };
        let port = match entry.port {
            None => None,
            Some(p) => Some(u16::try_from(p).ok().filter(|&p| p != 0).ok_or_else(|| {
                invalid(
                    format!("sandbox_targets[{i}].port"),
                    format!(
                        "{p} is not a port (1-65535); leave `port` out for the default \
                                 target"
                    ),
                )
            })?),
        };
        let target = parse_target(&entry.target)
            .map_err(|e| invalid(format!("sandbox_targets[{i}].target"), e))?;
        let v6 = target_ip(&target).is_some_and(|ip| ip.is_ipv6());
        for &proto in protos {
            if let Some(first) = seen.insert((port.unwrap_or(0), proto, v6), i) {
                let which = port.map_or("the default target".to_owned(), |p| format!("port {p}"));
                let family = if v6 { "IPv6" } else { "IPv4" };
                return Err(invalid(
                    format!("sandbox_targets[{i}]"),
                    format!(
                        "repeats the {proto} {family} target of {which} already set by \
                         sandbox_targets[{first}]"
                    ),
                ));
            }
        }
        let proto = match protos {
            [one] => Some((*one).to_owned()),
            _ => None,
        };
        out.push(SandboxTarget {
            port,
            proto,
            target,
        });
    }
    out.sort();
    Ok(out)
}

fn snat(field: &str, value: Option<&str>, v6: bool) -> Result<Option<IpAddr>, PolicyError> {
    let Some(value) = value else { return Ok(None) };
    let ip: IpAddr = value
        .trim()
        .parse()
        .map_err(|_| invalid(field, format!("`{value}` is not an IP address")))?;
    let ip = check_unicast(fold(ip)).map_err(|e| invalid(field, e))?;
    if ip.is_ipv6() != v6 {
        let want = if v6 {
            "an IPv6 address (IPv4-mapped addresses count as IPv4)"
        } else {
            "an IPv4 address"
        };
        return Err(invalid(field, format!("`{value}` is not {want}")));
    }
    Ok(Some(ip))
}

fn nat_ports(value: &serde_json::Value) -> Result<[u16; 2], PolicyError> {
    let bad = || {
        invalid(
            "nat.nat_ports",
            format!("`{value}`: expected \"MIN-MAX\" or [MIN, MAX]"),
        )
    };
    let (min, max) = match value {
        serde_json::Value::String(s) => {
            let (a, b) = s.split_once('-').ok_or_else(bad)?;
            (
                port_number(a.trim()).ok_or_else(bad)?,
                port_number(b.trim()).ok_or_else(bad)?,
            )
        }
        serde_json::Value::Array(pair) => match pair.as_slice() {
            [a, b] => {
                let port = |v: &serde_json::Value| {
                    v.as_u64()
                        .and_then(|n| u16::try_from(n).ok())
                        .filter(|&p| p != 0)
                };
                (port(a).ok_or_else(bad)?, port(b).ok_or_else(bad)?)
            }
            _ => return Err(bad()),
        },
        _ => return Err(bad()),
    };
    if min < MIN_NAT_PORT || min > max {
        return Err(invalid(
            "nat.nat_ports",
            format!("{min}-{max}: must be MIN-MAX with {MIN_NAT_PORT} <= MIN <= MAX <= 65535"),
        ));
    }
    Ok([min, max])
}

fn nat(body: &NatBody) -> Result<Nat, PolicyError> {
    let snat_v4 = match snat("nat.snat_v4", body.snat_v4.as_deref(), false)? {
        Some(IpAddr::V4(a)) => Some(a),
        _ => None,
    };
    let snat_v6 = match snat("nat.snat_v6", body.snat_v6.as_deref(), true)? {
        Some(IpAddr::V6(a)) => Some(a),
        _ => None,
    };
    let nat_ports = body.nat_ports.as_ref().map(nat_ports).transpose()?;
    let reflect_pps = match body.reflect_pps {
        None => None,
        Some(pps) => Some(
            u32::try_from(pps)
                .ok()
                .filter(|&p| p <= MAX_REFLECT_PPS)
                .ok_or_else(|| {
                    invalid(
                        "nat.reflect_pps",
                        format!(
                            "{pps} is outside 0..={MAX_REFLECT_PPS} (0 switches reflection off)"
                        ),
                    )
                })?,
        ),
    };
    Ok(Nat {
        snat_v4,
        snat_v6,
        nat_ports,
        reflect_pps,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn body(value: serde_json::Value) -> PolicyBody {
        let mut base = json!({
            "mode": "unreal", "redirect_model": "preserve-source", "allowlist": [],
            "allowlisted_ports": [], "sandbox_targets": [{ "target": "198.18.1.2" }],
            "default_action": "default",
        });
        for (k, v) in value.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn canonicalizes() {
        let p = validate(
            &body(json!({
                "allowlist": ["192.0.2.0/24", "::ffff:198.51.100.1", "2001:db8::/48"],
                "allowlisted_ports": ["udp/53", "TCP/22", "80"],
                "sandbox_targets": [
                    { "proto": "tcp", "port": 22, "target": "198.18.1.2:2222" },
                    { "target": "[2001:db8::2]" },
                    { "proto": "any", "target": "::ffff:198.18.1.2" },
                ],
                "redirect_model": "full-nat",
                "nat": { "snat_v4": "198.18.0.1", "snat_v6": "2001:db8::1",
                         "nat_ports": "20000-29999", "reflect_pps": 50 },
                "default_ttl_secs": 3600,
            })),
            false,
        )
        .unwrap();
        let nets: Vec<String> = p.allowlist.iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["192.0.2.0/24", "198.51.100.1/32", "2001:db8::/48"]);
        assert_eq!(
            p.allowlisted_ports,
            ["tcp/22", "tcp/80", "udp/53", "udp/80"]
        );
        assert_eq!(
            serde_json::to_value(&p.sandbox_targets).unwrap(),
            json!([
                { "target": "198.18.1.2" },
                { "target": "2001:db8::2" },
                { "port": 22, "proto": "tcp", "target": "198.18.1.2:2222" },
            ])
        );
        assert_eq!(
            serde_json::to_value(&p.nat).unwrap(),
            json!({ "snat_v4": "198.18.0.1", "snat_v6": "2001:db8::1",
                    "nat_ports": [20000, 29999], "reflect_pps": 50 })
        );
        let pair = validate(
            &body(json!({ "nat": { "nat_ports": [20000, 29999] } })),
            false,
        );
        assert_eq!(pair.unwrap().nat.nat_ports, Some([20000, 29999]));
    }

    #[test]
    fn refuses_naming_the_field() {
        for (patch, field, needle) in [
            (json!({ "mode": "mirror" }), "mode", "unknown value"),
            (
                json!({ "redirect_model": "nat" }),
                "redirect_model",
                "unknown value",
            ),
            (
                json!({ "default_action": "nuke" }),
                "default_action",
                "unknown value",
            ),
            (
                json!({ "allowlist": ["10.0.0.0/8"] }),
                "allowlist[0]",
                "force",
            ),
            (
                json!({ "allowlist": ["192.0.2.1", "192.0.2.1/32"] }),
                "allowlist[1]",
                "repeats",
            ),
            (
                json!({ "allowlist": ["192.0.2.1/24"] }),
                "allowlist[0]",
                "did you mean",
            ),
            (
                json!({ "allowlisted_ports": ["sctp/1"] }),
                "allowlisted_ports[0]",
                "tcp",
            ),
            (
                json!({ "allowlisted_ports": ["tcp/0"] }),
                "allowlisted_ports[0]",
                "1-65535",
            ),
            (
                json!({ "allowlisted_ports": ["tcp/70000"] }),
                "allowlisted_ports[0]",
                "1-65535",
            ),
            (
                json!({ "allowlisted_ports": ["22", "tcp/22"] }),
                "allowlisted_ports[1]",
                "repeats",
            ),
            (
                json!({ "sandbox_targets": [{ "target": "198.18.1.2", "port": 0 }] }),
                "sandbox_targets[0].port",
                "not a port",
            ),
            (
                json!({ "sandbox_targets": [{ "target": "198.18.1.2", "port": 65536 }] }),
                "sandbox_targets[0].port",
                "not a port",
            ),
            (
                json!({ "sandbox_targets": [{ "target": "198.18.1.2", "proto": "icmp" }] }),
                "sandbox_targets[0].proto",
                "unknown protocol",
            ),
            (
                json!({ "sandbox_targets": [{ "target": "127.0.0.1:22" }] }),
                "sandbox_targets[0].target",
                "loopback",
            ),
            (
                json!({ "sandbox_targets": [{ "target": "224.0.0.1" }] }),
                "sandbox_targets[0].target",
                "multicast",
            ),
            (
                json!({ "sandbox_targets": [{ "target": "sandbox.example" }] }),
                "sandbox_targets[0].target",
                "expected ADDR",
            ),
            (
                json!({ "sandbox_targets": [{ "target": "198.18.1.2:0" }] }),
                "sandbox_targets[0].target",
                "port 0",
            ),
            (
                json!({ "sandbox_targets": [
                    { "target": "198.18.1.2" },
                    { "proto": "tcp", "port": 22, "target": "198.18.1.3" },
                    { "port": 22, "target": "198.18.1.4:22" },
                ] }),
                "sandbox_targets[2]",
                "repeats the tcp IPv4 target of port 22",
            ),
            (
                json!({ "sandbox_targets": [] }),
                "sandbox_targets",
                "default target",
            ),
            (
                json!({ "mode": "firewall", "sandbox_targets": [], "default_action": "redirect" }),
                "sandbox_targets",
                "default target",
            ),
            (
                json!({ "default_ttl_secs": 59 }),
                "default_ttl_secs",
                "a minute to 366 days",
            ),
            (
                json!({ "default_ttl_secs": MAX_TTL_SECS + 1 }),
                "default_ttl_secs",
                "366 days",
            ),
            (json!({ "redirect_model": "full-nat" }), "nat", "snat_v4"),
            (
                json!({ "redirect_model": "full-nat", "nat": { "snat_v6": "2001:db8::1" } }),
                "nat.snat_v4",
                "IPv4 target",
            ),
            (
                json!({ "nat": { "snat_v4": "2001:db8::1" } }),
                "nat.snat_v4",
                "not an IPv4",
            ),
            (
                json!({ "nat": { "snat_v6": "::ffff:1.2.3.4" } }),
                "nat.snat_v6",
                "count as IPv4",
            ),
            (
                json!({ "nat": { "snat_v4": "0.0.0.0" } }),
                "nat.snat_v4",
                "unspecified",
            ),
            (
                json!({ "nat": { "nat_ports": "80-90" } }),
                "nat.nat_ports",
                "1024",
            ),
            (
                json!({ "nat": { "nat_ports": "3000-2000" } }),
                "nat.nat_ports",
                "MIN <= MAX",
            ),
            (
                json!({ "nat": { "nat_ports": [2000] } }),
                "nat.nat_ports",
                "expected",
            ),
            (
                json!({ "nat": { "reflect_pps": -1 } }),
                "nat.reflect_pps",
                "outside",
            ),
            (
                json!({ "mode": "reflect", "nat": { "reflect_pps": 0 } }),
                "nat.reflect_pps",
                "switches reflection off",
            ),
            (
                json!({ "mode": "honeypot" }),
                "allowlisted_ports",
                "lock yourself out",
            ),
        ] {
            match validate(&body(patch.clone()), false) {
                Err(PolicyError::Invalid { field: f, reason }) => {
                    assert_eq!(f, field, "{patch}: {reason}");
                    assert!(reason.contains(needle), "{patch}: {reason}");
                }
                other => panic!("{patch}: {other:?}"),
            }
        }
    }

    #[test]
    fn force_is_for_admins() {
        let forced = body(json!({ "mode": "honeypot", "force": true }));
        assert_eq!(validate(&forced, false), Err(PolicyError::ForceNeedsAdmin));
        assert_eq!(validate(&forced, true).unwrap().mode, "honeypot");
        let broad = body(json!({ "allowlist": ["10.0.0.0/8"], "force": true }));
        assert_eq!(validate(&broad, true).unwrap().allowlist.len(), 1);
        // Honeypot with an allowlisted port or address needs no force.
        validate(
            &body(json!({ "mode": "honeypot", "allowlisted_ports": ["tcp/22"] })),
            false,
        )
        .unwrap();
        validate(
            &body(json!({ "mode": "honeypot", "allowlist": ["192.0.2.0/24"] })),
            false,
        )
        .unwrap();
        // Firewall and reflect need no sandbox.
        validate(
            &body(json!({ "mode": "firewall", "sandbox_targets": [] })),
            false,
        )
        .unwrap();
        validate(
            &body(json!({ "mode": "reflect", "sandbox_targets": [] })),
            false,
        )
        .unwrap();
        let limit = body(json!({ "allowlist": vec!["192.0.2.1"; MAX_ALLOWLIST + 1] }));
        assert!(
            validate(&limit, false)
                .unwrap_err()
                .to_string()
                .contains("at most 4096")
        );
    }
}
