//! Horizontal scale: two detectors sharing one PostgreSQL reach the verdicts one detector
//! reaches. The whole corpus is split line by line across two servers (each sees about half of
//! every attack, below most thresholds) against a real PostgreSQL (the manager's embedded test
//! cluster), and compared with one server on its own database and with the in-memory backend.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use common::{
    agent_records,
    ground_truth::{CASES, LEGIT},
};
use manager::test_util::TestDb;
use server::{
    RuleSet,
    detect::{Detector, MemoryState, NeverFlag, State, pg::PgState},
    record::LogRecord,
    verdict::Verdict,
};

/// Arrival time for lines without a timestamp: an hour after the corpus was captured.
const NOW: i64 = 1_795_831_200 + 3600;
const BATCH: usize = 25;

fn detector(state: State) -> Detector {
    Detector::new(
        Arc::new(RuleSet::builtin().unwrap()),
        state,
        NeverFlag::default(),
    )
    .unwrap()
}

async fn pg(db: &TestDb) -> State {
    State::Postgres(PgState::connect(&db.url).await.unwrap())
}

/// Every corpus line, service by service, in file order.
fn all_records() -> Vec<LogRecord> {
    CASES
        .iter()
        .flat_map(|(service, files, _)| agent_records(service, files))
        .collect()
}

/// Feeds `records` to the detectors, chunk `i` (of `BATCH` lines) to detector `i % n`.
/// `concurrent`: every detector processes its chunk of a round at the same time (arrival order
/// across servers is then arbitrary); otherwise strictly one after the other.
async fn run(
    detectors: &mut [Detector],
    records: Vec<LogRecord>,
    concurrent: bool,
) -> Vec<Verdict> {
    let n = detectors.len();
    let chunks: Vec<Vec<LogRecord>> = records.chunks(BATCH).map(<[_]>::to_vec).collect();
    let mut out = Vec::new();
    for round in chunks.chunks(n) {
        if concurrent {
            let futs = detectors
                .iter_mut()
                .zip(round.iter().cloned())
                .map(|(d, chunk)| d.process(chunk, NOW));
            for v in futures_util::future::join_all(futs).await {
                out.extend(v.unwrap());
            }
        } else {
            for (d, chunk) in detectors.iter_mut().zip(round.iter().cloned()) {
                out.extend(d.process(chunk, NOW).await.unwrap());
            }
        }
    }
    // Lines whose session binding went to the other server resolve on the next calls.
    for _ in 0..50 {
        for d in detectors.iter_mut() {
            out.extend(d.process(Vec::new(), NOW).await.unwrap());
        }
        if detectors.iter().all(|d| d.pending() == 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for d in detectors.iter() {
        assert_eq!(d.pending(), 0);
        assert_eq!(d.stats().unresolved, 0, "{:?}", d.stats());
    }
    out
}

type Exact = BTreeMap<(String, String, String), (u64, usize)>;

/// (rule, addr, at) → (count, evidence lines), asserting no verdict is reported twice.
fn exact(verdicts: &[Verdict]) -> Exact {
    let mut m = Exact::new();
    for v in verdicts {
        let prev = m.insert(
            (v.rule.clone(), v.addr.clone(), v.at.clone()),
            (v.count, v.evidence.len()),
        );
        assert!(prev.is_none(), "reported twice: {v:?}");
    }
    m
}

fn pairs(verdicts: &[Verdict]) -> BTreeMap<(String, String), usize> {
    let mut m = BTreeMap::new();
    for v in verdicts {
        *m.entry((v.rule.clone(), v.addr.clone())).or_default() += 1;
    }
    m
}

fn check_ground_truth(verdicts: &[Verdict]) {
    let rules = RuleSet::builtin().unwrap();
    for (service, _, attackers) in CASES {
        let flagged: BTreeSet<&str> = verdicts
            .iter()
            .filter(|v| {
                rules
                    .rules()
                    .iter()
                    .any(|r| r.config.id == v.rule && r.config.service == *service)
            })
            .map(|v| v.addr.as_str())
            .collect();
        for a in *attackers {
            assert!(
                flagged.contains(a),
                "{service}: {a} not flagged: {flagged:?}"
            );
        }
        for l in LEGIT {
            assert!(!flagged.contains(l), "{service}: legitimate {l} flagged");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attack_split_across_two_servers_is_detected_as_by_one() {
    let records = all_records();

    let mut memory = [detector(State::Memory(MemoryState::new(1_000_000)))];
    let by_memory = run(&mut memory, records.clone(), false).await;
    check_ground_truth(&by_memory);

    let one_db = TestDb::unmigrated().await;
    let mut one = [detector(pg(&one_db).await)];
    let by_one = run(&mut one, records.clone(), false).await;
    check_ground_truth(&by_one);
    assert_eq!(exact(&by_one), exact(&by_memory), "PostgreSQL vs memory");

    // Two servers, one database, chunks alternating: each sees half of every attack.
    let two_db = TestDb::unmigrated().await;
    let mut two = [detector(pg(&two_db).await), detector(pg(&two_db).await)];
    let by_two = run(&mut two, records.clone(), false).await;
    assert!(
        two.iter().all(|d| d.stats().verdicts > 0),
        "both servers report"
    );
    assert_eq!(exact(&by_two), exact(&by_one), "two servers vs one");
    // Ids are a function of the verdict, so the manager de-duplicates across servers too.
    let ids = |v: &[Verdict]| v.iter().map(|v| v.id.clone()).collect::<BTreeSet<_>>();
    assert_eq!(ids(&by_two), ids(&by_one));

    // Concurrently, arrival order across the servers is arbitrary: the same sources are
    // flagged by the same rules, each exactly as often.
    let conc_db = TestDb::unmigrated().await;
    let mut conc = [detector(pg(&conc_db).await), detector(pg(&conc_db).await)];
    let by_conc = run(&mut conc, records, true).await;
    exact(&by_conc);
    assert_eq!(
        pairs(&by_conc),
        pairs(&by_one),
        "concurrent two servers vs one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threshold_reached_only_by_the_sum_of_two_servers() {
    // sshd-failed-password: 5 in 600 s. Server A sees 3 failures, server B 2: only together
    // do they cross, and exactly one of them reports it.
    let db = TestDb::unmigrated().await;
    let mut a = detector(pg(&db).await);
    let mut b = detector(pg(&db).await);
    let line = |i: i64| {
        let rec = &agent_records("sshd", &[])[..];
        assert!(rec.is_empty());
        LogRecord {
            origin: server::record::Origin::Agent { name: "h".into() },
            peer: "127.0.0.1:1".parse().unwrap(),
            host: "h".into(),
            service: Some("sshd".into()),
            line: format!(
                "2026-11-28T02:00:{i:02}+00:00 h sshd[9]: Failed password for root from 203.0.113.50 port {} ssh2",
                40000 + i
            ),
            timestamp: None,
            seq: None,
        }
    };
    let va = a.process((0..3).map(line).collect(), NOW).await.unwrap();
    assert!(va.is_empty());
    let mut memory_alone = detector(State::Memory(MemoryState::new(100)));
    assert!(
        memory_alone
            .process((3..5).map(line).collect(), NOW)
            .await
            .unwrap()
            .is_empty(),
        "B's share alone does not cross"
    );
    let vb = b.process((3..5).map(line).collect(), NOW).await.unwrap();
    assert_eq!(vb.len(), 1, "{vb:?}");
    assert_eq!(vb[0].addr, "203.0.113.50");
    assert_eq!(vb[0].count, 5);
    assert_eq!(vb[0].evidence.len(), 5, "evidence from both servers");
    // More failures in the same window, on either server: no second verdict.
    assert!(
        a.process((5..9).map(line).collect(), NOW)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        b.process((9..12).map(line).collect(), NOW)
            .await
            .unwrap()
            .is_empty()
    );
}
