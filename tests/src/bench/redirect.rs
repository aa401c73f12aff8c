//! The ways the protected host can move a list of attackers into the sandbox in `bench-veth`:
//! Mirage's redirect (XDP decides, TC rewrites and forwards; `unreal` mode, `preserve-source`)
//! and the original system's iptables `nat` rules (one DNAT rule per attacker address and
//! protocol, MASQUERADE toward the sandbox). Each is installed alone in its own
//! [`SandboxLab`]; the sandbox runs a TCP request/response server and a counting UDP sink, and
//! the attacker's traffic to the protected host's address is what is measured.

use std::{
    io::{self, ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use agent::{addr::Net, loader, maps::Maps};
use agent_common::{Action, AttackerEntry};
use anyhow::{Context as _, Result, anyhow, bail};

use crate::{
    bench::mechanism::{exec, exec_stdin},
    lab::{ATTACKER_V4, HOST_V4},
    netns::enter_netns,
    probe::in_netns,
    sandbox_lab::{
        DNS_PORT, HOST_SANDBOX_V4, RedirectModel, SANDBOX_DNS_PORT, SANDBOX_IFACE,
        SANDBOX_SSH_PORT, SANDBOX_V4, SSH_PORT, SandboxAgent, SandboxLab,
    },
};

/// A redirect mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirector {
    /// Mirage: the agent in `unreal` mode on both of the host's interfaces, the attackers in
    /// its exact map with the mode's default action (redirect), `preserve-source`.
    Mirage,
    /// The original system: `iptables -t nat` DNAT per attacker address in PREROUTING and
    /// MASQUERADE out of the sandbox-facing interface.
    IptablesDnat,
}

impl Redirector {
    /// The name used in the output (`baseline` for the iptables one).
    pub const fn name(self) -> &'static str {
        match self {
            Redirector::Mirage => "mirage-redirect",
            Redirector::IptablesDnat => "iptables-dnat-masquerade",
        }
    }

    /// The source address the sandbox sees for the attacker: its own under Mirage's
    /// `preserve-source`, the host's sandbox-side address under MASQUERADE.
    pub const fn sandbox_sees(self) -> Ipv4Addr {
        match self {
            Redirector::Mirage => ATTACKER_V4,
            Redirector::IptablesDnat => HOST_SANDBOX_V4,
        }
    }
}

/// The protected host's TCP service the attacker talks to (redirected to the sandbox's SSH
/// emulation port, where the request/response server listens).
pub const TCP_DST: SocketAddrV4 = SocketAddrV4::new(HOST_V4, SSH_PORT);
/// The protected host's UDP service the attacker floods (redirected to the sandbox's DNS
/// emulation port, where the counting sink listens).
pub const UDP_DST: SocketAddrV4 = SocketAddrV4::new(HOST_V4, DNS_PORT);

/// A mechanism installed in a lab's host namespace. Dropping it removes it.
pub enum Installed {
    /// The agent and a handle on its pinned maps.
    Mirage {
        /// The pinned maps (for the counters); closed before the agent detaches.
        maps: Box<Maps>,
        /// The running agent.
        agent: SandboxAgent,
    },
    /// iptables `nat` rules in the host namespace.
    Iptables {
        /// The host namespace.
        ns: String,
    },
}

impl Installed {
    /// Installs `mech` in `lab`'s host namespace for the `attackers`, in order (the last is
    /// the most recently added: last in the iptables chains).
    pub fn install(mech: Redirector, lab: &SandboxLab, attackers: &[Ipv4Addr]) -> Result<Self> {
        if lab.model != RedirectModel::PreserveSource {
            bail!("the redirect benchmark runs in a preserve-source lab");
        }
        let ns = lab.lab.host.name().to_owned();
        match mech {
            Redirector::Mirage => {
                let agent = SandboxAgent::start(lab, &lab.config("unreal", ""))?;
                let mut maps = Box::new(
                    Maps::open_pinned(&loader::pin_dir(agent.agent().root()))
                        .context("opening the agent's pinned maps")?,
                );
                // In-process, one syscall per address: `mirage-agent block` is one process each.
                for a in attackers {
                    maps.block(Net::V4(*a, 32), AttackerEntry::new(Action::Default, 0))?;
                }
                Ok(Installed::Mirage { maps, agent })
            }
            Redirector::IptablesDnat => {
                // The original's rules: for each attacker, every TCP and every UDP packet of a
                // new connection goes to the sandbox's emulation; everything leaving toward the
                // sandbox is masqueraded, so the sandbox answers the host (and never learns
                // the attacker's address). One iptables-restore transaction.
                let tcp_target = SocketAddrV4::new(SANDBOX_V4, SANDBOX_SSH_PORT);
                let udp_target = SocketAddrV4::new(SANDBOX_V4, SANDBOX_DNS_PORT);
                let mut rules = String::from(
                    "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                     :POSTROUTING ACCEPT [0:0]\n",
                );
                for a in attackers {
                    rules.push_str(&format!(
                        "-A PREROUTING -s {a}/32 -p tcp -j DNAT --to-destination {tcp_target}\n\
                         -A PREROUTING -s {a}/32 -p udp -j DNAT --to-destination {udp_target}\n"
                    ));
                }
                rules.push_str(&format!(
                    "-A POSTROUTING -o {SANDBOX_IFACE} -j MASQUERADE\nCOMMIT\n"
                ));
                let installed = Installed::Iptables { ns: ns.clone() };
                exec_stdin(&ns, "iptables-restore", &[], &rules)?;
                let listed = exec(&ns, "iptables", &["-t", "nat", "-S"])?;
                let count = |chain: &str| {
                    listed
                        .lines()
                        .filter(|l| l.starts_with(&format!("-A {chain} ")))
                        .count()
                };
                let (pre, post) = (count("PREROUTING"), count("POSTROUTING"));
                if pre != 2 * attackers.len() || post != 1 {
                    bail!(
                        "iptables nat has {pre} PREROUTING and {post} POSTROUTING rules, expected {} and 1",
                        2 * attackers.len()
                    );
                }
                Ok(installed)
            }
        }
    }

    /// A line for the reader saying what is in place.
    pub fn describe(&self) -> String {
        match self {
            Installed::Mirage { .. } => format!(
                "mirage-agent run --mode unreal (preserve-source) on eth0 and {SANDBOX_IFACE}, \
                 XDP + TC ingress, attackers in the exact map"
            ),
            Installed::Iptables { .. } => {
                let version = tool_version("iptables");
                format!(
                    "iptables nat: per attacker `-s ADDR -p tcp|udp -j DNAT` in PREROUTING, \
                     `-o {SANDBOX_IFACE} -j MASQUERADE` in POSTROUTING ({version})"
                )
            }
        }
    }

    /// The mechanism's own view of what it did, for the reader: the agent's counters, or the
    /// host's conntrack entries and the attacker's rules' packet counters.
    pub fn counters(&self) -> String {
        match self {
            Installed::Mirage { maps, .. } => match maps.global() {
                Ok(g) => {
                    let get = |k: &str| g.get(k).copied().unwrap_or(0);
                    format!(
                        "redirected packets {}, new flows {}, FIB fallbacks {}, rewrite errors {}",
                        get("redirect"),
                        get("flow_new"),
                        get("fib_fallback"),
                        get("rewrite_error"),
                    )
                }
                Err(e) => format!("(counters: {e:#})"),
            },
            Installed::Iptables { ns } => {
                let conntrack = exec(ns, "cat", &["/proc/sys/net/netfilter/nf_conntrack_count"])
                    .map(|s| s.trim().to_owned())
                    .unwrap_or_else(|e| format!("({e:#})"));
                // The attacker's two rules are the last two of PREROUTING.
                let rules = exec(
                    ns,
                    "iptables",
                    &["-t", "nat", "-L", "PREROUTING", "-v", "-x", "-n"],
                )
                .map(|out| {
                    let lines: Vec<&str> = out.lines().collect();
                    lines[lines.len().saturating_sub(2)..]
                        .iter()
                        .filter_map(|l| {
                            // pkts bytes target prot ...
                            let mut f = l.split_whitespace();
                            let pkts = f.next()?;
                            let proto = match f.nth(2)? {
                                "6" => "tcp",
                                "17" => "udp",
                                other => other,
                            };
                            Some(format!("{proto} {pkts}"))
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_else(|e| format!("({e:#})"));
                format!(
                    "conntrack entries {conntrack}; connections NATed by the attacker's rules: {rules}"
                )
            }
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        match self {
            // `SandboxAgent`'s drop stops the agent, detaches and unpins.
            Installed::Mirage { .. } => {}
            Installed::Iptables { ns } => {
                let _ = exec(ns, "iptables", &["-t", "nat", "-F"]);
            }
        }
    }
}

fn tool_version(tool: &str) -> String {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// How long a server loop waits in `poll(2)` before it looks at its stop flag again.
const POLL_MS: i32 = 50;
/// How long one side of a transaction may wait for the other.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether `fd` becomes readable within [`POLL_MS`].
fn readable(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, POLL_MS) > 0 }
}

/// The sandbox's TCP request/response server: for every connection, reads one line, answers
/// `sandbox PEER\n` (PEER: the source it saw), waits for the client to close, closes. Accepts
/// as soon as a connection is there (`poll(2)`, no sleeping), on several threads. Stopped on
/// drop.
pub struct RrServer {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl RrServer {
    /// Listens on `addr` inside `ns` with `threads` serving threads.
    pub fn start(ns: &str, addr: SocketAddr, threads: usize) -> Result<Self> {
        let listener = in_netns(ns, || TcpListener::bind(addr))?
            .with_context(|| format!("binding the request/response server on {addr} in {ns}"))?;
        listener.set_nonblocking(true)?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let mut server = Self {
            stop,
            served,
            threads: Vec::new(),
        };
        for i in 0..threads {
            let (listener, stop, served) = (
                Arc::clone(&listener),
                Arc::clone(&server.stop),
                Arc::clone(&server.served),
            );
            let t = thread::Builder::new()
                .name(format!("rr-server-{i}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if !readable(listener.as_raw_fd()) {
                            continue;
                        }
                        // Another thread may have taken it: WouldBlock, poll again.
                        if let Ok((stream, peer)) = listener.accept()
                            && answer(stream, peer).is_ok()
                        {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
                .context("spawning a request/response server thread")?;
            // Pushed at once: if a later spawn fails, drop stops the ones running.
            server.threads.push(t);
        }
        Ok(server)
    }

    /// Transactions completed so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for RrServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn answer(mut stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    read_line(&mut stream)?;
    stream.write_all(format!("sandbox {peer}\n").as_bytes())?;
    // The client closes first (its TIME_WAIT, not ours); a peer that does not is cut off by
    // the timeout.
    let mut buf = [0u8; 64];
    while stream.read(&mut buf)? > 0 {}
    Ok(())
}

/// Reads up to and including the first newline (requests and answers are one short line).
fn read_line(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(64);
    let mut buf = [0u8; 128];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        line.extend_from_slice(&buf[..n]);
        if buf[..n].contains(&b'\n') {
            return Ok(line);
        }
    }
}

/// What a request/response run did.
#[derive(Debug, Clone, Copy)]
pub struct RrReport {
    /// Transactions completed (connect, request, answer, close).
    pub transactions: u64,
    /// Transactions that failed (connect, write, read or time-out).
    pub errors: u64,
    /// How long the clients ran (the longest of them).
    pub elapsed: Duration,
}

impl RrReport {
    /// Completed transactions per second.
    pub fn per_second(&self) -> f64 {
        self.transactions as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Lets the attacker's namespace open connections as fast as a request/response run needs:
/// the whole ephemeral port range, and ports in TIME_WAIT (the client closes first) reused
/// after a second, as a busy client would have them. Only that namespace is touched.
pub fn tune_client(lab: &SandboxLab) -> Result<()> {
    let atk = &lab.lab.attacker;
    atk.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    atk.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    Ok(())
}

/// One transaction from the attacker's namespace: connect to `dst`, send a line, read the
/// answer, close. Returns the answer, for checking who answered.
pub fn transaction(ns: &str, dst: SocketAddrV4) -> Result<String> {
    in_netns(ns, || -> io::Result<String> {
        let mut s = TcpStream::connect_timeout(&dst.into(), IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.write_all(b"hello\n")?;
        Ok(String::from_utf8_lossy(&read_line(&mut s)?)
            .trim()
            .to_owned())
    })?
    .with_context(|| format!("a TCP transaction from {ns} to {dst}"))
}

/// Checks that the attacker's TCP reaches the sandbox and that the sandbox sees `expected` as
/// the source.
pub fn check_tcp(ns: &str, expected: Ipv4Addr) -> Result<()> {
    let answer = transaction(ns, TCP_DST)?;
    let seen: Option<IpAddr> = answer
        .strip_prefix("sandbox ")
        .and_then(|p| p.parse::<SocketAddr>().ok())
        .map(|a| a.ip());
    if seen != Some(expected.into()) {
        bail!(
            "the attacker's connection to {TCP_DST} got `{answer}`, expected the sandbox seeing {expected}"
        );
    }
    Ok(())
}

/// Runs `threads` clients in namespace `ns` doing transactions against `dst` back to back for
/// `duration`.
pub fn tcp_rr(ns: &str, dst: SocketAddrV4, threads: usize, duration: Duration) -> Result<RrReport> {
    let reports: Vec<Result<RrReport>> = thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| rr_client(ns, dst, duration)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("client thread panicked"))?)
            .collect()
    });
    let mut total = RrReport {
        transactions: 0,
        errors: 0,
        elapsed: Duration::ZERO,
    };
    for r in reports {
        let r = r?;
        total.transactions += r.transactions;
        total.errors += r.errors;
        total.elapsed = total.elapsed.max(r.elapsed);
    }
    Ok(total)
}

fn rr_client(ns: &str, dst: SocketAddrV4, duration: Duration) -> Result<RrReport> {
    enter_netns(ns)?;
    let dst = SocketAddr::V4(dst);
    let mut report = RrReport {
        transactions: 0,
        errors: 0,
        elapsed: Duration::ZERO,
    };
    let once = || -> io::Result<()> {
        let mut s = TcpStream::connect_timeout(&dst, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.write_all(b"hello\n")?;
        read_line(&mut s)?;
        Ok(())
    };
    let start = Instant::now();
    while start.elapsed() < duration {
        match once() {
            Ok(()) => report.transactions += 1,
            Err(_) => {
                report.errors += 1;
                // Nothing works at all: stop rather than spin for the whole duration.
                if report.transactions == 0 && report.errors >= 100 {
                    break;
                }
            }
        }
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

/// Datagrams per `recvmmsg(2)` call of the sink.
const SINK_BATCH: usize = 64;

/// A UDP socket in the sandbox that counts what it receives, `recvmmsg(2)` batches on one
/// thread. Stopped on drop.
pub struct UdpSink {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl UdpSink {
    /// Binds `addr` inside `ns` and starts counting.
    pub fn start(ns: &str, addr: SocketAddr) -> Result<Self> {
        let socket = in_netns(ns, || UdpSocket::bind(addr))?
            .with_context(|| format!("binding the UDP sink on {addr} in {ns}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let thread = thread::Builder::new()
            .name("udp-sink".to_owned())
            .spawn({
                let (stop, received) = (Arc::clone(&stop), Arc::clone(&received));
                move || sink(&socket, &stop, &received)
            })
            .context("spawning the UDP sink thread")?;
        Ok(Self {
            stop,
            received,
            thread: Some(thread),
        })
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sink(socket: &UdpSocket, stop: &AtomicBool, received: &AtomicU64) {
    let fd = socket.as_raw_fd();
    let mut bufs = [[0u8; 64]; SINK_BATCH];
    // SAFETY: `iovec` and `mmsghdr` are plain C structs for which all-zero is a valid value.
    let mut iovs: [libc::iovec; SINK_BATCH] = unsafe { std::mem::zeroed() };
    for (iov, buf) in iovs.iter_mut().zip(bufs.iter_mut()) {
        iov.iov_base = buf.as_mut_ptr().cast();
        iov.iov_len = buf.len();
    }
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; SINK_BATCH] = unsafe { std::mem::zeroed() };
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    while !stop.load(Ordering::Relaxed) {
        if !readable(fd) {
            continue;
        }
        // SAFETY: `fd` is open for the call (owned by `socket`); `msgs` holds SINK_BATCH
        // initialised headers whose iovecs and buffers outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                SINK_BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n > 0 {
            received.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

/// Frames the sandbox's interface has received so far (all protocols), from its counters.
pub fn sandbox_rx_packets(lab: &SandboxLab) -> Result<u64> {
    let out = lab
        .sandbox
        .ip(&["-s", "-j", "link", "show", crate::lab::HOST_IFACE])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx counter on the sandbox's interface")
}
