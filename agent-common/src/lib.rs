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
pub const LAYOUT_VERSION: u32 = 2;

/// Default bpffs directory under which the pinned state lives, as `<root>/v<LAYOUT_VERSION>/`.
pub const PIN_ROOT: &str = "/sys/fs/bpf/mirage";

/// Names of the programs in the eBPF object.
pub mod programs {
    /// The XDP entry point on the protected host's ingress.
    pub const XDP: &str = "redirect";
    /// The TC (sched_cls) program on ingress that rewrites redirected and reflected flows. It
    /// runs after `redirect` has passed a packet: XDP cannot tell a `CHECKSUM_PARTIAL` skb from
    /// one with a full checksum, TC's checksum helpers can, so every rewrite happens here.
    pub const TC: &str = "rewrite";
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

    /// `HashMap<TargetKey, Target>`: sandbox target per protected port (port 0: default).
    pub const TARGETS: &str = "TARGETS";
    /// `HashMap<PortKey, u8>`: ports that honeypot mode leaves to the real services.
    pub const ALLOW_PORTS: &str = "ALLOW_PORTS";
    /// `LruHashMap<FlowKey, FlowEntry>`: rewritten flows, one entry per direction.
    pub const FLOWS: &str = "FLOWS";
    /// `LruHashMap<SourceKey, RateState>`: reflect rate cap state per source.
    pub const REFLECT_RATE: &str = "REFLECT_RATE";
    /// `RingBuf` of [`crate::FlowEvent`]: new redirected and reflected flows.
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";

    /// Every map that is pinned, in the order the agent reports them.
    pub const PINNED: [&str; 14] = [
        CONFIG,
        ALLOW_V4,
        ALLOW_V6,
        ATTACKERS_V4,
        ATTACKERS_V6,
        ATTACKER_RANGES_V4,
        ATTACKER_RANGES_V6,
        SOURCE_STATS,
        GLOBAL_STATS,
        TARGETS,
        ALLOW_PORTS,
        FLOWS,
        REFLECT_RATE,
        FLOW_EVENTS,
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
    /// Sandbox targets.
    pub const TARGETS: u32 = 1024;
    /// Honeypot allowlisted ports.
    pub const ALLOW_PORTS: u32 = 1024;
    /// Flow entries (two per rewritten flow).
    pub const FLOWS: u32 = 1 << 18;
    /// Sources tracked by the reflect rate cap.
    pub const REFLECT_SOURCES: u32 = 1 << 14;
    /// Bytes of the flow-event ring buffer.
    pub const FLOW_EVENTS_BYTES: u32 = 1 << 18;
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
    /// Rewrite the packet toward the sandbox (new TCP/UDP flows only; see `FlowKind`).
    Redirect = 3,
    /// Connect the packet back to its sender's own port (new TCP/UDP flows only, rate-capped).
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
///
/// Layout: 32 bytes, no implicit padding. Ports in host order; addresses in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataPathConfig {
    /// [`Mode`] as `u8`.
    pub mode: u8,
    /// Bit set of `DataPathConfig::*` flags.
    pub flags: u8,
    /// [`RedirectModel`] as `u8`.
    pub model: u8,
    /// Explicit padding, always zero.
    pub _pad0: u8,
    /// Reflected packets allowed per source and second; 0 disables reflection (reflect actions
    /// then pass).
    pub reflect_pps: u32,
    /// First source port `full-nat` may allocate.
    pub nat_port_min: u16,
    /// Last source port `full-nat` may allocate.
    pub nat_port_max: u16,
    /// `full-nat` source address toward IPv4 sandboxes.
    pub snat_v4: [u8; 4],
    /// `full-nat` source address toward IPv6 sandboxes.
    pub snat_v6: [u8; 16],
}

impl DataPathConfig {
    /// Set once the agent has configured the data path; without it every packet passes.
    pub const ENABLED: u8 = 1 << 0;
}

/// How redirected packets reach the sandbox.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RedirectModel {
    /// DNAT only: the sandbox sees the attacker's address and routes replies back through the
    /// protected host, which rewrites their source back.
    #[default]
    PreserveSource = 0,
    /// DNAT and SNAT with a per-flow source port: the sandbox can be anywhere.
    FullNat = 1,
}

impl TryFrom<u8> for RedirectModel {
    type Error = u8;

    #[inline(always)]
    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            0 => Ok(RedirectModel::PreserveSource),
            1 => Ok(RedirectModel::FullNat),
            other => Err(other),
        }
    }
}

/// Address family tag used in keys (the values of `AF_INET` / `AF_INET6` are not used so the
/// tag fits a byte and reads plainly).
pub mod family {
    /// IPv4: the address occupies the first 4 bytes of a 16-byte field, the rest zero.
    pub const V4: u8 = 4;
    /// IPv6.
    pub const V6: u8 = 6;
}

/// Key of `TARGETS`: a protected port. Port 0 is the default target for the protocol and
/// family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TargetKey {
    /// Protected port, host order; 0 for the default target.
    pub port: u16,
    /// IP protocol (6 or 17).
    pub proto: u8,
    /// [`family`] of the attacker (and so of the sandbox).
    pub family: u8,
}

/// Value of `TARGETS`: where redirected packets go.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Target {
    /// Sandbox address (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    /// Sandbox port, host order; 0 keeps the protected port.
    pub port: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}

/// Key of `ALLOW_PORTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    /// Port, host order.
    pub port: u16,
    /// IP protocol (6 or 17).
    pub proto: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}

/// Key of `FLOWS`: a packet's 5-tuple as it arrives, before any rewrite.
///
/// Layout: 40 bytes; addresses in network order (IPv4 in the first 4 bytes, rest zero), ports
/// in host order, padding zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// [`family`].
    pub family: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}

/// What a flow entry does to the packets that match its key.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowKind {
    /// Attacker to protected host, rewritten toward the sandbox.
    RedirectForward = 1,
    /// Sandbox back to the attacker, rewritten to come from the protected host.
    RedirectReverse = 2,
    /// Attacker to us, turned around toward the attacker's own port.
    ReflectForward = 3,
    /// The attacker's own service answering, turned around to the attacker's client.
    ReflectReverse = 4,
}

impl TryFrom<u8> for FlowKind {
    type Error = u8;

    #[inline(always)]
    fn try_from(v: u8) -> Result<Self, u8> {
        match v {
            1 => Ok(FlowKind::RedirectForward),
            2 => Ok(FlowKind::RedirectReverse),
            3 => Ok(FlowKind::ReflectForward),
            4 => Ok(FlowKind::ReflectReverse),
            other => Err(other),
        }
    }
}

/// Value of `FLOWS`: the addresses and ports a matching packet leaves with.
///
/// Layout: 48 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// New source address.
    pub src: [u8; 16],
    /// New destination address.
    pub dst: [u8; 16],
    /// New source port, host order.
    pub sport: u16,
    /// New destination port, host order.
    pub dport: u16,
    /// [`FlowKind`] as `u8`.
    pub kind: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
    /// When the flow was created (`CLOCK_BOOTTIME` ns).
    pub created_ns: u64,
}

/// A new rewritten flow, reported through the `FLOW_EVENTS` ring buffer so that sandbox
/// records can be attributed to the attacker (the sandbox sees the NAT address under
/// `full-nat`).
///
/// Layout: 88 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// When (`CLOCK_BOOTTIME` ns).
    pub ts_ns: u64,
    /// Attacker address.
    pub attacker: [u8; 16],
    /// Address the attacker connected to (the protected host).
    pub orig_dst: [u8; 16],
    /// Where the flow now goes: the sandbox (redirect) or the attacker (reflect).
    pub target: [u8; 16],
    /// Source address the target sees: the attacker (preserve-source), the NAT address
    /// (full-nat) or the protected host (reflect).
    pub nat_addr: [u8; 16],
    /// Attacker port.
    pub attacker_port: u16,
    /// Protected port.
    pub orig_dport: u16,
    /// Target port.
    pub target_port: u16,
    /// Source port the target sees.
    pub nat_port: u16,
    /// [`FlowKind`] of the forward direction as `u8`.
    pub kind: u8,
    /// [`family`].
    pub family: u8,
    /// IP protocol.
    pub proto: u8,
    /// [`RedirectModel`] as `u8`.
    pub model: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 4],
}

/// Value of `REFLECT_RATE`: a one-second window counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateState {
    /// Start of the current window (`CLOCK_BOOTTIME` ns).
    pub window_start_ns: u64,
    /// Packets reflected in the window.
    pub count: u64,
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
    /// A reflect action while reflection is disabled (`reflect_pps` 0); passed.
    ReflectDisabled = 15,
    /// New rewritten flows (both redirect and reflect).
    FlowNew = 16,
    /// A redirect or reflect that could not start: not a TCP SYN (the flow began before its
    /// source became an attacker, or is not ours), a fragment, or ICMP; passed to the real host.
    NotNewFlow = 17,
    /// No sandbox target for the port and no default target; passed.
    NoTarget = 18,
    /// `full-nat` found no free source port; dropped.
    NatExhausted = 19,
    /// Reflected packets over the per-source cap; dropped.
    ReflectLimited = 20,
    /// A rewrite or redirect helper failed (should not happen); passed.
    RewriteError = 21,
    /// The FIB had no usable route or neighbour after a rewrite; handed to the kernel stack.
    FibFallback = 22,
    /// ICMP errors about a rewritten flow, rewritten too.
    IcmpRewritten = 23,
}

/// Number of global counters.
pub const COUNTERS: u32 = 24;

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
        Counter::ReflectDisabled,
        Counter::FlowNew,
        Counter::NotNewFlow,
        Counter::NoTarget,
        Counter::NatExhausted,
        Counter::ReflectLimited,
        Counter::RewriteError,
        Counter::FibFallback,
        Counter::IcmpRewritten,
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
            Counter::ReflectDisabled => "reflect_disabled",
            Counter::FlowNew => "flow_new",
            Counter::NotNewFlow => "not_new_flow",
            Counter::NoTarget => "no_target",
            Counter::NatExhausted => "nat_exhausted",
            Counter::ReflectLimited => "reflect_limited",
            Counter::RewriteError => "rewrite_error",
            Counter::FibFallback => "fib_fallback",
            Counter::IcmpRewritten => "icmp_rewritten",
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
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TargetKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Target {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RateState {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<DataPathConfig>(), 32);
        assert_eq!(size_of::<TargetKey>(), 4);
        assert_eq!(size_of::<Target>(), 20);
        assert_eq!(size_of::<PortKey>(), 4);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowEntry>(), 48);
        assert_eq!(size_of::<FlowEvent>(), 88);
        assert_eq!(size_of::<RateState>(), 16);
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
