//! Packet builders for fixtures and benchmarks: Ethernet with VLAN tags, IPv4 (options,
//! fragments), IPv6 (extension headers), TCP, UDP, ICMP, ICMPv6, with correct checksums, plus
//! checksum verification from scratch (RFC 1071) for tests that compare rewritten packets.
//!
//! Written by hand rather than with a packet crate: fixtures need malformed and truncated packets
//! that such crates refuse to build, and the builders are short.

use std::net::{Ipv4Addr, Ipv6Addr};

/// EtherTypes.
pub const ETH_P_IP: u16 = 0x0800;
/// IPv6 EtherType.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// ARP EtherType.
pub const ETH_P_ARP: u16 = 0x0806;
/// 802.1Q customer tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// 802.1ad service tag (QinQ outer).
pub const ETH_P_8021AD: u16 = 0x88a8;

/// IP protocol numbers.
pub const TCP: u8 = 6;
/// UDP.
pub const UDP: u8 = 17;
/// ICMP.
pub const ICMP: u8 = 1;
/// ICMPv6.
pub const ICMPV6: u8 = 58;
/// GRE (a protocol the data path does not parse).
pub const GRE: u8 = 47;
/// IPv6 Hop-by-Hop Options.
pub const HOPOPTS: u8 = 0;
/// IPv6 Routing.
pub const ROUTING: u8 = 43;
/// IPv6 Fragment.
pub const FRAGMENT: u8 = 44;
/// IPv6 Destination Options.
pub const DSTOPTS: u8 = 60;

/// TCP SYN flag.
pub const SYN: u8 = 0x02;
/// TCP ACK flag.
pub const ACK: u8 = 0x10;

/// Fixed MAC addresses: the frames never leave a test run.
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Source MAC.
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Ones'-complement sum of `data` folded to 16 bits, not inverted (RFC 1071).
pub fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

/// The Internet checksum of `data` (inverted sum).
pub fn checksum(data: &[u8]) -> u16 {
    !(sum16(data, 0) as u16)
}

fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    sum16(&p, 0)
}

fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, proto]);
    sum16(&p, 0)
}

/// A transport segment before its checksum is known.
#[derive(Clone, Debug)]
pub struct L4 {
    proto: u8,
    bytes: Vec<u8>,
    /// Offset of the checksum field in `bytes`, if the protocol has one we fill.
    csum_at: Option<usize>,
    /// Whether the checksum covers a pseudo-header (not for ICMPv4).
    pseudo: bool,
}

impl L4 {
    /// A TCP segment with `flags` and a 20-byte header.
    pub fn tcp(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Self {
        let mut b = Vec::with_capacity(20 + payload.len());
        b.extend_from_slice(&sport.to_be_bytes());
        b.extend_from_slice(&dport.to_be_bytes());
        b.extend_from_slice(&0x1000_0000u32.to_be_bytes()); // seq
        b.extend_from_slice(&(if flags & ACK != 0 { 1u32 } else { 0 }).to_be_bytes());
        b.push(5 << 4); // data offset
        b.push(flags);
        b.extend_from_slice(&64240u16.to_be_bytes()); // window
        b.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        b.extend_from_slice(payload);
        Self {
            proto: TCP,
            bytes: b,
            csum_at: Some(16),
            pseudo: true,
        }
    }

    /// A UDP datagram.
    pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Self {
        let mut b = Vec::with_capacity(8 + payload.len());
        b.extend_from_slice(&sport.to_be_bytes());
        b.extend_from_slice(&dport.to_be_bytes());
        b.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(payload);
        Self {
            proto: UDP,
            bytes: b,
            csum_at: Some(6),
            pseudo: true,
        }
    }

    /// An ICMP echo request (IPv4).
    pub fn icmp_echo(id: u16, seq: u16) -> Self {
        let mut b = vec![8, 0, 0, 0];
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(&seq.to_be_bytes());
        b.extend_from_slice(b"mirage-ping-data");
        Self {
            proto: ICMP,
            bytes: b,
            csum_at: Some(2),
            pseudo: false,
        }
    }

    /// An ICMPv6 echo request.
    pub fn icmpv6_echo(id: u16, seq: u16) -> Self {
        let mut b = vec![128, 0, 0, 0];
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(&seq.to_be_bytes());
        b.extend_from_slice(b"mirage-ping-data");
        Self {
            proto: ICMPV6,
            bytes: b,
            csum_at: Some(2),
            pseudo: true,
        }
    }

    /// An ICMP error (IPv4) of `icmp_type`/`code` quoting `quoted` (an IP packet's first bytes).
    pub fn icmp_error(icmp_type: u8, code: u8, quoted: &[u8]) -> Self {
        let mut b = vec![icmp_type, code, 0, 0, 0, 0, 0, 0];
        b.extend_from_slice(quoted);
        Self {
            proto: ICMP,
            bytes: b,
            csum_at: Some(2),
            pseudo: false,
        }
    }

    /// An ICMPv6 error of `icmp_type`/`code` quoting `quoted`.
    pub fn icmpv6_error(icmp_type: u8, code: u8, quoted: &[u8]) -> Self {
        let mut b = vec![icmp_type, code, 0, 0, 0, 0, 0, 0];
        b.extend_from_slice(quoted);
        Self {
            proto: ICMPV6,
            bytes: b,
            csum_at: Some(2),
            pseudo: true,
        }
    }

    /// Raw bytes of another protocol, no checksum filled.
    pub fn raw(proto: u8, bytes: &[u8]) -> Self {
        Self {
            proto,
            bytes: bytes.to_vec(),
            csum_at: None,
            pseudo: false,
        }
    }

    /// Keeps only the first `n` bytes (a truncated header).
    pub fn truncated(mut self, n: usize) -> Self {
        self.bytes.truncate(n);
        self.csum_at = None;
        self
    }

    fn finish(mut self, pseudo: u32) -> Vec<u8> {
        if let Some(at) = self.csum_at
            && at + 2 <= self.bytes.len()
        {
            self.bytes[at] = 0;
            self.bytes[at + 1] = 0;
            let acc = if self.pseudo { pseudo } else { 0 };
            let mut c = !(sum16(&self.bytes, acc) as u16);
            if self.proto == UDP && c == 0 {
                c = 0xffff; // RFC 768: a computed zero is sent as all ones.
            }
            self.bytes[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        self.bytes
    }
}

/// IPv4 header options and fragment fields.
#[derive(Clone, Debug, Default)]
pub struct V4Opts {
    /// Option bytes (padded to a multiple of 4 by the builder).
    pub options: Vec<u8>,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
    /// More-fragments flag.
    pub more_fragments: bool,
}

/// An IPv4 packet carrying `l4`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, l4: L4, opts: &V4Opts) -> Vec<u8> {
    let mut options = opts.options.clone();
    while !options.len().is_multiple_of(4) {
        options.push(0); // End of Option List padding.
    }
    let ihl = 20 + options.len();
    let proto = l4.proto;
    // The L4 checksum covers the whole segment; for a non-first fragment the header is elsewhere.
    let payload = if opts.frag_offset == 0 {
        let len = l4.bytes.len();
        l4.finish(pseudo_v4(src, dst, proto, len))
    } else {
        l4.bytes
    };
    let total = ihl + payload.len();
    let mut h = Vec::with_capacity(total);
    h.push(0x40 | (ihl / 4) as u8);
    h.push(0);
    h.extend_from_slice(&(total as u16).to_be_bytes());
    h.extend_from_slice(&0x4d52u16.to_be_bytes()); // identification
    let mut frag = opts.frag_offset & 0x1fff;
    if opts.more_fragments {
        frag |= 0x2000;
    }
    h.extend_from_slice(&frag.to_be_bytes());
    h.push(64);
    h.push(proto);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&options);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(&payload);
    h
}

/// An IPv6 extension header: its type and body (without the Next Header byte; the builder adds
/// it and, for options and routing headers, the Hdr Ext Len byte).
#[derive(Clone, Debug)]
pub enum Ext {
    /// Hop-by-Hop Options with `n` 8-byte units of PadN.
    HopByHop(usize),
    /// Destination Options with `n` 8-byte units.
    DstOpts(usize),
    /// Routing header (type 4, segments left 0), `n` 8-byte units.
    Routing(usize),
    /// Fragment header with an offset (8-byte units) and the M flag.
    Fragment {
        /// Offset in 8-byte units.
        offset: u16,
        /// More fragments.
        more: bool,
    },
    /// Raw bytes that claim to be a header of type `proto` (for truncation rows).
    Raw(u8, Vec<u8>),
}

impl Ext {
    fn proto(&self) -> u8 {
        match self {
            Ext::HopByHop(_) => HOPOPTS,
            Ext::DstOpts(_) => DSTOPTS,
            Ext::Routing(_) => ROUTING,
            Ext::Fragment { .. } => FRAGMENT,
            Ext::Raw(p, _) => *p,
        }
    }

    fn encode(&self, next: u8) -> Vec<u8> {
        match self {
            Ext::HopByHop(n) | Ext::DstOpts(n) | Ext::Routing(n) => {
                let len = (n + 1) * 8;
                let mut b = vec![0u8; len];
                b[0] = next;
                b[1] = *n as u8;
                if let Ext::Routing(_) = self {
                    b[2] = 4; // segment routing type, segments left 0
                } else {
                    // One PadN option covering the rest (RFC 8200 §4.2).
                    b[2] = 1;
                    b[3] = (len - 4) as u8;
                }
                b
            }
            Ext::Fragment { offset, more } => {
                let mut b = vec![next, 0];
                let v = (offset << 3) | u16::from(*more);
                b.extend_from_slice(&v.to_be_bytes());
                b.extend_from_slice(&0x4d52_0001u32.to_be_bytes());
                b
            }
            Ext::Raw(_, bytes) => bytes.clone(),
        }
    }
}

/// An IPv6 packet with extension headers `exts` carrying `l4`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, exts: &[Ext], l4: L4) -> Vec<u8> {
    let proto = l4.proto;
    let later_fragment = exts
        .iter()
        .any(|e| matches!(e, Ext::Fragment { offset, .. } if *offset != 0));
    let payload = if later_fragment {
        l4.bytes
    } else {
        let len = l4.bytes.len();
        l4.finish(pseudo_v6(src, dst, proto, len))
    };
    let mut chain = Vec::new();
    for (i, e) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(proto, Ext::proto);
        chain.extend_from_slice(&e.encode(next));
    }
    let first = exts.first().map_or(proto, Ext::proto);
    let plen = chain.len() + payload.len();
    let mut h = Vec::with_capacity(40 + plen);
    h.extend_from_slice(&[0x60, 0, 0, 0]);
    h.extend_from_slice(&(plen as u16).to_be_bytes());
    h.push(first);
    h.push(64);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(&chain);
    h.extend_from_slice(&payload);
    h
}

/// An Ethernet frame with VLAN `tags` (outermost first: (TPID, VID)) around `payload`.
pub fn eth(tags: &[(u16, u16)], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 4 * tags.len() + payload.len());
    f.extend_from_slice(&DST_MAC);
    f.extend_from_slice(&SRC_MAC);
    for (tpid, vid) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    }
    f.extend_from_slice(&ether_type.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An untagged IPv4 frame.
pub fn eth_v4(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Vec<u8> {
    eth(&[], ETH_P_IP, &ipv4(src, dst, l4, &V4Opts::default()))
}

/// An untagged IPv6 frame.
pub fn eth_v6(src: Ipv6Addr, dst: Ipv6Addr, l4: L4) -> Vec<u8> {
    eth(&[], ETH_P_IPV6, &ipv6(src, dst, &[], l4))
}

/// Verifies every checksum of an untagged IPv4/IPv6 frame from scratch: the IPv4 header
/// checksum, and the TCP/UDP/ICMP/ICMPv6 checksum over the segment (and pseudo-header). Returns
/// a description of the first mismatch.
pub fn verify_checksums(frame: &[u8]) -> Result<(), String> {
    let mut off = 12;
    let mut et = u16::from_be_bytes([frame[off], frame[off + 1]]);
    while et == ETH_P_8021Q || et == ETH_P_8021AD {
        off += 4;
        et = u16::from_be_bytes([frame[off], frame[off + 1]]);
    }
    let l3 = off + 2;
    match et {
        ETH_P_IP => {
            let ihl = usize::from(frame[l3] & 0x0f) * 4;
            let hdr = &frame[l3..l3 + ihl];
            if sum16(hdr, 0) != 0xffff {
                return Err("IPv4 header checksum".into());
            }
            let frag = u16::from_be_bytes([hdr[6], hdr[7]]);
            if frag & 0x1fff != 0 {
                return Ok(());
            }
            let total = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
            let seg = &frame[l3 + ihl..l3 + total];
            let src = Ipv4Addr::new(hdr[12], hdr[13], hdr[14], hdr[15]);
            let dst = Ipv4Addr::new(hdr[16], hdr[17], hdr[18], hdr[19]);
            match hdr[9] {
                UDP if seg[6] == 0 && seg[7] == 0 => Ok(()), // no checksum
                TCP | UDP => {
                    if sum16(seg, pseudo_v4(src, dst, hdr[9], seg.len())) == 0xffff {
                        Ok(())
                    } else {
                        Err(format!("IPv4 L4 ({}) checksum", hdr[9]))
                    }
                }
                ICMP => {
                    if sum16(seg, 0) != 0xffff {
                        return Err("ICMP checksum".into());
                    }
                    // An error quotes an IPv4 header whose own checksum must hold too.
                    if matches!(seg[0], 3 | 11 | 12) && seg.len() >= 28 {
                        let q = &seg[8..];
                        let qihl = usize::from(q[0] & 0x0f) * 4;
                        if q.len() >= qihl && sum16(&q[..qihl], 0) != 0xffff {
                            return Err("quoted IPv4 header checksum".into());
                        }
                    }
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        ETH_P_IPV6 => {
            let hdr = &frame[l3..l3 + 40];
            let plen = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
            if hdr[6] != TCP && hdr[6] != UDP && hdr[6] != ICMPV6 {
                return Ok(()); // extension headers: not verified here
            }
            let seg = &frame[l3 + 40..l3 + 40 + plen];
            let mut s = [0u8; 16];
            s.copy_from_slice(&hdr[8..24]);
            let mut d = [0u8; 16];
            d.copy_from_slice(&hdr[24..40]);
            let pseudo = pseudo_v6(Ipv6Addr::from(s), Ipv6Addr::from(d), hdr[6], seg.len());
            if sum16(seg, pseudo) == 0xffff {
                Ok(())
            } else {
                Err(format!("IPv6 L4 ({}) checksum", hdr[6]))
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_packets_verify() {
        let a = Ipv4Addr::new(198, 18, 0, 2);
        let b = Ipv4Addr::new(198, 18, 0, 1);
        let a6: Ipv6Addr = "2001:db8::2".parse().unwrap();
        let b6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        for f in [
            eth_v4(a, b, L4::tcp(40000, 22, SYN, b"")),
            eth_v4(a, b, L4::udp(40000, 53, b"hello")),
            eth_v4(a, b, L4::icmp_echo(1, 1)),
            eth_v6(a6, b6, L4::tcp(40000, 22, SYN, b"x")),
            eth_v6(a6, b6, L4::udp(40000, 53, b"hello")),
            eth_v6(a6, b6, L4::icmpv6_echo(1, 1)),
            eth(
                &[(ETH_P_8021Q, 7)],
                ETH_P_IP,
                &ipv4(a, b, L4::udp(1, 2, b"q"), &V4Opts::default()),
            ),
        ] {
            verify_checksums(&f).unwrap();
        }
    }

    #[test]
    fn detects_a_bad_checksum() {
        let mut f = eth_v4(
            Ipv4Addr::new(198, 18, 0, 2),
            Ipv4Addr::new(198, 18, 0, 1),
            L4::udp(1, 2, b"payload"),
        );
        let last = f.len() - 1;
        f[last] ^= 0xff;
        assert!(verify_checksums(&f).is_err());
    }
}
