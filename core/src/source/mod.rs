//! The source engine: decides what to send, when to sync the dirty log,
//! when to clear it, and when to stop the guest — without doing any of it.
//!
//! # Driving it
//!
//! The caller (a VMM shim) owns the socket, the clock, the dirty log and the
//! vCPUs. It calls [`SourceEngine::start`], then loops:
//!
//! 1. [`SourceEngine::poll_action`] until it returns `None`, carrying out
//!    each [`SourceAction`] *before* polling again (the order matters: a
//!    [`SourceAction::ClearDirtyLog`] must reach the dirty log before the
//!    pages of the next [`SourceAction::SendPages`] are read);
//! 2. report what happened with the `handle_*` methods (dirty log fetched,
//!    vCPUs stopped, device state written, a return-path message, an I/O
//!    error, a cancel);
//! 3. when `poll_action` has nothing to do, sleep until
//!    [`SourceEngine::poll_timeout`] or the next input.
//!
//! The engine counts every byte it asks the caller to send as transferred at
//! the moment it hands the action out: the caller is expected to write it
//! before polling again (blocking or buffered), which is what makes the
//! rate limit meaningful. A buffered write is not a delivered one, though:
//! the caller reports the bytes still queued in its send buffers with
//! [`SourceEngine::handle_unsent`] (Linux: `SIOCOUTQ`), and the fixed cost
//! of stopping with [`SourceEngine::handle_stop_cost`], so that the
//! bandwidth is measured as what the peer took and the switchover is
//! decided on what the stop will really wait for.
//!
//! # Convergence
//!
//! The guest may be stopped when the estimated stop fits the downtime
//! limit:
//!
//! ```text
//! stop cost + (dirty bytes + unsent bytes) / measured bandwidth <= downtime-limit
//! ```
//!
//! Which of those stops is taken is the
//! [`SwitchoverPolicy`](crate::config::SwitchoverPolicy)'s choice: by
//! default the shortest the dirty rate allows ([`shortest_stop`]), or
//! QEMU's first one.
//!
//! A limit that cannot be met never stretches the stop: precopy iterates
//! on, and fails with "did not converge" (the guest running on the source)
//! when a limit of [`Limits`](crate::config::Limits) is reached: passes,
//! time, or passes in a row without progress.
//!
//! # The life of a precopy migration
//!
//! ```text
//!  start ─► [setup] header, block list ─► SaveSetupDevices (─► PING(1), PONG)
//!        ─► SyncDirtyLog (initially-set log)
//!        ─► [active] scan dirty pages: ClearDirtyLog? SendPages ... end of pass
//!                    ─► SyncDirtyLog ─► pending < threshold? ──no──► scan again
//!                                             │ yes
//!        ─► StopVcpus ─► [pre-switchover ─► continue ─► device]
//!        ─► SyncDirtyLog (final) ─► SendPages ... (no rate limit, no clears)
//!        ─► SaveDevices ─► end of stream ─► (return path: wait for LOADED
//!        ─► COMMIT ─► wait for SHUT(0))
//!        ─► Finished(completed)
//! ```
//! Cancel and failure leave from any running state: the throttle is lifted,
//! the vCPUs are resumed if they were stopped, and the guest keeps running on
//! the source — until the commit. With the return path, the end of a
//! precopy is a handshake: the destination answers the end of the stream
//! with LOADED (everything checked, guest paused there), and the source
//! answers with COMMIT, after which it never resumes its vCPUs, whatever
//! happens: a failure after the commit (no SHUT(0) within the confirm
//! timeout, a closed connection, a SHUT(1)) leaves the guest paused here
//! and is reported with [`AmbiguousEnd::SourceCommitted`](crate::stats::AmbiguousEnd::SourceCommitted), for the operator
//! to decide (the destination may run the guest). A cancel is refused from
//! the commit on ([`SourceError::AlreadyCommitted`]). Without the return
//! path there is no handshake: the source completes once the end of the
//! stream is written and keeps its guest stopped (see
//! `docs/architecture.md` for that window).

mod batch;
mod catch_up;
mod channels;
mod convergence;
mod end;
mod postcopy;
mod rate;
mod recovery;
mod scan;
pub mod shortest_stop;
mod tracking;
mod verify;

use core::fmt;
use core::time::Duration;

use crate::capabilities::Capabilities;
use crate::clear_map::Chunk;
use crate::config::{ConfigError, MigrationConfig};
use crate::digest::{DigestKey, Verification};
use crate::return_path::{RpMessage, SignalName};
use crate::stats::MigrationStats;
use crate::status::{MigrationStatus, StatusChange, StatusChanges, TransitionError};
use crate::time::Instant;
use crate::wire::{self, BlockInfo, BlockList, Command, PageRange, PreemptHello, Record};

pub use batch::BatchBuilder;
pub use catch_up::{CATCH_UP_PING, CATCH_UP_WAIT};
pub use end::{ConvergenceLimit, EndReason, Violation, Wait};
pub use postcopy::{
    DISCARD_RANGES_PER_RECORD, POSTCOPY_END_PING, POSTCOPY_RUN_PING, PackageFraming, REQUEST_QUEUE,
};
pub use rate::SLICE;
pub use tracking::{BlockTracking, TrackingError};

use channels::Channels;
use convergence::{Convergence, Throttle};
use end::Handshake;
use postcopy::Postcopy;
use rate::RateMeter;
use recovery::Recovery;
use scan::Scan;
use verify::Verify;

/// Most pages the source puts in one batch: 1 MiB of 4 KiB pages, enough to
/// amortise a `writev` and a record header, small enough to keep a rate
/// limit slice fine-grained.
pub const BATCH_PAGES: usize = 256;

/// Most pages in a batch of postcopy's background pass with the preempt
/// channel: 64 KiB. The caller writes each batch whole before it polls
/// again, so a request that arrives meanwhile waits for at most this
/// much of the main socket to drain (about 30 us on loopback) before its
/// page goes out on the preempt channel.
pub const PREEMPT_BACKGROUND_BATCH_PAGES: usize = 16;

/// The value of the ping that follows the setup-time device sections. The
/// destination answers pings in stream order, after loading what came
/// before: its PONG(1) says the sections loaded, a SHUT(1) instead that it
/// refused them, and no page has been sent either way.
pub const SETUP_CHECK_PING: u32 = 1;

/// Smallest scratch buffer the engine accepts: room for the stream header,
/// a few commands, a block list of typical size, and a batch header.
pub const MIN_SCRATCH: usize = 16 * 1024;

/// Most pages one [`PageReader::populated`] query covers: 4096 pages (16
/// MiB of 4 KiB pages, a 32 KiB read of Linux's pagemap) per query keeps
/// the queries of an idle 1 GiB guest at 64. A window never spans two
/// dirty-log clear chunks (it shrinks to the chunk when chunks are
/// smaller), see [`PageReader::populated`].
pub const POPULATED_WINDOW: usize = 4096;

/// Reads guest memory on the engine's behalf, for zero-page detection.
///
/// Implementations must be sound while the guest runs (the KVM shim reads
/// with volatile word loads); a torn read is harmless because any page
/// written after its dirty-log chunk was cleared is sent again.
pub trait PageReader {
    /// True when every byte of `page` in block `block` is zero.
    fn is_zero_page(&self, block: u16, page: u64) -> bool;

    /// The digest term of `page` in block `block` as memory holds it now:
    /// [`DigestKey::term_of_words`] (or [`DigestKey::page_term`]) over the
    /// page's contents, so 0 exactly when the page is all zero. When the
    /// migration verifies itself ([`SourceEngine::verify_with`]) the scan
    /// asks it *instead of* [`is_zero_page`](PageReader::is_zero_page) for
    /// each dirty page it reads (after the page's dirty-log clear): one
    /// read of the page both hashes it and finds it zero, and the term is
    /// booked as the page's batch is handed out. See [`crate::digest`] for
    /// why a guest write between this read and the caller's write of the
    /// page is harmless.
    fn page_term(&self, block: u16, page: u64, key: &DigestKey) -> u64;

    /// Which of the pages `first .. first + 64 * mask.len()` of block
    /// `block` may hold data: bit `i` of word `w` (page `first + 64 * w +
    /// i`) set for a page that is, or may be, populated; clear for a page
    /// the memory never populated (or dropped back, as `MADV_DONTNEED`
    /// does), which reads as zero. The engine sends a clear page as a zero
    /// page without [`is_zero_page`](PageReader::is_zero_page), so reading
    /// it never faults it in (on Linux, reading untouched anonymous memory
    /// maps the zero page: a page fault each, microseconds under nested
    /// virtualization). `first` is a multiple of 64; bits past the block's
    /// end are ignored. The default answers "may hold data" for every page,
    /// which is always correct. Only the first pass asks (later passes
    /// send pages the guest wrote since), and a page a postcopy request
    /// asks for is read instead (a vCPU waits for it).
    ///
    /// Why a stale answer is never wrong: the engine asks for a window only
    /// once the dirty log of every page in it was reset (the clear of the
    /// window's chunk was issued, or the chunk owes none since the last
    /// sync), and forgets the answer at the next sync and the next clear.
    /// A page that becomes populated after the answer was written by the
    /// guest (KVM logs the write: the page had no mapping, or a protected
    /// one) or by a device (the device dirty log) after its log was reset,
    /// so it is dirty again at the next sync and sent then, with its data.
    /// Dirty logging is on before the first pass, so this holds for the
    /// first pass too.
    fn populated(&self, block: u16, first: u64, mask: &mut [u64]) {
        let _ = (block, first);
        mask.fill(u64::MAX);
    }
}

/// What the engine asks its caller to do next.
#[derive(Debug, PartialEq, Eq)]
pub enum SourceAction<'e> {
    /// Write these bytes to the main stream.
    Send(&'e [u8]),
    /// Write `header`, then the contents of each page in `pages` (in order,
    /// each one page of block `block`), straight from guest memory.
    SendPages {
        /// Record header, batch header and page entries.
        header: &'e [u8],
        /// Index of the block in the block list.
        block: u16,
        /// Pages whose data follows the header, in order.
        pages: &'e [u64],
    },
    /// Multifd: write these bytes to channel `channel` (its hello, or a
    /// SYNC packet).
    SendChannel {
        /// The channel, `< multifd-channels`.
        channel: u16,
        /// Encoded hello or packet.
        bytes: &'e [u8],
    },
    /// Multifd: write `header` (packet header and entries) to channel
    /// `channel`, then the contents of each page in `pages` (in order, each
    /// one page of block `block`), straight from guest memory.
    SendChannelPages {
        /// The channel, `< multifd-channels`.
        channel: u16,
        /// Packet header and entries.
        header: &'e [u8],
        /// Index of the block in the block list.
        block: u16,
        /// Pages whose data follows the header, in order.
        pages: &'e [u64],
    },
    /// Postcopy preempt: write these bytes (the channel's hello) to the
    /// preempt channel, a connection of its own from the same connector
    /// as the main stream.
    SendPreempt(&'e [u8]),
    /// Postcopy preempt: write `header` (a Pages record header, batch
    /// header and entries) to the preempt channel, then the contents of
    /// each page in `pages` (in order, each one page of block `block`),
    /// straight from guest memory. Only pages the destination asked for
    /// travel there, ahead of whatever the main stream has queued.
    SendPreemptPages {
        /// Record header, batch header and page entries.
        header: &'e [u8],
        /// Index of the block in the block list.
        block: u16,
        /// Pages whose data follows the header, in order.
        pages: &'e [u64],
    },
    /// Right after the preamble, before any RAM: write the setup-time
    /// device sections as `Device` records (the compatibility record: CPU
    /// model, TSC frequency, vCPU count), then call
    /// [`SourceEngine::handle_setup_devices_sent`]. With the return path
    /// the engine then waits for the destination to accept them, so an
    /// incompatible destination refuses before a page moves. A caller with
    /// nothing to send confirms with zero bytes.
    SaveSetupDevices,
    /// Fetch the dirty log of every block *without clearing it*, hand each to
    /// [`SourceEngine::handle_dirty_log`], then call
    /// [`SourceEngine::handle_sync_done`]. Keep each fetched log: clears
    /// use it as their mask.
    SyncDirtyLog,
    /// Clear the dirty log for the pages of `chunk` in block `block` whose
    /// bits were set in the last fetched log (KVM_CLEAR_DIRTY_LOG with that
    /// part of the fetched bitmap as its mask). Must happen before the next
    /// page is read.
    ClearDirtyLog {
        /// Index of the block.
        block: u16,
        /// The chunk: aligned to the chunk size, clipped to the block.
        chunk: Chunk,
    },
    /// Throttle the vCPUs to run `percent` % less (auto-converge); zero
    /// lifts the throttle.
    SetThrottle {
        /// Share of time the vCPUs are held back, 0..=99.
        percent: u8,
    },
    /// Stop the vCPUs, then call [`SourceEngine::handle_vcpus_stopped`].
    StopVcpus,
    /// Write the device state now, as `Device` records
    /// ([`wire::encode_device_header`] then the bytes), then call
    /// [`SourceEngine::handle_devices_sent`].
    SaveDevices,
    /// Postcopy switchover: serialise the device state as `Device` records
    /// into memory, call [`SourceEngine::package_devices`] with their total
    /// length, write its `head`, the records, then its `tail`, and confirm
    /// with [`SourceEngine::handle_package_sent`]: the destination receives
    /// them as one package it reads whole before loading, between the
    /// postcopy listen and run commands.
    PackageDevices,
    /// The migration did not complete: restart the vCPUs on the source.
    ResumeVcpus,
    /// Postcopy lost its connection (or its peer fell silent) after the
    /// switchover and is paused: close the main connection, the return
    /// path and the preempt channel, keep the vCPUs stopped, connect again
    /// and call [`SourceEngine::resume`] (or, past the caller's deadline,
    /// [`SourceEngine::give_up`]). Nothing more is asked until then.
    Paused,
    /// The migration ended, for this reason ([`EndReason::status`] is its
    /// final status); nothing more will be asked.
    Finished(EndReason),
}

/// Errors in how the engine is set up or driven.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceError {
    /// The configuration is invalid.
    Config(ConfigError),
    /// The scratch buffer is smaller than [`MIN_SCRATCH`] or than the
    /// encoded block list.
    ScratchTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        got: usize,
    },
    /// The block list and the tracking slice differ in length, or there are
    /// more than 65536 blocks.
    BlockCountMismatch {
        /// Blocks in the layout.
        layout: usize,
        /// Tracking entries given.
        tracking: usize,
    },
    /// A tracking entry does not match its block (page count or shift).
    TrackingMismatch {
        /// Index of the block.
        block: u16,
    },
    /// An input arrived that the engine cannot take in its current step
    /// (for example a dirty log while no sync was asked for).
    UnexpectedEvent {
        /// The input.
        event: &'static str,
        /// The engine's state when it arrived.
        status: MigrationStatus,
    },
    /// A block index outside the block list.
    NoSuchBlock(u16),
    /// Postcopy was asked for without the postcopy-ram capability.
    PostcopyNotEnabled,
    /// A cancel after the postcopy switchover, when the guest already runs
    /// on the destination.
    PostcopyCannotBeCancelled,
    /// The device state does not fit in one package record.
    PackageTooLarge {
        /// Bytes of device records.
        len: usize,
    },
    /// A cancel after the commit: the source has given the guest to the
    /// destination and never takes it back.
    AlreadyCommitted,
    /// [`SourceEngine::verify_with`] was given books that are not one per
    /// block of the layout, each of the block's page count.
    DigestBooksMismatch,
    /// The migration id was set after the migration started.
    MigrationIdAfterStart,
    /// A recovery call ([`SourceEngine::resume`], [`SourceEngine::give_up`])
    /// asked for a move the transition table does not allow (for example a
    /// resume while postcopy is not paused).
    Transition(TransitionError),
    /// [`SourceEngine::resume_with_preempt`] was given the migration id of
    /// the preempt channel it replaces: the destination could not tell a
    /// stale connection of the old channel from the new one.
    PreemptIdReused(u64),
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::Config(e) => write!(f, "invalid configuration: {e}"),
            SourceError::ScratchTooSmall { needed, got } => {
                write!(
                    f,
                    "scratch buffer too small: {needed} bytes needed, {got} given"
                )
            }
            SourceError::BlockCountMismatch { layout, tracking } => write!(
                f,
                "{layout} RAM blocks but {tracking} tracking entries (at most 65536 blocks)"
            ),
            SourceError::TrackingMismatch { block } => {
                write!(
                    f,
                    "tracking for block {block} does not match its size or shift"
                )
            }
            SourceError::UnexpectedEvent { event, status } => {
                write!(f, "{event} is not expected in status {status}")
            }
            SourceError::NoSuchBlock(b) => write!(f, "no RAM block with index {b}"),
            SourceError::PostcopyCannotBeCancelled => write!(
                f,
                "postcopy cannot be cancelled: the guest already runs on the destination"
            ),
            SourceError::PostcopyNotEnabled => {
                write!(f, "postcopy needs the postcopy-ram capability")
            }
            SourceError::AlreadyCommitted => write!(
                f,
                "the migration cannot be cancelled: the source has committed, the guest \
                 belongs to the destination"
            ),
            SourceError::DigestBooksMismatch => write!(
                f,
                "the digest books are not one per RAM block with a word per page"
            ),
            SourceError::MigrationIdAfterStart => {
                write!(
                    f,
                    "the migration id must be set before the migration starts"
                )
            }
            SourceError::Transition(e) => write!(f, "{e}"),
            SourceError::PreemptIdReused(id) => write!(
                f,
                "the reopened preempt channel needs a fresh migration id, not {id:#x} again"
            ),
            SourceError::PackageTooLarge { len } => write!(
                f,
                "{len} bytes of device state do not fit in one package (at most {} bytes)",
                wire::MAX_RECORD_BODY
            ),
        }
    }
}

impl core::error::Error for SourceError {}

/// Where the engine is within its state; each variant says what the next
/// poll does or what input it waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    NotStarted,
    SendPreamble,
    /// Postcopy preempt: the next poll hands out the preempt channel's
    /// hello.
    PreemptHello,
    /// Postcopy recovery with the preempt channel opened again: the next
    /// poll hands out the new channel's hello, then the bitmap requests.
    RecoverPreemptHello,
    /// The next poll asks for the setup-time device sections.
    SaveSetupDevices,
    AwaitSetupDevices,
    /// Setup-time sections went out with the return path open: the next
    /// poll sends [`SETUP_CHECK_PING`].
    SetupCheck,
    /// Waiting for the destination's PONG to it (or its refusal).
    AwaitSetupVerdict,
    Sync(SyncKind),
    AwaitSync(SyncKind),
    Iterate,
    StopVcpus,
    AwaitStopped,
    AwaitContinue,
    Drain,
    SaveDevices,
    AwaitDevices,
    /// Postcopy, decided, the guest still running: discarding on the
    /// destination what is dirty now (see [`SourceEngine::begin_switch`]).
    EarlyDiscard,
    /// The stop is decided (after the early discards in postcopy): the
    /// next poll sends [`CATCH_UP_PING`].
    CatchUpPing,
    /// Waiting for the destination's PONG to it, or for [`CATCH_UP_WAIT`]
    /// to pass, before the stop.
    AwaitCatchUp,
    /// Postcopy: sending the discard ranges.
    Discard,
    PackageDevices,
    AwaitPackage,
    AwaitPackageSent,
    /// Postcopy: serving page requests and the background pass.
    Postcopy,
    /// Verifying postcopy, every page sent: the next poll sends an end
    /// ping ([`POSTCOPY_END_PING`]).
    EndPing,
    /// Waiting for the PONG to the last end ping; a RESEND_PAGE meanwhile
    /// goes back to [`Step::Postcopy`].
    AwaitEndPong,
    /// Postcopy paused: the next poll hands out [`SourceAction::Paused`].
    PauseNotice,
    /// Postcopy paused, waiting for [`SourceEngine::resume`].
    Paused,
    /// Recovery: the next poll hands out the new stream's header and the
    /// first bitmap request.
    RecoverStart,
    /// Recovery: the next poll asks for the bitmap of this block.
    RequestBitmap(u16),
    /// Recovery: waiting for the bitmap of the block asked for last.
    AwaitBitmap,
    /// Recovery: every bitmap is in; the next poll sends POSTCOPY_RESUME.
    SendResume,
    /// Recovery: waiting for RESUME_ACK.
    AwaitResumeAck,
    EndOfStream,
    /// Precopy with the return path: the end of the stream is out, waiting
    /// for the destination's LOADED.
    AwaitLoaded,
    /// The destination asked for digest range sums (it locates a
    /// mismatching page): the next poll hands them out, then back to
    /// [`Step::AwaitLoaded`].
    DigestRanges(u16, PageRange),
    /// LOADED arrived: the next poll hands out the COMMIT.
    Commit,
    AwaitShut,
    Finish(EndReason),
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SyncKind {
    /// After the preamble: picks up the initially-set log.
    Setup,
    /// During precopy: convergence check.
    Iteration,
    /// With the vCPUs stopped: the last one.
    Final,
    /// With the vCPUs stopped, before the postcopy switchover.
    Postcopy,
}

/// The sans-IO source side of a migration. See the [module docs](self).
pub struct SourceEngine<'a> {
    config: MigrationConfig,
    layout: &'a [BlockInfo<'a>],
    tracking: &'a mut [BlockTracking<'a>],
    scratch: &'a mut [u8],
    status: MigrationStatus,
    step: Step,
    scan: Scan,
    convergence: Convergence,
    throttle: Throttle,
    meter: RateMeter,
    postcopy: Postcopy,
    end: Handshake,
    /// With multifd: the channels' sequence.
    channels: Option<Channels>,
    /// The id the channels' hellos carry (multifd, postcopy preempt).
    migration_id: u64,
    vcpus_stopped: bool,
    started_at: Instant,
    now: Instant,
    stopped_at: Option<Instant>,
    /// The self-check's key and books, when the migration verifies itself.
    verify: Option<Verify<'a>>,
    /// Postcopy recovery: the bitmap being received.
    recovery: Recovery,
    /// Status changes not yet drained by the caller.
    changes: StatusChanges,
    stats: MigrationStats,
}

impl<'a> SourceEngine<'a> {
    /// A source for the RAM `layout`, with per-block `tracking` storage
    /// (built with [`BlockTracking::new`] using the configuration's
    /// clear-bitmap-shift) and a `scratch` buffer for encoded records.
    pub fn new(
        config: &MigrationConfig,
        layout: &'a [BlockInfo<'a>],
        tracking: &'a mut [BlockTracking<'a>],
        scratch: &'a mut [u8],
    ) -> Result<Self, SourceError> {
        let config = config.validate().map_err(SourceError::Config)?;
        if layout.len() != tracking.len() || layout.len() > usize::from(u16::MAX) + 1 {
            return Err(SourceError::BlockCountMismatch {
                layout: layout.len(),
                tracking: tracking.len(),
            });
        }
        let shift = config.parameters.clear_bitmap_shift;
        let mut total = 0u64;
        let mut page_size = 0u64;
        for (i, (info, t)) in layout.iter().zip(tracking.iter()).enumerate() {
            let pages = info.length / u64::from(info.page_size);
            if t.pages != pages
                || t.clear.shift() != shift
                || t.page_shift != info.page_size.trailing_zeros() as u8
            {
                return Err(SourceError::TrackingMismatch { block: i as u16 });
            }
            total = total.saturating_add(info.length);
            page_size = page_size.max(u64::from(info.page_size));
        }
        let preamble = preamble_len(layout);
        let needed = MIN_SCRATCH.max(preamble);
        if scratch.len() < needed {
            return Err(SourceError::ScratchTooSmall {
                needed,
                got: scratch.len(),
            });
        }
        let mut stats = MigrationStats::default();
        stats.ram.total = total;
        stats.ram.remaining = total;
        stats.ram.page_size = page_size;
        stats.expected_downtime_ms = config.parameters.downtime_limit_ms;
        let return_path = config.capabilities.intersects(
            Capabilities::RETURN_PATH | Capabilities::POSTCOPY_RAM | Capabilities::SWITCHOVER_ACK,
        );
        let meter = RateMeter::new(Instant::ZERO, config.parameters.max_bandwidth);
        let channels = config
            .capabilities
            .contains(Capabilities::MULTIFD)
            .then(|| Channels::new(u16::from(config.parameters.multifd_channels), 0));
        Ok(SourceEngine {
            config,
            layout,
            tracking,
            scratch,
            status: MigrationStatus::None,
            step: Step::NotStarted,
            scan: Scan::new(total),
            convergence: Convergence::new(),
            throttle: Throttle::new(),
            meter,
            postcopy: Postcopy::new(),
            end: Handshake::new(return_path),
            channels,
            migration_id: 0,
            vcpus_stopped: false,
            started_at: Instant::ZERO,
            now: Instant::ZERO,
            stopped_at: None,
            verify: None,
            recovery: Recovery::new(),
            changes: StatusChanges::default(),
            stats,
        })
    }

    /// The migration's status.
    pub fn status(&self) -> MigrationStatus {
        self.status
    }

    /// The oldest status change not yet drained: for events ("paused",
    /// "recovered") and for tests that check which moves were made.
    pub fn poll_status_change(&mut self) -> Option<StatusChange> {
        self.changes.pop()
    }

    /// The effective configuration (capabilities implied by others added).
    pub fn config(&self) -> &MigrationConfig {
        &self.config
    }

    /// Statistics as of the last call that carried a `now`.
    pub fn stats(&self) -> &MigrationStats {
        &self.stats
    }

    /// The switchover threshold: bytes the link can carry within what the
    /// downtime limit leaves after the stop cost, from the last measured
    /// bandwidth. The guest is stopped when the dirty bytes plus the
    /// unsent bytes are below it.
    pub fn threshold_bytes(&self) -> u64 {
        self.convergence.threshold_bytes
    }

    /// Reports how many of the bytes handed out so far the peer has not
    /// taken yet: still in the caller's socket send queue, or sent and not
    /// acknowledged (Linux: `ioctl(SIOCOUTQ)` on the socket). Call it
    /// before each poll, or at least before each
    /// [`handle_sync_done`](Self::handle_sync_done): the bandwidth is
    /// measured on bytes the peer took, and the switchover counts the
    /// queued bytes as still to send. A caller that writes straight to the
    /// wire never needs it.
    pub fn handle_unsent(&mut self, now: Instant, bytes: u64) {
        self.convergence.unsent_bytes = bytes;
        self.meter.set_unsent(bytes);
        self.advance_clock(now);
    }

    /// Reports the fixed part of a stop, which the downtime limit must
    /// cover on top of the RAM still to send: stopping the vCPUs, the final
    /// dirty-log sync, saving the devices, the end-of-stream round trip and
    /// starting the guest on the destination. The caller measures or
    /// estimates it (for example a measured round-trip time plus its own
    /// device-save time) and may update it at any time. A cost at or above
    /// the downtime limit means precopy cannot converge.
    pub fn handle_stop_cost(&mut self, cost: Duration) {
        self.convergence.stop_cost = cost;
        self.update_threshold();
    }

    /// True once the engine has reported [`SourceAction::Finished`].
    pub fn is_finished(&self) -> bool {
        self.step == Step::Done
    }

    /// Sets the id that the channels' hellos carry (multifd, postcopy
    /// preempt; 0 unless set),
    /// so that the destination refuses a connection of another migration
    /// as a channel. Call it before [`start`](Self::start), with a value
    /// unlikely to repeat (random, or the time and process id).
    pub fn set_migration_id(&mut self, id: u64) -> Result<(), SourceError> {
        if self.step != Step::NotStarted {
            return Err(SourceError::MigrationIdAfterStart);
        }
        if let Some(ch) = self.channels.as_mut() {
            *ch = Channels::new(ch.count(), id);
        }
        self.migration_id = id;
        Ok(())
    }

    /// Begins the migration (none -> setup).
    pub fn start(&mut self, now: Instant) -> Result<(), SourceError> {
        if self.step != Step::NotStarted {
            return Err(self.unexpected("start"));
        }
        self.started_at = now;
        self.now = now;
        self.convergence.dirty_period_start = now;
        self.convergence.synced_at = now;
        self.meter.begin(now);
        self.set_status(MigrationStatus::Setup);
        self.step = Step::SendPreamble;
        Ok(())
    }

    /// Hands in the freshly fetched dirty log of block `block` (KVM layout:
    /// bit `i` of word `w` is page `64 * w + i`). Only valid after a
    /// [`SourceAction::SyncDirtyLog`].
    pub fn handle_dirty_log(&mut self, block: u16, log: &[u64]) -> Result<(), SourceError> {
        if !matches!(self.step, Step::AwaitSync(_)) {
            return Err(self.unexpected("a dirty log"));
        }
        let page_size = self
            .layout
            .get(usize::from(block))
            .map(|b| u64::from(b.page_size))
            .ok_or(SourceError::NoSuchBlock(block))?;
        let t = self
            .tracking
            .get_mut(usize::from(block))
            .ok_or(SourceError::NoSuchBlock(block))?;
        let newly = t.dirty.merge(log);
        // A legacy fetch resets the log: what the reader said before is
        // older than the reset (see `PageReader::populated`).
        self.scan.populated.forget();
        if !self.vcpus_stopped {
            t.clear.mark_from_log(log);
        }
        self.convergence.newly_dirty_this_sync += newly;
        self.scan.remaining_bytes = self.scan.remaining_bytes.saturating_add(newly * page_size);
        Ok(())
    }

    /// Every block's dirty log has been handed in.
    pub fn handle_sync_done(&mut self, now: Instant) -> Result<(), SourceError> {
        let Step::AwaitSync(kind) = self.step else {
            return Err(self.unexpected("the end of a dirty-log sync"));
        };
        self.advance_clock(now);
        self.stats.ram.dirty_sync_count += 1;
        self.account_dirty_rate(now);
        match kind {
            SyncKind::Setup => {
                self.stats.setup_time_ms = (now - self.started_at).as_millis() as u64;
                self.meter.restart(now);
                self.set_status(MigrationStatus::Active);
                self.step = Step::Iterate;
            }
            SyncKind::Iteration => {
                self.measure_dirty_rate();
                self.auto_converge();
                self.decide();
            }
            SyncKind::Postcopy => self.enter_postcopy(),
            SyncKind::Final => {
                // max-bandwidth stays a maximum during the stop-and-copy
                // (the threshold was computed from the limited bandwidth, so
                // the downtime still meets its limit); an operator who has
                // more bandwidth for the switchover says so with
                // avail-switchover-bandwidth. QEMU instead lifts every limit
                // here, which breaks max-bandwidth by a downtime's worth.
                let p = &self.config.parameters;
                let switchover = if p.avail_switchover_bandwidth > 0 {
                    p.avail_switchover_bandwidth
                } else {
                    p.max_bandwidth
                };
                self.meter.set_limit(switchover);
                // The convergence check may have stopped the guest in the
                // middle of a pass: the last pass starts from the beginning,
                // after a multifd sync (a page of the interrupted pass must
                // land before its copy from the last one).
                self.scan.rewind();
                if let Some(ch) = self.channels.as_mut() {
                    ch.request_sync();
                }
                self.step = Step::Drain;
            }
        }
        self.convergence.synced_at = self.now;
        self.refresh_stats();
        Ok(())
    }

    /// The setup-time device sections have been written (`bytes` bytes,
    /// headers included; zero when the caller has none), after
    /// [`SourceAction::SaveSetupDevices`].
    pub fn handle_setup_devices_sent(
        &mut self,
        now: Instant,
        bytes: u64,
    ) -> Result<(), SourceError> {
        if self.step != Step::AwaitSetupDevices {
            return Err(self.unexpected("setup-time device state sent"));
        }
        self.advance_clock(now);
        self.count_sent(bytes, 0);
        self.step = if bytes > 0 && self.end.return_path {
            Step::SetupCheck
        } else {
            Step::Sync(SyncKind::Setup)
        };
        Ok(())
    }

    /// The vCPUs are stopped (after [`SourceAction::StopVcpus`]).
    pub fn handle_vcpus_stopped(&mut self, now: Instant) -> Result<(), SourceError> {
        if self.step != Step::AwaitStopped {
            return Err(self.unexpected("vCPUs stopped"));
        }
        self.advance_clock(now);
        // A stopped guest is not held back by the throttle.
        self.book_throttle();
        self.throttle.booked_at = None;
        self.vcpus_stopped = true;
        self.stopped_at = Some(now);
        if self.postcopy.switching {
            self.set_status(MigrationStatus::PostcopyActive);
            self.step = Step::Sync(SyncKind::Postcopy);
        } else if self
            .config
            .capabilities
            .contains(Capabilities::PAUSE_BEFORE_SWITCHOVER)
        {
            self.set_status(MigrationStatus::PreSwitchover);
            self.step = Step::AwaitContinue;
        } else {
            self.step = Step::Sync(SyncKind::Final);
        }
        Ok(())
    }

    /// The operator allows the switchover to go on (pre-switchover -> device);
    /// QMP's `migrate-continue`.
    pub fn continue_switchover(&mut self, now: Instant) -> Result<(), SourceError> {
        if self.step != Step::AwaitContinue {
            return Err(self.unexpected("continue"));
        }
        self.advance_clock(now);
        self.set_status(MigrationStatus::Device);
        self.step = Step::Sync(SyncKind::Final);
        Ok(())
    }

    /// The device state has been written (`bytes` bytes, headers included).
    pub fn handle_devices_sent(&mut self, now: Instant, bytes: u64) -> Result<(), SourceError> {
        if self.step != Step::AwaitDevices {
            return Err(self.unexpected("device state sent"));
        }
        self.advance_clock(now);
        self.count_sent(bytes, 0);
        self.step = Step::EndOfStream;
        Ok(())
    }

    /// A message arrived on the return path.
    pub fn handle_return_path(
        &mut self,
        now: Instant,
        msg: &RpMessage<'_>,
    ) -> Result<(), SourceError> {
        self.advance_clock(now);
        // While paused, whatever still arrives belongs to the lost
        // connection.
        if matches!(self.step, Step::Done | Step::Paused | Step::PauseNotice) {
            return Ok(());
        }
        let recovery_part = matches!(
            msg,
            RpMessage::RecvBitmap { .. }
                | RpMessage::RecvBitmapSize { .. }
                | RpMessage::RecvBitmapBytes { .. }
                | RpMessage::RecvBitmapEnd
                | RpMessage::ResumeAck
        );
        if self.recovering() && !recovery_part {
            self.recovery_interruption(msg);
            return Ok(());
        }
        match msg {
            // A destination without the handshake (an older livemig)
            // completes at the end of the stream and confirms at once: it
            // runs the guest, this side never resumes, as after a commit.
            RpMessage::Shut { error: false }
                if matches!(self.step, Step::AwaitShut | Step::AwaitLoaded) =>
            {
                self.digest_confirmed();
                self.end.confirmed = true;
                self.step = Step::Finish(EndReason::Completed);
            }
            RpMessage::Loaded if self.step == Step::AwaitLoaded => {
                // The destination compared the digest before it said so.
                self.digest_confirmed();
                self.step = Step::Commit;
            }
            RpMessage::Loaded => {
                self.fail(
                    EndReason::Protocol(Violation::LoadedBeforeEnd),
                    format_args!(
                        "the destination reported the stream loaded before its end was sent"
                    ),
                );
            }
            RpMessage::Shut { error: true } => {
                let when = if self.step == Step::AwaitSetupVerdict {
                    " (it refused the setup-time device state: incompatible hosts, \
                     refused before any RAM was sent)"
                } else {
                    ""
                };
                match self.stats.verification {
                    Verification::Mismatch {
                        block,
                        page: Some(page),
                    } => self.fail(
                        EndReason::DestinationFailed,
                        format_args!(
                            "verification failed at the destination: page {page} of RAM block \
                             {block} differs from this source's (the first that does); the \
                             guest runs on here"
                        ),
                    ),
                    Verification::Mismatch { block, page: None } => self.fail(
                        EndReason::DestinationFailed,
                        format_args!(
                            "verification failed at the destination: RAM block {block} differs \
                             from this source's; the guest runs on here"
                        ),
                    ),
                    _ => self.fail(
                        EndReason::DestinationFailed,
                        format_args!("the destination failed to load the stream{when}"),
                    ),
                }
            }
            RpMessage::Shut { error: false } => {
                self.fail(
                    EndReason::PeerClosed,
                    format_args!(
                        "the destination closed the return path before the end of the stream"
                    ),
                );
            }
            RpMessage::Interrupted { signal } => {
                // A destination sends it only while its guest has not run
                // (it refuses the signal after the postcopy run command):
                // even after the switchover, the guest is still ours, and
                // resuming it here leaves no moment without a runnable one.
                self.postcopy.guest_on_destination = false;
                self.fail(
                    EndReason::DestinationInterrupted { signal: *signal },
                    format_args!(
                        "the destination was interrupted ({}) and stopped loading the stream; \
                         the guest keeps running on the source",
                        SignalName(*signal)
                    ),
                );
            }
            RpMessage::Pong(SETUP_CHECK_PING) if self.step == Step::AwaitSetupVerdict => {
                self.step = Step::Sync(SyncKind::Setup);
            }
            RpMessage::Pong(CATCH_UP_PING) => self.caught_up(),
            RpMessage::Pong(v) if self.step == Step::AwaitEndPong && *v == self.last_end_ping() => {
                self.step = Step::EndOfStream;
            }
            RpMessage::Pong(_) => {}
            RpMessage::SwitchoverAck => self.end.switchover_acked = true,
            RpMessage::ReqPagesId { block, start, len } => {
                self.handle_page_request(Some(block), *start, *len);
            }
            RpMessage::ReqPages { start, len } => self.handle_page_request(None, *start, *len),
            RpMessage::DigestQuery {
                block,
                first,
                count,
            } => self.digest_query(
                *block,
                PageRange {
                    first: *first,
                    count: *count,
                },
            ),
            RpMessage::DigestMismatch { block, page } => self.digest_mismatch(*block, *page),
            RpMessage::ResendPage { block, page } => self.handle_resend(*block, *page),
            RpMessage::RecvBitmap { .. }
            | RpMessage::RecvBitmapSize { .. }
            | RpMessage::RecvBitmapBytes { .. }
            | RpMessage::RecvBitmapEnd
            | RpMessage::ResumeAck => self.recovery_message(msg),
        }
        Ok(())
    }

    /// Something local failed (a write to the main stream, a dirty-log
    /// ioctl, the vCPUs, the device state): the migration ends with
    /// [`EndReason::LocalFailure`], and `reason` becomes the error
    /// description. The guest keeps running on the source (unless it has
    /// been handed over).
    ///
    /// After the postcopy switchover it pauses instead
    /// ([`SourceAction::Paused`]): the guest's memory is split between the
    /// hosts, and a new connection can resume.
    pub fn handle_io_error(&mut self, now: Instant, reason: fmt::Arguments<'_>) {
        self.advance_clock(now);
        if self.postcopy.guest_on_destination {
            self.pause(reason);
        } else {
            self.fail(EndReason::LocalFailure, reason);
        }
    }

    /// The destination closed the connection (the return path reached its
    /// end) before the migration ended: [`EndReason::PeerClosed`], with
    /// `reason` as the error description.
    /// After the postcopy switchover it pauses instead, as
    /// [`handle_io_error`](Self::handle_io_error) does.
    pub fn handle_peer_closed(&mut self, now: Instant, reason: fmt::Arguments<'_>) {
        self.advance_clock(now);
        if self.postcopy.guest_on_destination {
            self.pause(reason);
        } else {
            self.fail(EndReason::PeerClosed, reason);
        }
    }

    /// How the migration ended, once [`SourceAction::Finished`] has been
    /// handed out.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.end.reason
    }

    /// Cancels the migration (QMP's `migrate_cancel`). Does nothing once
    /// the migration has finished. Refused once the guest runs on the
    /// destination in postcopy: the source no longer has its memory, so
    /// there is nothing to go back to (QEMU refuses it too).
    pub fn cancel(&mut self, now: Instant) -> Result<(), SourceError> {
        self.advance_clock(now);
        if self.postcopy.guest_on_destination && !matches!(self.step, Step::Finish(_) | Step::Done)
        {
            return Err(SourceError::PostcopyCannotBeCancelled);
        }
        if self.end.committed && !matches!(self.step, Step::Done) {
            return Err(SourceError::AlreadyCommitted);
        }
        if self.status.is_running() && !matches!(self.step, Step::Finish(_) | Step::Done) {
            self.set_status(MigrationStatus::Cancelling);
            self.scan.batch.clear();
            self.postcopy.requests.clear();
            self.step = Step::Finish(EndReason::Cancelled);
        }
        Ok(())
    }

    /// True once the postcopy switchover has handed the guest to the
    /// destination: from then on the source must never restart it.
    pub fn guest_on_destination(&self) -> bool {
        self.postcopy.guest_on_destination
    }

    /// True once the COMMIT of a precopy has been handed out: from then on
    /// the source never resumes its vCPUs, and a cancel is refused.
    pub fn is_committed(&self) -> bool {
        self.end.committed
    }

    /// When the engine next wants to be polled even if nothing else
    /// happens: the end of a rate-limited slice, or the convergence
    /// deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let deadline = match (self.step, self.config.limits.max_time_ms) {
            (Step::Iterate | Step::AwaitSync(SyncKind::Iteration), Some(ms)) => {
                Some(self.started_at + Duration::from_millis(ms))
            }
            _ => None,
        };
        if self.awaits_destination() {
            return Some(self.confirm_deadline());
        }
        if self.step == Step::AwaitCatchUp {
            return Some(self.catch_up_deadline());
        }
        let sending = matches!(self.step, Step::Iterate | Step::Drain | Step::Postcopy);
        let slice = (sending && self.meter.exhausted()).then(|| self.meter.next_send());
        let drain = self
            .convergence
            .drain_until
            .filter(|_| self.step == Step::Iterate);
        let slice = match (slice, drain) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        match (deadline, slice) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next thing to do, if any. See [`SourceAction`] for each.
    pub fn poll_action(&mut self, now: Instant, ram: &impl PageReader) -> Option<SourceAction<'_>> {
        self.advance_clock(now);
        // A stop that fits is still taken at the time limit (the next
        // sync decides); only one that does not ends the migration here.
        if self.step == Step::Iterate && self.time_limit_exceeded() && !self.fits_downtime() {
            self.fail_not_converged(ConvergenceLimit::Time);
        }
        if self.awaits_destination()
            && self.now >= self.confirm_deadline()
            && self.postcopy.guest_on_destination
        {
            let ms = self.config.limits.confirm_timeout_ms;
            self.pause(format_args!(
                "the destination did not answer within {ms} ms"
            ));
        }
        if self.awaits_destination() && self.now >= self.confirm_deadline() {
            let ms = self.config.limits.confirm_timeout_ms;
            let wait = match self.step {
                Step::AwaitSetupVerdict => Wait::SetupVerdict,
                Step::AwaitLoaded => Wait::Loaded,
                _ if self.end.committed => Wait::CommitConfirmation,
                _ => Wait::EndConfirmation,
            };
            self.fail(
                EndReason::Timeout(wait),
                format_args!("the destination did not {wait} within {ms} ms"),
            );
        }
        // A switch to postcopy syncs the channels before its first
        // discard: every precopy page on them lands before the destination
        // drops stale pages and registers its RAM.
        let channel_step = matches!(
            self.step,
            Step::SaveSetupDevices
                | Step::Sync(_)
                | Step::Iterate
                | Step::Drain
                | Step::SaveDevices
        ) || (self.postcopy.switching
            && matches!(self.step, Step::EarlyDiscard | Step::StopVcpus));
        if channel_step && self.channels.as_ref().is_some_and(Channels::has_pending) {
            return self.next_channel_message();
        }
        match self.step {
            Step::NotStarted
            | Step::AwaitSync(_)
            | Step::AwaitStopped
            | Step::AwaitContinue
            | Step::AwaitSetupDevices
            | Step::AwaitSetupVerdict
            | Step::AwaitDevices
            | Step::AwaitShut
            | Step::AwaitEndPong
            | Step::AwaitLoaded
            | Step::AwaitPackage
            | Step::AwaitPackageSent
            | Step::Paused
            | Step::AwaitBitmap
            | Step::AwaitResumeAck
            | Step::Done => None,
            Step::PauseNotice => {
                self.step = Step::Paused;
                Some(SourceAction::Paused)
            }
            Step::RecoverStart => Some(self.recover_start()),
            Step::RecoverPreemptHello => Some(self.recover_preempt_hello()),
            Step::RequestBitmap(block) => Some(self.request_bitmap(block)),
            Step::SendResume => Some(self.send_resume()),
            Step::SendPreamble => match self.encode_preamble() {
                Ok(len) => {
                    self.step = if self.preempt() {
                        Step::PreemptHello
                    } else {
                        Step::SaveSetupDevices
                    };
                    self.count_sent(len as u64, 0);
                    Some(SourceAction::Send(&self.scratch[..len]))
                }
                Err(e) => Some(self.encode_failed(e)),
            },
            Step::PreemptHello => Some(self.preempt_hello(Step::SaveSetupDevices)),
            Step::SaveSetupDevices => {
                self.step = Step::AwaitSetupDevices;
                Some(SourceAction::SaveSetupDevices)
            }
            Step::SetupCheck => {
                match Record::Command(Command::Ping(SETUP_CHECK_PING)).encode(self.scratch) {
                    Ok(len) => {
                        self.count_sent(len as u64, 0);
                        self.end.sent_at = self.now;
                        self.step = Step::AwaitSetupVerdict;
                        Some(SourceAction::Send(&self.scratch[..len]))
                    }
                    Err(e) => Some(self.encode_failed(e)),
                }
            }
            Step::Sync(kind) => Some(self.begin_sync(kind)),
            Step::Iterate => self.next_pages(ram, true),
            Step::Drain => self.next_pages(ram, false),
            Step::EarlyDiscard => Some(self.next_early_discard()),
            Step::CatchUpPing => Some(self.catch_up_ping()),
            Step::AwaitCatchUp => self.catch_up_waited(),
            Step::Discard => Some(self.next_discard()),
            Step::PackageDevices => {
                self.step = Step::AwaitPackage;
                Some(SourceAction::PackageDevices)
            }
            Step::Postcopy => self.postcopy_pages(ram),
            Step::EndPing => Some(self.end_ping()),
            Step::StopVcpus => Some(self.stop_step()),
            Step::SaveDevices => {
                self.step = Step::AwaitDevices;
                Some(SourceAction::SaveDevices)
            }
            Step::EndOfStream => {
                let digest = match self.encode_digest(ram) {
                    Ok(len) => len,
                    Err(Some(e)) => return Some(self.encode_failed(e)),
                    // The audit failed the migration.
                    Err(None) => {
                        let Step::Finish(reason) = self.step else {
                            return None;
                        };
                        return Some(self.finish_step(reason));
                    }
                };
                let len = match Record::EndOfStream.encode(&mut self.scratch[digest..]) {
                    Ok(len) => digest + len,
                    Err(e) => return Some(self.encode_failed(e)),
                };
                self.count_sent(len as u64, 0);
                self.end.sent_at = self.now;
                self.postcopy.end_sent |= self.postcopy.guest_on_destination;
                self.step = if !self.end.return_path {
                    Step::Finish(EndReason::Completed)
                } else if self.postcopy.guest_on_destination {
                    // Postcopy: the guest already runs there.
                    Step::AwaitShut
                } else {
                    Step::AwaitLoaded
                };
                Some(SourceAction::Send(&self.scratch[..len]))
            }
            Step::DigestRanges(block, range) => Some(self.digest_ranges(block, range)),
            Step::Commit => {
                let len = match Record::Command(Command::Commit).encode(self.scratch) {
                    Ok(len) => len,
                    Err(e) => return Some(self.encode_failed(e)),
                };
                // Irrevocable from here on, even if the write fails.
                self.end.committed = true;
                self.count_sent(len as u64, 0);
                // The confirm timeout runs again, for the confirmation.
                self.end.sent_at = self.now;
                self.step = Step::AwaitShut;
                Some(SourceAction::Send(&self.scratch[..len]))
            }
            Step::Finish(reason) => Some(self.finish_step(reason)),
        }
    }

    // ---- internals ------------------------------------------------------

    /// [`Step::StopVcpus`]: a SwitchoverStart first, then the stop. It
    /// tells the destination that from its arrival to its guest's start
    /// every moment is downtime, which a host that raises its threads'
    /// priority for the stop can only learn from the source: the pages of
    /// the final pass look like any other pass's. (It is a command every
    /// destination takes; QEMU sends its namesake only for switchover-ack,
    /// and nothing depends on its answer here.)
    fn stop_step(&mut self) -> SourceAction<'_> {
        if !self.end.stop_announced {
            self.end.stop_announced = true;
            return match Record::Command(Command::SwitchoverStart).encode(self.scratch) {
                Ok(len) => {
                    self.count_sent(len as u64, 0);
                    SourceAction::Send(&self.scratch[..len])
                }
                Err(e) => self.encode_failed(e),
            };
        }
        self.step = Step::AwaitStopped;
        SourceAction::StopVcpus
    }

    fn begin_sync(&mut self, kind: SyncKind) -> SourceAction<'static> {
        self.step = Step::AwaitSync(kind);
        self.convergence.newly_dirty_this_sync = 0;
        SourceAction::SyncDirtyLog
    }

    fn unexpected(&self, event: &'static str) -> SourceError {
        SourceError::UnexpectedEvent {
            event,
            status: self.status,
        }
    }

    /// Moves to `to` if the transition table allows it. The engine only
    /// asks for legal transitions; an illegal one is ignored rather than
    /// panicking, and the table's tests guard the list.
    fn set_status(&mut self, to: MigrationStatus) {
        let _ = self.move_to(to);
    }

    /// Moves to `to` through the transition table, or says why not.
    fn move_to(&mut self, to: MigrationStatus) -> Result<(), TransitionError> {
        let next = self.status.transition(to)?;
        self.changes.record(self.status, next);
        self.status = next;
        self.stats.status = next;
        Ok(())
    }

    fn advance_clock(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
        self.book_throttle();
        if let Some(slice) = self.meter.tick(self.now) {
            self.convergence.bandwidth_bytes_per_ms = slice.bytes_per_ms;
            self.stats.ram.mbps = slice.mbps;
            self.stats.ram.pages_per_second = slice.pages_per_second;
            self.update_threshold();
            if self.stats.ram.dirty_pages_rate > 0
                && slice.bytes > 10_000
                && slice.bytes_per_ms > 0.0
                && let Some(ms) = self.estimated_stop_ms()
            {
                self.stats.expected_downtime_ms = ms;
            }
        }
        if !matches!(self.step, Step::Done) && self.status != MigrationStatus::None {
            self.stats.total_time_ms = (self.now - self.started_at).as_millis() as u64;
        }
    }

    fn count_sent(&mut self, bytes: u64, pages: u64) {
        self.stats.ram.transferred = self.stats.ram.transferred.saturating_add(bytes);
        self.meter.record(bytes, pages);
    }

    fn refresh_stats(&mut self) {
        self.stats.ram.remaining = self.scan.remaining_bytes;
    }

    /// The preempt channel's hello, with the migration id its
    /// PostcopyPreempt announced; `next` is the step after it.
    fn preempt_hello(&mut self, next: Step) -> SourceAction<'_> {
        let hello = PreemptHello {
            migration_id: self.migration_id,
        };
        match hello.encode(self.scratch) {
            Ok(len) => {
                self.step = next;
                self.count_sent(len as u64, 0);
                SourceAction::SendPreempt(&self.scratch[..len])
            }
            Err(e) => self.encode_failed(e),
        }
    }

    /// Encodes the stream header, the return-path command and the block
    /// list into scratch.
    fn encode_preamble(&mut self) -> Result<usize, wire::EncodeError> {
        let mut len = wire::encode_stream_header(self.scratch)?;
        if self.end.return_path {
            len += Record::Command(Command::OpenReturnPath).encode(&mut self.scratch[len..])?;
        }
        if self
            .config
            .capabilities
            .contains(Capabilities::POSTCOPY_RAM)
        {
            // Advised up front, so that a destination that cannot do
            // postcopy fails before anything is transferred.
            len += Record::Command(self.postcopy_advise()).encode(&mut self.scratch[len..])?;
        }
        if self.preempt() {
            len += Record::Command(Command::PostcopyPreempt {
                migration_id: self.migration_id,
            })
            .encode(&mut self.scratch[len..])?;
        }
        // The key before the channels: the destination opens them with it.
        if let Some(v) = &self.verify {
            len += Record::Command(Command::DigestKey(v.key.seed()))
                .encode(&mut self.scratch[len..])?;
        }
        if let Some(setup) = self.channel_setup() {
            len += Record::Command(setup).encode(&mut self.scratch[len..])?;
        }
        len += Record::RamBlocks(BlockList::from_slice(self.layout))
            .encode(&mut self.scratch[len..])?;
        Ok(len)
    }
}

/// Bytes of the preamble: stream header, open-return-path command, block
/// list.
fn preamble_len(layout: &[BlockInfo<'_>]) -> usize {
    let advise = Command::PostcopyAdvise {
        host_page_size: 0,
        target_page_size: 0,
    };
    wire::STREAM_HEADER_LEN
        + Record::Command(Command::OpenReturnPath).encoded_len()
        + Record::Command(advise).encoded_len()
        + Record::Command(Command::PostcopyPreempt { migration_id: 0 }).encoded_len()
        + Record::Command(Command::DigestKey(0)).encoded_len()
        + channels::setup_len()
        + Record::RamBlocks(BlockList::from_slice(layout)).encoded_len()
}

#[cfg(test)]
mod tests;
