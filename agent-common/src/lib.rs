//! The kernel/user ABI of Mirage, and the only place it is defined.
//!
//! `agent-ebpf` (the XDP data path) and `agent` (the loader and map writer) both depend on this
//! crate, so a map key, value or counter index cannot drift between the two sides. Every type is
//! `#[repr(C)]`, `Copy`, made of plain integers and byte arrays, with explicit padding: hash-map
//! keys are compared as raw bytes, so padding must exist as a named, zeroed field. Addresses are
//! kept as byte arrays in network order (never `u128`, which eBPF handles badly), so the same
//! bytes that sit in the packet are the bytes in the key.
//!
//! Enums (`Action`, `Mode`, `Counter`) are `#[repr(u8)]` or `#[repr(u32)]` and cross the boundary
//! as their integer; conversion back is `TryFrom`, so userspace never trusts a raw value it reads
//! from a map.
//!
//! With the `user` feature the types implement `aya::Pod` so userspace can use them with aya's
//! typed maps.
#![no_std]

/// Version of the map layout. It is part of the pin path, so a program with a different layout
/// never reuses maps pinned by another (aya reuses a pinned map without checking its key or value
/// size).
pub const LAYOUT_VERSION: u32 = 1;

/// Default bpffs directory under which the pinned state lives, as `<root>/v<LAYOUT_VERSION>/`.
pub const PIN_ROOT: &str = "/sys/fs/bpf/mirage";

/// Names of the programs in the eBPF object.
pub mod programs {
    /// The XDP entry point on the protected host's ingress.
    pub const XDP: &str = "redirect";
    /// An XDP program that returns `XDP_PASS` at once: the floor that `BPF_PROG_TEST_RUN` itself
    /// costs, measured beside the real program in `cargo xtask bench xdp`.
    pub const BASELINE: &str = "baseline";
}

/// Names of the maps in the eBPF object. Userspace reaches maps only through these.
pub mod maps {
    /// `Array<DataPathConfig>` with one entry: the mode and data-path flags.
    pub const CONFIG: &str = "CONFIG";
    /// `LpmTrie<[u8; 4], AllowEntry>`: IPv4 source ranges that always pass.
    pub const ALLOW_V4: &str = "ALLOW_V4";
    /// `LpmTrie<[u8; 16], AllowEntry>`: IPv6 source ranges that always pass.
    pub const ALLOW_V6: &str = "ALLOW_V6";
    /// `HashMap<[u8; 4], AttackerEntry>`: exact IPv4 attacker addresses.
    pub const ATTACKERS_V4: &str = "ATTACKERS_V4";
    /// `HashMap<[u8; 16], AttackerEntry>`: exact IPv6 attacker addresses.
    pub const ATTACKERS_V6: &str = "ATTACKERS_V6";
    /// `LpmTrie<[u8; 4], AttackerEntry>`: IPv4 attacker ranges.
    pub const ATTACKER_RANGES_V4: &str = "ATTACKER_RANGES_V4";
    /// `LpmTrie<[u8; 16], AttackerEntry>`: IPv6 attacker ranges.
    pub const ATTACKER_RANGES_V6: &str = "ATTACKER_RANGES_V6";
    /// `LruPerCpuHashMap<SourceKey, SourceCounters>`: per-source counters.
    pub const SOURCE_STATS: &str = "SOURCE_STATS";
    /// `PerCpuArray<GlobalCounters>` with one entry: the global counters, one struct per CPU
    /// so the program updates them all through a single map lookup.
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";

    /// Every map that is pinned, in the order the agent reports them.
    pub const PINNED: [&str; 9] = [
        CONFIG,
        ALLOW_V4,
        ALLOW_V6,
        ATTACKERS_V4,
        ATTACKERS_V6,
        ATTACKER_RANGES_V4,
        ATTACKER_RANGES_V6,
        SOURCE_STATS,
        GLOBAL_STATS,
    ];
}

/// Map sizes. The kernel enforces them; userspace reports a full map as an error.
pub mod limits {
    /// Exact attacker addresses per family. The hash maps are created with `BPF_F_NO_PREALLOC`,
    /// so memory is spent only on entries that exist.
    pub const ATTACKERS: u32 = 1 << 20;
    /// Attacker ranges per family. Kept small: LPM tries degrade at millions of entries.
    pub const ATTACKER_RANGES: u32 = 1 << 16;
    /// Allowlisted ranges per family.
    pub const ALLOW: u32 = 1 << 14;
    /// Sources tracked in the per-source counters (LRU: the least recently seen are evicted).
    pub const SOURCES: u32 = 1 << 16;
}

/// What the data path does with a packet. Stored as `u8` in [`AttackerEntry::action`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Use the mode's default action for attackers (drop in `firewall`, redirect in `unreal`...).
    Default = 0,
    /// Let the packet through to the real service.
    Pass = 1,
    /// Drop the packet.
    Drop = 2,
    /// Rewrite the packet toward the sandbox (reserved: implemented with the redirect issue).
    Redirect = 3,
    /// Connect the packet back to its sender (reserved: implemented with the redirect issue).
    Reflect = 4,
}

impl Action {
    /// Index of this action in [`SourceCounters`] arrays; `None` for [`Action::Default`], which
    /// is resolved before anything is counted.
    #[inline(always)]
    pub const fn slot(self) -> Option<usize> {
        match self {
            Action::Default => None,
            Action::Pass => Some(0),
            Action::Drop => Some(1),
            Action::Redirect => Some(2),
            Action::Reflect => Some(3),
        }
    }

    /// The action stored in `slot` of [`SourceCounters`].
    pub const fn from_slot(slot: usize) -> Option<Action> {
        match slot {
            0 => Some(Action::Pass),
            1 => Some(Action::Drop),
            2 => Some(Action::Redirect),
            3 => Some(Action::Reflect),
            _ => None,
        }
    }

    /// The name used on the command line, in configuration and in JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Action::Default => "default",
            Action::Pass => "pass",
            Action::Drop => "drop",
            Action::Redirect => "redirect",
            Action::Reflect => "reflect",
        }
    }
}

impl TryFrom<u8> for Action {
    type Error = u8;

    #[inline(always)]
    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            0 => Ok(Action::Default),
            1 => Ok(Action::Pass),
            2 => Ok(Action::Drop),
            3 => Ok(Action::Redirect),
            4 => Ok(Action::Reflect),
            other => Err(other),
        }
    }
}

/// Number of per-action slots in [`SourceCounters`].
pub const ACTION_SLOTS: usize = 4;

/// The agent's mode: the default action for attackers, and for honeypot, for everyone.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Attackers go to the sandbox; everyone else is untouched (镜花水月, the default).
    Unreal = 0,
    /// Everyone except allowlisted sources and ports goes to the sandbox.
    Honeypot = 1,
    /// Attackers are connected back to themselves.
    Reflect = 2,
    /// Attackers are dropped.
    Firewall = 3,
}

impl Mode {
    /// The action an attacker entry with [`Action::Default`] gets in this mode.
    #[inline(always)]
    pub const fn attacker_action(self) -> Action {
        match self {
            Mode::Unreal | Mode::Honeypot => Action::Redirect,
            Mode::Reflect => Action::Reflect,
            Mode::Firewall => Action::Drop,
        }
    }

    /// The name used on the command line, in configuration and in JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Unreal => "unreal",
            Mode::Honeypot => "honeypot",
            Mode::Reflect => "reflect",
            Mode::Firewall => "firewall",
        }
    }
}

impl TryFrom<u8> for Mode {
    type Error = u8;

    #[inline(always)]
    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            0 => Ok(Mode::Unreal),
            1 => Ok(Mode::Honeypot),
            2 => Ok(Mode::Reflect),
            3 => Ok(Mode::Firewall),
            other => Err(other),
        }
    }
}

/// The single entry of the `CONFIG` array.
///
/// Until userspace writes it the entry is all zeroes, which the kernel reads as
/// [`DataPathConfig::ENABLED`] unset: every packet passes. A freshly loaded program is therefore
/// inert until the agent has filled its maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataPathConfig {
    /// [`Mode`] as `u8`.
    pub mode: u8,
    /// Bit set of `DataPathConfig::*` flags.
    pub flags: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 6],
}

impl DataPathConfig {
    /// Set once the agent has configured the data path; without it every packet passes.
    pub const ENABLED: u8 = 1 << 0;
}

/// Value of the allowlist tries. The presence of the key is what matters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowEntry {
    /// Reserved flags, zero.
    pub flags: u32,
}

/// Value of the attacker maps (exact and ranges).
///
/// Layout: 16 bytes, `expires_ns` first so it is 8-byte aligned; no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttackerEntry {
    /// Expiry in `CLOCK_BOOTTIME` nanoseconds (`bpf_ktime_get_boot_ns`); 0 means never. The
    /// kernel treats an entry whose expiry has passed as absent, so entries age out even while
    /// the agent is down.
    pub expires_ns: u64,
    /// [`Action`] as `u8`.
    pub action: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 7],
}

impl AttackerEntry {
    /// A new entry with zeroed padding.
    pub const fn new(action: Action, expires_ns: u64) -> Self {
        Self {
            expires_ns,
            action: action as u8,
            _pad: [0; 7],
        }
    }

    /// Whether the entry has expired at `now_ns` (`CLOCK_BOOTTIME`).
    #[inline(always)]
    pub const fn expired(&self, now_ns: u64) -> bool {
        self.expires_ns != 0 && self.expires_ns <= now_ns
    }
}

/// Key of the per-source counters: the source address as 16 bytes, IPv4 as IPv4-mapped IPv6
/// (`::ffff:a.b.c.d`), so one map covers both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// Address bytes in network order.
    pub addr: [u8; 16],
}

impl SourceKey {
    /// The key for an IPv4 source.
    #[inline(always)]
    pub const fn v4(a: [u8; 4]) -> Self {
        Self {
            addr: [
                0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
            ],
        }
    }

    /// The key for an IPv6 source.
    #[inline(always)]
    pub const fn v6(a: [u8; 16]) -> Self {
        Self { addr: a }
    }
}

/// Per-source counters, one copy per CPU; userspace sums them.
///
/// Layout: 72 bytes, all `u64`, no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceCounters {
    /// Packets per action, indexed by [`Action::slot`].
    pub packets: [u64; ACTION_SLOTS],
    /// Bytes (whole frames) per action, indexed by [`Action::slot`].
    pub bytes: [u64; ACTION_SLOTS],
    /// When this CPU last saw the source, in `CLOCK_BOOTTIME` nanoseconds.
    pub last_seen_ns: u64,
}

/// Index of a global counter in `GLOBAL_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Packets passed (every reason).
    Pass = 0,
    /// Packets dropped.
    Drop = 1,
    /// Packets redirected to the sandbox.
    Redirect = 2,
    /// Packets reflected.
    Reflect = 3,
    /// Passed because the source is allowlisted.
    Allowlisted = 4,
    /// Passed because the frame is not IPv4 or IPv6 (ARP, LLDP...).
    NotIp = 5,
    /// Passed because a header was truncated or malformed before the source address could be
    /// read (Ethernet, VLAN, IP).
    ParseError = 6,
    /// A transport header that should be there was truncated or malformed (counted; the
    /// decision, which needs only the source, still applies).
    L4ParseError = 7,
    /// IP fragments seen (first and non-first).
    Fragment = 8,
    /// An attacker entry matched but had expired, so it was treated as absent.
    Expired = 9,
    /// Bytes passed.
    PassBytes = 10,
    /// Bytes dropped.
    DropBytes = 11,
    /// Bytes redirected.
    RedirectBytes = 12,
    /// Bytes reflected.
    ReflectBytes = 13,
    /// Passed because the data path is not configured yet (no `ENABLED` flag).
    Unconfigured = 14,
    /// An action reserved in the ABI that this program does not implement yet; passed.
    Unsupported = 15,
}

/// Number of global counters.
pub const COUNTERS: u32 = 16;

/// The value of `GLOBAL_STATS`: every global counter, indexed by [`Counter`], for one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalCounters {
    /// Counts indexed by [`Counter`] as `usize`.
    pub counts: [u64; COUNTERS as usize],
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; COUNTERS as usize] = [
        Counter::Pass,
        Counter::Drop,
        Counter::Redirect,
        Counter::Reflect,
        Counter::Allowlisted,
        Counter::NotIp,
        Counter::ParseError,
        Counter::L4ParseError,
        Counter::Fragment,
        Counter::Expired,
        Counter::PassBytes,
        Counter::DropBytes,
        Counter::RedirectBytes,
        Counter::ReflectBytes,
        Counter::Unconfigured,
        Counter::Unsupported,
    ];

    /// The name used in JSON and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Pass => "pass",
            Counter::Drop => "drop",
            Counter::Redirect => "redirect",
            Counter::Reflect => "reflect",
            Counter::Allowlisted => "allowlisted",
            Counter::NotIp => "not_ip",
            Counter::ParseError => "parse_error",
            Counter::L4ParseError => "l4_parse_error",
            Counter::Fragment => "fragment",
            Counter::Expired => "expired",
            Counter::PassBytes => "pass_bytes",
            Counter::DropBytes => "drop_bytes",
            Counter::RedirectBytes => "redirect_bytes",
            Counter::ReflectBytes => "reflect_bytes",
            Counter::Unconfigured => "unconfigured",
            Counter::Unsupported => "unsupported",
        }
    }

    /// The packet and byte counters of an action; `None` for [`Action::Default`].
    #[inline(always)]
    pub const fn for_action(action: Action) -> Option<(Counter, Counter)> {
        match action {
            Action::Default => None,
            Action::Pass => Some((Counter::Pass, Counter::PassBytes)),
            Action::Drop => Some((Counter::Drop, Counter::DropBytes)),
            Action::Redirect => Some((Counter::Redirect, Counter::RedirectBytes)),
            Action::Reflect => Some((Counter::Reflect, Counter::ReflectBytes)),
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and byte arrays, with every
    // padding byte an explicit field, so any bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::DataPathConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AllowEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AttackerEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SourceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SourceCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::GlobalCounters {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<DataPathConfig>(), 8);
        assert_eq!(size_of::<AllowEntry>(), 4);
        assert_eq!(size_of::<AttackerEntry>(), 16);
        assert_eq!(size_of::<SourceKey>(), 16);
        assert_eq!(size_of::<SourceCounters>(), 8 * (2 * ACTION_SLOTS + 1));
    }

    #[test]
    fn enums_round_trip() {
        for v in 0..=4u8 {
            assert_eq!(Action::try_from(v).map(|a| a as u8), Ok(v));
        }
        assert_eq!(Action::try_from(5), Err(5));
        for v in 0..=3u8 {
            assert_eq!(Mode::try_from(v).map(|m| m as u8), Ok(v));
        }
        assert_eq!(Mode::try_from(4), Err(4));
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        for slot in 0..ACTION_SLOTS {
            let a = Action::from_slot(slot).unwrap();
            assert_eq!(a.slot(), Some(slot));
        }
    }

    #[test]
    fn expiry() {
        let never = AttackerEntry::new(Action::Drop, 0);
        assert!(!never.expired(u64::MAX));
        let e = AttackerEntry::new(Action::Drop, 100);
        assert!(!e.expired(99));
        assert!(e.expired(100));
    }

    #[test]
    fn source_key_maps_v4() {
        let k = SourceKey::v4([192, 0, 2, 1]);
        assert_eq!(&k.addr[10..], &[0xff, 0xff, 192, 0, 2, 1]);
    }
}
