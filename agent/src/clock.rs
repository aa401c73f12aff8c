//! The clock the kernel checks attacker expiries against.

/// `CLOCK_BOOTTIME` in nanoseconds: what `bpf_ktime_get_boot_ns` returns in the kernel, so an
/// expiry written by userspace is compared against the same clock (it keeps counting through
/// suspend, unlike `CLOCK_MONOTONIC`).
pub fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every kernel that can
    // run the program (2.6.39+), so the call cannot fail and `ts` is always written.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn boottime_advances() {
        let a = super::boottime_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::boottime_ns();
        assert!(a > 0 && b > a);
    }
}
