//! Firewall mode end to end: the real agent on the lab host's interface, real sockets in the
//! attacker's and the legitimate client's namespaces.

#![allow(
    clippy::unwrap_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tests::{
    lab::{ATTACKER_V4, ATTACKER_V6, Agent, HOST_V4, HOST_V6, LEGIT_V4, LEGIT_V6, Lab, ping},
    netns::{NetnsThread, spawn_in_netns},
    probe::in_netns,
};

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 9090;
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// TCP echo and UDP echo servers in the host namespace, on every address; they count UDP
/// datagrams per source. Stopped on drop.
struct Servers {
    stop: Arc<AtomicBool>,
    udp_by_source: Arc<Mutex<HashMap<IpAddr, u64>>>,
    threads: Vec<NetnsThread<()>>,
}

impl Servers {
    fn start(ns: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let udp_by_source = Arc::new(Mutex::new(HashMap::new()));
        let (tcp_ready, tcp_ready_rx) = std::sync::mpsc::channel();
        let s = stop.clone();
        let tcp = spawn_in_netns(ns, move || {
            // [::] with v6only off (the Linux default) takes IPv4 too.
            let l = TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, TCP_PORT)).unwrap();
            l.set_nonblocking(true).unwrap();
            tcp_ready.send(()).unwrap();
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false).unwrap();
                        c.set_read_timeout(Some(PROBE_TIMEOUT)).unwrap();
                        let mut buf = [0u8; 64];
                        if let Ok(n) = c.read(&mut buf) {
                            let _ = c.write_all(&buf[..n]);
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        })
        .unwrap();
        let (udp_ready, udp_ready_rx) = std::sync::mpsc::channel();
        let s = stop.clone();
        let counts = udp_by_source.clone();
        let udp = spawn_in_netns(ns, move || {
            let sock = UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, UDP_PORT)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            udp_ready.send(()).unwrap();
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let src = agent::addr::normalize(from.ip());
                    *counts.lock().unwrap().entry(src).or_default() += 1;
                    // Echo only probes, not flood datagrams.
                    if buf[..n].starts_with(b"probe") {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            }
        })
        .unwrap();
        tcp_ready_rx.recv().unwrap();
        udp_ready_rx.recv().unwrap();
        Self {
            stop,
            udp_by_source,
            threads: vec![tcp, udp],
        }
    }

    fn udp_from(&self, src: IpAddr) -> u64 {
        self.udp_by_source
            .lock()
            .unwrap()
            .get(&src)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What a client saw: (tcp echoed, udp echoed, pings answered) per family.
#[derive(Debug, PartialEq, Eq)]
struct Reach {
    tcp: bool,
    udp: bool,
    icmp: bool,
}

fn tcp_echo(dst: IpAddr) -> bool {
    let Ok(mut c) = TcpStream::connect_timeout(&SocketAddr::new(dst, TCP_PORT), PROBE_TIMEOUT)
    else {
        return false;
    };
    c.set_read_timeout(Some(PROBE_TIMEOUT)).unwrap();
    let mut buf = [0u8; 5];
    c.write_all(b"hello").is_ok() && c.read_exact(&mut buf).is_ok() && &buf == b"hello"
}

fn udp_echo(dst: IpAddr) -> bool {
    let bind: IpAddr = match dst {
        IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
    };
    let s = UdpSocket::bind((bind, 0)).unwrap();
    s.set_read_timeout(Some(PROBE_TIMEOUT)).unwrap();
    s.send_to(b"probe-udp", (dst, UDP_PORT)).unwrap();
    let mut buf = [0u8; 16];
    matches!(s.recv_from(&mut buf), Ok((9, _)))
}

fn reach(ns: &tests::netns::Netns, dst: IpAddr) -> Reach {
    let name = ns.name().to_owned();
    let (tcp, udp) = in_netns(&name, move || (tcp_echo(dst), udp_echo(dst))).unwrap();
    let icmp = ping(ns, dst, 1, PROBE_TIMEOUT).unwrap() == 1;
    Reach { tcp, udp, icmp }
}

/// `OutRequests` of IPv4 and IPv6 in namespace `ns`: every IP packet its stack sent.
fn out_requests(ns: &str) -> (u64, u64) {
    in_netns(ns, || {
        // thread-self: /proc/self/net would show the main thread's namespace.
        let v4 = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
        let mut lines = v4.lines().filter(|l| l.starts_with("Ip:"));
        let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
        let idx = names
            .split_whitespace()
            .position(|n| n == "OutRequests")
            .unwrap();
        let v4: u64 = values.split_whitespace().nth(idx).unwrap().parse().unwrap();
        let v6 = std::fs::read_to_string("/proc/thread-self/net/snmp6").unwrap();
        let v6: u64 = v6
            .lines()
            .find_map(|l| l.strip_prefix("Ip6OutRequests"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        (v4, v6)
    })
    .unwrap()
}

/// The IPv6 link-local address of `eth0` in `ns`.
fn link_local(ns: &tests::netns::Netns) -> IpAddr {
    let out = ns
        .ip(&["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let addr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .unwrap();
    addr.split('/').next().unwrap().parse().unwrap()
}

/// (pass, drop) packets of `addr` in `top --json`.
fn top_counts(agent: &Agent, addr: IpAddr) -> (u64, u64) {
    let top = agent.top().unwrap();
    top["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["addr"].as_str() == Some(&addr.to_string()))
        .map(|s| {
            (
                s["packets"]["pass"].as_u64().unwrap(),
                s["packets"]["drop"].as_u64().unwrap(),
            )
        })
        .unwrap_or((0, 0))
}

const ALL: Reach = Reach {
    tcp: true,
    udp: true,
    icmp: true,
};
const NONE: Reach = Reach {
    tcp: false,
    udp: false,
    icmp: false,
};

#[test]
fn attacker_is_dropped_and_legit_client_is_served() {
    let lab = Lab::new().unwrap();
    let agent = Agent::start(&lab.host, &["--mode", "firewall"]).unwrap();
    let _servers = Servers::start(lab.host.name());

    for dst in [IpAddr::V4(HOST_V4), IpAddr::V6(HOST_V6)] {
        assert_eq!(
            reach(&lab.attacker, dst),
            ALL,
            "attacker before block, {dst}"
        );
        assert_eq!(reach(&lab.legit, dst), ALL, "legit before block, {dst}");
    }

    lab.static_neighbours(&lab.attacker).unwrap();
    agent.cli(&["block", &ATTACKER_V4.to_string()]).unwrap();
    agent.cli(&["block", &ATTACKER_V6.to_string()]).unwrap();
    let (att4_before, att6_before) = (
        top_counts(&agent, ATTACKER_V4.into()),
        top_counts(&agent, ATTACKER_V6.into()),
    );
    // The attacker's stack also sends from its link-local address (neighbour discovery, MLD),
    // which is not blocked; those packets cross the same program and are counted as passed.
    let link_local = link_local(&lab.attacker);
    let ll_before = top_counts(&agent, link_local);
    let sent_before = out_requests(lab.attacker.name());

    for dst in [IpAddr::V4(HOST_V4), IpAddr::V6(HOST_V6)] {
        assert_eq!(
            reach(&lab.attacker, dst),
            NONE,
            "attacker after block, {dst}"
        );
        assert_eq!(reach(&lab.legit, dst), ALL, "legit after block, {dst}");
    }

    let sent_after = out_requests(lab.attacker.name());
    let att4 = top_counts(&agent, ATTACKER_V4.into());
    let att6 = top_counts(&agent, ATTACKER_V6.into());
    let (sent4, sent6) = (sent_after.0 - sent_before.0, sent_after.1 - sent_before.1);
    // Every packet the attacker's stack sent was dropped and counted, no more, no fewer; and
    // nothing of the attacker's passed once blocked.
    assert_eq!(att4.1 - att4_before.1, sent4, "ipv4: dropped vs sent");
    let ll = top_counts(&agent, link_local);
    let ll_seen = (ll.0 + ll.1) - (ll_before.0 + ll_before.1);
    assert_eq!(
        att6.1 - att6_before.1 + ll_seen,
        sent6,
        "ipv6: counted vs sent"
    );
    assert_eq!(ll.1, ll_before.1, "link-local packets were dropped");
    assert_eq!(
        att4.0, att4_before.0,
        "ipv4 attacker packets passed after block"
    );
    assert_eq!(
        att6.0, att6_before.0,
        "ipv6 attacker packets passed after block"
    );
    // At least one TCP SYN, one UDP datagram and one echo request per family.
    assert!(sent4 >= 3 && sent6 >= 3, "sent {sent4} / {sent6}");

    let legit4 = top_counts(&agent, LEGIT_V4.into());
    let legit6 = top_counts(&agent, LEGIT_V6.into());
    assert!(legit4.0 > 0 && legit6.0 > 0, "legit passes counted");
    assert_eq!((legit4.1, legit6.1), (0, 0), "legit packets dropped");
}

#[test]
fn agent_restart_during_flood_lets_no_attacker_packet_through() {
    let lab = Lab::new().unwrap();
    let mut agent = Agent::start(&lab.host, &["--mode", "firewall"]).unwrap();
    let servers = Servers::start(lab.host.name());
    agent.cli(&["block", &ATTACKER_V4.to_string()]).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let flood = |ns: &str, src: IpAddr, stop: Arc<AtomicBool>| {
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        let t = spawn_in_netns(ns, move || {
            let s = UdpSocket::bind((src, 0)).unwrap();
            let payload = [0x5au8; 64];
            while !stop.load(Ordering::Relaxed) {
                if s.send_to(&payload, (HOST_V4, UDP_PORT)).is_ok() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                // Paced so the legitimate stream and the receiver keep up on two cores.
                thread::sleep(Duration::from_micros(50));
            }
        })
        .unwrap();
        (t, sent)
    };
    let (atk, atk_sent) = flood(lab.attacker.name(), ATTACKER_V4.into(), stop.clone());
    let (legit, legit_sent) = flood(lab.legit.name(), LEGIT_V4.into(), stop.clone());

    // Restart the agent three times while both streams run.
    for _ in 0..3 {
        thread::sleep(Duration::from_millis(300));
        agent.stop().unwrap();
        thread::sleep(Duration::from_millis(200));
        agent.spawn(&["--mode", "firewall"]).unwrap();
    }
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    atk.join().unwrap();
    legit.join().unwrap();

    // Let in-flight datagrams land.
    let deadline = Instant::now() + Duration::from_secs(2);
    while servers.udp_from(LEGIT_V4.into()) < legit_sent.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(20));
    }
    let atk_sent = atk_sent.load(Ordering::Relaxed);
    assert!(
        atk_sent > 1000,
        "the flood was too small to mean anything: {atk_sent}"
    );
    assert_eq!(
        servers.udp_from(ATTACKER_V4.into()),
        0,
        "attacker datagrams reached the host ({atk_sent} sent)"
    );
    // The legitimate stream proves the receiver was listening the whole time.
    assert!(servers.udp_from(LEGIT_V4.into()) > 0);
    let (_, dropped) = top_counts(&agent, ATTACKER_V4.into());
    assert!(dropped >= atk_sent, "dropped {dropped} < sent {atk_sent}");
}

#[test]
fn detach_removes_program_and_pins() {
    let lab = Lab::new().unwrap();
    let mut agent = Agent::start(&lab.host, &["--mode", "firewall"]).unwrap();
    agent.cli(&["block", &ATTACKER_V4.to_string()]).unwrap();
    assert_eq!(
        ping(&lab.attacker, HOST_V4.into(), 1, PROBE_TIMEOUT).unwrap(),
        0
    );
    agent.stop().unwrap();
    // Still enforced with no agent process at all: the link is pinned.
    assert_eq!(
        ping(&lab.attacker, HOST_V4.into(), 1, PROBE_TIMEOUT).unwrap(),
        0
    );
    agent.cli(&["detach"]).unwrap();
    assert_eq!(
        ping(&lab.attacker, HOST_V4.into(), 1, PROBE_TIMEOUT).unwrap(),
        1
    );
    let link = lab.host.ip(&["link", "show", "eth0"]).unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("xdp"));
    assert!(
        !agent
            .root()
            .join(format!("v{}", agent_common::LAYOUT_VERSION))
            .exists(),
        "pins left behind"
    );
}
