//! Checksum pieces shared by the TCP/UDP rewrite (`nat.rs`) and the ICMP error rewrite
//! (`icmp.rs`). The updates themselves go through the skb helpers, which follow the skb's
//! checksum state; this module only prepares their arguments.

use aya_ebpf::helpers::bpf_csum_diff;

/// `BPF_F_IPV6` (include/uapi/linux/bpf.h, Linux 6.16): tells `bpf_l4_csum_replace` that a
/// pseudo-header change is an IPv6 address, so `skb->csum` stays right for CHECKSUM_COMPLETE
/// (kernel-patches/bpf #8975). aya's generated bindings predate it.
pub const BPF_F_IPV6: u64 = 1 << 7;

/// The ones'-complement difference between two 16-byte addresses, as `bpf_l4_csum_replace`
/// takes it with `from = 0`. Computed over stack copies: `bpf_csum_diff` over packet memory is
/// a range the verifier refuses (aya #1562).
#[inline(always)]
pub fn diff16(old: &[u8; 16], new: &[u8; 16]) -> Result<u64, i64> {
    let mut o = *old;
    let mut n = *new;
    // SAFETY: two 16-byte stack buffers, a multiple of 4 as the helper needs.
    let d = unsafe { bpf_csum_diff(o.as_mut_ptr().cast(), 16, n.as_mut_ptr().cast(), 16, 0) };
    if d < 0 { Err(d) } else { Ok(d as u64) }
}

/// An IPv4 address as the raw 32-bit value the csum helpers take (network order in memory).
#[inline(always)]
pub fn raw4(a: &[u8; 16]) -> u64 {
    u64::from(u32::from_ne_bytes([a[0], a[1], a[2], a[3]]))
}

/// A port as the raw 16-bit value the csum helpers take.
#[inline(always)]
pub fn raw_port(p: u16) -> u64 {
    u64::from(u16::from_ne_bytes(p.to_be_bytes()))
}
