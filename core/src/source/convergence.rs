//! What the switchover decision is made from (the threshold and the
//! bandwidth it comes from, the bytes still queued and the fixed cost of a
//! stop, progress between passes, the send-queue drain wait, the dirty
//! rate, auto-converge's throttle) and the decision itself: stop, switch
//! to postcopy, give up, or go on. Which of the stops that fit the limit
//! is taken is the [`SwitchoverPolicy`]'s choice (see
//! [`shortest_stop`](super::shortest_stop)).

use core::fmt;
use core::time::Duration;

use super::shortest_stop::{SHRINK_PASSES, SWITCH_AT_ONCE, ShortestStop};
use super::{ConvergenceLimit, EndReason, SLICE, SourceAction, SourceEngine, Step};
use crate::capabilities::Capabilities;
use crate::config::SwitchoverPolicy;
use crate::time::Instant;

/// Passes a migration may make before its link's bandwidth is first
/// measured (the first 100 ms slice, or an earlier estimate): far more
/// than a real link needs to be measured, few enough that a clock that
/// never advances still ends the migration.
pub(super) const MAX_UNMEASURED_PASSES: u64 = 1000;

/// Shortest interval between two syncs over which the guest's dirty rate
/// is measured (see [`SourceEngine::measure_dirty_rate`]).
pub(super) const MIN_DIRTY_INTERVAL: Duration = Duration::from_millis(1);

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
    /// Passes ended before any bandwidth was measured (not judged; see
    /// [`MAX_UNMEASURED_PASSES`]).
    pub unmeasured_passes: u64,
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
    /// When the last dirty-log sync ended: the guest dirtied this sync's
    /// new pages since.
    pub synced_at: Instant,
    /// Bytes per millisecond the guest newly dirtied between the last two
    /// syncs while it ran (`None` before the first iteration sync).
    pub dirty_bytes_per_ms: Option<f64>,
    /// The shortest-stop rule's memory of the passes that fit the limit.
    pub shortest_stop: ShortestStop,
}

impl Convergence {
    pub fn new() -> Self {
        Convergence {
            unsent_bytes: 0,
            stop_cost: Duration::ZERO,
            best_pending: u64::MAX,
            stalled_iterations: 0,
            unmeasured_passes: 0,
            judged_iterations: 0,
            drain_until: None,
            threshold_bytes: 0,
            bandwidth_bytes_per_ms: 0.0,
            dirty_period_start: Instant::ZERO,
            dirty_period_pages: 0,
            newly_dirty_this_sync: 0,
            synced_at: Instant::ZERO,
            dirty_bytes_per_ms: None,
            shortest_stop: ShortestStop::new(),
        }
    }
}

/// The throttle: auto-converge's, and the shortest-stop rule's.
pub(super) struct Throttle {
    /// Share of time the vCPUs are to be held back, 0..=99, as decided
    /// (handed out once `pending` is cleared; `stats.throttle.percent` is
    /// the one in force).
    pub percent: u8,
    /// A new throttle was decided and not yet handed out.
    pub pending: bool,
    /// Syncs in a row in which the guest dirtied more than half of what
    /// was sent.
    pub high_dirty_rate_count: u8,
    /// `stats.ram.transferred` at the last iteration sync.
    pub last_sync_transferred: u64,
    /// The shortest-stop rule has raised the throttle: from then on a
    /// sync whose stop does not fit the limit raises it again (the rule
    /// gave up a stop that fitted, trusting the throttle to bring the
    /// next one within the limit).
    pub stop_rule: bool,
    /// Since when the throttle in force has held back a running guest and
    /// was last booked into `stats.throttle` (`None`: no throttle, or the
    /// vCPUs are stopped).
    pub booked_at: Option<Instant>,
}

impl Throttle {
    pub fn new() -> Self {
        Throttle {
            percent: 0,
            pending: false,
            high_dirty_rate_count: 0,
            last_sync_transferred: 0,
            stop_rule: false,
            booked_at: None,
        }
    }
}

/// The throttle the shortest-stop rule raises `percent` to: half of the
/// vCPUs' remaining run time taken at each step (50, 75, 88, 94, 97, 99),
/// so that a guest whose dirty rate matches the link's is slowed below it
/// within a pass or two, and six plateaus at most reach the ceiling.
pub(super) const fn stop_throttle_step(percent: u8) -> u8 {
    if percent == 0 {
        50
    } else {
        100 - (100 - percent) / 2
    }
}

impl SourceEngine<'_> {
    /// Bytes per millisecond the stop-and-copy is expected to move.
    pub(super) fn switchover_bytes_per_ms(&self) -> f64 {
        let avail = self.config.parameters.avail_switchover_bandwidth;
        if avail > 0 {
            avail as f64 / 1000.0
        } else {
            self.convergence.bandwidth_bytes_per_ms
        }
    }

    pub(super) fn update_threshold(&mut self) {
        let limit_ms = self.config.parameters.downtime_limit_ms as f64;
        let budget_ms = (limit_ms - self.convergence.stop_cost.as_secs_f64() * 1e3).max(0.0);
        self.convergence.threshold_bytes = (self.switchover_bytes_per_ms() * budget_ms) as u64;
        self.stats.threshold_bytes = self.convergence.threshold_bytes;
    }

    /// Bytes a stop now would still have to send: the dirty pages and
    /// what is queued in the caller's send buffers.
    pub(super) fn pending_bytes(&self) -> u64 {
        self.scan
            .remaining_bytes
            .saturating_add(self.convergence.unsent_bytes)
    }

    /// Whether a stop now is expected to fit the downtime limit.
    pub(super) fn fits_downtime(&self) -> bool {
        let limit = Duration::from_millis(self.config.parameters.downtime_limit_ms);
        self.convergence.stop_cost <= limit && self.below_threshold(self.pending_bytes())
    }

    /// Whether `bytes` still to send fit the switchover threshold.
    pub(super) fn below_threshold(&self, bytes: u64) -> bool {
        bytes == 0 || bytes < self.convergence.threshold_bytes
    }

    /// Bytes the switchover sends within [`SWITCH_AT_ONCE`] (zero while no
    /// bandwidth is measured).
    fn short_stop_bytes(&self) -> u64 {
        (self.switchover_bytes_per_ms() * SWITCH_AT_ONCE.as_secs_f64() * 1e3) as u64
    }

    /// Whether `bytes` still to send take less than [`SWITCH_AT_ONCE`].
    fn sends_at_once(&self, bytes: u64) -> bool {
        bytes == 0 || bytes < self.short_stop_bytes()
    }

    /// Whether a sync now may end in a stop, so that one is worth asking
    /// for before the pass ends: under QEMU's rule whenever the stop fits;
    /// under the shortest-stop rule only when it is already as short as
    /// it gets, when it may be the last that fits (or no sync has measured
    /// the dirty rate yet, so a first one finds out), or when a bound
    /// forces the first stop that fits.
    pub(super) fn switchover_sync_due(&self) -> bool {
        self.fits_downtime()
            && match self.config.switchover {
                SwitchoverPolicy::FitsLimit => true,
                SwitchoverPolicy::ShortestStop => {
                    self.sends_at_once(self.pending_bytes())
                        || self.next_pass_fits() != Some(true)
                        || self.convergence.shortest_stop.exhausted()
                        || self.iteration_limit_exceeded()
                        || self.time_limit_exceeded()
                }
            }
    }

    /// At an iteration sync: the rate at which the guest dirtied new
    /// pages since the last sync ended. An interval shorter than
    /// [`MIN_DIRTY_INTERVAL`] keeps the last rate: back-to-back syncs (a
    /// pass's end, then the next pass's first check) are microseconds
    /// apart, and one page dirtied in them would read as a guest dirtying
    /// gigabytes a millisecond, which no stop fits.
    pub(super) fn measure_dirty_rate(&mut self) {
        let elapsed = self.now.saturating_since(self.convergence.synced_at);
        let elapsed_ms = elapsed.as_secs_f64() * 1e3;
        if elapsed >= MIN_DIRTY_INTERVAL {
            let dirtied = self
                .convergence
                .newly_dirty_this_sync
                .saturating_mul(self.stats.ram.page_size);
            self.convergence.dirty_bytes_per_ms = Some(dirtied as f64 / elapsed_ms);
        }
    }

    /// Whether the stop is expected to still fit after one more pass
    /// (`None` while the dirty rate or the bandwidth is unknown): the guest
    /// dirtying at the last measured rate for as long as the pending bytes
    /// take to send, the send queue as it is now. The extrapolation is
    /// linear, so it overestimates a guest that rewrites the same pages:
    /// when wrong, it errs towards taking the stop that fits.
    fn next_pass_fits(&self) -> Option<bool> {
        self.next_pass_fits_at(1.0)
    }

    /// [`next_pass_fits`](Self::next_pass_fits) with the guest dirtying
    /// `share` of its last measured rate (a higher throttle).
    fn next_pass_fits_at(&self, share: f64) -> Option<bool> {
        let dirty_per_ms = self.convergence.dirty_bytes_per_ms? * share;
        let bytes_per_ms = self.switchover_bytes_per_ms();
        if bytes_per_ms <= 0.0 {
            return None;
        }
        let pass_ms = self.pending_bytes() as f64 / bytes_per_ms;
        let predicted = (dirty_per_ms * pass_ms) as u64;
        Some(self.below_threshold(predicted.saturating_add(self.convergence.unsent_bytes)))
    }

    /// At a sync whose stop fits the limit: whether the policy takes it.
    fn policy_takes_stop(&mut self) -> bool {
        match self.config.switchover {
            SwitchoverPolicy::FitsLimit => true,
            SwitchoverPolicy::ShortestStop => {
                // Nothing to gain.
                if self.sends_at_once(self.pending_bytes()) {
                    return true;
                }
                // The last stop that fits for all we know (a guest whose
                // dirtying outgrows the limit during the next pass may
                // never fit again), unless a higher throttle is predicted
                // to keep the next pass within it.
                if self.next_pass_fits() != Some(true) {
                    return self.convergence.shortest_stop.exhausted()
                        || !self.raise_stop_throttle_to_fit();
                }
                let Some(stop) = self.expected_stop() else {
                    return true;
                };
                let stop_us = u64::try_from(stop.as_micros()).unwrap_or(u64::MAX);
                let pass_end = self
                    .convergence
                    .shortest_stop
                    .new_pass(self.stats.iterations);
                let judged = self
                    .convergence
                    .shortest_stop
                    .judge(self.stats.iterations, stop_us);
                // A pass that did not shrink a stop with SWITCH_AT_ONCE or
                // more still to send (a plateau: the guest's dirty rate;
                // or a burst) slows the guest down, and precopy iterates
                // while the bound on fitting passes leaves room.
                if judged.stalled
                    && !self.convergence.shortest_stop.exhausted()
                    && self.raise_throttle_for_short_stop()
                {
                    return false;
                }
                // A pass that shrank the stop, but so slowly for the
                // guest's dirty rate that reaching a short stop would take
                // more than SHRINK_PASSES more, is throttled at once too.
                if pass_end
                    && !judged.stalled
                    && !judged.stop
                    && self.shrinks_too_slowly()
                    && self.raise_throttle_for_short_stop()
                {
                    return false;
                }
                let take = judged.stop;
                // A queue worth draining first is drained (see
                // `drain_deadline`) rather than waited for with the guest
                // stopped.
                take && (self.convergence.shortest_stop.exhausted() || !self.queue_drain_pays())
            }
        }
    }

    /// Under the shortest-stop rule with its throttle: raises the
    /// throttle one [`stop_throttle_step`] (at most `max-cpu-throttle`);
    /// false when it is off or already at the ceiling.
    pub(super) fn raise_stop_throttle(&mut self) -> bool {
        let Some(next) = self.next_throttle() else {
            return false;
        };
        self.throttle.percent = next;
        self.throttle.pending = true;
        self.throttle.stop_rule = true;
        true
    }

    /// Raises the throttle by as many [`stop_throttle_step`]s as the
    /// next pass needs to be predicted to fit (the guest dirtying the
    /// share of its measured rate the higher throttle leaves it); false,
    /// leaving the throttle as it is, when even the ceiling is not
    /// predicted to fit or the rule may not throttle.
    fn raise_stop_throttle_to_fit(&mut self) -> bool {
        let now = self.throttle.percent;
        let mut next = now;
        loop {
            let Some(step) = self.throttle_above(next) else {
                return false;
            };
            next = step;
            let share = f64::from(100 - next) / f64::from(100 - now);
            if self.next_pass_fits_at(share) == Some(true) {
                break;
            }
        }
        self.throttle.percent = next;
        self.throttle.pending = true;
        self.throttle.stop_rule = true;
        true
    }

    /// Bytes the shortest-stop rule's throttle aims to leave dirty at the
    /// end of the next pass: what the link sends in the fixed cost of a
    /// stop, or in [`SWITCH_AT_ONCE`] if that is longer, so that the
    /// transfer no longer dominates the stop; never more than fits the
    /// limit.
    fn short_stop_target(&self) -> u64 {
        let cost_bytes = (self.switchover_bytes_per_ms()
            * self.convergence.stop_cost.as_secs_f64()
            * 1e3) as u64;
        cost_bytes
            .max(self.short_stop_bytes())
            .min(self.convergence.threshold_bytes)
    }

    /// Raises the throttle at once, from the measured rates, to the
    /// lowest percent at which the next pass is predicted to leave no more
    /// than [`short_stop_target`](Self::short_stop_target) dirty: the guest
    /// dirtying the share of its measured rate that the higher throttle
    /// leaves it, for as long as the pending bytes take to send. Ramping
    /// one step a pass instead costs a whole pass of link time and guest
    /// dirtying per step, and the guest is throttled for longer in all.
    /// At least one [`stop_throttle_step`], at most `max-cpu-throttle`
    /// (the prediction is linear, and a guest rewriting a small set is
    /// measured below its true rate, so the step is the floor); false,
    /// leaving the throttle as it is, when the rule may not throttle or
    /// the throttle is at its ceiling.
    fn raise_throttle_for_short_stop(&mut self) -> bool {
        let now = self.throttle.percent;
        let Some(step) = self.next_throttle() else {
            return false;
        };
        let bytes_per_ms = self.switchover_bytes_per_ms();
        let mut next = step;
        if let Some(dirty_per_ms) = self.convergence.dirty_bytes_per_ms
            && bytes_per_ms > 0.0
        {
            let pass_ms = self.pending_bytes() as f64 / bytes_per_ms;
            let predicted = dirty_per_ms * pass_ms;
            let room = self
                .short_stop_target()
                .saturating_sub(self.convergence.unsent_bytes) as f64;
            if predicted > room {
                // The share of the current run time the guest may keep.
                let share = room / predicted;
                let keep = (f64::from(100 - now) * share) as u8;
                next = next.max(100 - keep);
            }
        }
        // `step` is within the ceiling already.
        self.throttle.percent = next.min(self.config.parameters.max_cpu_throttle);
        self.throttle.pending = true;
        self.throttle.stop_rule = true;
        true
    }

    /// Whether passes at the guest's measured dirty rate (over the link's)
    /// would take more than [`SHRINK_PASSES`] to shrink the pending bytes
    /// to [`short_stop_target`](Self::short_stop_target): each pass leaves
    /// what the guest dirtied while it sent the one before. False while
    /// the rates are unknown.
    fn shrinks_too_slowly(&self) -> bool {
        let bytes_per_ms = self.switchover_bytes_per_ms();
        let Some(dirty_per_ms) = self.convergence.dirty_bytes_per_ms else {
            return false;
        };
        if bytes_per_ms <= 0.0 {
            return false;
        }
        let ratio = dirty_per_ms / bytes_per_ms;
        let target = self.short_stop_target() as f64;
        let mut left = self.pending_bytes() as f64;
        for _ in 0..SHRINK_PASSES {
            if left <= target {
                return false;
            }
            left *= ratio;
        }
        left > target
    }

    /// At the end of a pass whose stop does not fit the limit (`shrank`:
    /// it cut the pending bytes by a sixteenth of the best so far): the
    /// shortest-stop rule throttles at once, and hard enough for a short
    /// stop (see [`raise_throttle_for_short_stop`]), when the guest
    /// dirtied faster than the link carried or the pass did not shrink
    /// the remainder. Such a guest never fits otherwise: QEMU's rule
    /// iterates until a limit gives up, and without throttling so would
    /// this one. Passes that shrink the remainder while the guest dirties
    /// slower than the link are left to converge on their own. Never
    /// when the fixed cost alone is over the limit (no throttle helps).
    ///
    /// [`raise_throttle_for_short_stop`]: Self::raise_throttle_for_short_stop
    fn throttle_unfit_pass(&mut self, shrank: bool) -> bool {
        let limit = Duration::from_millis(self.config.parameters.downtime_limit_ms);
        if self.convergence.stop_cost >= limit || self.convergence.threshold_bytes == 0 {
            return false;
        }
        let Some(dirty_per_ms) = self.convergence.dirty_bytes_per_ms else {
            return false;
        };
        let link_per_ms = self.convergence.bandwidth_bytes_per_ms;
        if link_per_ms <= 0.0 || (shrank && dirty_per_ms < link_per_ms) {
            return false;
        }
        self.raise_throttle_for_short_stop()
    }

    /// The throttle one [`stop_throttle_step`] up, if the shortest-stop
    /// rule may throttle and the ceiling leaves room.
    fn next_throttle(&self) -> Option<u8> {
        self.throttle_above(self.throttle.percent)
    }

    /// The throttle one [`stop_throttle_step`] above `percent`, if the
    /// shortest-stop rule may throttle and the ceiling leaves room.
    fn throttle_above(&self, percent: u8) -> Option<u8> {
        if !self.config.stop_throttle || self.config.switchover != SwitchoverPolicy::ShortestStop {
            return None;
        }
        let ceiling = self.config.parameters.max_cpu_throttle;
        let next = stop_throttle_step(percent).min(ceiling);
        (next > percent).then_some(next)
    }

    /// Hands out the throttle `percent` (zero lifts it), booking what the
    /// one in force cost the guest until now.
    pub(super) fn throttle_action(&mut self, percent: u8) -> SourceAction<'static> {
        self.book_throttle();
        self.throttle.percent = percent;
        self.throttle.pending = false;
        let t = &mut self.stats.throttle;
        t.percent = percent;
        t.peak_percent = t.peak_percent.max(percent);
        self.throttle.booked_at = (percent > 0 && !self.vcpus_stopped).then_some(self.now);
        SourceAction::SetThrottle { percent }
    }

    /// Adds the time since the last booking to what the throttle in force
    /// cost the running guest.
    pub(super) fn book_throttle(&mut self) {
        let Some(since) = self.throttle.booked_at else {
            return;
        };
        let ms = (self.now - since).as_secs_f64() * 1e3;
        let t = &mut self.stats.throttle;
        t.throttled_ms += ms;
        t.taken_ms += ms * f64::from(t.percent) / 100.0;
        self.throttle.booked_at = Some(self.now);
    }

    /// The stop a switchover now would take: the fixed cost plus the
    /// pending bytes at the measured bandwidth (`None` while there is data
    /// to send and no bandwidth measured yet).
    pub(super) fn expected_stop(&self) -> Option<Duration> {
        let bytes_per_ms = self.switchover_bytes_per_ms();
        let pending = self.pending_bytes();
        let transfer_ms = if pending == 0 {
            0.0
        } else if bytes_per_ms > 0.0 {
            pending as f64 / bytes_per_ms
        } else {
            return None;
        };
        Some(self.convergence.stop_cost + Duration::from_nanos((transfer_ms * 1e6) as u64))
    }

    /// [`expected_stop`](Self::expected_stop) in whole milliseconds.
    pub(super) fn estimated_stop_ms(&self) -> Option<u64> {
        self.expected_stop().map(|d| d.as_millis() as u64)
    }

    /// Judges the pass that just ended: did it shrink the pending bytes
    /// (by at least a sixteenth of the best so far), or raise the
    /// throttle? Returns true once too many passes in a row did neither.
    pub(super) fn stalled(&mut self) -> bool {
        if self.stats.iterations == self.convergence.judged_iterations {
            return false;
        }
        self.convergence.judged_iterations = self.stats.iterations;
        if self.expected_stop().is_none() {
            // No stop can be judged to fit before the link is measured, so
            // a pass cannot be said to have failed to get closer: a small
            // guest whose passes take a fraction of a millisecond would
            // otherwise be given up on after ten of them, before its first
            // bandwidth slice closed. Bounded all the same, for a clock
            // that never moves.
            self.convergence.unmeasured_passes += 1;
            return self.convergence.unmeasured_passes >= MAX_UNMEASURED_PASSES;
        }
        let pending = self.pending_bytes();
        let best = self.convergence.best_pending;
        if best == u64::MAX || pending < best - best / 16 || self.throttle.pending {
            self.convergence.best_pending = self.convergence.best_pending.min(pending);
            self.convergence.stalled_iterations = 0;
        } else {
            self.convergence.stalled_iterations += 1;
        }
        self.config
            .limits
            .max_stalled_iterations
            .is_some_and(|max| self.convergence.stalled_iterations >= max)
    }

    pub(super) fn account_dirty_rate(&mut self, now: Instant) {
        self.convergence.dirty_period_pages += self.convergence.newly_dirty_this_sync;
        let elapsed = now - self.convergence.dirty_period_start;
        if elapsed >= Duration::from_millis(100) {
            self.stats.ram.dirty_pages_rate = (self.convergence.dirty_period_pages as f64 * 1e9
                / elapsed.as_nanos() as f64) as u64;
            self.convergence.dirty_period_start = now;
            self.convergence.dirty_period_pages = 0;
        }
    }

    /// The seeds' auto-converge trigger: when the guest dirtied more than
    /// half of what was sent since the last sync, twice in a row, throttle
    /// it harder.
    pub(super) fn auto_converge(&mut self) {
        let transferred = self.stats.ram.transferred;
        let sent_period = transferred - self.throttle.last_sync_transferred;
        let page_size = self.stats.ram.page_size.max(1);
        let dirtied_period = self
            .convergence
            .newly_dirty_this_sync
            .saturating_mul(page_size);
        self.throttle.last_sync_transferred = transferred;
        if !self
            .config
            .capabilities
            .contains(Capabilities::AUTO_CONVERGE)
        {
            return;
        }
        if dirtied_period > sent_period / 2 {
            self.throttle.high_dirty_rate_count += 1;
            if self.throttle.high_dirty_rate_count >= 2 {
                self.throttle.high_dirty_rate_count = 0;
                let p = &self.config.parameters;
                self.throttle.percent = if self.throttle.percent == 0 {
                    p.cpu_throttle_initial
                } else {
                    self.throttle
                        .percent
                        .saturating_add(p.cpu_throttle_increment)
                        .min(p.max_cpu_throttle)
                };
                self.throttle.pending = true;
            }
        }
    }

    /// After an iteration sync: complete, give up, or go on.
    pub(super) fn decide(&mut self) {
        if self.convergence.bandwidth_bytes_per_ms == 0.0 {
            // No slice has closed yet: a fast first pass would otherwise
            // see a zero threshold and keep resending a working set that
            // already fits the downtime limit.
            if let Some(estimate) = self.meter.partial_bytes_per_ms(self.now) {
                self.convergence.bandwidth_bytes_per_ms = estimate;
                self.update_threshold();
            }
        }
        if let Some(ms) = self.estimated_stop_ms() {
            self.stats.expected_downtime_ms = ms;
        }
        let fits = self.fits_downtime();
        // A limit about to end the migration takes any stop that fits.
        let converged = fits
            && (self.iteration_limit_exceeded()
                || self.time_limit_exceeded()
                || self.policy_takes_stop());
        // A pass that does not fit may be throttled at its end (judged
        // once: mid-pass syncs are not passes); else, once the rule has
        // throttled, any sync that does not fit raises it a step.
        let unfit_pass_end = !fits
            && self.stats.iterations != self.convergence.judged_iterations
            && self.expected_stop().is_some();
        let best = self.convergence.best_pending;
        let shrank = best == u64::MAX || self.pending_bytes() < best - best / 16;
        let raised = unfit_pass_end && self.throttle_unfit_pass(shrank);
        if !raised && !fits && self.throttle.stop_rule {
            self.raise_stop_throttle();
        }
        // Passes that fit the limit (iterating to shorten the stop, or
        // waiting for the destination's switchover-ack) are not judged by
        // the no-progress rule: the data already fits.
        let stalled = !fits && self.stalled();
        let acked = self.end.switchover_acked
            || !self
                .config
                .capabilities
                .contains(Capabilities::SWITCHOVER_ACK);
        if converged && acked {
            self.begin_stop();
        } else if self.wants_postcopy() {
            self.begin_switch();
        } else if stalled {
            let passes = self.convergence.stalled_iterations;
            self.fail_not_converged(ConvergenceLimit::Stalled { passes });
        } else if self.iteration_limit_exceeded() {
            self.fail_not_converged(ConvergenceLimit::Iterations);
        } else if self.time_limit_exceeded() {
            self.fail_not_converged(ConvergenceLimit::Time);
        } else {
            self.step = Step::Iterate;
            self.convergence.drain_until = self.drain_deadline();
        }
    }

    /// When only the send queue keeps the stop over the limit (the dirty
    /// pages alone fit, or there are none), or, under the shortest-stop
    /// rule, when the queue is what makes the stop long (see
    /// [`queue_drain_pays`](Self::queue_drain_pays)): the time it takes the
    /// link to drain the excess at the measured bandwidth, at most one
    /// slice (a tenth of one while no bandwidth is measured). Resending
    /// pages now would only lengthen the queue, and passes with nothing to
    /// send would spin.
    pub(super) fn drain_deadline(&self) -> Option<Instant> {
        let limit = Duration::from_millis(self.config.parameters.downtime_limit_ms);
        if self.convergence.unsent_bytes == 0 || self.convergence.stop_cost > limit {
            return None;
        }
        let excess = if self.queue_drain_pays() {
            self.convergence.unsent_bytes - self.queue_target()
        } else if self.below_threshold(self.scan.remaining_bytes)
            && (self.config.switchover == SwitchoverPolicy::FitsLimit || !self.fits_downtime())
        {
            self.pending_bytes()
                .saturating_sub(self.convergence.threshold_bytes)
                + 1
        } else {
            return None;
        };
        let bytes_per_ms = self.convergence.bandwidth_bytes_per_ms;
        let wait = if bytes_per_ms > 0.0 {
            let ms = (excess as f64 / bytes_per_ms).min(SLICE.as_secs_f64() * 1e3);
            Duration::from_nanos((ms * 1e6) as u64)
        } else {
            SLICE / 10
        };
        Some(self.now + wait)
    }

    /// The queue the shortest-stop rule lets a stop wait for: as much as
    /// the dirty pages, or what goes at once.
    fn queue_target(&self) -> u64 {
        self.scan.remaining_bytes.max(self.short_stop_bytes())
    }

    /// Under the shortest-stop rule, whether waiting for the send queue to
    /// drain shortens a stop that fits: the queue is longer than the dirty
    /// pages (and than what goes at once), and the guest dirties memory
    /// slower than the link drains it. Waiting out `q` queued bytes over
    /// `r` dirty ones trades a stop of `r + q` for about `2r` plus what the
    /// guest dirties meanwhile, less whenever its rate is under the link's.
    /// (A stop that does not fit is left to QEMU's drain rule, so that the
    /// policy changes nothing about which migrations converge.)
    fn queue_drain_pays(&self) -> bool {
        self.config.switchover == SwitchoverPolicy::ShortestStop
            && self.fits_downtime()
            && self.convergence.unsent_bytes > self.queue_target()
            && self
                .convergence
                .dirty_bytes_per_ms
                .is_some_and(|dirty| dirty < self.convergence.bandwidth_bytes_per_ms)
    }

    pub(super) fn iteration_limit_exceeded(&self) -> bool {
        self.config
            .limits
            .max_iterations
            .is_some_and(|max| self.stats.iterations >= max)
    }

    pub(super) fn time_limit_exceeded(&self) -> bool {
        self.config
            .limits
            .max_time_ms
            .is_some_and(|ms| self.now - self.started_at >= Duration::from_millis(ms))
    }

    /// Gives up on precopy (`why`: which limit ended it); the message
    /// says what a stop would have cost against the limit.
    pub(super) fn fail_not_converged(&mut self, why: ConvergenceLimit) {
        struct Estimate(Option<u64>);
        impl fmt::Display for Estimate {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.0 {
                    Some(ms) => write!(f, "about {ms} ms"),
                    None => f.write_str("an unknown time (no bandwidth measured yet)"),
                }
            }
        }
        let estimate = Estimate(self.estimated_stop_ms());
        let mib = self.pending_bytes() as f64 / (1u64 << 20) as f64;
        let iterations = self.stats.iterations;
        let ms = (self.now - self.started_at).as_millis();
        let cost = self.convergence.stop_cost.as_millis();
        let limit = self.config.parameters.downtime_limit_ms;
        self.fail(
            EndReason::NotConverged(why),
            format_args!(
                "precopy did not converge after {iterations} iterations in {ms} ms ({why}): \
                 a stop would take {estimate} ({mib:.1} MiB to send, {cost} ms fixed cost), \
                 over the {limit} ms downtime-limit; try a higher downtime-limit or \
                 max-bandwidth, auto-converge, or postcopy"
            ),
        );
    }
}
