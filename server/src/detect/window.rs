//! The sliding-window decision both counting backends share, as one pure function, so that the
//! in-memory server and any number of servers sharing PostgreSQL decide alike, whatever order
//! the matches arrive in.
//!
//! For one (rule, source): a window *ends* at a match time `E` and holds the matches with times
//! in `(E - w, E]`. `E` is a crossing when the window holds at least `threshold` matches. A
//! crossing is flagged unless a flag of the pair lies within `w` of it on either side
//! (`|F - E| < w`): a continuing attack gives one verdict per window, and a match arriving late
//! (through a slower server) cannot make a second verdict for a window already reported.
//! Only windows holding at least one *new* match are examined, so re-running the decision over
//! old matches never re-reports them.
//!
//! A rule that `requires` another (a *gate*) only counts its matches at times `t` with a gate
//! flag `G` in `(t - w, t]`.

/// A crossing to flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crossing {
    /// Window end (the crossing match's time).
    pub at: i64,
    /// Matches in the window.
    pub count: u64,
    /// Oldest match time in the window.
    pub first: i64,
}

/// Decides the new flags of one (rule, source).
///
/// - `times`: every known match time of the pair (any order), each with whether it is new;
/// - `flags`: the pair's existing flag times;
/// - `gate`: for a rule with `requires`, the required rule's flag times for the same source.
///
/// Returns the crossings to flag, oldest first.
pub fn crossings(
    times: &[(i64, bool)],
    flags: &[i64],
    threshold: u32,
    window: i64,
    gate: Option<&[i64]>,
) -> Vec<Crossing> {
    let admitted =
        |t: i64| gate.is_none_or(|g| g.iter().any(|&f| f <= t && f > t.saturating_sub(window)));
    let mut ts: Vec<(i64, bool)> = times
        .iter()
        .copied()
        .filter(|(t, _)| admitted(*t))
        .collect();
    ts.sort_unstable();
    let threshold = usize::try_from(threshold).unwrap_or(usize::MAX).max(1);
    let mut flagged: Vec<i64> = flags.to_vec();
    let mut out = Vec::new();
    let mut start = 0;
    let mut j = 0;
    while j < ts.len() {
        // The window ends at the last match with this time (equal times are one instant).
        let end_time = ts[j].0;
        while j + 1 < ts.len() && ts[j + 1].0 == end_time {
            j += 1;
        }
        let horizon = end_time.saturating_sub(window);
        while ts[start].0 <= horizon {
            start += 1;
        }
        let in_window = &ts[start..=j];
        if in_window.len() >= threshold
            && in_window.iter().any(|(_, new)| *new)
            && !flagged
                .iter()
                .any(|&f| f.abs_diff(end_time) < window.unsigned_abs())
        {
            flagged.push(end_time);
            out.push(Crossing {
                at: end_time,
                count: u64::try_from(in_window.len()).unwrap_or(u64::MAX),
                first: in_window[0].0,
            });
        }
        j += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(ts: &[i64]) -> Vec<(i64, bool)> {
        ts.iter().map(|t| (*t, true)).collect()
    }

    #[test]
    fn threshold_within_window() {
        let c = crossings(&new(&[100, 101, 102, 103]), &[], 3, 60, None);
        assert_eq!(
            c,
            vec![Crossing {
                at: 102,
                count: 3,
                first: 100
            }]
        );
        assert!(crossings(&new(&[0, 40, 80, 120]), &[], 3, 60, None).is_empty());
    }

    #[test]
    fn one_flag_per_window() {
        let times = new(&(0..200).collect::<Vec<_>>());
        let at: Vec<i64> = crossings(&times, &[], 3, 60, None)
            .iter()
            .map(|c| c.at)
            .collect();
        assert_eq!(at, vec![2, 62, 122, 182]);
    }

    #[test]
    fn order_of_arrival_does_not_matter() {
        // One server saw 100 and 102, the other later 101: same crossing as in order.
        let first = crossings(&new(&[100, 102]), &[], 3, 60, None);
        assert!(first.is_empty());
        let late = crossings(&[(100, false), (101, true), (102, false)], &[], 3, 60, None);
        assert_eq!(late.iter().map(|c| c.at).collect::<Vec<_>>(), vec![102]);
        // A late match of an already reported window changes nothing.
        let again = crossings(
            &[(100, false), (101, false), (102, false), (99, true)],
            &[102],
            3,
            60,
            None,
        );
        assert!(again.is_empty());
    }

    #[test]
    fn old_matches_alone_are_never_reexamined() {
        assert!(crossings(&[(1, false), (2, false), (3, false)], &[], 3, 60, None).is_empty());
    }

    #[test]
    fn equal_times_are_one_instant() {
        let c = crossings(&new(&[5, 5, 5]), &[], 3, 60, None);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].count, 3);
    }

    #[test]
    fn gate_admits_only_matches_after_the_prerequisite_within_the_window() {
        let times = new(&[50, 150, 5000]);
        let c = crossings(&times, &[], 1, 3600, Some(&[100]));
        assert_eq!(c.iter().map(|c| c.at).collect::<Vec<_>>(), vec![150]);
        assert!(crossings(&times, &[], 1, 3600, Some(&[])).is_empty());
    }
}
