//! Multifd on the destination: the channels accepted on the VMM's
//! listener, one receiver thread each, reading every packet straight into
//! guest memory (`readv` into the pages' iovecs) after checking its header,
//! sequence and pages with the core.
//!
//! A packet's pages are read [`FUSED_PAGES`] at a time: each piece's
//! memory is populated just before the read ([`Populate`]) and, when the
//! source verifies, hashed right after it, while the bytes the kernel just
//! wrote are still in this core's cache (a whole 4 MiB packet read first
//! and hashed after is hashed from memory: 0.53 against 0.22 us a page in
//! `livemig bench --case first-touch`).
//!
//! A receiver that reads its channel's SYNC reports it and waits: it reads
//! nothing more until the main stream's flush has found every channel at
//! the sync and released them ([`ChannelReceivers::sync`]). Any failure
//! (a malformed or out-of-sequence packet, a read error, a close inside a
//! packet, a channel missing at the flush's deadline) fails the migration
//! before LOADED, so the source resumes its guest.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use livemig_core::destination::{ChannelTotals, DestError, check_channel_pages};
use livemig_core::digest::DigestKey;
use livemig_core::wire::{
    ChannelHello, ChannelReceiver, DecodeError, HELLO_LEN, PACKET_HEADER_LEN, PacketEntries,
    PacketHeader, PacketKind, PageKind, SequenceError,
};

use super::super::ram_layout;
use super::Event;
use super::populate::Populate;
use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE, PageIovecs};
use crate::transport::{Connection, Listener, TransportError};

const PAGE: u64 = PAGE_SIZE as u64;
const ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Pages read (and populated, and hashed) at a time: 128 KiB, which stays
/// in a core's cache between the read and the hash.
const FUSED_PAGES: usize = 32;

/// Why a multifd channel failed on the destination.
#[derive(Debug)]
pub enum ChannelFailure {
    /// The source announced channels and the VMM gave no listener to
    /// accept them on ([`super::receive`] rather than
    /// [`super::receive_with_channels`]).
    NoListener,
    /// Accepting a channel, or reading its hello, failed or timed out.
    Accept(TransportError),
    /// A malformed hello or packet on channel `channel`.
    Decode {
        /// The channel (its hello's index; the connection's order before).
        channel: u16,
        /// What was wrong.
        error: DecodeError,
    },
    /// A packet or hello out of sequence, or of another migration.
    Sequence {
        /// The channel.
        channel: u16,
        /// What was wrong.
        error: SequenceError,
    },
    /// Two connections claimed the same channel index.
    DuplicateIndex(u16),
    /// A packet's pages do not fit the RAM layout.
    Pages {
        /// The channel.
        channel: u16,
        /// What was wrong.
        error: DestError,
    },
    /// Guest RAM refused a page.
    Ram {
        /// The channel.
        channel: u16,
        /// What was wrong.
        error: MemoryError,
    },
    /// Reading the channel failed (or it closed inside a packet).
    Read {
        /// The channel.
        channel: u16,
        /// The read that failed.
        error: TransportError,
    },
    /// The channel's receiver thread could not be started.
    Spawn {
        /// The channel.
        channel: u16,
        /// Why the OS refused it.
        error: std::io::Error,
    },
    /// The channel closed, or its thread ended, before the sync.
    Closed(u16),
    /// At the end of the stream or the switch to postcopy, the channel
    /// had placed pages after its last flushed sync: pages the engine
    /// never counted or booked, nor ordered against the main stream.
    AfterLastSync(u16),
    /// The channel read a packet of pages after the end of the stream
    /// (they were not placed).
    Sealed(u16),
    /// The channel did not reach the sync within the deadline.
    SyncTimeout {
        /// The channel.
        channel: u16,
        /// The deadline, milliseconds.
        ms: u128,
    },
}

impl fmt::Display for ChannelFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoListener => f.write_str(
                "the source sends pages on multifd channels and this destination was given \
                 no listener to accept them on",
            ),
            Self::Accept(e) => write!(f, "accepting a multifd channel: {e}"),
            Self::Decode { channel, error } => write!(f, "multifd channel {channel}: {error}"),
            Self::Sequence { channel, error } => write!(f, "multifd channel {channel}: {error}"),
            Self::DuplicateIndex(i) => write!(f, "two connections claim multifd channel {i}"),
            Self::Pages { channel, error } => write!(f, "multifd channel {channel}: {error}"),
            Self::Ram { channel, error } => write!(f, "multifd channel {channel}: {error}"),
            Self::Read { channel, error } => write!(f, "multifd channel {channel}: {error}"),
            Self::Spawn { channel, error } => {
                write!(
                    f,
                    "multifd channel {channel}: starting its receiver thread: {error}"
                )
            }
            Self::Closed(c) => write!(f, "multifd channel {c} closed before its sync"),
            Self::AfterLastSync(c) => {
                write!(f, "multifd channel {c} placed pages after its last sync")
            }
            Self::Sealed(c) => write!(
                f,
                "multifd channel {c} sent pages after the end of the stream (not placed)"
            ),
            Self::SyncTimeout { channel, ms } => {
                write!(
                    f,
                    "multifd channel {channel} did not reach its sync within {ms} ms"
                )
            }
        }
    }
}

impl std::error::Error for ChannelFailure {}

/// What a receiver tells the migration thread.
enum Report {
    /// The channel read its SYNC of `generation`, having placed `totals`
    /// since the last one, which changed each block's digest by `digest`
    /// (empty without a key).
    Synced {
        channel: u16,
        generation: u32,
        totals: ChannelTotals,
        digest: Vec<u64>,
    },
    /// The channel closed between packets.
    Closed(u16),
    /// The channel failed.
    Failed(ChannelFailure),
}

/// Pages the channels wrote and pages that arrived on them, one bit per
/// guest page each, shared by the receivers: a zero page needs writing
/// only over a page written earlier, and at the switch to postcopy every
/// page that arrived (normal or zero) counts as received.
pub(super) struct Placed {
    written: Vec<AtomicU64>,
    arrived: Vec<AtomicU64>,
}

impl Placed {
    fn new(words: usize) -> Self {
        let bits = || (0..words).map(|_| AtomicU64::new(0)).collect();
        Placed {
            written: bits(),
            arrived: bits(),
        }
    }

    /// Page `gfn` arrived, and was written (`placed`) or is zero: whether
    /// it had been written before.
    fn set(&self, gfn: u64, placed: bool) -> bool {
        let (Some(word), Some(arrived)) = (
            self.written.get((gfn / 64) as usize),
            self.arrived.get((gfn / 64) as usize),
        ) else {
            return false;
        };
        let bit = 1 << (gfn % 64);
        arrived.fetch_or(bit, Ordering::Relaxed);
        let old = if placed {
            word.fetch_or(bit, Ordering::Relaxed)
        } else {
            word.fetch_and(!bit, Ordering::Relaxed)
        };
        old & bit != 0
    }

    /// The written pages' words, to merge into the host's.
    pub(super) fn words(&self) -> impl Iterator<Item = u64> + '_ {
        self.written.iter().map(|w| w.load(Ordering::Relaxed))
    }

    /// Whether page `gfn` arrived on a channel.
    fn arrived(&self, gfn: u64) -> bool {
        self.arrived
            .get((gfn / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (gfn % 64)) != 0)
    }
}

/// The receivers' digest books, when the source verifies: the key and
/// each guest page's current term, one slot per page of each block shared
/// by all receivers. A page travels on one channel per generation and the
/// sync orders generations (its release happens after every receiver's
/// report), so a slot has one writer at a time.
struct ChannelBooks {
    key: DigestKey,
    terms: Vec<Vec<AtomicU64>>,
}

impl ChannelBooks {
    /// Page `page` of `block` now holds contents of term `term`: the
    /// change to the block's sum.
    fn record(&self, block: u16, page: u64, term: u64) -> u64 {
        let slot = self
            .terms
            .get(usize::from(block))
            .and_then(|t| t.get(usize::try_from(page).ok()?));
        slot.map_or(0, |s| term.wrapping_sub(s.swap(term, Ordering::Relaxed)))
    }
}

/// The receivers of one incoming multifd migration.
pub(super) struct ChannelReceivers {
    /// Clones of the connections, by channel: shut down at the end so a
    /// receiver blocked in `read` wakes.
    conns: Vec<Connection>,
    releases: Vec<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    reports: Receiver<Report>,
    /// Channels that reported their sync, what they placed and how it
    /// changed each block's digest.
    synced: Vec<Option<(u32, ChannelTotals, Vec<u64>)>>,
    /// Per block, the change to its digest the channels made since the
    /// engine last took it ([`take_digest`](Self::take_digest)).
    digest: Vec<u64>,
    closed: Vec<bool>,
    seal: Arc<Seal>,
    pub(super) placed: Arc<Placed>,
    /// Each page's term, shared with the receivers (with a key).
    books: Option<Arc<ChannelBooks>>,
    /// How long a sync or an accept may wait.
    deadline: Duration,
}

impl ChannelReceivers {
    /// Accepts `count` channels on `listener` (each within `deadline`),
    /// checks their hellos against the announcement and starts a receiver
    /// on each; with `key`, each receiver books the pages it places. `wake`
    /// tells the migration thread a channel failed; `populate` is shared
    /// with it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn open(
        listener: &Listener,
        count: u16,
        migration_id: u64,
        key: Option<DigestKey>,
        ram: &GuestMemory,
        deadline: Duration,
        wake: &Sender<Event>,
        populate: &Arc<Populate>,
    ) -> Result<Self, ChannelFailure> {
        let mut by_index: Vec<Option<(Connection, ChannelReceiver)>> =
            (0..count).map(|_| None).collect();
        for order in 0..count {
            let conn = listener
                .accept_within(deadline)
                .map_err(ChannelFailure::Accept)?;
            conn.set_read_timeout(Some(deadline))
                .map_err(ChannelFailure::Accept)?;
            let mut hello = [0u8; HELLO_LEN];
            conn.read_exact(&mut hello)
                .map_err(ChannelFailure::Accept)?;
            conn.set_read_timeout(None)
                .map_err(ChannelFailure::Accept)?;
            let hello = ChannelHello::decode(&hello).map_err(|error| ChannelFailure::Decode {
                channel: order,
                error,
            })?;
            let mut seq = ChannelReceiver::new(migration_id, count);
            let index = seq
                .hello(&hello)
                .map_err(|error| ChannelFailure::Sequence {
                    channel: order,
                    error,
                })?;
            let slot = by_index
                .get_mut(usize::from(index))
                .ok_or(ChannelFailure::DuplicateIndex(index))?;
            if slot.replace((conn, seq)).is_some() {
                return Err(ChannelFailure::DuplicateIndex(index));
            }
        }
        let (report_tx, reports) = mpsc::channel();
        let words = ram.guest_end().div_ceil(PAGE).div_ceil(64) as usize;
        let placed = Arc::new(Placed::new(words));
        let seal = Arc::new(Seal::new(count));
        let books = key.map(|key| {
            Arc::new(ChannelBooks {
                key,
                terms: ram
                    .regions()
                    .iter()
                    .map(|r| (0..r.len() / PAGE).map(|_| AtomicU64::new(0)).collect())
                    .collect(),
            })
        });
        let mut receivers = ChannelReceivers {
            conns: Vec::new(),
            releases: Vec::new(),
            threads: Vec::new(),
            reports,
            synced: vec![None; usize::from(count)],
            digest: vec![0; ram.regions().len()],
            closed: vec![false; usize::from(count)],
            seal: Arc::clone(&seal),
            placed: Arc::clone(&placed),
            books: books.clone(),
            deadline,
        };
        for (channel, slot) in by_index.into_iter().enumerate() {
            // Every index below `count` was filled once: `count` distinct
            // indexes arrived.
            let Some((conn, seq)) = slot else {
                return Err(ChannelFailure::Closed(channel as u16));
            };
            receivers
                .conns
                .push(conn.try_clone().map_err(ChannelFailure::Accept)?);
            let (release_tx, release) = mpsc::channel();
            receivers.releases.push(release_tx);
            let receiver = ChannelThread {
                channel: channel as u16,
                conn,
                seq,
                ram: ram.clone(),
                placed: Arc::clone(&placed),
                seal: Arc::clone(&seal),
                books: books.clone(),
                reports: report_tx.clone(),
                release,
                wake: wake.clone(),
                populate: Arc::clone(populate),
            };
            let thread = thread::Builder::new()
                .name(format!("livemig-mfd{channel}"))
                .spawn(move || receiver.run())
                .map_err(|error| ChannelFailure::Spawn {
                    channel: channel as u16,
                    error,
                })?;
            receivers.threads.push(thread);
        }
        Ok(receivers)
    }

    /// The main stream's flush of `generation`: waits (each report within
    /// the deadline) until every channel has reported its SYNC of it, then
    /// releases them all into the next generation. Returns what they
    /// placed since the last sync.
    pub(super) fn sync(&mut self, generation: u32) -> Result<ChannelTotals, ChannelFailure> {
        let deadline = Instant::now() + self.deadline;
        while let Some(waiting) = self.synced.iter().position(Option::is_none) {
            if self.closed.get(waiting).copied().unwrap_or(true) {
                return Err(ChannelFailure::Closed(waiting as u16));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok(report) => self.note(report)?,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(ChannelFailure::SyncTimeout {
                        channel: waiting as u16,
                        ms: self.deadline.as_millis(),
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ChannelFailure::Closed(waiting as u16));
                }
            }
        }
        let mut totals = ChannelTotals::default();
        for (channel, s) in self.synced.iter_mut().enumerate() {
            let Some((g, t, digest)) = s.take() else {
                continue;
            };
            if g != generation {
                return Err(ChannelFailure::Sequence {
                    channel: channel as u16,
                    error: SequenceError::WrongGeneration {
                        expected: generation,
                        found: g,
                    },
                });
            }
            totals.normal += t.normal;
            totals.normal_bytes += t.normal_bytes;
            totals.zero += t.zero;
            totals.bytes += t.bytes;
            for (sum, d) in self.digest.iter_mut().zip(digest) {
                *sum = sum.wrapping_add(d);
            }
        }
        // Every receiver is parked at its SYNC: what each placed is
        // counted now, before any goes on (a seal right after this sync
        // must not find a receiver that has not woken yet unsynced).
        for channel in 0..self.releases.len() {
            self.seal.released(channel as u16);
        }
        for release in &self.releases {
            // A receiver that ended has reported why; the next sync says.
            let _ = release.send(());
        }
        Ok(totals)
    }

    /// The change the channels' pages made to block `block`'s digest since
    /// the last call (0 without a key).
    pub(super) fn take_digest(&mut self, block: u16) -> u64 {
        self.digest
            .get_mut(usize::from(block))
            .map_or(0, std::mem::take)
    }

    /// A failure reported since the last look, outside a sync.
    pub(super) fn failure(&mut self) -> Option<ChannelFailure> {
        while let Ok(report) = self.reports.try_recv() {
            if let Err(e) = self.note(report) {
                return Some(e);
            }
        }
        None
    }

    fn note(&mut self, report: Report) -> Result<(), ChannelFailure> {
        match report {
            Report::Synced {
                channel,
                generation,
                totals,
                digest,
            } => {
                if let Some(slot) = self.synced.get_mut(usize::from(channel)) {
                    *slot = Some((generation, totals, digest));
                }
                Ok(())
            }
            Report::Closed(channel) => {
                if let Some(c) = self.closed.get_mut(usize::from(channel)) {
                    *c = true;
                }
                Ok(())
            }
            Report::Failed(e) => Err(e),
        }
    }

    /// Ends the receivers: shuts their connections down and joins them.
    pub(super) fn finish(mut self) {
        self.stop();
    }

    /// Lets go of the receivers parked at a sync, shuts the connections
    /// down (a receiver blocked in `read` wakes) and joins the threads.
    fn stop(&mut self) {
        self.releases.clear();
        for conn in &self.conns {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// The end of a precopy stream: from now on no receiver places a page
    /// (one that reads a packet fails instead), and one that placed pages
    /// since the last flush released it, or is placing them now, is an
    /// error. Waits on nothing: it runs inside the stop.
    pub(super) fn seal(&mut self) -> Result<(), ChannelFailure> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        self.seal.seal()
    }

    /// The switch to postcopy: seals the receivers, ends them as
    /// [`finish`](Self::finish) does, and calls `placed(block, page,
    /// term)` for every page that arrived on a channel, `ram`'s blocks in
    /// order.
    pub(super) fn end(
        mut self,
        ram: &GuestMemory,
        placed: &mut dyn FnMut(u16, u64, u64),
    ) -> Result<(), ChannelFailure> {
        self.seal()?;
        self.stop();
        for (block, region) in ram.regions().iter().enumerate() {
            let first_gfn = region.guest_phys() / PAGE;
            let terms = self.books.as_ref().and_then(|b| b.terms.get(block));
            for page in 0..region.len() / PAGE {
                if !self.placed.arrived(first_gfn + page) {
                    continue;
                }
                let term = terms
                    .and_then(|t| t.get(page as usize))
                    .map_or(0, |t| t.load(Ordering::Relaxed));
                placed(block as u16, page, term);
            }
        }
        Ok(())
    }
}

/// One receiver thread's state.
struct ChannelThread {
    channel: u16,
    conn: Connection,
    seq: ChannelReceiver,
    ram: GuestMemory,
    placed: Arc<Placed>,
    seal: Arc<Seal>,
    books: Option<Arc<ChannelBooks>>,
    reports: Sender<Report>,
    release: Receiver<()>,
    wake: Sender<Event>,
    populate: Arc<Populate>,
}

impl ChannelThread {
    fn run(mut self) {
        let report = match self.receive() {
            Ok(()) => Report::Closed(self.channel),
            Err(e) => Report::Failed(e),
        };
        let failed = matches!(report, Report::Failed(_));
        let _ = self.reports.send(report);
        if failed {
            let _ = self.wake.send(Event::Channel);
        }
    }

    /// Reads packets until the channel closes between two of them (`Ok`),
    /// the migration thread lets go (`Ok`), or something fails.
    fn receive(&mut self) -> Result<(), ChannelFailure> {
        let channel = self.channel;
        let layout = ram_layout(&self.ram).map_err(|_| ChannelFailure::Closed(channel))?;
        let read_err = |error| ChannelFailure::Read { channel, error };
        let mut entry_bytes = vec![0u8; 8 * livemig_core::wire::MAX_BATCH_PAGES];
        let mut gfns: Vec<u64> = Vec::new();
        // Whether each of `gfns` was written before in this migration (its
        // memory is populated already).
        let mut written: Vec<bool> = Vec::new();
        let mut totals = ChannelTotals::default();
        let blocks = if self.books.is_some() {
            layout.len()
        } else {
            0
        };
        let mut digest = vec![0u64; blocks];
        loop {
            let mut head = [0u8; PACKET_HEADER_LEN];
            // A close between packets is the end; inside one, an error.
            let first = self.conn.read(&mut head).map_err(read_err)?;
            if first == 0 {
                return Ok(());
            }
            self.conn.read_exact(&mut head[first..]).map_err(read_err)?;
            let header = PacketHeader::decode(&head)
                .map_err(|error| ChannelFailure::Decode { channel, error })?;
            let table = &mut entry_bytes[..header.entries_len()];
            self.conn.read_exact(table).map_err(read_err)?;
            let entries = PacketEntries::decode(&header, table)
                .map_err(|error| ChannelFailure::Decode { channel, error })?;
            check_channel_pages(&layout, &header, &entries)
                .map_err(|error| ChannelFailure::Pages { channel, error })?;
            self.seq
                .packet(&header)
                .map_err(|error| ChannelFailure::Sequence { channel, error })?;
            totals.bytes += (PACKET_HEADER_LEN + header.entries_len()) as u64;
            let block = match header.kind {
                PacketKind::Sync => {
                    let done = std::mem::take(&mut totals);
                    let report = Report::Synced {
                        channel,
                        generation: self.seq.generation(),
                        totals: done,
                        digest: std::mem::replace(&mut digest, vec![0; blocks]),
                    };
                    if self.reports.send(report).is_err() || self.release.recv().is_err() {
                        return Ok(());
                    }
                    self.seq.release();
                    continue;
                }
                PacketKind::Pages { block, .. } => block,
            };
            self.seal.begin(channel)?;
            let first_gfn = self
                .ram
                .region(usize::from(block))
                .map_err(|error| ChannelFailure::Ram { channel, error })?
                .guest_phys()
                / PAGE;
            gfns.clear();
            written.clear();
            for e in entries.iter() {
                let gfn = first_gfn + e.index;
                match e.kind {
                    PageKind::Normal => {
                        gfns.push(gfn);
                        written.push(self.placed.set(gfn, true));
                    }
                    // Fresh memory reads as zero: only a page placed
                    // earlier in the migration needs writing.
                    PageKind::Zero => {
                        if let (Some(books), Some(d)) =
                            (&self.books, digest.get_mut(usize::from(block)))
                        {
                            *d = d.wrapping_add(books.record(block, e.index, 0));
                        }
                        if self.placed.set(gfn, false) {
                            self.ram
                                .write(gfn * PAGE, &ZERO_PAGE)
                                .map_err(|error| ChannelFailure::Ram { channel, error })?;
                        }
                        totals.zero += 1;
                    }
                }
            }
            for (piece, written) in gfns.chunks(FUSED_PAGES).zip(written.chunks(FUSED_PAGES)) {
                // A page written before is populated: asking again costs
                // the kernel's walk of it for nothing.
                let fresh = piece.iter().zip(written).filter(|(_, w)| !**w);
                self.populate.pages(&self.ram, fresh.map(|(&gfn, _)| gfn));
                let iov = PageIovecs::new(&self.ram, &[], piece)
                    .map_err(|error| ChannelFailure::Ram { channel, error })?;
                self.conn.read_page_iovecs(iov).map_err(read_err)?;
                let (Some(books), Some(d)) = (&self.books, digest.get_mut(usize::from(block)))
                else {
                    continue;
                };
                // The bytes just read, hashed while they are in the cache
                // (volatile reads: no vCPU runs here yet, but the memory
                // is the guest's).
                for &gfn in piece {
                    let index = gfn - first_gfn;
                    let term = self
                        .ram
                        .page_term(usize::from(block), index, &books.key)
                        .map_err(|error| ChannelFailure::Ram { channel, error })?;
                    *d = d.wrapping_add(books.record(block, index, term));
                }
            }
            self.seal.placed(channel);
            let data = (gfns.len() * PAGE_SIZE) as u64;
            totals.normal += gfns.len() as u64;
            totals.normal_bytes += data;
            totals.bytes += data;
        }
    }
}

/// Where each receiver stands, for the seal at the end of the stream:
/// one state per channel, shared by its receiver and the migration
/// thread, which never waits on it.
struct Seal(Vec<AtomicU8>);

impl Seal {
    /// Nothing placed since the last flush released the channel.
    const SYNCED: u8 = 0;
    /// Placing a packet's pages now.
    const PLACING: u8 = 1;
    /// Pages placed since the last release.
    const UNSYNCED: u8 = 2;
    /// The stream has ended: nothing more may be placed.
    const SEALED: u8 = 3;

    fn new(count: u16) -> Self {
        Seal((0..count).map(|_| AtomicU8::new(Self::SYNCED)).collect())
    }

    fn state(&self, channel: u16) -> Option<&AtomicU8> {
        self.0.get(usize::from(channel))
    }

    /// Channel `channel` is about to place a packet's pages: refused once
    /// sealed.
    fn begin(&self, channel: u16) -> Result<(), ChannelFailure> {
        let Some(state) = self.state(channel) else {
            return Err(ChannelFailure::Sealed(channel));
        };
        let mut now = state.load(Ordering::Acquire);
        loop {
            if now == Self::SEALED {
                return Err(ChannelFailure::Sealed(channel));
            }
            match state.compare_exchange(now, Self::PLACING, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(()),
                Err(found) => now = found,
            }
        }
    }

    /// The packet's pages are placed (a seal meanwhile has seen them).
    fn placed(&self, channel: u16) {
        self.advance(channel, Self::PLACING, Self::UNSYNCED);
    }

    /// A flush took the channel's sync (the receiver is parked at it):
    /// what it placed is counted.
    fn released(&self, channel: u16) {
        self.advance(channel, Self::UNSYNCED, Self::SYNCED);
    }

    /// Channel `channel` goes from `from` to `to`, if it is at `from` (a
    /// sealed one stays sealed).
    fn advance(&self, channel: u16, from: u8, to: u8) {
        if let Some(state) = self.state(channel) {
            let _ = state.compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Seals every channel: the first that placed pages after its last
    /// release, or is placing them, is the error.
    fn seal(&self) -> Result<(), ChannelFailure> {
        let mut late = None;
        for (channel, state) in self.0.iter().enumerate() {
            let was = state.swap(Self::SEALED, Ordering::AcqRel);
            if matches!(was, Self::PLACING | Self::UNSYNCED) {
                late.get_or_insert(channel as u16);
            }
        }
        late.map_or(Ok(()), |c| Err(ChannelFailure::AfterLastSync(c)))
    }
}

#[cfg(test)]
mod tests {
    use super::{ChannelFailure, Seal};

    #[test]
    fn a_seal_after_every_flush_passes_and_refuses_what_comes_later() {
        let seal = Seal::new(2);
        seal.begin(0).unwrap();
        seal.placed(0);
        // The flush, with channel 0 parked at its SYNC.
        seal.released(0);
        seal.released(1);
        seal.seal().unwrap();
        // Sealing twice (the digest, then the end of the stream) is fine.
        seal.seal().unwrap();
        assert!(matches!(seal.begin(1), Err(ChannelFailure::Sealed(1))));
    }

    #[test]
    fn pages_placed_or_being_placed_after_the_last_flush_fail_the_seal() {
        let placed = Seal::new(2);
        placed.begin(1).unwrap();
        placed.placed(1);
        assert!(matches!(
            placed.seal(),
            Err(ChannelFailure::AfterLastSync(1))
        ));
        let placing = Seal::new(2);
        placing.begin(0).unwrap();
        assert!(matches!(
            placing.seal(),
            Err(ChannelFailure::AfterLastSync(0))
        ));
        // The receiver finishing its packet does not undo the seal.
        placing.placed(0);
        assert!(matches!(placing.begin(0), Err(ChannelFailure::Sealed(0))));
    }
}
