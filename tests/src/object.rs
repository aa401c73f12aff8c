//! The eBPF object loaded privately for `BPF_PROG_TEST_RUN`: maps pinned in a throw-away bpffs
//! directory (removed on drop), nothing attached to any interface.

use std::path::PathBuf;

use agent::{loader, maps::Maps};
use agent_common::programs;
use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};

use crate::netns::unique_tag;

/// A loaded object with typed maps and both XDP programs verified.
pub struct Object {
    /// The loaded object (programs are taken from it by name).
    pub ebpf: Ebpf,
    /// The maps, typed.
    pub maps: Maps,
    root: PathBuf,
}

/// What one run of a program gave.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// `XDP_*` return code.
    pub action: u32,
    /// The packet after the program (same length as the input unless the program resized it).
    pub output: Vec<u8>,
    /// Mean nanoseconds per repetition as the kernel measured it.
    pub ns_per_run: f64,
}

impl Object {
    /// Loads the object with its maps pinned under a fresh `/sys/fs/bpf/mirage-test-*`.
    pub fn load() -> Result<Self> {
        let root = PathBuf::from(format!("/sys/fs/bpf/mirage-test-{}", unique_tag()));
        loader::ensure_bpffs(&root)?;
        let mut ebpf = loader::load(&loader::pin_dir(&root))?;
        let maps = loader::take_maps(&mut ebpf)?;
        loader::xdp_program(&mut ebpf, programs::XDP)?;
        loader::xdp_program(&mut ebpf, programs::BASELINE)?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(programs::TC)
            .context("the TC program is missing from the object")?
            .try_into()?;
        tc.load().context("loading the TC program (verifier)")?;
        Ok(Self { ebpf, maps, root })
    }

    /// Runs program `name` over `packet` `repeat` times through `BPF_PROG_TEST_RUN`.
    pub fn run(&mut self, name: &str, packet: &[u8], repeat: u32) -> Result<RunResult> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("program {name}"))?
            .try_into()?;
        test_run(prog, packet, None, repeat).context("BPF_PROG_TEST_RUN")
    }

    /// Runs the TC program over `packet` once through `BPF_PROG_TEST_RUN` (as an skb arriving
    /// on loopback of the calling thread's network namespace). Returns the TC verdict and the
    /// packet as the program left it.
    pub fn run_tc(&mut self, packet: &[u8]) -> Result<RunResult> {
        self.run_tc_repeat(packet, 1, 0)
    }

    /// Runs the TC program over `packet` `repeat` times through `BPF_PROG_TEST_RUN`, as an skb
    /// that arrived on interface `ingress_ifindex` of the calling thread's network namespace
    /// (0: none, as [`Object::run_tc`] does; the FIB lookup after a rewrite starts from it).
    ///
    /// The kernel builds the skb once and runs the program `repeat` times over it: each run
    /// sees the packet as the previous run left it. `ns_per_run` is the kernel's mean.
    pub fn run_tc_repeat(
        &mut self,
        packet: &[u8],
        repeat: u32,
        ingress_ifindex: u32,
    ) -> Result<RunResult> {
        /// `offsetofend(struct __sk_buff, ingress_ifindex)` (include/uapi/linux/bpf.h): a
        /// shorter context is zero-extended by the kernel, and every field before
        /// `ingress_ifindex` that the kernel does not accept (all but `mark` and `priority`)
        /// must be zero.
        const CTX_LEN: usize = 40;
        const INGRESS_IFINDEX: usize = 36;
        let mut ctx = [0u8; CTX_LEN];
        ctx[INGRESS_IFINDEX..].copy_from_slice(&ingress_ifindex.to_ne_bytes());
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(programs::TC)
            .context("program rewrite")?
            .try_into()?;
        let ctx_in = (ingress_ifindex != 0).then_some(&ctx[..]);
        test_run(prog, packet, ctx_in, repeat).context("BPF_PROG_TEST_RUN (tc)")
    }

    /// The directory the object's maps are pinned in (to open one of them a second time, e.g.
    /// to write a map that [`Maps`] has no method for).
    pub fn pin_dir(&self) -> PathBuf {
        loader::pin_dir(&self.root)
    }
}

/// One `BPF_PROG_TEST_RUN` of any program type aya can test-run with packet data.
fn test_run<P>(prog: &mut P, packet: &[u8], ctx_in: Option<&[u8]>, repeat: u32) -> Result<RunResult>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    // Room for programs that grow the packet (encapsulation).
    let mut out = vec![0u8; packet.len() + 256];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in,
        repeat,
        ..Default::default()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok(RunResult {
        action: r.return_value,
        output: out,
        ns_per_run: r.duration.as_nanos() as f64,
    })
}

impl Drop for Object {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
