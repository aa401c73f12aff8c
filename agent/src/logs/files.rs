//! The log-file collector: follows the files `[[logs]] paths` name (globs), line by line, across
//! rotation and restarts.
//!
//! # How files are followed
//!
//! * **Polling**, every [`FilesOptions::poll`] (250 ms): one `fstat` per open file and one
//!   `stat` per path; data is read with `pread` from the saved offset. inotify would save those
//!   calls on idle files, but it needs a crate or `unsafe` code, misses changes on network file
//!   systems and in some containers, overflows its queue under load, and rotation still has to
//!   be checked by identity and content; a quarter of a second is far inside the windows the
//!   detection rules count in (minutes). Globs are expanded again every
//!   [`FilesOptions::rescan`] (2 s).
//! * **First sight**: a file matched at start-up without a saved position is read from its end
//!   (from after its last complete line): old lines were never meant for this agent and must
//!   not be counted as new attacks. A file that appears while the agent runs is new, and is read
//!   from its start.
//! * **Rotation by rename** (logrotate's default `create`): the path's `(dev, inode)` changes.
//!   The old file stays open and is read to its end, for as long as it keeps growing (the daemon
//!   writes there until it reopens its log) and then [`FilesOptions::rotated_idle`] more; the
//!   new file at the path is read from its start, after the old one's lines.
//! * **Copy-truncate** (`copytruncate`): the inode stays, but the file is shorter than the offset
//!   or no longer starts with the bytes it started with ([`Fingerprint`]; checked whenever its
//!   size changes, so a truncation already written past the old offset is caught too). The
//!   lines between the offset and the truncation are in the copy: a file in the same directory
//!   that starts with the same fingerprint and is at least as long as the offset is read from
//!   the offset to its end. Then the truncated file is read from its start. (logrotate itself
//!   loses the lines written between its copy and its truncate; nothing can bring those back.)
//! * **Restarts**: positions (identity, offset, fingerprint, per path, with rotated files not
//!   yet finished) are saved in `state_dir/logs/files.json` after each batch was queued
//!   ([`Sink::send`] returned). At start each is checked: the same file, still starting with
//!   its fingerprint, resumes at its offset; a file rotated while the agent was down is found
//!   in its directory by its identity and read to its end, and the new file from its start; a
//!   truncated one is handled as above.
//! * **Lines**: split on LF, a CR before it removed; a last line without its LF waits for it
//!   (except at the end of a finished rotated file, where no LF will come). A line longer than
//!   [`FilesOptions::max_line`] (15 KiB) is cut there, the rest up to its LF skipped, and
//!   counted. Invalid UTF-8 is replaced (U+FFFD).
//!
//! Globs should match live files only (`/var/log/auth.log`, not `/var/log/auth.log*`): a
//! rotated copy matched by a glob is a file like any other and would be read again.

use std::{
    collections::{BTreeMap, HashSet},
    fs::{self, File},
    io,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    LogLine, Sink, SinkError,
    offsets::{self, FileId, FileOffsets, FilePosition, Fingerprint, OffsetsError, PathPositions},
};
use crate::config::links::LogSource;

/// The collector's state file, under `state_dir`.
pub const STATE_FILE: &str = "logs/files.json";

/// Timings and limits of the collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesOptions {
    /// How often open files are checked for new data. Default 250 ms.
    pub poll: Duration,
    /// How often the globs are expanded again. Default 2 s.
    pub rescan: Duration,
    /// How long a rotated (or vanished) file must have stopped growing before it is finished.
    /// Default 5 s.
    pub rotated_idle: Duration,
    /// Longest line shipped, in bytes; longer ones are cut. Default 15 KiB, so that a message
    /// (the line, the syslog header and the file's path) stays within the server's default
    /// `limits.max_message_bytes` of 16 KiB, beyond which the server would drop it whole.
    pub max_line: usize,
    /// Most bytes read in one pass over all files (one batch); at least twice `max_line`.
    /// Default 512 KiB.
    pub pass_bytes: usize,
}

impl Default for FilesOptions {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(250),
            rescan: Duration::from_secs(2),
            rotated_idle: Duration::from_secs(5),
            max_line: 15 * 1024,
            pass_bytes: 512 * 1024,
        }
    }
}

/// Why the collector stopped.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A `[[logs]] paths` entry is not a valid glob.
    #[error("invalid glob {pattern:?}")]
    Glob {
        /// The entry.
        pattern: String,
        /// The cause.
        #[source]
        source: glob::PatternError,
    },
    /// The blocking part of the collector panicked or was cancelled.
    #[error("the files collector's reading task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Follows the files of `sources` and sends their lines to `sink` until `shutdown` turns true
/// (or the sink closes). Positions are kept in `state_dir/`[`STATE_FILE`].
///
/// # Errors
///
/// An invalid glob (at start), or a panic in the reading task. Read and state-file errors are
/// logged and retried, not returned.
pub async fn run(
    sources: &[LogSource],
    sink: Sink,
    state_dir: &Path,
    options: FilesOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), FilesError> {
    let state_file = state_dir.join(STATE_FILE);
    let mut collector = Collector::new(sources, state_file.clone(), options.clone())?;
    let poll = collector.options.poll;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let (back, pass) = match tokio::task::spawn_blocking(move || {
            let pass = collector.pass();
            (collector, pass)
        })
        .await
        {
            Ok(done) => done,
            // A blocking task can be cancelled before it runs (or panic); the collector it
            // held is gone with it, but nothing it read was queued or committed: start again
            // from the offsets on disk, which re-reads exactly what was not shipped.
            Err(err) => {
                warn!(error = %err, "A file-reading task was lost; resuming from the saved offsets.");
                collector = Collector::new(sources, state_file.clone(), options.clone())?;
                wait(&mut shutdown, poll).await;
                continue;
            }
        };
        collector = back;
        if !pass.lines.is_empty() {
            match sink.send(pass.lines).await {
                Ok(()) => collector.commit(),
                Err(SinkError::Closed) => {
                    collector.rollback();
                    debug!("The shipper stopped; the files collector stops.");
                    break;
                }
                Err(err) => {
                    collector.rollback();
                    warn!(error = %err, "Queueing log lines failed; they will be read again.");
                    wait(&mut shutdown, poll * 4).await;
                    continue;
                }
            }
        }
        if collector.dirty {
            let (back, saved) = match tokio::task::spawn_blocking(move || {
                let saved = collector.save();
                (collector, saved)
            })
            .await
            {
                Ok(done) => done,
                Err(err) => {
                    // The lines were queued but their offsets may not be saved: resuming from
                    // the older offsets would ship them again. Said, not hidden.
                    warn!(error = %err, "Saving file offsets was lost; resuming from the saved offsets (lines since may be sent twice).");
                    collector = Collector::new(sources, state_file.clone(), options.clone())?;
                    continue;
                }
            };
            collector = back;
            if let Err(err) = saved {
                warn!(error = %err, "Saving file offsets failed; retrying.");
            }
        }
        if !pass.more {
            wait(&mut shutdown, poll).await;
        }
    }
    Ok(())
}

/// Sleeps for `d` or until shutdown.
async fn wait(shutdown: &mut watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        _ = shutdown.changed() => {}
        () = tokio::time::sleep(d) => {}
    }
}

/// What one pass read.
#[derive(Debug, Default)]
struct Pass {
    lines: Vec<LogLine>,
    /// The byte budget ran out: more is waiting.
    more: bool,
}

/// An open file being read.
#[derive(Debug)]
struct Reader {
    file: File,
    id: FileId,
    /// Committed: the end of the last line queued.
    offset: u64,
    skipping: bool,
    fingerprint: Fingerprint,
    /// Size at the last pass.
    last_len: u64,
    /// Size when it was last read without anything consumed (a partial line waits).
    idle_len: Option<u64>,
    /// When it last grew (or was opened).
    last_growth: Instant,
    /// Read but not yet committed.
    pending: Option<Advance>,
    /// Read to its end, nothing more will come: dropped at the next commit.
    finished: bool,
}

#[derive(Debug, Clone, Copy)]
struct Advance {
    offset: u64,
    skipping: bool,
    /// Read to its end and finished: drop it once committed.
    finish: bool,
    /// Nothing was consumed, the size when that was seen.
    idle_len: Option<u64>,
}

impl Reader {
    fn open(file: File, offset: u64, skipping: bool, fingerprint: Fingerprint) -> io::Result<Self> {
        let meta = file.metadata()?;
        Ok(Self {
            id: FileId::of(&meta),
            file,
            offset,
            skipping,
            fingerprint,
            last_len: meta.len(),
            idle_len: None,
            last_growth: Instant::now(),
            pending: None,
            finished: false,
        })
    }

    fn position(&self) -> FilePosition {
        FilePosition {
            id: self.id,
            offset: self.offset,
            fingerprint: self.fingerprint,
            skipping: self.skipping,
        }
    }
}

/// One configured path being followed.
#[derive(Debug)]
struct Followed {
    service: String,
    /// The path as text (the `source` of its lines).
    source: String,
    /// The file at the path.
    current: Option<Reader>,
    /// Files that were at the path before, oldest first.
    rotated: Vec<Reader>,
    /// Since when the path has not existed.
    missing_since: Option<Instant>,
}

impl Followed {
    fn positions(&self) -> PathPositions {
        PathPositions {
            current: self.current.as_ref().map(Reader::position),
            rotated: self.rotated.iter().map(Reader::position).collect(),
        }
    }

    fn reads(&self, id: FileId) -> bool {
        self.current.iter().chain(&self.rotated).any(|r| r.id == id)
    }
}

#[derive(Debug)]
struct Collector {
    patterns: Vec<(glob::Pattern, String)>,
    state_path: PathBuf,
    options: FilesOptions,
    /// Positions loaded at start for paths not followed yet.
    saved: BTreeMap<PathBuf, PathPositions>,
    followed: BTreeMap<PathBuf, Followed>,
    started: bool,
    last_scan: Option<Instant>,
    /// Lines cut at `max_line` since start.
    cut_lines: u64,
    /// Positions changed since the last save.
    dirty: bool,
}

impl Collector {
    fn new(
        sources: &[LogSource],
        state_path: PathBuf,
        mut options: FilesOptions,
    ) -> Result<Self, FilesError> {
        let mut patterns = Vec::new();
        for source in sources {
            for p in &source.paths {
                let pattern = glob::Pattern::new(p).map_err(|source| FilesError::Glob {
                    pattern: p.clone(),
                    source,
                })?;
                patterns.push((pattern, source.service.clone()));
            }
        }
        options.max_line = options.max_line.max(1);
        options.pass_bytes = options.pass_bytes.max(2 * options.max_line);
        let saved = match offsets::load::<FileOffsets>(&state_path) {
            Ok(state) => state.paths,
            Err(err @ OffsetsError::Parse { .. }) => {
                warn!(
                    error = %err,
                    "The file offsets are unreadable; files are read from their end as if seen for the first time."
                );
                BTreeMap::new()
            }
            Err(err) => {
                warn!(error = %err, "Reading the file offsets failed; files are read from their end.");
                BTreeMap::new()
            }
        };
        Ok(Self {
            patterns,
            state_path,
            options,
            saved,
            followed: BTreeMap::new(),
            started: false,
            last_scan: None,
            cut_lines: 0,
            dirty: false,
        })
    }

    /// Reads what is new in every file (up to the pass budget).
    fn pass(&mut self) -> Pass {
        let now = Instant::now();
        if self
            .last_scan
            .is_none_or(|at| now.duration_since(at) >= self.options.rescan)
        {
            self.rescan();
            self.last_scan = Some(now);
        }
        let mut pass = Pass::default();
        let mut budget = self.options.pass_bytes;
        let read_at = super::unix_now();
        let paths: Vec<PathBuf> = self.followed.keys().cloned().collect();
        for path in paths {
            self.check_path(&path, now);
            let Some(f) = self.followed.get_mut(&path) else {
                continue;
            };
            let gone_for = f.missing_since.map(|t| now.duration_since(t));
            let idle_limit = self.options.rotated_idle;
            let readers = f
                .rotated
                .iter_mut()
                .map(|r| (r, true))
                .chain(f.current.iter_mut().map(|r| (r, false)));
            for (reader, rotated) in readers {
                if budget < self.options.max_line * 2 {
                    pass.more = true;
                    break;
                }
                let finishing = rotated || gone_for.is_some_and(|d| d >= idle_limit);
                match read_reader(
                    reader,
                    finishing,
                    !rotated,
                    now,
                    idle_limit,
                    self.options.max_line,
                    budget,
                ) {
                    Ok(chunk) => {
                        budget = budget.saturating_sub(chunk.bytes);
                        pass.more |= chunk.full;
                        for (line, cut) in chunk.lines {
                            if cut {
                                self.cut_lines += 1;
                                if self.cut_lines.is_power_of_two() {
                                    warn!(
                                        path = %f.source,
                                        max_line = self.options.max_line,
                                        cut_lines = self.cut_lines,
                                        "A line longer than the limit was cut."
                                    );
                                }
                            }
                            pass.lines.push(LogLine {
                                service: f.service.clone(),
                                source: f.source.clone(),
                                line,
                                read_at,
                            });
                        }
                    }
                    Err(err) => {
                        debug!(path = %f.source, error = %err, "Reading failed; retrying.");
                    }
                }
            }
        }
        // A pass that read nothing still commits finished (empty) readers.
        if pass.lines.is_empty() {
            self.commit();
        }
        pass
    }

    /// Applies what the last pass read: its lines are queued.
    fn commit(&mut self) {
        for f in self.followed.values_mut() {
            let mut changed = false;
            for reader in f.current.iter_mut().chain(f.rotated.iter_mut()) {
                if let Some(a) = reader.pending.take() {
                    changed |=
                        reader.offset != a.offset || reader.skipping != a.skipping || a.finish;
                    reader.offset = a.offset;
                    reader.skipping = a.skipping;
                    reader.idle_len = a.idle_len;
                    reader.finished = a.finish;
                }
            }
            let before = f.rotated.len();
            f.rotated.retain(|r| !r.finished);
            if f.rotated.len() != before {
                debug!(path = %f.source, "A rotated file was read to its end.");
            }
            if f.current.as_ref().is_some_and(|r| r.finished) {
                debug!(path = %f.source, "A vanished file was read to its end.");
                f.current = None;
            }
            self.dirty |= changed;
        }
        self.followed.retain(|_, f| {
            f.current.is_some() || !f.rotated.is_empty() || f.missing_since.is_none()
        });
    }

    /// Forgets what the last pass read: it will be read again.
    fn rollback(&mut self) {
        for f in self.followed.values_mut() {
            for reader in f.current.iter_mut().chain(f.rotated.iter_mut()) {
                reader.pending = None;
            }
        }
    }

    /// Writes the positions.
    fn save(&mut self) -> Result<(), OffsetsError> {
        let mut state = FileOffsets::default();
        for (path, f) in &self.followed {
            state.paths.insert(path.clone(), f.positions());
        }
        // Paths not seen yet this run keep their positions while a glob still covers them.
        for (path, positions) in &self.saved {
            if self.patterns.iter().any(|(p, _)| p.matches_path(path)) {
                state
                    .paths
                    .entry(path.clone())
                    .or_insert_with(|| positions.clone());
            }
        }
        offsets::save(&self.state_path, &state)?;
        self.dirty = false;
        Ok(())
    }

    /// Expands the globs; follows new matches.
    fn rescan(&mut self) {
        let mut matched: BTreeMap<PathBuf, String> = BTreeMap::new();
        for (pattern, service) in &self.patterns {
            let entries = match glob::glob(pattern.as_str()) {
                Ok(entries) => entries,
                Err(err) => {
                    debug!(pattern = pattern.as_str(), error = %err, "Glob failed.");
                    continue;
                }
            };
            for path in entries.flatten() {
                if path.is_file() {
                    matched.entry(path).or_insert_with(|| service.clone());
                }
            }
        }
        if !self.started {
            // A path with a saved position that is missing now (renamed by a rotation while
            // the agent was down, not recreated yet) still has lines in its old file.
            for path in self.saved.keys() {
                if let Some((_, service)) = self.patterns.iter().find(|(p, _)| p.matches_path(path))
                {
                    matched
                        .entry(path.clone())
                        .or_insert_with(|| service.clone());
                }
            }
        }
        let initial = !self.started;
        self.started = true;
        for (path, service) in matched {
            if self.followed.contains_key(&path) {
                continue;
            }
            // A rotated file that a glob also matches (`auth.log*`) is already being read.
            if let Ok(meta) = fs::metadata(&path) {
                let id = FileId::of(&meta);
                if self.followed.values().any(|f| f.reads(id)) {
                    continue;
                }
            }
            let saved = self.saved.remove(&path);
            let followed = self.follow(&path, service, saved, initial);
            if followed.current.is_some() || !followed.rotated.is_empty() {
                self.dirty = true;
                self.followed.insert(path, followed);
            }
        }
    }

    /// Starts following `path`: from its saved position, its end (first sight at start-up) or
    /// its start (a file that appeared while running).
    fn follow(
        &self,
        path: &Path,
        service: String,
        saved: Option<PathPositions>,
        initial: bool,
    ) -> Followed {
        let source = path.display().to_string();
        let mut f = Followed {
            service,
            source: source.clone(),
            current: None,
            rotated: Vec::new(),
            missing_since: None,
        };
        let dir = path.parent().unwrap_or_else(|| Path::new("/"));
        let opened = File::open(path).and_then(|file| {
            let meta = file.metadata()?;
            Ok((file, meta))
        });
        let Some(saved) = saved else {
            match opened {
                Ok((file, meta)) => {
                    let offset = if initial {
                        end_of_last_line(&file, meta.len(), self.options.max_line)
                    } else {
                        0
                    };
                    match Reader::open(file, offset, false, Fingerprint::default()) {
                        Ok(mut r) => {
                            refresh_fingerprint(&mut r);
                            info!(path = %source, offset, "Following a log file.");
                            f.current = Some(r);
                        }
                        Err(err) => warn!(path = %source, error = %err, "Opening failed."),
                    }
                }
                Err(err) => debug!(path = %source, error = %err, "Opening failed."),
            }
            return f;
        };
        for old in &saved.rotated {
            match find_by_id(dir, old) {
                Some(file) => push_reader(&mut f.rotated, file, old),
                None => warn!(
                    path = %source,
                    offset = old.offset,
                    "A rotated file not read to its end is gone; its remaining lines are lost."
                ),
            }
        }
        let Ok((file, meta)) = opened else {
            // Renamed away while the agent was down and not recreated yet.
            if let Some(cur) = &saved.current {
                match find_by_id(dir, cur) {
                    Some(old) => push_reader(&mut f.rotated, old, cur),
                    None => warn!(
                        path = %source,
                        "The file is gone and was not found renamed; its remaining lines are lost."
                    ),
                }
            }
            f.missing_since = Some(Instant::now());
            return f;
        };
        let id = FileId::of(&meta);
        let mut start = 0;
        let mut skipping = false;
        let mut fingerprint = Fingerprint::default();
        match &saved.current {
            Some(cur) if cur.id == id => {
                let prefix = read_prefix(&file, meta.len()).unwrap_or_default();
                if meta.len() >= cur.offset && cur.fingerprint.matches(&prefix) {
                    (start, skipping, fingerprint) = (cur.offset, cur.skipping, cur.fingerprint);
                } else {
                    info!(path = %source, "Truncated while the agent was down; reading it from its start.");
                    if let Some(copy) = find_copy(dir, path, cur, &f) {
                        push_reader(&mut f.rotated, copy, cur);
                    }
                }
            }
            Some(cur) => {
                info!(path = %source, "Rotated while the agent was down; finishing the old file, then reading the new one from its start.");
                match find_by_id(dir, cur) {
                    Some(old) => push_reader(&mut f.rotated, old, cur),
                    None => warn!(
                        path = %source,
                        offset = cur.offset,
                        "The rotated file was not found (compressed or deleted?); its remaining lines are lost."
                    ),
                }
            }
            None => {}
        }
        match Reader::open(file, start, skipping, fingerprint) {
            Ok(mut r) => {
                refresh_fingerprint(&mut r);
                info!(path = %source, offset = start, "Following a log file.");
                f.current = Some(r);
            }
            Err(err) => warn!(path = %source, error = %err, "Opening failed."),
        }
        f
    }

    /// Notices rotation and truncation of the file at `path`.
    fn check_path(&mut self, path: &Path, now: Instant) {
        let Some(f) = self.followed.get_mut(path) else {
            return;
        };
        let meta = match fs::metadata(path) {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) | Err(_) => {
                f.missing_since.get_or_insert(now);
                return;
            }
        };
        f.missing_since = None;
        let id = FileId::of(&meta);
        if f.current.as_ref().is_none_or(|cur| cur.id != id) {
            let file = match File::open(path) {
                Ok(file) => file,
                Err(err) => {
                    debug!(path = %f.source, error = %err, "Opening failed.");
                    return;
                }
            };
            let mut reader = match Reader::open(file, 0, false, Fingerprint::default()) {
                Ok(r) => r,
                Err(err) => {
                    debug!(path = %f.source, error = %err, "Opening failed.");
                    return;
                }
            };
            refresh_fingerprint(&mut reader);
            if let Some(mut old) = f.current.take() {
                debug!(path = %f.source, "Rotated (renamed); finishing the old file.");
                old.last_growth = now;
                f.rotated.push(old);
            } else {
                debug!(path = %f.source, "A new file at the path.");
            }
            f.current = Some(reader);
            self.dirty = true;
            return;
        }
        let Some(cur) = f.current.as_mut() else {
            return;
        };
        let len = match cur.file.metadata() {
            Ok(m) => m.len(),
            Err(_) => return,
        };
        if len == cur.last_len {
            return;
        }
        let prefix = read_prefix(&cur.file, len).unwrap_or_default();
        let truncated = len < cur.offset || !cur.fingerprint.matches(&prefix);
        if !truncated {
            if !cur.fingerprint.is_complete() && prefix.len() > cur.fingerprint.len as usize {
                cur.fingerprint = Fingerprint::of(&prefix);
                self.dirty = true;
            }
            return;
        }
        info!(path = %f.source, offset = cur.offset, size = len, "Truncated (copy-truncate); reading it from its start.");
        let old = cur.position();
        let last_len = cur.last_len;
        let dir = path.parent().unwrap_or_else(|| Path::new("/"));
        // Even at offset 0 (nothing read yet since the last truncation, e.g. while the sink
        // was slow) the copy holds lines not read: `find_copy` needs only a fingerprint.
        let copy = find_copy(dir, path, &old, f);
        match copy {
            Some(file) => push_reader(&mut f.rotated, file, &old),
            None if old.offset < last_len => warn!(
                path = %f.source,
                lost_at_most = last_len - old.offset,
                "Truncated before its last lines were read and no copy was found; they are lost."
            ),
            None => {}
        }
        let Some(cur) = f.current.as_mut() else {
            return;
        };
        cur.offset = 0;
        cur.skipping = false;
        cur.idle_len = None;
        cur.fingerprint = Fingerprint::default();
        cur.last_len = 0;
        refresh_fingerprint(cur);
        self.dirty = true;
    }
}

/// A reader at `pos`'s offset on `file`, appended to `readers`.
fn push_reader(readers: &mut Vec<Reader>, file: File, pos: &FilePosition) {
    match Reader::open(file, pos.offset, pos.skipping, pos.fingerprint) {
        Ok(r) => readers.push(r),
        Err(err) => {
            warn!(error = %err, "Opening a rotated file failed; its remaining lines are lost.")
        }
    }
}

/// Extends a reader's fingerprint to what the file has now (up to its maximum).
fn refresh_fingerprint(r: &mut Reader) {
    if r.fingerprint.is_complete() {
        return;
    }
    let len = r.file.metadata().map(|m| m.len()).unwrap_or(0);
    if let Ok(prefix) = read_prefix(&r.file, len)
        && r.fingerprint.matches(&prefix)
    {
        r.fingerprint = Fingerprint::of(&prefix);
    }
}

/// Reads new lines of one reader into its `pending` advance. `verify`: the file may be
/// truncated under us (it is the one at the path), so what was read is checked to still be
/// the file that was fingerprinted.
fn read_reader(
    reader: &mut Reader,
    finishing: bool,
    verify: bool,
    now: Instant,
    idle_limit: Duration,
    max_line: usize,
    budget: usize,
) -> io::Result<Chunk> {
    let len = reader.file.metadata()?.len();
    if len > reader.last_len {
        reader.last_growth = now;
    }
    reader.last_len = len;
    let idle = finishing && now.duration_since(reader.last_growth) >= idle_limit;
    if !idle && (len <= reader.offset || reader.idle_len == Some(len)) {
        return Ok(Chunk::default());
    }
    let chunk = read_lines(
        &reader.file,
        reader.offset,
        reader.skipping,
        budget,
        max_line,
        idle,
    )?;
    if verify {
        // Truncated and written again between the check and this read: the bytes at the
        // offset are not the continuation. Dropped; the next check sees the truncation.
        let len = reader.file.metadata()?.len();
        let prefix = read_prefix(&reader.file, len)?;
        if len < reader.offset || !reader.fingerprint.matches(&prefix) {
            reader.last_len = u64::MAX;
            return Ok(Chunk::default());
        }
    }
    let consumed = chunk.offset > reader.offset;
    reader.pending = Some(Advance {
        offset: chunk.offset,
        skipping: chunk.skipping,
        finish: idle && chunk.at_eof,
        idle_len: (!consumed).then_some(len),
    });
    Ok(chunk)
}

/// Lines read from a file.
#[derive(Debug, Default, PartialEq, Eq)]
struct Chunk {
    /// Lines, each with whether it was cut.
    lines: Vec<(String, bool)>,
    /// Offset after the consumed bytes.
    offset: u64,
    /// In a long line's skipped rest.
    skipping: bool,
    /// Bytes read.
    bytes: usize,
    /// The read filled the budget (there may be more).
    full: bool,
    /// Everything up to the end of the file was consumed.
    at_eof: bool,
}

/// Reads up to `budget` bytes from `offset` and splits them into lines (see the module
/// documentation). `flush_partial`: a last line without LF is a line (the file is finished).
fn read_lines(
    file: &File,
    offset: u64,
    skipping: bool,
    budget: usize,
    max_line: usize,
    flush_partial: bool,
) -> io::Result<Chunk> {
    let mut buf = vec![0u8; budget];
    let mut n = 0;
    while n < budget {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    buf.truncate(n);
    let full = n == budget;
    let mut chunk = Chunk {
        skipping,
        bytes: n,
        full,
        ..Chunk::default()
    };
    let mut pos = 0;
    while let Some(i) = buf[pos..].iter().position(|&b| b == b'\n') {
        let end = pos + i;
        if chunk.skipping {
            chunk.skipping = false;
        } else {
            chunk.lines.push(line_of(&buf[pos..end], max_line));
        }
        pos = end + 1;
    }
    let rest = &buf[pos..];
    if !rest.is_empty() {
        if chunk.skipping {
            pos = n;
        } else if rest.len() >= max_line {
            chunk.lines.push(line_of(rest, max_line));
            chunk.skipping = true;
            pos = n;
        } else if flush_partial && !full {
            chunk.lines.push(line_of(rest, max_line));
            pos = n;
        }
    }
    chunk.offset = offset + pos as u64;
    chunk.at_eof = !full && pos == n;
    Ok(chunk)
}

/// One line's text: a trailing CR removed, cut at `max_line` bytes (and whether it was).
fn line_of(bytes: &[u8], max_line: usize) -> (String, bool) {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    if bytes.len() > max_line {
        (
            String::from_utf8_lossy(&bytes[..max_line]).into_owned(),
            true,
        )
    } else {
        (String::from_utf8_lossy(bytes).into_owned(), false)
    }
}

/// Where reading starts on first sight: after the last LF (within the last `max_line` bytes),
/// else the end.
fn end_of_last_line(file: &File, len: u64, max_line: usize) -> u64 {
    let window = (max_line as u64).min(len);
    let mut buf = vec![0u8; usize::try_from(window).unwrap_or(0)];
    let start = len - window;
    if file.read_exact_at(&mut buf, start).is_err() {
        return len;
    }
    match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) => start + i as u64 + 1,
        None => len,
    }
}

/// The first bytes of a file of length `len` (up to [`Fingerprint::MAX_LEN`]).
fn read_prefix(file: &File, len: u64) -> io::Result<Vec<u8>> {
    let want = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .min(Fingerprint::MAX_LEN);
    let mut buf = vec![0u8; want];
    let mut n = 0;
    while n < want {
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    buf.truncate(n);
    Ok(buf)
}

/// Regular files directly in `dir` (not following symlinks).
fn files_in(dir: &Path) -> Vec<(PathBuf, fs::Metadata)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            meta.is_file().then(|| (e.path(), meta))
        })
        .collect()
}

/// The file in `dir` with `pos`'s identity, if it still starts with its fingerprint and has
/// at least its offset's bytes (otherwise the inode was reused by another file).
fn find_by_id(dir: &Path, pos: &FilePosition) -> Option<File> {
    files_in(dir).into_iter().find_map(|(path, meta)| {
        if FileId::of(&meta) != pos.id {
            return None;
        }
        let file = File::open(&path).ok()?;
        let meta = file.metadata().ok()?;
        let prefix = read_prefix(&file, meta.len()).ok()?;
        (FileId::of(&meta) == pos.id
            && meta.len() >= pos.offset
            && pos.fingerprint.matches(&prefix))
        .then_some(file)
    })
}

/// The copy a copy-truncate left of the file at `path`: another file in `dir` that starts with
/// `pos`'s fingerprint and has at least its offset's bytes (the newest such, if several).
fn find_copy(dir: &Path, path: &Path, pos: &FilePosition, f: &Followed) -> Option<File> {
    if pos.fingerprint.len == 0 {
        return None;
    }
    let mut seen = HashSet::new();
    let mut best: Option<(SystemTime, File)> = None;
    for (candidate, meta) in files_in(dir) {
        let id = FileId::of(&meta);
        if candidate == path || meta.len() < pos.offset || f.reads(id) || !seen.insert(id) {
            continue;
        }
        let Ok(file) = File::open(&candidate) else {
            continue;
        };
        let Ok(prefix) = read_prefix(&file, meta.len()) else {
            continue;
        };
        if !pos.fingerprint.matches(&prefix) {
            continue;
        }
        let modified = meta.modified().unwrap_or(UNIX_EPOCH);
        if best.as_ref().is_none_or(|(t, _)| modified > *t) {
            best = Some((modified, file));
        }
    }
    if let Some((_, _)) = &best {
        debug!(dir = %dir.display(), "Found the copy of a truncated file.");
    }
    best.map(|(_, file)| file)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        fs::File::create(&path).unwrap().write_all(bytes).unwrap();
        let file = File::open(&path).unwrap();
        (dir, file)
    }

    fn texts(chunk: &Chunk) -> Vec<&str> {
        chunk.lines.iter().map(|(l, _)| l.as_str()).collect()
    }

    #[test]
    fn splits_lines_strips_cr_and_leaves_a_partial_line() {
        let (_d, f) = file_with(b"one\r\ntwo\n\nthree\r\nfour");
        let c = read_lines(&f, 0, false, 1024, 64, false).unwrap();
        assert_eq!(texts(&c), ["one", "two", "", "three"]);
        assert_eq!(c.offset, 17);
        assert!(!c.at_eof && !c.full && !c.skipping);
        // From the offset, the partial line is still waiting ...
        let c = read_lines(&f, 17, false, 1024, 64, false).unwrap();
        assert!(c.lines.is_empty());
        assert_eq!(c.offset, 17);
        // ... unless the file is finished.
        let c = read_lines(&f, 17, false, 1024, 64, true).unwrap();
        assert_eq!(texts(&c), ["four"]);
        assert_eq!(c.offset, 21);
        assert!(c.at_eof);
    }

    #[test]
    fn a_line_split_across_reads_comes_out_whole() {
        let (_d, f) = file_with(b"alpha\nbravo charlie\ndelta\n");
        // A budget that ends in the middle of the second line.
        let c = read_lines(&f, 0, false, 10, 64, false).unwrap();
        assert_eq!(texts(&c), ["alpha"]);
        assert!(c.full);
        let c = read_lines(&f, c.offset, false, 64, 64, false).unwrap();
        assert_eq!(texts(&c), ["bravo charlie", "delta"]);
        assert!(c.at_eof);
    }

    #[test]
    fn long_lines_are_cut_and_their_rest_skipped() {
        let mut data = vec![b'x'; 50];
        data.extend_from_slice(b"\nshort\n");
        data.extend_from_slice(&[b'y'; 30]); // a long line still being written
        let (_d, f) = file_with(&data);
        let c = read_lines(&f, 0, false, 1024, 16, false).unwrap();
        assert_eq!(c.lines[0], ("x".repeat(16), true));
        assert_eq!(c.lines[1], ("short".to_owned(), false));
        assert_eq!(c.lines[2], ("y".repeat(16), true));
        assert!(c.skipping, "the rest of the y line is skipped");
        assert_eq!(c.offset, data.len() as u64);
        // Its end arrives later: skipped up to the LF, then lines again.
        let mut w = fs::OpenOptions::new()
            .append(true)
            .open(_d.path().join("f.log"))
            .unwrap();
        w.write_all(b"yyy\nnext\n").unwrap();
        let c = read_lines(&f, c.offset, true, 1024, 16, false).unwrap();
        assert_eq!(texts(&c), ["next"]);
        assert!(!c.skipping);
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let (_d, f) = file_with(b"a\xffb\n");
        let c = read_lines(&f, 0, false, 64, 64, false).unwrap();
        assert_eq!(texts(&c), ["a\u{fffd}b"]);
    }

    #[test]
    fn first_sight_starts_after_the_last_complete_line() {
        let (_d, f) = file_with(b"old 1\nold 2\npart");
        assert_eq!(end_of_last_line(&f, 16, 64), 12);
        let (_d, f) = file_with(b"no newline at all");
        assert_eq!(end_of_last_line(&f, 17, 64), 17);
        let (_d, f) = file_with(b"");
        assert_eq!(end_of_last_line(&f, 0, 64), 0);
    }
}
