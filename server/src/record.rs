//! What the listeners hand to detection: one received log line with where it came from.

use std::net::SocketAddr;

/// How much a message's source is trusted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    /// A TLS peer whose client certificate chains to `tls.client_ca` (and, when
    /// `trust.agent_names` is set, carries one of those names). `name` is the certificate's
    /// first DNS SAN, or its common name.
    Agent {
        /// The certificate's name.
        name: String,
    },
    /// A plain UDP/TCP peer inside `trust.relay_networks` (an rsyslog relay).
    Relay,
    /// Anyone else: the line may be logged and counted, never turned into a verdict.
    Untrusted,
}

impl Origin {
    /// Whether lines from this origin may produce verdicts.
    pub fn may_produce_verdicts(&self) -> bool {
        !matches!(self, Self::Untrusted)
    }
}

/// One parsed syslog message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Trust of the connection or datagram it arrived on.
    pub origin: Origin,
    /// The transport peer.
    pub peer: SocketAddr,
    /// HOSTNAME from the header (or, when absent, the agent's name or the peer address).
    pub host: String,
    /// The service whose rules apply, when known: the `service` parameter of the
    /// `mirage@32473` structured-data element the agent adds, or the APP-NAME mapped
    /// (`sshd`/`sshd-session` → `sshd`, `vsftpd` → `vsftpd`, `rsyncd`/`rsync` → `rsync`,
    /// `mysqld`/`mariadbd`/`mariadb` → `mysql`, `redis`/`redis-server` → `redis`, `mongod` →
    /// `mongodb`, `nginx`/`apache2`/`httpd` → `web`). `None`: every rule is tried.
    pub service: Option<String>,
    /// The text the rules see. For agent-shipped lines (the `mirage@32473` element present)
    /// it is the MSG exactly as the agent read it from the file; for relayed syslog it is the
    /// line as rsyslog would have written it to a file: `TIMESTAMP HOST APP[PID]: MSG`
    /// (RFC 3339 timestamp, `[PID]` only when the header has a PROCID).
    pub line: String,
    /// The header's timestamp (Unix seconds, UTC), if it had one.
    pub timestamp: Option<i64>,
    /// The agent's sequence number (the `seq` parameter of the `mirage@32473` element), if the
    /// message had one. On a TLS agent connection the listener drops a number it has already
    /// handed to detection and acknowledges numbers back; elsewhere it is only carried.
    pub seq: Option<u64>,
}
