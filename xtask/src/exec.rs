//! Running commands: every command is printed before it runs, from the workspace root, with
//! `~/.cargo/bin` on `PATH` (a fresh CI shell may not have it, and bpf-linker lives there).

use std::{
    env,
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The workspace root (the parent of this crate).
pub fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}

/// `$CARGO_HOME/bin`, or `~/.cargo/bin`.
pub fn cargo_bin_dir() -> PathBuf {
    match env::var_os("CARGO_HOME") {
        Some(home) => PathBuf::from(home).join("bin"),
        None => {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo/bin")
        }
    }
}

/// `PATH` with the cargo bin directory appended if it is missing.
fn path_with_cargo_bin() -> OsString {
    let current = env::var_os("PATH").unwrap_or_default();
    let bin = cargo_bin_dir();
    let mut dirs: Vec<PathBuf> = env::split_paths(&current).collect();
    if !dirs.contains(&bin) {
        dirs.push(bin);
    }
    env::join_paths(dirs).unwrap_or(current)
}

/// Finds `program` on the (extended) `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    env::split_paths(&path_with_cargo_bin())
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A command for `program`, run from the workspace root with the cargo bin directory on `PATH`.
pub fn cmd(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    c.current_dir(root()).env("PATH", path_with_cargo_bin());
    c
}

/// `cargo +nightly ...`, cleaned of the variables through which an outer cargo would force its
/// own (stable) compiler on the nested build, as aya-build does.
pub fn nightly_cargo() -> Command {
    let mut c = cmd("cargo");
    c.arg("+nightly");
    for key in ["RUSTC", "RUSTC_WORKSPACE_WRAPPER", "RUSTUP_TOOLCHAIN"] {
        c.env_remove(key);
    }
    c
}

/// Prints `cmd`, runs it with inherited stdio, and fails if it exits non-zero.
pub fn exec(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    println!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Prints `cmd`, runs it with captured output and returns it, whatever the exit status: the
/// caller decides what a failure means (queries such as `dpkg-query` fail for "not installed").
pub fn capture(cmd: &mut Command) -> Result<Output> {
    let shown = display(cmd);
    println!("$ {shown}");
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))
}

/// Like [`capture`], but fails with the command's stderr if it exits non-zero; returns stdout.
pub fn capture_ok(cmd: &mut Command) -> Result<String> {
    let out = capture(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A shell-like rendering of `cmd`: the variables it sets (but `PATH`), the program, the
/// arguments, quoted where needed.
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        if key == "PATH" {
            continue;
        }
        if let Some(value) = value {
            parts.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.into_owned()
    } else if s.chars().any(char::is_control) {
        // Bash ANSI-C quoting, e.g. the 0x1f separators of CARGO_ENCODED_RUSTFLAGS.
        let escaped: String = s
            .chars()
            .map(|c| match c {
                '\'' => "\\'".to_owned(),
                '\\' => "\\\\".to_owned(),
                c if c.is_control() => format!("\\x{:02x}", u32::from(c)),
                c => c.to_string(),
            })
            .collect();
        format!("$'{escaped}'")
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Fails unless the process runs as root.
pub fn require_root(task: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "`cargo xtask {task}` must run as root (euid is {euid}): it installs packages, mounts \
             bpffs, loads eBPF programs and creates network namespaces; try `sudo -E cargo xtask {task}`"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_commands_like_a_shell() {
        let mut c = Command::new("cargo");
        c.args(["build", "-p", "agent ebpf", "it's"])
            .env("CARGO_ENCODED_RUSTFLAGS", "a\x1fb");
        assert_eq!(
            display(&c),
            r#"CARGO_ENCODED_RUSTFLAGS=$'a\x1fb' cargo build -p 'agent ebpf' 'it'\''s'"#
        );
    }
}
