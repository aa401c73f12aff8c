//! The queue's behaviour through its public API, with the damage a crash or a bad disk leaves
//! made by hand in the files.

#![allow(
    clippy::unwrap_used,
    reason = "tests panic on failure; helpers here are test code"
)]

use std::{
    fs::{self, OpenOptions},
    path::{Path, PathBuf},
};

use spool::{FRAME_LEN, Spool, SpoolError, SpoolOptions};

fn options() -> SpoolOptions {
    SpoolOptions {
        sync: false,
        ..SpoolOptions::default()
    }
}

fn small_segments() -> SpoolOptions {
    SpoolOptions {
        segment_bytes: 64,
        ..options()
    }
}

/// The segment files, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    out.sort();
    out
}

fn payloads(spool: &Spool) -> Vec<Vec<u8>> {
    spool
        .peek(usize::MAX, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

fn strings(spool: &Spool) -> Vec<String> {
    payloads(spool)
        .into_iter()
        .map(|p| String::from_utf8(p).unwrap())
        .collect()
}

fn cut(path: &Path, by: u64) {
    let file = OpenOptions::new().write(true).open(path).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len - by).unwrap();
}

fn flip(path: &Path, at: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[usize::try_from(at).unwrap()] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

#[test]
fn records_and_the_consumer_position_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = Spool::open(dir.path(), options()).unwrap();
    assert!(q.is_empty());
    q.append_batch(&[b"one", b"two", b"three"]).unwrap();
    q.append(b"").unwrap();
    let peeked = q.peek(2, usize::MAX).unwrap();
    assert_eq!(peeked.len(), 2);
    assert_eq!(peeked[0].1, b"one");
    // Peeking does not consume.
    assert_eq!(q.peek(1, usize::MAX).unwrap()[0].1, b"one");
    q.ack(peeked[1].0).unwrap();
    assert_eq!(q.stats().records, 2);
    assert_eq!(q.stats().bytes, 2 * FRAME_LEN + 5);
    drop(q);

    let mut q = Spool::open(dir.path(), options()).unwrap();
    assert_eq!(strings(&q), ["three", ""]);
    assert_eq!(q.stats().records, 2);
    // A repeated (stale) ack changes nothing.
    q.ack(peeked[0].0).unwrap();
    assert_eq!(q.stats().records, 2);
    let all = q.peek(10, usize::MAX).unwrap();
    q.ack(all[1].0).unwrap();
    assert!(q.is_empty());
    assert_eq!(q.stats().bytes, 0);
    drop(q);
    let q = Spool::open(dir.path(), options()).unwrap();
    assert!(q.is_empty());
    assert!(payloads(&q).is_empty());
}

#[test]
fn unacked_records_are_delivered_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    q.append_batch(&[b"a", b"b"]).unwrap();
    let first = q.peek(1, usize::MAX).unwrap();
    assert_eq!(first[0].1, b"a");
    drop(q);
    // Synced options: the same on reopening.
    let q = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    assert_eq!(strings(&q), ["a", "b"]);
}

#[test]
fn a_second_open_of_the_same_directory_fails() {
    let dir = tempfile::tempdir().unwrap();
    let q = Spool::open(dir.path(), options()).unwrap();
    match Spool::open(dir.path(), options()) {
        Err(err @ SpoolError::Locked { .. }) => {
            let msg = err.to_string();
            assert!(
                msg.contains("lock") && msg.contains("another process"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
    drop(q);
    Spool::open(dir.path(), options()).unwrap();
}

#[test]
fn a_torn_tail_is_cut_at_the_last_whole_record() {
    for by in [1, 3, 6, 9] {
        let dir = tempfile::tempdir().unwrap();
        let mut q = Spool::open(dir.path(), options()).unwrap();
        q.append_batch(&[b"first", b"second"]).unwrap();
        q.append(b"torn").unwrap();
        drop(q);
        // 1 and 3 cut the payload, 6 the CRC, 9 the length of the last record.
        cut(&segments(dir.path())[0], by);
        let mut q = Spool::open(dir.path(), options()).unwrap();
        assert_eq!(strings(&q), ["first", "second"], "cut by {by}");
        assert_eq!(q.stats().records, 2);
        // Appending goes on after the whole records.
        q.append(b"after").unwrap();
        drop(q);
        let q = Spool::open(dir.path(), options()).unwrap();
        assert_eq!(strings(&q), ["first", "second", "after"]);
    }
}

#[test]
fn a_flipped_byte_cuts_the_segment_at_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = Spool::open(dir.path(), options()).unwrap();
    q.append_batch(&[b"aaaa", b"bbbb", b"cccc"]).unwrap();
    drop(q);
    let seg = &segments(dir.path())[0];
    // Header 8, then frames of 8 + 4 bytes: a byte of the third payload.
    flip(seg, 8 + 12 + 12 + 8 + 2);
    let q = Spool::open(dir.path(), options()).unwrap();
    assert_eq!(strings(&q), ["aaaa", "bbbb"]);
    drop(q);
    // A byte of the first record's length: everything from it goes.
    flip(seg, 8);
    let q = Spool::open(dir.path(), options()).unwrap();
    assert!(q.is_empty());
    assert_eq!(fs::metadata(seg).unwrap().len(), 8);
}

#[test]
fn a_segment_without_its_header_is_rewritten_and_a_foreign_file_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = Spool::open(dir.path(), small_segments()).unwrap();
    q.append(&[7u8; 60]).unwrap();
    q.append(b"next").unwrap();
    drop(q);
    let segs = segments(dir.path());
    assert_eq!(segs.len(), 2);
    // The newest was created but its header never reached the disk.
    fs::write(&segs[1], b"").unwrap();
    let mut q = Spool::open(dir.path(), small_segments()).unwrap();
    assert_eq!(payloads(&q), [vec![7u8; 60]]);
    q.append(b"again").unwrap();
    drop(q);
    fs::write(&segs[1], b"not a segment at all").unwrap();
    match Spool::open(dir.path(), small_segments()) {
        Err(SpoolError::Corrupt {
            path, offset: 0, ..
        }) => assert_eq!(path, segs[1]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_position_past_the_end_is_clamped() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = Spool::open(dir.path(), options()).unwrap();
    q.append_batch(&[b"one", b"two", b"three"]).unwrap();
    let all = q.peek(3, usize::MAX).unwrap();
    q.ack(all[2].0).unwrap();
    drop(q);
    // Without sync, the acked tail was lost but the position file was not.
    cut(&segments(dir.path())[0], 2);
    let mut q = Spool::open(dir.path(), options()).unwrap();
    assert!(q.is_empty());
    q.append(b"four").unwrap();
    assert_eq!(strings(&q), ["four"]);
}

#[test]
fn a_damaged_position_file_delivers_from_the_oldest_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = Spool::open(dir.path(), options()).unwrap();
    q.append_batch(&[b"one", b"two"]).unwrap();
    let all = q.peek(1, usize::MAX).unwrap();
    q.ack(all[0].0).unwrap();
    drop(q);
    flip(&dir.path().join("position"), 10);
    let q = Spool::open(dir.path(), options()).unwrap();
    assert_eq!(strings(&q), ["one", "two"]);
}

#[test]
fn a_full_queue_refuses_appends_and_keeps_what_it_has() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        max_bytes: 100,
        ..options()
    };
    let mut q = Spool::open(dir.path(), opts.clone()).unwrap();
    // 8 + 40 = 48 bytes each: two fit, a third does not.
    q.append(&[1u8; 40]).unwrap();
    q.append(&[2u8; 40]).unwrap();
    match q.append(&[3u8; 40]) {
        Err(err @ SpoolError::Full { .. }) => {
            assert!(err.to_string().contains("is full"), "{err}");
        }
        other => panic!("{other:?}"),
    }
    // A batch that does not fit whole appends nothing.
    assert!(matches!(
        q.append_batch(&[b"x", &[4u8; 40]]),
        Err(SpoolError::Full { .. })
    ));
    assert_eq!(q.stats().records, 2);
    assert_eq!(q.stats().bytes, 96);
    assert!(matches!(
        q.append(&[0u8; 93]),
        Err(SpoolError::TooLarge { len: 93, .. })
    ));
    // Acking frees room.
    let first = q.peek(1, usize::MAX).unwrap();
    q.ack(first[0].0).unwrap();
    q.append(&[3u8; 40]).unwrap();
    drop(q);
    let q = Spool::open(dir.path(), opts).unwrap();
    assert_eq!(payloads(&q), [vec![2u8; 40], vec![3u8; 40]]);
}

#[test]
fn acks_cross_segments_and_consumed_segments_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = Spool::open(dir.path(), small_segments()).unwrap();
    // 8 + 24 = 32-byte records, segments sealed at 64 bytes: two records each (after the
    // 8-byte header the second ends at 72).
    let records: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 24]).collect();
    for r in &records {
        q.append(r).unwrap();
    }
    assert_eq!(segments(dir.path()).len(), 5);
    assert_eq!(q.stats().segments, 5);
    let all = q.peek(usize::MAX, usize::MAX).unwrap();
    assert_eq!(all.len(), 10);
    assert_ne!(all[0].0.segment(), all[9].0.segment());
    // The 5th record is the first of the third segment: the first two go.
    q.ack(all[4].0).unwrap();
    assert_eq!(segments(dir.path()).len(), 3);
    assert_eq!(q.stats().records, 5);
    assert_eq!(q.stats().bytes, 5 * 32);
    assert_eq!(payloads(&q), records[5..]);
    // Peeking with a byte budget: whole records only, at least one.
    assert_eq!(q.peek(10, 50).unwrap().len(), 2);
    assert_eq!(q.peek(10, 1).unwrap().len(), 1);
    assert_eq!(q.peek(0, 100).unwrap().len(), 0);
    drop(q);
    let mut q = Spool::open(dir.path(), small_segments()).unwrap();
    assert_eq!(payloads(&q), records[5..]);
    q.ack(all[9].0).unwrap();
    // Everything consumed: only the newest segment is left, empty.
    assert_eq!(segments(dir.path()).len(), 1);
    assert!(q.is_empty());
    q.append(b"more").unwrap();
    // A sealed, consumed segment goes as soon as the next one starts.
    q.append(&[9u8; 60]).unwrap();
    let tail = q.peek(10, usize::MAX).unwrap();
    q.ack(tail[1].0).unwrap();
    q.append(b"new segment").unwrap();
    assert_eq!(segments(dir.path()).len(), 1);
    assert_eq!(strings(&q), ["new segment"]);
}

#[test]
fn acks_of_positions_never_handed_out_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut q = Spool::open(dir.path(), small_segments()).unwrap();
    q.append_batch(&[b"abc", b"defg"]).unwrap();
    let all = q.peek(2, usize::MAX).unwrap();
    let end = all[1].0;
    let other = tempfile::tempdir().unwrap();
    let mut o = Spool::open(other.path(), small_segments()).unwrap();
    o.append_batch(&[b"abcdef", &[b'q'; 40]]).unwrap();
    o.append(b"z").unwrap();
    // Positions of another queue: inside the first record of this one, past its end, in a
    // segment it does not have.
    let foreign = o.peek(3, usize::MAX).unwrap();
    assert!(foreign[0].0 > all[0].0 && foreign[0].0 < end);
    assert!(foreign[1].0.segment() == end.segment() && foreign[1].0 > end);
    assert!(foreign[2].0.segment() > end.segment());
    for (bad, _) in foreign {
        match q.ack(bad) {
            Err(SpoolError::BadPosition { position, .. }) => assert_eq!(position, bad),
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert_eq!(q.stats().records, 2);
    q.ack(end).unwrap();
    assert!(q.is_empty());
}
