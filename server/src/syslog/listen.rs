//! The UDP, TCP and TLS sockets: accepting, limits, trust, and handing records on.
//!
//! [`spawn`] binds every configured address before it starts anything, so a configuration
//! error (a port in use, an unreadable certificate) fails start-up as a whole. Each socket gets
//! one task; each TCP/TLS connection gets its own, owned by its listener's task so that
//! [`Listeners::shutdown`] stops accepting, closes every connection and waits for all of it.
//!
//! Backpressure: TCP and TLS readers wait on the channel (`send().await`) and on their
//! connection's message budget, and do not read while they wait, so a sender that is too fast
//! is slowed down by TCP itself. UDP cannot be slowed down: datagrams beyond a source's budget,
//! or arriving while the channel is full, are dropped and counted.
//!
//! Exactly-once from agents: RFC 5425 has no acknowledgements, so Mirage adds a small one. An
//! agent stamps each message with a per-agent sequence number (`seq` in its `mirage@32473`
//! element, increasing). On a TLS connection from an authenticated agent the reader drops a
//! message whose number is at or below the highest this server has already handed to detection
//! for that agent name (a resend after a reconnect), and writes `ack N\n` lines back on the same
//! connection once every number up to N was handed to detection (or dropped as a duplicate of
//! one that was): after at most [`ACK_EVERY`] messages, after [`ACK_QUIET`] without input, and
//! before closing when the listeners shut down. The agent keeps each message on disk until it is
//! acknowledged and resends the rest, in order, after a reconnect. Messages without `seq`
//! (rsyslog relays) and other connections are unaffected; nothing is ever written to them. The
//! numbers are kept in memory: a restarted server accepts a resend of messages whose
//! acknowledgement it had not written before it died.
//!
//! Metrics: `mirage_server_messages_total{transport,origin}` (delivered records),
//! `mirage_server_malformed_total{transport,reason}`, `mirage_server_dropped_total{reason}`
//! (`oversized`, `rate`, `queue_full`, `connection_limit`, `duplicate`),
//! `mirage_server_connections` (open TCP and TLS connections) and
//! `mirage_server_tls_handshake_failures_total`.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ipnet::IpNet;
use rustls::{
    RootCertStore, ServerConfig as RustlsServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{mpsc, watch},
    task::JoinSet,
    time::{Instant, sleep, timeout},
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, instrument, warn};

use super::{
    framing::{Decoder, Event},
    parse::parse_message,
};
use crate::{
    config::{ServerConfig, TlsConfig},
    record::{LogRecord, Origin},
};

/// Largest UDP payload read (RFC 5426 §3.2: a datagram holds one message, and no datagram is
/// larger than this).
const UDP_READ: usize = 65_535;
/// Bytes read from a TCP/TLS connection at a time.
const TCP_READ: usize = 8 * 1024;
/// UDP source addresses with their own message budget at once. Beyond this (a flood from
/// spoofed addresses), new addresses share one budget until idle ones are swept out.
const MAX_UDP_SOURCES: usize = 65_536;
/// Least time between two warnings of one kind (each says how many it stands for).
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors), so it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// An agent connection is acknowledged after at most this many sequenced messages.
pub const ACK_EVERY: u32 = 100;
/// ... or after this long without input, whichever comes first.
pub const ACK_QUIET: Duration = Duration::from_millis(200);
/// How long connections get to write their last acknowledgement when the listeners stop.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A listener's transport, also the `transport` label of the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Syslog over UDP (RFC 5426).
    Udp,
    /// Syslog over TCP (RFC 6587).
    Tcp,
    /// Syslog over TLS (RFC 5425).
    Tls,
}

impl Transport {
    /// `udp`, `tcp` or `tls`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors starting the listeners.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A socket could not be bound (address in use, not local, no permission for the port).
    #[error("binding the {transport} listener on {addr}")]
    Bind {
        /// The listener's transport.
        transport: Transport,
        /// The configured address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `listen.tls` has addresses but there is no `[tls]` section.
    #[error("listen.tls is set but the [tls] section is missing")]
    NoTlsConfig,
    /// A PEM file could not be read or parsed.
    #[error("reading the {what} from {path}")]
    Pem {
        /// `certificate`, `private key` or `client CA certificate`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A certificate in `tls.client_ca` is not a usable trust anchor.
    #[error("the CA certificate in {path} is unusable")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// The client certificate verifier could not be built from `tls.client_ca`.
    #[error("building the client certificate verifier from {path}")]
    Verifier {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// rustls refused the certificate and key (e.g. the key does not match).
    #[error("the certificate {cert} and key {key} do not form a usable pair")]
    CertKey {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
}

/// The running listeners. Dropping them aborts every task (sockets close as the tasks are
/// dropped); [`Listeners::shutdown`] also waits for that to be done.
#[derive(Debug)]
pub struct Listeners {
    udp: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
    tls: Vec<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Listeners {
    /// Bound UDP addresses, in configuration order (with the real port where 0 was asked).
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp
    }

    /// Bound TCP addresses, in configuration order.
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp
    }

    /// Bound TLS addresses, in configuration order.
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls
    }

    /// Every bound address with its transport.
    pub fn local_addrs(&self) -> Vec<(Transport, SocketAddr)> {
        let tagged = |t: Transport, addrs: &[SocketAddr]| {
            addrs.iter().map(move |&a| (t, a)).collect::<Vec<_>>()
        };
        [
            tagged(Transport::Udp, &self.udp),
            tagged(Transport::Tcp, &self.tcp),
            tagged(Transport::Tls, &self.tls),
        ]
        .concat()
    }

    /// Stops accepting, closes every connection and waits for every task to end.
    pub async fn shutdown(mut self) {
        // Only fails if every receiver is gone, i.e. every task has already ended.
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Binds every address of `config.listen` and starts serving; records go to `tx`.
///
/// # Errors
///
/// The first address that cannot be bound, or a `[tls]` file that cannot be loaded. Nothing
/// is left running then.
pub async fn spawn(
    config: &ServerConfig,
    tx: mpsc::Sender<LogRecord>,
) -> Result<Listeners, ListenError> {
    let acceptor = match (&config.tls, config.listen.tls.is_empty()) {
        (_, true) => None,
        (Some(tls), false) => Some(tls_acceptor(tls)?),
        (None, false) => return Err(ListenError::NoTlsConfig),
    };

    let bind_error = |transport, addr| {
        move |source| ListenError::Bind {
            transport,
            addr,
            source,
        }
    };
    let mut udp = Vec::new();
    for &addr in &config.listen.udp {
        let socket = UdpSocket::bind(addr)
            .await
            .map_err(bind_error(Transport::Udp, addr))?;
        let local = socket
            .local_addr()
            .map_err(bind_error(Transport::Udp, addr))?;
        udp.push((socket, local));
    }
    let mut streams = Vec::new();
    for (transport, addrs) in [
        (Transport::Tcp, &config.listen.tcp),
        (Transport::Tls, &config.listen.tls),
    ] {
        for &addr in addrs {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(bind_error(transport, addr))?;
            let local = listener.local_addr().map_err(bind_error(transport, addr))?;
            streams.push((transport, listener, local));
        }
    }

    let shared = Arc::new(Shared::new(config, tx));
    let (stop, _) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let (mut udp_addrs, mut tcp_addrs, mut tls_addrs) = (Vec::new(), Vec::new(), Vec::new());
    for (socket, local) in udp {
        udp_addrs.push(local);
        tasks.spawn(run_udp(socket, Arc::clone(&shared), stop.subscribe()));
    }
    for (transport, listener, local) in streams {
        let acceptor = if transport == Transport::Tls {
            tls_addrs.push(local);
            acceptor.clone()
        } else {
            tcp_addrs.push(local);
            None
        };
        tasks.spawn(run_accept(
            listener,
            transport,
            acceptor,
            Arc::clone(&shared),
            stop.subscribe(),
        ));
    }
    Ok(Listeners {
        udp: udp_addrs,
        tcp: tcp_addrs,
        tls: tls_addrs,
        stop,
        tasks,
    })
}

/// The rustls server configuration of `[tls]`: the server's chain and key, and client
/// certificates verified against `client_ca` (required unless `allow_anonymous`).
///
/// The crypto provider is named (ring) rather than taken from rustls' process default: several
/// crates in the build enable providers, and with more than one rustls refuses to pick.
fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, ListenError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&tls.cert, "certificate")?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|source| ListenError::Pem {
        what: "private key",
        path: tls.key.clone(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for ca in certificates(&tls.client_ca, "client CA certificate")? {
        roots.add(ca).map_err(|source| ListenError::ClientCa {
            path: tls.client_ca.clone(),
            source,
        })?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
    let verifier = if tls.allow_anonymous {
        verifier.allow_unauthenticated()
    } else {
        verifier
    };
    let verifier = verifier.build().map_err(|source| ListenError::Verifier {
        path: tls.client_ca.clone(),
        source,
    })?;
    let cert_key = |source| ListenError::CertKey {
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        source,
    };
    let config = RustlsServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(cert_key)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(cert_key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn certificates(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, ListenError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|source| ListenError::Pem {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(ListenError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// What every listener task shares: the channel, the limits, trust, and the connection table.
#[derive(Debug)]
struct Shared {
    tx: mpsc::Sender<LogRecord>,
    max_message_bytes: usize,
    max_connections: usize,
    max_connections_per_addr: usize,
    messages_per_second: u32,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    relay_networks: Vec<IpNet>,
    agent_names: Vec<String>,
    connections: Mutex<Connections>,
    /// Sequence numbers per agent name (see the module documentation).
    agents: Mutex<HashMap<String, Arc<AgentProgress>>>,
    warn_connection_limit: Throttle,
    warn_rate: Throttle,
    warn_queue_full: Throttle,
    warn_accept: Throttle,
}

#[derive(Debug, Default)]
struct Connections {
    total: usize,
    per_addr: HashMap<IpAddr, usize>,
}

impl Shared {
    fn new(config: &ServerConfig, tx: mpsc::Sender<LogRecord>) -> Self {
        let limits = &config.limits;
        Self {
            tx,
            max_message_bytes: limits.max_message_bytes,
            max_connections: limits.max_connections,
            max_connections_per_addr: limits.max_connections_per_addr,
            messages_per_second: limits.messages_per_second,
            idle_timeout: Duration::from_secs(limits.idle_timeout_secs),
            handshake_timeout: Duration::from_secs(limits.handshake_timeout_secs),
            relay_networks: config.trust.relay_networks.clone(),
            agent_names: config.trust.agent_names.clone(),
            connections: Mutex::new(Connections::default()),
            agents: Mutex::new(HashMap::new()),
            warn_connection_limit: Throttle::new(),
            warn_rate: Throttle::new(),
            warn_queue_full: Throttle::new(),
            warn_accept: Throttle::new(),
        }
    }

    fn connections(&self) -> std::sync::MutexGuard<'_, Connections> {
        // The table stays consistent whatever panicked while holding it (every update is a
        // single increment or decrement).
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The sequence-number state of the agent called `name` (shared by its connections).
    fn agent_progress(&self, name: &str) -> Arc<AgentProgress> {
        // Every update of an entry is atomic, so a panic while holding the lock leaves the
        // table usable.
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(agents.entry(name.to_owned()).or_default())
    }

    /// Counts a new connection from `ip` in, or `None` when a limit is reached.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionGuard> {
        let ip = ip.to_canonical();
        let mut table = self.connections();
        let from_ip = table.per_addr.get(&ip).copied().unwrap_or(0);
        if table.total >= self.max_connections || from_ip >= self.max_connections_per_addr {
            return None;
        }
        table.total += 1;
        table.per_addr.insert(ip, from_ip + 1);
        metrics::gauge!("mirage_server_connections").set(table.total as f64);
        Some(ConnectionGuard {
            shared: Arc::clone(self),
            ip,
        })
    }

    /// The trust of a plain UDP/TCP peer.
    fn address_origin(&self, ip: IpAddr) -> Origin {
        let ip = ip.to_canonical();
        if self.relay_networks.iter().any(|net| net.contains(&ip)) {
            Origin::Relay
        } else {
            Origin::Untrusted
        }
    }

    /// The trust of a TLS peer, from the certificate chain rustls has verified (none: an
    /// anonymous client, accepted only with `allow_anonymous`).
    ///
    /// The name is the certificate's first DNS SAN, else its common name. With
    /// `trust.agent_names` set, the peer is an agent only if one of its names (any DNS SAN or
    /// the common name) is listed, and that listed name is the one reported. A verified
    /// certificate without any name is untrusted too (there is nothing to report it as).
    fn certificate_origin(&self, peer: SocketAddr, certs: Option<&[CertificateDer<'_>]>) -> Origin {
        let Some(end_entity) = certs.and_then(<[_]>::first) else {
            return Origin::Untrusted;
        };
        let names = certificate_names(end_entity);
        let name = if self.agent_names.is_empty() {
            names.into_iter().next()
        } else {
            names.into_iter().find(|n| self.agent_names.contains(n))
        };
        match name {
            Some(name) => Origin::Agent { name },
            None => {
                warn!(
                    %peer,
                    "Client certificate is valid but its name is not in trust.agent_names (or it has none); its lines are untrusted."
                );
                Origin::Untrusted
            }
        }
    }
}

/// DNS SANs in order, then common names.
fn certificate_names(der: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    names.extend(
        cert.subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .map(str::to_owned),
    );
    names.retain(|n| !n.is_empty());
    names
}

/// Where an agent's sequence numbers stand on this server.
#[derive(Debug, Default)]
struct AgentProgress {
    /// Highest number taken by a connection for handing to detection: a message at or below it
    /// is a duplicate.
    claimed: AtomicU64,
    /// Highest number handed to detection: what may be acknowledged.
    handed: AtomicU64,
}

/// One open TCP/TLS connection in the table; leaves it when dropped.
#[derive(Debug)]
struct ConnectionGuard {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut table = self.shared.connections();
        table.total = table.total.saturating_sub(1);
        if let Some(n) = table.per_addr.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                table.per_addr.remove(&self.ip);
            }
        }
        metrics::gauge!("mirage_server_connections").set(table.total as f64);
    }
}

/// Lets one warning of a kind through every [`WARN_EVERY`], counting the ones it holds back.
#[derive(Debug)]
struct Throttle {
    start: std::time::Instant,
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl Throttle {
    fn new() -> Self {
        Self {
            start: std::time::Instant::now(),
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a warning may be logged now (`n` were suppressed since the last one).
    fn ready(&self) -> Option<u64> {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        let window = u64::try_from(WARN_EVERY.as_millis()).unwrap_or(u64::MAX);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(window),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// A token bucket of `rate` messages per second, holding up to one second's worth.
#[derive(Debug, Clone)]
struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.last = now;
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.rate
    }
}

/// Per-source-address budgets of a UDP socket, bounded in size.
#[derive(Debug)]
struct SourceBudgets {
    rate: u32,
    sources: HashMap<IpAddr, TokenBucket>,
    /// Shared by new addresses while the table is full.
    overflow: TokenBucket,
    last_sweep: Instant,
}

impl SourceBudgets {
    fn new(rate: u32) -> Self {
        let now = Instant::now();
        Self {
            rate,
            sources: HashMap::new(),
            overflow: TokenBucket::new(rate, now),
            last_sweep: now,
        }
    }

    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if let Some(bucket) = self.sources.get_mut(&ip) {
            return bucket.take(now).is_ok();
        }
        if self.sources.len() >= MAX_UDP_SOURCES
            && now.saturating_duration_since(self.last_sweep) >= Duration::from_secs(1)
        {
            // A full bucket behaves like a new one, so forgetting it changes nothing.
            self.sources.retain(|_, bucket| !bucket.is_full(now));
            self.last_sweep = now;
        }
        if self.sources.len() < MAX_UDP_SOURCES {
            let mut bucket = TokenBucket::new(self.rate, now);
            let allowed = bucket.take(now).is_ok();
            self.sources.insert(ip, bucket);
            allowed
        } else {
            self.overflow.take(now).is_ok()
        }
    }
}

fn origin_label(origin: &Origin) -> &'static str {
    match origin {
        Origin::Agent { .. } => "agent",
        Origin::Relay => "relay",
        Origin::Untrusted => "untrusted",
    }
}

fn count_delivered(transport: Transport, origin: &Origin) {
    metrics::counter!(
        "mirage_server_messages_total",
        "transport" => transport.as_str(),
        "origin" => origin_label(origin),
    )
    .increment(1);
}

fn count_malformed(transport: Transport, reason: &'static str) {
    metrics::counter!(
        "mirage_server_malformed_total",
        "transport" => transport.as_str(),
        "reason" => reason,
    )
    .increment(1);
}

fn count_dropped(reason: &'static str) {
    metrics::counter!("mirage_server_dropped_total", "reason" => reason).increment(1);
}

/// Parses a frame or datagram; malformed ones are counted and logged at debug.
fn parse_counted(
    raw: &[u8],
    transport: Transport,
    origin: &Origin,
    peer: SocketAddr,
) -> Option<LogRecord> {
    match parse_message(raw, origin.clone(), peer) {
        Ok(record) => Some(record),
        Err(err) => {
            count_malformed(transport, err.as_str());
            debug!(%peer, %transport, error = %err, "Malformed message dropped.");
            None
        }
    }
}

async fn run_udp(socket: UdpSocket, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut buf = vec![0u8; UDP_READ];
    let mut budgets = SourceBudgets::new(shared.messages_per_second);
    loop {
        let (n, peer) = tokio::select! {
            _ = stop.changed() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(err) => {
                    debug!(error = %err, "UDP receive failed.");
                    continue;
                }
            },
        };
        if n > shared.max_message_bytes {
            count_dropped("oversized");
            debug!(%peer, bytes = n, "Oversized UDP message dropped.");
            continue;
        }
        if !budgets.allow(peer.ip().to_canonical(), Instant::now()) {
            count_dropped("rate");
            if let Some(suppressed) = shared.warn_rate.ready() {
                warn!(%peer, suppressed, "UDP source over limits.messages_per_second; datagrams dropped.");
            }
            continue;
        }
        let origin = shared.address_origin(peer.ip());
        let Some(record) = parse_counted(&buf[..n], Transport::Udp, &origin, peer) else {
            continue;
        };
        match shared.tx.try_send(record) {
            Ok(()) => count_delivered(Transport::Udp, &origin),
            Err(mpsc::error::TrySendError::Full(_)) => {
                count_dropped("queue_full");
                if let Some(suppressed) = shared.warn_queue_full.ready() {
                    warn!(suppressed, "Detection is behind; UDP messages dropped.");
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                debug!("Record channel closed; UDP listener stops.");
                return;
            }
        }
    }
}

async fn run_accept(
    listener: TcpListener,
    transport: Transport,
    acceptor: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(guard) = shared.admit(peer.ip()) else {
                        count_dropped("connection_limit");
                        if let Some(suppressed) = shared.warn_connection_limit.ready() {
                            warn!(%peer, %transport, suppressed, "Connection limit reached; connection closed.");
                        }
                        drop(stream);
                        continue;
                    };
                    connections.spawn(serve_connection(
                        stream,
                        peer,
                        transport,
                        acceptor.clone(),
                        Arc::clone(&shared),
                        guard,
                        stop.clone(),
                    ));
                }
                Err(err) => {
                    if let Some(suppressed) = shared.warn_accept.ready() {
                        warn!(%transport, error = %err, suppressed, "Accept failed.");
                    }
                    sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    // Connections see the stop too: agent connections write their last acknowledgement
    // before closing. Give them a moment, then close whatever is left.
    let _ = timeout(CLOSE_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.shutdown().await;
}

#[instrument(skip_all, fields(%peer, %transport))]
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    acceptor: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    _guard: ConnectionGuard,
    stop: watch::Receiver<bool>,
) {
    let Some(acceptor) = acceptor else {
        let origin = shared.address_origin(peer.ip());
        read_frames(stream, peer, transport, origin, &shared, None, stop).await;
        return;
    };
    let stream = match timeout(shared.handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            metrics::counter!("mirage_server_tls_handshake_failures_total").increment(1);
            debug!(error = %err, "TLS handshake failed.");
            return;
        }
        Err(_) => {
            metrics::counter!("mirage_server_tls_handshake_failures_total").increment(1);
            debug!("TLS handshake timed out.");
            return;
        }
    };
    let origin = shared.certificate_origin(peer, stream.get_ref().1.peer_certificates());
    debug!(origin = ?origin, "TLS peer connected.");
    if let Origin::Agent { name } = &origin {
        let (reader, writer) = tokio::io::split(stream);
        let acks = Acks {
            progress: shared.agent_progress(name),
            writer: Box::new(writer),
            last_seen: 0,
            acked: 0,
            since_ack: 0,
        };
        read_frames(reader, peer, transport, origin, &shared, Some(acks), stop).await;
    } else {
        read_frames(stream, peer, transport, origin, &shared, None, stop).await;
    }
}

/// The acknowledgement side of an agent's TLS connection.
struct Acks {
    progress: Arc<AgentProgress>,
    writer: Box<dyn AsyncWrite + Unpin + Send>,
    /// Highest number this connection received (handed or dropped as a duplicate).
    last_seen: u64,
    /// Highest number acknowledged on this connection.
    acked: u64,
    /// Sequenced messages since the last acknowledgement.
    since_ack: u32,
}

impl Acks {
    /// Whether an acknowledgement is owed.
    fn pending(&self) -> bool {
        self.last_seen > self.acked
    }

    /// Writes `ack N` for the highest N this connection received that was handed to
    /// detection; `false` if writing failed (the connection is done).
    async fn flush(&mut self, idle: Duration) -> bool {
        self.since_ack = 0;
        let ackable = self
            .last_seen
            .min(self.progress.handed.load(Ordering::Acquire));
        if ackable <= self.acked {
            return true;
        }
        let writer = &mut self.writer;
        let line = format!("ack {ackable}\n");
        let written = timeout(idle, async {
            writer.write_all(line.as_bytes()).await?;
            writer.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {
                self.acked = ackable;
                true
            }
            Ok(Err(err)) => {
                debug!(error = %err, "Writing an acknowledgement failed; connection closed.");
                false
            }
            Err(_) => {
                debug!("The agent does not read its acknowledgements; connection closed.");
                false
            }
        }
    }
}

/// Reads one connection until the peer closes, an I/O error, the idle timeout, the listeners
/// stop, or the record channel closes.
async fn read_frames<S: AsyncRead + Unpin>(
    mut stream: S,
    peer: SocketAddr,
    transport: Transport,
    origin: Origin,
    shared: &Shared,
    acks: Option<Acks>,
    mut stop: watch::Receiver<bool>,
) {
    let mut decoder = Decoder::new(shared.max_message_bytes);
    let mut budget = TokenBucket::new(shared.messages_per_second, Instant::now());
    let mut chunk = vec![0u8; TCP_READ];
    let mut conn = Connection {
        peer,
        transport,
        origin,
        shared,
        budget: &mut budget,
        acks,
    };
    loop {
        let ack_pending = conn.acks.as_ref().is_some_and(Acks::pending);
        let read = tokio::select! {
            biased;
            _ = stop.changed() => {
                if let Some(acks) = conn.acks.as_mut() {
                    acks.flush(shared.idle_timeout).await;
                }
                return;
            }
            read = timeout(shared.idle_timeout, stream.read(&mut chunk)) => read,
            () = sleep(ACK_QUIET), if ack_pending => {
                if let Some(acks) = conn.acks.as_mut()
                    && !acks.flush(shared.idle_timeout).await
                {
                    return;
                }
                continue;
            }
        };
        let n = match read {
            Err(_) => {
                debug!("Idle timeout; connection closed.");
                return;
            }
            Ok(Err(err)) => {
                debug!(error = %err, "Read failed; connection closed.");
                return;
            }
            Ok(Ok(0)) => {
                if let Some(event) = decoder.finish() {
                    conn.handle(event).await;
                }
                return;
            }
            Ok(Ok(n)) => n,
        };
        let mut input = &chunk[..n];
        while let Some(event) = decoder.next_event(&mut input) {
            if !conn.handle(event).await {
                return;
            }
        }
    }
}

/// What [`read_frames`] needs to handle one event.
struct Connection<'a> {
    peer: SocketAddr,
    transport: Transport,
    origin: Origin,
    shared: &'a Shared,
    budget: &'a mut TokenBucket,
    /// Agent connections over TLS only.
    acks: Option<Acks>,
}

impl Connection<'_> {
    /// Acknowledges once [`ACK_EVERY`] sequenced messages have come in since the last time;
    /// `false` if the connection is done.
    async fn ack_if_due(&mut self) -> bool {
        match self.acks.as_mut() {
            Some(acks) if acks.since_ack >= ACK_EVERY => acks.flush(self.shared.idle_timeout).await,
            _ => true,
        }
    }

    /// Handles one decoder event; `false` when the record channel (or, for an agent, the
    /// acknowledgement side) is closed.
    async fn handle(&mut self, event: Event) -> bool {
        match event {
            Event::Frame(frame) => {
                // Over budget: wait (not reading meanwhile) rather than drop. Nothing is lost,
                // so nothing is counted as dropped.
                if let Err(mut wait) = self.budget.take(Instant::now()) {
                    if let Some(suppressed) = self.shared.warn_rate.ready() {
                        warn!(
                            peer = %self.peer,
                            transport = %self.transport,
                            suppressed,
                            "Connection over limits.messages_per_second; reading slowed down."
                        );
                    }
                    loop {
                        sleep(wait).await;
                        match self.budget.take(Instant::now()) {
                            Ok(()) => break,
                            Err(again) => wait = again,
                        }
                    }
                }
                let Some(record) = parse_counted(&frame, self.transport, &self.origin, self.peer)
                else {
                    return true;
                };
                let seq = match (&mut self.acks, record.seq) {
                    (Some(acks), Some(seq)) => {
                        acks.last_seen = acks.last_seen.max(seq);
                        acks.since_ack += 1;
                        // Claim the number before handing the record on, so that two
                        // connections of one agent (an old one not yet timed out and its
                        // replacement) never both hand the same message to detection.
                        if acks.progress.claimed.fetch_max(seq, Ordering::AcqRel) >= seq {
                            count_dropped("duplicate");
                            debug!(peer = %self.peer, seq, "Already received; dropped.");
                            return self.ack_if_due().await;
                        }
                        Some(seq)
                    }
                    _ => None,
                };
                if self.shared.tx.send(record).await.is_err() {
                    debug!("Record channel closed; connection closed.");
                    return false;
                }
                count_delivered(self.transport, &self.origin);
                if let (Some(acks), Some(seq)) = (&self.acks, seq) {
                    acks.progress.handed.fetch_max(seq, Ordering::AcqRel);
                    return self.ack_if_due().await;
                }
            }
            Event::Oversized { len } => {
                count_dropped("oversized");
                debug!(peer = %self.peer, len, "Oversized message skipped.");
            }
            Event::Malformed(err) => {
                count_malformed(self.transport, err.as_str());
                debug!(peer = %self.peer, reason = err.as_str(), "Malformed frame skipped.");
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        for _ in 0..10 {
            assert!(b.take(t0).is_ok());
        }
        let wait = b.take(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(101), "{wait:?}");
        assert!(b.take(t0 + Duration::from_millis(100)).is_ok());
        assert!(b.is_full(t0 + Duration::from_secs(5)));
    }

    #[test]
    fn udp_budgets_are_per_address_and_bounded() {
        let t0 = Instant::now();
        let mut budgets = SourceBudgets::new(2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(budgets.allow(a, t0));
        assert!(budgets.allow(a, t0));
        assert!(!budgets.allow(a, t0));
        assert!(budgets.allow(b, t0));
        for i in 0..MAX_UDP_SOURCES as u32 {
            budgets.allow(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(budgets.sources.len() <= MAX_UDP_SOURCES);
        // Two seconds on, idle sources are swept out and new ones get their own budget again.
        let later = t0 + Duration::from_secs(2);
        let c: IpAddr = "198.51.100.1".parse().unwrap();
        assert!(budgets.allow(c, later));
        assert!(budgets.sources.contains_key(&c));
        assert!(budgets.sources.len() <= MAX_UDP_SOURCES);
    }

    #[test]
    fn address_trust_folds_mapped_ipv4() {
        let config: ServerConfig =
            "[listen]\nudp = [\"127.0.0.1:0\"]\n[trust]\nrelay_networks = [\"10.0.0.0/8\"]\n"
                .parse()
                .unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let shared = Shared::new(&config, tx);
        assert_eq!(
            shared.address_origin("10.1.2.3".parse().unwrap()),
            Origin::Relay
        );
        assert_eq!(
            shared.address_origin("::ffff:10.1.2.3".parse().unwrap()),
            Origin::Relay
        );
        assert_eq!(
            shared.address_origin("11.1.2.3".parse().unwrap()),
            Origin::Untrusted
        );
    }

    #[test]
    fn connection_table_limits_and_releases() {
        let config: ServerConfig = "[listen]\ntcp = [\"127.0.0.1:0\"]\n[limits]\nmax_connections = 3\nmax_connections_per_addr = 2\n"
            .parse()
            .unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let shared = Arc::new(Shared::new(&config, tx));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "::ffff:192.0.2.2".parse().unwrap();
        let g1 = shared.admit(a).unwrap();
        let _g2 = shared.admit(a).unwrap();
        assert!(shared.admit(a).is_none());
        let _g3 = shared.admit(b).unwrap();
        assert!(shared.admit("192.0.2.3".parse().unwrap()).is_none());
        drop(g1);
        let _g4 = shared.admit(a).unwrap();
        assert_eq!(shared.connections().total, 3);
    }

    #[test]
    fn throttle_lets_one_through_per_window() {
        let t = Throttle::new();
        assert_eq!(t.ready(), Some(0));
        assert_eq!(t.ready(), None);
        assert_eq!(t.ready(), None);
        assert_eq!(t.suppressed.load(Ordering::Relaxed), 2);
    }
}
