//! `bench-veth`: how fast the protected host disposes of a UDP flood across the lab's veths, and
//! what its legitimate client's TCP throughput is, with 10,000 blocked addresses in place, for
//! Mirage's XDP program and for two baselines run in the same process: one iptables rule per
//! address (what the original system did) and an nftables set.
//!
//! Each mechanism gets its own lab with only itself installed. The flooding address (the lab's
//! attacker) is the most recently blocked one: last in the iptables chain, as the original
//! appended its rules. Drops are read from the mechanism's own kernel counter. The TCP transfer
//! runs twice: alone, and under a flood of a fixed 10,000 packets/s (the defended host's real
//! job during an attack).
//!
//! XDP runs twice too: attached as the agent does by default (generic mode on veth), and forced
//! into native mode, which on veth converts every skb into an XDP buffer. The comparison lines
//! use the default; the native variant's values are printed on their own.
//!
//! The labs exist side by side and the measurements are interleaved, mechanism after mechanism,
//! for several rounds; the medians are reported. On a small shared machine the background load
//! drifts, and interleaving spreads that drift over every mechanism instead of charging it to
//! whichever ran at a bad moment.
//!
//! In the same run, the redirect into a sandbox (issue 3), through two more labs with a sandbox
//! behind the host ([`SandboxLab`], `preserve-source` routing), each with only its own mechanism:
//! Mirage's redirect (the agent in `unreal` mode, the same 10,000 addresses in its map) and the
//! original system's iptables `nat` DNAT + MASQUERADE (one DNAT rule per address and protocol, the
//! attacker's last; see [`tests::bench::redirect`]). From the attacker's namespace to the
//! protected host's address: TCP request/response transactions (connect, one-line request,
//! one-line answer, close) against the sandbox's server, and a UDP flood whose datagrams the
//! sandbox counts. Their rounds are interleaved with the others'.
//!
//! On veth, every packet crosses the stack of the sending namespace and the bridge before it
//! reaches the host, and all of it runs on the same CPUs as the flooder: these numbers show the
//! relative cost of the mechanisms, not what a NIC would do (reference/ebpf-notes.md §4.2).
//!
//! Run as root after `cargo build --release -p agent -p tests --bins`, with
//! `MIRAGE_BIN_DIR=target/release target/release/bench-veth` (or `cargo xtask bench`).
#![allow(
    clippy::print_stdout,
    reason = "benchmark results go to stdout by contract"
)]

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use tests::{
    bench::{
        Record, attacker_addr, flood, iperf,
        mechanism::{Installed, Mechanism},
        median, note,
        redirect::{self, Redirector, RrServer, TCP_DST, UDP_DST, UdpSink},
    },
    lab::{ATTACKER_V4, HOST_V4, Lab},
    probe::in_netns,
    sandbox_lab::{RedirectModel, SANDBOX_DNS_PORT, SANDBOX_SSH_PORT, SANDBOX_V4, SandboxLab},
};

const BENCH: &str = "veth";
/// Blocked addresses.
const BLOCKED: u32 = 10_000;
/// The flood's destination port; a socket in the host namespace sinks it, so anything that got
/// through would not be answered with ICMP port-unreachable.
const FLOOD_PORT: u16 = 9;
/// Rounds over the mechanisms; medians are reported.
const ROUNDS: usize = 3;
/// Length of one measured flood.
const FLOOD: Duration = Duration::from_secs(3);
/// Length of each flood tried when choosing the number of flooder threads.
const PROBE_FLOOD: Duration = Duration::from_millis(1500);
/// Length of one TCP transfer, in seconds (after one omitted second of slow start).
const TCP_SECONDS: u32 = 2;
/// Packets per second of the flood that runs under the TCP transfer: the same for every
/// mechanism, and below what one iptables rule per address can drop with 10,000 rules (about
/// 15,000/s here), so that every mechanism faces the whole of it. Unpaced, the flood's rate
/// would depend on the mechanism, since the sender shares the receiver's CPUs.
const UNDER_FLOOD_RATE: f64 = 10_000.0;
/// Upper bound of the flood that runs under the TCP transfer (it stops when the transfer ends).
const MAX_FLOOD: Duration = Duration::from_secs(30);
/// Time for packets still in flight to reach the counters after the flood stops.
const DRAIN: Duration = Duration::from_millis(300);

/// Length of one TCP request/response run through the redirect.
const RR: Duration = Duration::from_secs(4);
/// Request/response client threads (each does one transaction at a time).
const RR_CLIENTS: usize = 2;
/// Threads of the sandbox's request/response server.
const RR_SERVERS: usize = 2;
/// Length of one UDP flood through the redirect.
const REDIRECT_FLOOD: Duration = Duration::from_secs(3);
/// Flooder threads through the redirect: one, so that the other core is left to the
/// forwarding and to the sandbox's sink.
const REDIRECT_FLOOD_THREADS: usize = 1;

const REDIRECTORS: [Redirector; 2] = [Redirector::Mirage, Redirector::IptablesDnat];

const MECHANISMS: [Mechanism; 4] = [
    Mechanism::Xdp,
    Mechanism::XdpNative,
    Mechanism::IptablesPerIp,
    Mechanism::NftSet,
];

/// One mechanism in its own lab. Fields drop in order: the mechanism first (the agent detaches
/// and unpins, the rules are flushed), then the sink, then the lab's namespaces.
struct Case {
    installed: Installed,
    _sink: UdpSocket,
    lab: Lab,
    mech: Mechanism,
    description: String,
    samples: Samples,
}

/// What each round measured.
#[derive(Default)]
struct Samples {
    offered: Vec<f64>,
    drops: Vec<f64>,
    tcp: Vec<f64>,
    tcp_under_flood: Vec<f64>,
}

/// One redirect mechanism in its own sandbox lab. Fields drop in order: the mechanism (the
/// agent detaches and unpins; the rules are flushed), the sandbox's servers, then the lab.
struct RedirectCase {
    installed: redirect::Installed,
    rr_server: RrServer,
    sink: UdpSink,
    lab: SandboxLab,
    mech: Redirector,
    description: String,
    samples: RedirectSamples,
}

/// What each round measured through the redirect.
#[derive(Default)]
struct RedirectSamples {
    rr: Vec<f64>,
    rr_errors: Vec<u64>,
    offered: Vec<f64>,
    received: Vec<f64>,
    rx_frames: Vec<f64>,
}

fn main() -> Result<()> {
    tests::netns::cleanup_on_interrupt()?;
    let started = Instant::now();
    for tool in ["iptables-restore", "nft", "iperf3"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            bail!(
                "`{tool}` not found; install it with `apt-get install -y iptables nftables iperf3`"
            );
        }
    }

    // 9,999 made-up addresses, then the attacker: the most recently blocked.
    let blocked: Vec<Ipv4Addr> = (0..BLOCKED - 1)
        .map(attacker_addr)
        .chain([ATTACKER_V4])
        .collect();

    let mut cases = Vec::new();
    for mech in MECHANISMS {
        cases.push(setup(mech, &blocked)?);
    }
    let mut redirects = Vec::new();
    for mech in REDIRECTORS {
        redirects.push(setup_redirect(mech, &blocked)?);
    }

    // Two cores: a second flooder thread may raise the offered rate, or only contend with the
    // first for the CPU that also does the receiving. Measure both (against XDP) and keep the
    // faster for every case.
    let threads = {
        let attacker = cases[0].lab.attacker.name();
        let mut best = (0.0, 1);
        for n in [1, 2] {
            let r = flood_once(attacker, n, None, PROBE_FLOOD, &AtomicBool::new(false))?;
            let rate = r.offered_per_second();
            note(format!(
                "probe: {n} flooder thread(s) offer {rate:.0} packets/s"
            ));
            if rate > best.0 {
                best = (rate, n);
            }
        }
        thread::sleep(DRAIN);
        best.1
    };
    note(format!("using {threads} flooder thread(s) for every case"));

    for round in 1..=ROUNDS {
        note(format!("== round {round}/{ROUNDS} =="));
        for case in &mut cases {
            measure(case, threads)?;
        }
        // Alternate which redirect mechanism goes first.
        let n = redirects.len();
        for i in 0..n {
            let i = if round % 2 == 1 { i } else { n - 1 - i };
            measure_redirect(&mut redirects[i])?;
        }
    }

    emit(&cases)?;
    emit_redirect(&redirects)?;
    summary(&cases, threads);
    summary_redirect(&redirects);
    drop(redirects);
    drop(cases);
    note(format!(
        "bench-veth done in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Builds a lab with a UDP sink on the host and `mech` installed alone.
fn setup(mech: Mechanism, blocked: &[Ipv4Addr]) -> Result<Case> {
    let lab = Lab::new().context("building the lab")?;
    let sink = in_netns(lab.host.name(), || {
        UdpSocket::bind((HOST_V4, FLOOD_PORT)).context("binding the UDP sink in the host namespace")
    })??;
    let t = Instant::now();
    let installed = Installed::install(mech, &lab, blocked)?;
    let description = installed.describe();
    note(format!(
        "{}: {description} ({} addresses installed in {:.2} s, lab {})",
        mech.name(),
        blocked.len(),
        t.elapsed().as_secs_f64(),
        lab.host.name()
    ));
    Ok(Case {
        installed,
        _sink: sink,
        lab,
        mech,
        description,
        samples: Samples::default(),
    })
}

/// Floods the host from the attacker namespace `ns` with `threads` threads at `rate` packets
/// per second (`None`: as fast as they can).
fn flood_once(
    ns: &str,
    threads: usize,
    rate: Option<f64>,
    duration: Duration,
    stop: &AtomicBool,
) -> Result<flood::FloodReport> {
    let flood = flood::Flood {
        ns,
        src: ATTACKER_V4,
        dst: SocketAddrV4::new(HOST_V4, FLOOD_PORT),
        threads,
        rate,
    };
    flood.run(duration, stop)
}

/// One round for one mechanism: the flood alone, TCP alone, TCP under the flood.
fn measure(case: &mut Case, threads: usize) -> Result<()> {
    let name = case.mech.name();
    let attacker = case.lab.attacker.name().to_owned();
    let before = case.installed.drops()?;
    let report = flood_once(&attacker, threads, None, FLOOD, &AtomicBool::new(false))?;
    thread::sleep(DRAIN);
    let dropped = case.installed.drops()?.saturating_sub(before);
    if dropped == 0 {
        bail!("{name} dropped nothing of the flood");
    }
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    let drops = dropped as f64 / secs;
    let offered = report.offered_per_second();
    note(format!(
        "{name:<18} flood {secs:.2} s: sent {} ({offered:.0}/s, {} failed sendmmsg calls), dropped {dropped} ({drops:.0}/s, {:.1}% of sent)",
        report.sent,
        report.errors,
        100.0 * dropped as f64 / (report.sent as f64).max(1.0),
    ));

    let tcp = iperf::legit_throughput(&mut case.lab, TCP_SECONDS)?;
    note(format!(
        "{name:<18} legitimate TCP: {:.2} Gbit/s",
        tcp / 1e9
    ));

    // The same transfer under a flood of the same fixed rate for every mechanism; the flood
    // stops when the transfer is done.
    let stop = AtomicBool::new(false);
    let (tcp_flood, flood_report) = thread::scope(|s| {
        let flood = s.spawn(|| flood_once(&attacker, 1, Some(UNDER_FLOOD_RATE), MAX_FLOOD, &stop));
        thread::sleep(DRAIN);
        let bps = iperf::legit_throughput(&mut case.lab, TCP_SECONDS);
        stop.store(true, Ordering::Relaxed);
        let report = flood
            .join()
            .map_err(|_| anyhow!("flood thread panicked"))
            .and_then(|r| r);
        (bps, report)
    });
    let (tcp_flood, flood_report) = (tcp_flood?, flood_report?);
    note(format!(
        "{name:<18} legitimate TCP under a {:.0} packets/s flood: {:.2} Gbit/s",
        flood_report.offered_per_second(),
        tcp_flood / 1e9
    ));

    let s = &mut case.samples;
    s.offered.push(offered);
    s.drops.push(drops);
    s.tcp.push(tcp);
    s.tcp_under_flood.push(tcp_flood);
    Ok(())
}

/// The JSON lines: per mechanism the offered rate; XDP (as the agent attaches it by default)
/// against each baseline; and the forced-native XDP variant's own values.
fn emit(cases: &[Case]) -> Result<()> {
    let flood_case = format!("udp-flood-drop/{BLOCKED}");
    let tcp_case = format!("legit-tcp-throughput/{BLOCKED}");
    let tcp_flood_case = format!(
        "legit-tcp-throughput-under-flood-{}kpps/{BLOCKED}",
        UNDER_FLOOD_RATE / 1000.0
    );
    let metrics = |s: &Samples| {
        [
            (flood_case.clone(), "drops_per_second", median(&s.drops)),
            (tcp_case.clone(), "bits_per_second", median(&s.tcp)),
            (
                tcp_flood_case.clone(),
                "bits_per_second",
                median(&s.tcp_under_flood),
            ),
        ]
    };
    for c in cases {
        let r = Record::alone(
            BENCH,
            format!("{flood_case}/{}", c.mech.name()),
            "offered_packets_per_second",
            median(&c.samples.offered),
        );
        println!("{}", r.to_json()?);
    }
    let xdp = cases
        .iter()
        .find(|c| c.mech == Mechanism::Xdp)
        .context("no XDP case")?;
    for c in cases {
        match c.mech {
            Mechanism::Xdp => {}
            Mechanism::XdpNative => {
                for (case, metric, value) in metrics(&c.samples) {
                    let r =
                        Record::alone(BENCH, format!("{case}/{}", c.mech.name()), metric, value);
                    println!("{}", r.to_json()?);
                }
            }
            Mechanism::IptablesPerIp | Mechanism::NftSet => {
                for ((case, metric, value), (_, _, base)) in
                    metrics(&xdp.samples).into_iter().zip(metrics(&c.samples))
                {
                    let r = Record::rate(BENCH, case, metric, value, c.mech.name(), base);
                    println!("{}", r.to_json()?);
                }
            }
        }
    }
    Ok(())
}

/// The raw medians of every mechanism, for the reader.
fn summary(cases: &[Case], threads: usize) {
    note(format!(
        "\nsummary (medians of {ROUNDS} rounds): {BLOCKED} blocked addresses, the flooder last; {threads} flooder thread(s); veth, CPUs shared by everything"
    ));
    note(format!(
        "{:<18} {:>14} {:>14} {:>8} {:>17} {:>28}",
        "mechanism",
        "offered pkt/s",
        "dropped pkt/s",
        "dropped",
        "legit TCP Gbit/s",
        format!("... under {UNDER_FLOOD_RATE:.0} pkt/s flood"),
    ));
    for c in cases {
        let s = &c.samples;
        let (offered, drops) = (median(&s.offered), median(&s.drops));
        note(format!(
            "{:<18} {:>14.0} {:>14.0} {:>7.1}% {:>17.2} {:>28.2}",
            c.mech.name(),
            offered,
            drops,
            100.0 * drops / offered.max(1e-9),
            median(&s.tcp) / 1e9,
            median(&s.tcp_under_flood) / 1e9,
        ));
    }
    for c in cases {
        note(format!("  {}: {}", c.mech.name(), c.description));
    }
    note(
        "  On veth the flooder's own sending and the bridge run on the same CPUs as the receiver: \
         where nearly all of what was sent is dropped, the sending side set the pace and the \
         mechanism could take more. The TCP transfer under the flood faces the same paced \
         flood for every mechanism.",
    );
}

/// Builds a sandbox lab with the sandbox's servers and `mech` installed alone, and checks that
/// the attacker's TCP lands in the sandbox, seen from the expected address.
fn setup_redirect(mech: Redirector, attackers: &[Ipv4Addr]) -> Result<RedirectCase> {
    let lab = SandboxLab::new(RedirectModel::PreserveSource).context("building the sandbox lab")?;
    redirect::tune_client(&lab)?;
    let sandbox = lab.sandbox.name().to_owned();
    let rr_server = RrServer::start(
        &sandbox,
        SocketAddr::new(SANDBOX_V4.into(), SANDBOX_SSH_PORT),
        RR_SERVERS,
    )?;
    let sink = UdpSink::start(
        &sandbox,
        SocketAddr::new(SANDBOX_V4.into(), SANDBOX_DNS_PORT),
    )?;
    let t = Instant::now();
    let installed = redirect::Installed::install(mech, &lab, attackers)?;
    let took = t.elapsed();
    redirect::check_tcp(lab.lab.attacker.name(), mech.sandbox_sees())
        .with_context(|| format!("{}: the redirect does not work", mech.name()))?;
    let description = installed.describe();
    note(format!(
        "{}: {description} ({} addresses installed in {:.2} s, lab {}); the attacker's TCP to {TCP_DST} reaches the sandbox, which sees {}",
        mech.name(),
        attackers.len(),
        took.as_secs_f64(),
        lab.lab.host.name(),
        mech.sandbox_sees(),
    ));
    Ok(RedirectCase {
        installed,
        rr_server,
        sink,
        lab,
        mech,
        description,
        samples: RedirectSamples::default(),
    })
}

/// One round for one redirect mechanism: TCP request/response, then the UDP flood.
fn measure_redirect(case: &mut RedirectCase) -> Result<()> {
    let name = case.mech.name();
    let attacker = case.lab.lab.attacker.name().to_owned();

    let served = case.rr_server.served();
    let rr = redirect::tcp_rr(&attacker, TCP_DST, RR_CLIENTS, RR)?;
    if rr.transactions == 0 {
        bail!(
            "{name}: no TCP transaction through the redirect ({} failed)",
            rr.errors
        );
    }
    note(format!(
        "{name:<24} tcp request/response {:.2} s: {} transactions ({:.0}/s), {} failed, the sandbox served {}",
        rr.elapsed.as_secs_f64(),
        rr.transactions,
        rr.per_second(),
        rr.errors,
        case.rr_server.served() - served,
    ));

    let (before, rx_before) = (
        case.sink.received(),
        redirect::sandbox_rx_packets(&case.lab)?,
    );
    let report = flood::Flood {
        ns: &attacker,
        src: ATTACKER_V4,
        dst: UDP_DST,
        threads: REDIRECT_FLOOD_THREADS,
        rate: None,
    }
    .run(REDIRECT_FLOOD, &AtomicBool::new(false))?;
    thread::sleep(DRAIN);
    let received = case.sink.received() - before;
    let rx = redirect::sandbox_rx_packets(&case.lab)?.saturating_sub(rx_before);
    if received == 0 {
        bail!("{name}: the sandbox received nothing of the UDP flood");
    }
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    let offered = report.offered_per_second();
    note(format!(
        "{name:<24} udp flood {secs:.2} s: sent {} ({offered:.0}/s, {} failed sendmmsg calls), the sandbox's sink received {received} ({:.0}/s, {:.1}% of sent), its interface {rx} frames",
        report.sent,
        report.errors,
        received as f64 / secs,
        100.0 * received as f64 / (report.sent as f64).max(1.0),
    ));

    let s = &mut case.samples;
    s.rr.push(rr.per_second());
    s.rr_errors.push(rr.errors);
    s.offered.push(offered);
    s.received.push(received as f64 / secs);
    s.rx_frames.push(rx as f64 / secs);
    Ok(())
}

/// The redirect's JSON lines: each mechanism's offered UDP rate, then Mirage against the
/// iptables baseline for the TCP transaction rate and the UDP rate the sandbox received.
fn emit_redirect(cases: &[RedirectCase]) -> Result<()> {
    let rr_case = format!("tcp-rr/{BLOCKED}");
    let udp_case = format!("udp-redirect/{BLOCKED}");
    for c in cases {
        let r = Record::alone(
            BENCH,
            format!("{udp_case}/{}", c.mech.name()),
            "offered_packets_per_second",
            median(&c.samples.offered),
        );
        println!("{}", r.to_json()?);
    }
    let find = |mech| {
        cases
            .iter()
            .find(|c| c.mech == mech)
            .with_context(|| format!("no {} case", mech.name()))
    };
    let (mirage, base) = (find(Redirector::Mirage)?, find(Redirector::IptablesDnat)?);
    for (case, metric, value, baseline) in [
        (
            &rr_case,
            "transactions_per_second",
            median(&mirage.samples.rr),
            median(&base.samples.rr),
        ),
        (
            &udp_case,
            "packets_per_second",
            median(&mirage.samples.received),
            median(&base.samples.received),
        ),
    ] {
        let r = Record::rate(BENCH, case, metric, value, base.mech.name(), baseline);
        println!("{}", r.to_json()?);
    }
    Ok(())
}

/// The redirect's raw medians, for the reader.
fn summary_redirect(cases: &[RedirectCase]) {
    note(format!(
        "\nredirect (medians of {ROUNDS} rounds): {BLOCKED} attacker addresses, the benchmark attacker last; \
         {RR_CLIENTS} request/response clients, {REDIRECT_FLOOD_THREADS} flooder thread(s)"
    ));
    note(format!(
        "{:<26} {:>12} {:>10} {:>14} {:>14} {:>9} {:>15}",
        "mechanism",
        "tcp trans/s",
        "failed",
        "offered pkt/s",
        "sandbox pkt/s",
        "received",
        "sandbox rx fr/s"
    ));
    for c in cases {
        let s = &c.samples;
        let (offered, received) = (median(&s.offered), median(&s.received));
        note(format!(
            "{:<26} {:>12.0} {:>10} {:>14.0} {:>14.0} {:>8.1}% {:>15.0}",
            c.mech.name(),
            median(&s.rr),
            s.rr_errors.iter().sum::<u64>(),
            offered,
            received,
            100.0 * received / offered.max(1e-9),
            median(&s.rx_frames),
        ));
        note(format!(
            "  rounds: tcp {:?} /s, sandbox udp {:?} /s",
            round0(&s.rr),
            round0(&s.received)
        ));
    }
    for c in cases {
        note(format!("  {}: {}", c.mech.name(), c.description));
        note(format!("  {}: {}", c.mech.name(), c.installed.counters()));
    }
}

fn round0(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.round()).collect()
}
