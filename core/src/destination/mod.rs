//! The destination engine: parses and validates the incoming stream and
//! places what it carries, through a [`DestinationHost`] the VMM provides.
//!
//! Everything the source says is checked before it touches guest memory:
//! the block list must match the destination's own RAM layout (ids, sizes,
//! page sizes), every page index must lie inside its block, and every batch
//! is validated whole before its first page is placed. A malformed or
//! hostile stream gets a typed error and a failed migration, never a write
//! outside guest memory.
//!
//! ```text
//!  [none] ─first byte─► [active] ─block list─► pages, devices ... ─► end of stream
//!        ─► (return path, precopy) LOADED, guest paused ─► COMMIT ─► [completed] SHUT(0)
//!        ─► (no return path, or postcopy)                          ─► [completed] SHUT(0)
//!                           └──────────── any error ──────────────► [failed]  (SHUT 1 on the return path)
//! ```
//!
//! # The end of a precopy: LOADED, then COMMIT
//!
//! With the return path, the end of the stream does not complete the
//! migration: the destination checks it (every required device section
//! loaded, [`DestinationEngine::require_sections`]; nothing after it in the
//! same input), answers [`RpMessage::Loaded`], and waits for the source's
//! [`Command::Commit`] with the guest paused. Only the commit completes it
//! ([`DestinationEngine::is_completed`]: the VMM starts the vCPUs) and
//! queues the confirmation, SHUT(0). A failure before LOADED is queued is a
//! clean one: the source never commits, its guest runs on, this copy is
//! discarded. A failure after it (the connection closes, the source falls
//! silent, the stream continues with anything but one COMMIT) cannot be
//! decided here, since the source may have committed: the engine fails
//! with [`AmbiguousEnd::DestinationLoaded`] in its statistics, and the VMM
//! must keep the loaded guest paused for the operator.
//!
//! Bytes after the end (after COMMIT; after END_OF_STREAM without the return
//! path or in postcopy) are refused as `TrailingData` when they arrive in
//! the same [`DestinationEngine::handle_input`] call, before the migration
//! completes; arriving later, when the guest already runs here, they are
//! reported and change nothing.

use core::fmt;
use core::time::Duration;

mod faults;
mod host;
mod page_terms;
mod postcopy;
mod recovery;

pub use faults::{FaultBooks, FaultBooksError, MAX_WAITERS, MAX_WAITS};
pub use host::{ChannelTotals, ChannelsHost, DestinationHost, HandleError, HostOp, PostcopyHost};
pub use page_terms::{MAX_REFETCHED_PAGES, MAX_REFETCHES_PER_BATCH};
pub use postcopy::PostcopyTracking;
pub use recovery::PENDING_BITMAPS;

use crate::digest::{DigestBooks, DigestKey, Verification, locate_parts};
use crate::return_path::{RP_MAX_MESSAGE, RpEncodeError, RpMessage, SignalName};
use crate::source::SETUP_CHECK_PING;
use crate::stats::{AmbiguousEnd, MigrationStats};
use crate::status::{MigrationStatus, StatusChange, StatusChanges, TransitionError};
use crate::time::Instant;
use crate::wire::{
    BatchFlags, BlockInfo, BlockList, BlockSums, Command, DecodeError, PREEMPT_HELLO_LEN,
    PacketEntries, PacketHeader, PacketKind, PageBatch, PageKind, PageRange, PreemptHello,
    RangeSums, Record, StreamDecoder, ZeroRun,
};
use host::by_host;
use recovery::Recovery;

/// Room for queued return-path messages: a SHUT, PONGs, and page requests
/// (up to 272 bytes each) between two drains by the caller. A message
/// that does not fit fails the migration
/// ([`DestError::ReturnPathFull`]) rather than vanish: a lost page request
/// would leave a vCPU blocked until the request timeout, a lost PONG or
/// LOADED would stall the source until its confirm timeout, each with a
/// misleading reason.
pub const RETURN_PATH_QUEUE: usize = 8192;

/// Room in the return-path queue kept for the message that ends the
/// migration (SHUT or INTERRUPTED, eight bytes each), so that a failure,
/// including a full queue, is always told to the source.
const RETURN_PATH_RESERVE: usize = 8;

/// Default for [`DestinationEngine::set_request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 10_000;

/// Most sections [`DestinationEngine::require_sections`] takes: one bit
/// each in a word, so the core keeps no list of its own.
pub const MAX_REQUIRED_SECTIONS: usize = 64;

/// A device section the destination cannot start a guest without (the
/// vCPU state, typically): a stream that ends without it is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequiredSection {
    /// The device id, as the source names its Device records.
    pub id: &'static str,
    /// The instance number.
    pub instance: u32,
    /// By when it must have loaded.
    pub due: SectionDue,
}

/// When a [`RequiredSection`] must have loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SectionDue {
    /// Sent at setup, before any RAM (the CPU model, the runstate): the
    /// answer to the source's setup check
    /// ([`SETUP_CHECK_PING`]) is a refusal
    /// without it, so a source that left it out hears so before it sends a
    /// page instead of after the whole stream.
    SetupCheck,
    /// With the stopped guest's state: the end of the stream (in postcopy,
    /// the guest's start) is refused without it.
    Switchover,
}

/// Default for [`DestinationEngine::set_idle_timeout`]: how long an
/// unfinished stream may stay silent before the destination gives up.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 30_000;

/// Why the destination refused the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestError {
    /// The bytes are not a valid livemig stream.
    Decode(DecodeError),
    /// The source's RAM has a different number of blocks.
    BlockCountMismatch {
        /// Blocks the source announced.
        source: usize,
        /// Blocks this destination has.
        destination: usize,
    },
    /// Block `index` has a different id on the source.
    BlockIdMismatch {
        /// Position in the block list.
        index: usize,
    },
    /// Block `index` has a different size on the source.
    BlockLengthMismatch {
        /// Position in the block list.
        index: usize,
        /// Bytes on the source.
        source: u64,
        /// Bytes on this destination.
        destination: u64,
    },
    /// Block `index` uses a different page size on the source.
    PageSizeMismatch {
        /// Position in the block list.
        index: usize,
        /// Page size on the source.
        source: u64,
        /// Page size on this destination.
        destination: u64,
    },
    /// A second block list arrived.
    DuplicateBlockList,
    /// Pages arrived before the block list that gives them meaning.
    PagesBeforeBlockList,
    /// A batch names a block index outside the block list.
    NoSuchBlock {
        /// The index in the batch.
        block: u16,
        /// Blocks in the list.
        blocks: usize,
    },
    /// A page index lies outside its block.
    PageOutOfBlock {
        /// The block.
        block: u16,
        /// The page index in the batch.
        page: u64,
        /// Pages in the block.
        pages: u64,
    },
    /// A command this destination cannot act on here.
    UnexpectedCommand(&'static str),
    /// The VMM failed at this operation (its own error comes back in
    /// [`HandleError::Host`]).
    Host(HostOp),
    /// The source advised postcopy, and this destination has none (built
    /// without postcopy tracking, or its host has no [`PostcopyHost`]).
    PostcopyUnsupported,
    /// The caller has not drained the return path: a message of `needed`
    /// bytes found only `free` bytes in the queue.
    ReturnPathFull {
        /// Bytes of the message.
        needed: usize,
        /// Bytes free in the queue.
        free: usize,
    },
    /// A return-path message could not be encoded.
    ReturnPathEncode(RpEncodeError),
    /// The connection closed before the end of the stream.
    UnexpectedEof(DecodeError),
    /// A postcopy command arrived but this destination was built without
    /// postcopy tracking, or in the wrong order.
    PostcopyUnexpected(&'static str),
    /// A discard range lies outside its block.
    DiscardOutOfBlock {
        /// The block.
        block: u16,
        /// First page of the range.
        first: u64,
        /// Pages in the range.
        count: u64,
    },
    /// A page fault was reported for a page outside guest RAM.
    FaultOutsideRam {
        /// The block.
        block: u16,
        /// The page.
        page: u64,
    },
    /// Requested pages did not arrive in time.
    RequestTimedOut {
        /// Requests still waiting.
        outstanding: u64,
        /// Milliseconds since the last requested page arrived.
        waited_ms: u64,
    },
    /// The source sent nothing for longer than the idle timeout.
    SourceSilent {
        /// Milliseconds without input.
        idle_ms: u64,
    },
    /// The migration had already failed; no more input is taken.
    AlreadyFailed,
    /// The stream ended (or the postcopy guest was about to start) without
    /// a device section this destination requires, or the setup check
    /// came without one due by then.
    MissingSection {
        /// The device id.
        id: &'static str,
        /// The instance number.
        instance: u32,
    },
    /// A required device section came a second time: a source that sends
    /// one vCPU's state twice has lost track of which is which.
    RepeatedSection {
        /// The device id.
        id: &'static str,
        /// The instance number.
        instance: u32,
    },
    /// [`DestinationEngine::require_sections`] was given more sections than
    /// it can track.
    TooManyRequiredSections {
        /// Sections given.
        count: usize,
    },
    /// The source closed the connection after this destination had loaded
    /// the stream and answered LOADED, without sending COMMIT: whether the
    /// source committed cannot be known here (see [`AmbiguousEnd`]).
    CommitNotReceived,
    /// The operator interrupted the migration (signal number `signal`)
    /// before the guest ran here.
    Interrupted {
        /// The signal number (Linux numbering: 2 is SIGINT).
        signal: u32,
    },
    /// An interrupt was refused: the guest already runs on this destination
    /// (postcopy), and only the rest of the stream can make it whole.
    PostcopyCannotBeInterrupted,
    /// An interrupt was refused: LOADED has been sent, so the source may
    /// already have committed (see [`DestinationEngine::interrupt`]).
    InterruptAfterLoaded,
    /// The source verifies the migration (it sent a digest key) and this
    /// destination keeps no digest books ([`DestinationEngine::verify_with`]).
    VerifyUnsupported,
    /// A digest key arrived after pages, or twice, or a digest without a
    /// key or twice.
    DigestOutOfOrder(&'static str),
    /// The source's digest has a different number of blocks.
    DigestBlockCount {
        /// Sums the source sent.
        source: usize,
        /// Blocks here.
        destination: usize,
    },
    /// The memory placed here differs from the source's: block `block` is
    /// the first whose digests differ, and `page` the first page of it
    /// whose terms differ, when it could be located (see
    /// [`crate::digest`]). The guest must not start here.
    DigestMismatch {
        /// Index of the block.
        block: u16,
        /// Index of the page in the block, once located.
        page: Option<u64>,
    },
    /// In postcopy, page `page` of block `block` arrived with contents
    /// whose term differs from the one the source sent with it
    /// ([`BatchFlags::TERMS`]): it was not installed, and the migration
    /// fails (see `page_terms`).
    PageTermMismatch {
        /// Index of the block.
        block: u16,
        /// Index of the page in the block.
        page: u64,
    },
    /// A postcopy batch of block `block` came without the page terms a
    /// verifying destination checks each page by.
    PageTermsMissing {
        /// Index of the block.
        block: u16,
    },
    /// The stream ended without the digest its key announced.
    DigestMissing,
    /// [`DestinationEngine::verify_with`] was given books that are not one
    /// per block of the layout, each of the block's page count.
    DigestBooksMismatch,
    /// The source announced multifd channels and this destination's host
    /// has none ([`DestinationHost::channels`]).
    MultifdUnsupported,
    /// A multifd command out of place (a second setup, a flush without
    /// channels).
    MultifdUnexpected(&'static str),
    /// A multifd channel failed: a malformed or out-of-sequence packet, a
    /// page outside guest RAM, an error, a close or a timeout on its
    /// connection ([`DestinationEngine::handle_channel_failure`]).
    ChannelFailed,
    /// A multifd flush of another generation than the next one.
    FlushOutOfOrder {
        /// The generation due.
        expected: u32,
        /// The generation received.
        found: u32,
    },
    /// The source announced the postcopy preempt channel and this
    /// destination has no reassembly buffer for it
    /// ([`DestinationEngine::take_preempt`]).
    PreemptUnsupported,
    /// Preempt channel input out of place: bytes before the main stream
    /// announced the channel, a second announcement, a record other than
    /// Pages, pages outside postcopy.
    PreemptUnexpected(&'static str),
    /// The preempt channel's hello names another migration than the main
    /// stream's PostcopyPreempt.
    PreemptWrongMigration {
        /// The id the main stream announced.
        expected: u64,
        /// The id the hello carries.
        found: u64,
    },
    /// The preempt channel failed: an error, a close or a timeout on its
    /// connection ([`DestinationEngine::handle_preempt_failure`]).
    PreemptFailed,
    /// The connection failed before postcopy ran the guest here
    /// ([`DestinationEngine::handle_io_error`]).
    ConnectionFailed,
    /// Input while postcopy is paused: the caller must first
    /// [`recover`](DestinationEngine::recover) with the new connection.
    PostcopyPaused,
    /// A recovery call asked for a move the transition table does not
    /// allow (for example a recover while postcopy is not paused).
    Transition(TransitionError),
    /// The recovery handshake out of order: a bitmap request for an
    /// unknown block, too many at once, POSTCOPY_RESUME before the bitmaps
    /// went out.
    RecoveryOutOfOrder(&'static str),
}

impl fmt::Display for DestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DestError::Decode(e) => write!(f, "invalid migration stream: {e}"),
            DestError::BlockCountMismatch {
                source,
                destination,
            } => write!(
                f,
                "RAM layout mismatch: the source has {source} RAM blocks, this destination {destination}"
            ),
            DestError::BlockIdMismatch { index } => {
                write!(
                    f,
                    "RAM layout mismatch: block {index} has a different id on the source"
                )
            }
            DestError::BlockLengthMismatch {
                index,
                source,
                destination,
            } => write!(
                f,
                "RAM size mismatch: block {index} is {source} bytes on the source, {destination} bytes here"
            ),
            DestError::PageSizeMismatch {
                index,
                source,
                destination,
            } => write!(
                f,
                "page size mismatch: block {index} uses {source}-byte pages on the source, {destination} here"
            ),
            DestError::DuplicateBlockList => write!(f, "the source sent its block list twice"),
            DestError::PagesBeforeBlockList => {
                write!(f, "pages arrived before the RAM block list")
            }
            DestError::NoSuchBlock { block, blocks } => {
                write!(
                    f,
                    "pages for block {block}, but there are only {blocks} blocks"
                )
            }
            DestError::PageOutOfBlock { block, page, pages } => write!(
                f,
                "page {page} lies outside block {block}, which has {pages} pages"
            ),
            DestError::UnexpectedCommand(c) => write!(f, "unexpected command {c}"),
            DestError::Host(op) => write!(f, "the VMM failed {op}"),
            DestError::PostcopyUnsupported => {
                write!(f, "this destination does not support postcopy")
            }
            DestError::ReturnPathFull { needed, free } => write!(
                f,
                "the return path is not drained: a {needed}-byte message found {free} bytes free \
                 of {RETURN_PATH_QUEUE}"
            ),
            DestError::ReturnPathEncode(e) => {
                write!(f, "a return-path message could not be encoded: {e}")
            }
            DestError::UnexpectedEof(e) => write!(f, "connection closed early: {e}"),
            DestError::PostcopyUnexpected(what) => {
                write!(f, "unexpected postcopy step: {what}")
            }
            DestError::DiscardOutOfBlock {
                block,
                first,
                count,
            } => write!(
                f,
                "discard of {count} pages at {first} lies outside block {block}"
            ),
            DestError::FaultOutsideRam { block, page } => {
                write!(
                    f,
                    "page fault outside guest RAM: block {block}, page {page}"
                )
            }
            DestError::RequestTimedOut {
                outstanding,
                waited_ms,
            } => write!(
                f,
                "{outstanding} requested pages did not arrive within {waited_ms} ms"
            ),
            DestError::SourceSilent { idle_ms } => {
                write!(f, "the source sent nothing for {idle_ms} ms")
            }
            DestError::AlreadyFailed => write!(f, "the migration has already failed"),
            DestError::MissingSection { id, instance } => write!(
                f,
                "the stream has no state for device '{id}' instance {instance}, which this \
                 destination requires: refused before the guest starts"
            ),
            DestError::RepeatedSection { id, instance } => write!(
                f,
                "the stream carries the state of device '{id}' instance {instance} twice: \
                 refused before the guest starts"
            ),
            DestError::TooManyRequiredSections { count } => write!(
                f,
                "{count} required device sections, at most {MAX_REQUIRED_SECTIONS} can be tracked"
            ),
            DestError::CommitNotReceived => write!(
                f,
                "the source closed the connection after the stream was loaded, without a commit"
            ),
            DestError::InterruptAfterLoaded => write!(
                f,
                "the stream is loaded and the source told so: it may already have committed, \
                 so the guest cannot be handed back to it; waiting for its commit"
            ),
            DestError::Interrupted { signal } => write!(
                f,
                "interrupted by {}: the destination stopped loading the stream",
                SignalName(*signal)
            ),
            DestError::PostcopyCannotBeInterrupted => write!(
                f,
                "postcopy cannot be interrupted: the guest already runs on this destination"
            ),
            DestError::VerifyUnsupported => write!(
                f,
                "the source verifies the migration and this destination keeps no digest books"
            ),
            DestError::DigestOutOfOrder(what) => write!(f, "digest out of order: {what}"),
            DestError::DigestBlockCount {
                source,
                destination,
            } => write!(
                f,
                "the source's digest has {source} block sums, this destination {destination} blocks"
            ),
            DestError::DigestMismatch {
                block,
                page: Some(page),
            } => write!(
                f,
                "verification failed: page {page} of RAM block {block} differs from the \
                 source's (the first that does); the guest does not start here"
            ),
            DestError::DigestMismatch { block, page: None } => write!(
                f,
                "verification failed: the memory received for RAM block {block} differs from \
                 the source's; the guest does not start here"
            ),
            DestError::PageTermMismatch { block, page } => write!(
                f,
                "verification failed: page {page} of RAM block {block} arrived in postcopy with \
                 other contents than the source sent; it was not installed"
            ),
            DestError::PageTermsMissing { block } => write!(
                f,
                "a postcopy batch of RAM block {block} came without the page terms this \
                 verifying destination checks each page by"
            ),
            DestError::DigestMissing => {
                write!(f, "the stream ended without the digest its key announced")
            }
            DestError::DigestBooksMismatch => write!(
                f,
                "the digest books are not one per RAM block with a word per page"
            ),
            DestError::MultifdUnsupported => write!(
                f,
                "the source sends pages on multifd channels and this destination takes none"
            ),
            DestError::MultifdUnexpected(what) => write!(f, "unexpected multifd {what}"),
            DestError::ChannelFailed => f.write_str("a multifd channel failed"),
            DestError::FlushOutOfOrder { expected, found } => write!(
                f,
                "multifd flush of generation {found} where generation {expected} was due"
            ),
            DestError::PreemptUnsupported => write!(
                f,
                "the source sends requested pages on a preempt channel and this destination \
                 takes none"
            ),
            DestError::PreemptUnexpected(what) => {
                write!(f, "unexpected on the preempt channel: {what}")
            }
            DestError::PreemptWrongMigration { expected, found } => write!(
                f,
                "the preempt channel's hello is for migration {found:#x}, not {expected:#x}"
            ),
            DestError::PreemptFailed => f.write_str("the postcopy preempt channel failed"),
            DestError::ConnectionFailed => f.write_str("the connection to the source failed"),
            DestError::PostcopyPaused => {
                f.write_str("postcopy is paused: recover with the new connection before feeding it")
            }
            DestError::Transition(e) => write!(f, "{e}"),
            DestError::RecoveryOutOfOrder(what) => {
                write!(f, "postcopy recovery out of order: {what}")
            }
        }
    }
}

impl core::error::Error for DestError {}

impl From<DecodeError> for DestError {
    fn from(e: DecodeError) -> Self {
        DestError::Decode(e)
    }
}

/// The sans-IO destination side of a migration. See the [module docs](self).
pub struct DestinationEngine<'a> {
    decoder: StreamDecoder<'a>,
    /// The postcopy preempt channel's hello and records, when the host
    /// takes one ([`DestinationEngine::take_preempt`]).
    preempt: Option<PreemptInput<'a>>,
    loader: Loader<'a>,
}

/// The preempt channel as it arrives: its hello, then Pages records.
struct PreemptInput<'a> {
    hello: [u8; PREEMPT_HELLO_LEN],
    hello_fill: usize,
    decoder: StreamDecoder<'a>,
}

/// Everything but the decoder, so that records borrowed from the decoder
/// can be applied to it.
struct Loader<'a> {
    layout: &'a [BlockInfo<'a>],
    postcopy: Option<&'a mut [PostcopyTracking<'a>]>,
    status: MigrationStatus,
    blocks_received: bool,
    return_path: bool,
    advised: bool,
    rp_queue: heapless::Vec<u8, RETURN_PATH_QUEUE>,
    started_at: Option<Instant>,
    last_input_at: Instant,
    idle_timeout: Duration,
    /// Requests sent and not yet answered.
    outstanding: u64,
    /// Since when the oldest wait has made no progress.
    waiting_since: Option<Instant>,
    request_timeout: Duration,
    last_request_block: Option<u16>,
    /// The host writes page requests on the return path itself too
    /// ([`DestinationEngine::set_host_requests`]): every request queued
    /// here names its block.
    host_requests: bool,
    /// Sections the stream must carry, and which of them have loaded (bit
    /// `i` for `required[i]`).
    required: &'static [RequiredSection],
    required_loaded: u64,
    /// A precopy stream with the return path ended and passed its checks:
    /// only a COMMIT may follow.
    end_loaded: bool,
    /// LOADED has been queued: from now on the source may commit, so a
    /// failure leaves the guest paused ([`AmbiguousEnd::DestinationLoaded`]).
    loaded_announced: bool,
    /// Per-block digest books, when this destination verifies.
    books: Option<&'a mut [DigestBooks<'a>]>,
    /// The source's digest key, once it has sent one.
    key: Option<DigestKey>,
    /// The range of the block being located whose parts' sums the source
    /// was asked for (after a digest mismatch).
    locate: Option<(u16, PageRange)>,
    /// Postcopy pages whose copy failed its term and that were asked for
    /// again (see `page_terms`).
    refetched: heapless::Vec<(u16, u64), MAX_REFETCHED_PAGES>,
    /// With multifd: the channel count and the next generation to flush.
    channels: Option<Channels>,
    /// With the postcopy preempt channel: the migration id its hello must
    /// carry, once the main stream has announced it.
    preempt_id: Option<u64>,
    /// The engine has a decoder for the preempt channel.
    preempt_ready: bool,
    /// Postcopy's run command has started the guest here: from now on a
    /// lost connection pauses.
    guest_running: bool,
    /// Postcopy recovery: bitmaps and re-sent requests on their way out.
    recovery: Recovery,
    /// Status changes not yet drained by the caller.
    changes: StatusChanges,
    stats: MigrationStats,
}

/// The multifd channels the source announced.
#[derive(Clone, Copy, Debug)]
struct Channels {
    next_generation: u32,
}

/// What the end of one input brings about, decided once all of it has
/// passed (so that bytes after the end in the same input are refused
/// before the guest may start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The stream is loaded: answer LOADED and wait for COMMIT.
    Loaded,
    /// The migration completes: the guest may start here.
    Complete,
}

impl<'a> DestinationEngine<'a> {
    /// A destination whose guest RAM is `layout`, decoding with `scratch`
    /// as its reassembly buffer (records larger than it are refused; give
    /// it at least [`crate::wire::MAX_RECORD_BODY`] plus a record header to
    /// accept everything a livemig source sends). It refuses postcopy; see
    /// [`DestinationEngine::with_postcopy`].
    pub fn new(layout: &'a [BlockInfo<'a>], scratch: &'a mut [u8]) -> Self {
        let mut stats = MigrationStats::default();
        stats.ram.total = layout.iter().map(|b| b.length).sum();
        stats.ram.page_size = layout
            .iter()
            .map(|b| u64::from(b.page_size))
            .max()
            .unwrap_or(0);
        DestinationEngine {
            decoder: StreamDecoder::new(scratch),
            preempt: None,
            loader: Loader {
                layout,
                postcopy: None,
                status: MigrationStatus::None,
                blocks_received: false,
                return_path: false,
                advised: false,
                rp_queue: heapless::Vec::new(),
                started_at: None,
                last_input_at: Instant::ZERO,
                idle_timeout: Duration::from_millis(DEFAULT_IDLE_TIMEOUT_MS),
                outstanding: 0,
                waiting_since: None,
                request_timeout: Duration::from_millis(DEFAULT_REQUEST_TIMEOUT_MS),
                last_request_block: None,
                host_requests: false,
                required: &[],
                required_loaded: 0,
                end_loaded: false,
                loaded_announced: false,
                books: None,
                key: None,
                locate: None,
                refetched: heapless::Vec::new(),
                channels: None,
                preempt_id: None,
                preempt_ready: false,
                guest_running: false,
                recovery: Recovery::new(),
                changes: StatusChanges::default(),
                stats,
            },
        }
    }

    /// A destination that can also take postcopy: `tracking` holds, per
    /// block, which pages have arrived and which have been requested
    /// (built with [`PostcopyTracking::new`], one per block of `layout`).
    pub fn with_postcopy(
        layout: &'a [BlockInfo<'a>],
        scratch: &'a mut [u8],
        tracking: &'a mut [PostcopyTracking<'a>],
    ) -> Result<Self, DestError> {
        if tracking.len() != layout.len()
            || tracking
                .iter()
                .zip(layout)
                .any(|(t, b)| t.pages() != b.length / u64::from(b.page_size))
        {
            return Err(DestError::PostcopyUnexpected(
                "postcopy tracking does not match the RAM layout",
            ));
        }
        let mut engine = Self::new(layout, scratch);
        engine.loader.postcopy = Some(tracking);
        Ok(engine)
    }

    /// Takes the postcopy preempt channel, decoding it with `scratch` (as
    /// large as the main stream's): a source with `postcopy-preempt`
    /// announces it, the host accepts its connection
    /// ([`PostcopyHost::open_preempt`]) and feeds what arrives to
    /// [`handle_preempt_input`](Self::handle_preempt_input). Without it
    /// such a source is refused with [`DestError::PreemptUnsupported`]
    /// before any page.
    pub fn take_preempt(&mut self, scratch: &'a mut [u8]) {
        self.preempt = Some(PreemptInput {
            hello: [0; PREEMPT_HELLO_LEN],
            hello_fill: 0,
            decoder: StreamDecoder::records(scratch),
        });
        self.loader.preempt_ready = true;
    }

    /// Keeps digest books (one per block of the layout, built with
    /// [`DigestBooks::new`]), so that a source that verifies can: every
    /// page placed is booked, and the source's digest is compared before
    /// the stream is reported loaded. Without books a verifying source is
    /// refused ([`DestError::VerifyUnsupported`]); with them a source that
    /// does not verify is taken as before, and
    /// [`stats`](Self::stats)'s `verification` stays `Off`.
    pub fn verify_with(&mut self, books: &'a mut [DigestBooks<'a>]) -> Result<(), DestError> {
        let l = &mut self.loader;
        if books.len() != l.layout.len()
            || books
                .iter()
                .zip(l.layout)
                .any(|(b, info)| b.pages() != info.length / u64::from(info.page_size))
        {
            return Err(DestError::DigestBooksMismatch);
        }
        l.books = Some(books);
        Ok(())
    }

    /// The connection is up (none -> active): the idle timeout starts now,
    /// so a peer that connects and never sends a byte is also given up on.
    /// Optional: without it the clock starts at the first byte.
    pub fn begin(&mut self, now: Instant) {
        let l = &mut self.loader;
        if l.status == MigrationStatus::None {
            l.started_at = Some(now);
            l.last_input_at = now;
            l.set_status(MigrationStatus::Active);
        }
    }

    /// Device sections the stream must carry: the end of the stream (and,
    /// in postcopy, the start of the guest) is refused with
    /// [`DestError::MissingSection`] while one has not loaded, so a stream
    /// without, say, the vCPU state never starts a guest from reset. Call
    /// before the first input; at most [`MAX_REQUIRED_SECTIONS`].
    pub fn require_sections(
        &mut self,
        sections: &'static [RequiredSection],
    ) -> Result<(), DestError> {
        if sections.len() > MAX_REQUIRED_SECTIONS {
            return Err(DestError::TooManyRequiredSections {
                count: sections.len(),
            });
        }
        self.loader.required = sections;
        self.loader.required_loaded = 0;
        Ok(())
    }

    /// How long an unfinished stream may stay silent before the
    /// destination fails it (a source that vanished without closing the
    /// connection must not leave the destination waiting forever).
    pub fn set_idle_timeout(&mut self, timeout: Duration) {
        self.loader.idle_timeout = timeout;
    }

    /// How long requested pages may take to arrive, in postcopy, before
    /// the destination fails the migration rather than leave a vCPU blocked
    /// forever.
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.loader.request_timeout = timeout;
    }

    /// When [`DestinationEngine::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let l = &self.loader;
        let idle = matches!(
            l.status,
            MigrationStatus::Active
                | MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyRecover
        )
        .then(|| l.last_input_at + l.idle_timeout);
        let request = l
            .waiting_since
            .filter(|_| l.status == MigrationStatus::PostcopyActive)
            .map(|t| t + l.request_timeout);
        match (idle, request) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Time passed: fails the migration if the source has been silent for
    /// longer than the idle timeout, or requested pages are overdue. Once
    /// postcopy runs the guest here a silent source pauses instead (see
    /// [`is_paused`](Self::is_paused)), and no request timeout runs while
    /// paused or recovering.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), DestError> {
        let l = &self.loader;
        let idle = now - l.last_input_at;
        let running = matches!(
            l.status,
            MigrationStatus::Active
                | MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyRecover
        );
        if running && idle >= l.idle_timeout && l.pauses() {
            let ms = idle.as_millis() as u64;
            self.loader
                .pause(now, format_args!("the source was silent for {ms} ms"));
            return Ok(());
        }
        if running && idle >= l.idle_timeout {
            if let Some(e) = self.loader.unlocated() {
                return Err(self.loader.fail(now, e));
            }
            let e = DestError::SourceSilent {
                idle_ms: idle.as_millis() as u64,
            };
            return Err(self.loader.fail(now, e));
        }
        if let Some(since) = l
            .waiting_since
            .filter(|_| l.status == MigrationStatus::PostcopyActive)
        {
            let waited = now - since;
            if waited >= l.request_timeout {
                let e = DestError::RequestTimedOut {
                    outstanding: l.outstanding,
                    waited_ms: waited.as_millis() as u64,
                };
                return Err(self.loader.fail(now, e));
            }
        }
        Ok(())
    }

    /// The migration's status.
    pub fn status(&self) -> MigrationStatus {
        self.loader.status
    }

    /// The oldest status change not yet drained: for events ("paused",
    /// "recovered") and for tests that check which moves were made.
    pub fn poll_status_change(&mut self) -> Option<StatusChange> {
        self.loader.changes.pop()
    }

    /// Statistics so far.
    pub fn stats(&self) -> &MigrationStats {
        &self.loader.stats
    }

    /// True once the migration has completed here: the VMM may start the
    /// vCPUs (in postcopy they already run). With the return path in
    /// precopy, that is once the source's COMMIT has arrived; without it,
    /// at the end of the stream.
    pub fn is_completed(&self) -> bool {
        self.loader.status == MigrationStatus::Completed
    }

    /// True while the whole stream is loaded and LOADED has been queued,
    /// waiting for the source's COMMIT: the guest must stay paused.
    pub fn is_loaded(&self) -> bool {
        self.loader.loaded_announced && self.loader.status == MigrationStatus::Active
    }

    /// Set when the migration failed after LOADED: the source may have
    /// committed, so the loaded guest must stay paused for the operator.
    pub fn ambiguous_end(&self) -> Option<AmbiguousEnd> {
        self.loader.stats.ambiguous_end
    }

    /// The key postcopy's pages are checked with, as
    /// [`check_preempt_pages`] wants it: `None` when this destination does
    /// not verify (no books, or a source that sent no key).
    pub fn page_term_key(&self) -> Option<DigestKey> {
        self.loader.key.filter(|_| self.loader.books.is_some())
    }

    /// True when the source opened the return path.
    pub fn has_return_path(&self) -> bool {
        self.loader.return_path
    }

    /// Page requests sent and not yet answered (postcopy).
    pub fn outstanding_requests(&self) -> u64 {
        self.loader.outstanding
    }

    /// True when `page` of `block` has arrived (postcopy tracking only).
    pub fn is_received(&self, block: u16, page: u64) -> bool {
        self.loader
            .postcopy
            .as_deref()
            .and_then(|t| t.get(usize::from(block)))
            .is_some_and(|t| t.is_received(page))
    }

    /// A vCPU touched `page` of `block` before it arrived (postcopy). Sends
    /// a page request on the return path unless the page is already here
    /// or already requested; returns whether the page is newly requested.
    /// While postcopy is paused or recovering the request is recorded and
    /// goes out after RESUME_ACK, with every other outstanding one.
    pub fn handle_page_fault(
        &mut self,
        now: Instant,
        block: u16,
        page: u64,
    ) -> Result<bool, DestError> {
        match self.loader.page_fault(now, block, page, Request::Queue) {
            Err(e) => Err(self.loader.fail(now, e)),
            ok => ok,
        }
    }

    /// From now on the host may write page requests on the return path
    /// itself, between the bytes this engine queues (a fault thread that
    /// asks the source at once instead of waiting for this engine's thread:
    /// one thread wake-up less on every fault's path), and tells each with
    /// [`handle_page_fault_sent`](Self::handle_page_fault_sent). Every
    /// request queued here then names its block: the source reads an
    /// unnamed REQ_PAGES as of the last block named, which may be the
    /// host's. Call it before the host's first request, with what was
    /// queued before written out.
    pub fn set_host_requests(&mut self) {
        self.loader.host_requests = true;
    }

    /// A vCPU touched `page` of `block` before it arrived, and the host has
    /// written the request for it already (see
    /// [`set_host_requests`](Self::set_host_requests)). Booked as
    /// [`handle_page_fault`](Self::handle_page_fault) books it, without a
    /// request queued: counted, and outstanding (awaited, re-sent after a
    /// recovery) unless the page is here already or requested before.
    /// Returns whether it is newly outstanding.
    pub fn handle_page_fault_sent(
        &mut self,
        now: Instant,
        block: u16,
        page: u64,
    ) -> Result<bool, DestError> {
        match self
            .loader
            .page_fault(now, block, page, Request::SentByHost)
        {
            Err(e) => Err(self.loader.fail(now, e)),
            ok => ok,
        }
    }

    /// Takes bytes from the main stream. Returns how many were consumed (all
    /// of them: bytes after the end of the stream are an error). The end of
    /// the stream or the COMMIT takes effect only once the whole input has
    /// passed, so garbage after it in the same input fails the migration
    /// before the guest may start; after completion, input is refused with
    /// `TrailingData` and changes nothing.
    ///
    /// A failure of the host comes back as [`HandleError::Host`] with the
    /// host's own error; the migration has failed either way.
    pub fn handle_input<H: DestinationHost>(
        &mut self,
        now: Instant,
        input: &[u8],
        host: &mut H,
    ) -> Result<usize, HandleError<H::Error>> {
        let l = &mut self.loader;
        if l.status == MigrationStatus::Failed {
            return Err(DestError::AlreadyFailed.into());
        }
        if l.status == MigrationStatus::PostcopyPaused {
            return Err(DestError::PostcopyPaused.into());
        }
        if l.status == MigrationStatus::Completed {
            // The guest may already run here: report, change nothing.
            return match self.decoder.decode(input) {
                Ok(decoded) => Ok(decoded.consumed),
                Err(e) => Err(DestError::Decode(e).into()),
            };
        }
        if l.status == MigrationStatus::None {
            self.begin(now);
        }
        let l = &mut self.loader;
        l.stats.ram.transferred += input.len() as u64;
        l.last_input_at = now;
        let mut offset = 0;
        let mut end = None;
        while offset < input.len() {
            let rest = input.get(offset..).unwrap_or(&[]);
            let result = match self.decoder.decode(rest) {
                Ok(decoded) => {
                    offset += decoded.consumed;
                    match decoded.record {
                        Some(record) => self.loader.apply(now, record, host),
                        None => Ok(None),
                    }
                }
                Err(e) => Err(DestError::Decode(e).into()),
            };
            match result {
                Ok(Some(e)) => end = Some(e),
                Ok(None) => {}
                // A recovery's connection that is no migration stream (a
                // stale preempt connection of an earlier attempt, taken
                // from the listener first) is refused: the guest runs
                // here, so it pauses again rather than fail.
                Err(HandleError::Dest(e @ DestError::Decode(DecodeError::BadMagic { .. })))
                    if self.loader.status == MigrationStatus::PostcopyRecover =>
                {
                    self.loader
                        .pause(now, format_args!("a connection was refused: {e}"));
                    return Ok(input.len());
                }
                Err(HandleError::Dest(e)) => return Err(self.loader.fail(now, e).into()),
                // The preempt channel a recovery announced did not come:
                // like a cut in the handshake, it pauses again (the source
                // retries) rather than lose the guest; the rest of the
                // input was for the connection given up.
                Err(HandleError::Host {
                    op: HostOp::OpenPreempt,
                    error,
                }) if self.loader.status == MigrationStatus::PostcopyRecover => {
                    self.loader.pause(
                        now,
                        format_args!("the recovery's preempt channel did not open: {error}"),
                    );
                    return Ok(input.len());
                }
                Err(HandleError::Host { op, error }) => {
                    self.loader.fail_with(
                        now,
                        DestError::Host(op),
                        format_args!("the VMM failed {op}: {error}"),
                    );
                    return Err(HandleError::Host { op, error });
                }
            }
        }
        match end {
            Some(End::Complete) => self.loader.complete(now),
            Some(End::Loaded) => {
                if let Err(e) = self.loader.queue(&RpMessage::Loaded) {
                    return Err(self.loader.fail(now, e).into());
                }
                self.loader.loaded_announced = true;
                self.loader.update_time(now);
            }
            None => self.loader.update_time(now),
        }
        Ok(offset)
    }

    /// The operator asked to stop (signal number `signal`, for example
    /// SIGINT). Before the guest runs here the migration fails (`Ok(true)`;
    /// the VMM must then not start the guest), and the source is told with
    /// [`RpMessage::Interrupted`], so that it resumes its guest and says
    /// why. Once the guest runs here (postcopy) the interrupt is refused
    /// with [`DestError::PostcopyCannotBeInterrupted`] and nothing changes.
    /// After the end of the stream there is nothing left to interrupt
    /// (`Ok(false)`): the guest is the VMM's to run. Between LOADED and
    /// COMMIT it is refused too ([`DestError::InterruptAfterLoaded`]): the
    /// source may already have committed, and failing here would leave the
    /// guest running nowhere; the wait for the commit has its own deadline.
    pub fn interrupt(&mut self, now: Instant, signal: u32) -> Result<bool, DestError> {
        match self.loader.status {
            MigrationStatus::Completed => Ok(false),
            MigrationStatus::Failed => Err(DestError::AlreadyFailed),
            _ if self.loader.guest_running => Err(DestError::PostcopyCannotBeInterrupted),
            _ if self.loader.loaded_announced => Err(DestError::InterruptAfterLoaded),
            _ => {
                self.loader.fail(now, DestError::Interrupted { signal });
                Ok(true)
            }
        }
    }

    /// Takes bytes from the postcopy preempt channel: its hello, then
    /// Pages records of requested pages. Returns how many were consumed
    /// (all of them). A page that is already here is dropped: the main
    /// stream carries every page too, and the guest may have written the
    /// copy that came first. After completion the rest of the channel is
    /// read and dropped (the main stream delivered every page already).
    pub fn handle_preempt_input<H: DestinationHost>(
        &mut self,
        now: Instant,
        input: &[u8],
        host: &mut H,
    ) -> Result<usize, HandleError<H::Error>> {
        match self.loader.status {
            MigrationStatus::Failed => return Err(DestError::AlreadyFailed.into()),
            MigrationStatus::Completed => return Ok(input.len()),
            _ if self.loader.recovery.preempt_closed => {
                return Err(DestError::PreemptUnexpected(
                    "bytes after a pause, before a recovery's stream announced a new channel",
                )
                .into());
            }
            _ => {}
        }
        let result = self.preempt_input(now, input, host);
        match result {
            Ok(n) => Ok(n),
            // A connection of another channel (a stale one of the channel
            // a recovery replaced) is refused; once the guest runs here it
            // pauses, as a cut of the channel does, rather than fail.
            Err(HandleError::Dest(e @ DestError::PreemptWrongMigration { .. }))
                if self.loader.pauses() =>
            {
                self.loader
                    .pause(now, format_args!("a preempt connection was refused: {e}"));
                Ok(input.len())
            }
            Err(HandleError::Dest(e)) => Err(self.loader.fail(now, e).into()),
            Err(HandleError::Host { op, error }) => {
                self.loader.fail_with(
                    now,
                    DestError::Host(op),
                    format_args!("the VMM failed {op}: {error}"),
                );
                Err(HandleError::Host { op, error })
            }
        }
    }

    fn preempt_input<H: DestinationHost>(
        &mut self,
        now: Instant,
        input: &[u8],
        host: &mut H,
    ) -> Result<usize, HandleError<H::Error>> {
        let Some(expected) = self.loader.preempt_id else {
            return Err(
                DestError::PreemptUnexpected("bytes before the main stream announced it").into(),
            );
        };
        let Some(p) = self.preempt.as_mut() else {
            return Err(DestError::PreemptUnsupported.into());
        };
        let l = &mut self.loader;
        l.stats.ram.transferred += input.len() as u64;
        l.last_input_at = now;
        let mut offset = 0;
        if p.hello_fill < PREEMPT_HELLO_LEN {
            let take = (PREEMPT_HELLO_LEN - p.hello_fill).min(input.len());
            p.hello[p.hello_fill..p.hello_fill + take].copy_from_slice(&input[..take]);
            p.hello_fill += take;
            offset = take;
            if p.hello_fill < PREEMPT_HELLO_LEN {
                return Ok(offset);
            }
            let hello = PreemptHello::decode(&p.hello).map_err(DestError::Decode)?;
            if hello.migration_id != expected {
                return Err(DestError::PreemptWrongMigration {
                    expected,
                    found: hello.migration_id,
                }
                .into());
            }
        }
        while offset < input.len() {
            let rest = input.get(offset..).unwrap_or(&[]);
            let decoded = p.decoder.decode(rest).map_err(DestError::Decode)?;
            offset += decoded.consumed;
            match decoded.record {
                None => {}
                Some(Record::Pages(batch)) => {
                    if self.loader.status != MigrationStatus::PostcopyActive {
                        return Err(DestError::PreemptUnexpected("pages outside postcopy").into());
                    }
                    let first = batch
                        .pages()
                        .filter(|(e, _)| !self.loader.placed_already(batch.block(), e.index))
                        .count() as u64;
                    self.loader.place_batch(now, &batch, host)?;
                    self.loader.stats.postcopy_preempt_pages += first;
                }
                Some(_) => {
                    return Err(DestError::PreemptUnexpected("a record other than Pages").into());
                }
            }
        }
        self.loader.update_time(now);
        Ok(offset)
    }

    /// The preempt channel failed (an error, a close or a timeout on its
    /// connection); `reason` becomes the error description. It fails the
    /// migration as the main connection's failure does; once the migration
    /// has completed or failed it changes nothing.
    ///
    /// Once postcopy runs the guest here it pauses instead, as the main
    /// connection's loss does (the caller drops the main connection too);
    /// after a pause the channel is gone, and its failure changes nothing
    /// until a recovery's stream announces a new one.
    pub fn handle_preempt_failure(&mut self, now: Instant, reason: fmt::Arguments<'_>) {
        let l = &mut self.loader;
        if l.recovery.preempt_closed {
            return;
        }
        if l.pauses() {
            l.pause(now, format_args!("the preempt channel failed: {reason}"));
            return;
        }
        l.fail_extra_connection(now, DestError::PreemptFailed, reason);
    }

    /// A multifd channel failed (its receiver's own check, or its
    /// connection); `reason` becomes the error description. Before LOADED
    /// the failure is clean: the source hears SHUT(1) and resumes its
    /// guest. Once the migration has completed or failed it changes
    /// nothing.
    pub fn handle_channel_failure(&mut self, now: Instant, reason: fmt::Arguments<'_>) {
        self.loader
            .fail_extra_connection(now, DestError::ChannelFailed, reason);
    }

    /// The source closed the connection. After LOADED and before COMMIT
    /// that is [`DestError::CommitNotReceived`], an ambiguous end; while a
    /// mismatching page is being located, the mismatch of its block.
    ///
    /// Once postcopy runs the guest here a close pauses (`Ok`, and
    /// [`is_paused`](Self::is_paused) says so); while paused it changes
    /// nothing.
    pub fn handle_eof(&mut self, now: Instant) -> Result<(), DestError> {
        if self.loader.pauses() {
            let why = match self.decoder.finish() {
                Err(e) => e,
                Ok(()) => DecodeError::UnexpectedEof {
                    at: crate::wire::EofAt::BetweenRecords,
                },
            };
            self.loader
                .pause(now, format_args!("the source closed the connection: {why}"));
            return Ok(());
        }
        match self.loader.status {
            MigrationStatus::Completed | MigrationStatus::PostcopyPaused => Ok(()),
            MigrationStatus::Failed => Err(DestError::AlreadyFailed),
            _ => {
                let e = if let Some(e) = self.loader.unlocated() {
                    e
                } else if self.loader.loaded_announced && self.decoder.finish().is_ok() {
                    DestError::CommitNotReceived
                } else {
                    match self.decoder.finish() {
                        Err(e) => DestError::UnexpectedEof(e),
                        Ok(()) => DestError::UnexpectedCommand("end of connection"),
                    }
                };
                Err(self.loader.fail(now, e))
            }
        }
    }

    /// Copies queued return-path bytes into `out`, returning how many; the
    /// rest stays queued.
    ///
    /// In a recovery a bitmap is streamed from the tracking after its
    /// RECV_BITMAP message, so call it until it returns 0.
    pub fn poll_return_path(&mut self, out: &mut [u8]) -> usize {
        let l = &mut self.loader;
        let mut n = 0;
        while n < out.len() {
            let rest = &mut out[n..];
            let step = match l.before_bitmap() {
                Some(0) => l.bitmap_bytes(rest),
                Some(mark) => l.take_queued(rest, mark),
                None => {
                    let len = l.rp_queue.len();
                    let taken = l.take_queued(rest, len);
                    if taken == 0 {
                        l.refill_requests();
                        l.take_queued(rest, l.rp_queue.len())
                    } else {
                        taken
                    }
                }
            };
            if step == 0 {
                break;
            }
            n += step;
        }
        n
    }
}

impl Loader<'_> {
    fn set_status(&mut self, to: MigrationStatus) {
        let _ = self.move_to(to);
    }

    /// Moves to `to` through the transition table, or says why not.
    fn move_to(&mut self, to: MigrationStatus) -> Result<(), DestError> {
        let next = self.status.transition(to).map_err(DestError::Transition)?;
        self.changes.record(self.status, next);
        self.status = next;
        self.stats.status = next;
        Ok(())
    }

    /// Moves up to `max` queued return-path bytes into `out`.
    fn take_queued(&mut self, out: &mut [u8], max: usize) -> usize {
        let q = &mut self.rp_queue;
        let n = out.len().min(max).min(q.len());
        out[..n].copy_from_slice(&q[..n]);
        let rest = q.len() - n;
        q.copy_within(n.., 0);
        q.truncate(rest);
        self.drained(n);
        n
    }

    fn update_time(&mut self, now: Instant) {
        if let Some(start) = self.started_at {
            self.stats.total_time_ms = (now - start).as_millis() as u64;
        }
    }

    fn complete(&mut self, now: Instant) {
        self.update_time(now);
        // The seeds' migration_calculate_complete, seen from this end: the
        // average over the whole incoming migration.
        if self.stats.total_time_ms > 0 {
            self.stats.ram.mbps =
                self.stats.ram.transferred as f64 * 8.0 / self.stats.total_time_ms as f64 / 1000.0;
        }
        self.set_status(MigrationStatus::Completed);
        self.waiting_since = None;
        if self.return_path {
            self.queue_final(&RpMessage::Shut { error: false });
        }
    }

    /// Queues a return-path message, keeping [`RETURN_PATH_RESERVE`] free
    /// for the final one; a message that does not fit is an error.
    fn queue(&mut self, msg: &RpMessage<'_>) -> Result<(), DestError> {
        let mut buf = [0u8; RP_MAX_MESSAGE];
        let n = msg.encode(&mut buf).map_err(DestError::ReturnPathEncode)?;
        let free = self.rp_queue.capacity() - self.rp_queue.len();
        if n + RETURN_PATH_RESERVE > free {
            return Err(DestError::ReturnPathFull { needed: n, free });
        }
        self.rp_queue
            .extend_from_slice(&buf[..n])
            .map_err(|_| DestError::ReturnPathFull { needed: n, free })
    }

    /// Queues the message that ends the migration (SHUT or INTERRUPTED)
    /// into the room [`queue`](Self::queue) keeps for it. Nothing is
    /// queued after it, so it always fits.
    fn queue_final(&mut self, msg: &RpMessage<'_>) {
        let mut buf = [0u8; RP_MAX_MESSAGE];
        if let Ok(n) = msg.encode(&mut buf) {
            let _ = self.rp_queue.extend_from_slice(&buf[..n]);
        }
    }

    fn fail(&mut self, now: Instant, e: DestError) -> DestError {
        self.fail_with(now, e, format_args!("{e}"))
    }

    /// Fails the migration with `e`, described by `desc` (the host's own
    /// error, when the host failed).
    /// A connection besides the main one (a multifd channel, the preempt
    /// channel) failed: the migration fails as on the main connection's
    /// failure, unless it has already ended.
    fn fail_extra_connection(&mut self, now: Instant, e: DestError, desc: fmt::Arguments<'_>) {
        if !matches!(
            self.status,
            MigrationStatus::Completed | MigrationStatus::Failed
        ) {
            self.fail_with(now, e, desc);
        }
    }

    fn fail_with(&mut self, now: Instant, e: DestError, desc: fmt::Arguments<'_>) -> DestError {
        if self.status == MigrationStatus::None {
            // The connection closed (or timed out) before the first byte:
            // the incoming migration had begun all the same, and fails.
            self.started_at.get_or_insert(now);
            self.set_status(MigrationStatus::Active);
        }
        self.update_time(now);
        self.stats.error_desc.set(desc);
        if self.status == MigrationStatus::PostcopyRecover {
            // The table leaves recovery only through a pause.
            self.set_status(MigrationStatus::PostcopyPaused);
        }
        // A bitmap half out would swallow what follows.
        self.recovery.reset();
        if self.loaded_announced {
            // The source may have committed: it will never resume its copy.
            self.stats.ambiguous_end = Some(AmbiguousEnd::DestinationLoaded);
        }
        self.set_status(MigrationStatus::Failed);
        self.waiting_since = None;
        if self.return_path {
            let msg = match e {
                DestError::Interrupted { signal } => RpMessage::Interrupted { signal },
                _ => RpMessage::Shut { error: true },
            };
            self.queue_final(&msg);
        }
        e
    }

    /// Acts on one record; says what the end of the input brings about
    /// when the record ends the stream or commits it.
    fn apply<H: DestinationHost>(
        &mut self,
        now: Instant,
        record: Record<'_>,
        host: &mut H,
    ) -> Result<Option<End>, HandleError<H::Error>> {
        if self.end_loaded && record != Record::Command(Command::Commit) {
            // The decoder lets nothing else through after the end.
            return Err(
                DestError::UnexpectedCommand("a record after the end of the stream").into(),
            );
        }
        match record {
            Record::RamBlocks(list) => {
                if self.blocks_received {
                    return Err(DestError::DuplicateBlockList.into());
                }
                check_layout(self.layout, &list)?;
                self.blocks_received = true;
                // Nothing else on this destination needs preparing before a
                // switchover: approve it now. A source without the
                // switchover-ack capability ignores the message.
                if self.return_path {
                    self.queue(&RpMessage::SwitchoverAck)?;
                }
            }
            Record::Pages(batch) => {
                if !self.blocks_received {
                    return Err(DestError::PagesBeforeBlockList.into());
                }
                self.place_batch(now, &batch, host)?;
                if batch.flags().contains(BatchFlags::END_OF_ITERATION) {
                    self.stats.iterations += 1;
                }
            }
            Record::ZeroRun(run) => {
                if !self.blocks_received {
                    return Err(DestError::PagesBeforeBlockList.into());
                }
                self.place_zero_run(now, &run, host)?;
            }
            Record::Device(device) => {
                by_host(HostOp::LoadDevice, host.load_device(&device))?;
                if let Some(i) = self
                    .required
                    .iter()
                    .position(|r| r.id == device.id.as_str() && r.instance == device.instance)
                {
                    if self.required_loaded & (1 << i) != 0 {
                        let r = self.required[i];
                        return Err(DestError::RepeatedSection {
                            id: r.id,
                            instance: r.instance,
                        }
                        .into());
                    }
                    self.required_loaded |= 1 << i;
                }
            }
            Record::Command(Command::Commit) => {
                if !self.end_loaded {
                    return Err(DestError::UnexpectedCommand(
                        "commit before the stream was loaded",
                    )
                    .into());
                }
                return Ok(Some(End::Complete));
            }
            Record::Command(Command::RecvBitmap { block }) => {
                self.bitmap_request(block.as_str())?;
            }
            Record::Command(Command::PostcopyResume) => self.resume(now)?,
            Record::Command(command) => self.command(command, host)?,
            Record::Package(package) => {
                for inner in package.records() {
                    let inner = inner.map_err(DestError::Decode)?;
                    if self.apply(now, inner, host)?.is_some() {
                        return Err(DestError::Decode(DecodeError::NestedPackage).into());
                    }
                }
            }
            Record::Digest(sums) => {
                self.seal_channels(host)?;
                if self.channels.is_some() && self.mismatch_to_locate(&sums) {
                    // The receivers keep their pages' terms: adopted into
                    // the books (the stream fails anyway), the page is
                    // located as on the main stream.
                    self.end_channels(host)?;
                }
                self.compare_digest(&sums)?;
            }
            Record::DigestRanges(answer) => self.locate_step(&answer)?,
            Record::EndOfStream => {
                if self.locate.is_some() {
                    // The digest differed: the page is being located, and
                    // the stream is refused once it is.
                    return Ok(None);
                }
                self.check_required(SectionDue::Switchover)?;
                self.seal_channels(host)?;
                if self.key.is_some() && !self.stats.verification.is_verified() {
                    return Err(DestError::DigestMissing.into());
                }
                if self.return_path && self.status == MigrationStatus::Active {
                    self.end_loaded = true;
                    return Ok(Some(End::Loaded));
                }
                return Ok(Some(End::Complete));
            }
        }
        Ok(None)
    }

    /// Refuses to go on while a required section due by `due` has not
    /// loaded (a section due at the setup check is due at the switchover
    /// too).
    fn check_required(&self, due: SectionDue) -> Result<(), DestError> {
        match self.required.iter().enumerate().find(|&(i, r)| {
            self.required_loaded & (1 << i) == 0 && (due == SectionDue::Switchover || r.due == due)
        }) {
            Some((_, r)) => Err(DestError::MissingSection {
                id: r.id,
                instance: r.instance,
            }),
            None => Ok(()),
        }
    }

    fn command<H: DestinationHost>(
        &mut self,
        command: Command<'_>,
        host: &mut H,
    ) -> Result<(), HandleError<H::Error>> {
        match command {
            Command::OpenReturnPath => self.return_path = true,
            Command::Ping(value) => {
                if value == SETUP_CHECK_PING {
                    self.check_required(SectionDue::SetupCheck)?;
                }
                if self.return_path {
                    self.queue(&RpMessage::Pong(value))?;
                }
            }
            Command::PostcopyAdvise {
                host_page_size,
                target_page_size,
            } => {
                let pc = match (&self.postcopy, host.postcopy()) {
                    (Some(_), Some(pc)) => pc,
                    _ => return Err(DestError::PostcopyUnsupported.into()),
                };
                by_host(
                    HostOp::PostcopyAdvise,
                    pc.postcopy_advise(host_page_size, target_page_size),
                )?;
                self.advised = true;
            }
            Command::PostcopyRamDiscard { block, ranges } => {
                self.end_channels(host)?;
                let index = self.postcopy_block(block.as_str())?;
                for range in ranges.iter() {
                    self.discard(index, range, postcopy_host(host)?)?;
                }
            }
            Command::PostcopyListen => {
                if !self.advised || self.status != MigrationStatus::Active {
                    return Err(DestError::PostcopyUnexpected("listen without advise").into());
                }
                self.end_channels(host)?;
                by_host(
                    HostOp::PostcopyListen,
                    postcopy_host(host)?.postcopy_listen(),
                )?;
                self.set_status(MigrationStatus::PostcopyActive);
            }
            Command::PostcopyRun => {
                if self.status != MigrationStatus::PostcopyActive {
                    return Err(DestError::PostcopyUnexpected("run before listen").into());
                }
                self.check_required(SectionDue::Switchover)?;
                by_host(HostOp::PostcopyRun, postcopy_host(host)?.postcopy_run())?;
                self.guest_running = true;
            }
            // Taken by `apply`, which has the time.
            Command::RecvBitmap { .. } | Command::PostcopyResume => {
                return Err(DestError::UnexpectedCommand("a recovery command").into());
            }
            Command::SwitchoverStart => host.stop_starting(),
            Command::DigestKey(seed) => {
                if self.books.is_none() {
                    return Err(DestError::VerifyUnsupported.into());
                }
                if self.key.is_some() || self.stats.ram.normal + self.stats.ram.duplicate > 0 {
                    return Err(DestError::DigestOutOfOrder("a digest key after pages").into());
                }
                if self.channels.is_some() {
                    return Err(DestError::DigestOutOfOrder(
                        "a digest key after the multifd setup",
                    )
                    .into());
                }
                self.key = Some(DigestKey::new(seed));
                self.stats.verification = Verification::Pending;
            }
            Command::MultifdSetup {
                channels,
                migration_id,
            } => {
                if self.channels.is_some() || self.blocks_received {
                    return Err(DestError::MultifdUnexpected("setup").into());
                }
                let host = host.channels().ok_or(DestError::MultifdUnsupported)?;
                by_host(
                    HostOp::OpenChannels,
                    host.open_channels(channels, migration_id, self.key),
                )?;
                self.channels = Some(Channels { next_generation: 0 });
            }
            Command::MultifdFlush { generation } => {
                let Some(ch) = self.channels else {
                    return Err(DestError::MultifdUnexpected("flush without channels").into());
                };
                if generation != ch.next_generation {
                    return Err(DestError::FlushOutOfOrder {
                        expected: ch.next_generation,
                        found: generation,
                    }
                    .into());
                }
                let host = host.channels().ok_or(DestError::MultifdUnsupported)?;
                let totals = host
                    .sync_channels(generation)
                    .map_err(|error| HandleError::Host {
                        op: HostOp::SyncChannels,
                        error,
                    })?;
                self.channels = Some(Channels {
                    next_generation: generation.wrapping_add(1),
                });
                if self.key.is_some()
                    && let Some(books) = self.books.as_deref_mut()
                {
                    for (block, b) in books.iter_mut().enumerate() {
                        b.add_elsewhere(host.take_channel_digest(block as u16));
                    }
                }
                let ram = &mut self.stats.ram;
                ram.normal += totals.normal;
                ram.duplicate += totals.zero;
                ram.normal_bytes += totals.normal_bytes;
                ram.transferred += totals.bytes;
                ram.multifd_bytes += totals.bytes;
            }
            Command::PostcopyPreempt { migration_id } => {
                // At setup, or once in a recovery's stream (the channel
                // opened again, under a fresh id).
                let recovery = self.status == MigrationStatus::PostcopyRecover;
                if !self.advised || self.preempt_id.is_some() || (self.blocks_received && !recovery)
                {
                    return Err(DestError::PreemptUnexpected("an announcement out of place").into());
                }
                if !self.preempt_ready {
                    return Err(DestError::PreemptUnsupported.into());
                }
                by_host(
                    HostOp::OpenPreempt,
                    postcopy_host(host)?.open_preempt(migration_id),
                )?;
                self.preempt_id = Some(migration_id);
                self.recovery.preempt_closed = false;
            }
            // Taken by `apply`, which knows whether the stream has ended.
            Command::Commit => return Err(DestError::UnexpectedCommand("commit").into()),
        }
        Ok(())
    }

    /// Compares the source's digest with the books: the verdict before the
    /// guest may start.
    fn compare_digest(&mut self, sums: &BlockSums<'_>) -> Result<(), DestError> {
        let (Some(books), Some(_)) = (self.books.as_deref(), self.key) else {
            return Err(DestError::DigestOutOfOrder("a digest without a key"));
        };
        if self.stats.verification != Verification::Pending {
            return Err(DestError::DigestOutOfOrder("a second digest"));
        }
        if sums.len() != books.len() {
            return Err(DestError::DigestBlockCount {
                source: sums.len(),
                destination: books.len(),
            });
        }
        if let Some((block, b)) = books
            .iter()
            .zip(sums.iter())
            .enumerate()
            .find_map(|(i, (b, theirs))| (b.sum() != theirs).then_some((i as u16, b)))
        {
            self.stats.verification = Verification::Mismatch { block, page: None };
            let whole = PageRange {
                first: 0,
                count: b.pages(),
            };
            // Locating needs the page terms in the engine's books: a
            // multifd destination's channels keep theirs until the books
            // adopt them (`mismatch_to_locate`).
            if self.channels.is_none() && self.locates() && whole.count > 0 {
                return self.ask_parts(block, whole);
            }
            return Err(self.mismatch(block, None));
        }
        self.stats.verification = Verification::Verified;
        Ok(())
    }

    /// Whether a digest mismatch is located to its page before the
    /// stream is refused: with the return path, in precopy (in postcopy
    /// the guest runs here already, and the end cannot wait).
    fn locates(&self) -> bool {
        self.return_path && self.status == MigrationStatus::Active
    }

    /// Whether `sums` differ from the books where a mismatch is located:
    /// a multifd destination then has its channels' terms adopted first.
    fn mismatch_to_locate(&self, sums: &BlockSums<'_>) -> bool {
        let (Some(books), Some(_)) = (self.books.as_deref(), self.key) else {
            return false;
        };
        self.locates()
            && sums.len() == books.len()
            && books
                .iter()
                .zip(sums.iter())
                .any(|(b, theirs)| b.sum() != theirs)
    }

    /// Asks the source for the sums of the parts of `range` of `block`.
    fn ask_parts(&mut self, block: u16, range: PageRange) -> Result<(), DestError> {
        self.queue(&RpMessage::DigestQuery {
            block,
            first: range.first,
            count: range.count,
        })?;
        self.locate = Some((block, range));
        Ok(())
    }

    /// The source's sums of the parts asked for: compares them with the
    /// books, and asks again for the first part that differs, until it is
    /// one page, which is named to the source and in the error.
    fn locate_step(&mut self, answer: &RangeSums<'_>) -> Result<(), DestError> {
        let Some((block, range)) = self.locate else {
            return Err(DestError::DigestOutOfOrder(
                "digest ranges nobody asked for",
            ));
        };
        if answer.block() != block || answer.range() != range {
            return Err(DestError::DigestOutOfOrder(
                "digest ranges of another range than asked",
            ));
        }
        self.locate = None;
        let part = self
            .books
            .as_deref()
            .and_then(|books| books.get(usize::from(block)))
            .and_then(|b| {
                locate_parts(range)
                    .zip(answer.sums())
                    .find(|&(part, theirs)| b.range_sum(part) != theirs)
            })
            .map(|(part, _)| part);
        match part {
            Some(part) if part.count == 1 => Err(self.mismatch(block, Some(part.first))),
            Some(part) => self.ask_parts(block, part),
            // The source's parts add up to another sum than its digest's:
            // its books changed in between. The block stays named.
            None => Err(self.mismatch(block, None)),
        }
    }

    /// While a page is being located and the source goes away (closes,
    /// falls silent): the mismatch of the block alone, which is what the
    /// migration fails with then.
    fn unlocated(&mut self) -> Option<DestError> {
        let (block, _) = self.locate.take()?;
        Some(self.mismatch(block, None))
    }

    /// The verdict on a mismatch: block `block` and, once located, `page`
    /// differ. Told to the source ahead of the SHUT, so that it reports
    /// them too; the error fails the migration.
    fn mismatch(&mut self, block: u16, page: Option<u64>) -> DestError {
        self.stats.verification = Verification::Mismatch { block, page };
        if self.return_path
            && let Err(e) = self.queue(&RpMessage::DigestMismatch { block, page })
        {
            return e;
        }
        DestError::DigestMismatch { block, page }
    }

    /// Books `count` zero pages of `block` from `first`.
    fn book_zero(&mut self, block: u16, first: u64, count: u64) {
        if let (Some(books), Some(_)) = (self.books.as_deref_mut(), self.key)
            && let Some(b) = books.get_mut(usize::from(block))
        {
            for page in first..first.saturating_add(count) {
                b.record(page, 0);
            }
        }
    }

    /// Books `term` for page `page` of `block` (nothing when not
    /// verifying).
    fn book_term(&mut self, block: u16, page: u64, term: u64) {
        if let Some(books) = self.books.as_deref_mut()
            && let Some(b) = books.get_mut(usize::from(block))
        {
            b.record(page, term);
        }
    }

    /// The key pages are hashed with when this end keeps books.
    fn booking_key(&self) -> Option<DigestKey> {
        self.books.as_ref().and(self.key)
    }

    /// The index of the block named `id`, for a postcopy command.
    fn postcopy_block(&self, id: &str) -> Result<u16, DestError> {
        if !self.advised {
            return Err(DestError::PostcopyUnexpected("discard without advise"));
        }
        self.layout
            .iter()
            .position(|b| b.id.as_str() == id)
            .and_then(|i| u16::try_from(i).ok())
            .ok_or(DestError::PostcopyUnexpected(
                "discard for an unknown block",
            ))
    }

    /// The first postcopy command after multifd precopy (a discard, or the
    /// listen), or a precopy digest mismatch to locate: the channels are
    /// over, and every page they placed becomes the engine's own, received
    /// and booked (see [`ChannelsHost::end_channels`]). Nothing without
    /// channels or after the first call.
    fn end_channels<H: DestinationHost>(
        &mut self,
        host: &mut H,
    ) -> Result<(), HandleError<H::Error>> {
        if self.channels.take().is_none() {
            return Ok(());
        }
        let host = host.channels().ok_or(DestError::MultifdUnsupported)?;
        let mut tracking = self.postcopy.as_deref_mut();
        let mut books = self.books.as_deref_mut().filter(|_| self.key.is_some());
        let mut adopt = |block: u16, page: u64, term: u64| {
            let block = usize::from(block);
            if let Some(t) = tracking.as_deref_mut().and_then(|t| t.get_mut(block)) {
                t.received(PageRange {
                    first: page,
                    count: 1,
                });
            }
            if let Some(b) = books.as_deref_mut().and_then(|b| b.get_mut(block)) {
                b.adopt(page, term);
            }
        };
        by_host(HostOp::EndChannels, host.end_channels(&mut adopt))
    }

    /// The digest or the end of a precopy stream: no channel places a page
    /// from here on ([`ChannelsHost::seal_channels`]). Nothing without
    /// channels (or once postcopy has ended them).
    fn seal_channels<H: DestinationHost>(
        &mut self,
        host: &mut H,
    ) -> Result<(), HandleError<H::Error>> {
        if self.channels.is_none() {
            return Ok(());
        }
        let host = host.channels().ok_or(DestError::MultifdUnsupported)?;
        by_host(HostOp::SealChannels, host.seal_channels())
    }

    fn discard<E: fmt::Debug + fmt::Display>(
        &mut self,
        block: u16,
        range: PageRange,
        host: &mut dyn PostcopyHost<Error = E>,
    ) -> Result<(), HandleError<E>> {
        let Some(t) = self
            .postcopy
            .as_deref_mut()
            .and_then(|t| t.get_mut(usize::from(block)))
        else {
            return Err(DestError::PostcopyUnexpected("discard without postcopy tracking").into());
        };
        if range.end() > t.pages() || range.count == 0 {
            return Err(DestError::DiscardOutOfBlock {
                block,
                first: range.first,
                count: range.count,
            }
            .into());
        }
        t.discarded(range);
        by_host(HostOp::Discard, host.discard(block, range))
    }

    /// A fault on `page` of `block`: booked (counted, outstanding unless
    /// here or requested before) and, for [`Request::Queue`], its request
    /// queued. Returns whether it is newly outstanding.
    fn page_fault(
        &mut self,
        now: Instant,
        block: u16,
        page: u64,
        request: Request,
    ) -> Result<bool, DestError> {
        let connected = match self.status {
            MigrationStatus::PostcopyActive => true,
            MigrationStatus::PostcopyPaused | MigrationStatus::PostcopyRecover => false,
            _ => return Err(DestError::PostcopyUnexpected("page fault outside postcopy")),
        };
        let Some(t) = self
            .postcopy
            .as_deref_mut()
            .and_then(|t| t.get_mut(usize::from(block)))
            .filter(|t| page < t.pages())
        else {
            return Err(DestError::FaultOutsideRam { block, page });
        };
        let newly = t.request(page);
        // A request the host wrote is on the wire: the source counts it
        // whether or not its page beat this call.
        if newly || request == Request::SentByHost {
            self.stats.ram.postcopy_requests += 1;
        }
        if !newly {
            return Ok(false);
        }
        self.outstanding += 1;
        // A paused engine waits for the recovery, not for pages; a request
        // queued while paused goes out with the others once it is through.
        if connected {
            self.waiting_since.get_or_insert(now);
            if request == Request::Queue {
                self.send_request(block, page)?;
            }
        }
        Ok(true)
    }

    /// Queues the request for `page` of `block`, naming the block unless
    /// the last request did (and the host writes none of its own).
    fn send_request(&mut self, block: u16, page: u64) -> Result<(), DestError> {
        let Some(info) = self.layout.get(usize::from(block)) else {
            return Err(DestError::FaultOutsideRam { block, page });
        };
        let page_size = u64::from(info.page_size);
        let (start, len) = (page * page_size, info.page_size);
        let msg = if self.last_request_block == Some(block) && !self.host_requests {
            RpMessage::ReqPages { start, len }
        } else {
            RpMessage::ReqPagesId {
                block: info.id.as_str(),
                start,
                len,
            }
        };
        self.queue(&msg)?;
        self.last_request_block = Some(block);
        Ok(())
    }

    /// True for a page postcopy has placed already: a second copy (one on
    /// the preempt channel, one on the main stream) is dropped, because the
    /// guest runs here and may have written the first. Before postcopy a
    /// later copy is newer and replaces the older one.
    fn placed_already(&self, block: u16, page: u64) -> bool {
        self.guest_running
            && self
                .postcopy
                .as_deref()
                .and_then(|t| t.get(usize::from(block)))
                .is_some_and(|t| t.is_received(page))
    }

    /// Records arrivals for postcopy: answered requests stop the clock of
    /// the request timeout.
    fn arrived(&mut self, now: Instant, block: u16, first: u64, count: u64) {
        let Some(t) = self
            .postcopy
            .as_deref_mut()
            .and_then(|t| t.get_mut(usize::from(block)))
        else {
            return;
        };
        let answered = t.received(PageRange { first, count });
        if answered > 0 {
            self.outstanding = self.outstanding.saturating_sub(answered);
            self.waiting_since = (self.outstanding > 0).then_some(now);
        }
    }

    /// The page count of `block`, checked to exist and to have pages of
    /// `page_size` bytes as the source says.
    fn block_pages(&self, block: u16, page_size: u64) -> Result<u64, DestError> {
        let info = self
            .layout
            .get(usize::from(block))
            .ok_or(DestError::NoSuchBlock {
                block,
                blocks: self.layout.len(),
            })?;
        if page_size != u64::from(info.page_size) {
            return Err(DestError::PageSizeMismatch {
                index: usize::from(block),
                source: page_size,
                destination: u64::from(info.page_size),
            });
        }
        Ok(info.length / u64::from(info.page_size))
    }

    /// Places a run of zero pages as the same pages in ZERO entries would
    /// be: the pages placed already in postcopy are skipped, the rest
    /// zeroed (and booked, and marked arrived) in as few host calls as
    /// those skips allow.
    fn place_zero_run<H: DestinationHost>(
        &mut self,
        now: Instant,
        run: &ZeroRun,
        host: &mut H,
    ) -> Result<(), HandleError<H::Error>> {
        let (block, range) = (run.block, run.range);
        let pages = self.block_pages(block, 1u64 << run.page_shift)?;
        if range.end() > pages {
            return Err(DestError::PageOutOfBlock {
                block,
                page: range.end() - 1,
                pages,
            }
            .into());
        }
        let mut first = range.first;
        while first < range.end() {
            let mut end = first;
            while end < range.end() && !self.placed_already(block, end) {
                end += 1;
            }
            if end > first {
                let count = end - first;
                by_host(
                    HostOp::PlaceZeroPages,
                    host.place_zero_pages(block, first, count),
                )?;
                self.stats.ram.duplicate += count;
                self.book_zero(block, first, count);
                self.arrived(now, block, first, count);
            }
            // `end` is past the run or placed already: skip it.
            first = end + 1;
        }
        Ok(())
    }

    /// Validates a whole batch, then places it: each run of zero pages,
    /// and each run of consecutive normal pages ([`NormalRun`]), in one
    /// call.
    fn place_batch<H: DestinationHost>(
        &mut self,
        now: Instant,
        batch: &PageBatch<'_>,
        host: &mut H,
    ) -> Result<(), HandleError<H::Error>> {
        let block = batch.block();
        let pages = self.block_pages(block, batch.page_size() as u64)?;
        if let Some((entry, _)) = batch.pages().find(|(e, _)| e.index >= pages) {
            return Err(DestError::PageOutOfBlock {
                block,
                page: entry.index,
                pages,
            }
            .into());
        }
        let refused = self.check_page_terms(now, &*host, batch)?;
        // Checked equal to this end's terms of the bytes: booked as they are.
        let mut terms = batch.terms();
        let page_size = batch.page_size();
        let mut zero_run: Option<(u64, u64)> = None;
        let mut normal_run: Option<NormalRun<'_>> = None;
        // Bytes of normal pages' data gone by: a run's bytes are its
        // pages' slices, one after another in the batch's data.
        let mut offset = 0;
        for (entry, data) in batch.pages() {
            let checked = data.and_then(|_| terms.next());
            // Pages keep their stream order: a run is placed before
            // anything that does not extend it.
            if !normal_run.is_some_and(|r| data.is_some() && r.extended_by(entry.index)) {
                self.place_normal_run(now, host, block, normal_run.take())?;
            }
            let at = offset;
            if data.is_some() {
                offset += page_size;
            }
            if self.placed_already(block, entry.index) || refused.contains(&entry.index) {
                self.place_zero_entries(now, host, block, zero_run.take())?;
                continue;
            }
            match (entry.kind, data) {
                (PageKind::Zero, _) => {
                    self.stats.ram.duplicate += 1;
                    zero_run = match zero_run {
                        Some((first, count)) if first + count == entry.index => {
                            Some((first, count + 1))
                        }
                        run => {
                            self.place_zero_entries(now, host, block, run)?;
                            Some((entry.index, 1))
                        }
                    };
                }
                (PageKind::Normal, Some(data)) => {
                    self.place_zero_entries(now, host, block, zero_run.take())?;
                    self.stats.ram.normal += 1;
                    self.stats.ram.normal_bytes += data.len() as u64;
                    // A term checked equal to this end's is booked as it
                    // is (the page is not hashed twice); the others are
                    // hashed as the run is placed.
                    if let Some(term) = checked {
                        self.book_term(block, entry.index, term);
                    }
                    match normal_run.as_mut() {
                        Some(run) => run.count += 1,
                        None => {
                            normal_run = Some(NormalRun {
                                first: entry.index,
                                count: 1,
                                page_size,
                                data: batch.data().get(at..).unwrap_or(&[]),
                                hash: checked.is_none(),
                            })
                        }
                    }
                }
                (PageKind::Normal, None) => {}
            }
        }
        self.place_normal_run(now, host, block, normal_run)?;
        self.place_zero_entries(now, host, block, zero_run)
    }

    /// Places a run of zero pages of a batch (none: nothing).
    fn place_zero_entries<H: DestinationHost>(
        &mut self,
        now: Instant,
        host: &mut H,
        block: u16,
        run: Option<(u64, u64)>,
    ) -> Result<(), HandleError<H::Error>> {
        let Some((first, count)) = run else {
            return Ok(());
        };
        by_host(
            HostOp::PlaceZeroPages,
            host.place_zero_pages(block, first, count),
        )?;
        self.book_zero(block, first, count);
        self.arrived(now, block, first, count);
        Ok(())
    }

    /// Places a run of consecutive normal pages of a batch, already
    /// booked, in one [`DestinationHost::place_pages`] (none: nothing).
    fn place_normal_run<H: DestinationHost>(
        &mut self,
        now: Instant,
        host: &mut H,
        block: u16,
        run: Option<NormalRun<'_>>,
    ) -> Result<(), HandleError<H::Error>> {
        let Some(run) = run else {
            return Ok(());
        };
        // The batch's decoder checked its data holds every normal page.
        let bytes = run
            .bytes()
            .ok_or(DestError::Decode(DecodeError::Truncated {
                what: "page data",
            }))?;
        match self.booking_key().filter(|_| run.hash) {
            Some(key) => {
                let mut terms = [0u64; NormalRun::MAX_PAGES as usize];
                let terms = terms.get_mut(..run.count as usize).unwrap_or(&mut []);
                by_host(
                    HostOp::PlacePages,
                    host.place_hashed_pages(&key, block, run.first, bytes, terms),
                )?;
                for (page, &term) in (run.first..).zip(terms.iter()) {
                    self.book_term(block, page, term);
                }
            }
            None => by_host(
                HostOp::PlacePages,
                host.place_pages(block, run.first, bytes),
            )?,
        }
        self.arrived(now, block, run.first, run.count);
        Ok(())
    }
}

/// Consecutive normal pages of one batch, placed with one call: a host
/// does per call what it can do once for many pages (the KVM shim
/// populates fresh memory with one `MADV_POPULATE_WRITE` a run, where one
/// a page cost 0.45 us a page more; one `UFFDIO_COPY` in postcopy).
#[derive(Clone, Copy)]
struct NormalRun<'a> {
    first: u64,
    count: u64,
    page_size: usize,
    /// The batch's data from the run's first page on.
    data: &'a [u8],
    /// Whether the pages' terms are still to be computed (those of a batch
    /// that carried them were checked and booked already): the host
    /// hashes them as it places them.
    hash: bool,
}

impl<'a> NormalRun<'a> {
    /// At most this many pages a run (64 KiB of 4 KiB pages): the bytes
    /// just hashed are still in cache when the host copies them.
    const MAX_PAGES: u64 = 16;

    /// Whether page `index` comes right after the run, which has room.
    fn extended_by(&self, index: u64) -> bool {
        self.first + self.count == index && self.count < Self::MAX_PAGES
    }

    /// The run's bytes (`None` if the batch's data were short of them).
    fn bytes(&self) -> Option<&'a [u8]> {
        self.data.get(..self.count as usize * self.page_size)
    }
}

/// The host's postcopy half, which a postcopy command after the advise
/// needs (the advise checked that there is one).
fn postcopy_host<H: DestinationHost>(
    host: &mut H,
) -> Result<&mut dyn PostcopyHost<Error = H::Error>, HandleError<H::Error>> {
    host.postcopy()
        .ok_or(HandleError::Dest(DestError::PostcopyUnsupported))
}

fn check_layout(layout: &[BlockInfo<'_>], list: &BlockList<'_>) -> Result<(), DestError> {
    if list.len() != layout.len() {
        return Err(DestError::BlockCountMismatch {
            source: list.len(),
            destination: layout.len(),
        });
    }
    for (index, (theirs, ours)) in list.iter().zip(layout.iter()).enumerate() {
        if theirs.id.as_str() != ours.id.as_str() {
            return Err(DestError::BlockIdMismatch { index });
        }
        if theirs.length != ours.length {
            return Err(DestError::BlockLengthMismatch {
                index,
                source: theirs.length,
                destination: ours.length,
            });
        }
        if theirs.page_size != ours.page_size {
            return Err(DestError::PageSizeMismatch {
                index,
                source: u64::from(theirs.page_size),
                destination: u64::from(ours.page_size),
            });
        }
    }
    Ok(())
}

/// Who writes a faulted page's request on the return path.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Request {
    /// The engine queues it.
    Queue,
    /// The host wrote it already ([`DestinationEngine::set_host_requests`]).
    SentByHost,
}

#[cfg(test)]
mod tests;

/// Checks a multifd packet's pages against the destination's RAM layout,
/// before a byte of them is read into guest memory: the block exists, its
/// page size is the packet's, every page lies inside it. A sync packet has
/// no pages and passes.
pub fn check_channel_pages(
    layout: &[BlockInfo<'_>],
    header: &PacketHeader,
    entries: &PacketEntries<'_>,
) -> Result<(), DestError> {
    let PacketKind::Pages {
        block, page_shift, ..
    } = header.kind
    else {
        return Ok(());
    };
    let info = layout
        .get(usize::from(block))
        .ok_or(DestError::NoSuchBlock {
            block,
            blocks: layout.len(),
        })?;
    let page_size = 1u64 << page_shift;
    if page_size != u64::from(info.page_size) {
        return Err(DestError::PageSizeMismatch {
            index: usize::from(block),
            source: page_size,
            destination: u64::from(info.page_size),
        });
    }
    let pages = info.length / page_size;
    match entries.iter().find(|e| e.index >= pages) {
        Some(e) => Err(DestError::PageOutOfBlock {
            block,
            page: e.index,
            pages,
        }),
        None => Ok(()),
    }
}

/// Checks a Pages record of the postcopy preempt channel for a host thread
/// that installs requested pages itself, ahead of the engine (a preempt
/// reader that places them the moment they are read, instead of waking
/// the migration thread first: QEMU's preempt thread does the same). It
/// passes only what the engine accepts too: the block exists with the
/// batch's page size, every page lies inside it, and the pages carry the
/// terms the engine demands. With `key` (the engine's
/// [`DestinationEngine::page_term_key`]) every normal page must come with
/// its term and match it; without, no term may come. On `Err` the host
/// places nothing of the batch and leaves it to the engine, which refuses
/// it the same way (and fails the migration, telling the source), so no
/// unchecked byte reaches guest memory either way.
///
/// The engine still takes the same bytes after
/// ([`DestinationEngine::handle_preempt_input`]), for its books; its own
/// placement then finds the pages present, which the host must leave as
/// they are (userfaultfd's `UFFDIO_COPY` does: `EEXIST`).
///
/// `term` hashes a page as [`DigestKey::page_term`] does (which it may
/// be): the host's own [`DestinationHost::page_term`], for the same reason.
pub fn check_preempt_pages(
    layout: &[BlockInfo<'_>],
    key: Option<DigestKey>,
    batch: &PageBatch<'_>,
    term: impl Fn(&DigestKey, u16, u64, &[u8]) -> u64,
) -> Result<(), DestError> {
    let block = batch.block();
    let info = layout
        .get(usize::from(block))
        .ok_or(DestError::NoSuchBlock {
            block,
            blocks: layout.len(),
        })?;
    if batch.page_size() as u64 != u64::from(info.page_size) {
        return Err(DestError::PageSizeMismatch {
            index: usize::from(block),
            source: batch.page_size() as u64,
            destination: u64::from(info.page_size),
        });
    }
    let pages = info.length / u64::from(info.page_size);
    if let Some((entry, _)) = batch.pages().find(|(e, _)| e.index >= pages) {
        return Err(DestError::PageOutOfBlock {
            block,
            page: entry.index,
            pages,
        });
    }
    let carries = batch.flags().contains(BatchFlags::TERMS);
    let Some(key) = key else {
        return match carries {
            true => Err(DestError::DigestOutOfOrder(
                "page terms without a digest key",
            )),
            false => Ok(()),
        };
    };
    let mut normal = batch
        .pages()
        .filter_map(|(entry, data)| Some((entry, data?)))
        .peekable();
    if !carries {
        return match normal.peek() {
            Some(_) => Err(DestError::PageTermsMissing { block }),
            None => Ok(()),
        };
    }
    let mut terms = batch.terms();
    for (entry, data) in normal {
        if terms.next() != Some(term(&key, block, entry.index, data)) {
            return Err(DestError::PageTermMismatch {
                block,
                page: entry.index,
            });
        }
    }
    Ok(())
}
