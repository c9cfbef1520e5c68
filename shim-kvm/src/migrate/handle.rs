//! The caller's side of a migration running on its own thread: live
//! statistics, events (a postcopy pause and its recovery), cancel, and the
//! report at the end.
//!
//! [`super::source::migrate`] and [`super::destination::receive`] spawn
//! the migration thread and return one of these at once. Every method takes
//! `&self` (except [`join`](MigrationHandle::join)) and the handles are
//! `Send + Sync`, so any thread may poll the statistics or cancel while
//! another waits; put a handle in an `Arc` to share it. Dropping a handle
//! does not stop its migration: the thread runs on to the end, detached,
//! and the guest ends where that end leaves it (cancel first to keep it on
//! the source).

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use livemig_core::destination::DestError;
use livemig_core::source::SourceError;
use livemig_core::stats::MigrationStats;

use super::MigrateError;
use super::cancel::CancelRequest;
use super::destination::DestinationReport;
use super::source::{CancelGate, SourceReport};

/// What the migration thread and its handle share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// The engine's statistics as of the migration thread's last report.
    stats: Mutex<MigrationStats>,
    /// Set (under the lock) when the migration thread ends, however it ends.
    finished: Mutex<bool>,
    ended: Condvar,
    /// The cancel (source) or interrupt (destination) request.
    pub(crate) cancel: CancelRequest,
    /// The engine refused that request (the first refusal).
    refused: Mutex<Option<CancelRefused>>,
    /// Events not yet taken by the handle's caller.
    events: Mutex<VecDeque<MigrationEvent>>,
}

/// Most events kept for a caller that does not take them: the oldest go
/// first (a source retrying for ten minutes must not grow without bound).
const MAX_EVENTS: usize = 256;

/// Something a migration went through that its statistics alone would not
/// show as it happened: a postcopy pause and the steps of its recovery.
/// Taken in order with [`MigrationHandle::poll_event`] or
/// [`ReceiveHandle::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationEvent {
    /// Postcopy lost its connection after the switchover: the migration is
    /// `postcopy-paused`, not failed. The destination's guest runs on
    /// (vCPUs touching a missing page wait), the source keeps its stopped
    /// guest and every page not yet received.
    PostcopyPaused {
        /// What broke, in the operator's words.
        reason: String,
    },
    /// The paused side is still waiting for a new connection: the source
    /// retrying `address`, the destination listening there.
    AwaitingRecovery {
        /// Where the new connection is sought.
        address: String,
        /// Seconds left before giving up.
        seconds_left: u64,
        /// Why the last attempt failed (source only).
        last_error: Option<String>,
    },
    /// A new connection is up and the recovery handshake begins
    /// (`postcopy-recover-setup`).
    RecoveryStarted {
        /// The peer of the new connection.
        peer: String,
    },
    /// Source, postcopy-preempt: the recovery's new preempt channel could
    /// not be connected, so the recovery goes on without one: requested
    /// pages take the main stream, still ahead of the background pass but
    /// behind the background bytes already queued in its socket.
    PreemptNotReopened {
        /// Why the connection failed.
        reason: String,
    },
    /// The handshake ended: back in `postcopy-active`, the pages still
    /// missing are being sent, requested ones first.
    Recovered {
        /// Recoveries of this migration so far.
        recoveries: u64,
    },
    /// No new connection came in time: the migration failed. `reason`
    /// says why it was given up, `pages` where the guest's pages are and
    /// what the operator can still do (the migration's error, as the
    /// summary says it once more: the event's line shows the reason only).
    RecoveryAbandoned {
        /// Why the recovery was given up.
        reason: String,
        /// Where the guest's pages are: the migration's error.
        pages: String,
    },
}

impl MigrationEvent {
    /// The event's name in `--json` output and logs.
    pub fn name(&self) -> &'static str {
        match self {
            MigrationEvent::PostcopyPaused { .. } => "postcopy-paused",
            MigrationEvent::AwaitingRecovery { .. } => "awaiting-recovery",
            MigrationEvent::RecoveryStarted { .. } => "recovery-started",
            MigrationEvent::PreemptNotReopened { .. } => "preempt-not-reopened",
            MigrationEvent::Recovered { .. } => "recovered",
            MigrationEvent::RecoveryAbandoned { .. } => "recovery-abandoned",
        }
    }
}

impl fmt::Display for MigrationEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationEvent::PostcopyPaused { reason } => write!(
                f,
                "postcopy paused ({reason}): the guest's pages are split between the hosts; \
                 waiting for a new connection"
            ),
            MigrationEvent::AwaitingRecovery {
                address,
                seconds_left,
                last_error: Some(e),
            } => write!(
                f,
                "postcopy paused: still retrying {address} ({e}); giving up in {seconds_left} s"
            ),
            MigrationEvent::AwaitingRecovery {
                address,
                seconds_left,
                last_error: None,
            } => write!(
                f,
                "postcopy paused: waiting for the source to reconnect on {address}; \
                 giving up in {seconds_left} s"
            ),
            MigrationEvent::RecoveryStarted { peer } => {
                write!(f, "postcopy recovery: new connection with {peer}")
            }
            MigrationEvent::PreemptNotReopened { reason } => write!(
                f,
                "postcopy recovery without a preempt channel ({reason}): requested pages \
                 take the main stream"
            ),
            MigrationEvent::Recovered { recoveries } => {
                write!(
                    f,
                    "postcopy recovered (recovery {recoveries}); the migration goes on"
                )
            }
            MigrationEvent::RecoveryAbandoned { reason, .. } => {
                write!(f, "postcopy recovery given up: {reason}")
            }
        }
    }
}

/// Why a cancel (or the destination's interrupt) was refused: the guest
/// already belongs to the destination, or is loaded there and may have
/// been committed. The migration goes on to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRefused {
    /// The source engine's refusal.
    Source(SourceError),
    /// The destination engine's refusal.
    Destination(DestError),
}

impl fmt::Display for CancelRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CancelRefused::Source(e) => write!(f, "{e}; the migration goes on to completion"),
            CancelRefused::Destination(e @ DestError::PostcopyCannotBeInterrupted) => {
                write!(f, "{e}; the migration goes on to completion")
            }
            CancelRefused::Destination(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for CancelRefused {}

impl Shared {
    /// Called by the migration thread as it makes progress.
    pub(crate) fn publish(&self, stats: &MigrationStats) {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone_from(stats);
    }

    /// Called by the migration thread when its engine refused the cancel.
    pub(crate) fn refuse(&self, refusal: CancelRefused) {
        self.refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(refusal);
    }

    /// Called by the migration thread for each event, in order.
    pub(crate) fn emit(&self, event: MigrationEvent) {
        let mut events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        if events.len() == MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(event);
    }

    fn poll_event(&self) -> Option<MigrationEvent> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }

    fn refusal(&self) -> Option<CancelRefused> {
        *self.refused.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn finish(&self) {
        *self.finished.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.ended.notify_all();
    }
}

/// Marks the migration finished when the thread's body returns or unwinds,
/// so that no waiter is left behind by a panic.
struct FinishOnDrop(Arc<Shared>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// A migration thread and the state it shares with its handle.
#[derive(Debug)]
struct Run<R> {
    shared: Arc<Shared>,
    thread: JoinHandle<Result<R, MigrateError>>,
}

impl<R: Send + 'static> Run<R> {
    /// Starts `body` on a thread named `name`.
    fn spawn(
        name: &str,
        shared: Arc<Shared>,
        body: impl FnOnce(&Shared) -> Result<R, MigrateError> + Send + 'static,
    ) -> Result<Self, MigrateError> {
        let theirs = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let guard = FinishOnDrop(theirs);
                body(&guard.0)
            })
            .map_err(|error| MigrateError::Spawn {
                thread: "migration",
                error,
            })?;
        Ok(Run { shared, thread })
    }

    fn stats(&self) -> MigrationStats {
        self.shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn is_finished(&self) -> bool {
        *self
            .shared
            .finished
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut finished = self
            .shared
            .finished
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        while !*finished {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            finished = self
                .shared
                .ended
                .wait_timeout(finished, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    fn join(self) -> Result<R, MigrateError> {
        self.thread.join().map_err(|_| MigrateError::Panicked)?
    }
}

/// A source migration running on its own thread, from
/// [`super::source::migrate`].
#[derive(Debug)]
pub struct MigrationHandle {
    run: Run<SourceReport>,
    gate: Arc<CancelGate>,
}

impl MigrationHandle {
    pub(crate) fn spawn(
        shared: Arc<Shared>,
        gate: Arc<CancelGate>,
        body: impl FnOnce(&Shared) -> Result<SourceReport, MigrateError> + Send + 'static,
    ) -> Result<Self, MigrateError> {
        let run = Run::spawn("livemig-source", shared, body)?;
        Ok(MigrationHandle { run, gate })
    }

    /// The statistics as of the migration thread's last report (every few
    /// tens of milliseconds while it runs; final once it finished).
    pub fn stats(&self) -> MigrationStats {
        self.run.stats()
    }

    /// Cancels the migration (QMP's `migrate_cancel`): the connection is
    /// shut down at once, which also frees a write blocked on a stuck peer,
    /// and the migration ends `cancelled` with the guest running on the
    /// source. Refused once the guest belongs to the destination (after the
    /// postcopy switchover or the precopy commit): the migration then goes
    /// on to its end. Asking twice changes nothing.
    pub fn cancel(&self) {
        self.run.shared.cancel.cancel();
        self.gate.shut();
    }

    /// Whether, and why, the migration refused a [`cancel`](Self::cancel)
    /// (once the guest belongs to the destination).
    pub fn cancel_refused(&self) -> Option<CancelRefused> {
        self.run.shared.refusal()
    }

    /// The oldest event not yet taken (a postcopy pause, its recovery),
    /// or `None`. Events wait for the caller; the oldest are dropped
    /// beyond a few hundred.
    pub fn poll_event(&self) -> Option<MigrationEvent> {
        self.run.shared.poll_event()
    }

    /// Whether the migration thread has ended.
    pub fn is_finished(&self) -> bool {
        self.run.is_finished()
    }

    /// Waits at most `timeout` for the migration thread to end; `true` if
    /// it has.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.run.wait_timeout(timeout)
    }

    /// Waits for the end and returns the report of a migration that ran,
    /// whatever its outcome (a failed one says why in its statistics and
    /// leaves the guest running on the source). `Err` means it could not
    /// be carried out at all.
    pub fn join(self) -> Result<SourceReport, MigrateError> {
        self.run.join()
    }
}

/// An incoming migration running on its own thread, from
/// [`super::destination::receive`].
#[derive(Debug)]
pub struct ReceiveHandle {
    run: Run<DestinationReport>,
}

impl ReceiveHandle {
    pub(crate) fn spawn(
        shared: Arc<Shared>,
        body: impl FnOnce(&Shared) -> Result<DestinationReport, MigrateError> + Send + 'static,
    ) -> Result<Self, MigrateError> {
        Ok(ReceiveHandle {
            run: Run::spawn("livemig-destination", shared, body)?,
        })
    }

    /// The statistics as of the migration thread's last report.
    pub fn stats(&self) -> MigrationStats {
        self.run.stats()
    }

    /// Stops the load and tells the source, which resumes its guest
    /// (refused once the guest runs here, in postcopy).
    pub fn cancel(&self) {
        self.run.shared.cancel.cancel();
    }

    /// [`cancel`](ReceiveHandle::cancel) on behalf of `signal`, which the
    /// source is told (QEMU's "interrupted by SIGTERM").
    pub fn interrupt(&self, signal: i32) {
        self.run.shared.cancel.interrupt(signal);
    }

    /// Whether, and why, the load refused a [`cancel`](Self::cancel) or an
    /// [`interrupt`](Self::interrupt): the guest already runs here
    /// (postcopy), or is loaded and the source may have committed.
    pub fn cancel_refused(&self) -> Option<CancelRefused> {
        self.run.shared.refusal()
    }

    /// The oldest event not yet taken (a postcopy pause, its recovery),
    /// or `None`. Events wait for the caller; the oldest are dropped
    /// beyond a few hundred.
    pub fn poll_event(&self) -> Option<MigrationEvent> {
        self.run.shared.poll_event()
    }

    /// Whether the migration thread has ended.
    pub fn is_finished(&self) -> bool {
        self.run.is_finished()
    }

    /// Waits at most `timeout` for the migration thread to end; `true` if
    /// it has.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.run.wait_timeout(timeout)
    }

    /// Waits for the end and returns what the destination loaded.
    pub fn join(self) -> Result<DestinationReport, MigrateError> {
        self.run.join()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<MigrationHandle>();
        send_sync::<ReceiveHandle>();
    }

    #[test]
    fn a_run_is_watched_cancelled_and_joined_from_other_threads() {
        let run = Run::spawn("livemig-test", Arc::new(Shared::default()), |shared| {
            let mut stats = MigrationStats::default();
            while !shared.cancel.is_cancelled() {
                stats.ram.transferred += 1;
                shared.publish(&stats);
                thread::sleep(Duration::from_millis(1));
            }
            Ok(stats.ram.transferred)
        })
        .unwrap();
        assert!(!run.wait_timeout(Duration::from_millis(20)));
        assert!(!run.is_finished());
        let seen = run.stats().ram.transferred;
        assert!(seen > 0, "published figures are visible");
        let run = Arc::new(run);
        let watcher = {
            let run = Arc::clone(&run);
            thread::spawn(move || run.shared.cancel.cancel())
        };
        watcher.join().unwrap();
        assert!(run.wait_timeout(Duration::from_secs(5)));
        assert!(run.is_finished());
        let run = Arc::into_inner(run).unwrap();
        let last = run.stats().ram.transferred;
        assert!(last >= seen);
        assert_eq!(run.join().unwrap(), last);
    }

    #[test]
    fn a_panicking_migration_thread_ends_its_waiters_and_is_an_error() {
        let run: Run<()> = Run::spawn("livemig-test", Arc::new(Shared::default()), |_| {
            panic!("a bug")
        })
        .unwrap();
        assert!(run.wait_timeout(Duration::from_secs(5)));
        assert!(matches!(run.join(), Err(MigrateError::Panicked)));
    }
}
