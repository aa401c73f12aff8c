//! The whole server (`daemon::start`: listeners, detection, reporter) over real loopback sockets:
//! the corpus replayed through the TLS listener as agents ship it and through a relay's plain
//! syslog; forged lines from unauthenticated sources; verdicts reaching a real manager.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    time::Duration,
};

use common::{
    ground_truth::{CASES, LEGIT},
    lines,
    pki::{Pki, pki, tls_connect},
};
use server::{
    config::{ListenConfig, ManagerConfig, QueueConfig, ServerConfig},
    daemon::{self, Running},
    syslog::{Transport, format_rfc5424, frame_octet_counted},
    verdict::Verdict,
};
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpStream, UdpSocket},
    sync::broadcast,
    time::{Instant, timeout},
};

/// Header time of shipped lines (after the corpus was captured, before now).
const SHIPPED_AT: i64 = 1_795_831_500;

fn config(pki: &Pki, relay: &[&str]) -> ServerConfig {
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = ServerConfig {
        listen: ListenConfig {
            udp: vec![local],
            tcp: vec![local],
            tls: vec![local],
        },
        tls: Some(pki.tls.clone()),
        ..ServerConfig::default()
    };
    config.trust.relay_networks = relay.iter().map(|n| n.parse().unwrap()).collect();
    config.validate().unwrap();
    config
}

fn addr(running: &Running, transport: Transport) -> SocketAddr {
    running
        .local_addrs()
        .into_iter()
        .find(|(t, _)| *t == transport)
        .unwrap()
        .1
}

/// Verdicts until none has come for `quiet`.
async fn collect(rx: &mut broadcast::Receiver<Verdict>, quiet: Duration) -> Vec<Verdict> {
    let mut out = Vec::new();
    while let Ok(Ok(v)) = timeout(quiet, rx.recv()).await {
        out.push(v);
    }
    out
}

fn agent_frame(service: &str, line: &str) -> Vec<u8> {
    frame_octet_counted(&format_rfc5424(
        service,
        "corpus-host",
        "mirage-agent",
        line,
        SHIPPED_AT,
    ))
}

fn failed_password(addr: &str, i: u32) -> String {
    format!(
        "2026-11-28T02:00:{:02}.000000+00:00 web-1 sshd[{}]: Failed password for root from {addr} port {} ssh2",
        i % 60,
        2000 + i,
        40000 + i
    )
}

fn by_service(verdicts: &[Verdict]) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for v in verdicts {
        m.entry(v.service.clone())
            .or_default()
            .insert(v.addr.clone());
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_through_the_tls_listener_as_agents_ship_it() {
    let pki = pki(false);
    let running = daemon::start(&config(&pki, &[])).await.unwrap();
    let mut rx = running.subscribe();
    let mut tls = tls_connect(addr(&running, Transport::Tls), &pki, Some(&pki.agent))
        .await
        .unwrap();
    let mut sent = 0;
    for (service, files, _) in CASES {
        for f in *files {
            let mut buf = Vec::new();
            for line in lines(f) {
                buf.extend(agent_frame(service, &line));
                sent += 1;
            }
            tls.write_all(&buf).await.unwrap();
        }
    }
    tls.flush().await.unwrap();
    let verdicts = collect(&mut rx, Duration::from_secs(3)).await;
    let flagged = by_service(&verdicts);
    for (service, _, attackers) in CASES {
        let got = flagged.get(*service).cloned().unwrap_or_default();
        for a in *attackers {
            assert!(got.contains(*a), "{service}: {a} not flagged: {got:?}");
        }
        for l in LEGIT {
            assert!(!got.contains(*l), "{service}: legitimate {l} flagged");
        }
    }
    // Each (rule, source) once: the whole replay falls in one window per rule.
    let pairs: BTreeSet<(String, String)> = verdicts
        .iter()
        .map(|v| (v.rule.clone(), v.addr.clone()))
        .collect();
    assert_eq!(pairs.len(), verdicts.len(), "a verdict repeated");
    assert!(sent > 8000, "{sent} lines");
    drop(tls);
    timeout(Duration::from_secs(10), running.shutdown())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_plain_syslog_counts_from_relay_networks_only() {
    // rsyslog forwarding auth.log as RFC 5424 over plain TCP (newline framing): the line is
    // rebuilt as rsyslog writes it to a file and the service comes from APP-NAME.
    let relay_lines: Vec<String> = lines("sshd/auth.log")
        .iter()
        .filter_map(|l| {
            // `2026-11-28T01:59:44.123456+00:00 svc sshd[123]: MSG`
            let (ts, rest) = l.split_once(' ')?;
            let (host, rest) = rest.split_once(' ')?;
            let (tag, msg) = rest.split_once(": ")?;
            let (app, pid) = tag.strip_suffix(']')?.split_once('[')?;
            Some(format!("<38>1 {ts} {host} {app} {pid} - - {msg}\n"))
        })
        .collect();
    assert!(relay_lines.len() > 500);
    let payload: String = relay_lines.concat();

    let pki = pki(false);
    for (relay, expect) in [(&[][..], false), (&["127.0.0.0/8"][..], true)] {
        let running = daemon::start(&config(&pki, relay)).await.unwrap();
        let mut rx = running.subscribe();
        let mut tcp = TcpStream::connect(addr(&running, Transport::Tcp))
            .await
            .unwrap();
        tcp.write_all(payload.as_bytes()).await.unwrap();
        tcp.flush().await.unwrap();
        let flagged = by_service(&collect(&mut rx, Duration::from_secs(2)).await);
        let sshd = flagged.get("sshd").cloned().unwrap_or_default();
        if expect {
            assert!(
                sshd.contains("fd77::66") && sshd.contains("10.77.0.67"),
                "{sshd:?}"
            );
            assert!(!sshd.contains("10.77.0.20") && !sshd.contains("fd77::20"));
        } else {
            assert!(flagged.is_empty(), "not a relay, yet flagged: {flagged:?}");
        }
        drop(tcp);
        running.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_line_from_an_unauthenticated_source_produces_no_verdict() {
    let pki = pki(false);
    let running = daemon::start(&config(&pki, &[])).await.unwrap();
    let mut rx = running.subscribe();
    let victim = "198.51.100.77";

    // Plain UDP and TCP from outside the relay networks, as agent-shaped messages even.
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut tcp = TcpStream::connect(addr(&running, Transport::Tcp))
        .await
        .unwrap();
    for i in 0..20 {
        let frame = format_rfc5424(
            "sshd",
            "web-1",
            "mirage-agent",
            &failed_password(victim, i),
            SHIPPED_AT,
        );
        udp.send_to(frame.as_bytes(), addr(&running, Transport::Udp))
            .await
            .unwrap();
        tcp.write_all(&frame_octet_counted(&frame)).await.unwrap();
    }
    tcp.flush().await.unwrap();
    // A certificate from another CA does not get through the handshake.
    if let Ok(mut foreign) =
        tls_connect(addr(&running, Transport::Tls), &pki, Some(&pki.foreign)).await
    {
        for i in 0..20 {
            let _ = foreign
                .write_all(&agent_frame("sshd", &failed_password(victim, i)))
                .await;
        }
        let _ = foreign.flush().await;
    }
    let forged = collect(&mut rx, Duration::from_secs(2)).await;
    assert!(forged.is_empty(), "forged lines made verdicts: {forged:?}");

    // The same lines from an authenticated agent.
    let mut tls = tls_connect(addr(&running, Transport::Tls), &pki, Some(&pki.agent))
        .await
        .unwrap();
    for i in 0..20 {
        tls.write_all(&agent_frame("sshd", &failed_password(victim, i)))
            .await
            .unwrap();
    }
    tls.flush().await.unwrap();
    let real = collect(&mut rx, Duration::from_secs(2)).await;
    assert_eq!(real.len(), 1, "{real:?}");
    assert_eq!(real[0].addr, victim);
    assert_eq!(real[0].rule, "sshd-failed-password");
    drop((tls, tcp));
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_reach_a_real_manager_and_its_allowlist_is_honoured() {
    use manager::{
        app,
        auth::{new_token, token_hash},
        db,
        test_util::TestDb,
    };
    let db = TestDb::new().await;
    let credential = new_token();
    db::service_credentials::insert(&db.pool, "server-1", &token_hash(&credential), None)
        .await
        .unwrap();
    // An allowlisted network in the default group's policy.
    sqlx::query("UPDATE policies SET allowlist = ARRAY['198.51.100.0/24'::cidr]")
        .execute(&db.pool)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let manager_addr = listener.local_addr().unwrap();
    let router = app(db.state());
    let serve = tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    let dir = tempfile::tempdir().unwrap();
    let credential_file = dir.path().join("credential");
    std::fs::write(&credential_file, &credential).unwrap();
    std::fs::set_permissions(&credential_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let pki = pki(false);
    let mut config = config(&pki, &[]);
    config.manager = Some(ManagerConfig {
        url: format!("http://{manager_addr}"),
        credential_file,
        ca: None,
        batch_max: 500,
        allowlist_refresh_secs: 5,
    });
    config.queue = QueueConfig {
        dir: dir.path().join("queue"),
        max_bytes: 16 * 1024 * 1024,
    };
    let running = daemon::start(&config).await.unwrap();
    let mut rx = running.subscribe();
    // Wait for the first allowlist fetch.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut tls = tls_connect(addr(&running, Transport::Tls), &pki, Some(&pki.agent))
        .await
        .unwrap();
    for i in 0..10 {
        for a in ["203.0.113.81", "198.51.100.81"] {
            tls.write_all(&agent_frame("sshd", &failed_password(a, i)))
                .await
                .unwrap();
        }
    }
    tls.flush().await.unwrap();
    let verdicts = collect(&mut rx, Duration::from_secs(2)).await;
    let addrs: BTreeSet<&str> = verdicts.iter().map(|v| v.addr.as_str()).collect();
    assert_eq!(addrs, BTreeSet::from(["203.0.113.81"]), "{verdicts:?}");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM attackers WHERE host(net) = '203.0.113.81'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no attacker entry after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(tls);
    running.shutdown().await;
    serve.abort();
}
