//! `bench-xdp`: the per-packet cost of Mirage's XDP program through `BPF_PROG_TEST_RUN`, with 1,
//! 10,000 and 1,000,000 exact attacker entries, beside a bare XDP program that returns at once
//! (the cost floor of the test run itself), plus the rate at which userspace fills the map.
//!
//! Run as root after `cargo build --release -p agent -p tests --bins`:
//! `target/release/bench-xdp` (or `cargo xtask bench`). One JSON line per result on stdout,
//! progress on stderr. Nothing is attached to any interface; the object's maps are pinned in a
//! private bpffs directory that is removed on exit.
#![allow(
    clippy::print_stdout,
    reason = "benchmark results go to stdout by contract"
)]

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use agent::addr::Net;
use agent_common::{Action, AttackerEntry, Mode, programs};
use anyhow::{Context as _, Result, bail};
use tests::{
    bench::{Record, attacker_addr, median, note},
    lab::{HOST_V4, LEGIT_V4},
    object::Object,
    packet::{L4, eth_v4},
};

const BENCH: &str = "xdp";
/// The baseline's name in the output.
const BASELINE: &str = "bare-xdp";
/// Attacker-map sizes measured (cumulative: the map grows from one size to the next).
const SIZES: [u32; 3] = [1, 10_000, 1_000_000];
/// Rounds per case; the median is reported.
const ROUNDS: usize = 5;
/// Wall time aimed at for one measurement.
const TARGET: Duration = Duration::from_millis(500);
/// `XDP_DROP` and `XDP_PASS` (include/uapi/linux/bpf.h).
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn main() -> Result<()> {
    let started = Instant::now();
    let jit = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    note(format!(
        "bench-xdp: BPF JIT {} (net.core.bpf_jit_enable = {jit})",
        if jit == "0" {
            "OFF: numbers are interpreter numbers"
        } else {
            "on"
        }
    ));

    let mut obj = Object::load().context("loading the eBPF object (run as root)")?;
    obj.maps.set_mode(Mode::Firewall)?;
    let payload = [0u8; tests::bench::flood::PAYLOAD];
    let packet = |src: Ipv4Addr| eth_v4(src, HOST_V4, L4::udp(40_000, 9, &payload));
    // The legitimate client's address: never in the map (the entries are in 100.64.0.0/10).
    let pass_packet = packet(LEGIT_V4);
    let entry = AttackerEntry::new(Action::Default, 0);

    let mut inserted = 0u32;
    let mut insert_time = Duration::ZERO;
    for n in SIZES {
        let t = Instant::now();
        while inserted < n {
            obj.maps
                .block(Net::V4(attacker_addr(inserted), 32), entry)
                .with_context(|| format!("inserting entry {}", inserted + 1))?;
            inserted += 1;
            if inserted.is_multiple_of(200_000) {
                note(format!(
                    "  inserted {inserted} entries ({:.1} s)",
                    t.elapsed().as_secs_f64()
                ));
            }
        }
        insert_time += t.elapsed();
        note(format!("{n} attacker entries in the map"));

        // The most recently inserted entry.
        let drop_packet = packet(attacker_addr(n - 1));
        for (case, pkt, expected) in [
            ("pass", &pass_packet, XDP_PASS),
            ("drop", &drop_packet, XDP_DROP),
        ] {
            let action = obj.run(programs::XDP, pkt, 1)?.action;
            if action != expected {
                bail!("{case}/{n}: the program returned {action}, expected {expected}");
            }
            let (mirage, bare) = measure(&mut obj, pkt)?;
            let record = Record::cost(
                BENCH,
                format!("{case}/{n}"),
                "ns_per_packet",
                mirage,
                BASELINE,
                bare,
            );
            println!("{}", record.to_json()?);
        }
    }

    let rate = f64::from(inserted) / insert_time.as_secs_f64().max(1e-9);
    note(format!(
        "inserted {inserted} entries one syscall each in {:.2} s",
        insert_time.as_secs_f64()
    ));
    let record = Record::alone(
        BENCH,
        format!("insert/{inserted}"),
        "entries_per_second",
        rate,
    );
    println!("{}", record.to_json()?);
    note(format!(
        "bench-xdp done in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Medians of `ROUNDS` interleaved runs of the real program and the bare one over `pkt`, in ns
/// per packet as the kernel measured them.
fn measure(obj: &mut Object, pkt: &[u8]) -> Result<(f64, f64)> {
    let repeat_x = repeat_for(obj, programs::XDP, pkt)?;
    let repeat_b = repeat_for(obj, programs::BASELINE, pkt)?;
    let mut mirage = Vec::with_capacity(ROUNDS);
    let mut bare = Vec::with_capacity(ROUNDS);
    let mut wall = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        mirage.push(obj.run(programs::XDP, pkt, repeat_x)?.ns_per_run);
        wall.push(t.elapsed().as_nanos() as f64 / f64::from(repeat_x));
        bare.push(obj.run(programs::BASELINE, pkt, repeat_b)?.ns_per_run);
    }
    let (m, b) = (median(&mirage), median(&bare));
    note(format!(
        "  mirage {m:.0} ns (runs {mirage:?}, repeat {repeat_x}, wall clock {:.1} ns), bare {b:.0} ns (runs {bare:?}, repeat {repeat_b})",
        median(&wall)
    ));
    Ok((m, b))
}

/// A repeat count that makes one run of `prog` last about [`TARGET`].
fn repeat_for(obj: &mut Object, prog: &str, pkt: &[u8]) -> Result<u32> {
    const PROBE: u32 = 1_000_000;
    let t = Instant::now();
    obj.run(prog, pkt, PROBE)?;
    let per_run = t.elapsed().as_nanos() as f64 / f64::from(PROBE);
    Ok((TARGET.as_nanos() as f64 / per_run.max(0.1)).clamp(1e6, 4e8) as u32)
}
