//! The privileged test lab of Mirage: network-namespace guards, the demo topology, and helpers
//! to run the real binaries inside it. Used by the integration tests in `tests/`, by
//! `cargo xtask demo` and by `cargo xtask bench`. Everything here needs root.
//!
//! Network rules: every address used lives inside namespaces created here (198.18.0.0/24 and,
//! for the sandbox link, 198.18.1.0/24, both in the RFC 2544 benchmarking range; the ULAs
//! fd6d:6972:6167:65::/64 and fd6d:6972:6167:66::/64); no namespace gets a route
//! toward a real interface, and every namespace, veth, pin and process is removed by a guard's
//! `Drop`, also when a test panics.

pub mod bench;
pub mod lab;
pub mod manager;
pub mod netns;
pub mod object;
pub mod operator;
pub mod packet;
pub mod probe;
pub mod relay;
pub mod sandbox_lab;
