//! Rebuild the eBPF object when the linker binary changes, as aya-template does: a new
//! bpf-linker (or one built against another LLVM) must not leave a stale object behind.
use which::which;

fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!(
            "cargo:warning=bpf-linker not found ({err}); run `cargo xtask build-ebpf` to install it"
        ),
    }
}
