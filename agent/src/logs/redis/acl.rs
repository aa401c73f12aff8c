//! `ACL LOG`: entries, which of them are new, and the state that remembers it across restarts.
//!
//! Redis keeps the last `acllog-max-len` (default 128) denials: failed `AUTH` (reason `auth`)
//! and commands, keys or channels a user may not touch. A denial similar to a recent entry
//! (same reason, context, object and user, within 60 s) is folded into it: its `count` grows
//! and its `client-info` becomes the latest client's. Redis 7.2+ adds `entry-id`,
//! `timestamp-created` and `timestamp-last-updated`.
//!
//! **What is shipped.** One line per new entry, and once more each time an entry's count grew
//! (a folded denial is new evidence, possibly from another client): the entry's `client-info`
//! (the line the server's `redis-acl-auth-failure` rule matches, `id=.. addr=.. laddr=.. ...
//! cmd=auth user=.. redir=-1 resp=2`) followed by ` reason=R count=N`, which the rule's
//! trailing `.*` accepts.
//!
//! **Which entries are new.** Each entry gets a key that changes whenever Redis changes the
//! entry: `entry-id/timestamp-created/timestamp-last-updated` on 7.2+; on older servers a hash
//! of every field but `age-seconds` (the count and the stored `client-info`, which names a
//! unique client id, change with every fold). The state is the set of keys in the last reply;
//! an entry whose key is not in it is shipped. An entry that left the log cannot come back,
//! so nothing older needs remembering, and a Redis restart (ids start again) yields new
//! timestamps or new client ids, so new keys.
//!
//! **Restarts.** The set is written to `state_dir/redis-acl.json` only after
//! [`Sink::send`](crate::logs::Sink::send) returned, so an agent restart neither re-ships nor
//! skips entries (a crash between the two re-ships one read's entries at most). On first sight
//! (no state file, or one written for another Redis address) the existing entries are recorded
//! without shipping them, as the file collector starts at the end of a file it has never seen:
//! old denials are not counted again as new attacks.

use std::{
    collections::HashSet,
    io::{self, Write},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{
    RedisError,
    conn::unexpected,
    monitor::{bounded, sanitize},
    resp::Value,
};

/// The state file's name in `state_dir`.
pub(super) const STATE_FILE: &str = "redis-acl.json";

/// How many entries one `ACL LOG` read asks for (Redis's default is only 10).
pub(super) const READ_COUNT: &[u8] = b"1024";

/// One `ACL LOG` entry, reduced to what the collector needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    /// Changes whenever Redis changes the entry (see the module docs).
    pub key: String,
    /// The line to ship.
    pub line: String,
}

/// Parses an `ACL LOG` reply (RESP2: an array of flat key/value arrays, newest first).
pub(super) fn parse(reply: &Value) -> Result<Vec<Entry>, RedisError> {
    let Value::Array(items) = reply else {
        return Err(unexpected("ACL LOG", reply));
    };
    items.iter().map(entry).collect()
}

fn entry(item: &Value) -> Result<Entry, RedisError> {
    let Value::Array(fields) = item else {
        return Err(unexpected("ACL LOG", item));
    };
    if fields.len() % 2 != 0 {
        return Err(unexpected("ACL LOG", item));
    }
    let mut hash = Fnv::new();
    let (mut client_info, mut reason, mut count) = (None, None, None);
    let (mut id, mut created, mut updated) = (None, None, None);
    for pair in fields.chunks_exact(2) {
        let Value::Bulk(name) = &pair[0] else {
            return Err(unexpected("ACL LOG", item));
        };
        let value: Vec<u8> = match &pair[1] {
            Value::Bulk(b) | Value::Simple(b) => b.clone(),
            Value::Integer(n) => n.to_string().into_bytes(),
            Value::Null => Vec::new(),
            _ => return Err(unexpected("ACL LOG", item)),
        };
        let int = || match &pair[1] {
            Value::Integer(n) => Some(*n),
            _ => None,
        };
        match name.as_slice() {
            // Grows between reads of the same, unchanged entry.
            b"age-seconds" => continue,
            b"client-info" => client_info = Some(sanitize(&value)),
            b"reason" => reason = Some(sanitize(&value)),
            b"count" => count = int(),
            b"entry-id" => id = int(),
            b"timestamp-created" => created = int(),
            b"timestamp-last-updated" => updated = int(),
            _ => {}
        }
        hash.write(name);
        hash.write(b"\0");
        hash.write(&value);
        hash.write(b"\0");
    }
    let Some(client_info) = client_info else {
        return Err(unexpected("ACL LOG", item));
    };
    let key = match (id, created, updated) {
        (Some(id), Some(created), Some(updated)) => format!("{id}/{created}/{updated}"),
        _ => format!("fnv:{:016x}", hash.finish()),
    };
    let mut line = client_info;
    if let Some(reason) = reason {
        line.push_str(" reason=");
        line.push_str(&reason);
    }
    if let Some(count) = count {
        line.push_str(&format!(" count={count}"));
    }
    Ok(Entry {
        key,
        line: bounded(line, false),
    })
}

/// FNV-1a, 64 bits: stable across Rust releases and platforms (unlike `DefaultHasher`), which
/// keys written to the state file need.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The state file's content.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    /// Format version, 1.
    version: u32,
    /// The Redis address the keys belong to (`redis.address`).
    address: String,
    /// The keys of the last `ACL LOG` reply.
    seen: Vec<String>,
}

/// Which entries were already shipped.
#[derive(Debug)]
pub(super) struct AclState {
    path: PathBuf,
    address: String,
    /// `None` until the first reply has been recorded (first sight).
    seen: Option<HashSet<String>>,
    /// `seen` differs from the file.
    dirty: bool,
}

impl AclState {
    /// Loads `state_dir/redis-acl.json`; a missing, unreadable or foreign file means first
    /// sight (logged unless missing).
    pub(super) fn load(state_dir: &Path, address: &str) -> Self {
        let path = state_dir.join(STATE_FILE);
        let seen = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Saved>(&bytes) {
                Ok(saved) if saved.version == 1 && saved.address == address => {
                    Some(saved.seen.into_iter().collect())
                }
                Ok(_) => {
                    tracing::info!(path = %path.display(), "ACL LOG state is for another Redis address; starting afresh.");
                    None
                }
                Err(err) => {
                    tracing::warn!(path = %path.display(), error = %err, "ACL LOG state is unreadable; starting afresh (existing entries are not shipped).");
                    None
                }
            },
            Err(err) if err.kind() == io::ErrorKind::NotFound => None,
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "Cannot read the ACL LOG state; starting afresh (existing entries are not shipped).");
                None
            }
        };
        Self {
            path,
            address: address.to_owned(),
            seen,
            dirty: false,
        }
    }

    /// Whether no reply has been recorded yet (the next one is a baseline).
    pub(super) fn first_sight(&self) -> bool {
        self.seen.is_none()
    }

    /// The lines of the entries in `entries` (newest first, as Redis sends them) not yet
    /// shipped, oldest first; none on first sight.
    pub(super) fn new_lines(&self, entries: &[Entry]) -> Vec<String> {
        let Some(seen) = &self.seen else {
            return Vec::new();
        };
        entries
            .iter()
            .rev()
            .filter(|e| !seen.contains(&e.key))
            .map(|e| e.line.clone())
            .collect()
    }

    /// Records `entries` as shipped (call after the sink accepted their lines).
    pub(super) fn record(&mut self, entries: &[Entry]) {
        let keys: HashSet<String> = entries.iter().map(|e| e.key.clone()).collect();
        if self.seen.as_ref() != Some(&keys) {
            self.seen = Some(keys);
            self.dirty = true;
        }
    }

    /// Writes the state file if it changed: to a temporary file, synced, renamed over the old
    /// one, directory synced, so a crash leaves the old or the new state, never a torn one.
    pub(super) async fn save(&mut self) -> Result<(), RedisError> {
        if !self.dirty {
            return Ok(());
        }
        let mut seen: Vec<String> = self.seen.iter().flatten().cloned().collect();
        seen.sort_unstable();
        let saved = Saved {
            version: 1,
            address: self.address.clone(),
            seen,
        };
        let path = self.path.clone();
        let result = tokio::task::spawn_blocking(move || write_atomic(&path, &saved))
            .await
            .map_err(|err| io::Error::other(err.to_string()))
            .and_then(|r| r);
        result.map_err(|source| RedisError::State {
            path: self.path.clone(),
            source,
        })?;
        self.dirty = false;
        Ok(())
    }
}

fn write_atomic(path: &Path, saved: &Saved) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(saved).map_err(io::Error::other)?;
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}
