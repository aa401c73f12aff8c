//! `mirage-agent`: the userspace half of Mirage's enforcement point.
//!
//! It loads the XDP program built from `agent-ebpf`, attaches it to the protected interface and
//! pins it with its maps under bpffs, so enforcement survives agent restarts and upgrades. CLI
//! commands (`block`, `allow`, `list`, `top`...) edit and read the pinned maps directly. Every
//! address passes through [`addr`] before it reaches a map.
//!
//! Run: `mirage-agent run --iface eth0 --mode firewall`; see the README for the rest.

pub mod addr;
pub mod cli;
pub mod clock;
pub mod config;
pub mod loader;
pub mod maps;
