//! Verdicts as `POST /api/v1/verdicts` on the manager takes them (see
//! `manager/src/evidence/verdicts.rs`, `VerdictInput`).

use serde::{Deserialize, Serialize};

/// One verdict. `id` is the idempotency key: a retried batch is stored once by the manager.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verdict {
    /// Idempotency key (1 to 128 characters): the same detection always gets the same id.
    pub id: String,
    /// The attacker's address, or for rules aggregating IPv6 by prefix the prefix in CIDR
    /// notation (`2001:db8:1:2::/64`; the manager accepts /48 to /128).
    pub addr: String,
    /// The rule id.
    pub rule: String,
    /// The rule's service.
    pub service: String,
    /// `info`, `low`, `medium`, `high` or `critical`.
    pub severity: String,
    /// `default`, `drop`, `redirect` or `reflect`.
    pub action: String,
    /// Matches counted when the source was flagged.
    pub count: u64,
    /// The matching lines (at most 20, each at most 4096 bytes).
    pub evidence: Vec<String>,
    /// When the threshold was reached (RFC 3339 UTC).
    pub at: String,
}
