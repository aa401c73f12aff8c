//! The syslog listeners over real loopback sockets: trust by address and by client
//! certificate (a CA, a server certificate, agent certificates and a foreign CA's certificate
//! made here with rcgen), framing errors that stay on their own connection, limits and
//! shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod common;

use common::pki::{Identity, Pki, pki, tls_connect};

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use server::{
    config::{ListenConfig, ServerConfig},
    record::{LogRecord, Origin},
    syslog::{Listeners, format_rfc5424, frame_octet_counted, spawn},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream, UdpSocket},
    sync::mpsc,
    time::{Instant, sleep, timeout},
};

const WAIT: Duration = Duration::from_secs(5);

fn config(udp: bool, tcp: bool, tls: Option<&Pki>, relay: &[&str]) -> ServerConfig {
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = ServerConfig {
        listen: ListenConfig {
            udp: if udp { vec![local] } else { vec![] },
            tcp: if tcp { vec![local] } else { vec![] },
            tls: if tls.is_some() { vec![local] } else { vec![] },
        },
        tls: tls.map(|p| p.tls.clone()),
        ..ServerConfig::default()
    };
    config.trust.relay_networks = relay.iter().map(|n| n.parse().unwrap()).collect();
    config.limits.max_message_bytes = 480;
    config
}

async fn start(config: &ServerConfig) -> (Listeners, mpsc::Receiver<LogRecord>) {
    config.validate().unwrap();
    let (tx, rx) = mpsc::channel(1024);
    (spawn(config, tx).await.unwrap(), rx)
}

async fn recv(rx: &mut mpsc::Receiver<LogRecord>) -> LogRecord {
    timeout(WAIT, rx.recv())
        .await
        .expect("a record within the deadline")
        .expect("channel open")
}

/// Nothing arrives for `ms` milliseconds.
async fn assert_silent(rx: &mut mpsc::Receiver<LogRecord>, ms: u64) {
    if let Ok(Some(record)) = timeout(Duration::from_millis(ms), rx.recv()).await {
        panic!("unexpected record {record:?}");
    }
}

/// The peer closed (EOF or reset) within the deadline.
async fn assert_closed(stream: &mut (impl AsyncRead + Unpin)) {
    let mut buf = [0u8; 64];
    match timeout(WAIT, stream.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(n)) => panic!("read {n} bytes from a connection that should be closed"),
        Err(_) => panic!("connection still open"),
    }
}

fn agent_message(line: &str) -> Vec<u8> {
    frame_octet_counted(&format_rfc5424(
        "vsftpd",
        "web-1",
        "mirage-agent",
        line,
        1_795_831_161,
    ))
}

/// A TCP connection from a chosen loopback address.
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    socket.connect(addr).await.unwrap()
}

#[tokio::test]
async fn udp_and_tcp_from_a_relay_network_are_relay() {
    let (listeners, mut rx) = start(&config(true, true, None, &["127.0.0.0/8"])).await;

    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(
        b"<38>Nov 28 01:59:23 host sshd[123]: Failed password for root from 203.0.113.9 port 22 ssh2\n",
        listeners.udp_addrs()[0],
    )
    .await
    .unwrap();
    let r = recv(&mut rx).await;
    assert_eq!(r.origin, Origin::Relay);
    assert_eq!(r.service.as_deref(), Some("sshd"));
    assert_eq!(r.host, "host");
    assert!(
        r.line.ends_with(
            "T01:59:23+00:00 host sshd[123]: Failed password for root from 203.0.113.9 port 22 ssh2"
        ),
        "{}",
        r.line
    );
    assert_eq!(r.peer, udp.local_addr().unwrap());

    let mut tcp = TcpStream::connect(listeners.tcp_addrs()[0]).await.unwrap();
    let mut stream = agent_message("first");
    stream.extend_from_slice(b"<13>1 2026-11-28T01:59:23Z relay-1 vsftpd 77 - - second\n");
    tcp.write_all(&stream).await.unwrap();
    let first = recv(&mut rx).await;
    assert_eq!(first.origin, Origin::Relay);
    assert_eq!(
        (first.service.as_deref(), first.line.as_str()),
        (Some("vsftpd"), "first")
    );
    assert_eq!(first.timestamp, Some(1_795_831_161));
    let second = recv(&mut rx).await;
    assert_eq!(
        second.line,
        "2026-11-28T01:59:23Z relay-1 vsftpd[77]: second"
    );
    assert_eq!(second.origin, Origin::Relay);

    assert_eq!(listeners.local_addrs().len(), 2);
    listeners.shutdown().await;
}

#[tokio::test]
async fn udp_and_tcp_outside_relay_networks_are_untrusted() {
    let (listeners, mut rx) = start(&config(true, true, None, &[])).await;
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.send_to(&agent_message("over udp"), listeners.udp_addrs()[0])
        .await
        .unwrap();
    // Octet counting inside a datagram is no framing RFC 5426 knows: the count makes it
    // malformed. A bare message goes through.
    udp.send_to(
        format_rfc5424("sshd", "h", "sshd", "bare", 0).as_bytes(),
        listeners.udp_addrs()[0],
    )
    .await
    .unwrap();
    let r = recv(&mut rx).await;
    assert_eq!((r.origin, r.line.as_str()), (Origin::Untrusted, "bare"));

    let mut tcp = TcpStream::connect(listeners.tcp_addrs()[0]).await.unwrap();
    tcp.write_all(&agent_message("over tcp")).await.unwrap();
    let r = recv(&mut rx).await;
    assert_eq!((r.origin, r.line.as_str()), (Origin::Untrusted, "over tcp"));
    listeners.shutdown().await;
}

#[tokio::test]
async fn tls_agent_certificates_are_agents() {
    let pki = pki(false);
    // The relay network does not matter for TLS: trust comes from the certificate.
    let (listeners, mut rx) = start(&config(false, false, Some(&pki), &[])).await;
    let addr = listeners.tls_addrs()[0];

    let mut agent = tls_connect(addr, &pki, Some(&pki.agent)).await.unwrap();
    let mut stream =
        agent_message("Sat Nov 28 01:59:21 2026 [pid 3] FAIL LOGIN: Client \"::ffff:203.0.113.9\"");
    // RFC 5425 is octet counting, newline framing is accepted too.
    stream.extend_from_slice(b"<14>1 - - sshd - - - newline framed\n");
    agent.write_all(&stream).await.unwrap();
    agent.flush().await.unwrap();
    let r = recv(&mut rx).await;
    assert_eq!(
        r.origin,
        Origin::Agent {
            name: "web-1".to_owned()
        }
    );
    assert_eq!(r.service.as_deref(), Some("vsftpd"));
    assert_eq!(
        r.line,
        "Sat Nov 28 01:59:21 2026 [pid 3] FAIL LOGIN: Client \"::ffff:203.0.113.9\""
    );
    let r = recv(&mut rx).await;
    // No HOSTNAME: the agent's name stands in.
    assert_eq!(r.line, "web-1 sshd: newline framed");
    assert_eq!(r.host, "web-1");

    // Without a DNS SAN, the common name.
    let mut cn_only = tls_connect(addr, &pki, Some(&pki.cn_only)).await.unwrap();
    cn_only.write_all(&agent_message("x")).await.unwrap();
    cn_only.flush().await.unwrap();
    assert_eq!(
        recv(&mut rx).await.origin,
        Origin::Agent {
            name: "db-2".to_owned()
        }
    );
    listeners.shutdown().await;
}

#[tokio::test]
async fn agent_names_restrict_which_certificates_are_agents() {
    let pki = pki(false);
    let mut config = config(false, false, Some(&pki), &[]);
    // The agent certificate's common name (not its first SAN) is listed: it is still an agent.
    config.trust.agent_names = vec!["web-1.example".to_owned()];
    let (listeners, mut rx) = start(&config).await;
    let addr = listeners.tls_addrs()[0];
    for (identity, origin) in [
        (
            &pki.agent,
            Origin::Agent {
                name: "web-1.example".to_owned(),
            },
        ),
        (&pki.cn_only, Origin::Untrusted),
    ] {
        let mut s = tls_connect(addr, &pki, Some(identity)).await.unwrap();
        s.write_all(&agent_message("line")).await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(recv(&mut rx).await.origin, origin);
    }
    listeners.shutdown().await;
}

/// Sends a message over TLS if the handshake lets it, and reads until the server closes.
async fn try_send_tls(addr: SocketAddr, pki: &Pki, identity: Option<&Identity>) {
    if let Ok(mut s) = tls_connect(addr, pki, identity).await {
        let _ = s.write_all(&agent_message("should not arrive")).await;
        let _ = s.flush().await;
        assert_closed(&mut s).await;
    }
}

#[tokio::test]
async fn tls_refuses_foreign_and_missing_certificates() {
    let pki = pki(false);
    let (listeners, mut rx) = start(&config(false, false, Some(&pki), &["127.0.0.0/8"])).await;
    let addr = listeners.tls_addrs()[0];
    try_send_tls(addr, &pki, Some(&pki.foreign)).await;
    try_send_tls(addr, &pki, None).await;
    assert_silent(&mut rx, 300).await;
    // The listener still serves agents.
    let mut agent = tls_connect(addr, &pki, Some(&pki.agent)).await.unwrap();
    agent.write_all(&agent_message("ok")).await.unwrap();
    agent.flush().await.unwrap();
    assert_eq!(recv(&mut rx).await.line, "ok");
    listeners.shutdown().await;
}

#[tokio::test]
async fn tls_anonymous_clients_are_untrusted_when_allowed() {
    let pki = pki(true);
    let (listeners, mut rx) = start(&config(false, false, Some(&pki), &["127.0.0.0/8"])).await;
    let addr = listeners.tls_addrs()[0];
    let mut anonymous = tls_connect(addr, &pki, None).await.unwrap();
    anonymous.write_all(&agent_message("anon")).await.unwrap();
    anonymous.flush().await.unwrap();
    let r = recv(&mut rx).await;
    assert_eq!((r.origin, r.line.as_str()), (Origin::Untrusted, "anon"));
    // A certificate from another CA is still refused.
    try_send_tls(addr, &pki, Some(&pki.foreign)).await;
    assert_silent(&mut rx, 300).await;
    listeners.shutdown().await;
}

#[tokio::test]
async fn bad_frames_do_not_disturb_what_follows_or_other_connections() {
    let (listeners, mut rx) = start(&config(true, true, None, &["127.0.0.0/8"])).await;
    let tcp_addr = listeners.tcp_addrs()[0];
    let mut a = TcpStream::connect(tcp_addr).await.unwrap();
    let mut b = TcpStream::connect(tcp_addr).await.unwrap();

    let mut junk = Vec::new();
    junk.extend_from_slice(b"not syslog at all\n");
    junk.extend_from_slice(b"<13>1 2026-11-28T01:59:23Z h app - - -\n"); // empty MSG
    junk.extend_from_slice(&frame_octet_counted(&"x".repeat(2000))); // oversized, counted
    junk.extend_from_slice(b"0 bad length\n");
    junk.extend_from_slice(b"099 leading zero\n");
    junk.extend_from_slice(b"99999999999 absurd\n");
    junk.extend_from_slice(format!("<13>{}\n", "y".repeat(5000)).as_bytes()); // oversized line
    junk.extend_from_slice(b"\xff\xfe\0\0\n");
    // Half of the junk, then b's first message, then the rest and a's messages.
    let (first, rest) = junk.split_at(junk.len() / 2);
    a.write_all(first).await.unwrap();
    b.write_all(&agent_message("b1")).await.unwrap();
    a.write_all(rest).await.unwrap();
    a.write_all(&agent_message("a1")).await.unwrap();
    a.write_all(b"<13>1 - h app - - - a2\r\n").await.unwrap();
    b.write_all(&agent_message("b2")).await.unwrap();

    let mut from_a = Vec::new();
    let mut from_b = Vec::new();
    for _ in 0..4 {
        let r = recv(&mut rx).await;
        if r.peer == a.local_addr().unwrap() {
            from_a.push(r.line);
        } else {
            from_b.push(r.line);
        }
    }
    assert_eq!(from_a, ["a1", "h app: a2"]);
    assert_eq!(from_b, ["b1", "b2"]);

    // UDP: an oversized datagram and garbage, then a good one.
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let udp_addr = listeners.udp_addrs()[0];
    udp.send_to(&[b'<'; 481], udp_addr).await.unwrap();
    udp.send_to(b"garbage", udp_addr).await.unwrap();
    udp.send_to(b"<13>1 - h app - - - fine", udp_addr)
        .await
        .unwrap();
    assert_eq!(recv(&mut rx).await.line, "h app: fine");
    assert_silent(&mut rx, 100).await;
    listeners.shutdown().await;
}

#[tokio::test]
async fn connection_limits_hold() {
    let mut config = config(false, true, None, &["127.0.0.0/8"]);
    config.limits.max_connections = 2;
    config.limits.max_connections_per_addr = 1;
    let (listeners, mut rx) = start(&config).await;
    let addr = listeners.tcp_addrs()[0];

    let mut first = connect_from("127.0.0.1", addr).await;
    first.write_all(&agent_message("first")).await.unwrap();
    assert_eq!(recv(&mut rx).await.line, "first");
    // A second one from the same address: over the per-address limit.
    let mut same = connect_from("127.0.0.1", addr).await;
    assert_closed(&mut same).await;
    // Another address may connect.
    let mut other = connect_from("127.0.0.2", addr).await;
    other.write_all(&agent_message("other")).await.unwrap();
    assert_eq!(recv(&mut rx).await.line, "other");
    // A third address: over the total.
    let mut third = connect_from("127.0.0.3", addr).await;
    assert_closed(&mut third).await;
    assert_silent(&mut rx, 100).await;

    // Closing one makes room again.
    drop(first);
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(
            Instant::now() < deadline,
            "no room after a connection closed"
        );
        let mut again = connect_from("127.0.0.1", addr).await;
        let _ = again.write_all(&agent_message("again")).await;
        if let Ok(Some(r)) = timeout(Duration::from_millis(200), rx.recv()).await {
            assert_eq!(r.line, "again");
            break;
        }
    }
    listeners.shutdown().await;
}

#[tokio::test]
async fn tcp_over_its_rate_is_slowed_down_not_dropped() {
    let mut config = config(false, true, None, &[]);
    config.limits.messages_per_second = 20;
    let (listeners, mut rx) = start(&config).await;
    let mut tcp = TcpStream::connect(listeners.tcp_addrs()[0]).await.unwrap();
    let started = Instant::now();
    let mut burst = Vec::new();
    for i in 0..40 {
        burst.extend_from_slice(&agent_message(&format!("m{i}")));
    }
    tcp.write_all(&burst).await.unwrap();
    for i in 0..40 {
        assert_eq!(recv(&mut rx).await.line, format!("m{i}"));
        if i == 20 {
            // A second's budget at once, then 20 a second: the 22nd needs 50 ms more.
            assert!(started.elapsed() >= Duration::from_millis(40));
        }
    }
    // 20 at once, the other 20 over the next second.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    listeners.shutdown().await;
}

#[tokio::test]
async fn udp_over_its_rate_is_dropped() {
    let mut config = config(true, false, None, &[]);
    config.limits.messages_per_second = 5;
    let (listeners, mut rx) = start(&config).await;
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..30 {
        udp.send_to(
            format!("<13>1 - h app - - - d{i}").as_bytes(),
            listeners.udp_addrs()[0],
        )
        .await
        .unwrap();
    }
    let started = Instant::now();
    let mut got = 0;
    while let Ok(Some(_)) = timeout(Duration::from_millis(150), rx.recv()).await {
        got += 1;
    }
    // Five at once, plus what refilled while the datagrams were read.
    let allowance = 5 + (started.elapsed().as_secs_f64() * 5.0).ceil() as usize + 1;
    assert!((5..=allowance).contains(&got), "{got} received");
    listeners.shutdown().await;
}

#[tokio::test]
async fn idle_connections_and_stalled_handshakes_are_closed() {
    let pki = pki(false);
    let mut config = config(false, true, Some(&pki), &[]);
    config.limits.idle_timeout_secs = 1;
    config.limits.handshake_timeout_secs = 1;
    let (listeners, _rx) = start(&config).await;
    let started = Instant::now();
    let mut idle = TcpStream::connect(listeners.tcp_addrs()[0]).await.unwrap();
    let mut stalled = TcpStream::connect(listeners.tls_addrs()[0]).await.unwrap();
    assert_closed(&mut idle).await;
    assert_closed(&mut stalled).await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    listeners.shutdown().await;
}

#[tokio::test]
async fn shutdown_returns_promptly_and_closes_everything() {
    let pki = pki(false);
    let (listeners, mut rx) = start(&config(true, true, Some(&pki), &["127.0.0.0/8"])).await;
    let tcp_addr = listeners.tcp_addrs()[0];
    let mut plain = TcpStream::connect(tcp_addr).await.unwrap();
    let mut agent = tls_connect(listeners.tls_addrs()[0], &pki, Some(&pki.agent))
        .await
        .unwrap();
    agent.write_all(&agent_message("before")).await.unwrap();
    agent.flush().await.unwrap();
    assert_eq!(recv(&mut rx).await.line, "before");
    // A connection in the middle of a frame.
    plain
        .write_all(b"100 <13>1 - h app - - - partial")
        .await
        .unwrap();
    sleep(Duration::from_millis(50)).await;

    let started = Instant::now();
    timeout(Duration::from_secs(2), listeners.shutdown())
        .await
        .expect("shutdown within 2 s");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_closed(&mut plain).await;
    assert_closed(&mut agent).await;
    assert!(TcpStream::connect(tcp_addr).await.is_err());
    // Every sender is gone with the tasks.
    assert!(timeout(WAIT, rx.recv()).await.unwrap().is_none());
}

#[tokio::test]
async fn bind_errors_name_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut config = config(false, true, None, &[]);
    config.listen.tcp = vec![addr];
    let (tx, _rx) = mpsc::channel(1);
    let err = spawn(&config, tx).await.unwrap_err();
    assert!(err.to_string().contains(&addr.to_string()), "{err}");

    let pki = pki(false);
    let mut config = self::config(false, false, Some(&pki), &[]);
    let missing = pki.tls.cert.with_file_name("missing.crt");
    config.tls.as_mut().unwrap().cert = missing.clone();
    let (tx, _rx) = mpsc::channel(1);
    let err = spawn(&config, tx).await.unwrap_err();
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
}
