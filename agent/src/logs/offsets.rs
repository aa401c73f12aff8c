//! Where the collectors are in their sources, persisted so that a restart neither re-reads nor
//! skips anything.
//!
//! A log file is known by its identity, `(dev, inode)`, not its path: rotation by rename gives
//! the path a new inode while the old one lives on under another name. The identity alone is
//! not enough either: a copy-truncate keeps the inode and starts its content over, and a deleted
//! file's inode number is soon reused. So each position also carries a [`Fingerprint`] of the
//! file's first bytes (up to [`Fingerprint::MAX_LEN`]): if the file no longer starts with them,
//! its content is not the one the offset was counted in.
//!
//! State files are JSON, written atomically (a temporary file, `fsync`, `rename`, directory
//! `fsync`): after a crash one finds either the old or the new state, never a torn one. A
//! collector saves only after [`Sink::send`](super::Sink::send) returned, so the worst a crash
//! can do is have the lines of the last batch queued twice (queued, then the crash before the
//! save), never lost.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Errors reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum OffsetsError {
    /// A file operation failed.
    #[error("{op} {}", .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not a state file of this version (it was edited, or written by something
    /// else).
    #[error("{} is not a valid state file", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> OffsetsError + 'a {
    move |source| OffsetsError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A file's identity: device and inode numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileId {
    /// The identity of the file `meta` describes.
    pub fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// A hash of a file's first `len` bytes (FNV-1a, 64 bits: stable across builds, unlike std's
/// hasher; this detects replaced content, it is no defence against someone forging a file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Fingerprint {
    /// How many bytes it covers (0 for an empty file).
    pub len: u32,
    /// FNV-1a of those bytes.
    pub hash: u64,
}

impl Fingerprint {
    /// Most bytes a fingerprint covers. Log lines start with a timestamp, so this much of a new
    /// file's start never matches an old one's.
    pub const MAX_LEN: usize = 256;

    /// The fingerprint of `prefix` (at most [`Self::MAX_LEN`] bytes of it).
    pub fn of(prefix: &[u8]) -> Self {
        let prefix = &prefix[..prefix.len().min(Self::MAX_LEN)];
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in prefix {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        Self {
            len: u32::try_from(prefix.len()).unwrap_or(u32::MAX),
            hash,
        }
    }

    /// Whether a file whose first bytes are `prefix` (read up to [`Self::MAX_LEN`]) still
    /// starts with the bytes this was taken of.
    pub fn matches(&self, prefix: &[u8]) -> bool {
        let len = self.len as usize;
        // Covering nothing (an empty file, or not taken yet), it says nothing.
        len == 0 || (prefix.len() >= len && Self::of(&prefix[..len]) == *self)
    }

    /// Whether it covers as much as it ever will.
    pub fn is_complete(&self) -> bool {
        self.len as usize >= Self::MAX_LEN
    }
}

/// Where a collector is in one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePosition {
    /// The file's identity.
    pub id: FileId,
    /// Bytes consumed: the end of the last line shipped.
    pub offset: u64,
    /// The file's first bytes when it was read.
    pub fingerprint: Fingerprint,
    /// In the middle of a line longer than the limit, whose first part was shipped: the rest,
    /// up to its newline, is skipped.
    #[serde(default)]
    pub skipping: bool,
}

/// Where the files collector is for one configured path: the file there now, and older files
/// that were there before (renamed by rotation) and still have lines to read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathPositions {
    /// The file at the path.
    #[serde(default)]
    pub current: Option<FilePosition>,
    /// Rotated files not yet read to their end, oldest first.
    #[serde(default)]
    pub rotated: Vec<FilePosition>,
}

/// The files collector's state: per path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOffsets {
    /// Positions per path.
    pub paths: BTreeMap<PathBuf, PathPositions>,
}

/// Cursors of the journal collector, per source key (service and units).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalCursors {
    /// `__CURSOR` of the last shipped entry, per key.
    pub cursors: BTreeMap<String, String>,
}

/// Reads a state file; a missing one is the default (nothing read yet).
///
/// # Errors
///
/// If the file cannot be read or is not valid JSON of that shape.
pub fn load<T: DeserializeOwned + Default>(path: &Path) -> Result<T, OffsetsError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| OffsetsError::Parse {
            path: path.to_owned(),
            source,
        }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(T::default()),
        Err(err) => Err(io_err("reading", path)(err)),
    }
}

/// Writes a state file atomically and durably (temporary file, `fsync`, `rename`, directory
/// `fsync`), creating its directory (mode 0700) if needed.
///
/// # Errors
///
/// If any step fails; the previous state is then still in place.
pub fn save<T: Serialize>(path: &Path, state: &T) -> Result<(), OffsetsError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("creating", dir))?;
    let bytes = serde_json::to_vec(state).map_err(|source| OffsetsError::Parse {
        path: path.to_owned(),
        source,
    })?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_data())
        .map_err(io_err("writing", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_covers_a_prefix_and_grows() {
        let short = Fingerprint::of(b"abc");
        assert_eq!(short.len, 3);
        assert!(short.matches(b"abcdef"));
        assert!(!short.matches(b"abx"));
        assert!(!short.matches(b"ab"), "a shorter file is another file");
        assert!(Fingerprint::default().matches(b""));
        let long = Fingerprint::of(&[7u8; 1000]);
        assert_eq!(long.len as usize, Fingerprint::MAX_LEN);
        assert!(long.is_complete());
        assert!(long.matches(&[7u8; Fingerprint::MAX_LEN]));
        // Stable across builds: a fixed value.
        assert_eq!(Fingerprint::of(b"a").hash, 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn save_and_load_round_trip_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/files.json");
        assert_eq!(load::<FileOffsets>(&path).unwrap(), FileOffsets::default());
        let mut state = FileOffsets::default();
        state.paths.insert(
            PathBuf::from("/var/log/auth.log"),
            PathPositions {
                current: Some(FilePosition {
                    id: FileId { dev: 1, ino: 2 },
                    offset: 300,
                    fingerprint: Fingerprint::of(b"x"),
                    skipping: false,
                }),
                rotated: vec![],
            },
        );
        save(&path, &state).unwrap();
        assert_eq!(load::<FileOffsets>(&path).unwrap(), state);
        assert!(!path.with_extension("json.tmp").exists());
        fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            load::<FileOffsets>(&path),
            Err(OffsetsError::Parse { .. })
        ));
    }
}
