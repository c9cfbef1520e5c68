//! The migration over time, for a VMM (or the `livemig` tool) to draw: the
//! source's statistics kept per slice of time (100 ms unless the VMM asks
//! for finer: [`SourceOptions::timeline_slice_ms`](super::SourceOptions)),
//! the instant of every dirty-log sync and every change of the throttle.
//!
//! A slice holds the bytes written in it and the dirty rate, remaining
//! bytes and switchover threshold of its last sample. The driver samples
//! at each publication (at most about 50 ms apart) and, between them,
//! after any action done in a slice not sampled yet, so a slice narrower
//! than a publication still gets its own figures; only an action that
//! blocks longer than a slice (a large final sync) leaves slices without a
//! sample, and those repeat the last figures with no bytes. Bytes are
//! counted in the slice of the sample that first saw them. Storage is
//! capped: a migration longer than [`MAX_SLICES`] slices keeps its latest
//! ones (the stop is at the end), and says how many it dropped.

use std::collections::VecDeque;
use std::num::NonZeroU16;

use livemig_core::stats::MigrationStats;

/// Default width of a slice, milliseconds
/// ([`SourceOptions::timeline_slice_ms`](super::SourceOptions)).
pub const DEFAULT_SLICE_MS: NonZeroU16 = NonZeroU16::new(100).unwrap();
/// Most slices kept: ten minutes of the default slices.
pub const MAX_SLICES: usize = 6_000;
/// Most dirty-log syncs kept.
pub const MAX_SYNCS: usize = 4_096;
/// Most throttle changes kept.
pub const MAX_THROTTLE_CHANGES: usize = 4_096;

/// One slice of the migration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slice {
    /// The slice's place from the start: it covers
    /// `index * w .. (index + 1) * w` nanoseconds after
    /// [`Timeline::start_ns`], `w` being [`Timeline::slice_ns`].
    pub index: u64,
    /// Stream bytes written in the slice (`ram.transferred`'s growth).
    pub sent_bytes: u64,
    /// The engine's dirty rate (`ram.dirty-pages-rate` times the page
    /// size), bytes per second.
    pub dirty_bytes_per_s: u64,
    /// Bytes still dirty (`ram.remaining`).
    pub remaining_bytes: u64,
    /// The switchover threshold
    /// ([`MigrationStats::threshold_bytes`]).
    pub threshold_bytes: u64,
}

/// A dirty-log sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncMark {
    /// Nanoseconds after [`Timeline::start_ns`] when the sync was done.
    pub at_ns: u64,
    /// Completed passes over the dirty memory at the sync
    /// (`iterations`).
    pub iteration: u64,
    /// The sync was made with the vCPUs stopped (the last one).
    pub stopped: bool,
}

/// A change of the throttle: from `at_ns` on the vCPUs were held back for
/// `percent` % of their time (0: not at all). Kept as instants rather than
/// per slice because a throttle lasts tens of milliseconds, less than a
/// default slice, and climbs in steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThrottleMark {
    /// Nanoseconds after [`Timeline::start_ns`] when the VMM applied it.
    pub at_ns: u64,
    /// The throttle from then on, percent.
    pub percent: u8,
}

/// The recorder, and what it recorded.
#[derive(Clone, Debug)]
pub struct Timeline {
    start_ns: u64,
    slice_ns: u64,
    slices: VecDeque<Slice>,
    syncs: VecDeque<SyncMark>,
    throttles: VecDeque<ThrottleMark>,
    transferred: u64,
    dropped_slices: u64,
    dropped_syncs: u64,
    dropped_throttles: u64,
}

impl Timeline {
    /// An empty timeline starting at `start_ns` (`CLOCK_MONOTONIC`), in
    /// slices of `slice_ms`.
    pub(crate) fn new(start_ns: u64, slice_ms: NonZeroU16) -> Self {
        Timeline {
            start_ns,
            slice_ns: u64::from(slice_ms.get()) * 1_000_000,
            slices: VecDeque::new(),
            syncs: VecDeque::new(),
            throttles: VecDeque::new(),
            transferred: 0,
            dropped_slices: 0,
            dropped_syncs: 0,
            dropped_throttles: 0,
        }
    }

    fn index(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.start_ns) / self.slice_ns
    }

    /// Whether the slice of `now_ns` has no sample yet (the driver then
    /// samples between publications).
    pub(crate) fn wants_sample(&self, now_ns: u64) -> bool {
        self.slices
            .back()
            .is_none_or(|last| last.index < self.index(now_ns))
    }

    /// Records `stats` as they stood at `now_ns`.
    pub(crate) fn sample(&mut self, now_ns: u64, stats: &MigrationStats) {
        let index = self.index(now_ns);
        let sent = stats.ram.transferred.saturating_sub(self.transferred);
        self.transferred = self.transferred.max(stats.ram.transferred);
        let figures = Slice {
            index,
            sent_bytes: 0,
            dirty_bytes_per_s: stats
                .ram
                .dirty_pages_rate
                .saturating_mul(stats.ram.page_size),
            remaining_bytes: stats.ram.remaining,
            threshold_bytes: stats.threshold_bytes,
        };
        if let Some(last) = self.slices.back_mut()
            && last.index >= index
        {
            *last = Slice {
                index: last.index,
                sent_bytes: last.sent_bytes.saturating_add(sent),
                ..figures
            };
            return;
        }
        // Slices without a publication (an action that blocked) repeat
        // the last figures; never more of them than are kept.
        let first_gap = self.slices.back().map_or(0, |s| s.index + 1);
        let gap_start = first_gap.max(index.saturating_sub(MAX_SLICES as u64));
        if let Some(&last) = self.slices.back() {
            for i in gap_start..index {
                self.push(Slice {
                    index: i,
                    sent_bytes: 0,
                    ..last
                });
            }
        }
        self.dropped_slices += gap_start - first_gap;
        self.push(Slice {
            sent_bytes: sent,
            ..figures
        });
    }

    /// Records a dirty-log sync done at `now_ns`.
    pub(crate) fn sync(&mut self, now_ns: u64, iteration: u64, stopped: bool) {
        if self.syncs.len() == MAX_SYNCS {
            self.syncs.pop_front();
            self.dropped_syncs += 1;
        }
        self.syncs.push_back(SyncMark {
            at_ns: now_ns.saturating_sub(self.start_ns),
            iteration,
            stopped,
        });
    }

    /// Records the throttle set to `percent` at `now_ns`.
    pub(crate) fn throttle(&mut self, now_ns: u64, percent: u8) {
        if self.throttles.len() == MAX_THROTTLE_CHANGES {
            self.throttles.pop_front();
            self.dropped_throttles += 1;
        }
        self.throttles.push_back(ThrottleMark {
            at_ns: now_ns.saturating_sub(self.start_ns),
            percent,
        });
    }

    fn push(&mut self, slice: Slice) {
        if self.slices.len() == MAX_SLICES {
            self.slices.pop_front();
            self.dropped_slices += 1;
        }
        self.slices.push_back(slice);
    }

    /// `CLOCK_MONOTONIC` nanoseconds when the migration started.
    pub fn start_ns(&self) -> u64 {
        self.start_ns
    }

    /// Width of a slice, nanoseconds.
    pub fn slice_ns(&self) -> u64 {
        self.slice_ns
    }

    /// The slices kept, oldest first, one per [`Timeline::slice_ns`]
    /// without gaps.
    pub fn slices(&self) -> impl ExactSizeIterator<Item = &Slice> {
        self.slices.iter()
    }

    /// The dirty-log syncs kept, oldest first.
    pub fn syncs(&self) -> impl ExactSizeIterator<Item = &SyncMark> {
        self.syncs.iter()
    }

    /// The throttle changes kept, oldest first.
    pub fn throttle_changes(&self) -> impl ExactSizeIterator<Item = &ThrottleMark> {
        self.throttles.iter()
    }

    /// Slices dropped from the front because of [`MAX_SLICES`].
    pub fn dropped_slices(&self) -> u64 {
        self.dropped_slices
    }

    /// Syncs dropped from the front because of [`MAX_SYNCS`].
    pub fn dropped_syncs(&self) -> u64 {
        self.dropped_syncs
    }

    /// Throttle changes dropped from the front because of
    /// [`MAX_THROTTLE_CHANGES`].
    pub fn dropped_throttle_changes(&self) -> u64 {
        self.dropped_throttles
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(transferred: u64, remaining: u64) -> MigrationStats {
        let mut s = MigrationStats::default();
        s.ram.transferred = transferred;
        s.ram.remaining = remaining;
        s.ram.page_size = 4096;
        s.ram.dirty_pages_rate = 10;
        s.threshold_bytes = 7;
        s
    }

    #[test]
    fn samples_are_bucketed_per_slice() {
        let mut t = Timeline::new(1_000, DEFAULT_SLICE_MS);
        t.sample(1_000 + 10_000_000, &stats(100, 50));
        t.sample(1_000 + 60_000_000, &stats(300, 40));
        t.sample(1_000 + 350_000_000, &stats(1_000, 5));
        let s: Vec<Slice> = t.slices().copied().collect();
        assert_eq!(s.len(), 4);
        assert_eq!(s.iter().map(|s| s.index).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(
            s.iter().map(|s| s.sent_bytes).collect::<Vec<_>>(),
            [300, 0, 0, 700]
        );
        assert_eq!(s[0].remaining_bytes, 40);
        assert_eq!(s[1].remaining_bytes, 40, "a gap repeats the figures");
        assert_eq!(s[3].remaining_bytes, 5);
        assert_eq!(s[3].dirty_bytes_per_s, 40_960);
        assert_eq!(s[3].threshold_bytes, 7);
        assert_eq!(t.dropped_slices(), 0);
    }

    #[test]
    fn a_narrow_slice_asks_for_a_sample_once_per_slice() {
        let mut t = Timeline::new(0, NonZeroU16::new(5).unwrap());
        assert_eq!(t.slice_ns(), 5_000_000);
        assert!(t.wants_sample(0), "an empty timeline wants its first");
        t.sample(1_000_000, &stats(10, 9));
        assert!(!t.wants_sample(4_999_999), "same slice");
        assert!(t.wants_sample(5_000_000), "the next slice");
        t.sample(12_000_000, &stats(30, 3));
        let s: Vec<Slice> = t.slices().copied().collect();
        assert_eq!(s.iter().map(|s| s.index).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(
            s.iter().map(|s| s.sent_bytes).collect::<Vec<_>>(),
            [10, 0, 20]
        );
    }

    #[test]
    fn storage_is_capped_and_keeps_the_latest() {
        let mut t = Timeline::new(0, DEFAULT_SLICE_MS);
        t.sample(0, &stats(1, 0));
        // A gap longer than the cap keeps only the last MAX_SLICES.
        let far = (MAX_SLICES as u64 + 10) * t.slice_ns();
        t.sample(far, &stats(2, 0));
        assert_eq!(t.slices().len(), MAX_SLICES);
        assert_eq!(
            t.slices().last().map(|s| s.index),
            Some(MAX_SLICES as u64 + 10)
        );
        assert_eq!(t.dropped_slices(), 11);
        for i in 0..MAX_SYNCS as u64 + 3 {
            t.sync(i, i, false);
        }
        assert_eq!(t.syncs().len(), MAX_SYNCS);
        assert_eq!(t.dropped_syncs(), 3);
        assert_eq!(t.syncs().next().map(|m| m.at_ns), Some(3));
        for i in 0..MAX_THROTTLE_CHANGES as u64 + 2 {
            t.throttle(i, 50);
        }
        assert_eq!(t.throttle_changes().len(), MAX_THROTTLE_CHANGES);
        assert_eq!(t.dropped_throttle_changes(), 2);
        assert_eq!(t.throttle_changes().next().map(|m| m.at_ns), Some(2));
    }

    #[test]
    fn throttle_changes_are_instants_after_the_start() {
        let mut t = Timeline::new(1_000, DEFAULT_SLICE_MS);
        t.throttle(5_000, 50);
        t.throttle(9_000, 99);
        t.throttle(12_000, 0);
        let marks: Vec<(u64, u8)> = t.throttle_changes().map(|m| (m.at_ns, m.percent)).collect();
        assert_eq!(marks, [(4_000, 50), (8_000, 99), (11_000, 0)]);
    }
}
