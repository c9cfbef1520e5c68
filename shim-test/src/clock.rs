//! Simulated time.
//!
//! Nothing in livemig-sim reads the wall clock: a migration of a 4 GiB guest
//! that would take seconds on a real link runs in milliseconds of wall time,
//! and the same seed always produces the same event order. Time is a plain
//! count of nanoseconds since the start of the simulation, owned by the test
//! harness and passed by value (`now_ns`) into the link, the workload and the
//! engines, the same way the sans-IO core receives `now`.

/// A simulated monotonic clock counting nanoseconds from zero.
///
/// It is `Copy` so a harness can hand snapshots around freely; the one
/// authoritative instance is the one the harness advances. It never goes
/// backwards: [`SimClock::advance_to`] with a past instant is a no-op, which
/// lets a harness jump to "the next event, or now if that is already past"
/// without checking.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SimClock {
    now_ns: u64,
}

impl SimClock {
    /// A clock at time zero.
    pub const fn new() -> Self {
        SimClock { now_ns: 0 }
    }

    /// A clock starting at `now_ns`, for tests that want a non-zero origin
    /// (catches code that mistakes "time zero" for "never").
    pub const fn starting_at(now_ns: u64) -> Self {
        SimClock { now_ns }
    }

    /// The current simulated time in nanoseconds.
    pub const fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// The current simulated time in whole milliseconds, for engines whose
    /// parameters (downtime limit, rate-limit slice) are in milliseconds.
    pub const fn now_ms(&self) -> u64 {
        self.now_ns / 1_000_000
    }

    /// Moves time forward by `ns` and returns the new time. Saturates at
    /// `u64::MAX` (585 years) rather than wrapping back to the past.
    pub fn advance(&mut self, ns: u64) -> u64 {
        self.now_ns = self.now_ns.saturating_add(ns);
        self.now_ns
    }

    /// Moves time forward to `t_ns` if that is later than now, and returns
    /// the (possibly unchanged) current time. Never moves backwards.
    pub fn advance_to(&mut self, t_ns: u64) -> u64 {
        self.now_ns = self.now_ns.max(t_ns);
        self.now_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_zero_and_advances() {
        let mut c = SimClock::new();
        assert_eq!(c.now_ns(), 0);
        assert_eq!(c.advance(1_500_000), 1_500_000);
        assert_eq!(c.now_ms(), 1);
        assert_eq!(c.advance(0), 1_500_000);
    }

    #[test]
    fn advance_to_never_goes_backwards() {
        let mut c = SimClock::starting_at(10);
        assert_eq!(c.advance_to(5), 10);
        assert_eq!(c.advance_to(10), 10);
        assert_eq!(c.advance_to(42), 42);
        assert_eq!(c.now_ns(), 42);
    }

    #[test]
    fn advance_saturates() {
        let mut c = SimClock::starting_at(u64::MAX - 1);
        assert_eq!(c.advance(10), u64::MAX);
    }

    #[test]
    fn copies_are_snapshots() {
        let mut c = SimClock::new();
        let snap = c;
        c.advance(7);
        assert_eq!(snap.now_ns(), 0);
        assert_eq!(c.now_ns(), 7);
    }
}
