//! Typed access to the data-path maps, whether owned by a freshly loaded object or opened from
//! their pins by a CLI command. Every address written takes a validated [`Net`] or comes from a
//! validated [`crate::config::AgentConfig`]; nothing else reaches a map.
//!
//! The `FLOW_EVENTS` ring buffer is not here: it has a single consumer (`mirage-agent run`), and
//! mapping it from a CLI command would race that consumer for events. `run` takes it with
//! [`crate::loader::take_flow_events`].

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use agent_common::{
    ACTION_SLOTS, Action, AllowEntry, AttackerEntry, Counter, DataPathConfig, FlowEntry, FlowKey,
    GlobalCounters, Mode, PortKey, RateState, SourceCounters, SourceKey, Target, TargetKey,
    maps as names,
};
use aya::maps::{
    Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, lpm_trie::Key,
};
use serde::Serialize;

use crate::{
    addr::Net,
    clock,
    config::{DEFAULT_NAT_PORTS, DEFAULT_REFLECT_PPS},
};

/// Errors reading or writing the pinned maps.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// A pinned map could not be opened.
    #[error("opening pinned map {path}; is `mirage-agent run` running or was it run?")]
    Open {
        /// The pin path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: MapError,
    },
    /// A map had an unexpected type or layout.
    #[error("map {name} has an unexpected type or layout")]
    Layout {
        /// The map name.
        name: &'static str,
        /// The cause.
        #[source]
        source: MapError,
    },
    /// A map operation failed.
    #[error("{op} in map {name} failed")]
    Op {
        /// What was being done.
        op: &'static str,
        /// The map name.
        name: &'static str,
        /// The cause.
        #[source]
        source: MapError,
    },
    /// The entry to remove is not there.
    #[error("{net} is not in the {what}")]
    NotFound {
        /// The network.
        net: Net,
        /// Which list.
        what: &'static str,
    },
    /// The target or port to remove is not there.
    #[error("{what} has no entry {key}")]
    KeyNotFound {
        /// The key, as text.
        key: String,
        /// Which map.
        what: &'static str,
    },
}

type Result<T> = std::result::Result<T, MapsError>;

/// The data-path maps.
pub struct Maps {
    config: Array<MapData, DataPathConfig>,
    allow_v4: LpmTrie<MapData, [u8; 4], AllowEntry>,
    allow_v6: LpmTrie<MapData, [u8; 16], AllowEntry>,
    attackers_v4: HashMap<MapData, [u8; 4], AttackerEntry>,
    attackers_v6: HashMap<MapData, [u8; 16], AttackerEntry>,
    ranges_v4: LpmTrie<MapData, [u8; 4], AttackerEntry>,
    ranges_v6: LpmTrie<MapData, [u8; 16], AttackerEntry>,
    sources: PerCpuHashMap<MapData, SourceKey, SourceCounters>,
    global: PerCpuArray<MapData, GlobalCounters>,
    targets: HashMap<MapData, TargetKey, Target>,
    allow_ports: HashMap<MapData, PortKey, u8>,
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    reflect_rate: HashMap<MapData, SourceKey, RateState>,
}

fn typed<T: TryFrom<Map, Error = MapError>>(name: &'static str, map: Map) -> Result<T> {
    T::try_from(map).map_err(|source| MapsError::Layout { name, source })
}

fn op(op: &'static str, name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Op { op, name, source }
}

/// Whether a map error means "no such key".
fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

impl Maps {
    /// Opens every map but the flow-event ring buffer from its pin under `dir`.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        let mut by_name = BTreeMap::new();
        for name in names::PINNED {
            if name == names::FLOW_EVENTS {
                continue;
            }
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| MapsError::Open {
                path: path.clone(),
                source,
            })?;
            let map = Map::from_map_data(data).map_err(|source| MapsError::Open {
                path: path.clone(),
                source,
            })?;
            by_name.insert(name, map);
        }
        Self::from_maps(|name| by_name.remove(name))
    }

    /// Builds the typed wrappers from maps taken out of a loaded object.
    pub fn from_maps(mut take: impl FnMut(&'static str) -> Option<Map>) -> Result<Self> {
        let mut get = |name: &'static str| {
            take(name).ok_or(MapsError::Layout {
                name,
                source: MapError::InvalidName {
                    name: name.to_owned(),
                },
            })
        };
        Ok(Self {
            config: typed(names::CONFIG, get(names::CONFIG)?)?,
            allow_v4: typed(names::ALLOW_V4, get(names::ALLOW_V4)?)?,
            allow_v6: typed(names::ALLOW_V6, get(names::ALLOW_V6)?)?,
            attackers_v4: typed(names::ATTACKERS_V4, get(names::ATTACKERS_V4)?)?,
            attackers_v6: typed(names::ATTACKERS_V6, get(names::ATTACKERS_V6)?)?,
            ranges_v4: typed(names::ATTACKER_RANGES_V4, get(names::ATTACKER_RANGES_V4)?)?,
            ranges_v6: typed(names::ATTACKER_RANGES_V6, get(names::ATTACKER_RANGES_V6)?)?,
            sources: typed(names::SOURCE_STATS, get(names::SOURCE_STATS)?)?,
            global: typed(names::GLOBAL_STATS, get(names::GLOBAL_STATS)?)?,
            targets: typed(names::TARGETS, get(names::TARGETS)?)?,
            allow_ports: typed(names::ALLOW_PORTS, get(names::ALLOW_PORTS)?)?,
            flows: typed(names::FLOWS, get(names::FLOWS)?)?,
            reflect_rate: typed(names::REFLECT_RATE, get(names::REFLECT_RATE)?)?,
        })
    }

    /// The current data-path configuration.
    pub fn config(&self) -> Result<DataPathConfig> {
        self.config.get(&0, 0).map_err(op("read", names::CONFIG))
    }

    /// Writes the whole data-path configuration (mode, flags, redirect model, NAT ports and
    /// addresses, reflect cap) in one map update, so the kernel never sees half of it.
    pub fn set_config(&mut self, cfg: &DataPathConfig) -> Result<()> {
        self.config
            .set(0, *cfg, 0)
            .map_err(op("write", names::CONFIG))
    }

    /// Sets the mode and enables the data path, with the configuration file's defaults for the
    /// rest (`preserve-source`, default NAT ports, default reflect cap, no SNAT addresses).
    pub fn set_mode(&mut self, mode: Mode) -> Result<()> {
        let [nat_port_min, nat_port_max] = DEFAULT_NAT_PORTS;
        self.set_config(&DataPathConfig {
            mode: mode as u8,
            flags: DataPathConfig::ENABLED,
            reflect_pps: DEFAULT_REFLECT_PPS,
            nat_port_min,
            nat_port_max,
            ..DataPathConfig::default()
        })
    }

    /// Adds or replaces the sandbox target of a (port, protocol, family).
    pub fn set_target(&mut self, key: TargetKey, target: Target) -> Result<()> {
        self.targets
            .insert(key, target, 0)
            .map_err(op("insert", names::TARGETS))
    }

    /// Removes the sandbox target of a (port, protocol, family).
    pub fn remove_target(&mut self, key: TargetKey) -> Result<()> {
        match self.targets.remove(&key) {
            Err(e) if is_not_found(&e) => Err(MapsError::KeyNotFound {
                key: format!("{key:?}"),
                what: names::TARGETS,
            }),
            other => other.map_err(op("remove", names::TARGETS)),
        }
    }

    /// Every sandbox target, sorted by family, protocol and port.
    pub fn targets(&self) -> Result<Vec<(TargetKey, Target)>> {
        let mut out = Vec::new();
        for item in self.targets.iter() {
            out.push(item.map_err(op("iterate", names::TARGETS))?);
        }
        out.sort_by_key(|(k, _)| (k.family, k.proto, k.port));
        Ok(out)
    }

    /// Makes the targets exactly `want`: every wanted entry is written first, then entries not
    /// wanted are removed, so a port that keeps its target never loses it in between.
    pub fn replace_targets(&mut self, want: &[(TargetKey, Target)]) -> Result<()> {
        for (k, t) in want {
            self.set_target(*k, *t)?;
        }
        for (k, _) in self.targets()? {
            if !want.iter().any(|(w, _)| *w == k) {
                match self.remove_target(k) {
                    Ok(()) | Err(MapsError::KeyNotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Adds a port that honeypot mode leaves to the real services.
    pub fn allow_port(&mut self, key: PortKey) -> Result<()> {
        self.allow_ports
            .insert(key, 1, 0)
            .map_err(op("insert", names::ALLOW_PORTS))
    }

    /// Removes a honeypot allowlisted port.
    pub fn disallow_port(&mut self, key: PortKey) -> Result<()> {
        match self.allow_ports.remove(&key) {
            Err(e) if is_not_found(&e) => Err(MapsError::KeyNotFound {
                key: format!("{key:?}"),
                what: names::ALLOW_PORTS,
            }),
            other => other.map_err(op("remove", names::ALLOW_PORTS)),
        }
    }

    /// Every honeypot allowlisted port, sorted by protocol and port.
    pub fn allow_ports(&self) -> Result<Vec<PortKey>> {
        let mut out = Vec::new();
        for item in self.allow_ports.keys() {
            out.push(item.map_err(op("iterate", names::ALLOW_PORTS))?);
        }
        out.sort_by_key(|k| (k.proto, k.port));
        Ok(out)
    }

    /// Makes the honeypot allowlisted ports exactly `want` (added first, then the rest
    /// removed, as [`Maps::replace_targets`]).
    pub fn replace_allow_ports(&mut self, want: &[PortKey]) -> Result<()> {
        for k in want {
            self.allow_port(*k)?;
        }
        for k in self.allow_ports()? {
            if !want.contains(&k) {
                match self.disallow_port(k) {
                    Ok(()) | Err(MapsError::KeyNotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Every flow entry (one per direction of a rewritten flow). The kernel creates and evicts
    /// entries meanwhile, so an entry that vanishes between its key and its value is skipped.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowEntry)>> {
        let mut out = Vec::new();
        for item in self.flows.iter() {
            match item {
                Ok(kv) => out.push(kv),
                Err(e) if is_not_found(&e) => {}
                Err(source) => {
                    return Err(MapsError::Op {
                        op: "iterate",
                        name: names::FLOWS,
                        source,
                    });
                }
            }
        }
        out.sort_by_key(|(_, v)| std::cmp::Reverse(v.created_ns));
        Ok(out)
    }

    /// The reflect rate-cap state of every source the kernel tracks (IPv4-mapped keys shown as
    /// IPv4).
    pub fn reflect_rates(&self) -> Result<Vec<(IpAddr, RateState)>> {
        let mut out = Vec::new();
        for item in self.reflect_rate.iter() {
            match item {
                Ok((k, v)) => out.push((
                    crate::addr::normalize(IpAddr::V6(Ipv6Addr::from(k.addr))),
                    v,
                )),
                Err(e) if is_not_found(&e) => {}
                Err(source) => {
                    return Err(MapsError::Op {
                        op: "iterate",
                        name: names::REFLECT_RATE,
                        source,
                    });
                }
            }
        }
        out.sort_by_key(|(a, _)| *a);
        Ok(out)
    }

    /// Adds a range to the allowlist.
    pub fn allow(&mut self, net: Net) -> Result<()> {
        let v = AllowEntry::default();
        match net {
            Net::V4(a, p) => self
                .allow_v4
                .insert(&Key::new(p.into(), a.octets()), v, 0)
                .map_err(op("insert", names::ALLOW_V4)),
            Net::V6(a, p) => self
                .allow_v6
                .insert(&Key::new(p.into(), a.octets()), v, 0)
                .map_err(op("insert", names::ALLOW_V6)),
        }
    }

    /// Removes a range from the allowlist.
    pub fn disallow(&mut self, net: Net) -> Result<()> {
        let r = match net {
            Net::V4(a, p) => self.allow_v4.remove(&Key::new(p.into(), a.octets())),
            Net::V6(a, p) => self.allow_v6.remove(&Key::new(p.into(), a.octets())),
        };
        match r {
            Err(e) if is_not_found(&e) => Err(MapsError::NotFound {
                net,
                what: "allowlist",
            }),
            other => other.map_err(op("remove", "allowlist")),
        }
    }

    /// Whether `ip` is covered by the allowlist (what the kernel would decide).
    pub fn is_allowlisted(&self, ip: IpAddr) -> Result<bool> {
        let r = match crate::addr::normalize(ip) {
            IpAddr::V4(a) => self.allow_v4.get(&Key::new(32, a.octets()), 0).map(|_| ()),
            IpAddr::V6(a) => self.allow_v6.get(&Key::new(128, a.octets()), 0).map(|_| ()),
        };
        match r {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(source) => Err(MapsError::Op {
                op: "lookup",
                name: "allowlist",
                source,
            }),
        }
    }

    /// Adds or replaces an attacker entry: exact map for a host, range trie otherwise.
    pub fn block(&mut self, net: Net, entry: AttackerEntry) -> Result<()> {
        match net {
            Net::V4(a, 32) => self
                .attackers_v4
                .insert(a.octets(), entry, 0)
                .map_err(op("insert", names::ATTACKERS_V4)),
            Net::V6(a, 128) => self
                .attackers_v6
                .insert(a.octets(), entry, 0)
                .map_err(op("insert", names::ATTACKERS_V6)),
            Net::V4(a, p) => self
                .ranges_v4
                .insert(&Key::new(p.into(), a.octets()), entry, 0)
                .map_err(op("insert", names::ATTACKER_RANGES_V4)),
            Net::V6(a, p) => self
                .ranges_v6
                .insert(&Key::new(p.into(), a.octets()), entry, 0)
                .map_err(op("insert", names::ATTACKER_RANGES_V6)),
        }
    }

    /// Removes an attacker entry.
    pub fn unblock(&mut self, net: Net) -> Result<()> {
        let r = match net {
            Net::V4(a, 32) => self.attackers_v4.remove(&a.octets()),
            Net::V6(a, 128) => self.attackers_v6.remove(&a.octets()),
            Net::V4(a, p) => self.ranges_v4.remove(&Key::new(p.into(), a.octets())),
            Net::V6(a, p) => self.ranges_v6.remove(&Key::new(p.into(), a.octets())),
        };
        match r {
            Err(e) if is_not_found(&e) => Err(MapsError::NotFound {
                net,
                what: "attacker map",
            }),
            other => other.map_err(op("remove", "attacker map")),
        }
    }

    /// Every allowlisted range.
    pub fn allowlist(&self) -> Result<Vec<Net>> {
        let mut out = Vec::new();
        for item in self.allow_v4.iter() {
            let (k, _) = item.map_err(op("iterate", names::ALLOW_V4))?;
            out.push(Net::V4(Ipv4Addr::from(k.data()), prefix_u8(k.prefix_len())));
        }
        for item in self.allow_v6.iter() {
            let (k, _) = item.map_err(op("iterate", names::ALLOW_V6))?;
            out.push(Net::V6(Ipv6Addr::from(k.data()), prefix_u8(k.prefix_len())));
        }
        out.sort();
        Ok(out)
    }

    /// Every attacker entry, exact and ranges.
    pub fn attackers(&self) -> Result<Vec<(Net, AttackerEntry)>> {
        let mut out = Vec::new();
        for item in self.attackers_v4.iter() {
            let (k, v) = item.map_err(op("iterate", names::ATTACKERS_V4))?;
            out.push((Net::V4(Ipv4Addr::from(k), 32), v));
        }
        for item in self.attackers_v6.iter() {
            let (k, v) = item.map_err(op("iterate", names::ATTACKERS_V6))?;
            out.push((Net::V6(Ipv6Addr::from(k), 128), v));
        }
        for item in self.ranges_v4.iter() {
            let (k, v) = item.map_err(op("iterate", names::ATTACKER_RANGES_V4))?;
            out.push((
                Net::V4(Ipv4Addr::from(k.data()), prefix_u8(k.prefix_len())),
                v,
            ));
        }
        for item in self.ranges_v6.iter() {
            let (k, v) = item.map_err(op("iterate", names::ATTACKER_RANGES_V6))?;
            out.push((
                Net::V6(Ipv6Addr::from(k.data()), prefix_u8(k.prefix_len())),
                v,
            ));
        }
        out.sort_by_key(|(n, _)| *n);
        Ok(out)
    }

    /// One attacker entry, exact or range, if present.
    pub fn attacker(&self, net: Net) -> Result<Option<AttackerEntry>> {
        let r = match net {
            Net::V4(a, 32) => self.attackers_v4.get(&a.octets(), 0),
            Net::V6(a, 128) => self.attackers_v6.get(&a.octets(), 0),
            Net::V4(a, p) => self.ranges_v4.get(&Key::new(p.into(), a.octets()), 0),
            Net::V6(a, p) => self.ranges_v6.get(&Key::new(p.into(), a.octets()), 0),
        };
        match r {
            Ok(e) => Ok(Some(e)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(op("read", "attacker map")(e)),
        }
    }

    /// Removes attacker entries whose expiry has passed. The kernel already ignores them; this
    /// frees their memory. Returns how many were removed.
    ///
    /// Each entry is read again just before it is removed: the policy sync may have extended its
    /// expiry since the listing (a verdict refreshing a ban), and a live entry must not go. A
    /// BPF hash map has no compare-and-delete, so an update landing between that read and the
    /// removal (microseconds) is still lost until the next snapshot repairs it.
    pub fn sweep_expired(&mut self) -> Result<usize> {
        let now = clock::boottime_ns();
        let expired: Vec<Net> = self
            .attackers()?
            .into_iter()
            .filter(|(_, e)| e.expired(now))
            .map(|(n, _)| n)
            .collect();
        let mut removed = 0;
        for net in expired {
            match self.attacker(net)? {
                Some(e) if e.expired(clock::boottime_ns()) => {}
                _ => continue,
            }
            match self.unblock(net) {
                Ok(()) => removed += 1,
                // Removed meanwhile by someone else: fine.
                Err(MapsError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }

    /// Per-source counters summed over CPUs, most packets first.
    pub fn sources(&self) -> Result<Vec<SourceStats>> {
        let now = clock::boottime_ns();
        let mut out = Vec::new();
        for item in self.sources.iter() {
            let (k, per_cpu) = item.map_err(op("iterate", names::SOURCE_STATS))?;
            let mut sum = SourceCounters::default();
            for c in per_cpu.iter() {
                for i in 0..ACTION_SLOTS {
                    sum.packets[i] += c.packets[i];
                    sum.bytes[i] += c.bytes[i];
                }
                sum.last_seen_ns = sum.last_seen_ns.max(c.last_seen_ns);
            }
            out.push(SourceStats::new(k, &sum, now));
        }
        out.sort_by(|a, b| {
            b.total_packets
                .cmp(&a.total_packets)
                .then(a.addr.cmp(&b.addr))
        });
        Ok(out)
    }

    /// Global counters summed over CPUs, by name.
    pub fn global(&self) -> Result<BTreeMap<&'static str, u64>> {
        let per_cpu = self
            .global
            .get(&0, 0)
            .map_err(op("read", names::GLOBAL_STATS))?;
        Ok(Counter::ALL
            .iter()
            .map(|c| {
                let i = *c as usize;
                (c.name(), per_cpu.iter().map(|g| g.counts[i]).sum())
            })
            .collect())
    }
}

fn prefix_u8(p: u32) -> u8 {
    u8::try_from(p).unwrap_or(u8::MAX)
}

/// Counters per action, by name.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct PerAction {
    /// Passed.
    pub pass: u64,
    /// Dropped.
    pub drop: u64,
    /// Redirected to the sandbox.
    pub redirect: u64,
    /// Reflected.
    pub reflect: u64,
}

impl PerAction {
    fn from_slots(s: &[u64; ACTION_SLOTS]) -> Self {
        let get = |a: Action| a.slot().and_then(|i| s.get(i)).copied().unwrap_or(0);
        Self {
            pass: get(Action::Pass),
            drop: get(Action::Drop),
            redirect: get(Action::Redirect),
            reflect: get(Action::Reflect),
        }
    }
}

/// One source's counters, summed over CPUs.
#[derive(Clone, Debug, Serialize)]
pub struct SourceStats {
    /// The source address (IPv4-mapped keys shown as IPv4).
    pub addr: IpAddr,
    /// Packets per action.
    pub packets: PerAction,
    /// Bytes per action.
    pub bytes: PerAction,
    /// Packets over all actions.
    pub total_packets: u64,
    /// Bytes over all actions.
    pub total_bytes: u64,
    /// Seconds since the source was last seen.
    pub last_seen_secs_ago: f64,
}

impl SourceStats {
    fn new(k: SourceKey, c: &SourceCounters, now: u64) -> Self {
        Self {
            addr: crate::addr::normalize(IpAddr::V6(Ipv6Addr::from(k.addr))),
            packets: PerAction::from_slots(&c.packets),
            bytes: PerAction::from_slots(&c.bytes),
            total_packets: c.packets.iter().sum(),
            total_bytes: c.bytes.iter().sum(),
            last_seen_secs_ago: now.saturating_sub(c.last_seen_ns) as f64 / 1e9,
        }
    }
}
