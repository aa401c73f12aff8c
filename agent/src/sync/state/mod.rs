//! The policy the agent has applied, and the pure transitions from one state to the next: a
//! snapshot is *diffed* against what was applied before (never cleared and refilled, so an entry
//! present in both is never absent from the kernel for an instant), a delta changes one entry or
//! the policy. Every change reaches the kernel through the [`Kernel`] trait, so the transitions
//! are tested against a model here and run against the real maps in [`super::apply`].
//!
//! Also the state file's format ([`encode`], [`decode`]): a JSON header line (revision and
//! policy), then one line per attacker entry, `NET SCOPE ACTION EXPIRES_NS`, and a closing
//! `end COUNT` line that tells a complete file from a cut one. Text, because an operator may need
//! to read it; compact, because it may hold a million entries.

use std::{
    collections::{BTreeSet, HashMap},
    io::{self, BufRead, Write},
};

use serde::{Deserialize, Serialize};

use super::policy::{
    Change, DataPlane, DeltaDoc, Entry, PolicyDoc, PolicyError, Scope, SnapshotDoc, Want,
    parse_action, parse_entry,
};
use crate::addr::Net;

/// Where changes go: the kernel maps, or a model in tests. Implementations decide what a failed
/// write means (the real one logs and counts it: one refused entry must not stop the rest).
pub trait Kernel {
    /// Adds a managed allowlist entry.
    fn allow(&mut self, net: Net);
    /// Removes a managed allowlist entry.
    fn disallow(&mut self, net: Net);
    /// Writes the data-path settings (targets and ports before the `CONFIG` entry).
    fn data_plane(&mut self, dp: &DataPlane);
    /// Makes the attacker entry for `net` what `want` says (absent if it does not
    /// [`Want::installs`]).
    fn block(&mut self, net: Net, want: Want);
    /// Removes the attacker entry for `net`, if present.
    fn unblock(&mut self, net: Net);
}

/// One entry of the manager's, with the row it comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scoped {
    /// Action and expiry.
    pub want: Want,
    /// Whose row.
    pub scope: Scope,
}

/// The manager's entries for one network: one, or two when both the agent's group and every
/// group have a row for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slots {
    first: Scoped,
    second: Option<Scoped>,
}

impl Slots {
    fn one(s: Scoped) -> Self {
        Self {
            first: s,
            second: None,
        }
    }

    /// What the kernel holds for the network: the agent's own group's entry if there is one
    /// (the more specific decision), otherwise the one set last.
    pub fn effective(&self) -> Want {
        match self.second {
            None => self.first.want,
            Some(second) if self.first.scope == Scope::Group && second.scope != Scope::Group => {
                self.first.want
            }
            Some(second) => second.want,
        }
    }

    /// Both entries, first one first.
    pub fn iter(&self) -> impl Iterator<Item = Scoped> {
        std::iter::once(self.first).chain(self.second)
    }

    /// Sets the entry of `s.scope`. An entry from a snapshot ([`Scope::Unknown`]) is taken to
    /// be the same row when it is the only candidate: a delta for a network almost always
    /// changes the row the snapshot listed, and guessing so never leaves an entry behind that
    /// the manager has removed.
    fn upsert(&mut self, s: Scoped) {
        if self.first.scope == s.scope {
            self.first = s;
        } else if let Some(second) = self.second.as_mut().filter(|x| x.scope == s.scope) {
            *second = s;
        } else if self.first.scope == Scope::Unknown
            && self.second.is_none_or(|x| x.scope != Scope::Unknown)
        {
            self.first = s;
        } else if let Some(second) = self.second.as_mut().filter(|x| x.scope == Scope::Unknown) {
            *second = s;
        } else if self.second.is_none() {
            self.second = Some(s);
        } else {
            // Both slots hold the other two scopes: cannot happen (three scopes, and Unknown
            // was handled); keep the newest.
            self.second = Some(s);
        }
    }

    /// Removes the entry of `scope` (or one of unknown scope); returns what is left.
    fn remove(self, scope: Scope) -> Option<Self> {
        let matches = |x: &Scoped| x.scope == scope;
        let unknown = |x: &Scoped| x.scope == Scope::Unknown;
        let drop_first = matches(&self.first)
            || (!self.second.as_ref().is_some_and(matches) && unknown(&self.first));
        let drop_second = !drop_first
            && self
                .second
                .as_ref()
                .is_some_and(|x| matches(x) || unknown(x));
        match (drop_first, drop_second, self.second) {
            (true, _, None) => None,
            (true, _, Some(second)) => Some(Self::one(second)),
            (false, true, _) => Some(Self::one(self.first)),
            (false, false, _) => Some(self),
        }
    }
}

/// Everything applied from the manager.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyState {
    /// The last revision applied; `None` before the first snapshot.
    pub revision: Option<i64>,
    /// The group's policy; `None` before the first snapshot.
    pub policy: Option<PolicyDoc>,
    /// The attacker entries by network.
    pub attackers: HashMap<Net, Slots>,
}

/// A snapshot, validated: the new state, and the networks in the order the manager listed them
/// (the order they are written in).
#[derive(Debug)]
pub struct ParsedSnapshot {
    /// The state the snapshot describes.
    pub state: PolicyState,
    /// Its networks in order (a network listed twice appears twice).
    pub order: Vec<Net>,
    /// Entries refused, with why (the first few; `refused` counts them all).
    pub errors: Vec<PolicyError>,
    /// How many entries were refused.
    pub refused: usize,
}

/// How many refused entries are kept to be logged.
const KEEP_ERRORS: usize = 8;

impl PolicyState {
    /// Reads a snapshot event's data.
    ///
    /// # Errors
    ///
    /// When the JSON is not a snapshot. Refused entries are not errors: they are left out (and
    /// reported in [`ParsedSnapshot::errors`]).
    pub fn from_snapshot(data: &str) -> Result<ParsedSnapshot, serde_json::Error> {
        let doc: SnapshotDoc<'_> = serde_json::from_str(data)?;
        let mut state = PolicyState {
            revision: Some(doc.revision),
            policy: Some(doc.policy),
            attackers: HashMap::with_capacity(doc.attackers.len()),
        };
        let mut order = Vec::with_capacity(doc.attackers.len());
        let mut errors = Vec::new();
        let mut refused = 0;
        for e in &doc.attackers {
            match parse_entry(&e.net, &e.action, e.expires_at.as_deref()) {
                Ok(Entry { net, want }) => {
                    let scope = e.group_id.map_or(Scope::Unknown, Scope::of);
                    state.insert(net, Scoped { want, scope });
                    order.push(net);
                }
                Err(err) => {
                    refused += 1;
                    if errors.len() < KEEP_ERRORS {
                        errors.push(err);
                    }
                }
            }
        }
        Ok(ParsedSnapshot {
            state,
            order,
            errors,
            refused,
        })
    }

    /// Adds an entry as a snapshot lists it (a second listing of a network fills its second
    /// slot).
    fn insert(&mut self, net: Net, s: Scoped) {
        self.attackers
            .entry(net)
            .and_modify(|slots| {
                if slots.second.is_none() {
                    slots.second = Some(s);
                } else {
                    slots.upsert(s);
                }
            })
            .or_insert_with(|| Slots::one(s));
    }

    /// The agent's group, once a policy is known.
    pub fn group(&self) -> Option<i64> {
        self.policy.as_ref().map(|p| p.group_id)
    }

    /// How many networks have an entry.
    pub fn entries(&self) -> usize {
        self.attackers.len()
    }

    /// The policy's allowlist entries that pass the checks.
    pub fn allowlist(&self) -> BTreeSet<Net> {
        self.policy
            .as_ref()
            .map(|p| p.allowlist_nets().0.into_iter().collect())
            .unwrap_or_default()
    }

    /// Applies one change to the state and the kernel's attacker entries. `Change::Policy` only
    /// updates the state: the caller writes the data-path settings and diffs the allowlist (it
    /// owns the parts of the allowlist that do not come from the policy, and logs what the
    /// policy gets refused for).
    pub fn apply_change(&mut self, revision: i64, change: &Change, k: &mut impl Kernel) {
        match change {
            Change::Upsert { entry, scope } => {
                let s = Scoped {
                    want: entry.want,
                    scope: *scope,
                };
                let slots = self
                    .attackers
                    .entry(entry.net)
                    .and_modify(|slots| slots.upsert(s))
                    .or_insert_with(|| Slots::one(s));
                k.block(entry.net, slots.effective());
            }
            Change::Remove { net, scope } => {
                if let Some(slots) = self.attackers.remove(net) {
                    match slots.remove(*scope) {
                        Some(left) => {
                            let before = slots.effective();
                            let after = left.effective();
                            self.attackers.insert(*net, left);
                            if before != after {
                                k.block(*net, after);
                            }
                        }
                        None => k.unblock(*net),
                    }
                }
            }
            Change::Policy(policy) => self.policy = Some((**policy).clone()),
            Change::Ignore(_) => {}
        }
        self.revision = Some(revision);
    }
}

/// Diffs the attacker entries: writes every network of `new` (in `order`) whose effective entry
/// differs from `old`'s (every one when `full`), then removes the networks `old` has and `new`
/// has not. Writes before removals, so a change of scope never leaves a gap.
pub fn diff_attackers(
    old: &HashMap<Net, Slots>,
    new: &HashMap<Net, Slots>,
    order: &[Net],
    full: bool,
    k: &mut impl Kernel,
) -> (usize, usize) {
    let mut written = 0;
    for net in order {
        let Some(slots) = new.get(net) else { continue };
        let want = slots.effective();
        if full || old.get(net).map(Slots::effective) != Some(want) {
            k.block(*net, want);
            written += 1;
        }
    }
    let mut removed = 0;
    for net in old.keys() {
        if !new.contains_key(net) {
            k.unblock(*net);
            removed += 1;
        }
    }
    (written, removed)
}

/// The first half of an allowlist diff: adds what `new` has and `old` has not (everything when
/// `full`). Run before anything else of a change, so nobody is less protected in between.
pub fn add_allowlist(old: &BTreeSet<Net>, new: &BTreeSet<Net>, full: bool, k: &mut impl Kernel) {
    for net in new {
        if full || !old.contains(net) {
            k.allow(*net);
        }
    }
}

/// The second half: removes what `old` has and `new` has not, except the `protected` entries
/// (the configuration file's, which the agent keeps whatever the manager says). Run last.
pub fn remove_allowlist(
    old: &BTreeSet<Net>,
    new: &BTreeSet<Net>,
    protected: &BTreeSet<Net>,
    k: &mut impl Kernel,
) {
    for net in old {
        if !new.contains(net) && !protected.contains(net) {
            k.disallow(*net);
        }
    }
}

/// The state file's first line.
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    format: u32,
    revision: Option<i64>,
    policy: Option<PolicyDoc>,
}

/// The state file's format version.
const FORMAT: u32 = 1;

/// Why a state file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Reading failed.
    #[error("reading the state")]
    Io(#[from] io::Error),
    /// The header is not ours.
    #[error("the header line is not a Mirage policy state: {0}")]
    Header(String),
    /// A line is malformed.
    #[error("line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The file ends before its `end` line (cut short).
    #[error("the state ends before its `end` line")]
    Truncated,
}

/// Reads a state file's first line: the policy it holds.
pub fn decode_header(line: &str) -> Result<Option<PolicyDoc>, DecodeError> {
    let header: Header =
        serde_json::from_str(line).map_err(|e| DecodeError::Header(e.to_string()))?;
    if header.format != FORMAT {
        return Err(DecodeError::Header(format!(
            "format {} (this agent reads {FORMAT})",
            header.format
        )));
    }
    Ok(header.policy)
}

/// Writes `state` in the state file format.
pub fn encode(state: &PolicyState, out: &mut impl Write) -> io::Result<()> {
    let header = Header {
        format: FORMAT,
        revision: state.revision,
        policy: state.policy.clone(),
    };
    serde_json::to_writer(&mut *out, &header)?;
    out.write_all(b"\n")?;
    let mut n = 0usize;
    for (net, slots) in &state.attackers {
        for s in slots.iter() {
            writeln!(
                out,
                "{net} {} {} {}",
                s.scope.letter(),
                s.want.action.name(),
                s.want.expires
            )?;
            n += 1;
        }
    }
    writeln!(out, "end {n}")
}

/// Reads a state written by [`encode`].
pub fn decode(input: impl BufRead) -> Result<PolicyState, DecodeError> {
    let mut lines = input.lines();
    let first = lines.next().ok_or(DecodeError::Truncated)??;
    let header: Header =
        serde_json::from_str(&first).map_err(|e| DecodeError::Header(e.to_string()))?;
    if header.format != FORMAT {
        return Err(DecodeError::Header(format!(
            "format {} (this agent reads {FORMAT})",
            header.format
        )));
    }
    let mut state = PolicyState {
        revision: header.revision,
        policy: header.policy,
        attackers: HashMap::new(),
    };
    // Every line before `end` is one entry: `i` counts them.
    for (i, line) in lines.enumerate() {
        let line = line?;
        let bad = |reason: &str| DecodeError::Line {
            line: i + 2,
            reason: reason.to_owned(),
        };
        let mut parts = line.split(' ');
        let first = parts.next().unwrap_or_default();
        if first == "end" {
            let count: usize = parts
                .next()
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| bad("bad `end` line"))?;
            if count != i {
                return Err(bad("the entry count does not match"));
            }
            return Ok(state);
        }
        let (Some(scope), Some(action), Some(expires), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected `NET SCOPE ACTION EXPIRES`"));
        };
        let net: Net = first.parse().map_err(|_| bad("bad network"))?;
        let scope = Scope::from_letter(scope).ok_or_else(|| bad("bad scope"))?;
        let action = parse_action(action).ok_or_else(|| bad("bad action"))?;
        let expires: i64 = expires.parse().map_err(|_| bad("bad expiry"))?;
        state.insert(
            net,
            Scoped {
                want: Want { expires, action },
                scope,
            },
        );
    }
    Err(DecodeError::Truncated)
}

/// Replays journal lines (deltas, one JSON object per line) over `state`: the ones after its
/// revision, in order. A line that does not parse ends the replay: only the last line can be
/// cut short (a crash mid-write), and what follows a bad line cannot be trusted. Returns how
/// many were replayed.
pub fn replay(state: &mut PolicyState, journal: impl BufRead, k: &mut impl Kernel) -> usize {
    let mut n = 0;
    for line in journal.lines() {
        let Ok(line) = line else { break };
        let Ok(delta) = serde_json::from_str::<DeltaDoc>(&line) else {
            break;
        };
        if state.revision.is_some_and(|r| delta.revision <= r) {
            continue;
        }
        let Ok(change) = delta.change(state.group()) else {
            break;
        };
        state.apply_change(delta.revision, &change, k);
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests;
