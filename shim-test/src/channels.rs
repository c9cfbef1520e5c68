//! Simulated multifd channels: one [`SimLink`] per channel, and on the
//! destination a receiver per channel that checks each hello and packet
//! with the core's [`ChannelReceiver`] and places pages straight into
//! destination RAM, as the KVM shim's receiver threads do.
//!
//! A receiver parks at its channel's SYNC until [`SimChannels::sync`]
//! (the main stream's flush) has seen every channel reach it; bytes of the
//! next generation stay buffered meanwhile, unapplied.

use std::fmt;

use livemig_core::destination::{ChannelTotals, DestError, check_channel_pages};
use livemig_core::digest::{DigestBooks, DigestKey};
use livemig_core::wire::{
    BlockInfo, ChannelHello, ChannelReceiver, DecodeError, HELLO_LEN, PACKET_HEADER_LEN,
    PacketEntries, PacketHeader, PacketKind, PageKind, SequenceError,
};

use crate::{MemoryError, SimLink, SimRam};

/// Why a simulated channel failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelError {
    /// The source announced another channel count than there are links.
    Count {
        /// Channels announced.
        announced: u16,
        /// Links in the scenario.
        links: usize,
    },
    /// A malformed hello or packet.
    Decode(u16, DecodeError),
    /// A packet out of sequence, or a stray hello.
    Sequence(u16, SequenceError),
    /// A packet's pages do not fit the RAM layout.
    Pages(u16, DestError),
    /// Destination RAM refused a page.
    Ram(u16, MemoryError),
    /// The connection broke, or closed inside a packet.
    Broken(u16),
    /// At a flush, the channel had not reached its sync and never will
    /// (closed or silent: on a real host, the sync's deadline).
    NotSynced(u16),
    /// At the end of the stream or the switch to postcopy, the channel
    /// held bytes after its last flushed sync.
    AfterLastSync(u16),
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count { announced, links } => {
                write!(f, "{announced} channels announced, {links} connected")
            }
            Self::Decode(c, e) => write!(f, "multifd channel {c}: {e}"),
            Self::Sequence(c, e) => write!(f, "multifd channel {c}: {e}"),
            Self::Pages(c, e) => write!(f, "multifd channel {c}: {e}"),
            Self::Ram(c, e) => write!(f, "multifd channel {c}: {e}"),
            Self::Broken(c) => write!(f, "multifd channel {c}: connection broken"),
            Self::NotSynced(c) => {
                write!(f, "multifd channel {c} did not reach its sync")
            }
            Self::AfterLastSync(c) => {
                write!(f, "multifd channel {c} carried bytes after its last sync")
            }
        }
    }
}

/// The receivers' digest books, when the source verifies: each page's
/// current term (one slot per page, shared by the channels: a page travels
/// on one channel per generation), and per block the change to its sum
/// since the engine last took it.
struct ChannelBooks {
    key: DigestKey,
    terms: Vec<Vec<u64>>,
    delta: Vec<u64>,
}

impl ChannelBooks {
    fn record(&mut self, block: usize, page: u64, term: u64) {
        let slot = self
            .terms
            .get_mut(block)
            .and_then(|t| t.get_mut(usize::try_from(page).ok()?));
        if let (Some(slot), Some(delta)) = (slot, self.delta.get_mut(block)) {
            *delta = delta.wrapping_sub(*slot).wrapping_add(term);
            *slot = term;
        }
    }
}

/// One channel's receiving end.
struct Receiver {
    seq: ChannelReceiver,
    greeted: bool,
    /// Bytes arrived and not parsed yet.
    buf: Vec<u8>,
    /// A packet of pages arrived since the last flushed sync.
    unsynced: bool,
}

/// The channels of one simulated migration: the links (the source sends
/// into them) and, once the main stream announced them, their receivers.
pub struct SimChannels {
    /// One link per channel.
    pub links: Vec<SimLink>,
    receivers: Vec<Receiver>,
    totals: ChannelTotals,
    books: Option<ChannelBooks>,
    /// The first failure; channels stop at it.
    failed: Option<ChannelError>,
    /// `failed` was handed out by `take_failure`.
    reported: bool,
    /// Per block, the pages the channels placed (normal or zero).
    arrived: Vec<Vec<bool>>,
    /// Sealed (the end of the stream) or ended (the switch to postcopy):
    /// nothing more is read.
    ended: bool,
}

impl SimChannels {
    /// Bytes each channel link buffers by default, as the KVM shim's
    /// sender queue of two 1 MiB packets does: the source hands a packet
    /// to one channel and goes on with the next while it is on the wire.
    pub const SEND_BUFFER: u64 = 2 << 20;

    /// Channels over these links (none: multifd is off).
    pub fn new(links: Vec<SimLink>) -> Self {
        SimChannels {
            links,
            receivers: Vec::new(),
            totals: ChannelTotals::default(),
            books: None,
            failed: None,
            reported: false,
            arrived: Vec::new(),
            ended: false,
        }
    }

    /// The source announced `count` channels of migration `id`; with
    /// `key`, the receivers book every page they place (see
    /// [`take_digest`](Self::take_digest)).
    pub fn open(
        &mut self,
        count: u16,
        id: u64,
        key: Option<DigestKey>,
        layout: &[BlockInfo<'_>],
    ) -> Result<(), ChannelError> {
        if usize::from(count) != self.links.len() {
            return Err(ChannelError::Count {
                announced: count,
                links: self.links.len(),
            });
        }
        self.receivers = (0..count)
            .map(|_| Receiver {
                seq: ChannelReceiver::new(id, count),
                greeted: false,
                buf: Vec::new(),
                unsynced: false,
            })
            .collect();
        self.arrived = layout
            .iter()
            .map(|b| vec![false; DigestBooks::words(b)])
            .collect();
        self.books = key.map(|key| ChannelBooks {
            key,
            terms: layout
                .iter()
                .map(|b| vec![0; DigestBooks::words(b)])
                .collect(),
            delta: vec![0; layout.len()],
        });
        Ok(())
    }

    /// The change the channels' pages made to block `block`'s digest since
    /// the last call (0 without a key).
    pub fn take_digest(&mut self, block: u16) -> u64 {
        self.books
            .as_mut()
            .and_then(|b| b.delta.get_mut(usize::from(block)))
            .map_or(0, std::mem::take)
    }

    /// The first channel failure seen by [`pump`](Self::pump), once.
    pub fn take_failure(&mut self) -> Option<ChannelError> {
        if self.reported {
            return None;
        }
        self.reported = self.failed.is_some();
        self.failed.clone()
    }

    /// Receives what arrived by `now_ns` on every channel and applies
    /// every packet up to each channel's sync. A failure is kept for
    /// [`take_failure`](Self::take_failure) (and for the next sync).
    pub fn pump(&mut self, now_ns: u64, ram: &mut SimRam, layout: &[BlockInfo<'_>]) -> bool {
        if self.ended {
            return false;
        }
        let mut progressed = false;
        let mut chunk = vec![0u8; 1 << 16];
        for (i, (link, rx)) in self.links.iter_mut().zip(&mut self.receivers).enumerate() {
            let index = i as u16;
            loop {
                let n = link.recv(now_ns, &mut chunk);
                if n == 0 {
                    break;
                }
                progressed = true;
                rx.buf.extend_from_slice(&chunk[..n]);
            }
            if self.failed.is_some() {
                continue;
            }
            let books = &mut self.books;
            let arrived = &mut self.arrived;
            if let Err(e) = parse(index, rx, ram, layout, &mut self.totals, books, arrived) {
                self.failed = Some(e);
                continue;
            }
            let mid_packet = !rx.buf.is_empty() && !rx.seq.is_synced();
            if link.is_reset(now_ns) || (link.is_eof(now_ns) && mid_packet) {
                self.failed = Some(ChannelError::Broken(index));
            }
        }
        progressed
    }

    /// The flush of `generation`: every channel must have reached its
    /// SYNC of it, with everything that was sent delivered (`pump` with a
    /// time past every arrival); then all are released into the next
    /// generation.
    pub fn sync(
        &mut self,
        generation: u32,
        ram: &mut SimRam,
        layout: &[BlockInfo<'_>],
    ) -> Result<ChannelTotals, ChannelError> {
        self.pump(u64::MAX, ram, layout);
        if let Some(e) = self.failed.clone() {
            return Err(e);
        }
        for (i, rx) in self.receivers.iter().enumerate() {
            if !rx.seq.is_synced() || rx.seq.generation() != generation {
                return Err(ChannelError::NotSynced(i as u16));
            }
        }
        for rx in &mut self.receivers {
            rx.seq.release();
            rx.unsynced = false;
        }
        // What is buffered behind the syncs belongs to the next
        // generation: the next pump applies it, and the next flush counts
        // it (as a real receiver, which goes on only once released).
        Ok(std::mem::take(&mut self.totals))
    }

    /// The end of a precopy stream, or the switch to postcopy (the
    /// engine's
    /// [`ChannelsHost::seal_channels`](livemig_core::destination::ChannelsHost::seal_channels)):
    /// everything sent so far is received, the channels are read no more
    /// (what comes later is never placed), and one that placed pages, or
    /// read a SYNC, after its last flushed sync is an error.
    pub fn seal(&mut self, ram: &mut SimRam, layout: &[BlockInfo<'_>]) -> Result<(), ChannelError> {
        if self.ended {
            return Ok(());
        }
        self.pump(u64::MAX, ram, layout);
        self.ended = true;
        if let Some(e) = self.failed.clone() {
            return Err(e);
        }
        match self
            .receivers
            .iter()
            .position(|rx| rx.unsynced || rx.seq.is_synced() || !rx.buf.is_empty())
        {
            Some(i) => Err(ChannelError::AfterLastSync(i as u16)),
            None => Ok(()),
        }
    }

    /// The switch to postcopy (the engine's
    /// [`ChannelsHost::end_channels`](livemig_core::destination::ChannelsHost::end_channels)):
    /// everything sent has arrived and nothing came after the last
    /// flushed sync; the channels are read no more, and `placed` hears
    /// of every page they placed with its term (0 without books).
    pub fn end(
        &mut self,
        ram: &mut SimRam,
        layout: &[BlockInfo<'_>],
        placed: &mut dyn FnMut(u16, u64, u64),
    ) -> Result<(), ChannelError> {
        self.seal(ram, layout)?;
        for (block, pages) in self.arrived.iter().enumerate() {
            let terms = self.books.as_ref().and_then(|b| b.terms.get(block));
            for (page, _) in pages.iter().enumerate().filter(|(_, a)| **a) {
                let term = terms.and_then(|t| t.get(page)).copied().unwrap_or(0);
                placed(block as u16, page as u64, term);
            }
        }
        Ok(())
    }
}

/// Parses and applies what `rx` holds, up to its sync.
fn parse(
    index: u16,
    rx: &mut Receiver,
    ram: &mut SimRam,
    layout: &[BlockInfo<'_>],
    totals: &mut ChannelTotals,
    books: &mut Option<ChannelBooks>,
    arrived: &mut [Vec<bool>],
) -> Result<(), ChannelError> {
    let mut at = 0;
    let result = loop {
        let rest = &rx.buf[at..];
        if !rx.greeted {
            let Some(bytes) = rest.get(..HELLO_LEN) else {
                break Ok(());
            };
            let hello = ChannelHello::decode(bytes).map_err(|e| ChannelError::Decode(index, e))?;
            rx.seq
                .hello(&hello)
                .map_err(|e| ChannelError::Sequence(index, e))?;
            rx.greeted = true;
            at += HELLO_LEN;
            totals.bytes += HELLO_LEN as u64;
            continue;
        }
        if rx.seq.is_synced() {
            break Ok(());
        }
        let Some(bytes) = rest.get(..PACKET_HEADER_LEN) else {
            break Ok(());
        };
        let header = PacketHeader::decode(bytes).map_err(|e| ChannelError::Decode(index, e))?;
        let table_end = PACKET_HEADER_LEN + header.entries_len();
        let Some(table) = rest.get(PACKET_HEADER_LEN..table_end) else {
            break Ok(());
        };
        let entries =
            PacketEntries::decode(&header, table).map_err(|e| ChannelError::Decode(index, e))?;
        check_channel_pages(layout, &header, &entries)
            .map_err(|e| ChannelError::Pages(index, e))?;
        let (block, shift) = match header.kind {
            PacketKind::Pages {
                block, page_shift, ..
            } => (usize::from(block), page_shift),
            PacketKind::Sync => (0, 0),
        };
        let end = table_end + entries.data_len(shift);
        let Some(mut data) = rest.get(table_end..end) else {
            break Ok(());
        };
        rx.seq
            .packet(&header)
            .map_err(|e| ChannelError::Sequence(index, e))?;
        rx.unsynced |= matches!(header.kind, PacketKind::Pages { .. });
        for entry in entries.iter() {
            if let Some(a) = arrived
                .get_mut(block)
                .and_then(|a| a.get_mut(usize::try_from(entry.index).ok()?))
            {
                *a = true;
            }
            match entry.kind {
                PageKind::Normal => {
                    let (page, tail) = data.split_at(1 << shift);
                    data = tail;
                    ram.write_page(block, entry.index, page)
                        .map_err(|e| ChannelError::Ram(index, e))?;
                    if let Some(b) = books {
                        let term = b.key.page_term(block as u16, entry.index, page);
                        b.record(block, entry.index, term);
                    }
                    totals.normal += 1;
                    totals.normal_bytes += 1 << shift;
                }
                PageKind::Zero => {
                    ram.zero_page(block, entry.index)
                        .map_err(|e| ChannelError::Ram(index, e))?;
                    if let Some(b) = books {
                        b.record(block, entry.index, 0);
                    }
                    totals.zero += 1;
                }
            }
        }
        totals.bytes += end as u64;
        at += end;
    };
    rx.buf.drain(..at);
    result
}
