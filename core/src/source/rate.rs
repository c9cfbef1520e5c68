//! Bandwidth measurement and rate limiting in 100 ms slices (the seeds'
//! `BUFFER_DELAY`).
//!
//! Each slice measures the bandwidth actually achieved, which sets the
//! switchover threshold (bandwidth x downtime limit). When a maximum
//! bandwidth is set, each slice may send a tenth of it; bytes sent beyond a
//! slice's allowance are charged to the next slice, so the rate over a whole
//! migration stays at the limit even though page batches do not divide it
//! evenly (QEMU forgets the overshoot, which lets it run a few percent fast).

use core::time::Duration;

use crate::time::Instant;

/// Length of one measurement and rate-limiting slice.
pub const SLICE: Duration = Duration::from_millis(100);

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
    /// Bytes sent in the slice.
    pub bytes: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct RateMeter {
    slice_start: Instant,
    slice_bytes: u64,
    slice_pages: u64,
    /// Bytes per slice allowed; zero means unlimited.
    allowance: u64,
    /// Bytes still allowed in this slice; negative after an overshoot.
    credit: i64,
}

impl RateMeter {
    pub fn new(now: Instant, max_bytes_per_sec: u64) -> Self {
        let mut meter = RateMeter {
            slice_start: now,
            slice_bytes: 0,
            slice_pages: 0,
            allowance: 0,
            credit: 0,
        };
        meter.set_limit(max_bytes_per_sec);
        meter
    }

    /// Changes the limit (zero: unlimited), starting with a full allowance.
    pub fn set_limit(&mut self, max_bytes_per_sec: u64) {
        self.allowance = max_bytes_per_sec / SLICES_PER_SEC;
        self.credit = i64::try_from(self.allowance).unwrap_or(i64::MAX);
    }

    /// Restarts measurement at `now` (after setup, or after a pause in
    /// sending that must not count as idle link time).
    pub fn restart(&mut self, now: Instant) {
        self.slice_start = now;
        self.slice_bytes = 0;
        self.slice_pages = 0;
    }

    pub fn record(&mut self, bytes: u64, pages: u64) {
        self.slice_bytes = self.slice_bytes.saturating_add(bytes);
        self.slice_pages = self.slice_pages.saturating_add(pages);
        if self.allowance > 0 {
            self.credit = self
                .credit
                .saturating_sub(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// True when the limit forbids sending more in this slice.
    pub fn exhausted(&self) -> bool {
        self.allowance > 0 && self.credit <= 0
    }

    /// When the current slice ends.
    pub fn slice_end(&self) -> Instant {
        self.slice_start + SLICE
    }

    /// Closes the slice if it has lasted at least [`SLICE`], returning what
    /// it measured, and opens the next one.
    pub fn tick(&mut self, now: Instant) -> Option<SliceMeasurement> {
        let elapsed = now.saturating_since(self.slice_start);
        if elapsed < SLICE {
            return None;
        }
        let ns = elapsed.as_nanos() as f64;
        let bytes = self.slice_bytes;
        let measurement = SliceMeasurement {
            bytes_per_ms: bytes as f64 * 1e6 / ns,
            mbps: bytes as f64 * 8.0 * 1e3 / ns,
            pages_per_second: (self.slice_pages as f64 * 1e9 / ns) as u64,
            bytes,
        };
        self.restart(now);
        if self.allowance > 0 {
            let allowance = i64::try_from(self.allowance).unwrap_or(i64::MAX);
            self.credit = self.credit.saturating_add(allowance).min(allowance);
        }
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
    fn overshoot_is_charged_to_the_next_slice() {
        // 10 MB/s: 1 MB per slice.
        let mut m = RateMeter::new(Instant::ZERO, 10_000_000);
        m.record(1_500_000, 0);
        assert!(m.exhausted());
        m.tick(Instant::from_millis(100));
        // Half a slice of debt was carried: 0.5 MB left in this slice.
        assert!(!m.exhausted());
        m.record(500_000, 0);
        assert!(m.exhausted());
        m.tick(Instant::from_millis(200));
        assert!(!m.exhausted());
    }

    #[test]
    fn idle_slices_do_not_bank_credit() {
        let mut m = RateMeter::new(Instant::ZERO, 10_000_000);
        for i in 1..10 {
            m.tick(Instant::from_millis(100 * i));
        }
        m.record(1_000_000, 0);
        assert!(
            m.exhausted(),
            "only one slice's allowance is ever available"
        );
    }
}
