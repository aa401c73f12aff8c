//! `cargo xtask build-ebpf`: builds the XDP object on its own, the way `agent/build.rs` does it
//! through aya-build 0.2.0 (same toolchain, target, `-Z build-std=core` and RUSTFLAGS), into its
//! own target directory so that it never invalidates the userspace build.

use std::{ffi::OsString, path::PathBuf, process::Command};

use anyhow::{Result, ensure};

use crate::{
    exec::{exec, nightly_cargo, root},
    setup,
};

/// The eBPF crate and its program binary.
const PACKAGE: &str = "agent-ebpf";
const BIN: &str = "mirage";

/// The BPF target with the host's byte order (aya-build picks it from `CARGO_CFG_TARGET_ENDIAN`).
pub const TARGET: &str = if cfg!(target_endian = "big") {
    "bpfeb-unknown-none"
} else {
    "bpfel-unknown-none"
};

/// Where nightly builds and checks the eBPF crate.
pub fn target_dir() -> PathBuf {
    root().join("target/ebpf")
}

/// `cargo +nightly SUBCOMMAND -p agent-ebpf --target bpfel-unknown-none -Z build-std=core`
/// with aya-build's RUSTFLAGS: the `bpf_target_arch` cfg aya-ebpf reads, full debug info (the
/// BTF is made from it) and `--btf` for bpf-linker.
pub fn cargo(subcommand: &str) -> Command {
    let mut cmd = nightly_cargo();
    cmd.args([
        subcommand,
        "-p",
        PACKAGE,
        "--target",
        TARGET,
        "-Z",
        "build-std=core",
    ])
    .arg("--target-dir")
    .arg(target_dir())
    .env("CARGO_ENCODED_RUSTFLAGS", rustflags());
    cmd
}

fn rustflags() -> OsString {
    // aya-build uses the build script's CARGO_CFG_TARGET_ARCH, i.e. the host's architecture
    // (with riscv64gc shortened to riscv64, which std's ARCH already is).
    let arch = std::env::consts::ARCH;
    [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ]
    .join("\x1f")
    .into()
}

/// Runs the set-up, builds the object and returns its path.
pub fn run() -> Result<PathBuf> {
    setup::run()?;
    println!("==> build-ebpf");
    exec(cargo("build").args(["--release", "--bin", BIN]))?;
    let object = target_dir().join(TARGET).join("release").join(BIN);
    ensure!(
        object.is_file(),
        "the build succeeded but {} is missing",
        object.display()
    );
    println!("eBPF object: {}", object.display());
    Ok(object)
}
