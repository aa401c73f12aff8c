//! Log collection and shipping end to end: files written (and rotated, truncated, restarted
//! over) by the tests, the agent's collector and shipper, and a real mirage-server TLS
//! listener (in process, on loopback, with a test PKI). Every test numbers its lines and
//! compares the whole sequence the server handed on with the one written: every line exactly
//! once, in order.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

#[path = "../../server/tests/common/pki.rs"]
#[allow(
    dead_code,
    reason = "shared with the server's tests; not every helper is used here"
)]
mod pki;

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use agent::{
    config::{
        AgentConfig,
        links::{LogSource, ServerLink},
    },
    logs::{
        self,
        files::{self, FilesOptions},
        ship::{ShipOptions, Shipper},
    },
};
use pki::{Pki, pki, tls_connect};
use server::{
    config::{ListenConfig, ServerConfig},
    record::{LogRecord, Origin},
    syslog::{Listeners, format_rfc5424_with, frame_octet_counted, spawn},
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{sleep, timeout},
};

// ---- The server -----------------------------------------------------------------------------

struct TestServer {
    listeners: Listeners,
    rx: mpsc::Receiver<LogRecord>,
}

async fn start_server(pki: &Pki, addr: SocketAddr) -> TestServer {
    let config = ServerConfig {
        listen: ListenConfig {
            udp: vec![],
            tcp: vec![],
            tls: vec![addr],
        },
        tls: Some(pki.tls.clone()),
        ..ServerConfig::default()
    };
    config.validate().unwrap();
    let (tx, rx) = mpsc::channel(100_000);
    // The port may still be held by the previous server's last connections for a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match spawn(&config, tx.clone()).await {
            Ok(listeners) => return TestServer { listeners, rx },
            Err(_) if Instant::now() < deadline => sleep(Duration::from_millis(100)).await,
            Err(err) => panic!("{err}"),
        }
    }
}

/// A loopback address nobody listens on (yet).
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Receives records until `want` lines came or `limit` passed; then makes sure nothing more
/// (no duplicate) arrives for a moment.
async fn collect(rx: &mut mpsc::Receiver<LogRecord>, got: &mut Vec<LogRecord>, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while got.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        match timeout(left, rx.recv()).await {
            Ok(Some(r)) => got.push(r),
            Ok(None) => break,
            Err(_) => break,
        }
    }
    if let Ok(Some(extra)) = timeout(Duration::from_millis(1500), rx.recv()).await {
        got.push(extra);
    }
}

/// Asserts the lines are exactly `expected`, reporting the first difference.
fn assert_lines(got: &[LogRecord], expected: &[String]) {
    let lines: Vec<&str> = got.iter().map(|r| r.line.as_str()).collect();
    if lines.len() != expected.len() || lines.iter().zip(expected).any(|(a, b)| a != b) {
        let first = lines
            .iter()
            .zip(expected)
            .position(|(a, b)| a != b)
            .unwrap_or(lines.len().min(expected.len()));
        panic!(
            "received {} lines, wrote {}; first difference at {first}: got {:?}, want {:?}",
            lines.len(),
            expected.len(),
            lines.get(first),
            expected.get(first)
        );
    }
}

// ---- The agent ------------------------------------------------------------------------------

/// The agent's certificate and key as PEM files, and a `[server]` link to `addr`.
fn link(pki: &Pki, dir: &Path, addr: SocketAddr, queue_max_bytes: u64) -> ServerLink {
    let cert = dir.join("agent.crt");
    let key = dir.join("agent.key");
    fs::write(&cert, pem("CERTIFICATE", pki.agent.cert.as_ref())).unwrap();
    fs::write(&key, pem("PRIVATE KEY", &pki.agent.key)).unwrap();
    ServerLink {
        address: addr.to_string(),
        server_name: Some("localhost".to_owned()),
        ca: pki.tls.client_ca.clone(),
        cert,
        key,
        queue_max_bytes,
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let body: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        body.join("\n")
    )
}

fn ship_options() -> ShipOptions {
    ShipOptions {
        host: "web-1".to_owned(),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        ..ShipOptions::default()
    }
}

fn files_options() -> FilesOptions {
    FilesOptions {
        poll: Duration::from_millis(50),
        rescan: Duration::from_millis(200),
        rotated_idle: Duration::from_millis(600),
        ..FilesOptions::default()
    }
}

/// A running shipper and files collector, as `mirage-agent run` has them.
struct Agent {
    shipper: Shipper,
    collector: JoinHandle<()>,
    stop: watch::Sender<bool>,
}

async fn start_agent(link: &ServerLink, state: &Path, sources: Vec<LogSource>) -> Agent {
    let (shipper, sink) = Shipper::start(link, state, ship_options()).await.unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let state = state.to_owned();
    let collector = tokio::spawn(async move {
        files::run(&sources, sink, &state, files_options(), stop_rx)
            .await
            .unwrap();
    });
    // The first scan (which starts at the end of what is already there) is immediate.
    sleep(Duration::from_millis(300)).await;
    Agent {
        shipper,
        collector,
        stop,
    }
}

impl Agent {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        timeout(Duration::from_secs(10), self.collector)
            .await
            .unwrap()
            .unwrap();
        self.shipper.shutdown().await;
    }
}

fn source(service: &str, path: &Path) -> Vec<LogSource> {
    vec![LogSource {
        service: service.to_owned(),
        paths: vec![path.display().to_string()],
    }]
}

fn numbered(i: usize) -> String {
    format!("{i:06} Failed password for invalid user u{i} from 203.0.113.9 port {i} ssh2")
}

// ---- Writers --------------------------------------------------------------------------------

/// Appends with `O_APPEND`, as daemons (and logrotate's copytruncate advice) do.
fn append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

/// Writes `count` numbered lines from `from`, one every `every`, calling `between(i)` before
/// line `i`; the writer holds `lock` while writing a line (a rotation can take it).
fn write_lines(
    file: &Mutex<File>,
    range: std::ops::Range<usize>,
    every: Duration,
    mut between: impl FnMut(usize),
) -> Vec<String> {
    let mut written = Vec::new();
    for i in range {
        between(i);
        let line = numbered(i);
        writeln!(file.lock().unwrap(), "{line}").unwrap();
        written.push(line);
        if !every.is_zero() && i % 10 == 0 {
            std::thread::sleep(every * 10);
        }
    }
    written
}

// ---- Tests ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_rotation_during_writes_ships_every_line_once() {
    let pki = pki(false);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("auth.log");
    fs::write(&log, "old line before the agent, never shipped\n").unwrap();
    let addr = free_addr();
    let mut server = start_server(&pki, addr).await;
    let agent = start_agent(
        &link(&pki, dir.path(), addr, 64 << 20),
        &dir.path().join("state"),
        source("sshd", &log),
    )
    .await;

    let log2 = log.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let file = Mutex::new(append(&log2));
        let mut rotations = 0;
        write_lines(&file, 0..3000, Duration::from_micros(300), |i| {
            if i > 0 && i % 1000 == 0 {
                // logrotate `create`: rename, create the new file; the daemon writes a few
                // more lines to the old one before it reopens (on its SIGHUP).
                rotations += 1;
                fs::rename(&log2, log2.with_extension(format!("log.{rotations}"))).unwrap();
                let mut old = file.lock().unwrap();
                for j in 0..5 {
                    writeln!(old, "{}", numbered(i - 1) + &format!(" late {j}")).unwrap();
                }
                *old = append(&log2);
            }
        })
    });
    let mut expected = writer.await.unwrap();
    // The late lines went to the old files right after line 999 and 1999.
    for at in [1000, 2000] {
        let late: Vec<String> = (0..5)
            .map(|j| numbered(at - 1) + &format!(" late {j}"))
            .collect();
        let pos = expected
            .iter()
            .position(|l| *l == numbered(at - 1))
            .unwrap()
            + 1;
        expected.splice(pos..pos, late);
    }

    let mut got = Vec::new();
    collect(&mut server.rx, &mut got, expected.len()).await;
    assert_lines(&got, &expected);
    let r = &got[0];
    assert_eq!(r.service.as_deref(), Some("sshd"));
    assert_eq!(r.host, "web-1");
    assert_eq!(
        r.origin,
        Origin::Agent {
            name: "web-1".to_owned()
        }
    );
    assert!(r.seq.is_some());
    agent.stop().await;
    server.listeners.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_truncate_during_writes_ships_every_line_once() {
    let pki = pki(false);
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    fs::create_dir(&logs).unwrap();
    let log = logs.join("vsftpd.log");
    fs::write(&log, "").unwrap();
    let addr = free_addr();
    let mut server = start_server(&pki, addr).await;
    let agent = start_agent(
        &link(&pki, dir.path(), addr, 64 << 20),
        &dir.path().join("state"),
        source("vsftpd", &log),
    )
    .await;

    let log2 = log.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let file = Mutex::new(append(&log2));
        let mut rotations = 0;
        write_lines(&file, 0..3000, Duration::from_micros(300), |i| {
            if i > 0 && i % 700 == 0 {
                // logrotate `copytruncate`: copy, then truncate in place; the daemon keeps
                // its descriptor (O_APPEND, so it writes at the new end). The writer is held
                // off between copy and truncate: logrotate itself loses lines written there.
                rotations += 1;
                let held = file.lock().unwrap();
                fs::copy(&log2, log2.with_extension(format!("log.{rotations}"))).unwrap();
                OpenOptions::new()
                    .write(true)
                    .open(&log2)
                    .unwrap()
                    .set_len(0)
                    .unwrap();
                drop(held);
                // Real rotations are hours apart; here they are kept a few polls apart. The
                // collector polls every 250 ms and finds the copy of a generation it missed
                // by the copy's first bytes, but two copy-truncates within one poll cannot be
                // told apart (a loaded CI machine stretches a poll past 210 ms of writing).
                std::thread::sleep(Duration::from_millis(800));
            }
        })
    });
    let expected = writer.await.unwrap();
    let mut got = Vec::new();
    collect(&mut server.rx, &mut got, expected.len()).await;
    assert_lines(&got, &expected);
    agent.stop().await;
    server.listeners.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_file_and_rotation_while_down_ship_every_line_once() {
    let pki = pki(false);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    fs::write(&log, "").unwrap();
    let state = dir.path().join("state");
    let addr = free_addr();
    let mut server = start_server(&pki, addr).await;
    let link = link(&pki, dir.path(), addr, 64 << 20);
    let file = Arc::new(Mutex::new(append(&log)));

    let agent = start_agent(&link, &state, source("web", &log)).await;
    let f = Arc::clone(&file);
    let mut expected = tokio::task::spawn_blocking(move || {
        write_lines(&f, 0..1500, Duration::from_micros(200), |_| {})
    })
    .await
    .unwrap();
    // Stop in the middle of the writes: the collector stops between two batches.
    let f = Arc::clone(&file);
    let more = tokio::task::spawn_blocking(move || {
        write_lines(&f, 1500..3000, Duration::from_micros(300), |_| {})
    });
    sleep(Duration::from_millis(100)).await;
    agent.stop().await;
    expected.extend(more.await.unwrap());
    // While the agent is down: more lines, a half-written last line, a rotation by rename
    // with lines after it, and lines in the new file.
    let f = Arc::clone(&file);
    expected.extend(write_lines(&f, 3000..3100, Duration::ZERO, |_| {}));
    write!(file.lock().unwrap(), "{}", &numbered(3100)[..10]).unwrap();
    fs::rename(&log, dir.path().join("access.log.1")).unwrap();
    writeln!(file.lock().unwrap(), "{}", &numbered(3100)[10..]).unwrap();
    expected.push(numbered(3100));
    *file.lock().unwrap() = append(&log);
    let f = Arc::clone(&file);
    expected.extend(write_lines(&f, 3101..3200, Duration::ZERO, |_| {}));

    // A new process view: the same state directory, nothing else kept.
    let agent = start_agent(&link, &state, source("web", &log)).await;
    let f = Arc::clone(&file);
    expected.extend(
        tokio::task::spawn_blocking(move || {
            write_lines(&f, 3200..4000, Duration::from_micros(200), |_| {})
        })
        .await
        .unwrap(),
    );
    let mut got = Vec::new();
    collect(&mut server.rx, &mut got, expected.len()).await;
    assert_lines(&got, &expected);
    agent.stop().await;
    server.listeners.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_queues_on_disk_and_replays_in_order_once() {
    let pki = pki(false);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mysql.log");
    fs::write(&log, "").unwrap();
    let addr = free_addr();
    let agent = start_agent(
        &link(&pki, dir.path(), addr, 64 << 20),
        &dir.path().join("state"),
        source("mysql", &log),
    )
    .await;
    let file = Mutex::new(append(&log));
    let expected = write_lines(&file, 0..3000, Duration::ZERO, |_| {});
    // Everything is read and waits on disk while the server is away.
    let stats = Arc::clone(agent.shipper.stats());
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.queue_records.load(Ordering::Relaxed) < 3000 {
        assert!(Instant::now() < deadline, "lines were not queued");
        sleep(Duration::from_millis(50)).await;
    }
    sleep(Duration::from_millis(1500)).await; // several failed reconnects
    assert_eq!(stats.acked.load(Ordering::Relaxed), 0);

    let mut server = start_server(&pki, addr).await;
    let mut got = Vec::new();
    collect(&mut server.rx, &mut got, expected.len()).await;
    assert_lines(&got, &expected);
    // Acknowledged, so the queue empties.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.queue_records.load(Ordering::Relaxed) > 0 {
        assert!(Instant::now() < deadline, "the queue did not drain");
        sleep(Duration::from_millis(50)).await;
    }
    agent.stop().await;
    server.listeners.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarts_mid_stream_lose_nothing() {
    let pki = pki(false);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("rsyncd.log");
    fs::write(&log, "").unwrap();
    let addr = free_addr();
    let mut server = start_server(&pki, addr).await;
    let agent = start_agent(
        &link(&pki, dir.path(), addr, 64 << 20),
        &dir.path().join("state"),
        source("rsync", &log),
    )
    .await;
    let done = Arc::new(AtomicBool::new(false));
    let file = Arc::new(Mutex::new(append(&log)));
    let (f, done2) = (Arc::clone(&file), Arc::clone(&done));
    let writer = tokio::task::spawn_blocking(move || {
        let lines = write_lines(&f, 0..4000, Duration::from_micros(500), |_| {});
        done2.store(true, Ordering::Relaxed);
        lines
    });
    let mut got = Vec::new();
    // A clean restart (the listener writes its last acknowledgements before closing): no
    // duplicates may come of it.
    sleep(Duration::from_millis(700)).await;
    server.listeners.shutdown().await;
    while let Ok(r) = server.rx.try_recv() {
        got.push(r);
    }
    assert!(
        !got.is_empty() && !done.load(Ordering::Relaxed),
        "restart mid-stream"
    );
    sleep(Duration::from_millis(500)).await;
    let mut server = start_server(&pki, addr).await;
    let expected = writer.await.unwrap();
    collect(&mut server.rx, &mut got, expected.len()).await;
    assert_lines(&got, &expected);

    // A hard stop (tasks aborted, no last acknowledgement): nothing is lost; what the dead
    // server had handed on but not acknowledged (at most 100 messages or 200 ms) comes again,
    // and only that.
    let f = Arc::clone(&file);
    let writer = tokio::task::spawn_blocking(move || {
        write_lines(&f, 4000..6000, Duration::from_micros(400), |_| {})
    });
    let mut got2 = Vec::new();
    while got2.len() < 500 {
        got2.push(
            timeout(Duration::from_secs(30), server.rx.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    drop(server.listeners); // every task aborted, mid-stream
    // Aborted tasks may still be finishing a step on the other worker: what they handed on
    // is in the channel until it closes (the last task gone).
    while let Some(r) = timeout(Duration::from_secs(10), server.rx.recv())
        .await
        .unwrap()
    {
        got2.push(r);
    }
    sleep(Duration::from_millis(300)).await;
    let mut server = start_server(&pki, addr).await;
    let all = writer.await.unwrap();
    collect(&mut server.rx, &mut got2, all.len()).await;
    let mut seen = std::collections::HashSet::new();
    let unique: Vec<LogRecord> = got2
        .iter()
        .filter(|r| seen.insert(r.line.clone()))
        .cloned()
        .collect();
    let duplicates = got2.len() - unique.len();
    assert_lines(&unique, &all);
    assert!(
        duplicates <= 150,
        "{duplicates} duplicates after a hard stop"
    );
    eprintln!("hard server stop: {duplicates} lines received twice");
    agent.stop().await;
    server.listeners.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_full_pauses_collectors_and_loses_nothing() {
    let pki = pki(false);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("mongod.log");
    fs::write(&log, "").unwrap();
    let addr = free_addr();
    let max = 1024 * 1024;
    let state = dir.path().join("state");
    let agent = start_agent(
        &link(&pki, dir.path(), addr, max),
        &state,
        source("mongodb", &log),
    )
    .await;
    // About 4 MiB queued (line, header and frame): four times the queue.
    let file = Mutex::new(append(&log));
    let expected = write_lines(&file, 0..16_000, Duration::ZERO, |_| {});
    let stats = Arc::clone(agent.shipper.stats());
    sleep(Duration::from_secs(2)).await;
    let queued = stats.queue_bytes.load(Ordering::Relaxed);
    assert!(queued <= max, "{queued} bytes queued, bound {max}");
    assert!(queued > max / 2, "the queue filled up ({queued})");
    let saved: agent::logs::offsets::FileOffsets =
        agent::logs::offsets::load(&state.join(files::STATE_FILE)).unwrap();
    let offset = saved.paths[&log].current.unwrap().offset;
    let size = fs::metadata(&log).unwrap().len();
    assert!(
        offset < size / 2,
        "the collector paused ({offset} of {size})"
    );

    let mut server = start_server(&pki, addr).await;
    let mut got = Vec::new();
    collect(&mut server.rx, &mut got, expected.len()).await;
    assert_lines(&got, &expected);
    agent.stop().await;
    server.listeners.shutdown().await;
}

/// The server's side of the extension, spoken by hand: acknowledgements every 100 messages
/// and after a quiet moment, resent numbers dropped (also across connections), and nothing
/// written to or dropped from connections that are not agents.
#[tokio::test]
async fn server_acknowledges_and_drops_resent_numbers() {
    let pki = pki(false);
    let addr = free_addr();
    let mut server = start_server(&pki, addr).await;
    let message = |seq: u64| {
        frame_octet_counted(&format_rfc5424_with(
            "sshd",
            "web-1",
            "mirage-agent",
            &format!("line {seq}"),
            1_795_831_163,
            &[("seq", &seq.to_string())],
        ))
    };
    let send = |from: u64, to: u64| (from..=to).flat_map(message).collect::<Vec<u8>>();

    let tls = tls_connect(addr, &pki, Some(&pki.agent)).await.unwrap();
    let (read, mut write) = tokio::io::split(tls);
    let mut acks = BufReader::new(read).lines();
    write.write_all(&send(1, 250)).await.unwrap();
    let mut seen = Vec::new();
    while seen.last() != Some(&250) {
        let line = timeout(Duration::from_secs(5), acks.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(line.strip_prefix("ack ").unwrap().parse::<u64>().unwrap());
    }
    assert!(seen.contains(&100) && seen.contains(&200), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    // A reconnect resends from 201: only 251.. are new.
    drop(write);
    drop(acks);
    let tls = tls_connect(addr, &pki, Some(&pki.agent)).await.unwrap();
    let (read, mut write) = tokio::io::split(tls);
    let mut acks = BufReader::new(read).lines();
    write.write_all(&send(201, 300)).await.unwrap();
    let mut last = 0;
    while last != 300 {
        let line = timeout(Duration::from_secs(5), acks.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        last = line.strip_prefix("ack ").unwrap().parse().unwrap();
    }
    let mut got = Vec::new();
    collect(&mut server.rx, &mut got, 300).await;
    let expected: Vec<String> = (1..=300).map(|i| format!("line {i}")).collect();
    assert_lines(&got, &expected);

    // An agent whose certificate has another name has its own numbers.
    let mut other = tls_connect(addr, &pki, Some(&pki.cn_only)).await.unwrap();
    other.write_all(&send(5, 5)).await.unwrap();
    let r = timeout(Duration::from_secs(5), server.rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (r.line.as_str(), r.seq, r.origin),
        (
            "line 5",
            Some(5),
            Origin::Agent {
                name: "db-2".to_owned()
            }
        )
    );
    server.listeners.shutdown().await;

    // Plain TCP (a relay): `seq` is carried, nothing dropped, nothing written back.
    let config = ServerConfig {
        listen: ListenConfig {
            udp: vec![],
            tcp: vec!["127.0.0.1:0".parse().unwrap()],
            tls: vec![],
        },
        ..ServerConfig::default()
    };
    let (tx, mut rx) = mpsc::channel(1000);
    let listeners = spawn(&config, tx).await.unwrap();
    let mut tcp = TcpStream::connect(listeners.tcp_addrs()[0]).await.unwrap();
    tcp.write_all(&send(1, 3)).await.unwrap();
    tcp.write_all(&send(1, 3)).await.unwrap();
    let mut got = Vec::new();
    collect(&mut rx, &mut got, 6).await;
    assert_eq!(got.len(), 6);
    let mut buf = [0u8; 16];
    let read = timeout(
        Duration::from_millis(500),
        tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
    )
    .await;
    assert!(read.is_err(), "nothing is written to a relay connection");
    listeners.shutdown().await;
}

/// `logs::start` wires `[server]` and `[[logs]]` of an agent configuration; measures the
/// end-to-end rate of a burst (file → collector → queue with fdatasync → TLS → listener).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_start_ships_a_burst_end_to_end() {
    let pki = pki(false);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("auth.log");
    fs::write(&log, "").unwrap();
    let addr = free_addr();
    let mut server = start_server(&pki, addr).await;
    let cfg = AgentConfig {
        state_dir: dir.path().join("state"),
        server: Some(link(&pki, dir.path(), addr, 256 << 20)),
        logs: source("sshd", &log),
        ..AgentConfig::default()
    };
    let handles = logs::start(&cfg).await.unwrap().unwrap();
    sleep(Duration::from_millis(500)).await;
    let count = 20_000;
    let file = Mutex::new(append(&log));
    let started = Instant::now();
    let expected = write_lines(&file, 0..count, Duration::ZERO, |_| {});
    let mut got = Vec::new();
    collect(&mut server.rx, &mut got, expected.len()).await;
    // `collect` waits 1.5 s for stragglers after the last line.
    let elapsed = started
        .elapsed()
        .saturating_sub(Duration::from_millis(1500));
    assert_lines(&got, &expected);
    assert_eq!(got[0].service.as_deref(), Some("sshd"));
    eprintln!(
        "end to end: {count} lines in {elapsed:?}, {:.0} lines/s",
        count as f64 / elapsed.as_secs_f64()
    );
    handles.shutdown().await;
    server.listeners.shutdown().await;
    // Nothing left running: the queue's lock is free again.
    let again = Shipper::start(cfg.server.as_ref().unwrap(), &cfg.state_dir, ship_options()).await;
    assert!(again.is_ok(), "the queue was released");
    again.unwrap().0.shutdown().await;
}
