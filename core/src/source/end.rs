//! The end of a source migration: the handshake with the destination
//! (LOADED, COMMIT, SHUT), and the typed reason the migration ended with.

use core::fmt;

use crate::return_path::SignalName;
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
        })
    }
}

/// The source's end-of-migration handshake.
pub(super) struct Handshake {
    /// The return path is open: the end is a handshake, not a write.
    pub return_path: bool,
    /// The destination approved the switchover (switchover-ack).
    pub switchover_acked: bool,
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
            committed: false,
            confirmed: false,
            sent_at: Instant::ZERO,
            reason: None,
        }
    }
}
