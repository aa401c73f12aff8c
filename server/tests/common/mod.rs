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
            seq: None,
        })
        .collect()
}
pub mod ground_truth;
pub mod pki;
