//! Bandwidth measurement and rate limiting in 100 ms slices (the seeds'
//! `BUFFER_DELAY`).
//!
//! Each slice measures the bandwidth actually achieved, which sets the
//! switchover threshold (bandwidth x what the downtime limit leaves after
//! the fixed cost of stopping). "Achieved" means taken by the peer: bytes
//! still queued in the caller's socket buffers at the end of a slice (see
//! [`RateMeter::set_unsent`]) are not counted as sent, since a write that
//! lands in a deep send buffer completes at memory speed however slow the
//! link behind it is. A maximum bandwidth is
//! enforced as a bucket of credit that fills continuously at the limit and
//! holds at most one slice's worth: a batch may be sent while credit is
//! positive, and what it overdraws is paid back before the next one. QEMU
//! instead grants a whole slice's allowance at the start of each slice and
//! forgets overshoots, which lets short migrations run well over the limit
//! (a burst per slice) and long ones a few percent over; the bucket keeps
//! every prefix of the migration under limit x time + one batch.

use core::time::Duration;

use crate::time::Instant;

/// Length of one measurement and rate-limiting slice.
pub const SLICE: Duration = Duration::from_millis(100);

/// Shortest span a partial-slice bandwidth estimate is taken over.
const MIN_ESTIMATE: Duration = Duration::from_millis(5);

/// Slices per second.
const SLICES_PER_SEC: u64 = 1000 / SLICE.as_millis() as u64;

/// What one finished slice measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct SliceMeasurement {
    /// Bytes per millisecond achieved in the slice.
    pub bytes_per_ms: f64,
    /// Megabits per second achieved in the slice.
    pub mbps: f64,
    /// Pages per second sent in the slice.
    pub pages_per_second: u64,
    /// Bytes the peer took in the slice.
    pub bytes: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct RateMeter {
    slice_start: Instant,
    slice_bytes: u64,
    slice_pages: u64,
    /// Bytes handed out but not yet taken by the peer, as last reported.
    unsent: u64,
    /// `unsent` when the slice began.
    slice_unsent: u64,
    /// Bytes per second allowed; zero means unlimited.
    limit: u64,
    /// Bytes that may still be sent; negative after an overdraw.
    credit: i64,
    /// When `credit` was last refilled.
    refilled_at: Instant,
}

impl RateMeter {
    pub fn new(now: Instant, max_bytes_per_sec: u64) -> Self {
        RateMeter {
            slice_start: now,
            slice_bytes: 0,
            slice_pages: 0,
            unsent: 0,
            slice_unsent: 0,
            limit: max_bytes_per_sec,
            credit: 0,
            refilled_at: now,
        }
    }

    /// Changes the limit (zero: unlimited), keeping any debt.
    pub fn set_limit(&mut self, max_bytes_per_sec: u64) {
        self.limit = max_bytes_per_sec;
        self.credit = self.credit.min(self.burst());
    }

    /// Credit the bucket can hold: one slice at the limit.
    fn burst(&self) -> i64 {
        i64::try_from(self.limit / SLICES_PER_SEC).unwrap_or(i64::MAX)
    }

    /// Adds the credit earned since the last refill.
    fn refill(&mut self, now: Instant) {
        if self.limit == 0 || now <= self.refilled_at {
            return;
        }
        let ns = now.saturating_since(self.refilled_at).as_nanos();
        let earned = u128::from(self.limit) * ns / 1_000_000_000;
        if earned == 0 {
            // Too soon to earn a whole byte: keep the fraction for later
            // instead of losing it (a caller polling every few nanoseconds
            // would otherwise never earn anything).
            return;
        }
        let earned = i64::try_from(earned).unwrap_or(i64::MAX);
        self.credit = self.credit.saturating_add(earned).min(self.burst());
        self.refilled_at = now;
    }

    /// Starts the clock of both the measurement and the bucket at `now`, the
    /// start of the migration (the meter is built before the caller's
    /// clock is known).
    pub fn begin(&mut self, now: Instant) {
        self.refilled_at = now;
        self.restart(now);
    }

    /// Restarts measurement at `now` (after setup, or after a pause in
    /// sending that must not count as idle link time).
    pub fn restart(&mut self, now: Instant) {
        self.slice_start = now;
        self.slice_bytes = 0;
        self.slice_pages = 0;
        self.slice_unsent = self.unsent;
    }

    /// Bytes handed out that the peer has not taken yet (the caller's send
    /// queue): the measurement counts them once they leave it.
    pub fn set_unsent(&mut self, bytes: u64) {
        self.unsent = bytes;
    }

    /// Bytes the peer took since the slice began: what was handed out,
    /// plus what was queued at the start, minus what is queued now.
    fn slice_taken(&self) -> u64 {
        self.slice_bytes
            .saturating_add(self.slice_unsent)
            .saturating_sub(self.unsent)
    }

    pub fn record(&mut self, bytes: u64, pages: u64) {
        self.slice_bytes = self.slice_bytes.saturating_add(bytes);
        self.slice_pages = self.slice_pages.saturating_add(pages);
        if self.limit > 0 {
            self.credit = self
                .credit
                .saturating_sub(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// Counts `bytes` that were not sent in the measurement only (not in
    /// the limit's bucket): a run of never-populated pages goes as one
    /// ZeroRun record of a few bytes, and is measured as the ZERO entries
    /// it stands for. The pass moves through it at about their pace, and
    /// its time is scan time, not link time: measured as the few bytes
    /// actually sent, an idle guest's first pass (4 GiB for a few hundred
    /// bytes) would put the bandwidth, and with it the switchover
    /// threshold, orders of magnitude low, and the stop's policy would
    /// then iterate and throttle a guest that dirties three pages.
    pub fn record_scanned(&mut self, bytes: u64) {
        self.slice_bytes = self.slice_bytes.saturating_add(bytes);
    }

    /// True when the limit forbids sending now.
    pub fn exhausted(&self) -> bool {
        self.limit > 0 && self.credit <= 0
    }

    /// When enough credit will have accrued to send again.
    pub fn next_send(&self) -> Instant {
        let owed = u128::from(self.credit.unsigned_abs()) + 1;
        let ns = (owed * 1_000_000_000).div_ceil(u128::from(self.limit.max(1)));
        self.refilled_at + core::time::Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Bandwidth so far in the open slice, in bytes per millisecond, once
    /// it has lasted long enough to mean something: the estimate a first
    /// convergence check uses before any slice has closed.
    pub fn partial_bytes_per_ms(&self, now: Instant) -> Option<f64> {
        let elapsed = now.saturating_since(self.slice_start);
        let taken = self.slice_taken();
        (elapsed >= MIN_ESTIMATE && taken > 0)
            .then(|| taken as f64 * 1e6 / elapsed.as_nanos() as f64)
    }

    /// Refills the bucket, then closes the measurement slice if it has
    /// lasted at least [`SLICE`], returning what it measured.
    pub fn tick(&mut self, now: Instant) -> Option<SliceMeasurement> {
        self.refill(now);
        let elapsed = now.saturating_since(self.slice_start);
        if elapsed < SLICE {
            return None;
        }
        let ns = elapsed.as_nanos() as f64;
        let bytes = self.slice_taken();
        let measurement = SliceMeasurement {
            bytes_per_ms: bytes as f64 * 1e6 / ns,
            mbps: bytes as f64 * 8.0 * 1e3 / ns,
            pages_per_second: (self.slice_pages as f64 * 1e9 / ns) as u64,
            bytes,
        };
        self.restart(now);
        Some(measurement)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_each_slice() {
        let mut m = RateMeter::new(Instant::ZERO, 0);
        m.record(1_000_000, 10);
        assert!(m.tick(Instant::from_millis(99)).is_none());
        let s = m.tick(Instant::from_millis(100)).expect("slice over");
        assert_eq!(s.bytes, 1_000_000);
        assert!((s.bytes_per_ms - 10_000.0).abs() < 1e-6);
        assert!((s.mbps - 80.0).abs() < 1e-9);
        assert_eq!(s.pages_per_second, 100);
        assert!(!m.exhausted(), "no limit set");
    }

    #[test]
    fn overdraws_are_paid_back_before_the_next_send() {
        // 10 MB/s: 10 bytes per microsecond.
        let mut m = RateMeter::new(Instant::ZERO, 10_000_000);
        assert!(m.exhausted(), "the bucket starts empty");
        m.tick(Instant::from_millis(50));
        assert!(!m.exhausted());
        m.record(1_500_000, 0);
        assert!(m.exhausted());
        // 500 kB of credit earned in 50 ms, 1.5 MB spent: 1 MB owed, 100 ms.
        assert_eq!(m.next_send(), Instant::from_nanos(150_000_100));
        // Rounded up: at the instant returned, a whole byte has been earned.
        m.tick(Instant::from_millis(150));
        assert!(m.exhausted(), "exactly paid back, not yet positive");
        m.tick(m.next_send());
        assert!(!m.exhausted());
    }

    #[test]
    fn idle_time_banks_at_most_one_slice() {
        let mut m = RateMeter::new(Instant::ZERO, 10_000_000);
        m.tick(Instant::from_millis(5_000));
        m.record(1_000_000, 0);
        assert!(m.exhausted(), "only one slice's worth is ever banked");
    }

    #[test]
    fn a_partial_slice_gives_an_early_estimate() {
        let mut m = RateMeter::new(Instant::ZERO, 0);
        m.record(1_000_000, 0);
        assert_eq!(
            m.partial_bytes_per_ms(Instant::from_millis(4)),
            None,
            "too short to trust"
        );
        assert_eq!(
            m.partial_bytes_per_ms(Instant::from_millis(10)),
            Some(100_000.0)
        );
    }

    #[test]
    fn bytes_still_queued_are_not_counted_as_sent() {
        // 10 MB handed out in a slice, 8 MB of it still in the send queue
        // at the end: the link carried 2 MB, not 10.
        let mut m = RateMeter::new(Instant::ZERO, 0);
        m.record(10_000_000, 0);
        m.set_unsent(8_000_000);
        assert_eq!(
            m.partial_bytes_per_ms(Instant::from_millis(50)),
            Some(40_000.0)
        );
        let s = m.tick(Instant::from_millis(100)).expect("slice over");
        assert_eq!(s.bytes, 2_000_000);
        assert!((s.bytes_per_ms - 20_000.0).abs() < 1e-6);
        // Next slice: nothing new handed out, the queue drains by 5 MB.
        m.set_unsent(3_000_000);
        let s = m.tick(Instant::from_millis(200)).expect("slice over");
        assert_eq!(s.bytes, 5_000_000);
    }

    #[test]
    fn scanned_bytes_are_measured_but_not_charged() {
        let mut m = RateMeter::new(Instant::ZERO, 10_000_000);
        m.tick(Instant::from_millis(100));
        m.record_scanned(u64::MAX / 2);
        assert!(!m.exhausted(), "nothing was sent");
        m.record(1_000_000, 0);
        let s = m.tick(Instant::from_millis(200)).expect("slice over");
        assert_eq!(s.bytes, u64::MAX / 2 + 1_000_000);
    }

    #[test]
    fn unlimited_never_exhausts() {
        let mut m = RateMeter::new(Instant::ZERO, 0);
        m.record(u64::MAX / 2, 0);
        assert!(!m.exhausted());
    }
}
