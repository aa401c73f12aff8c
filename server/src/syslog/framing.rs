//! Incremental RFC 6587 framing for syslog over TCP and TLS.
//!
//! Senders frame messages in one of two ways, and relays mix them, so the choice is made again
//! for every frame ([RFC 6587 §3.4](https://www.rfc-editor.org/rfc/rfc6587#section-3.4)):
//!
//! * octet counting, `LEN SP MSG` ([§3.4.1](https://www.rfc-editor.org/rfc/rfc6587#section-3.4.1),
//!   and the only framing of syslog over TLS,
//!   [RFC 5425 §4.3](https://www.rfc-editor.org/rfc/rfc5425#section-4.3)): a frame that starts
//!   with digits followed by a space;
//! * non-transparent framing ([§3.4.2](https://www.rfc-editor.org/rfc/rfc6587#section-3.4.2)):
//!   anything else, up to a trailer of LF (with an optional CR before it) or NUL.
//!
//! Memory is bounded whatever the peer sends: at most `max + 1` bytes are buffered (the `+ 1`
//! is a CR that may precede the LF). A longer frame is reported as [`Event::Oversized`] and
//! skipped: an octet-counted one by counting LEN bytes off without keeping them, a
//! newline-framed one by discarding up to its trailer. A length that no sender would write
//! (`0`, a leading zero, more than [`MAX_SKIP`]) means the stream is not where we think it
//! is: it is reported as [`Event::Malformed`] and the decoder resynchronises at the next LF.
//! None of these end the connection; only the transport does.

use bytes::{Bytes, BytesMut};

/// Longest octet count accepted as a (then skipped) oversized frame. A larger count is no
/// syslog message but a desynchronised or hostile stream, so it is malformed instead.
pub const MAX_SKIP: usize = 1 << 30;

/// Most digits an octet count can have and still be at most [`MAX_SKIP`].
const MAX_LEN_DIGITS: usize = 10;

/// What went wrong with a frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameError {
    /// The octet count is zero, has a leading zero, or exceeds [`MAX_SKIP`].
    BadLength,
    /// The stream ended inside an octet-counted frame.
    Truncated,
}

impl FrameError {
    /// The `reason` label of `mirage_server_malformed_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadLength => "bad_length",
            Self::Truncated => "truncated",
        }
    }
}

/// One thing the decoder found in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete message, without its octet count or trailer. Never longer than `max`.
    Frame(Bytes),
    /// A message longer than `max`, skipped. `len` is its octet count, or `None` for a
    /// newline-framed one (whose length is not known when it is given up on).
    Oversized {
        /// The octet count, if the frame had one.
        len: Option<usize>,
    },
    /// A broken frame header (or a truncated frame at the end of the stream).
    Malformed(FrameError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between frames; the buffer is empty.
    Start,
    /// The buffer holds only digits: an octet count, or the start of a newline-framed line.
    Digits,
    /// Inside a newline-framed message (buffered).
    Line,
    /// Inside an octet-counted message of this length (buffered).
    Counted(usize),
    /// Skipping this many bytes of an oversized octet-counted message.
    Skip(usize),
    /// Discarding up to the next LF or NUL (oversized line, or resynchronising after a bad
    /// header).
    Discard,
}

/// The RFC 6587 decoder of one connection. Feed it with [`Decoder::next_event`] as bytes
/// arrive and call [`Decoder::finish`] when the peer closes.
#[derive(Debug)]
pub struct Decoder {
    max: usize,
    buf: BytesMut,
    state: State,
}

impl Decoder {
    /// A decoder for messages of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            buf: BytesMut::new(),
            state: State::Start,
        }
    }

    /// Bytes currently held; never more than `max + 1`.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Consumes bytes from the front of `input` until an event is complete, and returns it.
    /// `None` once `input` is used up (whatever was incomplete is kept for the next call).
    pub fn next_event(&mut self, input: &mut &[u8]) -> Option<Event> {
        while !input.is_empty() {
            if let Some(event) = self.step(input) {
                return Some(event);
            }
        }
        None
    }

    /// The end of the stream: returns what the buffer still held, if anything. A line without
    /// its trailer is delivered (senders often close right after their last message); a
    /// partial octet-counted frame is [`FrameError::Truncated`].
    pub fn finish(&mut self) -> Option<Event> {
        let state = std::mem::replace(&mut self.state, State::Start);
        let buf = std::mem::take(&mut self.buf);
        match state {
            State::Digits | State::Line => line_frame(buf, self.max),
            State::Counted(_) => Some(Event::Malformed(FrameError::Truncated)),
            State::Start | State::Skip(_) | State::Discard => None,
        }
    }

    /// Makes progress on `input` (consuming at least one byte) and maybe completes an event.
    fn step(&mut self, input: &mut &[u8]) -> Option<Event> {
        match self.state {
            State::Start => {
                let (&b, rest) = input.split_first()?;
                *input = rest;
                match b {
                    // Empty frames: a LF or NUL after an octet-counted frame, blank lines.
                    b'\n' | b'\r' | 0 => {}
                    b'0'..=b'9' => {
                        self.buf.extend_from_slice(&[b]);
                        self.state = State::Digits;
                    }
                    _ => {
                        self.buf.extend_from_slice(&[b]);
                        self.state = State::Line;
                    }
                }
                None
            }
            State::Digits => {
                let (&b, rest) = input.split_first()?;
                match b {
                    b'0'..=b'9' if self.buf.len() <= self.max => {
                        *input = rest;
                        self.buf.extend_from_slice(&[b]);
                        None
                    }
                    b' ' => {
                        *input = rest;
                        self.header()
                    }
                    // Not an octet count: the digits start a newline-framed message, and this
                    // byte is handled as part of it.
                    _ => {
                        self.state = State::Line;
                        None
                    }
                }
            }
            State::Line => {
                let end = input.iter().position(|&c| c == b'\n' || c == 0);
                let take = end.unwrap_or(input.len());
                // `max` bytes plus one CR that may turn out to precede the LF.
                let room = (self.max + 1).saturating_sub(self.buf.len());
                if take > room {
                    self.buf.clear();
                    self.state = State::Discard;
                    return Some(Event::Oversized { len: None });
                }
                self.buf.extend_from_slice(&input[..take]);
                match end {
                    Some(end) => {
                        *input = &input[end + 1..];
                        self.state = State::Start;
                        line_frame(self.buf.split(), self.max)
                    }
                    None => {
                        *input = &[];
                        None
                    }
                }
            }
            State::Counted(len) => {
                let take = (len - self.buf.len()).min(input.len());
                self.buf.extend_from_slice(&input[..take]);
                *input = &input[take..];
                if self.buf.len() == len {
                    self.state = State::Start;
                    Some(Event::Frame(self.buf.split().freeze()))
                } else {
                    None
                }
            }
            State::Skip(remaining) => {
                let take = remaining.min(input.len());
                *input = &input[take..];
                self.state = if take == remaining {
                    State::Start
                } else {
                    State::Skip(remaining - take)
                };
                None
            }
            State::Discard => {
                match input.iter().position(|&c| c == b'\n' || c == 0) {
                    Some(end) => {
                        *input = &input[end + 1..];
                        self.state = State::Start;
                    }
                    None => *input = &[],
                }
                None
            }
        }
    }

    /// The buffer holds the digits of a `LEN SP` header: decide what follows.
    fn header(&mut self) -> Option<Event> {
        let digits = self.buf.split();
        let len = parse_len(&digits);
        match len {
            Some(len) if len <= self.max => {
                self.state = State::Counted(len);
                None
            }
            Some(len) => {
                self.state = State::Skip(len);
                Some(Event::Oversized { len: Some(len) })
            }
            None => {
                self.state = State::Discard;
                Some(Event::Malformed(FrameError::BadLength))
            }
        }
    }
}

/// An RFC 6587 octet count: 1 to [`MAX_SKIP`], no leading zero.
fn parse_len(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || digits.len() > MAX_LEN_DIGITS || digits[0] == b'0' {
        return None;
    }
    let len = digits.iter().try_fold(0usize, |n, &d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })?;
    (len <= MAX_SKIP).then_some(len)
}

/// A newline-framed message without its trailer: strips the CR of a CRLF; empty lines are no
/// frame at all.
fn line_frame(mut buf: BytesMut, max: usize) -> Option<Event> {
    while buf.last() == Some(&b'\r') {
        buf.truncate(buf.len() - 1);
    }
    if buf.len() > max {
        Some(Event::Oversized { len: None })
    } else {
        (!buf.is_empty()).then(|| Event::Frame(buf.freeze()))
    }
}

// The sender's side (octet counting) lives in `syslog-wire`, shared with mirage-agent.
pub use syslog_wire::frame_octet_counted;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MAX: usize = 480;

    /// Every event from feeding `chunks` one after another, then `finish`.
    fn decode_chunks(max: usize, chunks: &[&[u8]]) -> Vec<Event> {
        let mut d = Decoder::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            let mut input = *chunk;
            while let Some(e) = d.next_event(&mut input) {
                out.push(e);
            }
            assert!(input.is_empty());
            assert!(d.buffered() <= max + 1);
        }
        out.extend(d.finish());
        out
    }

    fn decode(input: &[u8]) -> Vec<Event> {
        decode_chunks(MAX, &[input])
    }

    fn frame(s: &str) -> Event {
        Event::Frame(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn octet_counting() {
        assert_eq!(
            decode(b"5 hello11 hello world"),
            [frame("hello"), frame("hello world")]
        );
        // The count covers any byte, trailers included.
        assert_eq!(decode(b"6 a\nb\0c\r"), [frame("a\nb\0c\r")]);
    }

    #[test]
    fn newline_framing_with_lf_crlf_and_nul() {
        assert_eq!(
            decode(b"<13>one\n<13>two\r\n<13>three\0<13>four\n"),
            [
                frame("<13>one"),
                frame("<13>two"),
                frame("<13>three"),
                frame("<13>four")
            ]
        );
    }

    #[test]
    fn blank_lines_are_no_frames() {
        assert_eq!(decode(b"\n\r\n\0\n<13>x\n\n"), [frame("<13>x")]);
    }

    #[test]
    fn framings_mix_in_one_stream() {
        assert_eq!(
            decode(b"3 abc<1>line\n2 de\n12 trailing lf\n<2>last"),
            [
                frame("abc"),
                frame("<1>line"),
                frame("de"),
                frame("trailing lf\n"),
                frame("<2>last")
            ]
        );
    }

    #[test]
    fn digits_without_a_space_start_a_line() {
        assert_eq!(
            decode(b"2026-11-28 x\n123\n45"),
            [frame("2026-11-28 x"), frame("123"), frame("45")]
        );
    }

    #[test]
    fn split_at_every_byte_boundary() {
        let stream: &[u8] =
            b"5 hello<13>a line\r\n11 hello world<14>nul\x0099999999999 bad\n0 x\n5 ok\n\n\n";
        let whole = decode(stream);
        assert_eq!(
            whole,
            [
                frame("hello"),
                frame("<13>a line"),
                frame("hello world"),
                frame("<14>nul"),
                Event::Malformed(FrameError::BadLength),
                Event::Malformed(FrameError::BadLength),
                frame("ok\n\n\n"),
            ]
        );
        for i in 0..=stream.len() {
            for j in i..=stream.len() {
                let got = decode_chunks(MAX, &[&stream[..i], &stream[i..j], &stream[j..]]);
                assert_eq!(got, whole, "split at {i}, {j}");
            }
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(decode_chunks(MAX, &bytes), whole);
    }

    #[test]
    fn oversized_octet_counted_is_skipped_exactly() {
        let big = "x".repeat(MAX + 1);
        let stream = format!("{} {big}3 abc", big.len());
        assert_eq!(
            decode(stream.as_bytes()),
            [Event::Oversized { len: Some(MAX + 1) }, frame("abc")]
        );
        // Exactly `max` is fine.
        let ok = "y".repeat(MAX);
        let stream = format!("{MAX} {ok}");
        assert_eq!(decode(stream.as_bytes()), [frame(&ok)]);
        // Skipping buffers nothing.
        let mut d = Decoder::new(MAX);
        let header = format!("{} ", 1 << 20);
        let mut input = header.as_bytes();
        assert_eq!(
            d.next_event(&mut input),
            Some(Event::Oversized { len: Some(1 << 20) })
        );
        let chunk = vec![b'z'; 4096];
        for _ in 0..(1 << 20) / 4096 {
            let mut input = &chunk[..];
            assert_eq!(d.next_event(&mut input), None);
            assert_eq!(d.buffered(), 0);
        }
        let mut input: &[u8] = b"2 ok";
        assert_eq!(d.next_event(&mut input), Some(frame("ok")));
    }

    #[test]
    fn oversized_line_is_discarded_to_its_end() {
        let big = "<13>".to_owned() + &"x".repeat(MAX);
        let stream = format!("{big}\n<13>next\n");
        assert_eq!(
            decode(stream.as_bytes()),
            [Event::Oversized { len: None }, frame("<13>next")]
        );
        // `max` bytes and a CRLF fit.
        let fits = "z".repeat(MAX);
        assert_eq!(decode(format!("{fits}\r\n").as_bytes()), [frame(&fits)]);
        // `max + 1` bytes and a LF do not, whether they arrive together or apart.
        let over = "z".repeat(MAX + 1);
        assert_eq!(
            decode(format!("{over}\nok\n").as_bytes()),
            [Event::Oversized { len: None }, frame("ok")]
        );
        assert_eq!(
            decode_chunks(MAX, &[over.as_bytes(), b"\nok\n"]),
            [Event::Oversized { len: None }, frame("ok")]
        );
        // `max` bytes and a CR that is not followed by LF do not.
        assert_eq!(
            decode(format!("{fits}\rw\nok\n").as_bytes()),
            [Event::Oversized { len: None }, frame("ok")]
        );
    }

    #[test]
    fn bad_lengths_resynchronise_at_the_next_newline() {
        for bad in ["0 ", "05 ", "99999999999 ", "1073741825 "] {
            let stream = format!("{bad}garbage here\n<13>after\n");
            assert_eq!(
                decode(stream.as_bytes()),
                [Event::Malformed(FrameError::BadLength), frame("<13>after")],
                "{bad:?}"
            );
        }
        // The largest skippable count is an oversized frame, not a malformed one.
        assert_eq!(
            decode(format!("{MAX_SKIP} ").as_bytes()),
            [Event::Oversized {
                len: Some(MAX_SKIP)
            }]
        );
    }

    #[test]
    fn truncated_counted_frame_at_end_of_stream() {
        assert_eq!(
            decode(b"10 short"),
            [Event::Malformed(FrameError::Truncated)]
        );
    }

    #[test]
    fn encodes_octet_counted() {
        assert_eq!(frame_octet_counted("héllo"), b"6 h\xc3\xa9llo");
    }

    proptest! {
        #[test]
        fn arbitrary_chunks_never_panic_and_stay_bounded(
            max in 1usize..64,
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..96), 0..24),
        ) {
            let mut d = Decoder::new(max);
            for chunk in &chunks {
                let mut input = &chunk[..];
                while let Some(e) = d.next_event(&mut input) {
                    if let Event::Frame(f) = e {
                        prop_assert!(!f.is_empty() && f.len() <= max);
                    }
                    prop_assert!(d.buffered() <= max + 1);
                }
                prop_assert!(input.is_empty());
                prop_assert!(d.buffered() <= max + 1);
            }
            if let Some(Event::Frame(f)) = d.finish() {
                prop_assert!(f.len() <= max);
            }
        }

        #[test]
        fn digit_heavy_streams_stay_bounded(
            chunks in proptest::collection::vec("[0-9 \n\r\0a<]{0,40}", 0..24),
        ) {
            let mut d = Decoder::new(16);
            for chunk in &chunks {
                let mut input = chunk.as_bytes();
                while let Some(e) = d.next_event(&mut input) {
                    if let Event::Frame(f) = e {
                        prop_assert!(f.len() <= 16);
                    }
                }
                prop_assert!(d.buffered() <= 17);
            }
        }

        #[test]
        fn octet_counted_messages_survive_any_split(
            msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..200), 0..12),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut stream = Vec::new();
            for m in &msgs {
                stream.extend_from_slice(m.len().to_string().as_bytes());
                stream.push(b' ');
                stream.extend_from_slice(m);
            }
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            points.push(0);
            points.push(stream.len());
            points.sort_unstable();
            let chunks: Vec<&[u8]> = points.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
            let got = decode_chunks(256, &chunks);
            let want: Vec<Event> = msgs.iter().map(|m| Event::Frame(Bytes::copy_from_slice(m))).collect();
            prop_assert_eq!(got, want);
        }
    }
}
