//! The corpus ground truth and record builders shared by the corpus, shared-state and listener
//! tests.
#![allow(dead_code, reason = "each test binary uses part of the module")]
#![allow(clippy::unwrap_used, reason = "test code")]

use std::{net::SocketAddr, path::PathBuf};

use server::record::{LogRecord, Origin};

/// The corpus directory (a copy of `../shared/corpus`, ground truth in its `MANIFEST.md`).
pub fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// (service, files, attackers that must be flagged). From MANIFEST.md "Ground truth per service".
pub const CASES: &[(&str, &[&str], &[&str])] = &[
    (
        "sshd",
        &[
            "sshd/auth.log",
            "sshd/sshd-E-info.log",
            "sshd/sshd-E-verbose.log",
        ],
        &["fd77::66", "10.77.0.67"],
    ),
    (
        "vsftpd",
        &[
            "vsftpd/vsftpd.log",
            "vsftpd/xferlog",
            "vsftpd/syslog-vsftpd.log",
        ],
        &["fd77::66", "10.77.0.67"],
    ),
    ("rsync", &["rsync/rsyncd.log"], &["10.77.0.66"]),
    (
        "mysql",
        &["mysql/general.log", "mysql/error.log"],
        &["10.77.0.67"],
    ),
    (
        "redis",
        &["redis/redis.log", "redis/monitor.log", "redis/acl-log.txt"],
        &["10.77.0.66", "10.77.0.67"],
    ),
    (
        "web",
        &["nginx/access.log", "nginx/error.log"],
        &["10.77.0.66", "10.77.0.67"],
    ),
];

/// Legitimate client addresses in every form the daemons print them.
pub const LEGIT: &[&str] = &["10.77.0.20", "fd77::20", "::ffff:10.77.0.20"];

/// The lines of one corpus file (CR before LF dropped, as an agent's reader does).
pub fn lines(file: &str) -> Vec<String> {
    let bytes = std::fs::read(corpus().join(file)).unwrap();
    String::from_utf8_lossy(&bytes)
        .lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_owned())
        .collect()
}

/// Every line of a service's files as an agent would ship them: the file line verbatim, the
/// service named, from an authenticated agent.
pub fn agent_records(service: &str, files: &[&str]) -> Vec<LogRecord> {
    files
        .iter()
        .flat_map(|f| lines(f))
        .map(|line| LogRecord {
            origin: Origin::Agent {
                name: "corpus-host".into(),
            },
            peer: SocketAddr::from(([127, 0, 0, 1], 6514)),
            host: "corpus-host".into(),
            service: Some(service.to_owned()),
            line,
            timestamp: None,
        })
        .collect()
}
pub mod pki;
