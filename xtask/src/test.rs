//! `cargo xtask test`: everything CI checks, in order, stopping at the first failure — set-up,
//! formatting, clippy on userspace and on the eBPF crate, a debug build of the binaries, then
//! every test. The privileged tests (network namespaces, XDP attach, `BPF_PROG_TEST_RUN`) run
//! serially: they share bpffs and the kernel's XDP state, and the lab's addresses are fixed.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{
    build_ebpf,
    exec::{cmd, exec, require_root},
    setup,
};

/// Runs the steps and prints a summary; fails if any step fails.
pub fn run() -> Result<()> {
    require_root("test")?;
    let started = Instant::now();
    let mut done: Vec<(&str, Duration)> = Vec::new();

    let step = Instant::now();
    setup::run()?;
    done.push(("setup", step.elapsed()));

    for (name, mut command) in steps() {
        println!("==> {name}");
        let step = Instant::now();
        let result = exec(&mut command);
        let took = step.elapsed();
        if let Err(err) = result {
            summary(&done, Some((name, took)), started.elapsed());
            return Err(err);
        }
        done.push((name, took));
    }
    summary(&done, None, started.elapsed());
    Ok(())
}

fn steps() -> Vec<(&'static str, Command)> {
    let mut fmt = cmd("cargo");
    fmt.args(["fmt", "--all", "--check"]);

    let mut clippy = cmd("cargo");
    clippy.args([
        "clippy",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]);

    // The eBPF crate alone, for its real target: checked together with the workspace it would be
    // built for the host, where `#![no_main]` and the panic handler do not fit, and feature
    // unification would mix host and BPF dependencies.
    let mut clippy_ebpf = build_ebpf::cargo("clippy");
    clippy_ebpf.args(["--locked", "--", "-D", "warnings"]);

    // `--exclude agent-ebpf`: its `mirage` binary exists only for the BPF target; agent/build.rs
    // builds it (through aya-build) as part of building mirage-agent.
    let mut build = cmd("cargo");
    build.args([
        "build",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--bins",
        "--locked",
    ]);

    let mut test = cmd("cargo");
    test.args([
        "test",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--locked",
        "--",
        "--test-threads=1",
    ]);

    vec![
        ("fmt", fmt),
        ("clippy", clippy),
        ("clippy (agent-ebpf, bpf target)", clippy_ebpf),
        ("build", build),
        ("test", test),
    ]
}

fn summary(done: &[(&str, Duration)], failed: Option<(&str, Duration)>, total: Duration) {
    println!();
    println!("==> summary");
    for (name, took) in done {
        println!("    ok      {name:<34} {:>7.1}s", took.as_secs_f64());
    }
    if let Some((name, took)) = failed {
        println!("    FAILED  {name:<34} {:>7.1}s", took.as_secs_f64());
        println!(
            "xtask test: FAILED at `{name}` after {} of {} steps, {:.1}s",
            done.len(),
            steps_total(),
            total.as_secs_f64()
        );
    } else {
        println!(
            "xtask test: all {} steps passed in {:.1}s",
            done.len(),
            total.as_secs_f64()
        );
    }
}

/// Set-up plus the command steps.
fn steps_total() -> usize {
    1 + steps().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_end_with_serial_tests() {
        let steps = steps();
        let (name, last) = steps.last().unwrap();
        assert_eq!(*name, "test");
        assert!(last.get_args().any(|a| a == "--test-threads=1"));
    }
}
