//! [`Applier`]: the one writer of the manager's policy into the kernel maps. It holds the
//! applied state ([`PolicyState`]), the state files ([`Store`]), the allowlist entries it manages,
//! and its own handles on the pinned maps (opened from their pins, so it shares nothing with the
//! rest of the agent but the kernel objects themselves).
//!
//! What it manages, and so may change or remove: the attacker entries the manager sent, the
//! allowlist entries of the policy and of the automatic allowlist (the manager's and the
//! server's addresses), the sandbox targets, the honeypot ports and the `CONFIG` entry. What it
//! never touches: attacker and allowlist entries added with the CLI, and the configuration
//! file's allowlist (kept even when the manager's allowlist drops an entry it has too).
//!
//! Order of writes for any change: allowlist additions, data-path settings (targets and ports
//! before `CONFIG`, as at start-up), attacker writes, attacker removals, allowlist removals. An
//! address is never less protected in between than before and after.

use std::{
    collections::BTreeSet,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use agent_common::{AttackerEntry, Mode};
use tracing::{error, info, warn};

use super::{
    metric as m,
    policy::{Change, DataPlane, DeltaDoc, PolicyError, Want},
    state::{self, Kernel, ParsedSnapshot, PolicyState},
    store::{Store, StoreError},
};
use crate::{
    addr::Net,
    clock,
    maps::{Maps, MapsError},
};

/// Errors applying an update.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The state files could not be written; nothing was applied.
    #[error("saving the policy state")]
    Store(#[from] StoreError),
    /// A delta cannot be applied; a snapshot is needed.
    #[error("a delta the agent cannot apply")]
    Delta(#[source] PolicyError),
}

/// How many map-write failures of one update are logged one by one.
const LOG_FAILURES: usize = 5;

/// The [`Kernel`] of the real maps: expiries converted to `CLOCK_BOOTTIME`, "not found" on
/// removal ignored, other failures logged (the first few) and counted, never fatal: one entry
/// the kernel refuses (a full map) must not stop the others.
struct MapsKernel<'a> {
    maps: &'a mut Maps,
    /// Wall-clock now, Unix nanoseconds.
    wall_now: i64,
    /// `CLOCK_BOOTTIME` now, nanoseconds.
    boot_now: u64,
    failures: usize,
}

impl<'a> MapsKernel<'a> {
    fn new(maps: &'a mut Maps) -> Self {
        Self {
            maps,
            wall_now: wall_now_ns(),
            boot_now: clock::boottime_ns(),
            failures: 0,
        }
    }

    fn fail(&mut self, what: &str, net: Option<Net>, err: &MapsError) {
        self.failures += 1;
        if self.failures <= LOG_FAILURES {
            match net {
                Some(net) => warn!(%net, error = %err, "{what} failed."),
                None => warn!(error = %err, "{what} failed."),
            }
        }
    }

    /// The kernel's expiry for a wall-clock one: boottime now plus what is left of it.
    fn boot_expiry(&self, expires: i64) -> u64 {
        if expires == 0 {
            return 0;
        }
        let left = u64::try_from(expires.saturating_sub(self.wall_now)).unwrap_or(0);
        self.boot_now.saturating_add(left).max(1)
    }
}

impl Kernel for MapsKernel<'_> {
    fn allow(&mut self, net: Net) {
        if let Err(err) = self.maps.allow(net) {
            self.fail("Allowlisting", Some(net), &err);
        }
    }

    fn disallow(&mut self, net: Net) {
        match self.maps.disallow(net) {
            Ok(()) | Err(MapsError::NotFound { .. }) => {}
            Err(err) => self.fail("Removing an allowlist entry", Some(net), &err),
        }
    }

    fn data_plane(&mut self, dp: &DataPlane) {
        // Targets and ports first: a mode that needs them must find them in place.
        if let Err(err) = self.maps.replace_targets(&dp.targets) {
            self.fail("Writing the sandbox targets", None, &err);
        }
        if let Err(err) = self.maps.replace_allow_ports(&dp.allow_ports) {
            self.fail("Writing the honeypot ports", None, &err);
        }
        if let Err(err) = self.maps.set_config(&dp.config) {
            self.fail("Writing the data-path configuration", None, &err);
        }
    }

    fn block(&mut self, net: Net, want: Want) {
        if !want.installs(self.wall_now) {
            return self.unblock(net);
        }
        let entry = AttackerEntry::new(want.action, self.boot_expiry(want.expires));
        if let Err(err) = self.maps.block(net, entry) {
            self.fail("Writing an attacker entry", Some(net), &err);
        }
    }

    fn unblock(&mut self, net: Net) {
        match self.maps.unblock(net) {
            Ok(()) | Err(MapsError::NotFound { .. }) => {}
            Err(err) => self.fail("Removing an attacker entry", Some(net), &err),
        }
    }
}

/// Wall-clock now in Unix nanoseconds.
fn wall_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// What applying a delta did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeltaOutcome {
    /// Applied.
    Applied,
    /// Already applied (a revision at or below ours): skipped.
    Stale,
}

/// The policy writer.
pub struct Applier {
    maps: Maps,
    store: Store,
    state: PolicyState,
    /// The configuration file's allowlist: never removed by the sync.
    protected: BTreeSet<Net>,
    /// The automatic allowlist (the manager's and the server's addresses).
    auto: BTreeSet<Net>,
    /// The allowlist entries this applier has put in the kernel (policy and automatic).
    allowlisted: BTreeSet<Net>,
}

impl Applier {
    /// An applier over `maps` and `store`; `protected` is the configuration file's allowlist.
    /// Nothing is applied until [`Applier::restore`].
    pub fn new(maps: Maps, store: Store, protected: BTreeSet<Net>) -> Self {
        Self {
            maps,
            store,
            state: PolicyState::default(),
            protected,
            auto: BTreeSet::new(),
            allowlisted: BTreeSet::new(),
        }
    }

    /// The last revision applied.
    pub fn revision(&self) -> Option<i64> {
        self.state.revision
    }

    /// How many attacker networks the manager's policy holds.
    pub fn entries(&self) -> usize {
        self.state.entries()
    }

    /// The mode of the applied policy, if any.
    pub fn mode(&self) -> Option<Mode> {
        let p = self.state.policy.as_ref()?;
        p.data_plane().ok().map(|dp| dp.mode())
    }

    fn wanted_allowlist(&self, state: &PolicyState) -> BTreeSet<Net> {
        let mut want = state.allowlist();
        want.extend(self.auto.iter().copied());
        want
    }

    fn publish(&self) {
        if let Some(rev) = self.state.revision {
            metrics::gauge!(m::POLICY_REVISION).set(rev as f64);
        }
        metrics::gauge!(m::ATTACKER_ENTRIES).set(self.state.entries() as f64);
    }

    /// Re-applies what the state files hold, in full (the maps may have been re-created since),
    /// then removes what an interrupted snapshot had written and its state does not have.
    /// Returns the revision restored.
    pub fn restore(&mut self) -> Option<i64> {
        let started = Instant::now();
        // The data-path settings first, from the header lines alone: `run` has just written the
        // configuration file's fallback, and reading a million entries takes a while.
        if let Some(dp) = Store::peek_policy(self.store.dir()).and_then(|p| p.data_plane().ok()) {
            MapsKernel::new(&mut self.maps).data_plane(&dp);
        }
        let loaded = self.store.load();
        for problem in &loaded.problems {
            error!(
                problem,
                "A policy state file could not be read; the manager's next snapshot replaces it."
            );
        }
        self.auto = loaded.auto;
        let had_pending = loaded.pending.is_some();
        // With a pending snapshot, that is the newest complete state of the manager's; the
        // applied one only says what else may be in the kernel.
        let (target, leftover) = match loaded.pending {
            Some(pending) => (pending, Some(loaded.applied)),
            None => (loaded.applied, None),
        };
        let new_allow = self.wanted_allowlist(&target);
        let mut old_allow = new_allow.clone();
        if let Some(l) = &leftover {
            old_allow.extend(self.wanted_allowlist(l));
        }
        let order: Vec<Net> = target.attackers.keys().copied().collect();
        let data_plane = self.checked_data_plane(&target);
        let old = leftover.map(|l| l.attackers).unwrap_or_default();
        let mut k = MapsKernel::new(&mut self.maps);
        state::add_allowlist(&old_allow, &new_allow, true, &mut k);
        if let Some(dp) = &data_plane {
            k.data_plane(dp);
        }
        state::diff_attackers(&old, &target.attackers, &order, true, &mut k);
        state::remove_allowlist(&old_allow, &new_allow, &self.protected, &mut k);
        let failures = k.failures;
        self.allowlisted = new_allow;
        self.state = target;
        if had_pending && let Err(err) = self.store.promote_pending() {
            error!(error = %err, "Saving the restored policy state failed.");
        }
        self.publish();
        if self.state.revision.is_some() {
            info!(
                revision = self.state.revision,
                entries = self.state.entries(),
                replayed = loaded.replayed,
                interrupted_snapshot = had_pending,
                failures,
                took_ms = started.elapsed().as_millis() as u64,
                "Restored the last applied policy."
            );
        }
        self.state.revision
    }

    /// The data-path settings of a state's policy, or `None` (logged) when it has none or they
    /// do not pass the checks: the previous settings then stay.
    fn checked_data_plane(&self, state: &PolicyState) -> Option<DataPlane> {
        let policy = state.policy.as_ref()?;
        match policy.data_plane() {
            Ok(dp) => Some(dp),
            Err(err) => {
                error!(
                    error = %err,
                    revision = state.revision,
                    "The manager's policy has data-path settings this agent refuses; the previous ones stay."
                );
                None
            }
        }
    }

    fn log_allowlist_refusals(state: &PolicyState) {
        if let Some(policy) = &state.policy {
            for err in policy.allowlist_nets().1 {
                warn!(error = %err, "Allowlist entry from the manager refused.");
            }
        }
    }

    /// Applies a snapshot: saved as pending, diffed against the applied state, then made the
    /// state. Entries present before and after are never rewritten, let alone removed.
    pub fn apply_snapshot(&mut self, parsed: ParsedSnapshot) -> Result<(), ApplyError> {
        let started = Instant::now();
        for err in &parsed.errors {
            warn!(error = %err, "Attacker entry from the manager refused.");
        }
        if parsed.refused > parsed.errors.len() {
            warn!(
                more = parsed.refused - parsed.errors.len(),
                "More attacker entries from the manager refused."
            );
        }
        let new = parsed.state;
        self.store.write_pending(&new)?;
        Self::log_allowlist_refusals(&new);
        let new_allow = self.wanted_allowlist(&new);
        let data_plane = self.checked_data_plane(&new);
        let old_allow = self.allowlisted.clone();
        let mut k = MapsKernel::new(&mut self.maps);
        state::add_allowlist(&old_allow, &new_allow, false, &mut k);
        if let Some(dp) = &data_plane {
            k.data_plane(dp);
        }
        let (written, removed) = state::diff_attackers(
            &self.state.attackers,
            &new.attackers,
            &parsed.order,
            false,
            &mut k,
        );
        state::remove_allowlist(&old_allow, &new_allow, &self.protected, &mut k);
        let failures = k.failures;
        self.allowlisted = new_allow;
        self.state = new;
        self.store.promote_pending()?;
        let took = started.elapsed();
        metrics::histogram!(m::POLICY_APPLY_SECONDS, "kind" => "snapshot")
            .record(took.as_secs_f64());
        self.publish();
        info!(
            revision = self.state.revision,
            entries = self.state.entries(),
            written,
            removed,
            failures,
            took_ms = took.as_millis() as u64,
            "Policy snapshot applied."
        );
        Ok(())
    }

    /// Applies one delta: journaled first, then written.
    pub fn apply_delta(&mut self, delta: &DeltaDoc) -> Result<DeltaOutcome, ApplyError> {
        if self.state.revision.is_some_and(|r| delta.revision <= r) {
            return Ok(DeltaOutcome::Stale);
        }
        if self.state.revision.is_none() {
            // Deltas mean something only over a snapshot.
            return Err(ApplyError::Delta(PolicyError::Delta {
                revision: delta.revision,
                reason: "a delta before any snapshot".to_owned(),
            }));
        }
        let started = Instant::now();
        let change = delta
            .change(self.state.group())
            .map_err(ApplyError::Delta)?;
        self.store.append(delta)?;
        match &change {
            Change::Policy(policy) => {
                let next = PolicyState {
                    revision: Some(delta.revision),
                    policy: Some((**policy).clone()),
                    attackers: Default::default(),
                };
                Self::log_allowlist_refusals(&next);
                let new_allow = self.wanted_allowlist(&next);
                let data_plane = self.checked_data_plane(&next);
                let old_allow = self.allowlisted.clone();
                let mut k = MapsKernel::new(&mut self.maps);
                state::add_allowlist(&old_allow, &new_allow, false, &mut k);
                if let Some(dp) = &data_plane {
                    k.data_plane(dp);
                }
                state::remove_allowlist(&old_allow, &new_allow, &self.protected, &mut k);
                self.allowlisted = new_allow;
                info!(
                    revision = delta.revision,
                    mode = policy.mode,
                    "Policy changed."
                );
            }
            Change::Ignore(why) => {
                warn!(revision = delta.revision, why, "Policy change not applied.");
            }
            Change::Upsert { .. } | Change::Remove { .. } => {}
        }
        let mut k = MapsKernel::new(&mut self.maps);
        self.state.apply_change(delta.revision, &change, &mut k);
        metrics::histogram!(m::POLICY_APPLY_SECONDS, "kind" => "delta")
            .record(started.elapsed().as_secs_f64());
        self.publish();
        Ok(DeltaOutcome::Applied)
    }

    /// Sets the automatic allowlist (the manager's and server's addresses): added before the
    /// addresses it replaces are removed, and saved.
    pub fn set_auto(&mut self, auto: BTreeSet<Net>) -> Result<(), StoreError> {
        if auto == self.auto {
            return Ok(());
        }
        self.auto = auto;
        let new_allow = self.wanted_allowlist(&self.state);
        let old_allow = self.allowlisted.clone();
        let mut k = MapsKernel::new(&mut self.maps);
        state::add_allowlist(&old_allow, &new_allow, false, &mut k);
        state::remove_allowlist(&old_allow, &new_allow, &self.protected, &mut k);
        self.allowlisted = new_allow;
        info!(addresses = ?self.auto, "Allowlisted the manager's and server's addresses.");
        self.store.save_auto(&self.auto)
    }

    /// Whether the journal has grown enough to be folded into the state file.
    pub fn wants_compaction(&self) -> bool {
        self.store.journal_lines() >= 10_000 + self.state.entries() / 4
    }

    /// Folds the journal into the state file.
    pub fn compact(&mut self) -> Result<(), StoreError> {
        self.store.write_state(&self.state)
    }

    /// A handle to fsync the journal with, when it has unsynced lines.
    pub fn take_unsynced(&mut self) -> Option<std::fs::File> {
        self.store.take_unsynced()
    }
}
