//! Traffic probes and echo servers that run inside a network namespace, without a helper
//! process: a fresh thread enters the namespace with `setns(2)`, creates its sockets there, and
//! exits.
//!
//! Why this works: the network namespace is a per-thread attribute, and a socket belongs for its
//! whole life to the namespace its creator was in when it called `socket(2)`. So a socket made on
//! a thread that has entered `NAME` keeps talking inside `NAME` even once it is handed to another
//! thread; the process's other threads never leave their own namespace. `ip netns exec` would do
//! the same with a child process, at the cost of a fork, a shell tool per protocol, and output
//! parsing.
//!
//! Every probe answers `Ok(true)` when the traffic made it, `Ok(false)` when the network did not
//! deliver it (time-out, refusal, reset), and `Err` only when the probe itself could not run
//! (the namespace does not exist, a socket could not be created).
//!
//! ```no_run
//! use std::{net::SocketAddr, time::Duration};
//! use tests::probe::{EchoServer, tcp_echo_roundtrip};
//!
//! let addr: SocketAddr = "198.18.0.1:7".parse().unwrap();
//! let _server = EchoServer::start("mirage-x-host", addr).unwrap();
//! assert!(tcp_echo_roundtrip("mirage-x-legit", addr, b"hi", Duration::from_secs(1)).unwrap());
//! ```

use std::{
    io::{self, ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};

/// How often the servers' loops look at their stop flag.
const POLL: Duration = Duration::from_millis(20);
/// How long a served TCP connection may stay idle before the server drops it.
const IDLE: Duration = Duration::from_secs(5);

/// Runs `f` on a new thread that has entered the network namespace `ns` (a name under
/// `/run/netns`, as made by `ip netns add` or [`crate::netns::Netns`]) and returns its result.
/// The calling thread's namespace is untouched. A panic in `f` is resumed on the caller.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    thread::scope(|scope| {
        let worker = scope.spawn(move || crate::netns::enter_netns(ns).map(|()| f()));
        match worker.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Whether a TCP connection from `ns` to `addr` is established within `timeout`.
pub fn tcp_connects(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<bool> {
    in_netns(ns, || TcpStream::connect_timeout(&addr, timeout).is_ok())
}

/// Whether `payload` sent over a new TCP connection from `ns` to `addr` comes back unchanged
/// within `timeout` (connect included). Needs an echo server such as [`EchoServer`].
pub fn tcp_echo_roundtrip(
    ns: &str,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<bool> {
    in_netns(ns, || tcp_echo(addr, payload, timeout).is_ok())
}

fn tcp_echo(addr: SocketAddr, payload: &[u8], timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.write_all(payload)?;
    let mut got = vec![0; payload.len()];
    let mut filled = 0;
    while filled < got.len() {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(ErrorKind::TimedOut)?;
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut got[filled..])? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            n => filled += n,
        }
    }
    if got == payload {
        Ok(())
    } else {
        Err(io::Error::new(ErrorKind::InvalidData, "echo differs"))
    }
}

/// Whether `payload` sent in one UDP datagram from `ns` to `addr` comes back unchanged, from
/// `addr`, within `timeout`. Needs an echo server such as [`EchoServer`].
pub fn udp_echo_roundtrip(
    ns: &str,
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<bool> {
    in_netns(ns, || udp_echo(addr, payload, timeout).is_ok())
}

fn udp_echo(addr: SocketAddr, payload: &[u8], timeout: Duration) -> io::Result<()> {
    let socket = UdpSocket::bind(unspecified(addr.ip()))?;
    socket.connect(addr)?;
    socket.send(payload)?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0; payload.len() + 1];
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(ErrorKind::TimedOut)?;
        socket.set_read_timeout(Some(left))?;
        // A connected socket only receives from `addr`; skip stray datagrams of other sizes.
        let n = socket.recv(&mut buf)?;
        if buf[..n] == *payload {
            return Ok(());
        }
    }
}

fn unspecified(ip: IpAddr) -> SocketAddr {
    match ip {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// A TCP and UDP echo server on one address inside a namespace, served by background threads.
/// Dropping it stops the threads and closes the sockets.
pub struct EchoServer {
    tcp: SocketAddr,
    udp: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    /// Binds TCP and UDP on `addr` inside `ns` (port 0 picks a free port, separately for each
    /// protocol: read it back with [`tcp_addr`](Self::tcp_addr) and
    /// [`udp_addr`](Self::udp_addr)) and starts echoing.
    pub fn start(ns: &str, addr: SocketAddr) -> Result<Self> {
        let (listener, socket) = in_netns(ns, || -> io::Result<_> {
            Ok((TcpListener::bind(addr)?, UdpSocket::bind(addr)?))
        })?
        .with_context(|| format!("binding the echo server on {addr} in {ns}"))?;
        let tcp = listener.local_addr()?;
        let udp = socket.local_addr()?;
        listener.set_nonblocking(true)?;
        socket.set_read_timeout(Some(POLL))?;
        let stop = Arc::new(AtomicBool::new(false));
        let threads = vec![
            spawn_named("echo-tcp", {
                let stop = Arc::clone(&stop);
                move || serve_tcp(&listener, &stop)
            })?,
            spawn_named("echo-udp", {
                let stop = Arc::clone(&stop);
                move || serve_udp(&socket, &stop)
            })?,
        ];
        Ok(Self {
            tcp,
            udp,
            stop,
            threads,
        })
    }

    /// The TCP address served.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp
    }

    /// The UDP address served.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Spawns a named thread (names show in panics and debuggers), with the name in the error.
pub fn spawn_named(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .map_err(|e| anyhow!(e).context(format!("spawning the {name} thread")))
}

fn serve_tcp(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            // Accepted sockets live in the listener's namespace, whichever thread holds them.
            Ok((stream, _)) => {
                let _ = thread::Builder::new()
                    .name("echo-tcp-conn".to_owned())
                    .spawn(move || {
                        let _ = echo_stream(stream);
                    });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(_) => thread::sleep(POLL),
        }
    }
}

/// Echoes until the peer closes or stays idle for [`IDLE`]; detached, so it ends on its own.
fn echo_stream(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE))?;
    let mut buf = [0; 4096];
    loop {
        match stream.read(&mut buf)? {
            0 => return Ok(()),
            n => stream.write_all(&buf[..n])?,
        }
    }
}

fn serve_udp(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0; 65536];
    while !stop.load(Ordering::Relaxed) {
        // The read time-out (POLL) bounds how long a stop request waits.
        if let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], peer);
        }
    }
}
