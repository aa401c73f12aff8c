//! Builds the eBPF object (`agent-ebpf`, binary `mirage`) with aya-build: a nested
//! `cargo +nightly build --target bpfel-unknown-none -Z build-std=core` linked by bpf-linker.
//! `AYA_BUILD_SKIP=1` skips it (clippy-only runs); `cargo xtask build-ebpf` installs the toolchain.
use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "agent-ebpf")
        .ok_or_else(|| anyhow!("agent-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("agent-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the eBPF object; run `cargo xtask build-ebpf` to install the toolchain")
}
