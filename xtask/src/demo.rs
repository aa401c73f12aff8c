//! `cargo xtask demo`: builds `mirage-agent`, `mirage-manager` and the `demo` binary (tests
//! crate), then runs the demo in three acts, each in a lab of network namespaces: the agent in
//! firewall mode drops an attacker while a legitimate client keeps working; then, in unreal mode,
//! the attacker's new SSH connection lands in a sandbox namespace (which sees the attacker's real
//! address) while the legitimate client and the attacker's earlier connection keep the real
//! service; then a real `mirage-manager` with its own embedded PostgreSQL takes a verdict and
//! streams it to the agent. See `tests/src/bin/demo.rs`.

use anyhow::Result;

use crate::{
    exec::{cmd, exec, require_root},
    setup,
};

/// Runs the set-up, builds, and runs the demo.
pub fn run() -> Result<()> {
    require_root("demo")?;
    setup::run()?;
    println!("==> build");
    exec(cmd("cargo").args([
        "build",
        "-p",
        "agent",
        "-p",
        "manager",
        "-p",
        "tests",
        "--bin",
        "mirage-agent",
        "--bin",
        "mirage-manager",
        "--bin",
        "demo",
    ]))?;
    println!("==> demo");
    exec(cmd("cargo").args(["run", "--quiet", "-p", "tests", "--bin", "demo"]))
}
