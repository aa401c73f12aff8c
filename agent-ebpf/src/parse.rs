//! Header parsing: Ethernet with up to two VLAN tags, IPv4 with options and fragments, IPv6 with a
//! bounded walk over extension headers, then TCP, UDP, ICMP and ICMPv6.
//!
//! Every read goes through [`ptr_at`], which checks `start + offset + size <= end` right before
//! the pointer is formed: that is the form the verifier can follow. Offsets are clamped to
//! [`MAX_L3_OFFSET`] / [`MAX_L4_OFFSET`] so the verifier also knows their range.
//!
//! Parsing never decides anything: it reports what it found (or could not find) and the decision
//! in `decide.rs` fails open on anything it does not understand.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

/// EtherTypes we look at (host order).
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;

/// IP protocol numbers (RFC 790, IANA).
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

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
/// At most two tags: 802.1ad outer + 802.1Q inner (QinQ), as xdp-tutorial's `VLAN_MAX_DEPTH`.
const VLAN_MAX_DEPTH: usize = 2;
const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
/// Extension headers walked before we give up on finding the transport header. RFC 8200 §4.1
/// recommends an order with at most six before the upper layer; eight leaves room for repeats.
const IPV6_EXT_MAX: usize = 8;
/// Where the network header can start: Ethernet plus two tags.
const MAX_L3_OFFSET: usize = ETH_HLEN + VLAN_MAX_DEPTH * VLAN_HLEN;
/// Bound on where a transport header can start; deeper headers are reported as unparsed.
const MAX_L4_OFFSET: usize = 1024;

/// Bounds-checked pointer to a `T` at `offset` bytes into the packet.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `offset` are inside the packet;
    // `read_unaligned` because packet data has no alignment guarantee.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
fn read_be16(ctx: &XdpContext, offset: usize) -> Option<u16> {
    read::<[u8; 2]>(ctx, offset).map(u16::from_be_bytes)
}

/// The source address of a packet.
#[derive(Clone, Copy)]
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
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
    pub src: Source,
    /// Transport protocol number (after IPv6 extension headers).
    #[expect(
        dead_code,
        reason = "read by the redirect rewrite, which needs the ports"
    )]
    pub proto: u8,
    /// Whether this is an IP fragment (first or later).
    pub fragment: bool,
    pub l4: L4,
    /// Offset of the transport header, valid when `l4 == L4::Parsed`.
    #[expect(
        dead_code,
        reason = "read by the redirect rewrite, which needs the ports"
    )]
    pub l4_offset: usize,
}

/// Why a frame is not an IP packet we can judge.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NotParsed {
    /// Not IPv4 or IPv6 (ARP, LLDP, a third VLAN tag...).
    NotIp,
    /// Truncated or malformed before the source address could be read.
    Malformed,
}

/// Parses the frame in `ctx` down to the source address and, where there is one, the transport
/// header.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, NotParsed> {
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
    match ether_type {
        ETH_P_IP => parse_ipv4(ctx, l3),
        ETH_P_IPV6 => parse_ipv6(ctx, l3),
        _ => Err(NotParsed::NotIp),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3: usize) -> Result<Packet, NotParsed> {
    let hdr: [u8; IPV4_MIN_HLEN] = read(ctx, l3).ok_or(NotParsed::Malformed)?;
    let version = hdr[0] >> 4;
    let ihl = usize::from(hdr[0] & 0x0f) * 4;
    if version != 4 || ihl < IPV4_MIN_HLEN {
        return Err(NotParsed::Malformed);
    }
    let src = Source::V4([hdr[12], hdr[13], hdr[14], hdr[15]]);
    let proto = hdr[9];
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
    let more_fragments = frag & 0x2000 != 0;
    let frag_offset = frag & 0x1fff;
    let fragment = more_fragments || frag_offset != 0;
    let l4_offset = l3 + ihl;
    // The options must be inside the packet, or the header is truncated.
    if ctx.data() + l4_offset > ctx.data_end() {
        return Err(NotParsed::Malformed);
    }
    let l4 = if frag_offset != 0 {
        L4::LaterFragment
    } else {
        check_l4(ctx, proto, l4_offset)
    };
    Ok(Packet {
        src,
        proto,
        fragment,
        l4,
        l4_offset,
    })
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3: usize) -> Result<Packet, NotParsed> {
    let hdr: [u8; 8] = read(ctx, l3).ok_or(NotParsed::Malformed)?;
    if hdr[0] >> 4 != 6 {
        return Err(NotParsed::Malformed);
    }
    let src: [u8; 16] = read(ctx, l3 + 8).ok_or(NotParsed::Malformed)?;
    // The destination must be there too: a 40-byte header is the minimum.
    if ctx.data() + l3 + IPV6_HLEN > ctx.data_end() {
        return Err(NotParsed::Malformed);
    }
    let src = Source::V6(src);
    let mut next = hdr[6];
    let mut off = l3 + IPV6_HLEN;
    let mut fragment = false;
    let mut l4 = L4::Malformed;
    // A bounded walk (RFC 8200 §4). Each step reads the two bytes every extension header starts
    // with: Next Header and Hdr Ext Len.
    for _ in 0..IPV6_EXT_MAX {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_MH => {
                let Some(ext) = read::<[u8; 2]>(ctx, off) else {
                    l4 = L4::Malformed;
                    break;
                };
                next = ext[0];
                off += (usize::from(ext[1]) + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                // Fragment header (RFC 8200 §4.5): 8 bytes, offset in the top 13 bits of bytes 2-3.
                let Some(ext) = read::<[u8; 8]>(ctx, off) else {
                    l4 = L4::Malformed;
                    break;
                };
                fragment = true;
                next = ext[0];
                off += 8;
                if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                    l4 = L4::LaterFragment;
                    break;
                }
            }
            IPPROTO_AH => {
                // AH length is in 4-octet units minus 2 (RFC 4302 §2.2).
                let Some(ext) = read::<[u8; 2]>(ctx, off) else {
                    l4 = L4::Malformed;
                    break;
                };
                next = ext[0];
                off += (usize::from(ext[1]) + 2) * 4;
            }
            IPPROTO_ESP | IPPROTO_NONE => {
                l4 = L4::Other;
                break;
            }
            proto => {
                l4 = if off > MAX_L4_OFFSET {
                    L4::Malformed
                } else {
                    check_l4(ctx, proto, off)
                };
                break;
            }
        }
        if off > MAX_L4_OFFSET {
            l4 = L4::Malformed;
            break;
        }
    }
    Ok(Packet {
        src,
        proto: next,
        fragment,
        l4,
        l4_offset: off,
    })
}

/// Checks that a transport header we parse is present and well-formed at `off`.
#[inline(always)]
fn check_l4(ctx: &XdpContext, proto: u8, off: usize) -> L4 {
    if off > MAX_L4_OFFSET {
        return L4::Malformed;
    }
    match proto {
        IPPROTO_TCP => match read::<[u8; 20]>(ctx, off) {
            // Data offset below 5 words is malformed (RFC 9293 §3.1).
            Some(tcp) if tcp[12] >> 4 >= 5 => L4::Parsed,
            _ => L4::Malformed,
        },
        IPPROTO_UDP => match read::<[u8; 8]>(ctx, off) {
            Some(_) => L4::Parsed,
            None => L4::Malformed,
        },
        IPPROTO_ICMP | IPPROTO_ICMPV6 => match read::<[u8; 8]>(ctx, off) {
            Some(_) => L4::Parsed,
            None => L4::Malformed,
        },
        _ => L4::Other,
    }
}
