//! `bench-detect`: log lines per second per core through mirage-server's whole ingestion path
//! (RFC 6587 frame decoding, RFC 5424 parsing, and detection with the built-in rule packs and the
//! in-memory counting state), beside `fail2ban-regex` (Debian's `fail2ban`) with its `sshd`
//! filter on the same sshd log, in the same run.
//!
//! Cases (one JSON line each on stdout, progress on stderr):
//! - `sshd/full-packs`: the corpus `sshd/auth.log` replayed to 200,000 lines, shipped as the agent
//!   ships them (each line the MSG of an RFC 5424 message, octet-counted) but without a service,
//!   so that every rule of every pack is tried on every line (the worst case: a relay whose
//!   program names map to no service);
//! - `sshd/sshd-pack`: the same lines tagged `service="sshd"`, so only the sshd pack runs (what an
//!   agent's lines get);
//! - `corpus/full-packs` and `corpus/by-service`: every file of every service of the corpus
//!   replayed to over 1,000,000 lines, without and with their service; no baseline;
//! - `corpus/peak-rss`: the process's peak resident set (`VmHWM`) after the corpus cases.
//!
//! The metric is lines per CPU-second of the one thread doing the work
//! (`CLOCK_THREAD_CPUTIME_ID`; the detector runs on a current-thread tokio runtime, which it
//! only needs for its PostgreSQL backend), the median of [`RUNS`] runs. Building the frames is
//! not timed (it is the agent's work): each replay is built, then fed to one decoder that lives
//! for the whole run, in batches of [`BATCH`] records like the listeners' channel. Rule
//! compilation is not timed either. fail2ban-regex runs as a child process on the first
//! [`F2B_LINES`] of the same lines (written to a file); its figure is lines per CPU-second of
//! the child (user + system, `getrusage(RUSAGE_CHILDREN)`), minus the CPU of its start-up (Python,
//! loading the filter: a run over a one-line file), which favours it.
//!
//! Each replay gets its own addresses (`10.77.0.X` → `10.77.k.X`, `fd77::` → `fd77:k::`) so that
//! replays do not add up into one source's windows: a legitimate client's two failed passwords a
//! replay would otherwise become a brute force after three replays. Every run is checked against
//! the corpus ground truth (`server/tests/corpus/MANIFEST.md`) for every replay: each
//! service's attackers flagged, the legitimate client never; fail2ban-regex must match lines
//! and name both sshd attackers. A fast wrong detector is not a benchmark.
#![allow(
    clippy::print_stdout,
    reason = "benchmark results go to stdout by contract"
)]

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use server::{
    RuleSet,
    config::LimitsConfig,
    detect::{Detector, MemoryState, NeverFlag, State},
    record::{LogRecord, Origin},
    syslog::{Decoder, Event, format_rfc5424, frame_octet_counted, parse_message},
    verdict::Verdict,
};
use tests::bench::{Record, median, note};
use tokio::runtime::Runtime;

const BENCH: &str = "detect";
const BASELINE: &str = "fail2ban-regex-sshd";
const METRIC: &str = "lines_per_sec_per_core";

/// Lines of the sshd cases (the auth.log replayed).
const SSHD_LINES: usize = 200_000;
/// Lines fail2ban-regex reads per run (about 2 s of its time).
const F2B_LINES: usize = 50_000;
/// At least this many lines in the corpus cases.
const CORPUS_LINES: usize = 1_000_000;
/// Timed runs per figure; the median is reported.
const RUNS: usize = 3;
/// Records per `Detector::process` call.
const BATCH: usize = 1000;
/// (rule, source) windows the in-memory state may hold, as in the server's default.
const MAX_KEYS: usize = 2_000_000;
/// Arrival time: an hour after the corpus was captured (2026-11-28 02:00 UTC), as in the
/// server's corpus tests; every line's own timestamp is earlier.
const NOW: i64 = 1_795_831_200 + 3600;
/// The filter fail2ban-regex runs, as Debian installs it.
const F2B_FILTER: &str = "/etc/fail2ban/filter.d/sshd.conf";
/// The sshd log of the sshd cases.
const SSHD_FILE: &str = "sshd/auth.log";
/// The agent's name (certificate) and the HOSTNAME of every message.
const HOST: &str = "bench-host";
/// The APP-NAME of every message; it maps to no service, so the service is the SD parameter's.
const APP: &str = "mirage-agent";

/// `CASES` (service, files, attackers) and `LEGIT`, the corpus ground truth.
#[path = "../../../server/tests/common/ground_truth.rs"]
mod ground_truth;
use ground_truth::{CASES, LEGIT};

fn main() -> Result<()> {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .context("building the tokio runtime")?;
    let rules = Arc::new(RuleSet::builtin().context("loading the built-in rule packs")?);
    note(format!(
        "bench-detect: {} built-in rules; corpus {}",
        rules.rules().len(),
        corpus().display()
    ));

    sshd_cases(&rt, &rules)?;
    corpus_cases(&rt, &rules)?;

    let hwm = peak_rss_kib()?;
    emit(&Record::alone(
        BENCH,
        "corpus/peak-rss",
        "peak_rss_mib",
        hwm as f64 / 1024.0,
    ))?;
    note(format!(
        "bench-detect done in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The sshd cases: Mirage with every pack on every line and with the sshd pack only, and
/// fail2ban-regex on the same lines.
fn sshd_cases(rt: &Runtime, rules: &Arc<RuleSet>) -> Result<()> {
    let base = lines(SSHD_FILE)?;
    let replays = SSHD_LINES.div_ceil(base.len());
    let inputs = [Input {
        service: "sshd",
        attackers: CASES[0].2,
        lines: &base,
    }];

    let f2b = fail2ban(&base)?;

    for (case, tagged) in [("sshd/full-packs", false), ("sshd/sshd-pack", true)] {
        let rate = mirage(rt, rules, case, &inputs, replays, tagged)?;
        emit(&Record::rate(BENCH, case, METRIC, rate, BASELINE, f2b))?;
    }
    Ok(())
}

/// The corpus cases: every service's files, without and with their service.
fn corpus_cases(rt: &Runtime, rules: &Arc<RuleSet>) -> Result<()> {
    let mut files = Vec::new();
    for (service, names, attackers) in CASES {
        let mut all = Vec::new();
        for name in *names {
            all.extend(lines(name)?);
        }
        files.push((*service, *attackers, all));
    }
    let inputs: Vec<Input<'_>> = files
        .iter()
        .map(|(service, attackers, lines)| Input {
            service,
            attackers,
            lines,
        })
        .collect();
    let per_replay: usize = inputs.iter().map(|i| i.lines.len()).sum();
    let replays = CORPUS_LINES.div_ceil(per_replay);
    for (case, tagged) in [("corpus/full-packs", false), ("corpus/by-service", true)] {
        let rate = mirage(rt, rules, case, &inputs, replays, tagged)?;
        emit(&Record::alone(BENCH, case, METRIC, rate))?;
    }
    Ok(())
}

/// One service's lines (one replay) and its ground truth.
struct Input<'a> {
    service: &'a str,
    attackers: &'a [&'a str],
    lines: &'a [String],
}

/// Runs Mirage [`RUNS`] times over `replays` replays of `inputs` and returns the median lines
/// per CPU-second. `tagged`: messages name their service; otherwise none (every rule).
fn mirage(
    rt: &Runtime,
    rules: &Arc<RuleSet>,
    case: &str,
    inputs: &[Input<'_>],
    replays: usize,
    tagged: bool,
) -> Result<f64> {
    let mut rates = Vec::with_capacity(RUNS);
    for run in 1..=RUNS {
        let out = mirage_run(rt, rules, inputs, replays, tagged)
            .with_context(|| format!("{case}, run {run}"))?;
        check_ground_truth(&out.verdicts, inputs, replays).with_context(|| {
            format!("{case}, run {run}: the verdicts contradict the corpus ground truth")
        })?;
        let cpu = out.cpu.as_secs_f64();
        let rate = out.lines as f64 / cpu.max(1e-9);
        note(format!(
            "  {case} run {run}: {} lines ({replays} replays) in {cpu:.2} s CPU ({:.2} s wall): \
             {rate:.0} lines/s/core; {} verdicts, {} matches, {} pending session lines left",
            out.lines,
            out.wall.as_secs_f64(),
            out.verdicts.len(),
            out.hits,
            out.pending,
        ));
        rates.push(rate);
    }
    Ok(median(&rates))
}

/// What one Mirage run did.
struct MirageRun {
    lines: u64,
    cpu: Duration,
    wall: Duration,
    verdicts: Vec<Verdict>,
    hits: u64,
    pending: usize,
}

/// One run: a fresh detector, one decoder for the whole stream. Each replay's frames are built
/// untimed, then decoded, parsed and detected on this thread with its CPU clock running.
fn mirage_run(
    rt: &Runtime,
    rules: &Arc<RuleSet>,
    inputs: &[Input<'_>],
    replays: usize,
    tagged: bool,
) -> Result<MirageRun> {
    let mut detector = Detector::new(
        Arc::clone(rules),
        State::Memory(MemoryState::new(MAX_KEYS)),
        NeverFlag::default(),
    )
    .context("creating the detector")?;
    let mut decoder = Decoder::new(LimitsConfig::default().max_message_bytes);
    let origin = Origin::Agent {
        name: HOST.to_owned(),
    };
    let peer = SocketAddr::from(([127, 0, 0, 1], 6514));
    let mut batch: Vec<LogRecord> = Vec::with_capacity(BATCH);
    let mut verdicts = Vec::new();
    let mut lines = 0u64;
    let mut cpu = Duration::ZERO;
    let mut wall = Duration::ZERO;
    let mut frames = Vec::new();

    for k in 0..replays {
        frames.clear();
        for input in inputs {
            let service = if tagged { input.service } else { "" };
            for line in input.lines {
                let msg = format_rfc5424(service, HOST, APP, &vary(line, k), NOW);
                frames.extend_from_slice(&frame_octet_counted(&msg));
                lines += 1;
            }
        }

        let (cpu0, wall0) = (thread_cpu()?, Instant::now());
        let mut input = frames.as_slice();
        while let Some(event) = decoder.next_event(&mut input) {
            let Event::Frame(raw) = event else {
                bail!("the decoder did not return a frame: {event:?}");
            };
            let record = parse_message(&raw, origin.clone(), peer)
                .with_context(|| format!("parsing {}", String::from_utf8_lossy(&raw)))?;
            batch.push(record);
            if batch.len() == BATCH {
                let records = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                verdicts.extend(rt.block_on(detector.process(records, NOW))?);
            }
        }
        if k + 1 == replays {
            ensure!(decoder.finish().is_none(), "the stream ends inside a frame");
            verdicts.extend(rt.block_on(detector.process(std::mem::take(&mut batch), NOW))?);
            // Session lines whose binding came later in the same batch resolve now.
            verdicts.extend(rt.block_on(detector.process(Vec::new(), NOW))?);
        }
        cpu += thread_cpu()?.saturating_sub(cpu0);
        wall += wall0.elapsed();
    }
    let stats = detector.stats();
    ensure!(
        stats.records == lines,
        "the detector saw {} records of {lines} lines sent",
        stats.records
    );
    Ok(MirageRun {
        lines,
        cpu,
        wall,
        verdicts,
        hits: stats.hits,
        pending: detector.pending(),
    })
}

/// The line with replay `k`'s addresses: `10.77.0.X` → `10.(77 + k / 256).(k % 256).X` and
/// `fd77::` → `fd77:k::` (replay 0 is the corpus as captured).
fn vary(line: &str, k: usize) -> String {
    if k == 0 {
        return line.to_owned();
    }
    line.replace("10.77.0.", &format!("10.{}.{}.", 77 + k / 256, k % 256))
        .replace("fd77::", &format!("fd77:{k:x}::"))
}

/// Every replay's attackers flagged by a rule of their service, and no verdict at all on the
/// legitimate client.
fn check_ground_truth(verdicts: &[Verdict], inputs: &[Input<'_>], replays: usize) -> Result<()> {
    let flagged: HashSet<(&str, &str)> = verdicts
        .iter()
        .map(|v| (v.service.as_str(), v.addr.as_str()))
        .collect();
    let any: HashSet<&str> = verdicts.iter().map(|v| v.addr.as_str()).collect();
    for k in 0..replays {
        for input in inputs {
            for attacker in input.attackers {
                let addr = vary(attacker, k);
                ensure!(
                    flagged.contains(&(input.service, addr.as_str())),
                    "{}: attacker {addr} (replay {k}) not flagged",
                    input.service
                );
            }
        }
        for legit in LEGIT {
            let addr = vary(legit, k);
            if any.contains(addr.as_str()) {
                let rules: Vec<&str> = verdicts
                    .iter()
                    .filter(|v| v.addr == addr)
                    .map(|v| v.rule.as_str())
                    .collect();
                bail!("legitimate client {addr} (replay {k}) flagged by {rules:?}");
            }
        }
    }
    Ok(())
}

/// fail2ban-regex with Debian's sshd filter over the first [`F2B_LINES`] lines of the sshd
/// replay: the median lines per CPU-second (start-up excluded) of [`RUNS`] runs.
fn fail2ban(base: &[String]) -> Result<f64> {
    let version = Command::new("fail2ban-regex")
        .arg("--version")
        .output()
        .context(
            "running fail2ban-regex; install Debian's fail2ban (`cargo xtask bench detect` does)",
        )?;
    note(format!(
        "baseline: {} with {F2B_FILTER}",
        String::from_utf8_lossy(&version.stdout).trim()
    ));
    ensure!(
        Path::new(F2B_FILTER).is_file(),
        "{F2B_FILTER} is missing: is Debian's fail2ban installed?"
    );

    // Correctness first, on the corpus file as captured: the attackers' failures are matched.
    let one = TempFile::new("replay0", base.iter().map(String::as_str))?;
    let out = capture_f2b(&["-o", "ip"], one.path())?;
    let ips: HashSet<&str> = out.stdout.lines().map(str::trim).collect();
    for attacker in CASES[0].2 {
        ensure!(
            ips.contains(attacker),
            "fail2ban-regex did not match any line of the sshd attacker {attacker}"
        );
    }

    // Start-up cost: a one-line file.
    let first = TempFile::new("one-line", base.iter().take(1).map(String::as_str))?;
    let mut startup = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        startup.push(capture_f2b(&[], first.path())?.cpu.as_secs_f64());
    }
    let startup = median(&startup);

    let replays = F2B_LINES.div_ceil(base.len());
    let lines: Vec<String> = (0..replays)
        .flat_map(|k| base.iter().map(move |l| vary(l, k)))
        .take(F2B_LINES)
        .collect();
    let file = TempFile::new("sshd", lines.iter().map(String::as_str))?;
    let mut rates = Vec::with_capacity(RUNS);
    for run in 1..=RUNS {
        let out = capture_f2b(&[], file.path())?;
        let (total, matched) = f2b_counts(&out.stdout)
            .with_context(|| format!("no `Lines:` summary in its output:\n{}", out.stdout))?;
        ensure!(
            total == lines.len(),
            "fail2ban-regex read {total} lines of {}",
            lines.len()
        );
        ensure!(matched > 0, "fail2ban-regex matched no line");
        let cpu = out.cpu.as_secs_f64();
        let rate = total as f64 / (cpu - startup).max(1e-9);
        note(format!(
            "  fail2ban-regex run {run}: {total} lines, {matched} matched, {cpu:.2} s CPU \
             (user+sys of the child, {startup:.2} s of it start-up, not counted), {:.2} s wall; \
             its own timer says {}: {rate:.0} lines/s/core",
            out.wall.as_secs_f64(),
            out.stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix("[processed in "))
                .map_or("nothing", |s| s.trim_end_matches(']')),
        ));
        rates.push(rate);
    }
    Ok(median(&rates))
}

/// What one fail2ban-regex run printed and cost.
struct F2bRun {
    stdout: String,
    cpu: Duration,
    wall: Duration,
}

/// Runs `fail2ban-regex ARGS FILE FILTER` to completion and measures the child's CPU.
fn capture_f2b(args: &[&str], file: &Path) -> Result<F2bRun> {
    let before = children_cpu()?;
    let wall = Instant::now();
    let out = Command::new("fail2ban-regex")
        .args(args)
        .arg(file)
        .arg(F2B_FILTER)
        .output()
        .context("running fail2ban-regex")?;
    let wall = wall.elapsed();
    let cpu = children_cpu()?.saturating_sub(before);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "fail2ban-regex {args:?} {} failed ({}): {}{}",
            file.display(),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(F2bRun { stdout, cpu, wall })
}

/// (lines, matched) from fail2ban-regex's `Lines: 625 lines, 216 ignored, 189 matched, 220
/// missed`.
fn f2b_counts(stdout: &str) -> Option<(usize, usize)> {
    let summary = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("Lines:"))?;
    let count = |what: &str| {
        summary.split(',').find_map(|part| {
            let (n, word) = part.trim().split_once(' ')?;
            (word == what).then(|| n.parse().ok()).flatten()
        })
    };
    Some((count("lines")?, count("matched")?))
}

/// A file of lines in the temporary directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new<'a>(name: &str, lines: impl Iterator<Item = &'a str>) -> Result<Self> {
        let path = std::env::temp_dir().join(format!(
            "mirage-bench-detect-{}-{name}.log",
            std::process::id()
        ));
        let mut text = String::new();
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The corpus directory of the server's tests (ground truth in its MANIFEST.md).
fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/tests/corpus")
}

/// The non-blank lines of one corpus file, as an agent reads them (CR before LF dropped,
/// invalid UTF-8 replaced; blank lines are not shipped).
fn lines(file: &str) -> Result<Vec<String>> {
    let path = corpus().join(file);
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes)
        .lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect())
}

/// CPU time of the calling thread.
fn thread_cpu() -> Result<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("clock_gettime(THREAD_CPUTIME)");
    }
    Ok(Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    ))
}

/// User + system CPU of every waited-for child so far.
fn children_cpu() -> Result<Duration> {
    // SAFETY: all-zero is a valid `rusage` (plain integers).
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the duration of the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage(RUSAGE_CHILDREN)");
    }
    let tv = |t: libc::timeval| {
        Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_usec).unwrap_or(0) * 1000,
        )
    };
    Ok(tv(ru.ru_utime) + tv(ru.ru_stime))
}

/// `VmHWM` of this process, in KiB.
fn peak_rss_kib() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")
}

fn emit(record: &Record) -> Result<()> {
    println!("{}", record.to_json()?);
    Ok(())
}
