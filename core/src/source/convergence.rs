//! What the switchover decision is made from: the threshold and the
//! bandwidth it comes from, the bytes still queued and the fixed cost of a
//! stop, progress between passes, the send-queue drain wait, and the dirty
//! rate.

use core::time::Duration;

use crate::time::Instant;

/// The source's convergence bookkeeping.
pub(super) struct Convergence {
    /// Bytes handed out that the peer has not taken yet, as last reported
    /// by [`SourceEngine::handle_unsent`](super::SourceEngine::handle_unsent):
    /// a stop waits for them too.
    pub unsent_bytes: u64,
    /// The fixed part of a stop (see
    /// [`SourceEngine::handle_stop_cost`](super::SourceEngine::handle_stop_cost)).
    pub stop_cost: Duration,
    /// Smallest pending (dirty + unsent) bytes seen at the end of a pass.
    pub best_pending: u64,
    /// Passes in a row that did not improve on `best_pending`.
    pub stalled_iterations: u64,
    /// `stats.iterations` when progress was last judged (mid-pass syncs
    /// are not passes).
    pub judged_iterations: u64,
    /// When the dirty pages fit the limit and only the send queue does
    /// not: send nothing more before this instant, giving the queue time
    /// to drain (instead of spinning through empty passes).
    pub drain_until: Option<Instant>,
    /// Bytes that fit the downtime limit at the measured bandwidth.
    pub threshold_bytes: u64,
    /// The last measured bandwidth.
    pub bandwidth_bytes_per_ms: f64,
    /// Start of the current dirty-rate measurement period.
    pub dirty_period_start: Instant,
    /// Pages newly dirtied within the period.
    pub dirty_period_pages: u64,
    /// Pages newly dirtied by the sync in progress.
    pub newly_dirty_this_sync: u64,
}

impl Convergence {
    pub fn new() -> Self {
        Convergence {
            unsent_bytes: 0,
            stop_cost: Duration::ZERO,
            best_pending: u64::MAX,
            stalled_iterations: 0,
            judged_iterations: 0,
            drain_until: None,
            threshold_bytes: 0,
            bandwidth_bytes_per_ms: 0.0,
            dirty_period_start: Instant::ZERO,
            dirty_period_pages: 0,
            newly_dirty_this_sync: 0,
        }
    }
}

/// Auto-converge's throttle.
pub(super) struct Throttle {
    /// Share of time the vCPUs are held back, 0..=99.
    pub percent: u8,
    /// A new throttle was decided and not yet handed out.
    pub pending: bool,
    /// Syncs in a row in which the guest dirtied more than half of what
    /// was sent.
    pub high_dirty_rate_count: u8,
    /// `stats.ram.transferred` at the last iteration sync.
    pub last_sync_transferred: u64,
}

impl Throttle {
    pub fn new() -> Self {
        Throttle {
            percent: 0,
            pending: false,
            high_dirty_rate_count: 0,
            last_sync_transferred: 0,
        }
    }
}
