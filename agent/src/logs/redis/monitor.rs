//! `MONITOR` lines: what Redis sends is already the line `redis-cli MONITOR` prints, so the
//! collector ships it as is, made safe for a syslog message and cut to a bounded length, and
//! skips the lines of its own `ACL LOG` connection.
//!
//! Redis builds each line in `replicationFeedMonitors` (replication.c): `%ld.%06ld` seconds,
//! `[db addr]` (or `[db lua]`, `[db unix:PATH]`), then every argument through `sdscatrepr`
//! (sds.c), which quotes it and escapes `\\`, `"`, `\n`, `\r`, `\t`, `\a`, `\b` and every byte
//! that is not printable as `\xHH`. A line is therefore printable ASCII; [`sanitize`] escapes
//! anything else the same way, so a line from a server that broke that rule still ships as one
//! line, and a real line is unchanged. `AUTH`, `HELLO ... AUTH` and `MIGRATE ... AUTH`
//! arguments are replaced by `(redacted)` by Redis itself (6.2+; before 6.2 `AUTH` and `HELLO`
//! were never shown).

use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

/// Most bytes of a shipped line: a `MONITOR` line of a large `SET` is cut here (the server's
/// default message limit is 16 KiB, with the syslog header and structured data on top).
pub(super) const MAX_LINE: usize = 8 * 1024;

/// What a cut line ends with.
pub(super) const TRUNCATED: &str = " (truncated)";

/// Bytes as printable ASCII: `0x20..=0x7e` kept, every other byte as `\xHH` (`sdscatrepr`'s
/// form for non-printable bytes).
pub(super) fn sanitize(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if (0x20..=0x7e).contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// `line` cut to [`MAX_LINE`] bytes, marked if it was cut here or before (`truncated`).
/// `line` is ASCII (from [`sanitize`]), so any byte index is a character boundary.
pub(super) fn bounded(mut line: String, truncated: bool) -> String {
    if line.len() > MAX_LINE - TRUNCATED.len() {
        line.truncate(MAX_LINE - TRUNCATED.len());
        line.push_str(TRUNCATED);
    } else if truncated {
        line.push_str(TRUNCATED);
    }
    line
}

/// The client address of a `MONITOR` line: `10.77.0.20:44474`, `[::1]:6379`, `lua`,
/// `unix:/run/redis.sock`; `None` if the line does not have the `TS [DB ADDR] ...` shape.
pub(super) fn client(line: &str) -> Option<&str> {
    let (ts, rest) = line.split_once(' ')?;
    let (secs, micros) = ts.split_once('.')?;
    if secs.is_empty()
        || micros.is_empty()
        || !secs
            .bytes()
            .chain(micros.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let rest = rest.strip_prefix('[')?;
    let (db, rest) = rest.split_once(' ')?;
    if db.is_empty() || !db.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // An IPv6 address has its own brackets: the client field ends at the first `] "` (the
    // first argument is always there and always quoted) or at a final `]`.
    match rest.find("] \"") {
        Some(end) => Some(&rest[..end]),
        None => rest.strip_suffix(']'),
    }
}

/// The line to ship for one `MONITOR` status reply; `None` for a line of one of the
/// collector's own connections.
pub(super) fn line(raw: &[u8], truncated: bool, own: &OwnConns) -> Option<String> {
    let line = sanitize(raw);
    if let Some(addr) = client(&line)
        && own.contains(addr)
    {
        return None;
    }
    Some(bounded(line, truncated))
}

/// The addresses of the collector's other connections (its `ACL LOG` connection's `AUTH`
/// would otherwise be shipped as a client's), as Redis formats them (`ip:port`,
/// `[ipv6]:port`, which is also how [`SocketAddr`] displays).
#[derive(Debug, Clone, Default)]
pub(super) struct OwnConns {
    addrs: Arc<Mutex<HashSet<String>>>,
}

impl OwnConns {
    /// Adds `addr` until the returned guard is dropped. Called right after connecting, before
    /// `AUTH`, so the `AUTH` line that follows is already skipped.
    pub(super) fn register(&self, addr: SocketAddr) -> OwnConn {
        let addr = addr.to_string();
        self.lock().insert(addr.clone());
        OwnConn {
            set: self.clone(),
            addr,
        }
    }

    /// Whether `addr` is one of the collector's connections.
    pub(super) fn contains(&self, addr: &str) -> bool {
        self.lock().contains(addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        // The set is only inserted into and removed from; a panic elsewhere cannot leave it
        // half-changed, so a poisoned lock is still usable.
        self.addrs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Removes its address from the [`OwnConns`] when dropped.
#[derive(Debug)]
pub(super) struct OwnConn {
    set: OwnConns,
    addr: String,
}

impl Drop for OwnConn {
    fn drop(&mut self) {
        self.set.lock().remove(&self.addr);
    }
}
