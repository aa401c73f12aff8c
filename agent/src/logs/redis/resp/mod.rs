//! RESP2, the Redis wire protocol (<https://redis.io/docs/latest/develop/reference/protocol-spec/>):
//! an incremental, bounded decoder and the command encoder.
//!
//! Written here rather than taken from a crate because the collector needs two properties that
//! general-purpose clients do not promise together: every limit is explicit and enforced before
//! anything is allocated (a declared bulk length or array size is checked, never trusted for a
//! `Vec::with_capacity`), and an over-long simple string — a `MONITOR` line for a `SET` of a
//! 100 MB value — is kept as a bounded prefix while the rest is discarded, instead of either
//! buffering it whole or dropping the connection (which would blind the collector exactly
//! when an attacker sends something large). The original collector panicked on a full read;
//! here every malformed or hostile input is a [`RespError`] and the caller drops the
//! connection. The collector never sends `HELLO 3`, so only RESP2's five types are accepted.

use std::mem;

/// One decoded reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `+...`: a status line (every `MONITOR` line is one).
    Simple(Vec<u8>),
    /// A status line longer than [`Limits::max_inline`]: its first `max_inline` bytes.
    LongSimple(Vec<u8>),
    /// `-...`: an error reply (`WRONGPASS ...`, `NOPERM ...`), cut to `max_inline` bytes.
    Error(Vec<u8>),
    /// `:...`: an integer.
    Integer(i64),
    /// `$...`: a bulk string.
    Bulk(Vec<u8>),
    /// `$-1` or `*-1`: the null bulk string or array.
    Null,
    /// `*...`: an array.
    Array(Vec<Value>),
}

/// Bounds on what one connection may make the decoder hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest bulk string accepted (bytes); a longer declared length is an error.
    pub max_bulk: usize,
    /// Bytes kept of a simple string or error; the rest of the line is discarded.
    pub max_inline: usize,
    /// Most elements one array may declare.
    pub max_elements: usize,
    /// Deepest array nesting (an array at top level is depth 1).
    pub max_depth: usize,
    /// Most memory one top-level value may take while it is assembled: payload bytes plus
    /// the size of every element.
    pub max_value: usize,
}

impl Default for Limits {
    /// 64 MiB bulk strings and values (far above any `ACL LOG` reply), 64 KiB kept of a status
    /// line, 1 Mi elements, depth 8 (`ACL LOG` needs 2).
    fn default() -> Self {
        Self {
            max_bulk: 64 * 1024 * 1024,
            max_inline: 64 * 1024,
            max_elements: 1024 * 1024,
            max_depth: 8,
            max_value: 64 * 1024 * 1024,
        }
    }
}

impl Limits {
    /// The most bytes the decoder buffers between two calls to [`Decoder::decode`], not counting
    /// the chunk fed in between: a bulk string with its header and CRLF, or a status line.
    pub fn max_buffered(&self) -> usize {
        self.max_bulk.max(self.max_inline) + MAX_HEADER + 2
    }
}

/// The longest header line (`$`, `*`, `:`) accepted, CRLF included: a sign, 19 digits, CRLF.
const MAX_HEADER: usize = 24;

/// Why the byte stream is not valid RESP2 (or breaks a limit). The connection cannot be
/// resynchronised after any of these: the caller drops it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RespError {
    /// A value started with a byte that is not one of RESP2's five type markers.
    #[error("invalid type byte 0x{0:02x}")]
    InvalidType(u8),
    /// A length or integer line is not a decimal integer in range, or has no CRLF within
    /// its size limit.
    #[error("invalid {what} line")]
    BadHeader {
        /// `"bulk length"`, `"array length"` or `"integer"`.
        what: &'static str,
    },
    /// A bulk string was not followed by CRLF.
    #[error("missing CRLF after a bulk string")]
    MissingCrlf,
    /// A declared size is over its limit.
    #[error("{what} of {len} over the limit of {max}")]
    TooLarge {
        /// `"bulk string"`, `"array"` or `"value"`.
        what: &'static str,
        /// The declared (or reached) size.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Arrays nested deeper than [`Limits::max_depth`].
    #[error("arrays nested deeper than {max}")]
    TooDeep {
        /// The limit.
        max: usize,
    },
}

/// An array being filled.
#[derive(Debug)]
struct Frame {
    want: usize,
    items: Vec<Value>,
}

/// An over-long status or error line whose tail is being discarded up to its LF.
#[derive(Debug)]
struct Skip {
    error: bool,
    kept: Vec<u8>,
}

/// Incremental decoder: [`feed`](Self::feed) bytes as they arrive, take values with
/// [`decode`](Self::decode). Bytes of an incomplete value stay buffered (within
/// [`Limits::max_buffered`]); the arrays around it are kept parsed, so a large reply arriving
/// in many small reads is not re-parsed from its start each time.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    start: usize,
    /// Bytes from `start` already searched for a line end without finding one.
    scanned: usize,
    stack: Vec<Frame>,
    skip: Option<Skip>,
    /// What the current top-level value holds so far (see [`Limits::max_value`]).
    value_bytes: usize,
}

impl Decoder {
    /// An empty decoder with these limits.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            stack: Vec::new(),
            skip: None,
            value_bytes: 0,
        }
    }

    /// Appends received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        if self.start > 0 && (self.start == self.buf.len() || self.start >= self.buf.len() / 2) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes buffered and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete value, `None` if more bytes are needed.
    ///
    /// # Errors
    ///
    /// On invalid input or a broken limit; the decoder must then be discarded.
    pub fn decode(&mut self) -> Result<Option<Value>, RespError> {
        loop {
            let item = if self.skip.is_some() {
                match self.skip_line() {
                    Some(item) => item,
                    None => return Ok(None),
                }
            } else {
                match self.item()? {
                    Step::Item(item) => item,
                    Step::Open => continue,
                    Step::More => return Ok(None),
                }
            };
            if let Some(value) = self.complete(item)? {
                return Ok(Some(value));
            }
        }
    }

    /// Counts `n` more bytes against the value limit.
    fn account(&mut self, n: usize) -> Result<(), RespError> {
        self.value_bytes = self.value_bytes.saturating_add(n);
        if self.value_bytes > self.limits.max_value {
            return Err(RespError::TooLarge {
                what: "value",
                len: self.value_bytes as u64,
                max: self.limits.max_value as u64,
            });
        }
        Ok(())
    }

    /// Places a finished item into the open arrays; returns the top-level value once done.
    fn complete(&mut self, mut item: Value) -> Result<Option<Value>, RespError> {
        self.account(mem::size_of::<Value>())?;
        loop {
            let Some(top) = self.stack.last_mut() else {
                self.value_bytes = 0;
                return Ok(Some(item));
            };
            top.items.push(item);
            if top.items.len() < top.want {
                return Ok(None);
            }
            let Some(done) = self.stack.pop() else {
                return Ok(None);
            };
            item = Value::Array(done.items);
        }
    }

    /// Parses the next item at `start`.
    fn item(&mut self) -> Result<Step, RespError> {
        let avail = &self.buf[self.start..];
        let Some(&kind) = avail.first() else {
            return Ok(Step::More);
        };
        match kind {
            b'+' | b'-' => Ok(self.line(kind == b'-')),
            b':' => {
                let Some((n, used)) = header(avail, "integer")? else {
                    return Ok(Step::More);
                };
                self.consume(used)?;
                Ok(Step::Item(Value::Integer(n)))
            }
            b'$' => {
                let Some((n, used)) = header(avail, "bulk length")? else {
                    return Ok(Step::More);
                };
                if n == -1 {
                    self.consume(used)?;
                    return Ok(Step::Item(Value::Null));
                }
                if n < 0 {
                    return Err(RespError::BadHeader {
                        what: "bulk length",
                    });
                }
                let len = usize::try_from(n)
                    .ok()
                    .filter(|len| *len <= self.limits.max_bulk)
                    .ok_or(RespError::TooLarge {
                        what: "bulk string",
                        len: n.unsigned_abs(),
                        max: self.limits.max_bulk as u64,
                    })?;
                // Checked before buffering: the body is taken only once it is all here, so
                // the buffer never holds more than one bulk string and its header.
                let total = used + len + 2;
                if avail.len() < total {
                    return Ok(Step::More);
                }
                if &avail[used + len..total] != b"\r\n" {
                    return Err(RespError::MissingCrlf);
                }
                let body = avail[used..used + len].to_vec();
                self.consume(total)?;
                Ok(Step::Item(Value::Bulk(body)))
            }
            b'*' => {
                let Some((n, used)) = header(avail, "array length")? else {
                    return Ok(Step::More);
                };
                if n == -1 {
                    self.consume(used)?;
                    return Ok(Step::Item(Value::Null));
                }
                if n < 0 {
                    return Err(RespError::BadHeader {
                        what: "array length",
                    });
                }
                let want = usize::try_from(n)
                    .ok()
                    .filter(|want| *want <= self.limits.max_elements)
                    .ok_or(RespError::TooLarge {
                        what: "array",
                        len: n.unsigned_abs(),
                        max: self.limits.max_elements as u64,
                    })?;
                self.consume(used)?;
                if want == 0 {
                    return Ok(Step::Item(Value::Array(Vec::new())));
                }
                if self.stack.len() >= self.limits.max_depth {
                    return Err(RespError::TooDeep {
                        max: self.limits.max_depth,
                    });
                }
                // The declared length is bounded but still hostile input: grow as items come.
                self.stack.push(Frame {
                    want,
                    items: Vec::with_capacity(want.min(64)),
                });
                Ok(Step::Open)
            }
            other => Err(RespError::InvalidType(other)),
        }
    }

    /// A status or error line: whole, or (over `max_inline`) its prefix and skip mode.
    fn line(&mut self, error: bool) -> Step {
        let avail = &self.buf[self.start..];
        let from = self.scanned.max(1);
        if let Some(i) = avail[from..].iter().position(|&b| b == b'\n') {
            let end = from + i;
            // The LF ends the line and a CR before it is dropped; a bare LF is tolerated (Redis
            // never sends one: `MONITOR` escapes control bytes, status lines cannot hold them).
            let body_end = if end > 1 && avail[end - 1] == b'\r' {
                end - 1
            } else {
                end
            };
            let body = &avail[1..body_end];
            let item = if body.len() > self.limits.max_inline {
                let kept = body[..self.limits.max_inline].to_vec();
                if error {
                    Value::Error(kept)
                } else {
                    Value::LongSimple(kept)
                }
            } else if error {
                Value::Error(body.to_vec())
            } else {
                Value::Simple(body.to_vec())
            };
            self.start += end + 1;
            self.scanned = 0;
            // Accounted in `complete`; a line's bytes are bounded by `max_inline`.
            self.value_bytes = self
                .value_bytes
                .saturating_add(body.len().min(self.limits.max_inline));
            return Step::Item(item);
        }
        if avail.len() > self.limits.max_inline + 2 {
            let kept = avail[1..=self.limits.max_inline].to_vec();
            self.value_bytes = self.value_bytes.saturating_add(kept.len());
            self.start = self.buf.len();
            self.scanned = 0;
            self.skip = Some(Skip { error, kept });
            return Step::More;
        }
        self.scanned = avail.len();
        Step::More
    }

    /// Discards the rest of an over-long line; the kept prefix once its end is found.
    fn skip_line(&mut self) -> Option<Value> {
        match self.buf[self.start..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.start += i + 1;
                let skip = self.skip.take()?;
                Some(if skip.error {
                    Value::Error(skip.kept)
                } else {
                    Value::LongSimple(skip.kept)
                })
            }
            None => {
                self.start = self.buf.len();
                None
            }
        }
    }

    /// Marks `n` bytes at `start` consumed, counting them against the value limit.
    fn consume(&mut self, n: usize) -> Result<(), RespError> {
        self.start += n;
        self.scanned = 0;
        self.account(n)
    }
}

/// What [`Decoder::item`] found.
enum Step {
    Item(Value),
    /// An array was opened; its items follow.
    Open,
    /// More bytes are needed.
    More,
}

/// Parses a `$`, `*` or `:` line: the integer and the bytes it took, `None` if incomplete.
fn header(avail: &[u8], what: &'static str) -> Result<Option<(i64, usize)>, RespError> {
    let window = &avail[..avail.len().min(MAX_HEADER)];
    let Some(end) = window.iter().position(|&b| b == b'\n') else {
        if avail.len() >= MAX_HEADER {
            return Err(RespError::BadHeader { what });
        }
        return Ok(None);
    };
    if end < 2 || window[end - 1] != b'\r' {
        return Err(RespError::BadHeader { what });
    }
    let digits = &window[1..end - 1];
    let (negative, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(RespError::BadHeader { what });
    }
    let mut n: i64 = 0;
    for &d in digits {
        n = n
            .checked_mul(10)
            .and_then(|n| {
                let d = i64::from(d - b'0');
                if negative {
                    n.checked_sub(d)
                } else {
                    n.checked_add(d)
                }
            })
            .ok_or(RespError::BadHeader { what })?;
    }
    Ok(Some((n, end + 1)))
}

/// A command as RESP2 sends it: an array of bulk strings.
pub fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A value as a server sends it (tests and the fake servers in them).
pub fn encode(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Simple(s) | Value::LongSimple(s) => {
            out.push(b'+');
            out.extend_from_slice(s);
            out.extend_from_slice(b"\r\n");
        }
        Value::Error(s) => {
            out.push(b'-');
            out.extend_from_slice(s);
            out.extend_from_slice(b"\r\n");
        }
        Value::Integer(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
        Value::Bulk(b) => {
            out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        Value::Null => out.extend_from_slice(b"$-1\r\n"),
        Value::Array(items) => {
            out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
            for item in items {
                encode(item, out);
            }
        }
    }
}

#[cfg(test)]
mod tests;
