//! The map statics. Their types and names come from `agent-common`, the only ABI definition.
//!
//! Every map is declared `pinned` (by name): the agent loads the object with its versioned pin
//! directory as the default, so a restarted or upgraded agent picks up the same maps and the
//! attacker state survives.

use crate::parse::Packet;
use agent_common::{
    AllowEntry, AttackerEntry, DataPathConfig, FlowEntry, FlowKey, GlobalCounters, PortKey,
    RateState, SourceCounters, SourceKey, Target, TargetKey, limits,
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf},
};

#[map(name = "CONFIG")]
pub static CONFIG: Array<DataPathConfig> = Array::pinned(1, 0);

#[map(name = "ALLOW_V4")]
pub static ALLOW_V4: LpmTrie<[u8; 4], AllowEntry> = LpmTrie::pinned(limits::ALLOW, 0);

#[map(name = "ALLOW_V6")]
pub static ALLOW_V6: LpmTrie<[u8; 16], AllowEntry> = LpmTrie::pinned(limits::ALLOW, 0);

// BPF_F_NO_PREALLOC: memory only for entries that exist (a preallocated 1M-entry map costs tens of
// MiB per family whether used or not), and a removed element is freed through RCU instead of
// being recycled while a program may still read it (see aya-ebpf `HashMap::get`).
#[map(name = "ATTACKERS_V4")]
pub static ATTACKERS_V4: HashMap<[u8; 4], AttackerEntry> =
    HashMap::pinned(limits::ATTACKERS, BPF_F_NO_PREALLOC);

#[map(name = "ATTACKERS_V6")]
pub static ATTACKERS_V6: HashMap<[u8; 16], AttackerEntry> =
    HashMap::pinned(limits::ATTACKERS, BPF_F_NO_PREALLOC);

#[map(name = "ATTACKER_RANGES_V4")]
pub static ATTACKER_RANGES_V4: LpmTrie<[u8; 4], AttackerEntry> =
    LpmTrie::pinned(limits::ATTACKER_RANGES, 0);

#[map(name = "ATTACKER_RANGES_V6")]
pub static ATTACKER_RANGES_V6: LpmTrie<[u8; 16], AttackerEntry> =
    LpmTrie::pinned(limits::ATTACKER_RANGES, 0);

#[map(name = "SOURCE_STATS")]
pub static SOURCE_STATS: LruPerCpuHashMap<SourceKey, SourceCounters> =
    LruPerCpuHashMap::pinned(limits::SOURCES, 0);

#[map(name = "GLOBAL_STATS")]
pub static GLOBAL_STATS: PerCpuArray<GlobalCounters> = PerCpuArray::pinned(1, 0);

#[map(name = "TARGETS")]
pub static TARGETS: HashMap<TargetKey, Target> = HashMap::pinned(limits::TARGETS, 0);

#[map(name = "ALLOW_PORTS")]
pub static ALLOW_PORTS: HashMap<PortKey, u8> = HashMap::pinned(limits::ALLOW_PORTS, 0);

// Both directions of every rewritten flow. LRU, so flows that end (or are abandoned) age out
// without a sweeper; sized for 2 x 128k concurrent flows.
#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowEntry> = LruHashMap::pinned(limits::FLOWS, 0);

#[map(name = "REFLECT_RATE")]
pub static REFLECT_RATE: LruHashMap<SourceKey, RateState> =
    LruHashMap::pinned(limits::REFLECT_SOURCES, 0);

#[map(name = "FLOW_EVENTS")]
pub static FLOW_EVENTS: RingBuf = RingBuf::pinned(limits::FLOW_EVENTS_BYTES, 0);

/// Per-CPU scratch space for the TC program's larger temporaries: the BPF stack is 512 bytes
/// for a whole call chain, and flow keys and entries are 40 and 48 bytes each. Not pinned: it
/// holds nothing between runs. A program runs to completion on its CPU, so one slot per CPU
/// is never shared.
pub struct Scratch {
    pub rev_key: FlowKey,
    pub fwd_key: FlowKey,
    pub rev: FlowEntry,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU room for the packet the TC program is working on, for the same reason as
/// [`SCRATCH`]; a map of its own so that it never aliases the other scratch slot.
#[map(name = "PKT_SCRATCH")]
pub static PKT_SCRATCH: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's packet slot.
#[inline(always)]
pub fn packet_scratch() -> Option<&'static mut Packet> {
    // SAFETY: as `scratch`.
    PKT_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// This CPU's scratch slot.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: this CPU's slot of a one-entry per-CPU array, valid for the program run and used
    // by nothing else while it runs.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}
