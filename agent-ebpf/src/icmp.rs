//! ICMP and ICMPv6 errors about rewritten flows.
//!
//! An error quotes the header of the packet that caused it. When the sandbox (or a router on
//! the way) reports on a redirected flow, that quote holds the sandbox's address: it must be
//! rewritten like the flow itself, or the attacker learns where it really is. The quoted
//! header, swapped, is the key of the flow's entry for the direction the error travels, so the
//! same table serves (Cilium learned the same the hard way: PRs #25051, #26453).
//!
//! The outer header, the quoted addresses and ports, the quoted IPv4 header checksum and the
//! ICMP checksum are all fixed. The quoted TCP/UDP checksum is left as it was: nobody verifies
//! it, and the quote is often cut short before it.

use agent_common::{Counter, FlowEntry, FlowKey, family};
use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_OK},
    programs::TcContext,
};

use crate::{
    csum::{BPF_F_IPV6, diff16, raw_port, raw4},
    decide::Stats,
    maps::{FLOWS, scratch},
    nat::forward,
    parse::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Packet},
};

/// Whether the packet is an ICMP error that quotes another packet.
#[inline(always)]
pub fn is_error(pkt: &Packet) -> bool {
    if pkt.l4 != crate::parse::L4::Parsed || pkt.fragment {
        return false;
    }
    match (pkt.family, pkt.proto) {
        // Destination unreachable, time exceeded, parameter problem (RFC 792).
        (family::V4, IPPROTO_ICMP) => matches!(pkt.icmp_type, 3 | 11 | 12),
        // Destination unreachable, packet too big, time exceeded, parameter problem (RFC 4443).
        (family::V6, IPPROTO_ICMPV6) => matches!(pkt.icmp_type, 1..=4),
        _ => false,
    }
}

/// 16-byte address from 4 IPv4 bytes.
#[inline(always)]
fn v4(b: [u8; 4]) -> [u8; 16] {
    [b[0], b[1], b[2], b[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// Rewrites an ICMP error about a rewritten flow and forwards it; other errors pass.
#[inline(never)]
pub fn rewrite_error(ctx: &TcContext, pkt: &Packet) -> i32 {
    try_forward_error(ctx, pkt).unwrap_or(TC_ACT_OK)
}

#[inline(always)]
fn try_forward_error(ctx: &TcContext, pkt: &Packet) -> Result<i32, ()> {
    match rewrite_quoted(ctx, pkt) {
        1 => {}
        0 => return Ok(TC_ACT_OK),
        _ => {
            Stats::get().add(Counter::RewriteError, 1);
            return Ok(TC_ACT_OK);
        }
    }
    Stats::get().add(Counter::IcmpRewritten, 1);
    // Re-read the rewritten outer addresses for the FIB lookup.
    let l3 = pkt.l3_offset;
    let s = scratch().ok_or(())?;
    if pkt.family == family::V4 {
        s.src = v4(ctx.load(l3 + 12).map_err(|_| ())?);
        s.dst = v4(ctx.load(l3 + 16).map_err(|_| ())?);
    } else {
        s.src = ctx.load(l3 + 8).map_err(|_| ())?;
        s.dst = ctx.load(l3 + 24).map_err(|_| ())?;
    }
    Ok(forward(ctx, pkt, &s.src, &s.dst))
}

/// 1 rewritten, 0 not about a rewritten flow, negative on a helper failure.
#[inline(always)]
fn rewrite_quoted(ctx: &TcContext, pkt: &Packet) -> i64 {
    match try_rewrite_error(ctx, pkt) {
        Ok(Some(())) => 1,
        Ok(None) => 0,
        Err(e) => e.min(-1),
    }
}

#[inline(always)]
fn try_rewrite_error(ctx: &TcContext, pkt: &Packet) -> Result<Option<()>, i64> {
    if pkt.family == family::V4 {
        match quoted_v4(ctx, pkt) {
            0 => Ok(None),
            1 => Ok(Some(())),
            e => Err(e),
        }
    } else {
        match quoted_v6(ctx, pkt) {
            0 => Ok(None),
            1 => Ok(Some(())),
            e => Err(e),
        }
    }
}

/// The flow entry for an error quoting a TCP/UDP packet `in_src:in_sport → in_dst:in_dport`:
/// packets of that flow travelling the way the error travels go the other way round, and that
/// is the key of the entry to apply.
#[inline(always)]
fn entry_for(pkt: &Packet, q: &Quote) -> Option<&'static FlowEntry> {
    let key = FlowKey {
        src: q.dst,
        dst: q.src,
        sport: q.dport,
        dport: q.sport,
        proto: q.proto,
        family: pkt.family,
        _pad: [0; 2],
    };
    // SAFETY: a reference into an LRU map value, valid for the program run (no 48-byte copy).
    unsafe { FLOWS.get(key) }
}

/// The quoted packet's addresses, ports and where its transport header starts.
struct Quote {
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    proto: u8,
    l4: usize,
}

#[inline(always)]
fn ports(ctx: &TcContext, q: &mut Quote) -> Result<bool, i64> {
    if q.proto != IPPROTO_TCP && q.proto != IPPROTO_UDP || q.l4 > crate::parse::MAX_L4_OFFSET {
        return Ok(false);
    }
    let p: [u8; 4] = ctx.load(q.l4)?;
    q.sport = u16::from_be_bytes([p[0], p[1]]);
    q.dport = u16::from_be_bytes([p[2], p[3]]);
    Ok(true)
}

#[inline(always)]
fn rewrite_quoted_ports(
    ctx: &TcContext,
    q: &Quote,
    e: &FlowEntry,
    icmp_csum: usize,
) -> Result<(), i64> {
    for (field, old, new) in [(0usize, q.sport, e.dport), (2usize, q.dport, e.sport)] {
        if old == new {
            continue;
        }
        ctx.l4_csum_replace(icmp_csum, raw_port(old), raw_port(new), 2)?;
        ctx.store(q.l4 + field, &new.to_be_bytes(), 0)?;
    }
    Ok(())
}

/// IPv4 error: 1 rewritten, 0 not about a rewritten flow, negative on a helper failure.
#[inline(never)]
fn quoted_v4(ctx: &TcContext, pkt: &Packet) -> i64 {
    match try_quoted_v4(ctx, pkt) {
        Ok(true) => 1,
        Ok(false) => 0,
        Err(e) => e.min(-1),
    }
}

#[inline(always)]
fn try_quoted_v4(ctx: &TcContext, pkt: &Packet) -> Result<bool, i64> {
    let icmp_csum = pkt.l4_offset + 2;
    let inner = pkt.l4_offset + 8;
    let l3 = pkt.l3_offset;
    let h: [u8; 20] = ctx.load(inner)?;
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Ok(false);
    }
    let mut q = Quote {
        src: v4([h[12], h[13], h[14], h[15]]),
        dst: v4([h[16], h[17], h[18], h[19]]),
        sport: 0,
        dport: 0,
        proto: h[9],
        l4: inner + ihl,
    };
    if !ports(ctx, &mut q)? {
        return Ok(false);
    }
    let Some(e) = entry_for(pkt, &q) else {
        return Ok(false);
    };
    let v = raw4;
    // Outer: the error's sender, if it is the flow's peer, becomes the address it stands for;
    // the receiver becomes the flow's real endpoint. ICMPv4 has no pseudo-header.
    if pkt.src == q.dst && pkt.src != e.src {
        ctx.l3_csum_replace(l3 + 10, v(&pkt.src), v(&e.src), 4)?;
        ctx.store(l3 + 12, &[e.src[0], e.src[1], e.src[2], e.src[3]], 0)?;
    }
    if pkt.dst != e.dst {
        ctx.l3_csum_replace(l3 + 10, v(&pkt.dst), v(&e.dst), 4)?;
        ctx.store(l3 + 16, &[e.dst[0], e.dst[1], e.dst[2], e.dst[3]], 0)?;
    }
    // Quoted header: source ↔ the flow's destination, destination ↔ the flow's source. Its
    // own checksum changes, and the ICMP checksum covers both the addresses and that field.
    let old_csum: u16 = ctx.load(inner + 10)?;
    for (field, old, new) in [(12usize, &q.src, &e.dst), (16usize, &q.dst, &e.src)] {
        if old == new {
            continue;
        }
        let (from, to) = (v(old), v(new));
        ctx.l3_csum_replace(inner + 10, from, to, 4)?;
        ctx.l4_csum_replace(icmp_csum, from, to, 4)?;
        ctx.store(inner + field, &[new[0], new[1], new[2], new[3]], 0)?;
    }
    let new_csum: u16 = ctx.load(inner + 10)?;
    if old_csum != new_csum {
        ctx.l4_csum_replace(icmp_csum, u64::from(old_csum), u64::from(new_csum), 2)?;
    }
    rewrite_quoted_ports(ctx, &q, e, icmp_csum)?;
    Ok(true)
}

/// IPv6 error: 1 rewritten, 0 not about a rewritten flow, negative on a helper failure.
#[inline(never)]
fn quoted_v6(ctx: &TcContext, pkt: &Packet) -> i64 {
    match try_quoted_v6(ctx, pkt) {
        Ok(true) => 1,
        Ok(false) => 0,
        Err(e) => e.min(-1),
    }
}

#[inline(always)]
fn try_quoted_v6(ctx: &TcContext, pkt: &Packet) -> Result<bool, i64> {
    let icmp_csum = pkt.l4_offset + 2;
    let inner = pkt.l4_offset + 8;
    let l3 = pkt.l3_offset;
    let next: u8 = ctx.load(inner + 6)?;
    let mut q = Quote {
        src: ctx.load(inner + 8)?,
        dst: ctx.load(inner + 24)?,
        sport: 0,
        dport: 0,
        proto: next,
        l4: inner + 40,
    };
    if !ports(ctx, &mut q)? {
        return Ok(false);
    }
    let Some(e) = entry_for(pkt, &q) else {
        return Ok(false);
    };
    // ICMPv6's checksum covers the pseudo-header: outer address changes count there too.
    if pkt.src == q.dst && pkt.src != e.src {
        let d = diff16(&pkt.src, &e.src)?;
        ctx.l4_csum_replace(icmp_csum, 0, d, u64::from(BPF_F_PSEUDO_HDR) | BPF_F_IPV6)?;
        ctx.store(l3 + 8, &e.src, 0)?;
    }
    if pkt.dst != e.dst {
        let d = diff16(&pkt.dst, &e.dst)?;
        ctx.l4_csum_replace(icmp_csum, 0, d, u64::from(BPF_F_PSEUDO_HDR) | BPF_F_IPV6)?;
        ctx.store(l3 + 24, &e.dst, 0)?;
    }
    for (field, old, new) in [(8usize, &q.src, &e.dst), (24usize, &q.dst, &e.src)] {
        if old == new {
            continue;
        }
        let d = diff16(old, new)?;
        ctx.l4_csum_replace(icmp_csum, 0, d, 0)?;
        ctx.store(inner + field, new, 0)?;
    }
    rewrite_quoted_ports(ctx, &q, e, icmp_csum)?;
    Ok(true)
}
