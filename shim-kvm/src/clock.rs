//! The monotonic clock both ends of a migration on one host agree on.
//!
//! `std::time::Instant` is monotonic but opaque: its value cannot be handed
//! to another process. Downtime is measured from the source's vCPU stop to
//! the destination's vCPU start, which on one machine are two processes, so
//! both read `CLOCK_MONOTONIC` directly and exchange raw nanoseconds.

use livemig_core::time::Instant;

/// Nanoseconds of `CLOCK_MONOTONIC`: comparable between processes of one
/// boot of one machine.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux, so the call cannot fail and only writes `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The engines' notion of now: the same monotonic clock.
pub fn now() -> Instant {
    Instant::from_nanos(monotonic_ns())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_ns_advances_with_std_clock() {
        let a = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let b = monotonic_ns();
        assert!(b - a >= 5_000_000, "{a} -> {b}");
        assert!(now().as_nanos() >= b);
    }
}
