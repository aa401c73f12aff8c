//! mirage-server: recognises attacks in the service logs that agents and syslog relays send.
//!
//! It sits between the protected hosts' daemons (sshd, vsftpd, rsyncd, MariaDB, Redis, MongoDB,
//! web servers) and the manager: log lines go in, per-source verdicts come out. This first slice
//! is the detection core and its offline replay, `mirage-server scan FILE...`: declarative rule
//! packs (`rules`), strict address parsing (`addr`), timestamp recognition (`timestamp`) and
//! per-source sliding windows (`scan`). The network listeners, TLS, manager reporting and shared
//! PostgreSQL state of issue 5 build on `RuleSet::evaluate`, which is pure and sync.

pub mod addr;
pub mod config;
pub mod daemon;
pub mod detect;
pub mod record;
pub mod report;
pub mod rules;
pub mod scan;
pub mod syslog;
pub mod timestamp;
pub mod verdict;

pub use rules::{RuleError, RuleSet};
pub use scan::{Flagged, LineMatch, Scanner, Stats};
