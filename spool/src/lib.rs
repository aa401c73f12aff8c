//! A durable, bounded, on-disk FIFO queue of byte records.
//!
//! `mirage-server` queues its verdicts here until the manager has stored them, and `mirage-agent`
//! will queue the log lines it ships: both need "in order, nothing lost while the far end is
//! away, nothing lost or doubled by a crash", with a bound on the disk it may take. The API is
//! synchronous (callers wrap it in `spawn_blocking` or hold a mutex briefly) and one process
//! owns a directory at a time.
//!
//! # Layout
//!
//! ```text
//! <dir>/lock                       flock(2)ed while a Spool is open
//! <dir>/00000000000000000001.seg   segments, oldest first: 8-byte magic, then records
//! <dir>/00000000000000000002.seg
//! <dir>/position                   the consumer position (written to position.tmp, renamed)
//! ```
//!
//! A record is framed as `len: u32 LE`, `crc: u32 LE` (CRC-32 of the four length bytes and the
//! payload: a torn or zero-filled length is caught as surely as a torn payload), then `len`
//! payload bytes. A batch is written with one `write` at the end of the newest segment and, with
//! [`SpoolOptions::sync`], one `fdatasync`; a segment is sealed once it reaches
//! [`SpoolOptions::segment_bytes`] (a batch never spans two segments), and deleted once the
//! consumer position has moved past it.
//!
//! # Delivery
//!
//! [`Spool::peek`] reads from the consumer position without moving it and gives each record the
//! [`Position`] just after it; [`Spool::ack`] moves the position there, persisted atomically
//! (temporary file, `rename`, directory `fsync`). A crash between delivery and ack delivers
//! again: at-least-once, which the receiver's idempotency keys (the manager's verdict ids) make
//! exactly-once.
//!
//! # Recovery
//!
//! [`Spool::open`] checks every record of every segment. A torn or corrupt record (a crash in
//! the middle of a write, a flipped bit) is cut off with everything after it in its segment, and
//! logged; a consumer position past the end, inside a deleted segment or between two records is
//! clamped to the nearest record boundary at or before it (redelivering rather than skipping).

use std::{
    collections::VecDeque,
    fmt,
    fs::{self, File, OpenOptions},
    io::{self, BufReader, Read, Seek, SeekFrom, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

/// First bytes of every segment file.
const SEGMENT_MAGIC: [u8; 8] = *b"MSPOOL\x00\x01";
/// Bytes before a segment's first record.
const HEADER_LEN: u64 = SEGMENT_MAGIC.len() as u64;
/// Bytes of a record's frame (length and CRC) before its payload.
pub const FRAME_LEN: u64 = 8;
/// First bytes of the position file.
const POSITION_MAGIC: [u8; 8] = *b"MSPOSN\x00\x01";
/// The position file: magic, segment, offset, CRC-32 of the 24 bytes before it.
const POSITION_LEN: usize = 28;
const POSITION_FILE: &str = "position";
const POSITION_TMP: &str = "position.tmp";
const LOCK_FILE: &str = "lock";
const SEGMENT_EXT: &str = "seg";
/// Read buffer for scans and peeks.
const READ_BUFFER: usize = 256 * 1024;

/// Errors of the queue. Each names the file or directory involved.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file operation failed.
    #[error("{op} {}", .path.display())]
    Io {
        /// What was being done (`opening`, `writing`, ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another `Spool` (in this or another process) has the directory open.
    #[error("{} is locked: another process (or another Spool in this one) has the queue open", .path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// Appending would take the queued bytes over [`SpoolOptions::max_bytes`]; nothing was
    /// appended and nothing queued was dropped.
    #[error(
        "queue {} is full: {queued} bytes queued, {needed} more would exceed max_bytes {max_bytes}",
        .dir.display()
    )]
    Full {
        /// The queue directory.
        dir: PathBuf,
        /// Bytes queued now (frames included).
        queued: u64,
        /// Bytes the batch needed (frames included).
        needed: u64,
        /// The bound.
        max_bytes: u64,
    },
    /// A record that could never fit, however empty the queue.
    #[error("a {len}-byte record can never fit in queue {} (max_bytes {max_bytes})", .dir.display())]
    TooLarge {
        /// The queue directory.
        dir: PathBuf,
        /// The record's length.
        len: u64,
        /// The bound.
        max_bytes: u64,
    },
    /// [`Spool::ack`] was given a position this queue never handed out.
    #[error("cannot ack {position} in queue {}: {reason}", .dir.display())]
    BadPosition {
        /// The queue directory.
        dir: PathBuf,
        /// The position given.
        position: Position,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A segment changed under the queue after it was opened and checked (or is not a segment
    /// at all).
    #[error("{} is corrupt at byte {offset}: {reason}", .path.display())]
    Corrupt {
        /// The segment file.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
}

type Result<T, E = SpoolError> = std::result::Result<T, E>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// How a queue behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolOptions {
    /// Most bytes queued (records not yet acked, frames included). [`Spool::append_batch`]
    /// fails with [`SpoolError::Full`] rather than exceed it. The disk used is at most this
    /// plus one segment (the acked part of the oldest one). Default 256 MiB.
    pub max_bytes: u64,
    /// A segment is sealed, and a new one started, once it holds this many bytes. Default
    /// 8 MiB.
    pub segment_bytes: u64,
    /// `fdatasync` every appended batch and every new segment, and `fsync` the position file and
    /// the directory: an appended record survives a power cut. Default true; tests and
    /// benchmarks turn it off.
    pub sync: bool,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
            segment_bytes: 8 * 1024 * 1024,
            sync: true,
        }
    }
}

/// A place in the queue: just after a record (what [`Spool::peek`] returns with each record,
/// and what [`Spool::ack`] takes). Ordered as the records are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    segment: u64,
    offset: u64,
}

impl Position {
    /// The segment's sequence number.
    pub fn segment(self) -> u64 {
        self.segment
    }

    /// The byte offset in the segment file.
    pub fn offset(self) -> u64 {
        self.offset
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.segment, self.offset)
    }
}

/// What the queue holds (records not yet acked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Records.
    pub records: u64,
    /// Bytes, frames included (what [`SpoolOptions::max_bytes`] bounds).
    pub bytes: u64,
    /// Segment files on disk.
    pub segments: usize,
}

/// One segment file.
#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    /// Bytes, header included; every byte is in a checked record.
    len: u64,
    /// Records.
    records: u64,
}

/// An open queue; see the crate documentation.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    options: SpoolOptions,
    /// Holds the `flock` until dropped.
    _lock: File,
    /// Oldest first; never empty. The last one is the one appended to.
    segments: VecDeque<Segment>,
    /// The newest segment, opened for appending.
    writer: File,
    /// The consumer position, always in the oldest segment.
    head: Position,
    /// Records of the oldest segment before `head`.
    head_records: u64,
    /// Records after `head`.
    records: u64,
    /// Bytes after `head`.
    bytes: u64,
    /// Consumed segments whose files go once the position that passed them is persisted.
    retired: Vec<PathBuf>,
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.{SEGMENT_EXT}"))
}

fn crc(len: [u8; 4], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len);
    h.update(payload);
    h.finalize()
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

/// What checking a segment found.
struct Scan {
    /// Bytes of valid records, header included (the file is cut to this).
    len: u64,
    /// Valid records.
    records: u64,
    /// Records ending at or before the mark.
    before_mark: u64,
    /// The last record boundary at or before the mark.
    snapped_mark: u64,
}

impl Spool {
    /// Opens (creating it if needed) the queue in `dir`, checks every record, and takes the
    /// directory's lock.
    ///
    /// # Errors
    ///
    /// [`SpoolError::Locked`] if another `Spool` has it open; [`SpoolError::Corrupt`] if a
    /// segment does not start with the segment magic; [`SpoolError::Io`] otherwise.
    pub fn open(dir: impl AsRef<Path>, options: SpoolOptions) -> Result<Self> {
        let dir = dir.as_ref().to_owned();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("creating", &dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(SpoolError::Locked { path: lock_path });
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(SpoolError::Io {
                    op: "locking",
                    path: lock_path,
                    source,
                });
            }
        }

        let mut seqs = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some(SEGMENT_EXT) {
                continue;
            }
            match path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
            {
                Some(seq) => seqs.push(seq),
                None => tracing::warn!(
                    path = %path.display(),
                    "Ignoring a .seg file not named like a segment."
                ),
            }
        }
        seqs.sort_unstable();
        let tmp = dir.join(POSITION_TMP);
        if tmp.exists() {
            fs::remove_file(&tmp).map_err(io_err("removing", &tmp))?;
        }

        let stored = read_position(&dir.join(POSITION_FILE))?;
        let mut created = false;
        if seqs.is_empty() {
            let seq = stored.map_or(1, |p| p.segment.saturating_add(1).max(1));
            create_segment(&dir, seq, options.sync)?;
            seqs.push(seq);
            created = true;
        }

        // Where the consumer is: clamped into the segments that exist, to a record boundary.
        let first = seqs.first().copied().unwrap_or(1);
        let last = seqs.last().copied().unwrap_or(1);
        let mut head = match stored {
            None => Position {
                segment: first,
                offset: HEADER_LEN,
            },
            Some(p) if p.segment < first => Position {
                segment: first,
                offset: HEADER_LEN,
            },
            Some(p) if p.segment > last => Position {
                segment: last,
                offset: u64::MAX,
            },
            Some(p) => match seqs.iter().find(|&&s| s >= p.segment) {
                Some(&s) if s == p.segment => p,
                Some(&s) => Position {
                    segment: s,
                    offset: HEADER_LEN,
                },
                None => Position {
                    segment: last,
                    offset: u64::MAX,
                },
            },
        };

        let mut segments = VecDeque::with_capacity(seqs.len());
        let mut head_records = 0;
        for (i, &seq) in seqs.iter().enumerate() {
            let path = segment_path(&dir, seq);
            if seq < head.segment {
                // Wholly consumed before the crash; the ack that moved past it did not get to
                // delete it.
                fs::remove_file(&path).map_err(io_err("removing", &path))?;
                continue;
            }
            let mark = (seq == head.segment).then_some(head.offset);
            let scan = scan_segment(&path, mark, i + 1 == seqs.len(), options.sync)?;
            if seq == head.segment {
                head.offset = scan.snapped_mark;
                head_records = scan.before_mark;
            }
            segments.push_back(Segment {
                seq,
                path,
                len: scan.len,
                records: scan.records,
            });
        }
        let writer_path = segments
            .back()
            .map(|s| s.path.clone())
            .unwrap_or_else(|| segment_path(&dir, last));
        let writer = OpenOptions::new()
            .append(true)
            .open(&writer_path)
            .map_err(io_err("opening", &writer_path))?;
        let mut spool = Self {
            dir,
            options,
            _lock: lock,
            segments,
            writer,
            head,
            head_records,
            records: 0,
            bytes: 0,
            retired: Vec::new(),
        };
        let mut records = 0;
        let mut bytes = 0;
        for s in &spool.segments {
            if s.seq == spool.head.segment {
                records += s.records - spool.head_records;
                bytes += s.len - spool.head.offset;
            } else {
                records += s.records;
                bytes += s.len - HEADER_LEN;
            }
        }
        spool.records = records;
        spool.bytes = bytes;
        let moved = spool.normalize_head();
        if let Some(stored) = stored
            && stored != spool.head
            && !moved
        {
            tracing::warn!(
                queue = %spool.dir.display(),
                stored = %stored,
                clamped = %spool.head,
                "Consumer position was past the end, in a missing segment or between records;                  clamped to a record boundary."
            );
        }
        if created || moved || stored != Some(spool.head) {
            spool.write_position()?;
        }
        spool.delete_consumed()?;
        tracing::debug!(
            queue = %spool.dir.display(),
            records = spool.records,
            bytes = spool.bytes,
            segments = spool.segments.len(),
            "Queue opened."
        );
        Ok(spool)
    }

    /// The queue's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The options it was opened with.
    pub fn options(&self) -> &SpoolOptions {
        &self.options
    }

    /// What it holds.
    pub fn stats(&self) -> Stats {
        Stats {
            records: self.records,
            bytes: self.bytes,
            segments: self.segments.len(),
        }
    }

    /// Whether every record has been acked.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Appends one record; see [`Self::append_batch`].
    ///
    /// # Errors
    ///
    /// As [`Self::append_batch`].
    pub fn append(&mut self, record: &[u8]) -> Result<Position> {
        self.append_batch(&[record])
    }

    /// Appends records, all or none, in one write (and, with [`SpoolOptions::sync`], one
    /// `fdatasync`); returns the position after the last one.
    ///
    /// # Errors
    ///
    /// [`SpoolError::Full`] if they would take the queue over `max_bytes` (nothing appended);
    /// [`SpoolError::TooLarge`] for a record that could never fit; [`SpoolError::Io`] if
    /// writing fails (the segment is cut back to where it was).
    pub fn append_batch(&mut self, records: &[&[u8]]) -> Result<Position> {
        let mut needed: u64 = 0;
        for r in records {
            let len = r.len() as u64;
            if len > u64::from(u32::MAX) || len + FRAME_LEN > self.options.max_bytes {
                return Err(SpoolError::TooLarge {
                    dir: self.dir.clone(),
                    len,
                    max_bytes: self.options.max_bytes,
                });
            }
            needed += FRAME_LEN + len;
        }
        if records.is_empty() {
            return Ok(self.end());
        }
        if self.bytes + needed > self.options.max_bytes {
            return Err(SpoolError::Full {
                dir: self.dir.clone(),
                queued: self.bytes,
                needed,
                max_bytes: self.options.max_bytes,
            });
        }
        if self
            .segments
            .back()
            .is_some_and(|s| s.len >= self.options.segment_bytes && s.records > 0)
        {
            self.roll_over()?;
        }
        let mut buf = Vec::with_capacity(usize::try_from(needed).unwrap_or(0));
        for r in records {
            let len = u32::try_from(r.len()).unwrap_or(u32::MAX).to_le_bytes();
            buf.extend_from_slice(&len);
            buf.extend_from_slice(&crc(len, r).to_le_bytes());
            buf.extend_from_slice(r);
        }
        let sync = self.options.sync;
        let Some(active) = self.segments.back_mut() else {
            return Err(self.lost_segments());
        };
        let written = self.writer.write_all(&buf).and_then(|()| {
            if sync {
                self.writer.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(source) = written {
            // Leave no partial record behind (a later append would follow it).
            if let Err(err) = self.writer.set_len(active.len) {
                tracing::error!(
                    path = %active.path.display(),
                    error = %err,
                    "Cutting a failed append back failed; the next open will."
                );
            }
            return Err(SpoolError::Io {
                op: "appending to",
                path: active.path.clone(),
                source,
            });
        }
        active.len += needed;
        active.records += records.len() as u64;
        self.records += records.len() as u64;
        self.bytes += needed;
        Ok(Position {
            segment: active.seq,
            offset: active.len,
        })
    }

    /// Up to `max_records` records from the consumer position on, without moving it, each with
    /// the position after it. Stops before a record that would take the payloads over
    /// `max_bytes`, except the first one: a record larger than `max_bytes` still comes out,
    /// alone.
    ///
    /// # Errors
    ///
    /// [`SpoolError::Corrupt`] if a record changed on disk since [`Self::open`] checked it;
    /// [`SpoolError::Io`] if reading fails.
    pub fn peek(&self, max_records: usize, max_bytes: usize) -> Result<Vec<(Position, Vec<u8>)>> {
        let mut out: Vec<(Position, Vec<u8>)> = Vec::new();
        let mut total = 0usize;
        for seg in &self.segments {
            if out.len() >= max_records {
                break;
            }
            let start = if seg.seq == self.head.segment {
                self.head.offset
            } else {
                HEADER_LEN
            };
            if start >= seg.len {
                continue;
            }
            let file = File::open(&seg.path).map_err(io_err("opening", &seg.path))?;
            let mut reader = BufReader::with_capacity(READ_BUFFER, file);
            reader
                .seek(SeekFrom::Start(start))
                .map_err(io_err("reading", &seg.path))?;
            let mut offset = start;
            while offset < seg.len && out.len() < max_records {
                let mut frame = [0u8; FRAME_LEN as usize];
                reader
                    .read_exact(&mut frame)
                    .map_err(io_err("reading", &seg.path))?;
                let (len_bytes, crc_bytes) = split_frame(frame);
                let len = u32::from_le_bytes(len_bytes) as usize;
                if offset + FRAME_LEN + len as u64 > seg.len {
                    return Err(SpoolError::Corrupt {
                        path: seg.path.clone(),
                        offset,
                        reason: "a record runs past the checked end of its segment",
                    });
                }
                if !out.is_empty() && total + len > max_bytes {
                    return Ok(out);
                }
                let mut payload = vec![0u8; len];
                reader
                    .read_exact(&mut payload)
                    .map_err(io_err("reading", &seg.path))?;
                if crc(len_bytes, &payload) != u32::from_le_bytes(crc_bytes) {
                    return Err(SpoolError::Corrupt {
                        path: seg.path.clone(),
                        offset,
                        reason: "CRC mismatch (changed after the queue was opened)",
                    });
                }
                offset += FRAME_LEN + len as u64;
                total += len;
                out.push((
                    Position {
                        segment: seg.seq,
                        offset,
                    },
                    payload,
                ));
            }
        }
        Ok(out)
    }

    /// Marks every record up to `up_to` (a position [`Self::peek`] returned) consumed, persists
    /// the new consumer position, and deletes segments now wholly consumed. A position at or
    /// before the current one is a no-op (a repeated ack).
    ///
    /// # Errors
    ///
    /// [`SpoolError::BadPosition`] if `up_to` is past the end or not a record boundary (nothing
    /// changes); [`SpoolError::Io`] if persisting or deleting fails.
    pub fn ack(&mut self, up_to: Position) -> Result<()> {
        if up_to <= self.head {
            return Ok(());
        }
        let bad = |reason| SpoolError::BadPosition {
            dir: self.dir.clone(),
            position: up_to,
            reason,
        };
        let Some(target) = self.segments.iter().find(|s| s.seq == up_to.segment) else {
            return Err(bad("no such segment"));
        };
        if up_to.offset > target.len || up_to.offset < HEADER_LEN {
            return Err(bad("past the end of its segment"));
        }
        let from = if target.seq == self.head.segment {
            self.head.offset
        } else {
            HEADER_LEN
        };
        let (mut records, mut bytes) = (0u64, 0u64);
        for s in &self.segments {
            if s.seq >= up_to.segment {
                break;
            }
            if s.seq == self.head.segment {
                records += s.records - self.head_records;
                bytes += s.len - self.head.offset;
            } else {
                records += s.records;
                bytes += s.len - HEADER_LEN;
            }
        }
        let walked =
            walk(&target.path, from, up_to.offset)?.ok_or_else(|| bad("not a record boundary"))?;
        records += walked;
        bytes += up_to.offset - from;
        let head_records = if target.seq == self.head.segment {
            self.head_records + walked
        } else {
            walked
        };
        self.head = up_to;
        self.head_records = head_records;
        self.records -= records;
        self.bytes -= bytes;
        self.normalize_head();
        self.write_position()?;
        self.delete_consumed()
    }

    /// The position after the last record.
    fn end(&self) -> Position {
        self.segments.back().map_or(self.head, |s| Position {
            segment: s.seq,
            offset: s.len,
        })
    }

    /// Retires the segments before the head's, and moves a head at the end of a sealed
    /// segment to the start of the next one (so that the sealed one can go too). Returns
    /// whether any segment was retired.
    fn normalize_head(&mut self) -> bool {
        let mut retired = false;
        while let Some(front) = self.segments.front() {
            let consumed = front.seq < self.head.segment
                || (front.seq == self.head.segment
                    && self.head.offset >= front.len
                    && self.segments.len() > 1);
            if !consumed {
                break;
            }
            if let Some(s) = self.segments.pop_front() {
                self.retired.push(s.path);
            }
            retired = true;
        }
        if let Some(front) = self.segments.front()
            && front.seq != self.head.segment
        {
            self.head = Position {
                segment: front.seq,
                offset: HEADER_LEN,
            };
            self.head_records = 0;
        }
        retired
    }
}

impl Spool {
    /// Seals the newest segment and starts the next one. A consumer that had read all of the
    /// sealed one moves on, so that it can be deleted.
    fn roll_over(&mut self) -> Result<()> {
        let seq = self.end().segment + 1;
        let path = create_segment(&self.dir, seq, self.options.sync)?;
        let writer = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        self.writer = writer;
        self.segments.push_back(Segment {
            seq,
            path,
            len: HEADER_LEN,
            records: 0,
        });
        if self.normalize_head() {
            self.write_position()?;
            self.delete_consumed()?;
        }
        Ok(())
    }

    /// The error for a broken invariant (the segment list is never empty).
    fn lost_segments(&self) -> SpoolError {
        SpoolError::Corrupt {
            path: self.dir.clone(),
            offset: 0,
            reason: "the queue has no segment (internal error)",
        }
    }

    /// Persists the head: written to a temporary file, renamed over the old one, and (with
    /// `sync`) both the file and the directory synced, so the file is always whole.
    fn write_position(&self) -> Result<()> {
        let mut bytes = Vec::with_capacity(POSITION_LEN);
        bytes.extend_from_slice(&POSITION_MAGIC);
        bytes.extend_from_slice(&self.head.segment.to_le_bytes());
        bytes.extend_from_slice(&self.head.offset.to_le_bytes());
        let sum = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&sum.to_le_bytes());
        let tmp = self.dir.join(POSITION_TMP);
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        file.write_all(&bytes)
            .and_then(|()| {
                if self.options.sync {
                    file.sync_all()
                } else {
                    Ok(())
                }
            })
            .map_err(io_err("writing", &tmp))?;
        drop(file);
        let path = self.dir.join(POSITION_FILE);
        fs::rename(&tmp, &path).map_err(io_err("renaming to", &path))?;
        if self.options.sync {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Deletes the files of retired segments (after the position that passed them is
    /// persisted: a crash in between leaves files that [`Self::open`] deletes).
    fn delete_consumed(&mut self) -> Result<()> {
        if self.retired.is_empty() {
            return Ok(());
        }
        for path in self.retired.drain(..) {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(SpoolError::Io {
                        op: "removing",
                        path,
                        source,
                    });
                }
            }
        }
        if self.options.sync {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

fn split_frame(frame: [u8; FRAME_LEN as usize]) -> ([u8; 4], [u8; 4]) {
    let [a, b, c, d, e, f, g, h] = frame;
    ([a, b, c, d], [e, f, g, h])
}

/// Reads the position file; `None` if there is none or it is not whole (logged: the queue then
/// redelivers from its oldest record).
fn read_position(path: &Path) -> Result<Option<Position>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(SpoolError::Io {
                op: "reading",
                path: path.to_owned(),
                source,
            });
        }
    };
    let parsed = (bytes.len() == POSITION_LEN && bytes.starts_with(&POSITION_MAGIC))
        .then(|| {
            let word = |at: usize| -> Option<[u8; 8]> { bytes.get(at..at + 8)?.try_into().ok() };
            let sum: [u8; 4] = bytes.get(24..28)?.try_into().ok()?;
            let body = bytes.get(..24)?;
            (crc32fast::hash(body) == u32::from_le_bytes(sum)).then_some(Position {
                segment: u64::from_le_bytes(word(8)?),
                offset: u64::from_le_bytes(word(16)?),
            })
        })
        .flatten();
    if parsed.is_none() {
        tracing::warn!(
            path = %path.display(),
            "Consumer position file is damaged; delivering again from the oldest record."
        );
    }
    Ok(parsed)
}

/// Creates segment `seq` holding only its header (synced, with its directory entry).
fn create_segment(dir: &Path, seq: u64, sync: bool) -> Result<PathBuf> {
    let path = segment_path(dir, seq);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err("creating", &path))?;
    file.write_all(&SEGMENT_MAGIC)
        .and_then(|()| if sync { file.sync_all() } else { Ok(()) })
        .map_err(io_err("writing", &path))?;
    if sync {
        sync_dir(dir)?;
    }
    Ok(path)
}

/// Checks every record of a segment, cutting the file at the first torn or corrupt one.
/// `mark`: a consumer position in it, to count the records before and snap to a boundary.
fn scan_segment(path: &Path, mark: Option<u64>, newest: bool, sync: bool) -> Result<Scan> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("opening", path))?;
    let file_len = file.metadata().map_err(io_err("reading", path))?.len();
    if file_len < HEADER_LEN {
        // Created but its header never reached the disk: it holds nothing.
        tracing::warn!(path = %path.display(), "Segment without a header (torn creation); rewriting it.");
        let mut file = file;
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(&SEGMENT_MAGIC))
            .and_then(|()| if sync { file.sync_all() } else { Ok(()) })
            .map_err(io_err("rewriting", path))?;
        return Ok(Scan {
            len: HEADER_LEN,
            records: 0,
            before_mark: 0,
            snapped_mark: HEADER_LEN,
        });
    }
    let mut reader = BufReader::with_capacity(READ_BUFFER, &file);
    let mut magic = [0u8; HEADER_LEN as usize];
    reader
        .read_exact(&mut magic)
        .map_err(io_err("reading", path))?;
    if magic != SEGMENT_MAGIC {
        return Err(SpoolError::Corrupt {
            path: path.to_owned(),
            offset: 0,
            reason: "not a spool segment (wrong magic)",
        });
    }
    let mark = mark.unwrap_or(0);
    let mut scan = Scan {
        len: HEADER_LEN,
        records: 0,
        before_mark: 0,
        snapped_mark: HEADER_LEN,
    };
    let mut payload = Vec::new();
    let damage = loop {
        let offset = scan.len;
        if offset == file_len {
            break None;
        }
        if file_len - offset < FRAME_LEN {
            break Some("a torn record frame");
        }
        let mut frame = [0u8; FRAME_LEN as usize];
        reader
            .read_exact(&mut frame)
            .map_err(io_err("reading", path))?;
        let (len_bytes, crc_bytes) = split_frame(frame);
        let len = u64::from(u32::from_le_bytes(len_bytes));
        if len > file_len - offset - FRAME_LEN {
            break Some("a torn record (shorter than its length)");
        }
        payload.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
        reader
            .read_exact(&mut payload)
            .map_err(io_err("reading", path))?;
        if crc(len_bytes, &payload) != u32::from_le_bytes(crc_bytes) {
            break Some("a corrupt record (CRC mismatch)");
        }
        scan.len = offset + FRAME_LEN + len;
        scan.records += 1;
        if scan.len <= mark {
            scan.before_mark += 1;
            scan.snapped_mark = scan.len;
        }
    };
    if let Some(reason) = damage {
        let dropped = file_len - scan.len;
        if newest {
            tracing::warn!(
                path = %path.display(),
                offset = scan.len,
                dropped_bytes = dropped,
                reason,
                "Cutting the queue's newest segment at a torn or corrupt record (a crash while \
                 appending)."
            );
        } else {
            tracing::error!(
                path = %path.display(),
                offset = scan.len,
                dropped_bytes = dropped,
                reason,
                "Cutting a sealed queue segment at a corrupt record; the records after it in \
                 this segment are lost."
            );
        }
        drop(reader);
        file.set_len(scan.len)
            .and_then(|()| if sync { file.sync_all() } else { Ok(()) })
            .map_err(io_err("truncating", path))?;
    }
    Ok(scan)
}

/// Counts the records from `from` to `to` in a segment (frames only, payloads skipped);
/// `None` if `to` is not a record boundary.
fn walk(path: &Path, from: u64, to: u64) -> Result<Option<u64>> {
    let file = File::open(path).map_err(io_err("opening", path))?;
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    reader
        .seek(SeekFrom::Start(from))
        .map_err(io_err("reading", path))?;
    let (mut at, mut count) = (from, 0u64);
    while at < to {
        let mut frame = [0u8; FRAME_LEN as usize];
        reader
            .read_exact(&mut frame)
            .map_err(io_err("reading", path))?;
        let (len_bytes, _) = split_frame(frame);
        let len = i64::from(u32::from_le_bytes(len_bytes));
        reader.seek_relative(len).map_err(io_err("reading", path))?;
        at += FRAME_LEN + len.unsigned_abs();
        count += 1;
    }
    Ok((at == to).then_some(count))
}
