use std::net::SocketAddr;

use super::*;
use crate::record::Origin;

fn detector() -> Detector {
    let rules = Arc::new(RuleSet::builtin().unwrap());
    Detector::new(
        rules,
        State::Memory(MemoryState::new(10_000)),
        NeverFlag::new(vec!["192.0.2.0/24".parse().unwrap()]),
    )
    .unwrap()
}

fn record(origin: Origin, service: Option<&str>, line: &str) -> LogRecord {
    LogRecord {
        origin,
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
        host: "web-1".into(),
        service: service.map(str::to_owned),
        line: line.to_owned(),
        timestamp: None,
        seq: None,
    }
}

fn agent() -> Origin {
    Origin::Agent {
        name: "web-1".into(),
    }
}

fn failed(addr: &str, i: u32) -> String {
    format!(
        "2026-11-28T01:59:{i:02}.000000+00:00 web-1 sshd[100{i}]: Failed password for root from {addr} port 4{i:04} ssh2"
    )
}

const NOW: i64 = 1_795_831_200; // 2026-11-28T02:00:00Z

#[tokio::test]
async fn untrusted_lines_never_produce_verdicts() {
    let mut d = detector();
    let forged: Vec<_> = (0..10)
        .map(|i| record(Origin::Untrusted, Some("sshd"), &failed("203.0.113.9", i)))
        .collect();
    assert!(d.process(forged, NOW).await.unwrap().is_empty());
    assert_eq!(d.stats().untrusted, 10);
    assert_eq!(d.stats().hits, 0);

    let real: Vec<_> = (0..10)
        .map(|i| record(agent(), Some("sshd"), &failed("203.0.113.9", i)))
        .collect();
    let v = d.process(real, NOW).await.unwrap();
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].addr, "203.0.113.9");
    assert_eq!(v[0].rule, "sshd-failed-password");
    assert_eq!(v[0].severity, "high");
    assert_eq!(v[0].action, "redirect");
    assert_eq!(v[0].count, 5);
    assert_eq!(v[0].evidence.len(), 5);
    assert_eq!(v[0].at, "2026-11-28T01:59:04Z");
    assert!(v[0].id.starts_with("ms-") && v[0].id.len() == 35);
    // Relayed lines count too.
    let relayed: Vec<_> = (0..5)
        .map(|i| record(Origin::Relay, None, &failed("198.51.100.7", i)))
        .collect();
    assert_eq!(d.process(relayed, NOW).await.unwrap().len(), 1);
}

#[tokio::test]
async fn never_flag_and_special_addresses_are_skipped() {
    let mut d = detector();
    let mut batch = Vec::new();
    for addr in [
        "192.0.2.10",
        "127.0.0.1",
        "::1",
        "0.0.0.0",
        "::ffff:192.0.2.11",
    ] {
        batch.extend((0..6).map(|i| record(agent(), Some("sshd"), &failed(addr, i))));
    }
    assert!(d.process(batch, NOW).await.unwrap().is_empty());
    assert_eq!(d.stats().never_flag, 30);
    // The manager's allowlist joins at run time.
    d.never_flag
        .set_manager(vec!["198.51.100.0/24".parse().unwrap()]);
    let batch = (0..6)
        .map(|i| record(agent(), Some("sshd"), &failed("198.51.100.1", i)))
        .collect();
    assert!(d.process(batch, NOW).await.unwrap().is_empty());
}

#[tokio::test]
async fn one_verdict_per_window_with_a_stable_id() {
    let mut d = detector();
    let batch: Vec<_> = (0..30)
        .map(|i| record(agent(), Some("sshd"), &failed("203.0.113.5", i)))
        .collect();
    let v = d.process(batch.clone(), NOW).await.unwrap();
    assert_eq!(v.len(), 1);
    let mut again = detector();
    let w = again.process(batch, NOW).await.unwrap();
    assert_eq!(v[0].id, w[0].id, "ids depend only on rule, source and time");
}

#[tokio::test]
async fn service_selects_rules_and_unknown_service_matches_nothing() {
    let mut d = detector();
    let batch: Vec<_> = (0..6)
        .map(|i| record(agent(), Some("vsftpd"), &failed("203.0.113.6", i)))
        .collect();
    assert!(d.process(batch, NOW).await.unwrap().is_empty());
    let batch: Vec<_> = (0..6)
        .map(|i| record(agent(), Some("no-such"), &failed("203.0.113.6", i)))
        .collect();
    assert!(d.process(batch, NOW).await.unwrap().is_empty());
    assert_eq!(d.stats().hits, 0);
}

#[tokio::test]
async fn future_timestamps_are_taken_as_arrival() {
    let mut d = detector();
    let line = "2030-01-01T00:00:00+00:00 web-1 sshd[1]: Failed password for root from 203.0.113.7 port 1 ssh2";
    let batch = vec![record(agent(), Some("sshd"), line); 5];
    let v = d.process(batch, NOW).await.unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].at, format_rfc3339(NOW));
}

#[tokio::test]
async fn session_lines_wait_for_their_binding() {
    let mut d = detector();
    // rsyncd: the pid line naming the module write comes before the connect line binding the
    // pid (as when the two arrive through different servers), then the binding arrives.
    let denied = "2026/11/28 01:59:24 [4242] ERROR: module is read only";
    let connect = "2026/11/28 01:59:23 [4242] connect from UNKNOWN (10.77.0.66)";
    let v = d
        .process(vec![record(agent(), Some("rsync"), denied)], NOW)
        .await
        .unwrap();
    assert!(v.is_empty());
    assert_eq!(d.pending(), 1);
    d.process(vec![record(agent(), Some("rsync"), connect)], NOW)
        .await
        .unwrap();
    assert_eq!(d.pending(), 0);
    assert!(d.stats().hits >= 1, "{:?}", d.stats());
    assert_eq!(d.stats().unresolved, 0);
}
