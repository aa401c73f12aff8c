//! `cargo xtask bench NAME`: builds the agent and the benchmarks in release mode and runs
//! `bench-NAME` from the tests crate (`bench-xdp`: the program under `BPF_PROG_TEST_RUN`;
//! `bench-veth`: traffic through the lab). The benchmark finds the release agent through
//! `MIRAGE_BIN_DIR`.

use std::path::Path;

use anyhow::{Result, bail};
use clap::Args;

use crate::{
    exec::{cmd, exec, require_root, root},
    setup,
};

/// Arguments of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark: runs the tests crate's binary `bench-NAME` (e.g. `xdp`, `veth`).
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
