//! The decision: allowlist → exact attacker entry → attacker range → mode default, then the
//! counters. Order and precedence are the ones DESIGN.md fixes: an allowlisted source is never
//! dropped, whatever the attacker maps say.

use agent_common::{
    Action, AttackerEntry, Counter, DataPathConfig, GlobalCounters, Mode, SourceCounters, SourceKey,
};
use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::bpf_ktime_get_boot_ns,
    maps::lpm_trie::Key,
    programs::XdpContext,
};

use crate::{
    maps::{
        ALLOW_V4, ALLOW_V6, ATTACKER_RANGES_V4, ATTACKER_RANGES_V6, ATTACKERS_V4, ATTACKERS_V6,
        CONFIG, GLOBAL_STATS, SOURCE_STATS,
    },
    parse::{L4, NotParsed, Source, parse},
};

/// This CPU's global counters: looked up once per packet, then updated in place.
struct Stats(Option<&'static mut GlobalCounters>);

impl Stats {
    #[inline(always)]
    fn get() -> Self {
        // SAFETY: index 0 of a one-entry per-CPU array; the pointer is this CPU's copy, valid for
        // the whole program run, and nothing else on this CPU touches it while we run.
        Stats(GLOBAL_STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p }))
    }

    /// Adds `n` to a counter. Per-CPU, so a plain add is race-free.
    #[inline(always)]
    fn add(&mut self, counter: Counter, n: u64) {
        if let Some(g) = self.0.as_deref_mut()
            && let Some(v) = g.counts.get_mut(counter as usize)
        {
            *v += n;
        }
    }

    /// Counts a packet and its bytes under the action it got.
    #[inline(always)]
    fn action(&mut self, action: Action, bytes: u64) {
        if let Some((packets, byte_counter)) = Counter::for_action(action) {
            self.add(packets, 1);
            self.add(byte_counter, bytes);
        }
    }
}

/// Adds a packet to the per-source counters.
#[inline(always)]
fn count_source(src: &Source, action: Action, bytes: u64, now: u64) {
    let Some(slot) = action.slot() else { return };
    let key = match src {
        Source::V4(a) => SourceKey::v4(*a),
        Source::V6(a) => SourceKey::v6(*a),
    };
    if let Some(p) = SOURCE_STATS.get_ptr_mut(key) {
        // SAFETY: this CPU's copy of an LRU per-CPU value; the index is below ACTION_SLOTS by
        // construction of `Action::slot`, and `get_mut` keeps the access bounds-checked anyway.
        let c = unsafe { &mut *p };
        if let Some(v) = c.packets.get_mut(slot) {
            *v += 1;
        }
        if let Some(v) = c.bytes.get_mut(slot) {
            *v += bytes;
        }
        c.last_seen_ns = now;
        return;
    }
    let mut c = SourceCounters {
        last_seen_ns: now,
        ..SourceCounters::default()
    };
    if let Some(v) = c.packets.get_mut(slot) {
        *v = 1;
    }
    if let Some(v) = c.bytes.get_mut(slot) {
        *v = bytes;
    }
    // BPF_NOEXIST: if another CPU inserted the key meanwhile, its entry (holding this CPU's
    // zeroed slot) stays; losing this one packet from the counters beats overwriting theirs.
    let _ = SOURCE_STATS.insert(key, c, u64::from(BPF_NOEXIST));
}

/// A live (not expired) attacker entry's action, or `None`.
#[inline(always)]
fn live(entry: Option<&AttackerEntry>, now: u64, stats: &mut Stats) -> Option<u8> {
    let e = entry?;
    // Copy out at once: the map value may be replaced while we run.
    let (action, expires_ns) = (e.action, e.expires_ns);
    if AttackerEntry::new(Action::Default, expires_ns).expired(now) {
        stats.add(Counter::Expired, 1);
        return None;
    }
    Some(action)
}

/// The attacker entry for `src`, exact entries before ranges.
#[inline(always)]
fn attacker(src: &Source, now: u64, stats: &mut Stats) -> Option<u8> {
    match src {
        Source::V4(a) => {
            // SAFETY: the value is copied out in `live` before anything else runs.
            live(unsafe { ATTACKERS_V4.get(a) }, now, stats)
                .or_else(|| live(ATTACKER_RANGES_V4.get(Key::new(32, *a)), now, stats))
        }
        Source::V6(a) => {
            // SAFETY: as above.
            live(unsafe { ATTACKERS_V6.get(a) }, now, stats)
                .or_else(|| live(ATTACKER_RANGES_V6.get(Key::new(128, *a)), now, stats))
        }
    }
}

#[inline(always)]
fn allowlisted(src: &Source) -> bool {
    match src {
        Source::V4(a) => ALLOW_V4.get(Key::new(32, *a)).is_some(),
        Source::V6(a) => ALLOW_V6.get(Key::new(128, *a)).is_some(),
    }
}

/// Resolves a stored action against the mode. An unknown stored value fails open to `Pass`.
#[inline(always)]
fn resolve(stored: u8, mode: Mode) -> Action {
    match Action::try_from(stored) {
        Ok(Action::Default) => mode.attacker_action(),
        Ok(a) => a,
        Err(_) => Action::Pass,
    }
}

/// The whole decision for one frame.
#[inline(always)]
pub fn try_redirect(ctx: &XdpContext) -> Result<u32, ()> {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let mut stats = Stats::get();
    // SAFETY: index 0 exists in a one-entry array; copied out at once.
    let config: DataPathConfig = CONFIG.get(0).copied().unwrap_or_default();
    if config.flags & DataPathConfig::ENABLED == 0 {
        stats.add(Counter::Unconfigured, 1);
        stats.action(Action::Pass, bytes);
        return Ok(xdp_action::XDP_PASS);
    }
    // An unknown mode fails open: nobody is treated as an attacker by default.
    let mode = Mode::try_from(config.mode).unwrap_or(Mode::Unreal);

    let pkt = match parse(ctx) {
        Ok(p) => p,
        Err(why) => {
            stats.add(
                match why {
                    NotParsed::NotIp => Counter::NotIp,
                    NotParsed::Malformed => Counter::ParseError,
                },
                1,
            );
            stats.action(Action::Pass, bytes);
            return Ok(xdp_action::XDP_PASS);
        }
    };
    if pkt.fragment {
        stats.add(Counter::Fragment, 1);
    }
    if pkt.l4 == L4::Malformed {
        stats.add(Counter::L4ParseError, 1);
    }

    // SAFETY: a plain helper call with no arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let action = if allowlisted(&pkt.src) {
        stats.add(Counter::Allowlisted, 1);
        Action::Pass
    } else if let Some(stored) = attacker(&pkt.src, now, &mut stats) {
        resolve(stored, mode)
    } else if mode == Mode::Honeypot {
        Action::Redirect
    } else {
        Action::Pass
    };

    // Redirect and reflect are reserved in the ABI; until their rewrite exists they fail open.
    let action = match action {
        Action::Redirect | Action::Reflect => {
            stats.add(Counter::Unsupported, 1);
            Action::Pass
        }
        a => a,
    };
    stats.action(action, bytes);
    count_source(&pkt.src, action, bytes, now);
    Ok(match action {
        Action::Drop => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    })
}
