//! The applied policy on disk, under `state_dir/policy/`, so that an agent restarted while the
//! manager is away enforces what it last had and resumes the stream from that revision.
//!
//! | File | What |
//! |---|---|
//! | `state` | The last snapshot applied, or a compaction of it with the deltas since ([`super::state::encode`]). Replaced atomically: temporary file, fsync, rename, fsync of the directory. |
//! | `journal` | The deltas applied since `state`, one JSON object per line, appended *before* each is written to the kernel. |
//! | `pending` | A snapshot being applied: written (atomically) before the first of its entries reaches the kernel, renamed to `state` once all have. |
//! | `auto-allowlist` | The manager's and server's addresses the agent allowlisted by itself, one per line. |
//!
//! Why the order: whatever the kernel holds from the manager must be known from these files
//! after a crash, or it would stay in the map with nobody managing it. A delta is journaled
//! before it is applied, and a snapshot is saved as `pending` before it is applied; at the next
//! start the agent re-applies `pending` (a complete state of the manager's) and removes what the
//! old state had and it has not. The journal is flushed to the page cache at once (enough for a
//! crash of the agent) and fsynced shortly after (for a crash of the machine, after which the
//! kernel maps are empty anyway).

use std::{
    collections::BTreeSet,
    fs::{self, File, OpenOptions},
    io::{self, BufRead as _, BufReader, BufWriter, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use super::{
    policy::{DataPlane, DeltaDoc, PolicyDoc, Want},
    state::{self, DecodeError, Kernel, PolicyState},
};
use crate::addr::Net;

/// Errors reading or writing the state files.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io { op, path, source }
}

/// What was found on disk.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The applied state: `state` with the journal replayed over it.
    pub applied: PolicyState,
    /// A snapshot that was being applied when the agent stopped.
    pub pending: Option<PolicyState>,
    /// The automatically allowlisted addresses.
    pub auto: BTreeSet<Net>,
    /// Deltas replayed from the journal.
    pub replayed: usize,
    /// Files that could not be read (set aside as `*.corrupt`), with why.
    pub problems: Vec<String>,
}

/// The state directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    journal: Option<File>,
    journal_lines: usize,
    unsynced: bool,
}

/// A kernel that ignores everything: replaying the journal only rebuilds the state.
struct Nowhere;

impl Kernel for Nowhere {
    fn allow(&mut self, _: Net) {}
    fn disallow(&mut self, _: Net) {}
    fn data_plane(&mut self, _: &DataPlane) {}
    fn block(&mut self, _: Net, _: Want) {}
    fn unblock(&mut self, _: Net) {}
}

impl Store {
    /// Opens (creating, mode 0700) `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("creating", dir))?;
        Ok(Self {
            dir: dir.to_owned(),
            journal: None,
            journal_lines: 0,
            unsynced: false,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Deltas appended since the state file was last written.
    pub fn journal_lines(&self) -> usize {
        self.journal_lines
    }

    /// Reads everything that is there. A file that cannot be read is set aside (renamed
    /// `*.corrupt`) and reported: the manager's next snapshot replaces it.
    pub fn load(&mut self) -> Loaded {
        let mut loaded = Loaded::default();
        let base = match self.read_state("state") {
            Ok(Some(s)) => {
                loaded.applied = s;
                true
            }
            Ok(None) => false,
            Err(err) => {
                loaded.problems.push(self.set_aside("state", &err));
                false
            }
        };
        let journal = self.path("journal");
        // Deltas mean something only over the state they followed: without it, replaying them
        // would claim a revision whose earlier entries are missing.
        match File::open(&journal) {
            Ok(_) if !base => {
                let _ = fs::remove_file(&journal);
            }
            Ok(f) => {
                loaded.replayed =
                    state::replay(&mut loaded.applied, BufReader::new(f), &mut Nowhere);
                self.journal_lines = loaded.replayed;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => loaded.problems.push(format!("{}: {e}", journal.display())),
        }
        match self.read_state("pending") {
            Ok(p) => loaded.pending = p,
            Err(err) => loaded.problems.push(self.set_aside("pending", &err)),
        }
        match fs::read_to_string(self.path("auto-allowlist")) {
            Ok(text) => {
                loaded.auto = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => loaded.problems.push(format!("auto-allowlist: {e}")),
        }
        loaded
    }

    /// The policy part of what [`Store::load`] would restore, read cheaply (the header lines
    /// and the journal, not the entries), without changing anything: for a start-up that wants
    /// the manager's data-path settings before the maps are filled.
    pub fn peek_policy(dir: &Path) -> Option<PolicyDoc> {
        let header = |name: &str| -> Option<Option<PolicyDoc>> {
            let file = File::open(dir.join(name)).ok()?;
            let mut first = String::new();
            BufReader::new(file).read_line(&mut first).ok()?;
            state::decode_header(&first).ok()
        };
        if let Some(policy) = header("pending") {
            return policy;
        }
        let mut policy = header("state")?;
        if let Ok(journal) = File::open(dir.join("journal")) {
            for line in BufReader::new(journal).lines() {
                let Ok(line) = line else { break };
                let Ok(delta) = serde_json::from_str::<DeltaDoc>(&line) else {
                    break;
                };
                if delta.op == "policy" {
                    match serde_json::from_value::<PolicyDoc>(delta.details) {
                        Ok(p) => policy = Some(p),
                        Err(_) => break,
                    }
                }
            }
        }
        policy
    }

    fn read_state(&self, name: &str) -> Result<Option<PolicyState>, DecodeError> {
        match File::open(self.path(name)) {
            Ok(f) => state::decode(BufReader::new(f)).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DecodeError::Io(e)),
        }
    }

    fn set_aside(&self, name: &str, err: &DecodeError) -> String {
        let from = self.path(name);
        let to = self.path(&format!("{name}.corrupt"));
        let moved = fs::rename(&from, &to).is_ok();
        format!(
            "{}: {err}{}",
            from.display(),
            if moved {
                format!(" (kept as {})", to.display())
            } else {
                String::new()
            }
        )
    }

    /// Replaces `name` with `state`, atomically and durably.
    fn write_atomic(&self, name: &str, state: &PolicyState) -> Result<(), StoreError> {
        let tmp = self.path(&format!("{name}.tmp"));
        let path = self.path(name);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        state::encode(state, &mut out).map_err(io_err("writing", &tmp))?;
        let file = out
            .into_inner()
            .map_err(|e| e.into_error())
            .map_err(io_err("writing", &tmp))?;
        file.sync_all().map_err(io_err("syncing", &tmp))?;
        drop(file);
        fs::rename(&tmp, &path).map_err(io_err("renaming into place", &path))?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing", &self.dir))
    }

    /// Saves a snapshot about to be applied.
    pub fn write_pending(&self, state: &PolicyState) -> Result<(), StoreError> {
        self.write_atomic("pending", state)
    }

    /// The pending snapshot is applied: it becomes the state, and the journal starts over.
    pub fn promote_pending(&mut self) -> Result<(), StoreError> {
        let pending = self.path("pending");
        let path = self.path("state");
        fs::rename(&pending, &path).map_err(io_err("renaming into place", &path))?;
        self.sync_dir()?;
        self.truncate_journal()
    }

    /// Writes `state` as the new state file and starts the journal over (compaction).
    pub fn write_state(&mut self, state: &PolicyState) -> Result<(), StoreError> {
        self.write_atomic("state", state)?;
        self.truncate_journal()
    }

    fn truncate_journal(&mut self) -> Result<(), StoreError> {
        let path = self.path("journal");
        let file = self.journal_file()?;
        file.set_len(0).map_err(io_err("truncating", &path))?;
        file.sync_all().map_err(io_err("syncing", &path))?;
        self.journal_lines = 0;
        self.unsynced = false;
        Ok(())
    }

    fn journal_file(&mut self) -> Result<&mut File, StoreError> {
        let path = self.path("journal");
        if self.journal.is_none() {
            let file = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&path)
                .map_err(io_err("opening", &path))?;
            self.journal = Some(file);
        }
        self.journal.as_mut().ok_or_else(|| StoreError::Io {
            op: "opening",
            path,
            source: io::Error::other("journal not open"),
        })
    }

    /// Appends a delta to the journal (one `write`; see the module documentation for when it
    /// reaches the disk).
    pub fn append(&mut self, delta: &DeltaDoc) -> Result<(), StoreError> {
        let mut line = serde_json::to_vec(delta).map_err(|e| StoreError::Io {
            op: "encoding a delta for",
            path: self.path("journal"),
            source: io::Error::other(e),
        })?;
        line.push(b'\n');
        let path = self.path("journal");
        self.journal_file()?
            .write_all(&line)
            .map_err(io_err("appending to", &path))?;
        self.journal_lines += 1;
        self.unsynced = true;
        Ok(())
    }

    /// A handle to fsync the journal with, if it has unsynced lines (taken: the next call
    /// returns `None` until more lines are appended).
    pub fn take_unsynced(&mut self) -> Option<File> {
        if !self.unsynced {
            return None;
        }
        self.unsynced = false;
        self.journal.as_ref().and_then(|f| f.try_clone().ok())
    }

    /// Saves the automatically allowlisted addresses.
    pub fn save_auto(&self, auto: &BTreeSet<Net>) -> Result<(), StoreError> {
        let tmp = self.path("auto-allowlist.tmp");
        let path = self.path("auto-allowlist");
        let text: String = auto.iter().map(|n| format!("{n}\n")).collect();
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_err("writing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("renaming into place", &path))?;
        self.sync_dir()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::policy::Change;

    fn snapshot(rev: i64, nets: &[&str]) -> PolicyState {
        let attackers: Vec<_> = nets
            .iter()
            .map(|n| serde_json::json!({"net": n, "action": "drop"}))
            .collect();
        PolicyState::from_snapshot(
            &serde_json::json!({"revision": rev, "policy": {"group_id": 1, "mode": "firewall",
                "redirect_model": "preserve-source"}, "attackers": attackers})
            .to_string(),
        )
        .unwrap()
        .state
    }

    fn delta(rev: i64, op: &str, net: &str) -> DeltaDoc {
        serde_json::from_value(serde_json::json!({"revision": rev, "group_id": 1, "op": op,
            "net": net, "action": "drop", "details": {}}))
        .unwrap()
    }

    #[test]
    fn state_journal_pending_and_auto_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy");
        let mut store = Store::open(&path).unwrap();
        let empty = store.load();
        assert_eq!(empty.applied, PolicyState::default());
        assert!(empty.pending.is_none() && empty.problems.is_empty());

        let mut s = snapshot(3, &["198.18.0.1/32"]);
        store.write_pending(&s).unwrap();
        store.promote_pending().unwrap();
        for (rev, op, net) in [(4, "add", "198.18.0.2/32"), (5, "remove", "198.18.0.1/32")] {
            let d = delta(rev, op, net);
            store.append(&d).unwrap();
            let change: Change = d.change(Some(1)).unwrap();
            s.apply_change(rev, &change, &mut Nowhere);
        }
        assert!(store.take_unsynced().is_some());
        assert!(store.take_unsynced().is_none());
        let auto: BTreeSet<Net> = ["127.0.0.1".parse().unwrap()].into();
        store.save_auto(&auto).unwrap();

        let mut again = Store::open(&path).unwrap();
        let loaded = again.load();
        assert_eq!(loaded.applied, s);
        assert_eq!(loaded.replayed, 2);
        assert_eq!(again.journal_lines(), 2);
        assert_eq!(loaded.auto, auto);
        assert!(loaded.pending.is_none());

        // A snapshot that was being applied is found as pending.
        let next = snapshot(9, &["198.18.0.9/32"]);
        again.write_pending(&next).unwrap();
        let loaded = Store::open(&path).unwrap().load();
        assert_eq!(loaded.pending.as_ref(), Some(&next));
        assert_eq!(loaded.applied, s);

        // Compaction: the state file holds everything, the journal is empty.
        again.promote_pending().unwrap();
        again.write_state(&next).unwrap();
        let loaded = Store::open(&path).unwrap().load();
        assert_eq!(loaded.applied, next);
        assert_eq!(loaded.replayed, 0);
        assert!(loaded.pending.is_none());
    }

    #[test]
    fn peeks_the_latest_policy() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Store::peek_policy(dir.path()), None);
        let mut store = Store::open(dir.path()).unwrap();
        store.write_state(&snapshot(1, &["198.18.0.1/32"])).unwrap();
        assert_eq!(Store::peek_policy(dir.path()).unwrap().mode, "firewall");
        let d: DeltaDoc = serde_json::from_value(serde_json::json!({"revision": 2, "group_id": 1,
            "op": "policy", "details": {"group_id": 1, "mode": "honeypot",
            "redirect_model": "preserve-source"}}))
        .unwrap();
        store.append(&d).unwrap();
        store.append(&delta(3, "add", "198.18.0.2/32")).unwrap();
        assert_eq!(Store::peek_policy(dir.path()).unwrap().mode, "honeypot");
        let mut pending = snapshot(4, &[]);
        pending.policy.as_mut().unwrap().mode = "reflect".into();
        store.write_pending(&pending).unwrap();
        assert_eq!(Store::peek_policy(dir.path()).unwrap().mode, "reflect");
    }

    #[test]
    fn a_corrupt_state_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        fs::write(
            dir.path().join("state"),
            "{\"format\":1}\n198.18.0.1 u drop 0\n",
        )
        .unwrap();
        let loaded = store.load();
        assert_eq!(loaded.applied, PolicyState::default());
        assert_eq!(loaded.problems.len(), 1);
        assert!(dir.path().join("state.corrupt").exists());
        assert!(!dir.path().join("state").exists());
    }

    #[test]
    fn files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let mut store = Store::open(&path).unwrap();
        store.write_state(&snapshot(1, &[])).unwrap();
        store.append(&delta(2, "add", "198.18.0.2/32")).unwrap();
        for name in ["state", "journal"] {
            let mode = fs::metadata(path.join(name)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{name}");
        }
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0);
    }
}
