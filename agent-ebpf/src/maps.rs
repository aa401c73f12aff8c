//! The map statics. Their types and names come from `agent-common`, the only ABI definition.
//!
//! Every map is declared `pinned` (by name): the agent loads the object with its versioned pin
//! directory as the default, so a restarted or upgraded agent picks up the same maps and the
//! attacker state survives.

use agent_common::{
    AllowEntry, AttackerEntry, DataPathConfig, GlobalCounters, SourceCounters, SourceKey, limits,
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruPerCpuHashMap, PerCpuArray},
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
