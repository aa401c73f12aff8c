//! The redirect lab: the three-host [`Lab`] plus a sandbox namespace behind the protected host,
//! identity servers that say who answered and whom they saw, and the agent started on both of
//! the host's interfaces.
//!
//! ```text
//!   attacker (198.18.0.3, …:65::3) ─┐
//!                                    ├─ br0 in "lan" ── eth0 ┌──────────────┐ eth1 ── eth0  sandbox
//!   legit    (198.18.0.2, …:65::2) ─┘                        │ host (fwd on) │       198.18.1.2
//!                                           198.18.0.1, …:65::1 └──────────────┘ 198.18.1.1  …:66::2
//!                                                                              …:66::1
//! ```
//!
//! `eth0` faces the attackers, `eth1` the sandbox; the agent attaches to both. Forwarding is on in
//! the host namespace only, between its own two veths. The clients have only their connected
//! subnet: they reach 198.18.0.1 and nothing else, so a reply that comes from anywhere but the
//! host's address cannot even be routed to them. The sandbox's routes depend on the model:
//!
//! - [`RedirectModel::PreserveSource`]: its default routes (IPv4 and IPv6) point at the host's
//!   `eth1` address, because it answers the attacker's own address and those replies must go
//!   back through the host to be rewritten.
//! - [`RedirectModel::FullNat`]: only its connected subnet, which proves that a full-NAT sandbox
//!   needs no route toward the attackers at all.
//!
//! Every namespace, veth, process, pin and scratch file is removed by a guard's `Drop`.

use std::{
    fmt,
    io::{self, ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::{
    lab::{ATTACKER_V4, ATTACKER_V6, Agent, HOST_IFACE, HOST_V4, HOST_V6, LEGIT_V4, LEGIT_V6, Lab},
    netns::{Netns, unique_tag, veth},
    probe::{in_netns, spawn_named},
};

/// The host's sandbox-facing interface (the agent's second `--iface`).
pub const SANDBOX_IFACE: &str = "eth1";
/// The host's IPv4 address on the sandbox link (the `full-nat` source address).
pub const HOST_SANDBOX_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The sandbox's IPv4 address.
pub const SANDBOX_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// The host's IPv6 address on the sandbox link.
pub const HOST_SANDBOX_V6: Ipv6Addr = Ipv6Addr::new(0xfd6d, 0x6972, 0x6167, 0x66, 0, 0, 0, 1);
/// The sandbox's IPv6 address.
pub const SANDBOX_V6: Ipv6Addr = Ipv6Addr::new(0xfd6d, 0x6972, 0x6167, 0x66, 0, 0, 0, 2);

/// The real SSH-like service on the host (TCP); redirected to [`SANDBOX_SSH_PORT`].
pub const SSH_PORT: u16 = 22;
/// The real web-like service on the host (TCP); redirected to [`SANDBOX_WEB_PORT`].
pub const WEB_PORT: u16 = 80;
/// The real DNS-like service on the host (UDP); redirected to [`SANDBOX_DNS_PORT`].
pub const DNS_PORT: u16 = 53;
/// A host port with no service and no per-port target: it goes to the default target.
pub const UNMAPPED_PORT: u16 = 8443;
/// The sandbox's SSH emulation, also the default target.
pub const SANDBOX_SSH_PORT: u16 = 2222;
/// The sandbox's web emulation.
pub const SANDBOX_WEB_PORT: u16 = 8080;
/// The sandbox's DNS emulation.
pub const SANDBOX_DNS_PORT: u16 = 5353;
/// A host port (TCP and UDP, served on the host) whose target is a closed sandbox port
/// ([`SANDBOX_CLOSED_PORT`]): the sandbox answers a redirected attacker with a reset or an ICMP
/// port-unreachable error about the rewritten flow, while everyone else gets the host's answer.
pub const CLOSED_PORT: u16 = 5060;
/// The closed sandbox port.
pub const SANDBOX_CLOSED_PORT: u16 = 5061;
/// The port the attacker itself listens on (TCP and UDP) for the reflect scenarios; nothing
/// listens on it on the host.
pub const REFLECT_PORT: u16 = 7777;

/// How redirected traffic reaches the sandbox (the config's `redirect_model`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectModel {
    /// DNAT only; the sandbox routes replies back through the host.
    PreserveSource,
    /// DNAT and SNAT; the sandbox has no route toward the attackers.
    FullNat,
}

impl RedirectModel {
    /// The name used in the configuration and the flow log.
    pub fn name(self) -> &'static str {
        match self {
            Self::PreserveSource => "preserve-source",
            Self::FullNat => "full-nat",
        }
    }
}

/// An address family, to run one scenario for IPv4 and IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Both families.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn pick(self, v4: Ipv4Addr, v6: Ipv6Addr) -> IpAddr {
        match self {
            Self::V4 => v4.into(),
            Self::V6 => v6.into(),
        }
    }

    /// The protected host's address on the LAN.
    pub fn host(self) -> IpAddr {
        self.pick(HOST_V4, HOST_V6)
    }

    /// The attacker's address.
    pub fn attacker(self) -> IpAddr {
        self.pick(ATTACKER_V4, ATTACKER_V6)
    }

    /// The legitimate client's address.
    pub fn legit(self) -> IpAddr {
        self.pick(LEGIT_V4, LEGIT_V6)
    }

    /// The sandbox's address.
    pub fn sandbox(self) -> IpAddr {
        self.pick(SANDBOX_V4, SANDBOX_V6)
    }

    /// The host's address on the sandbox link.
    pub fn host_sandbox_side(self) -> IpAddr {
        self.pick(HOST_SANDBOX_V4, HOST_SANDBOX_V6)
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// The lab with a sandbox. Dropping it removes every namespace.
pub struct SandboxLab {
    /// The sandbox host.
    pub sandbox: Netns,
    /// Attacker, legitimate client, protected host and their segment.
    pub lab: Lab,
    /// How the sandbox is routed.
    pub model: RedirectModel,
}

impl SandboxLab {
    /// Builds the topology for `model` and waits until the sandbox reaches the host.
    pub fn new(model: RedirectModel) -> Result<Self> {
        let lab = Lab::new()?;
        let sandbox = Netns::new(&format!("mirage-{}-sbx", unique_tag()))?;
        // The same quiet IPv6 as the lab (see `Lab::new`), set before the veth exists so that
        // the interface inherits it. The host namespace's defaults are already set.
        sandbox.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        for v in ["mldv2", "mldv1"] {
            sandbox.sysctl(
                &format!("net.ipv6.conf.default.{v}_unsolicited_report_interval"),
                "10",
            )?;
        }
        veth(&lab.host, SANDBOX_IFACE, &sandbox, HOST_IFACE)?;
        for (ns, iface, v4, v6) in [
            (&lab.host, SANDBOX_IFACE, HOST_SANDBOX_V4, HOST_SANDBOX_V6),
            (&sandbox, HOST_IFACE, SANDBOX_V4, SANDBOX_V6),
        ] {
            ns.sysctl(&format!("net.ipv6.conf.{iface}.accept_ra"), "0")?;
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", iface])?;
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", iface, "nodad"])?;
            ns.ip(&["link", "set", iface, "up"])?;
        }
        // Forwarding in the host namespace only: it has no interface but its two veths, so it
        // can forward between the lab's segment and the sandbox link and nowhere else.
        lab.host.sysctl("net.ipv4.conf.all.forwarding", "1")?;
        lab.host.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        if model == RedirectModel::PreserveSource {
            sandbox.ip(&[
                "route",
                "add",
                "default",
                "via",
                &HOST_SANDBOX_V4.to_string(),
            ])?;
            sandbox.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &HOST_SANDBOX_V6.to_string(),
            ])?;
        }
        let lab = Self {
            sandbox,
            lab,
            model,
        };
        lab.wait_reachable()?;
        Ok(lab)
    }

    fn wait_reachable(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        for dst in [IpAddr::V4(HOST_SANDBOX_V4), IpAddr::V6(HOST_SANDBOX_V6)] {
            while crate::lab::ping(&self.sandbox, dst, 1, Duration::from_millis(500))? != 1 {
                if Instant::now() > deadline {
                    bail!("{dst} not reachable from the sandbox after 10 s");
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Every namespace of the lab, for reports and clean-up checks.
    pub fn namespaces(&self) -> [&Netns; 5] {
        [
            &self.lab.host,
            &self.lab.legit,
            &self.lab.attacker,
            &self.sandbox,
            &self.lab.lan,
        ]
    }

    /// The agent configuration for `mode` with this lab's model and the standard targets:
    /// 22/tcp → sandbox 2222, 80/tcp → 8080, 53/udp → 5353, 5060 → 5061 (closed), anything
    /// else → 2222, for each family. `extra` is TOML with more top-level keys (it goes before the target tables).
    pub fn config(&self, mode: &str, extra: &str) -> String {
        let mut toml = format!(
            "mode = \"{mode}\"\nredirect_model = \"{}\"\n",
            self.model.name()
        );
        if self.model == RedirectModel::FullNat {
            toml.push_str(&format!(
                "snat_v4 = \"{HOST_SANDBOX_V4}\"\nsnat_v6 = \"{HOST_SANDBOX_V6}\"\nnat_ports = [20000, 59999]\n"
            ));
        }
        toml.push_str(extra);
        toml.push('\n');
        for family in Family::ALL {
            let sandbox = family.sandbox();
            for (port, proto, target) in [
                (Some(SSH_PORT), "tcp", SANDBOX_SSH_PORT),
                (Some(WEB_PORT), "tcp", SANDBOX_WEB_PORT),
                (Some(DNS_PORT), "udp", SANDBOX_DNS_PORT),
                (Some(CLOSED_PORT), "any", SANDBOX_CLOSED_PORT),
                (None, "any", SANDBOX_SSH_PORT),
            ] {
                toml.push_str("\n[[sandbox]]\n");
                if let Some(port) = port {
                    toml.push_str(&format!("port = {port}\n"));
                }
                toml.push_str(&format!(
                    "proto = \"{proto}\"\ntarget = \"{}\"\n",
                    SocketAddr::new(sandbox, target)
                ));
            }
        }
        toml
    }

    /// The real services on the host (TCP 22, 80 and 5060, UDP 53 and 5060, on both of its LAN
    /// addresses), answering as `host`.
    pub fn host_services(&self) -> Result<Service> {
        let tcp = [SSH_PORT, WEB_PORT, CLOSED_PORT];
        Service::start(
            self.lab.host.name(),
            "host",
            &addrs(&[HOST_V4.into(), HOST_V6.into()], &tcp),
            &addrs(&[HOST_V4.into(), HOST_V6.into()], &[DNS_PORT, CLOSED_PORT]),
        )
    }

    /// The sandbox's emulations (TCP 2222 and 8080, UDP 5353), answering as `sandbox`.
    pub fn sandbox_services(&self) -> Result<Service> {
        let tcp = [SANDBOX_SSH_PORT, SANDBOX_WEB_PORT];
        Service::start(
            self.sandbox.name(),
            "sandbox",
            &addrs(&[SANDBOX_V4.into(), SANDBOX_V6.into()], &tcp),
            &addrs(&[SANDBOX_V4.into(), SANDBOX_V6.into()], &[SANDBOX_DNS_PORT]),
        )
    }

    /// The attacker's own listener on [`REFLECT_PORT`] (TCP and UDP), answering as
    /// `attacker-self`.
    pub fn attacker_self_service(&self) -> Result<Service> {
        let both = addrs(&[ATTACKER_V4.into(), ATTACKER_V6.into()], &[REFLECT_PORT]);
        Service::start(self.lab.attacker.name(), "attacker-self", &both, &both)
    }
}

fn addrs(ips: &[IpAddr], ports: &[u16]) -> Vec<SocketAddr> {
    ips.iter()
        .flat_map(|ip| ports.iter().map(|p| SocketAddr::new(*ip, *p)))
        .collect()
}

/// How often server loops look at their stop flag.
const POLL: Duration = Duration::from_millis(20);
/// How long a served TCP connection may stay idle before the server drops it: long enough for
/// a scenario to block and unblock between two exchanges on one connection.
const IDLE: Duration = Duration::from_secs(30);

/// TCP and UDP servers that say who they are and whom they saw: to every line `MSG` on a TCP
/// connection they answer `NAME PORT PEER MSG` (PORT: the port they listen on; PEER: the
/// connection's source as they see it), and to every UDP datagram the same in one datagram.
/// UDP datagrams that start with `flood` are counted but not answered. Stopped on drop.
pub struct Service {
    stop: Arc<AtomicBool>,
    udp_received: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Service {
    /// Binds every address inside `ns` and starts serving.
    pub fn start(ns: &str, name: &str, tcp: &[SocketAddr], udp: &[SocketAddr]) -> Result<Self> {
        let (listeners, sockets) = in_netns(ns, || -> io::Result<_> {
            let l = tcp
                .iter()
                .map(TcpListener::bind)
                .collect::<io::Result<Vec<_>>>()?;
            let s = udp
                .iter()
                .map(UdpSocket::bind)
                .collect::<io::Result<Vec<_>>>()?;
            Ok((l, s))
        })?
        .with_context(|| format!("binding {name}'s servers in {ns}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let udp_received = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for l in listeners {
            l.set_nonblocking(true)?;
            let (stop, name) = (Arc::clone(&stop), name.to_owned());
            threads.push(spawn_named(&format!("{name}-tcp"), move || {
                serve_tcp(&l, &name, &stop);
            })?);
        }
        for s in sockets {
            s.set_read_timeout(Some(POLL))?;
            let (stop, name) = (Arc::clone(&stop), name.to_owned());
            let count = Arc::clone(&udp_received);
            threads.push(spawn_named(&format!("{name}-udp"), move || {
                serve_udp(&s, &name, &stop, &count);
            })?);
        }
        Ok(Self {
            stop,
            udp_received,
            threads,
        })
    }

    /// UDP datagrams received so far, on every socket.
    pub fn udp_received(&self) -> u64 {
        self.udp_received.load(Ordering::Relaxed)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_tcp(listener: &TcpListener, name: &str, stop: &Arc<AtomicBool>) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let (name, stop) = (name.to_owned(), Arc::clone(stop));
                // Detached: it ends on EOF, after IDLE, or within POLL of the stop flag.
                let _ = thread::Builder::new()
                    .name(format!("{name}-conn"))
                    .spawn(move || {
                        let _ = answer_lines(stream, &name, port, peer, &stop);
                    });
            }
            Err(_) => thread::sleep(POLL),
        }
    }
}

fn answer_lines(
    mut stream: TcpStream,
    name: &str,
    port: u16,
    peer: SocketAddr,
    stop: &AtomicBool,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL * 5))?;
    let mut pending = Vec::new();
    let mut buf = [0; 4096];
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) && last.elapsed() < IDLE {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                last = Instant::now();
                pending.extend_from_slice(&buf[..n]);
                while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=i).collect();
                    let msg = String::from_utf8_lossy(&line[..i]);
                    stream.write_all(format!("{name} {port} {peer} {msg}\n").as_bytes())?;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn serve_udp(socket: &UdpSocket, name: &str, stop: &AtomicBool, count: &AtomicU64) {
    let port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut buf = [0; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, peer)) = socket.recv_from(&mut buf) {
            count.fetch_add(1, Ordering::Relaxed);
            if !buf[..n].starts_with(b"flood") {
                let msg = String::from_utf8_lossy(&buf[..n]);
                let _ = socket.send_to(format!("{name} {port} {peer} {msg}").as_bytes(), peer);
            }
        }
    }
}

/// A [`Service`]'s answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// Who answered: `host`, `sandbox` or `attacker-self`.
    pub who: String,
    /// The port the answering server listens on.
    pub port: u16,
    /// The client's address as the server saw it.
    pub peer: SocketAddr,
    /// The message echoed back.
    pub msg: String,
}

impl std::str::FromStr for Reply {
    type Err = io::Error;

    fn from_str(s: &str) -> io::Result<Self> {
        let bad = || io::Error::new(ErrorKind::InvalidData, format!("bad reply `{s}`"));
        let mut parts = s.trim_end().splitn(4, ' ');
        let mut next = || parts.next().ok_or_else(bad);
        Ok(Self {
            who: next()?.to_owned(),
            port: next()?.parse().map_err(|_| bad())?,
            peer: next()?.parse().map_err(|_| bad())?,
            msg: next()?.to_owned(),
        })
    }
}

/// One request and its answer, with the client's view of the addresses.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// The client socket's own address (its source port is what a flow log names).
    pub local: SocketAddr,
    /// Where the answer came from, as the client's socket saw it.
    pub remote: SocketAddr,
    /// The answer.
    pub reply: Reply,
}

/// A TCP connection from a client namespace to a [`Service`], kept open across steps.
pub struct Session {
    stream: TcpStream,
    pending: Vec<u8>,
    /// The client's address.
    pub local: SocketAddr,
    /// The server's address as connected to.
    pub remote: SocketAddr,
}

impl Session {
    /// Connects from namespace `ns` to `dst` within `timeout`. The outer error means the probe
    /// could not run; the inner one is what the network did (refused, timed out, ...).
    pub fn open(ns: &str, dst: SocketAddr, timeout: Duration) -> Result<io::Result<Self>> {
        in_netns(ns, || {
            let stream = TcpStream::connect_timeout(&dst, timeout)?;
            Ok(Self {
                local: stream.local_addr()?,
                remote: stream.peer_addr()?,
                stream,
                pending: Vec::new(),
            })
        })
    }

    /// Sends `msg` (one word) as a line and reads the answer line within `timeout`.
    pub fn ask(&mut self, msg: &str, timeout: Duration) -> io::Result<Exchange> {
        self.stream.write_all(format!("{msg}\n").as_bytes())?;
        let deadline = Instant::now() + timeout;
        let mut buf = [0; 4096];
        loop {
            if let Some(i) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                return Ok(Exchange {
                    local: self.local,
                    remote: self.remote,
                    reply: String::from_utf8_lossy(&line).parse()?,
                });
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or(ErrorKind::TimedOut)?;
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut buf)? {
                0 => return Err(ErrorKind::UnexpectedEof.into()),
                n => self.pending.extend_from_slice(&buf[..n]),
            }
        }
    }
}

/// Opens a TCP connection from `ns` to `dst`, asks once and closes.
pub fn tcp_ask(
    ns: &str,
    dst: SocketAddr,
    msg: &str,
    timeout: Duration,
) -> Result<io::Result<Exchange>> {
    Ok(Session::open(ns, dst, timeout)?.and_then(|mut s| s.ask(msg, timeout)))
}

/// A UDP client socket in a namespace, unconnected so that it sees where answers come from.
pub struct UdpClient {
    socket: UdpSocket,
    /// The client's address (bound to the family's unspecified address; the port is real).
    pub local: SocketAddr,
}

impl UdpClient {
    /// Binds an ephemeral port in `ns` for `family`.
    pub fn bind(ns: &str, family: Family) -> Result<Self> {
        let any: IpAddr = match family {
            Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
        };
        let socket = in_netns(ns, || UdpSocket::bind((any, 0)))?
            .with_context(|| format!("binding a UDP client in {ns}"))?;
        Ok(Self {
            local: socket.local_addr()?,
            socket,
        })
    }

    /// Sends `msg` to `dst` and waits for an answer that echoes it, from anywhere.
    pub fn ask(&self, dst: SocketAddr, msg: &str, timeout: Duration) -> io::Result<Exchange> {
        self.socket.send_to(msg.as_bytes(), dst)?;
        let deadline = Instant::now() + timeout;
        let mut buf = [0; 2048];
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or(ErrorKind::TimedOut)?;
            self.socket.set_read_timeout(Some(left))?;
            let (n, from) = self.socket.recv_from(&mut buf)?;
            if let Ok(reply) = String::from_utf8_lossy(&buf[..n]).parse::<Reply>()
                && reply.msg == msg
            {
                return Ok(Exchange {
                    local: self.local,
                    remote: from,
                    reply,
                });
            }
        }
    }

    /// Sends `flood` datagrams to `dst` at about `pps` for `duration`; returns how many were
    /// sent and for how long.
    pub fn flood(&self, dst: SocketAddr, pps: u32, duration: Duration) -> (u64, Duration) {
        let start = Instant::now();
        let gap = Duration::from_secs(1) / pps.max(1);
        let mut sent = 0u64;
        while start.elapsed() < duration {
            if self.socket.send_to(b"flood", dst).is_ok() {
                sent += 1;
            }
            // Paced against the clock, not by sleeping a fixed gap: sleeps overshoot.
            let next = gap * u32::try_from(sent).unwrap_or(u32::MAX);
            if let Some(wait) = next.checked_sub(start.elapsed()) {
                thread::sleep(wait);
            }
        }
        (sent, start.elapsed())
    }
}

/// Sends `msg` from a *connected* UDP socket in `ns` to `dst` and waits for the answer. Unlike
/// [`UdpClient`], a connected socket reports an ICMP port-unreachable error about its flow as
/// `ConnectionRefused`, and the kernel matches that error to the socket by the header it
/// quotes: so a refusal proves the error came back rewritten to name `dst`.
pub fn udp_connected_ask(
    ns: &str,
    dst: SocketAddr,
    msg: &str,
    timeout: Duration,
) -> Result<io::Result<Exchange>> {
    let any: SocketAddr = match dst {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    in_netns(ns, || {
        let socket = UdpSocket::bind(any)?;
        socket.connect(dst)?;
        socket.send(msg.as_bytes())?;
        socket.set_read_timeout(Some(timeout))?;
        let mut buf = [0; 2048];
        let n = socket.recv(&mut buf)?;
        Ok(Exchange {
            local: socket.local_addr()?,
            remote: dst,
            reply: String::from_utf8_lossy(&buf[..n]).parse()?,
        })
    })
}

/// A line of the agent's `--flow-log`: one new redirected or reflected flow.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct FlowLogLine {
    /// `redirect` or `reflect`.
    pub kind: String,
    /// `preserve-source` or `full-nat`.
    pub model: String,
    /// `tcp` or `udp`.
    pub proto: String,
    /// The attacker's address and port.
    pub attacker: SocketAddr,
    /// What the attacker connected to.
    pub orig_dst: SocketAddr,
    /// Where the flow went.
    pub target: SocketAddr,
    /// The source the target saw.
    pub nat: SocketAddr,
    /// When (`CLOCK_BOOTTIME` ns).
    pub ts_ns: u64,
}

/// `mirage-agent run` on both of the host's interfaces with a configuration file and a flow
/// log, in scratch files removed on drop (after the agent is stopped and detached).
pub struct SandboxAgent {
    agent: Agent,
    scratch: Scratch,
}

impl SandboxAgent {
    /// Writes `config` (see [`SandboxLab::config`]) and starts the agent with it.
    pub fn start(lab: &SandboxLab, config: &str) -> Result<Self> {
        let scratch = Scratch::new()?;
        let cfg = scratch.path("agent.toml");
        std::fs::write(&cfg, config).with_context(|| format!("writing {}", cfg.display()))?;
        let flow_log = scratch.path("flows.jsonl");
        let agent = Agent::start(
            &lab.lab.host,
            &[
                "--iface",
                SANDBOX_IFACE,
                "--config",
                &cfg.to_string_lossy(),
                "--flow-log",
                &flow_log.to_string_lossy(),
            ],
        )
        .with_context(|| format!("starting the agent with\n{config}"))?;
        Ok(Self { agent, scratch })
    }

    /// The agent guard (CLI, log, `top`).
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// `mirage-agent block ADDR [--action ACTION]`.
    pub fn block(&self, addr: IpAddr, action: Option<&str>) -> Result<()> {
        let addr = addr.to_string();
        let mut args = vec!["block", addr.as_str()];
        if let Some(a) = action {
            args.extend(["--action", a]);
        }
        self.agent.cli(&args).map(|_| ())
    }

    /// `mirage-agent block ADDR --ttl SECONDS`: an entry the kernel ignores once it expires.
    pub fn block_for(&self, addr: IpAddr, ttl: Duration) -> Result<()> {
        let ttl = format!("{}ms", ttl.as_millis());
        self.agent
            .cli(&["block", &addr.to_string(), "--ttl", &ttl])
            .map(|_| ())
    }

    /// `mirage-agent unblock ADDR`.
    pub fn unblock(&self, addr: IpAddr) -> Result<()> {
        self.agent.cli(&["unblock", &addr.to_string()]).map(|_| ())
    }

    /// The flow log so far; lines that do not parse are errors.
    pub fn flows(&self) -> Result<Vec<FlowLogLine>> {
        let path = self.scratch.path("flows.jsonl");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("flow log line `{l}`")))
            .collect()
    }

    /// Waits up to `timeout` for a flow-log line that `pred` accepts (the agent reads the ring
    /// buffer asynchronously).
    pub fn wait_flow(
        &self,
        timeout: Duration,
        pred: impl Fn(&FlowLogLine) -> bool,
    ) -> Result<Option<FlowLogLine>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.flows()?.into_iter().find(|f| pred(f)) {
                return Ok(Some(f));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The global counters of `top --once --json`.
    pub fn global(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        let top = self.agent.top()?;
        serde_json::from_value(top["global"].clone()).context("global counters in top --json")
    }

    /// A report for failed assertions: the global counters, the flow log and the agent's log.
    pub fn diagnostics(&self) -> String {
        let global = self
            .global()
            .map(|g| format!("{g:?}"))
            .unwrap_or_else(|e| format!("({e:#})"));
        let flows = std::fs::read_to_string(self.scratch.path("flows.jsonl")).unwrap_or_default();
        format!(
            "global counters: {global}\nflow log:\n{flows}agent log:\n{}",
            self.agent.log()
        )
    }
}

/// A private scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("mirage-sandbox-{}", unique_tag()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Watches every frame on a namespace's interfaces (both directions) with an `AF_PACKET`
/// socket, and remembers those that carry an address of the sandbox link anywhere in them
/// (headers, or the quoted header of an ICMP error): the attacker must never see one.
pub struct LeakWatch {
    stop: Arc<AtomicBool>,
    frames: Arc<AtomicU64>,
    leaks: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl LeakWatch {
    /// Starts watching in `ns`.
    pub fn start(ns: &str) -> Result<Self> {
        let fd = in_netns(ns, packet_socket)?.context("opening an AF_PACKET socket")?;
        let stop = Arc::new(AtomicBool::new(false));
        let frames = Arc::new(AtomicU64::new(0));
        let leaks = Arc::new(Mutex::new(Vec::new()));
        let thread = spawn_named("leak-watch", {
            let (stop, frames, leaks) = (stop.clone(), frames.clone(), leaks.clone());
            move || watch(&fd, &stop, &frames, &leaks)
        })?;
        Ok(Self {
            stop,
            frames,
            leaks,
            thread: Some(thread),
        })
    }

    /// Frames seen so far.
    pub fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }

    /// Descriptions of the frames that carried a sandbox-link address.
    pub fn leaks(&self) -> Vec<String> {
        self.leaks.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl Drop for LeakWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn packet_socket() -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the result is checked before it is owned.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: a valid socket and a timeval that outlives the call, with its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn watch(fd: &OwnedFd, stop: &AtomicBool, frames: &AtomicU64, leaks: &Mutex<Vec<String>>) {
    let v4 = [&SANDBOX_V4.octets()[..], &HOST_SANDBOX_V4.octets()[..]];
    // The sandbox link's /64 prefix.
    let v6 = &SANDBOX_V6.octets()[..8];
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: a valid socket and a buffer of the given length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else { continue };
        frames.fetch_add(1, Ordering::Relaxed);
        let frame = &buf[..n];
        let hit = v4.iter().chain([&v6]).any(|pat| {
            frame
                .get(14..)
                .is_some_and(|ip| ip.windows(pat.len()).any(|w| w == *pat))
        });
        if hit && let Ok(mut l) = leaks.lock() {
            l.push(hex(&frame[..frame.len().min(96)]));
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
