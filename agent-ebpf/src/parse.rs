//! Header parsing, shared by the XDP and TC programs: Ethernet with up to two VLAN tags, IPv4
//! with options and fragments, IPv6 with a bounded walk over extension headers, then TCP, UDP,
//! ICMP and ICMPv6.
//!
//! Every read goes through [`ptr_at`], which checks `start + offset + size <= end` right before
//! the pointer is formed: that is the form the verifier can follow. Offsets are clamped to
//! [`MAX_L3_OFFSET`] / [`MAX_L4_OFFSET`] so the verifier also knows their range.
//!
//! Parsing never decides anything: it reports what it found (or could not find), and the
//! decision fails open on anything it does not understand.

use core::mem::size_of;

use agent_common::family;
use aya_ebpf::programs::{TcContext, XdpContext};

/// EtherTypes we look at (host order).
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// IP protocol numbers (IANA).
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_AH: u8 = 51;
const IPPROTO_NONE: u8 = 59;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_MH: u8 = 135;

/// TCP flags (RFC 9293 §3.1).
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
/// At most two tags: 802.1ad outer + 802.1Q inner (QinQ), as xdp-tutorial's `VLAN_MAX_DEPTH`.
const VLAN_MAX_DEPTH: usize = 2;
pub const IPV4_MIN_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
/// Extension headers walked before we give up on finding the transport header. RFC 8200 §4.1
/// recommends an order with at most six before the upper layer; eight leaves room for repeats.
const IPV6_EXT_MAX: usize = 8;
/// Where the network header can start: Ethernet plus two tags.
const MAX_L3_OFFSET: usize = ETH_HLEN + VLAN_MAX_DEPTH * VLAN_HLEN;
/// Bound on where a transport header can start; deeper headers are reported as unparsed.
pub const MAX_L4_OFFSET: usize = 1024;

/// Linear packet memory that a program may read directly: XDP frames and the linear part of
/// an skb. The TC program runs after generic XDP, which linearises the skb, or after native
/// XDP, whose skb holds the headers in its linear part.
pub trait Frame {
    /// Start of packet data.
    fn start(&self) -> usize;
    /// End of the directly readable data.
    fn end(&self) -> usize;
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

/// Bounds-checked pointer to a `T` at `offset` bytes into the packet.
#[inline(always)]
pub fn ptr_at<T, F: Frame>(ctx: &F, offset: usize) -> Option<*const T> {
    let start = ctx.start();
    let end = ctx.end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Reads a `T` at `offset`, bounds-checked.
#[inline(always)]
pub fn read<T: Copy, F: Frame>(ctx: &F, offset: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `offset` are inside the packet;
    // `read_unaligned` because packet data has no alignment guarantee.
    ptr_at::<T, F>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
fn read_be16<F: Frame>(ctx: &F, offset: usize) -> Option<u16> {
    read::<[u8; 2], F>(ctx, offset).map(u16::from_be_bytes)
}

/// Whether the transport header is there to read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// TCP, UDP, ICMP or ICMPv6 header present and long enough, at `l4_offset`.
    Parsed,
    /// A protocol we do not parse (GRE, SCTP, ESP...), or no transport header at all.
    Other,
    /// A non-first fragment: the transport header is in another packet.
    LaterFragment,
    /// A TCP/UDP/ICMP header that is truncated or malformed, or extension headers past our bound.
    Malformed,
}

/// What the parser found in an IP packet.
#[derive(Clone, Copy)]
pub struct Packet {
    /// [`family`] tag.
    pub family: u8,
    /// Source address (IPv4 in the first 4 bytes, the rest zero).
    pub src: [u8; 16],
    /// Destination address (same layout).
    pub dst: [u8; 16],
    /// Offset of the IP header.
    pub l3_offset: usize,
    /// Transport protocol number (after IPv6 extension headers).
    pub proto: u8,
    /// Whether this is an IP fragment (first or later).
    pub fragment: bool,
    pub l4: L4,
    /// Offset of the transport header, valid when `l4 == L4::Parsed`.
    pub l4_offset: usize,
    /// TCP/UDP ports (host order), zero otherwise.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte, zero otherwise.
    pub tcp_flags: u8,
    /// ICMP/ICMPv6 type, zero otherwise.
    pub icmp_type: u8,
}

impl Packet {
    /// An empty packet for [`parse`] to fill.
    #[inline(always)]
    pub const fn empty() -> Self {
        Packet {
            family: 0,
            src: [0; 16],
            dst: [0; 16],
            l3_offset: 0,
            proto: 0,
            fragment: false,
            l4: L4::Other,
            l4_offset: 0,
            sport: 0,
            dport: 0,
            tcp_flags: 0,
            icmp_type: 0,
        }
    }

    /// The IPv4 source, for IPv4 packets.
    #[inline(always)]
    pub fn src_v4(&self) -> [u8; 4] {
        [self.src[0], self.src[1], self.src[2], self.src[3]]
    }

    /// Whether the packet is TCP or UDP with both ports readable (not a fragment).
    #[inline(always)]
    pub fn has_ports(&self) -> bool {
        self.l4 == L4::Parsed
            && !self.fragment_later()
            && (self.proto == IPPROTO_TCP || self.proto == IPPROTO_UDP)
    }

    #[inline(always)]
    fn fragment_later(&self) -> bool {
        self.l4 == L4::LaterFragment
    }
}

/// Why a frame is not an IP packet we can judge.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NotParsed {
    /// Not IPv4 or IPv6 (ARP, LLDP, a third VLAN tag...).
    NotIp,
    /// Truncated or malformed before the source address could be read.
    Malformed,
}

/// Parses the frame down to the addresses and, where there is one, the transport header,
/// filling `pkt` in place.
///
/// Always inlined: packet pointers cannot cross a BPF-to-BPF call (the callee would see
/// `data`/`data_end` as 32-bit context loads it may not do arithmetic on). Header bytes are
/// read straight from packet memory, field by field, rather than copied to the stack: the
/// 512-byte BPF stack is shared with everything the programs call.
#[inline(always)]
pub fn parse<F: Frame>(ctx: &F, pkt: &mut Packet) -> Result<(), NotParsed> {
    let mut ether_type = read_be16(ctx, 12).ok_or(NotParsed::Malformed)?;
    let mut l3 = ETH_HLEN;
    for _ in 0..VLAN_MAX_DEPTH {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        // The tag is TCI (2 bytes) then the encapsulated EtherType (2 bytes).
        ether_type = read_be16(ctx, l3 + 2).ok_or(NotParsed::Malformed)?;
        l3 += VLAN_HLEN;
    }
    if l3 > MAX_L3_OFFSET {
        return Err(NotParsed::Malformed);
    }
    pkt.l3_offset = l3;
    match ether_type {
        ETH_P_IP => parse_ipv4(ctx, l3, pkt),
        ETH_P_IPV6 => parse_ipv6(ctx, l3, pkt),
        _ => Err(NotParsed::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4<F: Frame>(ctx: &F, l3: usize, pkt: &mut Packet) -> Result<(), NotParsed> {
    let h = ptr_at::<[u8; IPV4_MIN_HLEN], F>(ctx, l3).ok_or(NotParsed::Malformed)?;
    // SAFETY: `ptr_at` checked the 20 bytes are inside the packet.
    let b = |i: usize| unsafe { (*h)[i] };
    let ihl = usize::from(b(0) & 0x0f) * 4;
    if b(0) >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Err(NotParsed::Malformed);
    }
    pkt.family = family::V4;
    pkt.src = [
        b(12),
        b(13),
        b(14),
        b(15),
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    pkt.dst = [
        b(16),
        b(17),
        b(18),
        b(19),
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    pkt.proto = b(9);
    let frag = u16::from_be_bytes([b(6), b(7)]);
    let frag_offset = frag & 0x1fff;
    pkt.fragment = frag & 0x2000 != 0 || frag_offset != 0;
    let l4_offset = l3 + ihl;
    // The options must be inside the packet, or the header is truncated.
    if ctx.start() + l4_offset > ctx.end() {
        return Err(NotParsed::Malformed);
    }
    pkt.l4_offset = l4_offset;
    if frag_offset != 0 {
        pkt.l4 = L4::LaterFragment;
    } else {
        check_l4(ctx, pkt);
    }
    Ok(())
}

#[inline(always)]
fn parse_ipv6<F: Frame>(ctx: &F, l3: usize, pkt: &mut Packet) -> Result<(), NotParsed> {
    let h = ptr_at::<[u8; IPV6_HLEN], F>(ctx, l3).ok_or(NotParsed::Malformed)?;
    // SAFETY: `ptr_at` checked the 40 bytes are inside the packet.
    let hdr = unsafe { &*h };
    if hdr[0] >> 4 != 6 {
        return Err(NotParsed::Malformed);
    }
    pkt.family = family::V6;
    #[expect(
        clippy::manual_memcpy,
        reason = "copy_from_slice keeps a length-mismatch panic path that the verifier rejects"
    )]
    for i in 0..16 {
        pkt.src[i] = hdr[8 + i];
        pkt.dst[i] = hdr[24 + i];
    }
    let mut next = hdr[6];
    let mut off = l3 + IPV6_HLEN;
    pkt.l4 = L4::Malformed;
    // A bounded walk (RFC 8200 §4). Each step reads the two bytes every extension header starts
    // with: Next Header and Hdr Ext Len.
    for _ in 0..IPV6_EXT_MAX {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_MH => {
                let Some(ext) = read::<[u8; 2], F>(ctx, off) else {
                    break;
                };
                next = ext[0];
                off += (usize::from(ext[1]) + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                // Fragment header (RFC 8200 §4.5): 8 bytes, offset in the top 13 bits of bytes 2-3.
                let Some(ext) = read::<[u8; 4], F>(ctx, off) else {
                    break;
                };
                pkt.fragment = true;
                next = ext[0];
                off += 8;
                if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                    pkt.l4 = L4::LaterFragment;
                    break;
                }
            }
            IPPROTO_AH => {
                // AH length is in 4-octet units minus 2 (RFC 4302 §2.2).
                let Some(ext) = read::<[u8; 2], F>(ctx, off) else {
                    break;
                };
                next = ext[0];
                off += (usize::from(ext[1]) + 2) * 4;
            }
            IPPROTO_ESP | IPPROTO_NONE => {
                pkt.l4 = L4::Other;
                break;
            }
            proto => {
                pkt.proto = proto;
                pkt.l4_offset = off;
                check_l4(ctx, pkt);
                return Ok(());
            }
        }
        if off > MAX_L4_OFFSET {
            pkt.l4 = L4::Malformed;
            break;
        }
    }
    pkt.proto = next;
    pkt.l4_offset = off;
    Ok(())
}

/// Checks that a transport header we parse is present and well-formed at `pkt.l4_offset`,
/// and reads its ports, flags or type through the same bounds check (a second check on the same
/// offset is one the verifier may not follow after LLVM rewrites it).
#[inline(always)]
fn check_l4<F: Frame>(ctx: &F, pkt: &mut Packet) {
    let off = pkt.l4_offset;
    pkt.l4 = L4::Malformed;
    if off > MAX_L4_OFFSET {
        return;
    }
    match pkt.proto {
        IPPROTO_TCP => {
            let Some(h) = ptr_at::<[u8; 20], F>(ctx, off) else {
                return;
            };
            // SAFETY: `ptr_at` checked the 20 bytes are inside the packet.
            let h = unsafe { &*h };
            // Data offset below 5 words is malformed (RFC 9293 §3.1).
            if h[12] >> 4 >= 5 {
                pkt.l4 = L4::Parsed;
                pkt.sport = u16::from_be_bytes([h[0], h[1]]);
                pkt.dport = u16::from_be_bytes([h[2], h[3]]);
                pkt.tcp_flags = h[13];
            }
        }
        IPPROTO_UDP => {
            let Some(h) = ptr_at::<[u8; 8], F>(ctx, off) else {
                return;
            };
            // SAFETY: as above, 8 bytes.
            let h = unsafe { &*h };
            pkt.l4 = L4::Parsed;
            pkt.sport = u16::from_be_bytes([h[0], h[1]]);
            pkt.dport = u16::from_be_bytes([h[2], h[3]]);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let Some(h) = ptr_at::<[u8; 8], F>(ctx, off) else {
                return;
            };
            pkt.l4 = L4::Parsed;
            // SAFETY: as above, 8 bytes.
            pkt.icmp_type = unsafe { (*h)[0] };
        }
        _ => pkt.l4 = L4::Other,
    }
}
