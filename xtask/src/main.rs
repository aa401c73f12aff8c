//! `cargo xtask`: the developer tasks of Mirage — toolchain set-up, building the eBPF object,
//! the full test run (what CI runs), the demo and the benchmarks.
//!
//! Every task prints the commands it runs (`$ ...`) so that a failure can be reproduced by hand.
//! Run `cargo xtask --help`; everything but `build-ebpf` alone needs root, because the set-up
//! installs packages and mounts bpffs, and the tests and demo create network namespaces.
// The tasks talk to a human on a terminal: printing is their job.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "xtask reports progress to the developer on stdout/stderr"
)]

mod bench;
mod build_ebpf;
mod demo;
mod exec;
mod setup;
mod test;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Developer tasks for the Mirage workspace.
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building and testing need (apt packages, rust-src, bpf-linker), check that
    /// bpf-linker and nightly use the same LLVM, and mount bpffs. Idempotent.
    Setup,
    /// Build the eBPF object (`agent-ebpf`, binary `mirage`) with nightly and bpf-linker.
    BuildEbpf,
    /// What CI runs: set-up, fmt, clippy (userspace and eBPF), build, then every test (the
    /// privileged ones included, serially).
    Test,
    /// Build the lab, run the agent in firewall mode, block the attacker, and show the effect.
    Demo,
    /// Build in release mode and run the benchmark `bench-NAME` (`xdp`, `veth`, `manager`, `detect`, `agent`).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<()> = match cli.task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build_ebpf::run().map(|_| ()),
        Task::Test => test::run(),
        Task::Demo => demo::run(),
        Task::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The chain, not a backtrace: the failing command was printed above, and
            // RUST_BACKTRACE=1 (common in CI) would bury the message under xtask's own frames.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
