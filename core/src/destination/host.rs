//! What the destination engine asks of the VMM, and how the VMM's own
//! failures come back to the caller.
//!
//! The host reports failures in its own type ([`DestinationHost::Error`]:
//! an errno, a `UFFDIO_COPY` failure, a device's load error), and the
//! engine hands that value back untouched in [`HandleError::Host`],
//! beside which operation failed. The engine itself keeps only the
//! operation ([`DestError::Host`]), so that [`DestError`] stays a small
//! `Copy` value it can store and compare, and the core needs no heap to
//! carry an error it does not understand.

use core::fmt;

use super::DestError;
use crate::digest::DigestKey;
use crate::wire::{DeviceState, PageRange};

/// What the VMM does with what arrives. Page ranges handed to it have been
/// checked against the block's size.
pub trait DestinationHost {
    /// The VMM's own failure, handed back to the caller of
    /// [`DestinationEngine::handle_input`](super::DestinationEngine::handle_input)
    /// in [`HandleError::Host`].
    type Error: fmt::Debug + fmt::Display;

    /// Writes `data` (a whole number of pages) into block `block` starting
    /// at page `first_page`. The engine hands over a batch's consecutive
    /// normal pages together (up to 16 a call), so that what a host does
    /// once per call, such as populating fresh memory or a `UFFDIO_COPY`,
    /// covers a run.
    fn place_pages(&mut self, block: u16, first_page: u64, data: &[u8]) -> Result<(), Self::Error>;
    /// Makes `count` pages of block `block` from `first_page` on read as
    /// zero (a fresh destination's memory already does; a page placed
    /// earlier in the migration must be zeroed).
    fn place_zero_pages(
        &mut self,
        block: u16,
        first_page: u64,
        count: u64,
    ) -> Result<(), Self::Error>;
    /// Loads one device's state. Setup-time sections (the compatibility
    /// record) arrive before any RAM: an error here refuses the source
    /// before a page moves.
    fn load_device(&mut self, device: &DeviceState<'_>) -> Result<(), Self::Error>;

    /// The verification's term of `data`, page `page` of block `block`
    /// ([`DigestKey::page_term`], which the default calls). A host may
    /// compute the same term with vector code this crate, heap-free and
    /// without `unsafe`, cannot pick at run time (the KVM shim uses AVX2
    /// where the CPU has it): every page received is hashed, so its speed
    /// is the destination's share of what verification costs. It must
    /// return exactly [`DigestKey::page_term`]'s value.
    fn page_term(&self, key: &DigestKey, block: u16, page: u64, data: &[u8]) -> u64 {
        key.page_term(block, page, data)
    }

    /// [`place_pages`](Self::place_pages) for a verifying engine, which
    /// also needs each page's term ([`page_term`](Self::page_term)) in
    /// `terms`, one per page of `data`, in order. A host that can hash a
    /// page as it copies it overrides this (the KVM shim does, with
    /// AVX-512: each received byte read once for both, where a hash and
    /// then a copy read it twice); the default hashes each page, then
    /// places them all. The terms must be exactly
    /// [`DigestKey::page_term`]'s.
    fn place_hashed_pages(
        &mut self,
        key: &DigestKey,
        block: u16,
        first_page: u64,
        data: &[u8],
        terms: &mut [u64],
    ) -> Result<(), Self::Error> {
        if let Some(page_size) = data.len().checked_div(terms.len()) {
            let pages = data.chunks_exact(page_size.max(1));
            for ((page, bytes), term) in (first_page..).zip(pages).zip(terms.iter_mut()) {
                *term = self.page_term(key, block, page, bytes);
            }
        }
        self.place_pages(block, first_page, data)
    }

    /// The postcopy half of this host, if it has one. A host without
    /// postcopy keeps the default, and the engine refuses a source that
    /// advises postcopy with [`DestError::PostcopyUnsupported`] before
    /// anything is transferred.
    fn postcopy(&mut self) -> Option<&mut dyn PostcopyHost<Error = Self::Error>> {
        None
    }

    /// The multifd half of this host, if it has one. A host without it
    /// keeps the default, and the engine refuses a source that announces
    /// channels with [`DestError::MultifdUnsupported`] before any page.
    fn channels(&mut self) -> Option<&mut dyn ChannelsHost<Error = Self::Error>> {
        None
    }

    /// The source is about to stop its guest (its SwitchoverStart): from
    /// now until the guest starts here, every moment is downtime. A host
    /// may put its migration threads ahead of the others for that span;
    /// the default does nothing.
    fn stop_starting(&mut self) {}
}

/// What the channels placed between two syncs, for the statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChannelTotals {
    /// Normal pages placed.
    pub normal: u64,
    /// Bytes of the normal pages.
    pub normal_bytes: u64,
    /// Zero pages.
    pub zero: u64,
    /// Bytes read from the channels (hellos, headers, entries, pages).
    pub bytes: u64,
}

/// What a destination that takes multifd channels also does. The channels
/// are the host's: it reads them (on threads of its own, straight into
/// guest memory), checking each hello and packet with
/// [`ChannelReceiver`](crate::wire::ChannelReceiver) and each packet's
/// pages with [`check_channel_pages`](super::check_channel_pages); the
/// engine only orders them against the main stream.
pub trait ChannelsHost {
    /// The VMM's own failure (the same type as its
    /// [`DestinationHost::Error`]).
    type Error: fmt::Debug + fmt::Display;

    /// The source announced `channels` channels whose hellos carry
    /// `migration_id`: accept them (with a deadline) and start receiving.
    /// With `key` (the source verifies the migration), the receivers book
    /// each page they place under it: see
    /// [`take_channel_digest`](Self::take_channel_digest).
    fn open_channels(
        &mut self,
        channels: u16,
        migration_id: u64,
        key: Option<DigestKey>,
    ) -> Result<(), Self::Error>;

    /// The main stream reached the flush of `generation`: wait (with a
    /// deadline) until every channel has read its SYNC of `generation`
    /// and placed every page before it, then release the channels into
    /// the next generation. Returns what they placed since the last sync.
    /// A channel that failed, closed or fell silent is an error.
    fn sync_channels(&mut self, generation: u32) -> Result<ChannelTotals, Self::Error>;

    /// After a sync, with a key given to [`open_channels`](Self::open_channels):
    /// how much the pages the channels placed in block `block` since the
    /// last call changed the block's digest (the wrapping sum of each
    /// placed page's new term minus the term it replaced). The receivers
    /// keep each page's term themselves, one slot per page shared by all
    /// of them (a page travels on one channel per generation, and the sync
    /// orders generations); the engine adds the change to its books
    /// ([`DigestBooks::add_elsewhere`](crate::digest::DigestBooks::add_elsewhere)).
    fn take_channel_digest(&mut self, block: u16) -> u64;

    /// The switch to postcopy: the source synced the channels before its
    /// first discard and sends nothing more on them (postcopy's pages
    /// travel on the main stream and the preempt channel). End them: stop
    /// their receivers, close them, and fail if anything arrived after
    /// the last sync (pages the engine never ordered against the main
    /// stream). Then call `placed(block, page, term)` once for every page
    /// the channels placed, normal or zero, with the term the receivers
    /// booked for it (0 without a key, and for a zero page), so that the
    /// engine counts the page as received (a fault on it is served here,
    /// a recovery does not ask for it again) and keeps its term in its own
    /// books, where a later copy of the page replaces it.
    ///
    /// Also called, after [`seal_channels`](Self::seal_channels), when a
    /// precopy's digest differs and the page is to be located: the terms
    /// must be in the engine's books for that, and the stream fails
    /// whatever the channels would do next.
    fn end_channels(&mut self, placed: &mut dyn FnMut(u16, u64, u64)) -> Result<(), Self::Error>;

    /// The source's digest (or, unverified, the end of the stream) has
    /// arrived in precopy: the last flush is behind, and no channel may
    /// place a page from now on. Seal them: a packet read after this is
    /// refused, its pages not written, and a channel that placed pages
    /// after its last flushed sync (pages the engine never counted, nor
    /// booked: the digests would agree over memory that differs) is an
    /// error. This runs inside the stop: it must not wait on a channel.
    fn seal_channels(&mut self) -> Result<(), Self::Error>;
}

/// What a destination that takes postcopy also does.
pub trait PostcopyHost {
    /// The VMM's own failure (the same type as its
    /// [`DestinationHost::Error`]).
    type Error: fmt::Debug + fmt::Display;

    /// The source will use postcopy: prepare for it now (check that
    /// userfaultfd is available, that the page sizes are supported), before
    /// anything is transferred.
    fn postcopy_advise(
        &mut self,
        host_page_size: u64,
        target_page_size: u64,
    ) -> Result<(), Self::Error>;

    /// Drops the pages of `range` in block `block`: they were dirtied on
    /// the source after being sent, so the next guest touch must fault and
    /// fetch them (`MADV_DONTNEED` under userfaultfd).
    fn discard(&mut self, block: u16, range: PageRange) -> Result<(), Self::Error>;

    /// Postcopy begins: from now on missing pages fault (register guest RAM
    /// with userfaultfd in missing mode) and every page placed must be
    /// installed atomically.
    fn postcopy_listen(&mut self) -> Result<(), Self::Error>;

    /// Start the vCPUs: the guest now runs on the destination, and its
    /// faults go to
    /// [`DestinationEngine::handle_page_fault`](super::DestinationEngine::handle_page_fault).
    fn postcopy_run(&mut self) -> Result<(), Self::Error>;

    /// The source sends requested pages on the postcopy preempt channel
    /// too: accept its connection (from the same connector as the main
    /// one) and feed everything it carries, from its first byte, to
    /// [`DestinationEngine::handle_preempt_input`](super::DestinationEngine::handle_preempt_input),
    /// which checks its hello against `migration_id`. Called at setup,
    /// before any page, and again in a postcopy recovery whose stream
    /// announces a new channel (a fresh `migration_id`; the old channel's
    /// connection is gone): accept it where the recovery's connection came
    /// from. An error then pauses the recovery rather than fail the
    /// migration (the guest runs here). Only when the engine was given a
    /// preempt decoder
    /// ([`DestinationEngine::take_preempt`](super::DestinationEngine::take_preempt)).
    fn open_preempt(&mut self, migration_id: u64) -> Result<(), Self::Error>;
}

/// Which host operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostOp {
    /// [`DestinationHost::place_pages`].
    PlacePages,
    /// [`DestinationHost::place_zero_pages`].
    PlaceZeroPages,
    /// [`DestinationHost::load_device`].
    LoadDevice,
    /// [`PostcopyHost::postcopy_advise`].
    PostcopyAdvise,
    /// [`PostcopyHost::discard`].
    Discard,
    /// [`PostcopyHost::postcopy_listen`].
    PostcopyListen,
    /// [`PostcopyHost::postcopy_run`].
    PostcopyRun,
    /// [`PostcopyHost::open_preempt`].
    OpenPreempt,
    /// [`ChannelsHost::open_channels`].
    OpenChannels,
    /// [`ChannelsHost::sync_channels`].
    SyncChannels,
    /// [`ChannelsHost::end_channels`].
    EndChannels,
    /// [`ChannelsHost::seal_channels`].
    SealChannels,
}

impl fmt::Display for HostOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostOp::PlacePages => "placing pages",
            HostOp::PlaceZeroPages => "zeroing pages",
            HostOp::LoadDevice => "loading device state",
            HostOp::PostcopyAdvise => "preparing for postcopy",
            HostOp::Discard => "discarding pages",
            HostOp::PostcopyListen => "entering postcopy",
            HostOp::PostcopyRun => "starting the guest",
            HostOp::OpenPreempt => "opening the postcopy preempt channel",
            HostOp::OpenChannels => "opening the multifd channels",
            HostOp::SyncChannels => "syncing the multifd channels",
            HostOp::EndChannels => "ending the multifd channels for postcopy",
            HostOp::SealChannels => "sealing the multifd channels at the end of the stream",
        })
    }
}

/// Why [`DestinationEngine::handle_input`](super::DestinationEngine::handle_input)
/// failed: the engine's own error, or the host's, handed back as the host
/// returned it. Either way the migration has failed (the return path says
/// so to the source).
#[derive(Debug, PartialEq, Eq)]
pub enum HandleError<E> {
    /// The stream or the protocol.
    Dest(DestError),
    /// The VMM failed.
    Host {
        /// The operation.
        op: HostOp,
        /// The host's error.
        error: E,
    },
}

impl<E> HandleError<E> {
    /// The engine's view of the failure: the error itself, or
    /// [`DestError::Host`] naming the operation.
    pub fn dest_error(&self) -> DestError {
        match self {
            HandleError::Dest(e) => *e,
            HandleError::Host { op, .. } => DestError::Host(*op),
        }
    }
}

impl<E> From<DestError> for HandleError<E> {
    fn from(e: DestError) -> Self {
        HandleError::Dest(e)
    }
}

impl<E: fmt::Display> fmt::Display for HandleError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandleError::Dest(e) => e.fmt(f),
            HandleError::Host { op, error } => write!(f, "the VMM failed {op}: {error}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for HandleError<E> {}

/// Tags a host result with its operation.
pub(super) fn by_host<E>(op: HostOp, r: Result<(), E>) -> Result<(), HandleError<E>> {
    r.map_err(|error| HandleError::Host { op, error })
}
