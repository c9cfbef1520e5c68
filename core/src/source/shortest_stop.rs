//! The shortest-stop switchover rule: the downtime limit is a ceiling, not
//! a target.
//!
//! QEMU stops the guest as soon as the expected stop fits `downtime-limit`.
//! On a fast link that moment comes early, with a large remainder: 300 ms
//! at 4 GB/s is over a gigabyte, so a busy guest is stopped with its whole
//! working set still to copy, for tens of milliseconds, when a few more
//! passes would have brought the stop down to what the guest dirties in one
//! short pass.
//!
//! The rule here ([`SwitchoverPolicy::ShortestStop`], the default) judges
//! every sync at which the stop fits the limit. The expected stop is the
//! fixed cost (vCPU stop and start, device state, the end-of-stream round
//! trip: [`handle_stop_cost`]) plus the pending bytes (dirty and still
//! queued) over the bandwidth. It stops:
//!
//! - when the transfer takes less than [`SWITCH_AT_ONCE`]: there is
//!   nothing left to gain (at every sync, mid-pass ones included);
//! - when the next pass is predicted not to fit (the guest dirtying at the
//!   rate measured since the last sync for as long as the pending bytes
//!   take to send): this may be the last stop that fits, and QEMU's rule
//!   would take it, so this one does too (at every sync, too);
//! - at the end of a pass that did not cut the expected stop by
//!   [`1 / SHRINK`](SHRINK) of the shortest seen so far (the remainder is
//!   what the guest dirties during one pass, the floor its dirty rate
//!   allows, or the fixed cost dominates), if this pass is within
//!   `1 / SHRINK` of that shortest; a pass further off (a burst of
//!   writes) is iterated past, for a better one;
//! - after [`MAX_FITTING_PASSES`] passes that fit, at the first sync whose
//!   stop fits, as QEMU would.
//!
//! A plateau is where the guest's dirty rate sets the stop: the guest
//! rewrites during one pass about what the pass sends. When a pass ends
//! without shrinking the stop (a plateau, or a burst), the transfer
//! still takes [`SWITCH_AT_ONCE`] or more and
//! [`MigrationConfig::stop_throttle`] is on (the default; the caller must
//! be able to throttle its vCPUs), the rule does not stop there: it
//! raises the throttle at once, as far as the measured rates say the next
//! pass needs to leave no more dirty than the link sends in the fixed cost
//! of a stop (the guest dirtying the share of its measured rate the higher
//! throttle leaves it, for as long as the pending bytes take to send; at
//! least one step of half the vCPUs' remaining run time, 50, 75, 88, 94,
//! 97, 99 %, and at most `max-cpu-throttle`), and iterates, so that the
//! next pass shrinks what the slowed guest leaves dirty. It
//! stops at the next plateau with the throttle at its ceiling, as soon as
//! the transfer drops under `SWITCH_AT_ONCE`, or at the bound below. The
//! stop that may be the last to fit (below) is not taken either when the
//! same prediction, with the guest slowed by a higher throttle step, says
//! the next pass fits: the throttle rises to the first such step instead
//! (several steps at once if need be), and if a later sync
//! does not fit after all, it rises again at each such sync. The
//! throttle rises the same way, at once, after a fitting pass that did
//! shrink the stop when the measured rates say that passes left to the
//! guest's own dirty rate would take more than [`SHRINK_PASSES`] to bring
//! it down to that target (a guest dirtying at nearly the link's rate
//! shrinks each pass by little): one throttled pass then sends what
//! QEMU's stop would have sent, and the migration ends in about QEMU's
//! time with a short stop. The throttle only rises there, after a pass
//! that did not shrink the stop, and after a pass that did not fit
//! (below), never while fitting passes shrink it fast enough, and it is lifted when the migration ends, whatever the end (before the
//! vCPUs of a failed migration are resumed). What it cost the guest is in
//! [`MigrationStats::throttle`].
//!
//! It iterates otherwise: a pass that did cut the stop is likely to be
//! followed by one that cuts it again. A send queue longer than the dirty
//! pages is drained first, with the guest running, when the guest dirties
//! memory slower than the link carries it (waiting for `q` queued bytes
//! over `r` dirty ones trades a stop of `r + q` for one of about `2r`
//! plus what the guest dirtied meanwhile).
//!
//! A stop that does not fit the limit is never taken. At the end of a
//! pass that does not fit, whose guest dirtied faster than the link
//! carried or which did not shrink the remainder, the rule throttles the
//! same way, at once and as hard as the rates say a short stop needs
//! (not when the fixed cost alone is over the limit: no throttle helps
//! there): such a guest never fits otherwise, and QEMU's rule iterates
//! on it until a limit gives up. Passes that do not fit are judged by
//! the no-progress rule (a pass that raised the throttle counts as
//! progress; one at the ceiling that does not shrink does not) and the
//! limits of
//! [`Limits`](crate::config::Limits), exactly as under
//! [`SwitchoverPolicy::FitsLimit`]. With the stop that may be the last to
//! fit always taken, the rule gives up on a migration that QEMU's rule
//! completes only when the prediction is wrong (a guest whose dirty rate
//! jumps between two syncs), and it never runs more than
//! `MAX_FITTING_PASSES` passes beyond QEMU's rule.
//!
//! Every stop starts right after a sync, with the vCPUs stopped straight
//! from the decision: the remainder is as small as it will get, and the
//! final sync, with the vCPUs stopped, finds only what the guest wrote
//! between the two (its cost is part of the stop cost).
//!
//! [`SwitchoverPolicy::ShortestStop`]: crate::config::SwitchoverPolicy::ShortestStop
//! [`SwitchoverPolicy::FitsLimit`]: crate::config::SwitchoverPolicy::FitsLimit
//! [`handle_stop_cost`]: super::SourceEngine::handle_stop_cost
//! [`MigrationConfig::stop_throttle`]: crate::config::MigrationConfig::stop_throttle
//! [`MigrationStats::throttle`]: crate::stats::MigrationStats::throttle

use core::time::Duration;

/// A stop whose transfer takes less than this is taken at once: it is
/// below the noise of the fixed cost (stopping and starting vCPUs alone
/// took 1 to 11 ms on the development VM), so another pass cannot make the
/// stop noticeably shorter, and would only cost the guest another round of
/// dirty-tracking faults.
pub const SWITCH_AT_ONCE: Duration = Duration::from_millis(1);

/// The share of the expected stop a pass must cut, as `1 / SHRINK`, to
/// count as progress (and the margin within which a pass is as good as the
/// best): the remainder moves by a few percent from pass to pass with the
/// guest's writes and the link's jitter, and a pass that saves less than
/// an eighth of the stop is not worth a whole pass of link time.
pub const SHRINK: u64 = 8;

/// Passes with a stop that fits the limit after which any fitting stop is
/// taken. Passes that keep shrinking the stop by an eighth reach
/// [`SWITCH_AT_ONCE`] from a 300 ms transfer in about 43 passes in the
/// worst case, but at a dirty rate under half the link rate in under 9; a
/// dozen keeps the extra time over QEMU's rule bounded (each of these
/// passes sends less than the limit's worth of bytes, so takes about the
/// limit at most) while leaving room for the usual geometric convergence.
pub const MAX_FITTING_PASSES: u32 = 12;

/// Passes the rule lets a guest's own dirty rate take to shrink a fitting
/// stop to its short target (what the link sends in the fixed cost of a
/// stop): a pass that shrinks the stop, but at a ratio of dirty rate to
/// link rate that would take more passes than this, is throttled at once
/// instead. Each unthrottled pass costs a pass of link time; a throttled
/// one costs the guest, but ends the migration in about the time QEMU's
/// rule takes (its stop sends what the extra pass sends).
pub const SHRINK_PASSES: u32 = 3;

/// What the rule makes of one sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Judgement {
    /// Stop now (false: iterate).
    pub stop: bool,
    /// A pass ended here without cutting the shortest stop by
    /// `1 / SHRINK`: a plateau (near the best) or a burst (further off).
    /// Where the rule may throttle, either raises the throttle.
    pub stalled: bool,
}

/// What the rule remembers between passes.
pub(super) struct ShortestStop {
    /// Shortest expected stop at the end of a fitting pass, in any unit
    /// (the engine uses microseconds; `u64::MAX`: none yet).
    best: u64,
    /// Passes that ended with a stop fitting the limit.
    fitting_passes: u32,
    /// The number of the last pass judged (passes are numbered from 1:
    /// zero means none has ended yet).
    judged_pass: u64,
}

impl ShortestStop {
    pub const fn new() -> Self {
        ShortestStop {
            best: u64::MAX,
            fitting_passes: 0,
            judged_pass: 0,
        }
    }

    /// At a sync with a stop that fits the limit, `passes` passes ended so
    /// far and a stop of `stop` expected: whether to stop now, and whether
    /// a pass just ended without shrinking the stop. A pass is judged
    /// once, at the first sync after its end; a sync in the middle of a
    /// pass stops only once the bound is reached.
    pub fn judge(&mut self, passes: u64, stop: u64) -> Judgement {
        if passes == self.judged_pass {
            return Judgement {
                stop: self.exhausted(),
                stalled: false,
            };
        }
        self.judged_pass = passes;
        self.fitting_passes = self.fitting_passes.saturating_add(1);
        let best = self.best;
        if best == u64::MAX || stop < best - best / SHRINK {
            self.best = stop;
            return Judgement {
                stop: self.exhausted(),
                stalled: false,
            };
        }
        self.best = best.min(stop);
        Judgement {
            stop: stop <= best.saturating_add(best / SHRINK) || self.exhausted(),
            stalled: true,
        }
    }

    /// Whether a sync after `passes` passes ends one not judged yet.
    pub fn new_pass(&self, passes: u64) -> bool {
        passes != self.judged_pass
    }

    /// True once [`MAX_FITTING_PASSES`] fitting passes have gone by: from
    /// then on the first stop that fits is taken.
    pub fn exhausted(&self) -> bool {
        self.fitting_passes >= MAX_FITTING_PASSES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Judges passes 1, 2, ... with these expected stops, one sync each;
    /// returns the pass that stopped.
    fn run(rule: &mut ShortestStop, stops: &[u64]) -> Option<u64> {
        (1..)
            .zip(stops)
            .find_map(|(pass, &stop)| rule.judge(pass, stop).stop.then_some(pass))
    }

    #[test]
    fn iterates_while_passes_shrink_the_stop() {
        // 64 ms, then each pass halving it.
        let stops: std::vec::Vec<u64> = (0..6).map(|i| 64_000 >> i).collect();
        assert_eq!(run(&mut ShortestStop::new(), &stops), None);
    }

    #[test]
    fn stops_at_a_plateau_on_a_pass_near_the_best() {
        // The third did not shrink by an eighth and is within one of the
        // best.
        assert_eq!(run(&mut ShortestStop::new(), &[1000, 500, 540]), Some(3));
    }

    #[test]
    fn waits_out_a_burst_at_a_plateau() {
        // The third is a burst, worse than the best by more than an
        // eighth; the fourth is back near the best.
        assert_eq!(
            run(&mut ShortestStop::new(), &[1000, 500, 900, 510]),
            Some(4)
        );
    }

    #[test]
    fn plateaus_and_bursts_are_stalled_passes_shrinks_are_not() {
        let mut rule = ShortestStop::new();
        assert!(!rule.judge(1, 1000).stalled, "the first is the best");
        assert!(!rule.judge(2, 500).stalled, "halved");
        let burst = rule.judge(3, 900);
        assert!(burst.stalled && !burst.stop);
        let plateau = rule.judge(4, 510);
        assert!(plateau.stalled && plateau.stop);
    }

    #[test]
    fn a_mid_pass_sync_does_not_judge_the_pass_again() {
        let mut rule = ShortestStop::new();
        assert!(!rule.judge(0, 1000).stop, "no pass has ended yet");
        assert!(!rule.judge(1, 1000).stop);
        let again = rule.judge(1, 1000);
        assert!(!again.stop && !again.stalled, "pass 1 was judged already");
        assert_eq!(
            rule.judge(2, 1000),
            Judgement {
                stop: true,
                stalled: true
            }
        );
    }

    #[test]
    fn gives_in_after_the_bound_whatever_the_passes_do() {
        // Alternating bursts and shrinks never reach a plateau near the
        // best; the bound ends it, and from then on mid-pass syncs stop
        // too.
        let stops: std::vec::Vec<u64> = (0..64u32)
            .map(|i| {
                if i % 2 == 0 {
                    1u64 << 40u32.saturating_sub(i)
                } else {
                    1u64 << 42u32.saturating_sub(i)
                }
            })
            .collect();
        let mut rule = ShortestStop::new();
        assert_eq!(run(&mut rule, &stops), Some(u64::from(MAX_FITTING_PASSES)));
        assert!(rule.exhausted());
        assert!(rule.judge(u64::from(MAX_FITTING_PASSES), 1 << 40).stop);
    }

    #[test]
    fn a_stop_of_zero_or_near_the_maximum_does_not_overflow() {
        assert_eq!(run(&mut ShortestStop::new(), &[0, 0]), Some(2));
        assert_eq!(
            run(&mut ShortestStop::new(), &[u64::MAX - 1, u64::MAX - 1]),
            Some(2)
        );
    }
}
