//! Statistics in the shape of QEMU's `query-migrate`, kept by the engines.
//!
//! Field names follow QEMU's so that an operator's dashboards and scripts
//! read livemig's numbers the same way; the formulas follow the seeds'
//! `migration_update_counters` and `migration_calculate_complete`.

use core::fmt::Write as _;

use crate::digest::Verification;
use crate::status::MigrationStatus;

/// Longest error description kept; longer ones end in "..." so the cut is
/// visible, never silent.
pub const ERROR_DESC_CAPACITY: usize = 256;

/// A human-readable reason for a failure, fixed capacity so the core needs
/// no heap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorDesc(heapless::String<ERROR_DESC_CAPACITY>);

impl ErrorDesc {
    /// The description as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// True when no error has been recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Replaces the description with `args`, cutting it with a visible
    /// "..." if it does not fit.
    pub fn set(&mut self, args: core::fmt::Arguments<'_>) {
        self.0.clear();
        let mut w = Truncating {
            out: &mut self.0,
            overflowed: false,
        };
        let _ = w.write_fmt(args);
        if w.overflowed {
            while self.0.len() > ERROR_DESC_CAPACITY - 3 {
                self.0.pop();
            }
            let _ = self.0.push_str("...");
        }
    }
}

impl core::fmt::Display for ErrorDesc {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

struct Truncating<'a> {
    out: &'a mut heapless::String<ERROR_DESC_CAPACITY>,
    overflowed: bool,
}

impl core::fmt::Write for Truncating<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for c in s.chars() {
            if self.out.push(c).is_err() {
                self.overflowed = true;
                return Ok(());
            }
        }
        Ok(())
    }
}

/// An end of migration this side cannot decide alone: the end-of-migration
/// handshake (LOADED on the return path, then COMMIT on the main stream)
/// was cut between its halves, so this side does not know whether the other
/// one runs the guest. Its copy of the guest stays paused, complete, and
/// the operator chooses which copy runs by looking at the other side
/// ([`AmbiguousEnd::advice`]). The state is `failed` (QEMU's states have no
/// word for it); this is what tells such a failure from a clean one, after
/// which the source runs the guest and the destination discards its copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AmbiguousEnd {
    /// Source: it sent COMMIT, so it never resumes its copy again, but the
    /// destination's confirmation did not arrive.
    SourceCommitted,
    /// Destination: it loaded the whole stream and answered LOADED, but the
    /// source's COMMIT did not arrive (or the stream failed after it).
    DestinationLoaded,
}

impl AmbiguousEnd {
    /// A short name for reports: `committed` on the source, `loaded` on
    /// the destination (the words each side's advice refers to).
    pub const fn name(self) -> &'static str {
        match self {
            Self::SourceCommitted => "committed",
            Self::DestinationLoaded => "loaded",
        }
    }

    /// What the operator must do, in one sentence.
    pub const fn advice(self) -> &'static str {
        match self {
            Self::SourceCommitted => {
                "the end of the migration was cut after the source committed and before the \
                destination confirmed: the guest is paused here with its complete state and \
                this host will not resume it; if the destination runs the guest, or has it \
                loaded and paused (it says 'loaded': start it there), discard this copy; \
                only if the destination has no copy of the guest, resume it here"
            }
            Self::DestinationLoaded => {
                "the end of the migration was cut after this host loaded the guest and before \
                the source committed: the guest is paused here with its complete state; if \
                the source's guest is not running (it says 'committed'), start it here, \
                otherwise discard it"
            }
        }
    }
}

impl core::fmt::Display for AmbiguousEnd {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.advice())
    }
}

/// The `ram` part of `query-migrate`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RamStats {
    /// Bytes written to the main stream so far (records, headers and pages).
    pub transferred: u64,
    /// Bytes of guest memory still dirty (known to need sending).
    pub remaining: u64,
    /// Bytes of guest memory being migrated.
    pub total: u64,
    /// Pages sent as "zero" flags without data.
    pub duplicate: u64,
    /// Of the `duplicate` pages, those the source knew to be zero without
    /// reading them: never populated in its memory
    /// ([`PageReader::populated`](crate::source::PageReader::populated)).
    pub unpopulated: u64,
    /// Pages sent with their data.
    pub normal: u64,
    /// Bytes of page data sent (`normal` times the page size).
    pub normal_bytes: u64,
    /// Throughput of the last measurement slice, in megabits per second; at
    /// the end, the average over the transfer time.
    pub mbps: f64,
    /// Pages (zero or normal) sent per second over the last slice.
    pub pages_per_second: u64,
    /// Pages newly dirtied per second, measured between dirty-log syncs.
    pub dirty_pages_rate: u64,
    /// Number of dirty-log syncs performed.
    pub dirty_sync_count: u64,
    /// Pages requested by the destination in postcopy.
    pub postcopy_requests: u64,
    /// The target page size, in bytes.
    pub page_size: u64,
    /// Bytes sent over multifd channels.
    pub multifd_bytes: u64,
}

/// A snapshot of one side's migration, as `query-migrate` reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MigrationStats {
    /// Current state.
    pub status: MigrationStatus,
    /// Milliseconds from start to now (or to the end, once finished).
    pub total_time_ms: u64,
    /// Milliseconds spent before the first page was sent.
    pub setup_time_ms: u64,
    /// Milliseconds the guest was stopped, once known.
    pub downtime_ms: Option<u64>,
    /// Predicted downtime if the switchover happened now, in milliseconds.
    pub expected_downtime_ms: u64,
    /// Source: the switchover threshold, in bytes: what the link carries
    /// at the last measured bandwidth within the downtime limit less the
    /// fixed cost of a stop (zero until a bandwidth is measured). The
    /// guest is stopped once the dirty bytes plus the unsent bytes are
    /// below it; drawn beside `ram.remaining` it shows how far a
    /// migration is from converging. livemig's own (QEMU's
    /// `query-migrate` has no such field); zero on the destination.
    pub threshold_bytes: u64,
    /// Memory counters.
    pub ram: RamStats,
    /// Completed scans over the dirty memory (precopy iterations).
    pub iterations: u64,
    /// "Clear dirty log" actions issued (one KVM_CLEAR_DIRTY_LOG each).
    pub dirty_log_clears: u64,
    /// Why the migration failed, when it did.
    pub error_desc: ErrorDesc,
    /// Set when the migration failed at a point where this side cannot
    /// know whether the other runs the guest: the guest is paused here.
    pub ambiguous_end: Option<AmbiguousEnd>,
    /// Where the migration's self-check stands (see [`crate::digest`]).
    pub verification: Verification,
    /// Source: how hard and how long the guest was slowed down to make
    /// precopy converge or its stop shorter; zero on the destination.
    pub throttle: ThrottleStats,
    /// Postcopy recoveries completed (postcopy-recover -> postcopy-active):
    /// how many times a cut link paused postcopy and a new connection
    /// resumed it. livemig's own (`"postcopy-recoveries"` in JSON).
    pub postcopy_recoveries: u64,
    /// Destination: pages the postcopy preempt channel delivered first
    /// (ahead of their copy on the main stream) since the last recovery
    /// began, or since the start when there was none: after a recovery it
    /// says whether the reopened channel carried requested pages. Zero on
    /// the source. livemig's own (`"postcopy-preempt-pages"` in JSON).
    pub postcopy_preempt_pages: u64,
    /// Destination: postcopy pages whose copy arrived with another term
    /// than the source's, refused, and asked for again (the copy that
    /// checked out was installed). Zero on the source. livemig's own
    /// (`"postcopy-refetched-pages"` in JSON).
    pub postcopy_refetched: u64,
    /// Source: milliseconds the guest ran on between the decision to stop
    /// it and the destination's answer that it had applied everything
    /// sent before (or the wait's end without one); `None` when the stop
    /// came without that wait (no return path, or not stopped yet).
    /// livemig's own (`"catch-up-ms"` in JSON).
    pub catch_up_ms: Option<f64>,
}

/// What throttling cost the source guest: an operator weighs a shorter
/// stop against these.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ThrottleStats {
    /// The share of its time each vCPU is held back now, in percent
    /// (QEMU's `cpu-throttle-percentage`).
    pub percent: u8,
    /// The highest `percent` of the migration.
    pub peak_percent: u8,
    /// Milliseconds the running guest spent throttled (any percent).
    pub throttled_ms: f64,
    /// Milliseconds of each vCPU's time the throttle withheld: the
    /// throttled time weighted by its percent (a vCPU held back 90 % for
    /// 10 ms lost 9 ms of guest time).
    pub taken_ms: f64,
}

/// The `pct`-th percentile of the ascending `sorted` samples by the
/// nearest-rank method: the sample of rank ⌈`pct` / 100 × n⌉ (at least 1),
/// that is the smallest sample with at least `pct` % of all samples at or
/// below it. Always one of the samples, never an interpolation; `None`
/// without samples, and a `pct` above 100 is taken as 100. The one
/// percentile definition of livemig (postcopy fault latencies use it).
pub fn nearest_rank(sorted: &[u64], pct: u8) -> Option<u64> {
    let pct = usize::from(pct.min(100));
    let rank = (sorted.len() * pct).div_ceil(100).max(1);
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_picks_a_sample_at_the_rank() {
        assert_eq!(nearest_rank(&[], 50), None);
        assert_eq!(nearest_rank(&[7], 0), Some(7));
        assert_eq!(nearest_rank(&[7], 99), Some(7));
        let v: [u64; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        assert_eq!(nearest_rank(&v, 50), Some(5));
        assert_eq!(nearest_rank(&v, 51), Some(6));
        assert_eq!(nearest_rank(&v, 99), Some(10));
        assert_eq!(nearest_rank(&v, 100), Some(10));
        assert_eq!(nearest_rank(&v, 200), Some(10));
        assert_eq!(nearest_rank(&v, 0), Some(1));
    }
    use std::string::String;

    #[test]
    fn long_error_descriptions_are_cut_visibly() {
        let mut d = ErrorDesc::default();
        let long: String = core::iter::repeat_n('x', 400).collect();
        d.set(format_args!("link cut: {long}"));
        assert_eq!(d.as_str().len(), ERROR_DESC_CAPACITY);
        assert!(d.as_str().ends_with("..."));
        d.set(format_args!("short {}", 1));
        assert_eq!(d.as_str(), "short 1");
    }
}
