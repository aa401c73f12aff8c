//! The TC ingress program: rewrites redirected and reflected flows and forwards them.
//!
//! XDP has already decided (and dropped what must be dropped); this program repeats the cheap
//! lookups, creates flow entries for new flows, rewrites addresses and ports with the skb
//! checksum helpers, and sends the packet out through a FIB lookup. The helpers are the reason
//! the rewrite lives here: `bpf_l3_csum_replace`/`bpf_l4_csum_replace` follow the skb's checksum
//! state (a `CHECKSUM_PARTIAL` packet from a local veth peer carries only the pseudo-header sum
//! in its L4 field), which XDP cannot see.
//!
//! Flow entries come in pairs (forward and reverse), the reverse inserted first, as Cilium's
//! SNAT does (`bpf/lib/nat.h`), so that a reply never arrives before its entry exists.

use core::mem::size_of;

use agent_common::{
    Action, Counter, DataPathConfig, FlowEntry, FlowEvent, FlowKey, FlowKind, RedirectModel,
    Target, family,
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT,
        bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};

use crate::{
    csum::{BPF_F_IPV6, diff16, raw_port, raw4},
    decide::{Fresh, Stats, config, decide_fresh, flow_key, now_ns, starts_flow, target},
    icmp,
    maps::{FLOW_EVENTS, FLOWS, packet_scratch, scratch},
    parse::{IPPROTO_TCP, Packet, parse},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const TC_ACT_REDIRECT: i32 = 7;
/// Attempts at finding a free `full-nat` source port.
const NAT_PORT_TRIES: u32 = 32;

/// The TC entry.
#[inline(always)]
pub fn try_rewrite(ctx: &TcContext) -> Result<i32, ()> {
    let cfg = config();
    if cfg.flags & DataPathConfig::ENABLED == 0 {
        return Ok(TC_ACT_OK);
    }
    // The packet lives in a per-CPU map slot, not on the stack: see `maps::SCRATCH`.
    let pkt = packet_scratch().ok_or(())?;
    *pkt = Packet::empty();
    if parse(ctx, pkt).is_err() {
        return Ok(TC_ACT_OK);
    }
    if icmp::is_error(pkt) {
        return Ok(icmp::rewrite_error(ctx, pkt));
    }
    if !pkt.has_ports() {
        return Ok(TC_ACT_OK);
    }
    Ok(handle(ctx, pkt, &cfg))
}

/// A TCP/UDP packet past parsing, in a stack frame of its own.
#[inline(never)]
fn handle(ctx: &TcContext, pkt: &Packet, cfg: &DataPathConfig) -> i32 {
    match try_handle(ctx, pkt, cfg) {
        Ok(v) => v,
        Err(()) => TC_ACT_OK,
    }
}

#[inline(always)]
fn try_handle(ctx: &TcContext, pkt: &Packet, cfg: &DataPathConfig) -> Result<i32, ()> {
    if let Some(entry) = flow_ref(pkt) {
        return apply_and_forward(ctx, pkt, entry);
    }
    let now = now_ns();
    let action = match decide_fresh(pkt, cfg, now, None) {
        // Reflection switched off (cap 0): XDP passed the packet to the real service.
        Fresh::Act(Action::Reflect) if cfg.reflect_pps == 0 => return Ok(TC_ACT_OK),
        Fresh::Act(a @ (Action::Redirect | Action::Reflect)) if starts_flow(pkt) => a,
        _ => return Ok(TC_ACT_OK),
    };
    let mut stats = Stats::get();
    let mut fwd = FlowEntry::default();
    if action == Action::Redirect {
        // XDP passed it only with a target; a target removed since then fails open.
        let Some(t) = target(pkt) else {
            return Ok(TC_ACT_OK);
        };
        if !new_redirect(pkt, cfg, &t, now, &mut fwd) {
            stats.add(Counter::NatExhausted, 1);
            return Ok(TC_ACT_SHOT);
        }
    } else if !new_reflect(pkt, now, &mut fwd) {
        stats.add(Counter::RewriteError, 1);
        return Ok(TC_ACT_OK);
    }
    stats.add(Counter::FlowNew, 1);
    report(pkt, &fwd, cfg.model, now);
    apply_and_forward(ctx, pkt, &fwd)
}

/// The flow entry of a packet with ports, as a reference into the map (no 48-byte copy on the
/// stack; an LRU value stays valid for the program run, and a concurrent update only changes
/// which of two consistent entries we read).
#[inline(always)]
fn flow_ref(pkt: &Packet) -> Option<&'static FlowEntry> {
    if !pkt.has_ports() {
        return None;
    }
    // SAFETY: see above.
    unsafe { FLOWS.get(flow_key(pkt)) }
}

fn entry(
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    kind: FlowKind,
    now: u64,
) -> FlowEntry {
    FlowEntry {
        src,
        dst,
        sport,
        dport,
        kind: kind as u8,
        _pad: [0; 3],
        created_ns: now,
    }
}

fn key(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, pkt: &Packet) -> FlowKey {
    FlowKey {
        src,
        dst,
        sport,
        dport,
        proto: pkt.proto,
        family: pkt.family,
        _pad: [0; 2],
    }
}

/// Inserts a flow's entry pair, the reverse first (so a reply never finds nothing), and takes
/// the reverse back out if the forward insert fails. `exclusive`: the reverse key must be new
/// (a full-nat port probe); otherwise a stale pair with the same tuple is replaced.
#[inline(never)]
fn insert_pair(
    rev_key: &FlowKey,
    rev: &FlowEntry,
    fwd_key: &FlowKey,
    fwd: &FlowEntry,
    exclusive: bool,
) -> bool {
    let flags = if exclusive { BPF_NOEXIST } else { BPF_ANY };
    if FLOWS.insert(rev_key, rev, u64::from(flags)).is_err() {
        return false;
    }
    if FLOWS.insert(fwd_key, fwd, u64::from(BPF_ANY)).is_err() {
        let _ = FLOWS.remove(rev_key);
        return false;
    }
    true
}

/// Creates the entry pair of a redirected flow and writes the forward entry to `out`; `false`
/// when no entry could be made (full-nat found no free port).
#[inline(never)]
fn new_redirect(
    pkt: &Packet,
    cfg: &DataPathConfig,
    t: &Target,
    now: u64,
    out: &mut FlowEntry,
) -> bool {
    let Some(s) = scratch() else {
        return false;
    };
    let sandbox_port = if t.port == 0 { pkt.dport } else { t.port };
    s.rev = entry(
        pkt.dst,
        pkt.src,
        pkt.dport,
        pkt.sport,
        FlowKind::RedirectReverse,
        now,
    );
    s.fwd_key = flow_key(pkt);
    if RedirectModel::try_from(cfg.model).unwrap_or_default() == RedirectModel::PreserveSource {
        // The sandbox answers the attacker directly: (S:s → A:a) becomes (H:h → A:a).
        s.rev_key = key(t.addr, pkt.src, sandbox_port, pkt.sport, pkt);
        *out = entry(
            pkt.src,
            t.addr,
            pkt.sport,
            sandbox_port,
            FlowKind::RedirectForward,
            now,
        );
        return insert_pair(&s.rev_key, &s.rev, &s.fwd_key, out, false);
    }
    // full-nat: (A:a → H:h) becomes (N:p → S:s) with a source port p unique for (N, S:s).
    let nat = if pkt.family == family::V4 {
        let a = cfg.snat_v4;
        [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    } else {
        cfg.snat_v6
    };
    let (min, max) = (u32::from(cfg.nat_port_min), u32::from(cfg.nat_port_max));
    if min == 0 || max < min {
        return false;
    }
    let span = max - min + 1;
    // Start where the attacker's port and the clock point, so flows spread over the range.
    // (`checked_rem`: a plain `%` keeps a division-by-zero panic path the verifier rejects.)
    let mut offset = (u32::from(pkt.sport) ^ (now as u32))
        .checked_rem(span)
        .unwrap_or(0);
    s.rev_key = key(t.addr, nat, sandbox_port, 0, pkt);
    *out = entry(nat, t.addr, 0, sandbox_port, FlowKind::RedirectForward, now);
    for _ in 0..NAT_PORT_TRIES {
        let port = (min + offset) as u16;
        s.rev_key.dport = port;
        out.sport = port;
        if insert_pair(&s.rev_key, &s.rev, &s.fwd_key, out, true) {
            return true;
        }
        offset = if offset + 1 >= span { 0 } else { offset + 1 };
    }
    false
}

/// Creates the entry pair of a reflected flow: (A:a → H:P) becomes (H:a → A:P), and the
/// attacker's own answer (A:P → H:a) becomes (H:P → A:a). Ports keep their values, so the two
/// connections splice into one.
#[inline(never)]
fn new_reflect(pkt: &Packet, now: u64, out: &mut FlowEntry) -> bool {
    let Some(s) = scratch() else {
        return false;
    };
    s.rev_key = key(pkt.src, pkt.dst, pkt.dport, pkt.sport, pkt);
    s.rev = entry(
        pkt.dst,
        pkt.src,
        pkt.dport,
        pkt.sport,
        FlowKind::ReflectReverse,
        now,
    );
    s.fwd_key = flow_key(pkt);
    *out = entry(
        pkt.dst,
        pkt.src,
        pkt.sport,
        pkt.dport,
        FlowKind::ReflectForward,
        now,
    );
    insert_pair(&s.rev_key, &s.rev, &s.fwd_key, out, false)
}

/// Reports a new flow to userspace; a full ring buffer loses the event, never the packet.
#[inline(never)]
fn report(pkt: &Packet, fwd: &FlowEntry, model: u8, now: u64) {
    // Written in place in the ring buffer: an 88-byte event does not fit next to the rest on
    // the 512-byte BPF stack.
    let Some(mut slot) = FLOW_EVENTS.reserve::<FlowEvent>(0) else {
        return;
    };
    // SAFETY: the reserved slot is FlowEvent-sized and exclusively ours until submitted.
    let ev = unsafe { &mut *slot.as_mut_ptr() };
    ev.ts_ns = now;
    ev.attacker = pkt.src;
    ev.orig_dst = pkt.dst;
    ev.target = fwd.dst;
    ev.nat_addr = fwd.src;
    ev.attacker_port = pkt.sport;
    ev.orig_dport = pkt.dport;
    ev.target_port = fwd.dport;
    ev.nat_port = fwd.sport;
    ev.kind = fwd.kind;
    ev.family = pkt.family;
    ev.proto = pkt.proto;
    ev.model = model;
    ev._pad = [0; 4];
    slot.submit(0);
}

/// Offsets of the L4 checksum field and whether a zero there means "no checksum".
#[inline(always)]
fn l4_csum(pkt: &Packet) -> (usize, bool) {
    if pkt.proto == IPPROTO_TCP {
        (pkt.l4_offset + 16, false)
    } else {
        (pkt.l4_offset + 6, pkt.family == family::V4)
    }
}

/// Rewrites the packet's addresses and ports to the entry's, then forwards it: two calls one
/// after the other, so their frames are never on the stack together.
#[inline(always)]
fn apply_and_forward(ctx: &TcContext, pkt: &Packet, e: &FlowEntry) -> Result<i32, ()> {
    if rewrite(ctx, pkt, e) != 0 {
        Stats::get().add(Counter::RewriteError, 1);
        return Ok(TC_ACT_OK);
    }
    Ok(forward(ctx, pkt, &e.src, &e.dst))
}

/// [`try_rewrite_ports`] behind a call boundary (its own stack frame); 0 or a negative errno.
#[inline(never)]
fn rewrite(ctx: &TcContext, pkt: &Packet, e: &FlowEntry) -> i64 {
    match try_rewrite_ports(ctx, pkt, e) {
        Ok(()) => 0,
        Err(e) => e.min(-1),
    }
}

/// Rewrites addresses and ports of a TCP/UDP packet, fixing every checksum with the helpers.
#[inline(always)]
fn try_rewrite_ports(ctx: &TcContext, pkt: &Packet, e: &FlowEntry) -> Result<(), i64> {
    let (csum_off, zero_means_none) = l4_csum(pkt);
    // UDP over IPv4 with checksum 0 carries none (RFC 768): leave it at 0.
    let l4_active = if zero_means_none {
        ctx.load::<u16>(csum_off)? != 0
    } else {
        true
    };
    let mangled = if zero_means_none {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let l3 = pkt.l3_offset;
    if pkt.family == family::V4 {
        for (field, old, new) in [(12usize, &pkt.src, &e.src), (16usize, &pkt.dst, &e.dst)] {
            let (from, to) = (raw4(old), raw4(new));
            if from == to {
                continue;
            }
            if l4_active {
                ctx.l4_csum_replace(
                    csum_off,
                    from,
                    to,
                    u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
                )?;
            }
            ctx.l3_csum_replace(l3 + 10, from, to, 4)?;
            ctx.store(l3 + field, &[new[0], new[1], new[2], new[3]], 0)?;
        }
    } else {
        for (field, old, new) in [(8usize, &pkt.src, &e.src), (24usize, &pkt.dst, &e.dst)] {
            if old == new {
                continue;
            }
            let diff = diff16(old, new)?;
            ctx.l4_csum_replace(csum_off, 0, diff, u64::from(BPF_F_PSEUDO_HDR) | BPF_F_IPV6)?;
            ctx.store(l3 + field, new, 0)?;
        }
    }
    for (field, old, new) in [(0usize, pkt.sport, e.sport), (2usize, pkt.dport, e.dport)] {
        if old == new {
            continue;
        }
        if l4_active {
            ctx.l4_csum_replace(csum_off, raw_port(old), raw_port(new), mangled | 2)?;
        }
        ctx.store(pkt.l4_offset + field, &new.to_be_bytes(), 0)?;
    }
    Ok(())
}

/// A 16-byte address as four network-order words, without indexing that could panic.
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Sends a rewritten packet toward its new destination: a FIB lookup from the ingress
/// interface, then a redirect to the egress interface (with the neighbour resolved by the
/// kernel when the FIB has none cached). Anything else goes to the stack, which routes it.
#[inline(never)]
pub fn forward(ctx: &TcContext, pkt: &Packet, src: &[u8; 16], dst: &[u8; 16]) -> i32 {
    let (fam, proto) = (pkt.family, pkt.proto);
    let mut stats = Stats::get();
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions of them).
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    // SAFETY: `skb` points at the program's __sk_buff for the whole run.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    p.ifindex = ifindex;
    p.l4_protocol = proto;
    p.__bindgen_anon_1.tot_len = 0;
    if fam == family::V4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes([src[0], src[1], src[2], src[3]]);
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([dst[0], dst[1], dst[2], dst[3]]);
    } else {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = words(src);
        p.__bindgen_anon_4.ipv6_dst = words(dst);
    }
    // SAFETY: `p` is a valid, writable bpf_fib_lookup of the size passed.
    let rc = unsafe { fib_lookup(ctx.as_ptr(), &mut p, size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        if ctx.store(0, &p.dmac, 0).is_err() || ctx.store(6, &p.smac, 0).is_err() {
            stats.add(Counter::RewriteError, 1);
            return TC_ACT_OK;
        }
        // SAFETY: a plain helper call.
        return unsafe { bpf_redirect(p.ifindex, 0) } as i32;
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
        // SAFETY: NULL params: the kernel resolves the neighbour of the packet's destination.
        let r = unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) };
        if r == i64::from(TC_ACT_REDIRECT) {
            return TC_ACT_REDIRECT;
        }
    }
    stats.add(Counter::FibFallback, 1);
    TC_ACT_OK
}
