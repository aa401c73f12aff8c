//! Mirage's XDP program: the enforcement point on the protected host's ingress.
//!
//! The entries live here; parsing is in `parse.rs`, the decision and counters in `decide.rs`,
//! the TC rewrite in `nat.rs` and `icmp.rs`, the map statics in `maps.rs`. Built by `agent/build.rs` (aya-build, nightly, bpf-linker) or
//! `cargo xtask build-ebpf`; loaded and pinned by `mirage-agent run`.
#![no_std]
#![no_main]

mod csum;
mod decide;
mod icmp;
mod maps;
mod nat;
mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// The XDP entry on ingress. Never panics: every failure path passes the packet.
#[xdp]
pub fn redirect(ctx: XdpContext) -> u32 {
    // `try_redirect` only fails where a state should be impossible; passing the packet keeps
    // the host reachable (fail open) and the counters show what happened.
    decide::try_redirect(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

/// The TC entry on ingress: rewrites redirected and reflected flows after `redirect` passed
/// them. Never panics: every failure path lets the packet continue unchanged.
#[classifier]
pub fn rewrite(ctx: TcContext) -> i32 {
    nat::try_rewrite(&ctx).unwrap_or(TC_ACT_OK)
}

/// Returns at once: the cost floor of `BPF_PROG_TEST_RUN`, measured beside `redirect`.
#[xdp]
pub fn baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects code that can reach here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
