//! The end of a source migration: the handshake with the destination
//! (LOADED, COMMIT, SHUT) and its deadline, failing, undoing what the
//! migration did to the guest, and the typed reason it ended with.

use core::fmt;
use core::time::Duration;

use super::{SourceAction, SourceEngine, Step};
use crate::return_path::SignalName;
use crate::stats::AmbiguousEnd;
use crate::status::MigrationStatus;
use crate::time::Instant;
use crate::wire::EncodeError;

/// Why a source migration ended, as [`SourceAction::Finished`](super::SourceAction::Finished)
/// reports it. The statistics' `error_desc` holds the same end in words,
/// with the numbers (passes, bytes, milliseconds) a reader wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The destination has the guest.
    Completed,
    /// The operator cancelled; the guest runs on here.
    Cancelled,
    /// Precopy gave up: a limit of [`Limits`](crate::config::Limits) was
    /// reached before the stop fitted the downtime limit.
    NotConverged(ConvergenceLimit),
    /// The destination failed to load the stream (SHUT with an error).
    DestinationFailed,
    /// The operator interrupted the destination before its guest ran.
    DestinationInterrupted {
        /// The signal number (Linux numbering: 2 is SIGINT).
        signal: u32,
    },
    /// The destination closed the return path (SHUT without an error, or
    /// an end of connection the shim reported) before the end.
    PeerClosed,
    /// The destination did not answer in time.
    Timeout(Wait),
    /// The destination sent a message that has no place at this point.
    Protocol(Violation),
    /// The shim reported a local failure: a write, a dirty-log ioctl, the
    /// vCPUs, the device state (see `error_desc` for its words).
    LocalFailure,
    /// A record could not be encoded into the scratch buffer: nothing of
    /// it was handed out, and the stream cannot go on without it.
    Encode(EncodeError),
    /// Postcopy was paused and the caller gave up recovering it
    /// ([`SourceEngine::give_up`](super::SourceEngine::give_up)): the guest
    /// runs on the destination, some of its pages exist only here.
    RecoveryAbandoned,
}

impl EndReason {
    /// The final status this end leaves the migration in.
    pub const fn status(self) -> MigrationStatus {
        match self {
            EndReason::Completed => MigrationStatus::Completed,
            EndReason::Cancelled => MigrationStatus::Cancelled,
            _ => MigrationStatus::Failed,
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::Completed => f.write_str("completed"),
            EndReason::Cancelled => f.write_str("cancelled"),
            EndReason::NotConverged(limit) => write!(f, "did not converge ({limit})"),
            EndReason::DestinationFailed => {
                f.write_str("the destination failed to load the stream")
            }
            EndReason::DestinationInterrupted { signal } => {
                write!(
                    f,
                    "the destination was interrupted ({})",
                    SignalName(*signal)
                )
            }
            EndReason::PeerClosed => f.write_str("the destination closed the connection early"),
            EndReason::Timeout(wait) => write!(f, "the destination did not {wait} in time"),
            EndReason::Protocol(v) => write!(f, "protocol violation: {v}"),
            EndReason::LocalFailure => f.write_str("a local failure"),
            EndReason::Encode(e) => write!(f, "a record could not be encoded: {e}"),
            EndReason::RecoveryAbandoned => f.write_str("postcopy recovery abandoned"),
        }
    }
}

/// Which convergence limit ended precopy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvergenceLimit {
    /// `max_time_ms`.
    Time,
    /// `max_iterations`.
    Iterations,
    /// `max_stalled_iterations`: this many passes in a row without progress.
    Stalled {
        /// Passes without progress.
        passes: u64,
    },
}

impl fmt::Display for ConvergenceLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConvergenceLimit::Time => f.write_str("time limit"),
            ConvergenceLimit::Iterations => f.write_str("iteration limit"),
            ConvergenceLimit::Stalled { passes } => write!(f, "no progress in {passes}"),
        }
    }
}

/// What the source was waiting for from the destination when its
/// confirm timeout ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The verdict on the setup-time device sections (the answer to
    /// [`SETUP_CHECK_PING`](super::SETUP_CHECK_PING)).
    SetupVerdict,
    /// LOADED after the end of a precopy stream.
    Loaded,
    /// SHUT(0) after the end of the stream (no commit: postcopy or an older
    /// destination).
    EndConfirmation,
    /// SHUT(0) after the COMMIT.
    CommitConfirmation,
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Wait::SetupVerdict => "accept the setup-time device state",
            Wait::Loaded => "report the stream loaded",
            Wait::EndConfirmation => "confirm the end of the stream",
            Wait::CommitConfirmation => "confirm the commit",
        })
    }
}

/// A return-path message the source cannot act on where it came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// LOADED before the end of the stream was sent.
    LoadedBeforeEnd,
    /// A recovery message, and no recovery in progress.
    UnexpectedRecovery,
    /// Page requests while postcopy is not active.
    RequestOutsidePostcopy,
    /// A page request for a block the source does not have.
    RequestUnknownBlock,
    /// A page request outside its block or not page-aligned.
    RequestOutOfBlock,
    /// More outstanding page requests than the source can hold.
    TooManyRequests,
    /// A digest query or mismatch report out of place: the migration is
    /// not verified, the end of the stream is not out, or the range lies
    /// outside its block.
    UnexpectedDigestMessage,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Violation::LoadedBeforeEnd => "LOADED before the end of the stream",
            Violation::UnexpectedRecovery => "a recovery message outside recovery",
            Violation::RequestOutsidePostcopy => "page requests outside postcopy",
            Violation::RequestUnknownBlock => "a page request for an unknown block",
            Violation::RequestOutOfBlock => "a page request outside its block",
            Violation::TooManyRequests => "too many outstanding page requests",
            Violation::UnexpectedDigestMessage => "a digest query or report out of place",
        })
    }
}

/// The source's end-of-migration handshake.
pub(super) struct Handshake {
    /// The return path is open: the end is a handshake, not a write.
    pub return_path: bool,
    /// The destination approved the switchover (switchover-ack).
    pub switchover_acked: bool,
    /// When the [`CATCH_UP_PING`](super::CATCH_UP_PING) went out.
    pub catch_up_sent_at: Instant,
    /// The SwitchoverStart command went out, just before the vCPU stop.
    pub stop_announced: bool,
    /// The COMMIT has been handed out: the vCPUs are never resumed again.
    pub committed: bool,
    /// The destination confirmed the end (SHUT(0)): nothing can turn the
    /// completion into a failure any more.
    pub confirmed: bool,
    /// When the last message the destination must answer was handed out
    /// (setup check, end of stream, commit): the confirm timeout runs
    /// from it.
    pub sent_at: Instant,
    /// How the migration ended, once it has.
    pub reason: Option<EndReason>,
}

impl Handshake {
    pub fn new(return_path: bool) -> Self {
        Handshake {
            return_path,
            switchover_acked: false,
            catch_up_sent_at: Instant::ZERO,
            stop_announced: false,
            committed: false,
            confirmed: false,
            sent_at: Instant::ZERO,
            reason: None,
        }
    }
}

impl SourceEngine<'_> {
    /// True while the engine waits for an answer from the destination that
    /// the confirm timeout bounds.
    pub(super) fn awaits_destination(&self) -> bool {
        matches!(
            self.step,
            Step::AwaitSetupVerdict
                | Step::AwaitShut
                | Step::AwaitEndPong
                | Step::AwaitLoaded
                | Step::AwaitBitmap
                | Step::AwaitResumeAck
        )
    }

    /// A record did not encode into the scratch buffer: nothing of it was
    /// handed out, and the stream cannot go on without it. Ends the
    /// migration and returns the first action of its end.
    pub(super) fn encode_failed(&mut self, e: EncodeError) -> SourceAction<'static> {
        self.fail(
            EndReason::Encode(e),
            format_args!("a record could not be encoded: {e}"),
        );
        let reason = match self.step {
            Step::Finish(reason) => reason,
            _ => EndReason::Encode(e),
        };
        self.finish_step(reason)
    }

    pub(super) fn confirm_deadline(&self) -> Instant {
        self.end.sent_at + Duration::from_millis(self.config.limits.confirm_timeout_ms)
    }

    /// Ends the migration with `why`, described by `reason`.
    pub(super) fn fail(&mut self, why: EndReason, reason: fmt::Arguments<'_>) {
        // A migration that is already ending keeps its first outcome and
        // reason; only a completion whose last write has not been confirmed
        // can still turn into a failure.
        match self.step {
            Step::Done => return,
            Step::Finish(end) if end != EndReason::Completed || self.end.confirmed => {
                return;
            }
            _ => {}
        }
        if self.postcopy.guest_on_destination {
            self.stats.error_desc.set(format_args!(
                "postcopy failed after the switchover ({reason}); the guest stays stopped \
                 on the source, whose memory is no longer current"
            ));
        } else if self.end.committed {
            self.stats.error_desc.set(format_args!(
                "no confirmation after the commit ({reason}); the guest stays paused here"
            ));
            self.stats.ambiguous_end = Some(AmbiguousEnd::SourceCommitted);
        } else {
            self.stats.error_desc.set(reason);
        }
        if matches!(
            self.status,
            MigrationStatus::PostcopyRecoverSetup | MigrationStatus::PostcopyRecover
        ) {
            // The table leaves recovery only through a pause.
            self.set_status(MigrationStatus::PostcopyPaused);
        }
        self.set_status(MigrationStatus::Failed);
        self.scan.batch.clear();
        self.postcopy.requests.clear();
        self.step = Step::Finish(why);
    }

    /// Undoes what the migration did to the guest before reporting the end:
    /// the throttle lifted, then the vCPUs resumed unless the guest now
    /// lives on the destination.
    pub(super) fn finish_step(&mut self, reason: EndReason) -> SourceAction<'static> {
        let status = reason.status();
        // A failed postcopy leaves the guest stopped here: it has been
        // running on the destination, and restarting the stale copy would
        // run the guest twice.
        // After the commit the destination may run it: the same.
        // The throttle first: a resumed guest runs at full speed at once.
        if self.stats.throttle.percent > 0 || self.throttle.pending {
            return self.throttle_action(0);
        }
        if self.vcpus_stopped
            && status != MigrationStatus::Completed
            && !self.postcopy.guest_on_destination
            && !self.end.committed
        {
            self.vcpus_stopped = false;
            return SourceAction::ResumeVcpus;
        }
        if status == MigrationStatus::Completed {
            let end = self.now;
            // Postcopy measured its downtime at the switchover already.
            if let (Some(stopped), None) = (self.stopped_at, self.stats.downtime_ms) {
                self.stats.downtime_ms = Some((end - stopped).as_millis() as u64);
            }
            let transfer_ms = self
                .stats
                .total_time_ms
                .saturating_sub(self.stats.setup_time_ms);
            if transfer_ms > 0 {
                self.stats.ram.mbps =
                    self.stats.ram.transferred as f64 * 8.0 / transfer_ms as f64 / 1000.0;
            }
        }
        self.set_status(status);
        self.refresh_stats();
        self.step = Step::Done;
        self.end.reason = Some(reason);
        SourceAction::Finished(reason)
    }
}
