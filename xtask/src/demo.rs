//! `cargo xtask demo`: builds `mirage-agent` and the `demo` binary (tests crate), then runs the
//! demo: a lab of three network namespaces where the agent, in firewall mode, blocks an attacker
//! while a legitimate client keeps working. See `tests/src/bin/demo.rs`.

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
        "tests",
        "--bin",
        "mirage-agent",
        "--bin",
        "demo",
    ]))?;
    println!("==> demo");
    exec(cmd("cargo").args(["run", "--quiet", "-p", "tests", "--bin", "demo"]))
}
