//! A server-sent events parser, following the HTML standard's "event stream interpretation"
//! (<https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation>).
//!
//! Written here rather than taken from a crate: the maintained SSE crates are either browser
//! `EventSource` clients that own the HTTP connection, its retries and its reconnection delay (the
//! agent needs its own: `Last-Event-ID` is the *applied* revision, not the last one received, and
//! the backoff is ours), or parse whole lines with a rescan per chunk, which is quadratic on the
//! one line of a million-entry snapshot (about 70 MB arriving in thousands of chunks). This one
//! scans each byte once, keeps a partial line across chunks, and is pure: bytes in, events out.
//!
//! What the standard asks and this does: lines end in CRLF, LF or CR (a CR at the end of a chunk
//! may be the first half of a CRLF split across chunks); a leading UTF-8 BOM is skipped; a line
//! starting with `:` is a comment (the manager's keep-alives); `field: value` loses one space
//! after the colon, a line without a colon is a field with an empty value; `data` lines are
//! joined with `\n`; an `id` containing NUL is ignored, and the last id persists across events;
//! `retry` takes digits only; an empty line dispatches the event unless it has no data; an event
//! cut off by the end of the stream is never dispatched. Invalid UTF-8 is replaced, as a browser
//! does.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` type; `message` when none was given.
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The last event id seen on the stream so far (empty if none).
    pub id: String,
}

/// Why the stream cannot be parsed further.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SseError {
    /// One event (or one line) grew past the limit.
    #[error("an event of more than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
}

/// Incremental parser: feed it chunks with [`SseParser::push`], take events with
/// [`SseParser::next_event`].
#[derive(Debug)]
pub struct SseParser {
    /// Bytes received; those before `start` are consumed (dropped at the next push).
    buf: Vec<u8>,
    /// Start of the first unconsumed line in `buf`.
    start: usize,
    /// How far `buf` has been searched for a line end (so no byte is scanned twice).
    scanned: usize,
    /// The previous chunk ended in CR: a LF starting the next one belongs to it.
    skip_lf: bool,
    /// Still at the very start of the stream (a BOM may follow).
    at_start: bool,
    data: String,
    has_data: bool,
    event: String,
    last_id: String,
    retry_ms: Option<u64>,
    limit: usize,
}

/// The UTF-8 byte order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

impl SseParser {
    /// A parser refusing events (and lines) larger than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            scanned: 0,
            skip_lf: false,
            at_start: true,
            data: String::new(),
            has_data: false,
            event: String::new(),
            last_id: String::new(),
            retry_ms: None,
            limit,
        }
    }

    /// Appends a chunk of the stream.
    ///
    /// # Errors
    ///
    /// [`SseError::TooLarge`] when the partial line and event exceed the limit; the parser must
    /// not be used afterwards.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<(), SseError> {
        if self.skip_lf && !chunk.is_empty() {
            if chunk[0] == b'\n' {
                chunk = &chunk[1..];
            }
            self.skip_lf = false;
        }
        // Drop what was consumed: at most one partial line is moved, once per chunk.
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.scanned -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(chunk);
        if self.buf.len() + self.data.len() > self.limit {
            return Err(SseError::TooLarge { limit: self.limit });
        }
        Ok(())
    }

    /// The reconnection time the stream asked for (`retry:`), if any.
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    /// The next complete event in what was pushed so far, if any.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        if self.at_start {
            // Wait until we know whether the stream opens with a BOM.
            if self.buf.len() < BOM.len() && BOM.starts_with(&self.buf) {
                return None;
            }
            if self.buf.starts_with(BOM) {
                self.start = BOM.len();
                self.scanned = BOM.len();
            }
            self.at_start = false;
        }
        loop {
            let from = self.scanned.max(self.start);
            let Some(i) = self.buf[from..]
                .iter()
                .position(|b| *b == b'\n' || *b == b'\r')
            else {
                self.scanned = self.buf.len();
                return None;
            };
            let end = from + i;
            let mut next = end + 1;
            if self.buf[end] == b'\r' {
                match self.buf.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    // CR at the end of what we have: a LF may open the next chunk.
                    None => self.skip_lf = true,
                }
            }
            let buf = std::mem::take(&mut self.buf);
            let event = self.line(&buf[self.start..end]);
            self.buf = buf;
            self.start = next;
            self.scanned = next;
            if event.is_some() {
                return event;
            }
        }
    }

    /// Processes one line (without its terminator); returns an event when it dispatches one.
    fn line(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return None;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"event" => value.as_ref().clone_into(&mut self.event),
            b"data" => {
                self.data.push_str(&value);
                self.data.push('\n');
                self.has_data = true;
            }
            b"id" if !value.contains('\0') => value.as_ref().clone_into(&mut self.last_id),
            b"retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry_ms = value.parse().ok();
            }
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = std::mem::take(&mut self.event);
        if !self.has_data {
            self.data.clear();
            return None;
        }
        self.has_data = false;
        let mut data = std::mem::take(&mut self.data);
        if data.ends_with('\n') {
            data.pop();
        }
        Some(SseEvent {
            event: if event.is_empty() {
                "message".to_owned()
            } else {
                event
            },
            data,
            id: self.last_id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::new(1 << 20);
        let mut out = Vec::new();
        for c in chunks {
            p.push(c).unwrap();
            while let Some(e) = p.next_event() {
                out.push(e);
            }
        }
        out
    }

    fn ev(event: &str, data: &str, id: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
            id: id.into(),
        }
    }

    #[test]
    fn parses_the_managers_events() {
        let got = all(&[b"event: snapshot\nid: 7\ndata: {\"revision\":7}\n\n: keep-alive\n\nevent: delta\nid: 8\ndata: {\"revision\":8}\n\n"]);
        assert_eq!(
            got,
            vec![
                ev("snapshot", "{\"revision\":7}", "7"),
                ev("delta", "{\"revision\":8}", "8")
            ]
        );
    }

    #[test]
    fn any_split_gives_the_same_events() {
        let stream: &[u8] =
            b"\xEF\xBB\xBFevent: a\r\nid: 1\r\ndata: x\r\ndata:y\r\n\r\n:c\rdata: z\r\rid\nevent:b\ndata\n\n";
        let want = all(&[stream]);
        assert_eq!(
            want,
            vec![
                ev("a", "x\ny", "1"),
                ev("message", "z", "1"),
                ev("b", "", "")
            ]
        );
        for cut in 0..=stream.len() {
            assert_eq!(all(&[&stream[..cut], &stream[cut..]]), want, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(all(&bytes), want);
    }

    #[test]
    fn no_data_no_event_and_type_resets() {
        assert_eq!(
            all(&[b"event: a\n\ndata: x\n\n"]),
            vec![ev("message", "x", "")]
        );
    }

    #[test]
    fn id_persists_and_nul_ids_are_ignored() {
        let got = all(&[b"id: 5\ndata: a\n\ndata: b\n\nid: 6\0\ndata: c\n\n"]);
        assert_eq!(
            got,
            vec![
                ev("message", "a", "5"),
                ev("message", "b", "5"),
                ev("message", "c", "5")
            ]
        );
    }

    #[test]
    fn an_unterminated_event_is_not_dispatched() {
        assert!(all(&[b"data: x\n"]).is_empty());
        assert!(all(&[b"data: x"]).is_empty());
    }

    #[test]
    fn retry_takes_digits_only() {
        let mut p = SseParser::new(1024);
        p.push(b"retry: 12x\n\nretry: 3000\n\n").unwrap();
        assert!(p.next_event().is_none());
        assert_eq!(p.retry_ms(), Some(3000));
    }

    #[test]
    fn one_space_is_stripped_and_unknown_fields_ignored() {
        assert_eq!(
            all(&[b"data:  two\nfoo: bar\ndata:\n\n"]),
            vec![ev("message", " two\n", "")]
        );
    }

    #[test]
    fn refuses_oversized_events() {
        let mut p = SseParser::new(16);
        p.push(b"data: 0123456789").unwrap();
        assert_eq!(p.push(b"abcdef"), Err(SseError::TooLarge { limit: 16 }));
    }

    #[test]
    fn a_large_line_in_many_chunks() {
        let payload = "x".repeat(1 << 20);
        let stream = format!("event: snapshot\ndata: {payload}\n\n");
        let chunks: Vec<&[u8]> = stream.as_bytes().chunks(1000).collect();
        let mut p = SseParser::new(4 << 20);
        let mut got = Vec::new();
        for c in chunks {
            p.push(c).unwrap();
            while let Some(e) = p.next_event() {
                got.push(e);
            }
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].data.len(), payload.len());
    }
}
