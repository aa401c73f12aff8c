//! `bench-xdp`: the per-packet cost of Mirage's XDP program through `BPF_PROG_TEST_RUN`, with 1,
//! 10,000 and 1,000,000 exact attacker entries, beside a bare XDP program that returns at once
//! (the cost floor of the test run itself), plus the rate at which userspace fills the map.
//!
//! Redirect and reflect are measured over the whole data path of a packet of an established
//! flow: the XDP decision (`redirect`) plus the TC rewrite (`rewrite`, checksum helpers and FIB
//! lookup), each through `BPF_PROG_TEST_RUN` with a repeat count; the two are also reported
//! apart (`redirect-xdp/N`, `redirect-tc/N`). The kernel runs a TC program `repeat` times over
//! one skb, each run seeing the packet as the previous one left it; so that every run rewrites,
//! a mirror flow entry maps the rewritten packet back to the original (same code path, same
//! number of rewritten fields), and the run is checked to have rewritten on every repetition.
//! `redirect-new-flow/N` is a SYN that creates its flow (entry pair, flow event) each time:
//! that cannot repeat, so it is the mean of single runs over thousands of distinct SYNs, beside
//! single runs of the bare program (whose floor then includes the timer's own cost).
//!
//! The TC runs are made from a thread inside a fresh network namespace with no route: the FIB
//! lookup after a rewrite (from `lo`, with forwarding on in that namespace only so that the
//! lookup is really made) finds nothing and the program hands the packet to the stack. A real
//! forward costs one neighbour lookup and a redirect more.
//!
//! Run as root after `cargo build --release -p agent -p tests --bins`:
//! `target/release/bench-xdp` (or `cargo xtask bench`). One JSON line per result on stdout,
//! progress on stderr. Nothing is attached to any interface; the object's maps are pinned in a
//! private bpffs directory that is removed on exit, and the namespace is deleted on exit.
#![allow(
    clippy::print_stdout,
    reason = "benchmark results go to stdout by contract"
)]

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use agent::{addr::Net, loader};
use agent_common::{
    Action, AttackerEntry, DataPathConfig, FlowEntry, FlowKey, Mode, Target, TargetKey, family,
    maps as names, programs,
};
use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, Map, MapData, RingBuf};
use tests::{
    bench::{Record, attacker_addr, median, note},
    lab::{HOST_V4, LEGIT_V4},
    netns::{Netns, unique_tag},
    object::Object,
    packet::{ACK, L4, SYN, eth_v4},
    probe::in_netns,
    sandbox_lab::{SANDBOX_SSH_PORT, SANDBOX_V4, SSH_PORT, WEB_PORT},
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
/// Wall time aimed at for one measurement of the redirect and reflect cases (three programs
/// per round instead of two).
const FLOW_TARGET: Duration = Duration::from_millis(300);
/// Distinct SYNs of the new-flow case, per map size.
const NEW_FLOWS: u16 = 4000;
/// Flow events the ring buffer is drained after (it holds about 2,700): the agent drains it
/// continuously, so a full buffer would measure a path that does not happen.
const DRAIN_EVERY: u16 = 500;
/// `XDP_DROP` and `XDP_PASS` (include/uapi/linux/bpf.h).
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
/// `TC_ACT_OK`: what the rewrite returns when the FIB lookup finds no route.
const TC_ACT_OK: u32 = 0;
/// The TC runs' ingress interface: the namespace's `lo`.
const LO_IFINDEX: u32 = 1;
/// TCP PSH, for the established flows' data segments.
const PSH: u8 = 0x08;

fn main() -> Result<()> {
    tests::netns::cleanup_on_interrupt()?;
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

    // A namespace with `lo` only and no route, for the TC runs' FIB lookups (see the module
    // docs); forwarding on there lets the lookup get past its forwarding check to the routing
    // table. Deleted on return, also on failure.
    let ns = Netns::new(&format!("mirage-{}-bxdp", unique_tag()))?;
    ns.sysctl("net.ipv4.conf.all.forwarding", "1")?;
    ns.sysctl("net.ipv4.conf.lo.forwarding", "1")?;
    in_netns(ns.name(), bench)??;
    drop(ns);
    note(format!(
        "bench-xdp done in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Everything, on a thread inside the route-less namespace.
fn bench() -> Result<()> {
    let mut obj = Object::load().context("loading the eBPF object (run as root)")?;
    obj.maps.set_mode(Mode::Firewall)?;
    // Redirect and reflect come from per-attacker actions, over the firewall mode of the pass
    // and drop cases; the reflect cap is set out of reach (its accounting still runs for every
    // reflected packet).
    let mut cfg = obj.maps.config()?;
    cfg.reflect_pps = u32::MAX;
    cfg.flags |= DataPathConfig::ENABLED;
    obj.maps.set_config(&cfg)?;
    obj.maps.set_target(
        TargetKey {
            port: SSH_PORT,
            proto: tests::packet::TCP,
            family: family::V4,
        },
        Target {
            addr: addr16(SANDBOX_V4),
            port: SANDBOX_SSH_PORT,
            _pad: [0; 2],
        },
    )?;
    let mut flows = open_flows(&obj)?;
    let mut events = loader::take_flow_events(&mut obj.ebpf)?;

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

        // Redirect and reflect, from the same attacker entry with its action overridden.
        let attacker = attacker_addr(n - 1);
        for case in [FlowCase::Redirect, FlowCase::Reflect] {
            obj.maps
                .block(Net::V4(attacker, 32), AttackerEntry::new(case.action(), 0))?;
            established(&mut obj, &mut flows, case, attacker, n)?;
        }
        obj.maps.block(
            Net::V4(attacker, 32),
            AttackerEntry::new(Action::Redirect, 0),
        )?;
        new_flows(&mut obj, &mut events, attacker, n)?;
        obj.maps.block(Net::V4(attacker, 32), entry)?;
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
    Ok(())
}

/// Medians of `ROUNDS` interleaved runs of the real program and the bare one over `pkt`, in ns
/// per packet as the kernel measured them.
fn measure(obj: &mut Object, pkt: &[u8]) -> Result<(f64, f64)> {
    let repeat_x = repeat_for(obj, Prog::Xdp(programs::XDP), pkt, TARGET)?;
    let repeat_b = repeat_for(obj, Prog::Xdp(programs::BASELINE), pkt, TARGET)?;
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

/// A program to run through `BPF_PROG_TEST_RUN`.
#[derive(Clone, Copy)]
enum Prog {
    /// An XDP program, by name.
    Xdp(&'static str),
    /// The TC program, as an skb arriving on `lo`.
    Tc,
}

fn run(obj: &mut Object, prog: Prog, pkt: &[u8], repeat: u32) -> Result<tests::object::RunResult> {
    match prog {
        Prog::Xdp(name) => obj.run(name, pkt, repeat),
        Prog::Tc => obj.run_tc_repeat(pkt, repeat, LO_IFINDEX),
    }
}

/// A repeat count that makes one run of `prog` last about `target`.
fn repeat_for(obj: &mut Object, prog: Prog, pkt: &[u8], target: Duration) -> Result<u32> {
    const PROBE: u32 = 1_000_000;
    let t = Instant::now();
    run(obj, prog, pkt, PROBE)?;
    let per_run = t.elapsed().as_nanos() as f64 / f64::from(PROBE);
    Ok((target.as_nanos() as f64 / per_run.max(0.1)).clamp(1e6, 4e8) as u32)
}

/// The rewritten flows measured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlowCase {
    /// The attacker's connection to TCP 22, redirected to the sandbox's 2222
    /// (`preserve-source`: only the destination changes).
    Redirect,
    /// The attacker's connection to TCP 80, turned back to the attacker's own port 80 (both
    /// addresses change).
    Reflect,
}

impl FlowCase {
    const fn name(self) -> &'static str {
        match self {
            FlowCase::Redirect => "redirect",
            FlowCase::Reflect => "reflect",
        }
    }

    const fn action(self) -> Action {
        match self {
            FlowCase::Redirect => Action::Redirect,
            FlowCase::Reflect => Action::Reflect,
        }
    }

    /// The attacker's source port and the protected port it connects to.
    const fn ports(self) -> (u16, u16) {
        match self {
            FlowCase::Redirect => (40_000, SSH_PORT),
            FlowCase::Reflect => (40_001, WEB_PORT),
        }
    }

    /// A segment of the flow from `attacker` with `flags`, as it arrives and as the TC
    /// program must leave it.
    fn segment(self, attacker: Ipv4Addr, flags: u8, payload: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let (sport, dport) = self.ports();
        let arrives = eth_v4(attacker, HOST_V4, L4::tcp(sport, dport, flags, payload));
        let leaves = match self {
            FlowCase::Redirect => eth_v4(
                attacker,
                SANDBOX_V4,
                L4::tcp(sport, SANDBOX_SSH_PORT, flags, payload),
            ),
            FlowCase::Reflect => eth_v4(HOST_V4, attacker, L4::tcp(sport, dport, flags, payload)),
        };
        (arrives, leaves)
    }
}

/// The flow of `case` from `attacker` is opened with a SYN through both programs, then a data
/// segment of it is measured: XDP, TC, the bare program, interleaved over `ROUNDS`.
fn established(
    obj: &mut Object,
    flows: &mut HashMap<MapData, FlowKey, FlowEntry>,
    case: FlowCase,
    attacker: Ipv4Addr,
    n: u32,
) -> Result<()> {
    let name = case.name();
    let (syn, syn_out) = case.segment(attacker, SYN, b"");
    let (pkt, pkt_out) = case.segment(attacker, ACK | PSH, b"SSH-2.0-OpenSSH_9.2\r\n");
    // Open the flow, then check one segment through both programs.
    for (what, input, output) in [("syn", &syn, &syn_out), ("segment", &pkt, &pkt_out)] {
        let x = obj.run(programs::XDP, input, 1)?.action;
        let t = obj.run_tc_repeat(input, 1, LO_IFINDEX)?;
        if x != XDP_PASS || t.action != TC_ACT_OK || &t.output != output {
            bail!(
                "{name}/{n}: the {what} was not rewritten as expected (xdp {x}, tc {}, output {})",
                t.action,
                hex(&t.output)
            );
        }
    }
    // The mirror of the forward entry: the rewritten packet, rewritten back.
    let key = flow_key_v4(&pkt);
    let fwd = flows
        .get(&key, 0)
        .with_context(|| format!("{name}/{n}: no flow entry for the segment"))?;
    let mirror_key = FlowKey {
        src: fwd.src,
        dst: fwd.dst,
        sport: fwd.sport,
        dport: fwd.dport,
        ..key
    };
    let mirror = FlowEntry {
        src: key.src,
        dst: key.dst,
        sport: key.sport,
        dport: key.dport,
        ..fwd
    };
    flows
        .insert(mirror_key, mirror, 0)
        .with_context(|| format!("{name}/{n}: inserting the mirror flow entry"))?;
    // Two runs over one skb: both must rewrite (each forward ends in the FIB fallback, counted).
    let before = fib_fallbacks(obj)?;
    let t = obj.run_tc_repeat(&pkt, 2, LO_IFINDEX)?;
    let rewrites = fib_fallbacks(obj)? - before;
    if rewrites != 2 {
        bail!("{name}/{n}: {rewrites} rewrites in 2 repeated TC runs");
    }
    let reused = t.output == pkt;
    note(format!(
        "{name}/{n}: the kernel {} the skb between repetitions",
        if reused { "reuses" } else { "rebuilds" }
    ));

    let (xdp, tc, bare) = measure_flow(obj, &pkt)?;
    for record in [
        Record::cost(
            BENCH,
            format!("{name}/{n}"),
            "ns_per_packet",
            xdp + tc,
            BASELINE,
            bare,
        ),
        Record::cost(
            BENCH,
            format!("{name}-xdp/{n}"),
            "ns_per_packet",
            xdp,
            BASELINE,
            bare,
        ),
        Record::alone(BENCH, format!("{name}-tc/{n}"), "ns_per_packet", tc),
    ] {
        println!("{}", record.to_json()?);
    }
    Ok(())
}

/// Medians of `ROUNDS` interleaved runs of the XDP program, the TC program and the bare one
/// over `pkt`, in ns per packet as the kernel measured them. Every TC repetition is checked to
/// have rewritten.
fn measure_flow(obj: &mut Object, pkt: &[u8]) -> Result<(f64, f64, f64)> {
    let repeat_x = repeat_for(obj, Prog::Xdp(programs::XDP), pkt, FLOW_TARGET)?;
    let repeat_t = repeat_for(obj, Prog::Tc, pkt, FLOW_TARGET)?;
    let repeat_b = repeat_for(obj, Prog::Xdp(programs::BASELINE), pkt, FLOW_TARGET)?;
    let (mut xdp, mut tc, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        xdp.push(obj.run(programs::XDP, pkt, repeat_x)?.ns_per_run);
        let before = fib_fallbacks(obj)?;
        tc.push(obj.run_tc_repeat(pkt, repeat_t, LO_IFINDEX)?.ns_per_run);
        let rewrites = fib_fallbacks(obj)? - before;
        if rewrites != u64::from(repeat_t) {
            bail!("{rewrites} rewrites in {repeat_t} repeated TC runs");
        }
        bare.push(obj.run(programs::BASELINE, pkt, repeat_b)?.ns_per_run);
    }
    let (x, t, b) = (median(&xdp), median(&tc), median(&bare));
    note(format!(
        "  xdp {x:.0} ns (runs {xdp:?}, repeat {repeat_x}), tc {t:.0} ns (runs {tc:?}, repeat {repeat_t}), bare {b:.0} ns (runs {bare:?}, repeat {repeat_b})"
    ));
    Ok((x, t, b))
}

/// SYNs of new redirected flows from `attacker`, each through XDP and TC once, beside the bare
/// program once over the same SYN.
fn new_flows(
    obj: &mut Object,
    events: &mut RingBuf<MapData>,
    attacker: Ipv4Addr,
    n: u32,
) -> Result<()> {
    let flows_before = obj.maps.global()?.get("flow_new").copied().unwrap_or(0);
    let (mut xdp, mut tc, mut bare) = (0.0, 0.0, 0.0);
    for i in 0..NEW_FLOWS {
        let sport = 10_000 + i;
        let syn = eth_v4(attacker, HOST_V4, L4::tcp(sport, SSH_PORT, SYN, b""));
        let x = obj.run(programs::XDP, &syn, 1)?;
        let t = obj.run_tc_repeat(&syn, 1, LO_IFINDEX)?;
        if x.action != XDP_PASS || t.action != TC_ACT_OK {
            bail!(
                "redirect-new-flow/{n}: SYN {i}: xdp {}, tc {}",
                x.action,
                t.action
            );
        }
        if i == 0 {
            let want = eth_v4(
                attacker,
                SANDBOX_V4,
                L4::tcp(sport, SANDBOX_SSH_PORT, SYN, b""),
            );
            if t.output != want {
                bail!(
                    "redirect-new-flow/{n}: SYN not rewritten: {}",
                    hex(&t.output)
                );
            }
        }
        xdp += x.ns_per_run;
        tc += t.ns_per_run;
        bare += obj.run(programs::BASELINE, &syn, 1)?.ns_per_run;
        if (i + 1).is_multiple_of(DRAIN_EVERY) {
            while events.next().is_some() {}
        }
    }
    while events.next().is_some() {}
    let created = obj.maps.global()?.get("flow_new").copied().unwrap_or(0) - flows_before;
    if created != u64::from(NEW_FLOWS) {
        bail!("redirect-new-flow/{n}: {created} flows created by {NEW_FLOWS} SYNs");
    }
    let k = f64::from(NEW_FLOWS);
    let (xdp, tc, bare) = (xdp / k, tc / k, bare / k);
    note(format!(
        "  new flows: {NEW_FLOWS} SYNs, one run each: xdp {xdp:.0} ns, tc {tc:.0} ns, bare {bare:.0} ns (means)"
    ));
    for record in [
        Record::cost(
            BENCH,
            format!("redirect-new-flow/{n}"),
            "ns_per_packet",
            xdp + tc,
            BASELINE,
            bare,
        ),
        Record::alone(
            BENCH,
            format!("redirect-new-flow-tc/{n}"),
            "ns_per_packet",
            tc,
        ),
    ] {
        println!("{}", record.to_json()?);
    }
    Ok(())
}

/// The object's `FLOWS` map, opened a second time from its pin (the typed maps have no way to
/// write a flow entry: only the kernel makes them).
fn open_flows(obj: &Object) -> Result<HashMap<MapData, FlowKey, FlowEntry>> {
    let path = obj.pin_dir().join(names::FLOWS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map = Map::from_map_data(data).context("FLOWS")?;
    HashMap::try_from(map).context("FLOWS has an unexpected type")
}

/// The `FLOWS` key of an IPv4 TCP/UDP frame without options, as the kernel computes it.
fn flow_key_v4(frame: &[u8]) -> FlowKey {
    let ip = &frame[14..];
    let l4 = &ip[20..];
    let mut key = FlowKey {
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        proto: ip[9],
        family: family::V4,
        ..FlowKey::default()
    };
    key.src[..4].copy_from_slice(&ip[12..16]);
    key.dst[..4].copy_from_slice(&ip[16..20]);
    key
}

/// Rewritten packets that ended in the FIB fallback so far.
fn fib_fallbacks(obj: &Object) -> Result<u64> {
    Ok(obj.maps.global()?.get("fib_fallback").copied().unwrap_or(0))
}

fn addr16(a: Ipv4Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&a.octets());
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
