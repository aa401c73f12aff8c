//! `cargo xtask bench NAME`: builds the agent and the benchmarks in release mode and runs
//! `bench-NAME` from the tests crate (`bench-xdp`: the program under `BPF_PROG_TEST_RUN`;
//! `bench-veth`: traffic through the lab). The benchmark finds the release agent through
//! `MIRAGE_BIN_DIR`.
//!
//! `bench detect` also needs Debian's `fail2ban` (for `fail2ban-regex`, its baseline), installed
//! here rather than by `cargo xtask setup` because nothing else uses it. Its daemon is never
//! wanted: it would ban addresses on this machine.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{
    exec::{capture, cmd, exec, require_root, root},
    setup,
};

/// Arguments of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark: runs the tests crate's binary `bench-NAME` (`xdp`, `veth`, `manager`, `detect`, `agent`).
    pub name: String,
    /// Passed to the benchmark binary unchanged.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Runs the set-up, builds in release mode and runs the benchmark.
pub fn run(args: &BenchArgs) -> Result<()> {
    require_root("bench")?;
    if args.name.is_empty()
        || !args
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        bail!("invalid benchmark name `{}`", args.name);
    }
    setup::run()?;
    if args.name == "detect" {
        fail2ban().context("installing fail2ban for the detect benchmark's baseline")?;
    }
    println!("==> build (release)");
    exec(cmd("cargo").args(["build", "--release", "-p", "agent", "-p", "tests", "--bins"]))?;
    let bin_dir = root().join("target/release");
    let bench = bin_dir.join(format!("bench-{}", args.name));
    if !bench.is_file() {
        bail!(
            "no benchmark `{}`: {} was not built (the tests crate has no binary `bench-{}`); \
             available: {}",
            args.name,
            bench.display(),
            args.name,
            available(&bin_dir)
        );
    }
    println!("==> bench-{}", args.name);
    exec(cmd(&bench).args(&args.args).env("MIRAGE_BIN_DIR", &bin_dir))
}

/// Installs `fail2ban` if it is missing and makes sure its daemon is not running: only
/// `fail2ban-regex`, which reads a file and bans nothing, is used. Debian starts and enables the
/// service on install (unless `/usr/sbin/policy-rc.d` forbids it, as in containers), so a fresh
/// install is stopped and disabled; a fail2ban that was already installed is the operator's and
/// is left as it is.
fn fail2ban() -> Result<()> {
    println!("==> fail2ban (baseline of bench detect)");
    let installed = setup::apt_install(&["fail2ban"])?;
    let running = capture(cmd("pgrep").args(["-x", "fail2ban-server"]))?
        .status
        .success();
    if !installed {
        if running {
            setup::ok("fail2ban: already installed; its server runs (left alone, not used)");
        } else {
            setup::ok("fail2ban: already installed, no server running");
        }
        return Ok(());
    }
    if running {
        setup::doing("fail2ban: the install started its server; stopping it");
        exec(cmd("fail2ban-client").arg("stop"))?;
    }
    if Path::new("/run/systemd/system").is_dir() {
        setup::doing("fail2ban: disabling the service so that it never starts at boot");
        exec(cmd("systemctl").args(["disable", "--now", "fail2ban.service"]))?;
    }
    if capture(cmd("pgrep").args(["-x", "fail2ban-server"]))?
        .status
        .success()
    {
        bail!(
            "fail2ban-server still runs after `fail2ban-client stop`; stop it (`systemctl stop \
             fail2ban`) before running the benchmark"
        );
    }
    setup::ok("fail2ban: installed, no server running");
    Ok(())
}

/// The `bench-*` binaries present in `dir`, by name.
fn available(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let name = name.strip_prefix("bench-")?.to_owned();
            // Skip cargo's `bench-xdp.d` dependency files.
            (!name.contains('.')).then_some(name)
        })
        .collect();
    names.sort();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}
