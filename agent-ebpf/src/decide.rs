//! The decision, shared by the XDP and TC programs, and the XDP entry's counting.
//!
//! Order: an existing rewritten flow → allowlist → exact attacker entry → attacker range → mode
//! default. A flow comes first so that a redirected connection stays redirected whatever
//! happens to its attacker entry, and so that the sandbox's replies are rewritten even when the
//! sandbox's address is allowlisted. Past that, the allowlist wins over everything, as
//! DESIGN.md fixes: an allowlisted source is never dropped, redirected or reflected.

use agent_common::{
    Action, AttackerEntry, Counter, DataPathConfig, FlowKey, FlowKind, GlobalCounters, Mode,
    PortKey, RateState, SourceCounters, SourceKey, Target, TargetKey, family,
};
use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::bpf_ktime_get_boot_ns,
    maps::lpm_trie::Key,
    programs::XdpContext,
};

use crate::{
    maps::{
        ALLOW_PORTS, ALLOW_V4, ALLOW_V6, ATTACKER_RANGES_V4, ATTACKER_RANGES_V6, ATTACKERS_V4,
        ATTACKERS_V6, CONFIG, FLOWS, GLOBAL_STATS, REFLECT_RATE, SOURCE_STATS, TARGETS,
    },
    parse::{IPPROTO_TCP, IPPROTO_UDP, L4, NotParsed, Packet, TCP_ACK, TCP_SYN, parse},
};

/// This CPU's global counters: looked up once per packet, then updated in place.
pub struct Stats(Option<&'static mut GlobalCounters>);

impl Stats {
    #[inline(always)]
    pub fn get() -> Self {
        // SAFETY: index 0 of a one-entry per-CPU array; the pointer is this CPU's copy, valid for
        // the whole program run, and nothing else on this CPU touches it while we run.
        Stats(GLOBAL_STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p }))
    }

    /// Adds `n` to a counter. Per-CPU, so a plain add is race-free.
    #[inline(always)]
    pub fn add(&mut self, counter: Counter, n: u64) {
        if let Some(g) = self.0.as_deref_mut()
            && let Some(v) = g.counts.get_mut(counter as usize)
        {
            *v += n;
        }
    }

    /// Counts a packet and its bytes under the action it got.
    #[inline(always)]
    fn action(&mut self, action: Action, bytes: u64) {
        if let Some((packets, byte_counter)) = Counter::for_action(action) {
            self.add(packets, 1);
            self.add(byte_counter, bytes);
        }
    }
}

/// The data-path configuration, all zeroes (not enabled) if the map cannot be read.
#[inline(always)]
pub fn config() -> DataPathConfig {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// `CLOCK_BOOTTIME` now, the clock attacker expiries are written in.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a plain helper call with no arguments.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// Adds a packet to the per-source counters.
#[inline(never)]
fn count_source(pkt: &Packet, action: Action, bytes: u64, now: u64) {
    let Some(slot) = action.slot() else { return };
    let key = source_key(pkt);
    if let Some(p) = SOURCE_STATS.get_ptr_mut(key) {
        // SAFETY: this CPU's copy of an LRU per-CPU value, valid for the program run.
        let c = unsafe { &mut *p };
        if let Some(v) = c.packets.get_mut(slot) {
            *v += 1;
        }
        if let Some(v) = c.bytes.get_mut(slot) {
            *v += bytes;
        }
        c.last_seen_ns = now;
        return;
    }
    let mut c = SourceCounters {
        last_seen_ns: now,
        ..SourceCounters::default()
    };
    if let Some(v) = c.packets.get_mut(slot) {
        *v = 1;
    }
    if let Some(v) = c.bytes.get_mut(slot) {
        *v = bytes;
    }
    // BPF_NOEXIST: if another CPU inserted the key meanwhile, its entry (holding this CPU's
    // zeroed slot) stays; losing this one packet from the counters beats overwriting theirs.
    let _ = SOURCE_STATS.insert(key, c, u64::from(BPF_NOEXIST));
}

/// The per-source key of the packet's source address.
#[inline(always)]
pub fn source_key(pkt: &Packet) -> SourceKey {
    if pkt.family == family::V4 {
        SourceKey::v4(pkt.src_v4())
    } else {
        SourceKey::v6(pkt.src)
    }
}

/// A live (not expired) attacker entry's stored action, or `None`.
#[inline(always)]
fn live(entry: Option<&AttackerEntry>, now: u64, stats: &mut Option<&mut Stats>) -> Option<u8> {
    let e = entry?;
    // Copy out at once: the map value may be replaced while we run.
    let (action, expires_ns) = (e.action, e.expires_ns);
    if expires_ns != 0 && expires_ns <= now {
        if let Some(s) = stats.as_deref_mut() {
            s.add(Counter::Expired, 1);
        }
        return None;
    }
    Some(action)
}

/// The stored action for the packet's source, exact entries before ranges.
#[inline(always)]
fn attacker(pkt: &Packet, now: u64, stats: &mut Option<&mut Stats>) -> Option<u8> {
    if pkt.family == family::V4 {
        let a = pkt.src_v4();
        // SAFETY: the value is copied out in `live` before anything else runs.
        live(unsafe { ATTACKERS_V4.get(a) }, now, stats)
            .or_else(|| live(ATTACKER_RANGES_V4.get(Key::new(32, a)), now, stats))
    } else {
        // SAFETY: as above.
        live(unsafe { ATTACKERS_V6.get(pkt.src) }, now, stats)
            .or_else(|| live(ATTACKER_RANGES_V6.get(Key::new(128, pkt.src)), now, stats))
    }
}

#[inline(always)]
fn allowlisted(pkt: &Packet) -> bool {
    if pkt.family == family::V4 {
        ALLOW_V4.get(Key::new(32, pkt.src_v4())).is_some()
    } else {
        ALLOW_V6.get(Key::new(128, pkt.src)).is_some()
    }
}

/// Whether honeypot mode leaves this packet's destination port to the real services.
#[inline(always)]
fn port_allowed(pkt: &Packet) -> bool {
    if !pkt.has_ports() {
        return false;
    }
    let key = PortKey {
        port: pkt.dport,
        proto: pkt.proto,
        _pad: 0,
    };
    // SAFETY: only presence is read.
    unsafe { ALLOW_PORTS.get(key) }.is_some()
}

/// The flow-table key of a packet as it arrives.
#[inline(always)]
pub fn flow_key(pkt: &Packet) -> FlowKey {
    FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

/// The kind of the flow a packet with ports belongs to, if any.
#[inline(never)]
fn flow_kind(pkt: &Packet) -> Option<u8> {
    if !pkt.has_ports() {
        return None;
    }
    // SAFETY: one byte copied out at once.
    unsafe { FLOWS.get(flow_key(pkt)) }.map(|e| e.kind)
}

/// The action the packets of a flow of `kind` count under.
#[inline(always)]
pub fn flow_action(kind: u8) -> Action {
    match FlowKind::try_from(kind) {
        Ok(FlowKind::ReflectForward | FlowKind::ReflectReverse) => Action::Reflect,
        _ => Action::Redirect,
    }
}

/// What to do with a packet that belongs to no rewritten flow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fresh {
    /// Allowlisted source: pass, whatever else says.
    Allowlisted,
    /// The resolved action for the packet.
    Act(Action),
}

/// Allowlist → exact attacker → range → mode default, for a packet outside any flow.
#[inline(never)]
pub fn decide_fresh(
    pkt: &Packet,
    cfg: &DataPathConfig,
    now: u64,
    mut stats: Option<&mut Stats>,
) -> Fresh {
    if allowlisted(pkt) {
        return Fresh::Allowlisted;
    }
    // An unknown mode fails open: nobody is treated as an attacker by default.
    let mode = Mode::try_from(cfg.mode).unwrap_or(Mode::Unreal);
    let action = match attacker(pkt, now, &mut stats) {
        Some(stored) => match Action::try_from(stored) {
            Ok(Action::Default) if mode == Mode::Honeypot && port_allowed(pkt) => Action::Pass,
            Ok(Action::Default) => mode.attacker_action(),
            Ok(a) => a,
            // An unknown stored value fails open.
            Err(_) => Action::Pass,
        },
        None if mode == Mode::Honeypot && !port_allowed(pkt) => Action::Redirect,
        None => Action::Pass,
    };
    Fresh::Act(action)
}

/// Whether a packet may start a rewritten flow: a TCP SYN (no ACK) or a UDP datagram, with
/// ports. A TCP segment of a connection that began before its source became an attacker (or
/// that is not ours at all) never starts one, so it reaches the real service unharmed.
#[inline(always)]
pub fn starts_flow(pkt: &Packet) -> bool {
    pkt.has_ports()
        && (pkt.proto == IPPROTO_UDP
            || (pkt.proto == IPPROTO_TCP
                && pkt.tcp_flags & TCP_SYN != 0
                && pkt.tcp_flags & TCP_ACK == 0))
}

/// The sandbox target for the packet's port, else the protocol's default target.
#[inline(never)]
pub fn target(pkt: &Packet) -> Option<Target> {
    let mut key = TargetKey {
        port: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
    };
    // SAFETY: copied out at once.
    if let Some(t) = unsafe { TARGETS.get(key) } {
        return Some(*t);
    }
    key.port = 0;
    // SAFETY: as above.
    unsafe { TARGETS.get(key) }.copied()
}

/// Per-source reflect cap: `true` while the source stays within `pps` packets per second.
/// A fixed one-second window; concurrent CPUs may let a few packets more through, never
/// fewer.
#[inline(never)]
fn reflect_allowed(pkt: &Packet, pps: u32, now: u64) -> bool {
    const SECOND: u64 = 1_000_000_000;
    let key = source_key(pkt);
    if let Some(p) = REFLECT_RATE.get_ptr_mut(key) {
        // SAFETY: a live LRU value, valid for the program run; races only miscount slightly.
        let s = unsafe { &mut *p };
        if now.saturating_sub(s.window_start_ns) >= SECOND {
            s.window_start_ns = now;
            s.count = 1;
            return pps > 0;
        }
        s.count += 1;
        return s.count <= u64::from(pps);
    }
    let s = RateState {
        window_start_ns: now,
        count: 1,
    };
    let _ = REFLECT_RATE.insert(key, s, 0);
    pps > 0
}

/// The XDP entry's decision for one frame, with every counter.
#[inline(always)]
pub fn try_redirect(ctx: &XdpContext) -> Result<u32, ()> {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let mut stats = Stats::get();
    let cfg = config();
    if cfg.flags & DataPathConfig::ENABLED == 0 {
        stats.add(Counter::Unconfigured, 1);
        stats.action(Action::Pass, bytes);
        return Ok(xdp_action::XDP_PASS);
    }
    let mut pkt = Packet::empty();
    match parse(ctx, &mut pkt) {
        Ok(()) => {}
        Err(why) => {
            stats.add(
                match why {
                    NotParsed::NotIp => Counter::NotIp,
                    NotParsed::Malformed => Counter::ParseError,
                },
                1,
            );
            stats.action(Action::Pass, bytes);
            return Ok(xdp_action::XDP_PASS);
        }
    };
    Ok(judge(&pkt, &cfg, bytes))
}

/// Everything after parsing, in a stack frame of its own (the parser, which must be inlined,
/// takes most of the entry's frame).
#[inline(never)]
fn judge(pkt: &Packet, cfg: &DataPathConfig, bytes: u64) -> u32 {
    let mut stats = Stats::get();
    if pkt.fragment {
        stats.add(Counter::Fragment, 1);
    }
    if pkt.l4 == L4::Malformed {
        stats.add(Counter::L4ParseError, 1);
    }
    let now = now_ns();

    let action = if let Some(kind) = flow_kind(pkt) {
        // Part of a rewritten flow: the TC program rewrites it after we pass it.
        flow_action(kind)
    } else {
        match decide_fresh(pkt, cfg, now, Some(&mut stats)) {
            Fresh::Allowlisted => {
                stats.add(Counter::Allowlisted, 1);
                Action::Pass
            }
            Fresh::Act(a @ (Action::Redirect | Action::Reflect)) if !starts_flow(pkt) => {
                let _ = a;
                stats.add(Counter::NotNewFlow, 1);
                Action::Pass
            }
            Fresh::Act(Action::Redirect) if target(pkt).is_none() => {
                stats.add(Counter::NoTarget, 1);
                Action::Pass
            }
            Fresh::Act(Action::Default) => Action::Pass,
            Fresh::Act(a) => a,
        }
    };

    // The reflect cap holds for every reflected packet, new flows and old, in both directions
    // (the attacker is the source of both). A cap of 0 turns reflection off: the packet passes.
    let action = if action != Action::Reflect {
        action
    } else if cfg.reflect_pps == 0 {
        stats.add(Counter::ReflectDisabled, 1);
        Action::Pass
    } else if !reflect_allowed(pkt, cfg.reflect_pps, now) {
        stats.add(Counter::ReflectLimited, 1);
        Action::Drop
    } else {
        action
    };

    stats.action(action, bytes);
    count_source(pkt, action, bytes, now);
    match action {
        Action::Drop => xdp_action::XDP_DROP,
        // Redirect and reflect pass too: the TC program on this interface's ingress rewrites.
        _ => xdp_action::XDP_PASS,
    }
}
