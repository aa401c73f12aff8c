//! `mirage-agent`: the userspace half of Mirage's enforcement point.
//!
//! It loads the programs built from `agent-ebpf` (the XDP decision program and the TC rewriter),
//! attaches both to every managed interface and pins them with their maps under bpffs, so
//! enforcement survives agent restarts and upgrades. It fills the maps from the configuration
//! ([`config`]: mode, sandbox targets, redirect model) and reports every new rewritten flow from
//! the kernel's ring buffer ([`flow`]). CLI commands (`block`, `allow`, `list`, `top`...) edit
//! and read the pinned maps directly. Every address passes through [`addr`] before it reaches a
//! map.
//!
//! Run: `mirage-agent run --iface eth0 --config mirage.toml`; see the README for the rest.

pub mod addr;
pub mod cli;
pub mod clock;
pub mod config;
pub mod flow;
pub mod loader;
pub mod logs;
pub mod maps;
pub mod sync;
pub mod telemetry;
