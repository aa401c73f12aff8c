//! The queue against a `VecDeque` model: random sequences of appends, peeks, acks (of positions
//! from earlier peeks, stale ones included) and reopenings, with small segments so that records
//! cross many segment boundaries and segments come and go.

#![allow(
    clippy::unwrap_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::collections::VecDeque;

use proptest::prelude::*;
use spool::{FRAME_LEN, Position, Spool, SpoolError, SpoolOptions};

const MAX_BYTES: u64 = 300;

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<Vec<u8>>),
    Peek {
        records: usize,
        bytes: usize,
    },
    /// Ack the position of this record (modulo their number) of the last peek.
    Ack(usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let record = proptest::collection::vec(any::<u8>(), 0..40);
    prop_oneof![
        4 => proptest::collection::vec(record, 0..4).prop_map(Op::Append),
        3 => (0usize..6, 0usize..100).prop_map(|(records, bytes)| Op::Peek { records, bytes }),
        3 => (0usize..8).prop_map(Op::Ack),
        1 => Just(Op::Reopen),
    ]
}

fn options() -> SpoolOptions {
    SpoolOptions {
        max_bytes: MAX_BYTES,
        segment_bytes: 64,
        sync: false,
    }
}

fn size(records: &VecDeque<Vec<u8>>) -> u64 {
    records.iter().map(|r| FRAME_LEN + r.len() as u64).sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn behaves_like_a_deque(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Some(Spool::open(dir.path(), options()).unwrap());
        let mut model: VecDeque<Vec<u8>> = VecDeque::new();
        // Absolute number of the model's front record.
        let mut consumed = 0u64;
        // The last peek: each record's position and absolute number.
        let mut peeked: Vec<(Position, u64)> = Vec::new();
        for op in ops {
            let q = spool.as_mut().unwrap();
            match op {
                Op::Append(batch) => {
                    let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                    let needed: u64 = batch.iter().map(|r| FRAME_LEN + r.len() as u64).sum();
                    let result = q.append_batch(&refs);
                    if size(&model) + needed > MAX_BYTES {
                        prop_assert!(matches!(result, Err(SpoolError::Full { .. })), "{result:?}");
                    } else {
                        prop_assert!(result.is_ok(), "{result:?}");
                        model.extend(batch);
                    }
                }
                Op::Peek { records, bytes } => {
                    let got = q.peek(records, bytes).unwrap();
                    let mut want = Vec::new();
                    let mut total = 0;
                    for r in model.iter().take(records) {
                        if !want.is_empty() && total + r.len() > bytes {
                            break;
                        }
                        total += r.len();
                        want.push(r.clone());
                    }
                    let payloads: Vec<Vec<u8>> = got.iter().map(|(_, p)| p.clone()).collect();
                    prop_assert_eq!(payloads, want);
                    // Positions ascend.
                    prop_assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
                    peeked = got
                        .iter()
                        .zip(consumed..)
                        .map(|((pos, _), n)| (*pos, n))
                        .collect();
                }
                Op::Ack(k) => {
                    if peeked.is_empty() {
                        continue;
                    }
                    let (pos, n) = peeked[k % peeked.len()];
                    q.ack(pos).unwrap();
                    while consumed <= n {
                        model.pop_front();
                        consumed += 1;
                    }
                }
                Op::Reopen => {
                    drop(spool.take());
                    spool = Some(Spool::open(dir.path(), options()).unwrap());
                }
            }
            let q = spool.as_ref().unwrap();
            let stats = q.stats();
            prop_assert_eq!(stats.records, model.len() as u64);
            prop_assert_eq!(stats.bytes, size(&model));
            let on_disk = std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "seg"))
                .count();
            prop_assert_eq!(on_disk, stats.segments);
        }
        // Everything left comes out, in order, after one last reopening.
        drop(spool.take());
        let q = Spool::open(dir.path(), options()).unwrap();
        let rest: Vec<Vec<u8>> = q.peek(usize::MAX, usize::MAX).unwrap().into_iter().map(|(_, p)| p).collect();
        prop_assert_eq!(rest, Vec::from(model));
    }
}
