//! `cargo xtask setup`: makes this machine able to build, test and demo Mirage. Each step checks
//! first and says whether it did something or skipped, so running it again is cheap (CI runs it
//! on every `cargo xtask test`).

use std::path::Path;

use anyhow::{Context as _, Result, bail};

use crate::exec::{capture, capture_ok, cargo_bin_dir, cmd, exec, require_root, which};

/// The LLVM major of the preinstalled nightly; bpf-linker must be built against the same one
/// (DESIGN.md, toolchain facts).
const LLVM_MAJOR: u32 = 22;

/// Debian packages: LLVM for building bpf-linker, the network tools the lab and tests use, and
/// PostgreSQL 15 (`initdb`, `pg_ctl`, `postgres` under `/usr/lib/postgresql/15/bin`), which the
/// manager runs as its embedded cluster and its tests start themselves. The package's own
/// `main` cluster, if one runs, is not used: ours listen only in their own socket directories.
/// `chromium` and `chromium-driver` run the manager's web UI tests (WebDriver, headless).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "iproute2",
    "iptables",
    "nftables",
    "iperf3",
    "iputils-ping",
    "procps",
    "postgresql-15",
    // The agent's Redis collector tests start their own redis-server (agent/tests/redis.rs).
    "redis-server",
    "chromium",
    "chromium-driver",
];

const BPFFS: &str = "/sys/fs/bpf";

/// Runs every set-up step.
pub fn run() -> Result<()> {
    require_root("setup")?;
    println!("==> setup");
    apt_install(APT_PACKAGES).context("installing apt packages")?;
    rust_src().context("installing rust-src for nightly")?;
    bpf_linker().context("installing bpf-linker")?;
    llvm_majors().context("checking LLVM versions")?;
    bpffs().context("mounting bpffs")?;
    println!("==> setup done");
    Ok(())
}

pub fn ok(what: &str) {
    println!("    ok:   {what}");
}

pub fn doing(what: &str) {
    println!("    do:   {what}");
}

/// Installs those of `packages` that are missing (`apt-get update` first); returns whether it
/// installed anything. Also used by `cargo xtask bench` for packages only one benchmark needs.
pub fn apt_install(packages: &[&str]) -> Result<bool> {
    // One query for all: installed packages print "install ok installed"; unknown ones only
    // make dpkg-query exit 1 with a message on stderr, so read stdout and ignore the status.
    let out = capture(
        cmd("dpkg-query")
            .args(["-W", "-f=${Package} ${Status}\\n"])
            .args(packages),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let missing = missing_packages(&stdout, packages);
    if missing.is_empty() {
        ok(&format!("apt packages: all {} installed", packages.len()));
        return Ok(false);
    }
    doing(&format!("apt packages: installing {}", missing.join(" ")));
    exec(
        cmd("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    exec(
        cmd("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(true)
}

/// The packages of `wanted` that `dpkg-query` output does not show as installed.
fn missing_packages<'a>(dpkg_output: &str, wanted: &[&'a str]) -> Vec<&'a str> {
    wanted
        .iter()
        .copied()
        .filter(|pkg| {
            !dpkg_output.lines().any(|line| {
                // "llvm-22-dev install ok installed"; multi-arch names may carry ":amd64".
                line.split_once(' ').is_some_and(|(name, status)| {
                    name.split(':').next() == Some(*pkg) && status.trim() == "install ok installed"
                })
            })
        })
        .collect()
}

fn rust_src() -> Result<()> {
    let installed = capture_ok(cmd("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("is the `nightly` toolchain installed? (`rustup toolchain list`)")?;
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        ok("rust-src: installed for nightly");
        return Ok(());
    }
    doing("rust-src: adding it to nightly (needed by -Z build-std=core)");
    exec(cmd("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker() -> Result<()> {
    if let Some(path) = which("bpf-linker") {
        ok(&format!("bpf-linker: found at {}", path.display()));
        return Ok(());
    }
    doing(&format!(
        "bpf-linker: building it against LLVM {LLVM_MAJOR} into {} (about 2 minutes)",
        cargo_bin_dir().display()
    ));
    exec(
        cmd("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ])
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}")),
    )
}

/// Checks that nightly's LLVM and bpf-linker's are the same major: bpf-linker reads the bitcode
/// rustc emits, and bitcode from a newer LLVM is rejected (or silently mis-read).
fn llvm_majors() -> Result<()> {
    let rustc = capture_ok(cmd("rustc").args(["+nightly", "-vV"]))?;
    let nightly = rustc_llvm_major(&rustc)
        .with_context(|| format!("no `LLVM version:` line in `rustc +nightly -vV`:\n{rustc}"))?;
    let linker = which("bpf-linker").context("bpf-linker is not on PATH after installing it")?;
    // `bpf-linker --version` prints only its own version ("bpf-linker 0.13.0"); it is linked
    // dynamically against libLLVM, so the library it loads tells the major.
    let version = capture_ok(cmd(&linker).arg("--version"))?;
    let ldd = capture_ok(cmd("ldd").arg(&linker))?;
    let linked = ldd_llvm_major(&ldd).or_else(|| installed_feature_major(&cargo_bin_dir()));
    let Some(linked) = linked else {
        println!(
            "    warn: cannot tell which LLVM {} ({}) uses: it links no libLLVM dynamically and \
             `cargo install` did not record an llvm-NN feature; if linking the eBPF object fails, \
             reinstall it: `cargo uninstall bpf-linker && cargo xtask setup`",
            linker.display(),
            version.trim()
        );
        return Ok(());
    };
    if nightly != linked {
        bail!(
            "nightly uses LLVM {nightly} but {} ({}) is built against LLVM {linked}; rebuild it: \
             `cargo uninstall bpf-linker`, install llvm-{nightly}-dev, then \
             `LLVM_PREFIX=/usr/lib/llvm-{nightly} cargo install bpf-linker --locked \
             --no-default-features --features llvm-{nightly}`",
            linker.display(),
            version.trim()
        );
    }
    ok(&format!(
        "LLVM: nightly and bpf-linker both use LLVM {nightly}"
    ));
    Ok(())
}

/// "LLVM version: 22.1.4" in `rustc -vV` → 22.
fn rustc_llvm_major(vv: &str) -> Option<u32> {
    let version = vv.lines().find_map(|l| l.strip_prefix("LLVM version:"))?;
    version.trim().split('.').next()?.parse().ok()
}

/// The libLLVM a binary loads, per `ldd`: `libLLVM.so.22.1` (Debian/apt.llvm.org) or
/// `libLLVM-22.so` (older packaging) → 22.
fn ldd_llvm_major(ldd: &str) -> Option<u32> {
    ldd.lines().find_map(|line| {
        let lib = line.split_whitespace().next()?;
        let rest = lib
            .strip_prefix("libLLVM.so.")
            .or_else(|| lib.strip_prefix("libLLVM-"))?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

/// The `llvm-NN` feature `cargo install` recorded for bpf-linker in `$CARGO_HOME/.crates2.json`
/// (a fallback for a statically linked bpf-linker).
fn installed_feature_major(cargo_bin: &Path) -> Option<u32> {
    let json = std::fs::read_to_string(cargo_bin.parent()?.join(".crates2.json")).ok()?;
    let doc: serde_json::Value = serde_json::from_str(&json).ok()?;
    let (_, install) = doc
        .get("installs")?
        .as_object()?
        .iter()
        .find(|(key, _)| key.starts_with("bpf-linker "))?;
    install
        .get("features")?
        .as_array()?
        .iter()
        .find_map(|f| f.as_str()?.strip_prefix("llvm-")?.parse().ok())
}

fn bpffs() -> Result<()> {
    let out = capture_ok(cmd("stat").args(["-f", "-c", "%T", BPFFS]))?;
    if out.trim() == "bpf_fs" {
        ok(&format!("bpffs: mounted at {BPFFS}"));
        return Ok(());
    }
    doing(&format!(
        "bpffs: mounting it at {BPFFS} (found {})",
        out.trim()
    ));
    exec(cmd("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_missing_packages() {
        let out = "iproute2 install ok installed\nllvm-22-dev:amd64 install ok installed\n\
                   nftables deinstall ok config-files\n";
        assert_eq!(
            missing_packages(out, &["iproute2", "llvm-22-dev", "nftables", "iperf3"]),
            ["nftables", "iperf3"]
        );
    }

    #[test]
    fn reads_llvm_majors() {
        let vv = "rustc 1.97.0-nightly\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(rustc_llvm_major(vv), Some(22));
        let ldd = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007f3e)\n";
        assert_eq!(ldd_llvm_major(ldd), Some(22));
        assert_eq!(
            ldd_llvm_major("\tlibLLVM-17.so => /usr/lib/x (0x1)\n"),
            Some(17)
        );
        assert_eq!(
            ldd_llvm_major("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n"),
            None
        );
    }
}
