//! Rewritten flows as userspace sees them: the `FLOW_EVENTS` ring-buffer records (decoded,
//! validated, logged, and appended to the `--flow-log` file as JSON lines) and the `FLOWS` map
//! entries that `mirage-agent list --flows` shows.
//!
//! Nothing read from the kernel is trusted: kind, family, model and protocol go through
//! `TryFrom`/lookups, and a record of the wrong size is refused, so a layout mismatch shows up as
//! an error instead of as garbage addresses.

use std::{
    fs::File,
    io::{self, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use agent_common::{FlowEntry, FlowEvent, FlowKey, FlowKind, RedirectModel};
use serde::Serialize;

use crate::config::{addr_from_bytes, model_name, proto_name};

/// Why a flow event or entry could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlowError {
    /// The ring-buffer record has the wrong size for a [`FlowEvent`].
    #[error("flow event of {len} bytes, expected {expected}")]
    Size {
        /// Bytes received.
        len: usize,
        /// `size_of::<FlowEvent>()`.
        expected: usize,
    },
    /// A field holds a value outside the ABI.
    #[error("flow event field `{field}` has the invalid value {value}")]
    Field {
        /// The field.
        field: &'static str,
        /// The raw value.
        value: u8,
    },
}

/// Errors of the flow log file.
#[derive(Debug, thiserror::Error)]
pub enum FlowLogError {
    /// The file could not be opened or written.
    #[error("{op} flow log {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// `redirect` or `reflect`, from a [`FlowKind`].
pub fn kind_action(kind: FlowKind) -> &'static str {
    match kind {
        FlowKind::RedirectForward | FlowKind::RedirectReverse => "redirect",
        FlowKind::ReflectForward | FlowKind::ReflectReverse => "reflect",
    }
}

/// The name of a flow entry's kind in `list --flows`.
pub fn kind_name(kind: FlowKind) -> &'static str {
    match kind {
        FlowKind::RedirectForward => "redirect-forward",
        FlowKind::RedirectReverse => "redirect-reverse",
        FlowKind::ReflectForward => "reflect-forward",
        FlowKind::ReflectReverse => "reflect-reverse",
    }
}

fn sock(family: u8, addr: [u8; 16], port: u16) -> Result<SocketAddr, FlowError> {
    addr_from_bytes(family, addr)
        .map(|ip| SocketAddr::new(ip, port))
        .ok_or(FlowError::Field {
            field: "family",
            value: family,
        })
}

fn proto(p: u8) -> Result<&'static str, FlowError> {
    proto_name(p).ok_or(FlowError::Field {
        field: "proto",
        value: p,
    })
}

/// One new rewritten flow, as logged and written to the flow log (one JSON object per line).
/// Socket addresses are `a.b.c.d:port` or `[v6]:port`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FlowRecord {
    /// `redirect` or `reflect`.
    pub kind: &'static str,
    /// `preserve-source` or `full-nat`.
    pub model: &'static str,
    /// `tcp` or `udp`.
    pub proto: &'static str,
    /// The attacker's address and port.
    pub attacker: String,
    /// The address and port the attacker connected to (this host).
    pub orig_dst: String,
    /// Where the flow now goes: the sandbox (redirect) or the attacker (reflect).
    pub target: String,
    /// The source address and port the target sees: the attacker (preserve-source), the NAT
    /// address (full-nat), this host (reflect). Sandbox records with this source belong to
    /// `attacker`.
    pub nat: String,
    /// When the kernel created the flow (`CLOCK_BOOTTIME` ns, as attacker expiries).
    pub ts_ns: u64,
}

impl TryFrom<&FlowEvent> for FlowRecord {
    type Error = FlowError;

    fn try_from(e: &FlowEvent) -> Result<Self, FlowError> {
        let kind = FlowKind::try_from(e.kind).map_err(|value| FlowError::Field {
            field: "kind",
            value,
        })?;
        let model = RedirectModel::try_from(e.model).map_err(|value| FlowError::Field {
            field: "model",
            value,
        })?;
        Ok(Self {
            kind: kind_action(kind),
            model: model_name(model),
            proto: proto(e.proto)?,
            attacker: sock(e.family, e.attacker, e.attacker_port)?.to_string(),
            orig_dst: sock(e.family, e.orig_dst, e.orig_dport)?.to_string(),
            target: sock(e.family, e.target, e.target_port)?.to_string(),
            nat: sock(e.family, e.nat_addr, e.nat_port)?.to_string(),
            ts_ns: e.ts_ns,
        })
    }
}

impl FlowRecord {
    /// Decodes a ring-buffer record.
    pub fn decode(bytes: &[u8]) -> Result<Self, FlowError> {
        let expected = size_of::<FlowEvent>();
        if bytes.len() != expected {
            return Err(FlowError::Size {
                len: bytes.len(),
                expected,
            });
        }
        // SAFETY: `bytes` holds exactly `size_of::<FlowEvent>()` bytes, and `FlowEvent` is
        // `repr(C)` plain integers and byte arrays, valid for any bit pattern; `read_unaligned`
        // because the ring buffer guarantees only 8-byte alignment of the record.
        let event: FlowEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        Self::try_from(&event)
    }
}

/// The `--flow-log` file: one JSON object per line, appended, written with one `write` per line
/// so that a reader (or a concurrent writer) never sees half a record.
pub struct FlowLog {
    file: File,
    path: PathBuf,
}

impl FlowLog {
    /// Opens (creating it if needed) `path` for appending.
    pub fn open(path: &Path) -> Result<Self, FlowLogError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| FlowLogError::Io {
                op: "opening",
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    /// Appends one record and flushes it to the file.
    pub fn append(&mut self, rec: &FlowRecord) -> Result<(), FlowLogError> {
        let mut line = serde_json::to_vec(rec).map_err(|e| FlowLogError::Io {
            op: "encoding for",
            path: self.path.clone(),
            source: e.into(),
        })?;
        line.push(b'\n');
        // `File` is unbuffered: the line is in the file once `write_all` returns.
        self.file
            .write_all(&line)
            .and_then(|()| self.file.flush())
            .map_err(|source| FlowLogError::Io {
                op: "writing",
                path: self.path.clone(),
                source,
            })
    }
}

/// One `FLOWS` entry (one direction of a rewritten flow), for `list --flows`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ListedFlow {
    /// `redirect-forward`, `redirect-reverse`, `reflect-forward` or `reflect-reverse`.
    pub kind: &'static str,
    /// `tcp` or `udp`.
    pub proto: &'static str,
    /// Source of matching packets as they arrive.
    pub src: String,
    /// Destination of matching packets as they arrive.
    pub dst: String,
    /// Source they leave with.
    pub new_src: String,
    /// Destination they leave with.
    pub new_dst: String,
    /// Seconds since the flow was created.
    pub age_secs: f64,
}

impl ListedFlow {
    /// Builds the listing of an entry; `now_ns` is `CLOCK_BOOTTIME`. The new addresses have the
    /// family of the key: the data path never translates between families.
    pub fn new(k: &FlowKey, v: &FlowEntry, now_ns: u64) -> Result<Self, FlowError> {
        let kind = FlowKind::try_from(v.kind).map_err(|value| FlowError::Field {
            field: "kind",
            value,
        })?;
        Ok(Self {
            kind: kind_name(kind),
            proto: proto(k.proto)?,
            src: sock(k.family, k.src, k.sport)?.to_string(),
            dst: sock(k.family, k.dst, k.dport)?.to_string(),
            new_src: sock(k.family, v.src, v.sport)?.to_string(),
            new_dst: sock(k.family, v.dst, v.dport)?.to_string(),
            age_secs: now_ns.saturating_sub(v.created_ns) as f64 / 1e9,
        })
    }
}

pub mod report;

#[cfg(test)]
mod tests;
