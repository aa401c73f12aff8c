//! The syslog listeners: how log lines reach detection.
//!
//! Three transports feed one channel of [`LogRecord`](crate::record::LogRecord)s:
//!
//! * UDP (RFC 5426), one message per datagram;
//! * TCP (RFC 6587), octet-counted or newline-framed, decided per frame ([`framing`]);
//! * TLS (RFC 5425), the same framing inside TLS; a peer whose client certificate chains to
//!   `tls.client_ca` is an authenticated agent.
//!
//! Each message is parsed ([`parse`]) and tagged with the trust of where it came from
//! ([`Origin`](crate::record::Origin)): agents by certificate, relays by address
//! (`trust.relay_networks`), everyone else untrusted. Untrusted lines are still delivered, so
//! they can be logged and counted; detection never turns them into verdicts. Limits (message
//! size, connections, messages per second, idle and handshake timeouts) are applied here, in
//! [`listen`], and everything dropped is counted.
//!
//! Framing and parsing are pure. The agent's side of the wire, [`format_rfc5424`] messages
//! framed by [`frame_octet_counted`], is the `syslog-wire` crate, shared with mirage-agent and
//! re-exported here.

pub mod framing;
pub mod listen;
pub mod parse;

pub use framing::{Decoder, Event, FrameError, frame_octet_counted};
pub use listen::{ListenError, Listeners, Transport, spawn};
pub use parse::{
    MIRAGE_SD_ID, Malformed, SEQ_PARAM, format_rfc5424, format_rfc5424_with, parse_message,
    service_for_app,
};
