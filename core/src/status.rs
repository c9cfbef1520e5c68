//! Migration statuses and the legal moves between them.
//!
//! QEMU writes its status from several threads and resolves the races with
//! `migrate_set_state(&state, old, new)`, a compare-and-swap. The engines
//! here need no such cell: each is a `&mut self` state machine owned by one
//! caller, so only that caller moves its status, and a cancel from another
//! thread reaches the engine through the shim (a flag or a channel its
//! migration thread checks, then [`cancel`](crate::source::SourceEngine::cancel)).
//! What the engines do check is the move itself: every status change goes
//! through [`MigrationStatus::transition`] and the table below.
//!
//! The state names and their numbering follow QEMU's QAPI `MigrationStatus`
//! enum (15 states since QEMU 9.1), so a status printed or reported by
//! livemig reads exactly like one from QEMU.

use core::fmt;
use core::str::FromStr;

/// Where a migration is in its life, on either the source or the destination.
///
/// The discriminants equal QEMU's `MIGRATION_STATUS_*` values, so the byte
/// [`MigrationStatus::from_repr`] reads means the same thing as QEMU's
/// `int state`.
#[repr(u8)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MigrationStatus {
    /// No migration has been started (or the last one was reset).
    #[default]
    None = 0,
    /// Channels are being connected and devices prepared; no RAM sent yet.
    Setup = 1,
    /// A cancel was requested; the engine is tearing the migration down.
    Cancelling = 2,
    /// The cancel finished; the source guest keeps running.
    Cancelled = 3,
    /// Precopy: RAM is being copied while the guest runs.
    Active = 4,
    /// Postcopy: the destination runs the guest and pulls missing pages.
    PostcopyActive = 5,
    /// Postcopy lost its channel; both sides wait for a recovery.
    PostcopyPaused = 6,
    /// Source only: a recovery was requested and new channels are being
    /// connected (QEMU 9.1+).
    PostcopyRecoverSetup = 7,
    /// Both sides are handshaking to resume an interrupted postcopy.
    PostcopyRecover = 8,
    /// The guest now lives on the destination (or COLO failed over).
    Completed = 9,
    /// The migration failed; on the source the guest resumes if it was running.
    Failed = 10,
    /// COLO fault-tolerance checkpointing after the initial migration.
    Colo = 11,
    /// Paused before switchover, waiting for the user to continue
    /// (the `pause-before-switchover` capability).
    PreSwitchover = 12,
    /// The guest is stopped and device state is being sent.
    Device = 13,
    /// Waiting for the guest to unplug devices that cannot migrate (e.g.
    /// failover VFIO NICs) before RAM transfer starts.
    WaitUnplug = 14,
}

/// Every legal move, written once: `(from, to)` and the QEMU code that
/// performs it. [`MigrationStatus::can_transition_to`] and
/// [`MigrationStatus::transition`] are driven by this table.
///
/// Sources: seed 004 (`migration/migration.c`, QEMU 3.x, line numbers given),
/// the newer behaviour the seed headers 000–002 describe (wait-unplug,
/// recovery failing back to paused), QEMU 9.1 (`postcopy-recover-setup`),
/// QEMU 10.0 ("always set DEVICE state": `active -> device` without
/// pause-before-switchover) and the destination side in `savevm.c`,
/// `postcopy-ram.c` and `colo.c`.
///
/// A state never "transitions" to itself: QEMU's compare-and-swap of a
/// state onto itself changes nothing, so such pairs are not listed.
const TRANSITIONS: [(MigrationStatus, MigrationStatus); 42] = {
    use MigrationStatus::*;
    [
        // migrate_init (seed 004 l.1533); dest: qemu_start_incoming_migration (QEMU 8.1+).
        (None, Setup),
        // dest: process_incoming_migration_co (seed 004 l.394).
        (None, Active),
        // migration_thread (seed 004 l.3021); dest: process_incoming_migration_co (QEMU 8.1+).
        (Setup, Active),
        // qemu_savevm_wait_unplug, called from migration_thread (QEMU 5.1+).
        (Setup, WaitUnplug),
        // qemu_savevm_wait_unplug once the guest has unplugged.
        (WaitUnplug, Active),
        // migrate_fd_error (l.1396), qmp_migrate (l.1762), migrate_fd_connect (l.3138).
        (Setup, Failed),
        // migration_maybe_pause (l.2548), from migration_completion or postcopy_start.
        (Active, PreSwitchover),
        // migration_maybe_pause (l.2551) called by migration_completion.
        (PreSwitchover, Device),
        // migration_maybe_pause (l.2551) called by postcopy_start.
        (PreSwitchover, PostcopyActive),
        // migration_switchover_start without pause-before-switchover (QEMU 10.0).
        (Active, Device),
        // postcopy_start after the device state is packaged (QEMU 10.0).
        (Device, PostcopyActive),
        // postcopy_start (l.2361); dest: postcopy_ram_listen_thread.
        (Active, PostcopyActive),
        // migration_completion without pause-before-switchover (l.2627);
        // dest: process_incoming_migration_bh (l.378).
        (Active, Completed),
        // migration_completion after the device state went out (l.2627).
        (Device, Completed),
        // migration_completion (l.2627); dest: postcopy_ram_listen_thread.
        (PostcopyActive, Completed),
        // migrate_start_colo_process (colo.c), reached from migration_iteration_finish
        // (l.2942); dest: colo_process_incoming_thread.
        (Active, Colo),
        // migrate_start_colo_process once DEVICE is always set (QEMU 10.1).
        (Device, Colo),
        // colo_process_checkpoint / colo_process_incoming_thread on failover.
        (Colo, Completed),
        // migration_detect_error (l.2804), migration_completion (l.2652);
        // dest: process_incoming_migration_co (l.433).
        (Active, Failed),
        // migration_completion failing after migration_maybe_pause (l.2652).
        (Device, Failed),
        // An I/O error while paused before switchover. QEMU only notices it
        // after migrate-continue, from device; livemig fails at once so the
        // guest is resumed on the source without waiting for the operator.
        (PreSwitchover, Failed),
        // postcopy_start (l.2498, l.2507), migration_detect_error on a non-EIO
        // error (l.2804); dest: postcopy_ram_listen_thread.
        (PostcopyActive, Failed),
        // migrate_fd_connect when the resumed return path cannot open (l.3123).
        (PostcopyPaused, Failed),
        // postcopy_pause (l.2727); dest: postcopy_pause_incoming.
        (PostcopyActive, PostcopyPaused),
        // postcopy_pause when the recovery channel breaks too (seed 002:
        // "Allow network to fail even during recovery").
        (PostcopyRecover, PostcopyPaused),
        // migrate_prepare on a resume request (QEMU 9.1).
        (PostcopyPaused, PostcopyRecoverSetup),
        // migrate_fd_connect on resume (QEMU 9.1).
        (PostcopyRecoverSetup, PostcopyRecover),
        // migrate_fd_error: "never fail a postcopy migration" (QEMU 9.1).
        (PostcopyRecoverSetup, PostcopyPaused),
        // migrate_fd_connect on resume (l.3131); dest: postcopy_try_recover (l.484).
        (PostcopyPaused, PostcopyRecover),
        // migrate_handle_rp_resume_ack (l.2129); dest: loadvm_postcopy_handle_resume.
        (PostcopyRecover, PostcopyActive),
        // livemig's own: the destination had completed before the cut and
        // says so again (SHUT(0)) on the new return path, so the source
        // completes instead of asking for bitmaps nobody will send.
        (PostcopyRecoverSetup, Completed),
        // migrate_fd_cancel (l.1421) from every state migration_is_running accepts.
        (Setup, Cancelling),
        (Active, Cancelling),
        (PostcopyActive, Cancelling),
        (PostcopyPaused, Cancelling),
        (PostcopyRecoverSetup, Cancelling),
        (PostcopyRecover, Cancelling),
        (PreSwitchover, Cancelling),
        (Device, Cancelling),
        (WaitUnplug, Cancelling),
        (Colo, Cancelling),
        // migrate_fd_cleanup (l.1371).
        (Cancelling, Cancelled),
    ]
};

/// Number of states; the length of [`MigrationStatus::ALL`].
const STATE_COUNT: usize = 15;

/// `SUCCESSORS[from]` has bit `to` set when `from -> to` is in [`TRANSITIONS`].
const SUCCESSORS: [u16; STATE_COUNT] = build_successors();

const fn build_successors() -> [u16; STATE_COUNT] {
    let mut masks = [0u16; STATE_COUNT];
    let mut i = 0;
    while i < TRANSITIONS.len() {
        let (from, to) = TRANSITIONS[i];
        masks[from as usize] |= 1 << (to as u8);
        i += 1;
    }
    masks
}

impl MigrationStatus {
    /// Every state in discriminant order, for iteration (e.g. listing names).
    pub const ALL: [MigrationStatus; STATE_COUNT] = [
        Self::None,
        Self::Setup,
        Self::Cancelling,
        Self::Cancelled,
        Self::Active,
        Self::PostcopyActive,
        Self::PostcopyPaused,
        Self::PostcopyRecoverSetup,
        Self::PostcopyRecover,
        Self::Completed,
        Self::Failed,
        Self::Colo,
        Self::PreSwitchover,
        Self::Device,
        Self::WaitUnplug,
    ];

    /// QEMU's name for the state, as `query-migrate` and the `MIGRATION`
    /// event report it (e.g. `"postcopy-recover-setup"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Active => "active",
            Self::PostcopyActive => "postcopy-active",
            Self::PostcopyPaused => "postcopy-paused",
            Self::PostcopyRecoverSetup => "postcopy-recover-setup",
            Self::PostcopyRecover => "postcopy-recover",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Colo => "colo",
            Self::PreSwitchover => "pre-switchover",
            Self::Device => "device",
            Self::WaitUnplug => "wait-unplug",
        }
    }

    /// The state QEMU calls `name`, or `None` if no state has that name.
    /// Names are matched exactly (QEMU's are lower-case).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The state whose discriminant (QEMU's numeric value) is `raw`.
    pub const fn from_repr(raw: u8) -> Option<Self> {
        if (raw as usize) < STATE_COUNT {
            Some(Self::ALL[raw as usize])
        } else {
            Option::None
        }
    }

    /// Whether the protocol allows moving from `self` to `to` (see the
    /// transition table in this module). Moving to the same state is not a
    /// transition and returns `false`.
    pub const fn can_transition_to(self, to: MigrationStatus) -> bool {
        SUCCESSORS[self as usize] & (1 << (to as u8)) != 0
    }

    /// `to` if the move from `self` is legal, else a [`TransitionError`]
    /// naming both states. Pure: the engines call it for every move.
    pub const fn transition(self, to: MigrationStatus) -> Result<MigrationStatus, TransitionError> {
        if self.can_transition_to(to) {
            Ok(to)
        } else {
            Err(TransitionError { from: self, to })
        }
    }

    /// A migration is under way and not being cancelled: capabilities and
    /// some parameters may not change now.
    ///
    /// Matches QEMU's `migration_is_setup_or_active()` with the states
    /// added after seed 004 (wait-unplug, colo, postcopy-recover-setup).
    pub const fn is_setup_or_active(self) -> bool {
        matches!(
            self,
            Self::Active
                | Self::PostcopyActive
                | Self::PostcopyPaused
                | Self::PostcopyRecoverSetup
                | Self::PostcopyRecover
                | Self::Setup
                | Self::PreSwitchover
                | Self::Device
                | Self::WaitUnplug
                | Self::Colo
        )
    }

    /// Something still owns migration resources: [`is_setup_or_active`]
    /// plus `cancelling`, whose teardown has not finished. A new migration
    /// must not start while this holds.
    ///
    /// Matches QEMU's `migration_is_running()` (declared in seeds 000/001);
    /// `colo` is included as in QEMU 9.2+, which made this a strict superset
    /// of `migration_is_setup_or_active()`.
    ///
    /// [`is_setup_or_active`]: MigrationStatus::is_setup_or_active
    pub const fn is_running(self) -> bool {
        self.is_setup_or_active() || matches!(self, Self::Cancelling)
    }

    /// Nothing is in progress: a migration may be started and blockers may
    /// be added. Matches QEMU's `migration_is_idle()` (seed 004 l.1484):
    /// `none`, `cancelled`, `completed`, `failed`.
    pub const fn is_idle(self) -> bool {
        matches!(
            self,
            Self::None | Self::Cancelled | Self::Completed | Self::Failed
        )
    }

    /// The migration ended without success. Matches QEMU's
    /// `migration_has_failed()` (seed 004 l.1466): `cancelled` or `failed`.
    pub const fn has_failed(self) -> bool {
        matches!(self, Self::Cancelled | Self::Failed)
    }

    /// Postcopy has started, so the guest's only complete copy of RAM is
    /// split across both hosts and the source must not resume the guest.
    ///
    /// Matches QEMU's `migration_in_postcopy()` since 9.1: postcopy-active,
    /// -paused, -recover-setup and -recover. (Seed 004, l.1472, predates
    /// recovery and tests `postcopy-active` alone.)
    pub const fn in_postcopy(self) -> bool {
        matches!(
            self,
            Self::PostcopyActive
                | Self::PostcopyPaused
                | Self::PostcopyRecoverSetup
                | Self::PostcopyRecover
        )
    }

    /// Postcopy has a live channel (running or handshaking a recovery), so a
    /// user pause can act by shutting it down. Matches QEMU's
    /// `migration_postcopy_is_alive()` (declared in seed 002): postcopy-active
    /// and postcopy-recover.
    pub const fn postcopy_is_alive(self) -> bool {
        matches!(self, Self::PostcopyActive | Self::PostcopyRecover)
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not the name of any [`MigrationStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownStatusError;

impl fmt::Display for UnknownStatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown migration status name (expected e.g. 'active' or 'postcopy-paused')")
    }
}

impl core::error::Error for UnknownStatusError {}

impl FromStr for MigrationStatus {
    type Err = UnknownStatusError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_name(s).ok_or(UnknownStatusError)
    }
}

/// One status change an engine made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusChange {
    /// The state before.
    pub from: MigrationStatus,
    /// The state after.
    pub to: MigrationStatus,
}

/// Status changes an engine keeps until its caller drains them
/// ([`SourceEngine::poll_status_change`](crate::source::SourceEngine::poll_status_change),
/// [`DestinationEngine::poll_status_change`](crate::destination::DestinationEngine::poll_status_change)):
/// a shim reports them as events, a test checks which moves were made. A
/// caller that never drains them loses the oldest beyond
/// [`STATUS_CHANGES_KEPT`], never the newest.
#[derive(Debug, Clone, Default)]
pub struct StatusChanges(heapless::Deque<StatusChange, STATUS_CHANGES_KEPT>);

/// Status changes kept undrained (a whole migration makes about ten).
pub const STATUS_CHANGES_KEPT: usize = 32;

impl StatusChanges {
    /// Remembers a change, dropping the oldest when full.
    pub(crate) fn record(&mut self, from: MigrationStatus, to: MigrationStatus) {
        if self.0.is_full() {
            self.0.pop_front();
        }
        let _ = self.0.push_back(StatusChange { from, to });
    }

    /// The oldest change not yet drained.
    pub(crate) fn pop(&mut self) -> Option<StatusChange> {
        self.0.pop_front()
    }
}

/// A move the transition table does not allow, e.g. `completed -> active`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransitionError {
    /// The state the move started from.
    pub from: MigrationStatus,
    /// The state that was asked for.
    pub to: MigrationStatus,
}

impl fmt::Display for TransitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "illegal migration state transition from '{}' to '{}'",
            self.from, self.to
        )
    }
}

impl core::error::Error for TransitionError {}

#[cfg(test)]
mod tests {
    use super::MigrationStatus::*;
    use super::*;
    use std::string::ToString;
    use std::vec::Vec;

    /// The transitions QEMU performs, listed independently of `TRANSITIONS`
    /// so the table cannot drift unnoticed. Each entry cites where it is seen.
    const EXPECTED: &[(MigrationStatus, MigrationStatus)] = &[
        // migrate_init, seed 004 l.1533
        (None, Setup),
        // process_incoming_migration_co, seed 004 l.394
        (None, Active),
        // migration_thread, seed 004 l.3021
        (Setup, Active),
        // qemu_savevm_wait_unplug (wait_unplug_sem, seed 000)
        (Setup, WaitUnplug),
        // qemu_savevm_wait_unplug
        (WaitUnplug, Active),
        // migrate_fd_error, seed 004 l.1396
        (Setup, Failed),
        // migration_maybe_pause, seed 004 l.2548
        (Active, PreSwitchover),
        // migration_maybe_pause via migration_completion, l.2551
        (PreSwitchover, Device),
        // migration_maybe_pause via postcopy_start, l.2551
        (PreSwitchover, PostcopyActive),
        // QEMU 10.0 "always set DEVICE state"
        (Active, Device),
        // QEMU 10.0 postcopy_start
        (Device, PostcopyActive),
        // postcopy_start, seed 004 l.2361
        (Active, PostcopyActive),
        // migration_completion l.2627, process_incoming_migration_bh l.378
        (Active, Completed),
        // migration_completion with current_active_state = device
        (Device, Completed),
        // migration_completion in postcopy
        (PostcopyActive, Completed),
        // migrate_start_colo_process, seed 004 l.2942
        (Active, Colo),
        // QEMU 10.1 COLO fix
        (Device, Colo),
        // colo failover
        (Colo, Completed),
        // migration_detect_error l.2804
        (Active, Failed),
        // migration_completion fail l.2652
        (Device, Failed),
        // livemig: an I/O error while paused before switchover
        (PreSwitchover, Failed),
        // postcopy_start fail l.2507
        (PostcopyActive, Failed),
        // migrate_fd_connect resume failure l.3123
        (PostcopyPaused, Failed),
        // postcopy_pause l.2727
        (PostcopyActive, PostcopyPaused),
        // seed 002: recovery may fail back to paused
        (PostcopyRecover, PostcopyPaused),
        // QEMU 9.1 migrate_prepare
        (PostcopyPaused, PostcopyRecoverSetup),
        // QEMU 9.1 migrate_fd_connect
        (PostcopyRecoverSetup, PostcopyRecover),
        // QEMU 9.1 migrate_fd_error
        (PostcopyRecoverSetup, PostcopyPaused),
        // migrate_fd_connect l.3131, postcopy_try_recover l.484
        (PostcopyPaused, PostcopyRecover),
        // migrate_handle_rp_resume_ack l.2129
        (PostcopyRecover, PostcopyActive),
        // livemig: a completed destination answers a recovery with SHUT(0)
        (PostcopyRecoverSetup, Completed),
        // migrate_fd_cancel l.1421, from every running state but cancelling itself:
        (Setup, Cancelling),
        (Active, Cancelling),
        (PostcopyActive, Cancelling),
        (PostcopyPaused, Cancelling),
        (PostcopyRecoverSetup, Cancelling),
        (PostcopyRecover, Cancelling),
        (PreSwitchover, Cancelling),
        (Device, Cancelling),
        (WaitUnplug, Cancelling),
        (Colo, Cancelling),
        // migrate_fd_cleanup l.1371
        (Cancelling, Cancelled),
    ];

    #[test]
    fn every_pair_matches_the_independent_list() {
        let mut legal = 0;
        for from in MigrationStatus::ALL {
            for to in MigrationStatus::ALL {
                let expected = EXPECTED.contains(&(from, to));
                assert_eq!(
                    from.can_transition_to(to),
                    expected,
                    "{from} -> {to}: table says {}, list says {expected}",
                    from.can_transition_to(to)
                );
                assert_eq!(from.transition(to).is_ok(), expected);
                legal += usize::from(expected);
            }
        }
        assert_eq!(legal, EXPECTED.len(), "duplicate entries in EXPECTED");
        assert_eq!(legal, TRANSITIONS.len(), "duplicate rows in TRANSITIONS");
    }

    #[test]
    fn transition_error_names_both_states() {
        let err = Completed.transition(Active).unwrap_err();
        assert_eq!(
            err,
            TransitionError {
                from: Completed,
                to: Active
            }
        );
        assert_eq!(
            err.to_string(),
            "illegal migration state transition from 'completed' to 'active'"
        );
        assert_eq!(
            PostcopyActive
                .transition(PostcopyRecoverSetup)
                .unwrap_err()
                .to_string(),
            "illegal migration state transition from 'postcopy-active' to 'postcopy-recover-setup'"
        );
        assert_eq!(Active.transition(Device), Ok(Device));
    }

    #[test]
    fn names_round_trip_and_match_qemu() {
        let names: Vec<&str> = MigrationStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            [
                "none",
                "setup",
                "cancelling",
                "cancelled",
                "active",
                "postcopy-active",
                "postcopy-paused",
                "postcopy-recover-setup",
                "postcopy-recover",
                "completed",
                "failed",
                "colo",
                "pre-switchover",
                "device",
                "wait-unplug",
            ]
        );
        for (i, s) in MigrationStatus::ALL.into_iter().enumerate() {
            assert_eq!(s as usize, i);
            assert_eq!(MigrationStatus::from_repr(i as u8), Some(s));
            assert_eq!(MigrationStatus::from_name(s.as_str()), Some(s));
            assert_eq!(s.as_str().parse::<MigrationStatus>(), Ok(s));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert_eq!(MigrationStatus::from_repr(15), Option::None);
        assert_eq!(MigrationStatus::from_name("Active"), Option::None);
        assert_eq!(MigrationStatus::from_name(""), Option::None);
        assert_eq!(
            "postcopy".parse::<MigrationStatus>(),
            Err(UnknownStatusError)
        );
    }

    #[test]
    fn predicates_match_qemu_helpers() {
        let set = |f: fn(MigrationStatus) -> bool| -> Vec<MigrationStatus> {
            MigrationStatus::ALL.into_iter().filter(|s| f(*s)).collect()
        };
        assert_eq!(
            set(MigrationStatus::is_setup_or_active),
            [
                Setup,
                Active,
                PostcopyActive,
                PostcopyPaused,
                PostcopyRecoverSetup,
                PostcopyRecover,
                Colo,
                PreSwitchover,
                Device,
                WaitUnplug
            ]
        );
        assert_eq!(
            set(MigrationStatus::is_running),
            [
                Setup,
                Cancelling,
                Active,
                PostcopyActive,
                PostcopyPaused,
                PostcopyRecoverSetup,
                PostcopyRecover,
                Colo,
                PreSwitchover,
                Device,
                WaitUnplug
            ]
        );
        assert_eq!(
            set(MigrationStatus::is_idle),
            [None, Cancelled, Completed, Failed]
        );
        assert_eq!(set(MigrationStatus::has_failed), [Cancelled, Failed]);
        assert_eq!(
            set(MigrationStatus::in_postcopy),
            [
                PostcopyActive,
                PostcopyPaused,
                PostcopyRecoverSetup,
                PostcopyRecover
            ]
        );
        assert_eq!(
            set(MigrationStatus::postcopy_is_alive),
            [PostcopyActive, PostcopyRecover]
        );
        // QEMU 9.2 replaced migration_is_idle() with !migration_is_running().
        for s in MigrationStatus::ALL {
            assert_eq!(s.is_idle(), !s.is_running(), "{s}");
        }
    }

    #[test]
    fn terminal_states_have_no_successors() {
        for s in [Cancelled, Completed, Failed] {
            assert!(
                MigrationStatus::ALL
                    .iter()
                    .all(|t| !s.can_transition_to(*t)),
                "{s}"
            );
        }
    }

    #[test]
    fn cancel_is_legal_exactly_where_running() {
        for s in MigrationStatus::ALL {
            assert_eq!(
                s.can_transition_to(Cancelling),
                s.is_setup_or_active(),
                "{s}"
            );
        }
    }
}
