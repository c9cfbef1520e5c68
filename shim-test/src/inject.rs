//! Faults the migration's self-check must catch, injected where no other
//! check looks: into page batches after the transport's checks (as a bug
//! in a sender, a channel or a receiver would corrupt them), and into the
//! source's dirty log. Each one leaves a stream every decoder accepts; only
//! the digest (or, for the dirty log, the source's audit at the stop) can
//! tell.

use livemig_core::wire::{
    self, BatchFlags, PACKET_HEADER_LEN, PacketHeader, PacketKind, PageEntry, PageKind, Record,
    STREAM_HEADER_LEN, StreamDecoder,
};

/// One fault, injected once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedFault {
    /// In the first batch with two normal pages of different contents
    /// after `after` normal pages have gone, those two pages' data trade
    /// places: each is placed at the other's offset.
    MisplacedPage {
        /// Normal pages sent untouched first.
        after: u64,
    },
    /// The first normal page after `after` is cut out of its batch (entry
    /// and data): the destination keeps what it had there.
    DroppedPage {
        /// Normal pages sent untouched first.
        after: u64,
    },
    /// One byte of the first normal page after `after` is flipped.
    FlippedByte {
        /// Normal pages sent untouched first.
        after: u64,
    },
    /// One byte of the first normal page of the first batch that carries
    /// page terms (a verifying source's postcopy batch, on the main
    /// stream) is flipped, its term left as the source computed it: the
    /// destination must refuse to install it.
    FlippedByteInPostcopy,
    /// As [`FlippedByteInPostcopy`](Self::FlippedByteInPostcopy), and the
    /// same page's next copy (the one the destination asks for again) is
    /// damaged the same way.
    FlippedByteInPostcopyTwice,
    /// Every dirty-log sync after the first (which picks up the
    /// initially-set log) comes back clean and loses its bits for good, as
    /// a dirty log that stopped tracking would: the guest's writes after
    /// the first pass are never sent.
    MissedDirtyPages,
    /// When the source saves its device state (precopy: after the last
    /// pass and its sync), one more packet goes out on channel 0, in
    /// sequence (the channel's next packet number and generation),
    /// carrying page 1 of block 0 filled with 0xa5: as a sender that let
    /// pages slip past the last sync would. The engine never counts or
    /// books them.
    ChannelPagesAfterLastSync,
}

/// A page: block index, page index.
type PageAt = (u16, u64);

/// The injector's state: the fault, normal pages seen, whether it fired.
#[derive(Debug)]
pub(crate) struct Injector {
    fault: Option<InjectedFault>,
    normal_seen: u64,
    /// Dirty-log syncs seen.
    syncs: u64,
    pub fired: bool,
    /// [`InjectedFault::FlippedByteInPostcopyTwice`] damaged the second copy.
    fired_again: bool,
    /// The pages (block, page) whose data the fault changed.
    pub pages: Vec<PageAt>,
    /// Channel 0's last packet header sent.
    last_on_channel_0: Option<PacketHeader>,
}

impl Injector {
    pub fn new(fault: Option<InjectedFault>) -> Self {
        Injector {
            fault,
            normal_seen: 0,
            syncs: 0,
            fired: false,
            fired_again: false,
            pages: Vec::new(),
            last_on_channel_0: None,
        }
    }

    /// Notes what went out on channel `channel` (a hello, a packet).
    pub fn channel_sent(&mut self, channel: u16, bytes: &[u8]) {
        if channel != 0 {
            return;
        }
        if let Some(header) = bytes
            .get(..PACKET_HEADER_LEN)
            .and_then(|h| PacketHeader::decode(h).ok())
        {
            self.last_on_channel_0 = Some(header);
        }
    }

    /// At the source's device-state save: the packet to send on channel
    /// 0, once, for [`InjectedFault::ChannelPagesAfterLastSync`].
    pub fn late_channel_packet(&mut self) -> Option<Vec<u8>> {
        if self.fault != Some(InjectedFault::ChannelPagesAfterLastSync) || self.fired {
            return None;
        }
        let last = self.last_on_channel_0?;
        let synced = matches!(last.kind, PacketKind::Sync);
        let header = PacketHeader {
            channel: 0,
            generation: last.generation.wrapping_add(u32::from(synced)),
            packet: last.packet + 1,
            kind: PacketKind::Pages {
                block: 0,
                page_shift: 12,
                count: 1,
            },
        };
        let entries = [PageEntry {
            index: 1,
            kind: PageKind::Normal,
        }];
        let mut packet = vec![0u8; PACKET_HEADER_LEN + 8];
        let n = header.encode(&entries, &mut packet).ok()?;
        packet.truncate(n);
        packet.extend_from_slice(&[0xa5; 4096]);
        self.fired = true;
        self.pages = vec![(0, 1)];
        Some(packet)
    }

    /// Applies a batch fault to `record` (one whole Pages record, header
    /// and data) when its turn has come.
    pub fn batch(&mut self, record: &mut Vec<u8>, normal_pages: usize) {
        let seen = self.normal_seen;
        self.normal_seen += normal_pages as u64;
        if self.fault == Some(InjectedFault::FlippedByteInPostcopyTwice)
            && self.fired
            && !self.fired_again
        {
            if let Some(&page) = self.pages.first()
                && let Some((changed, _)) = rewrite(record, Pick::Page(page), self.fault)
            {
                *record = changed;
                self.fired_again = true;
            }
            return;
        }
        let after = match self.fault {
            Some(
                InjectedFault::MisplacedPage { after }
                | InjectedFault::DroppedPage { after }
                | InjectedFault::FlippedByte { after },
            ) => after,
            // Any batch is due; `rewrite` leaves those without terms.
            Some(
                InjectedFault::FlippedByteInPostcopy | InjectedFault::FlippedByteInPostcopyTwice,
            ) => seen,
            _ => return,
        };
        if self.fired || seen + normal_pages as u64 <= after {
            return;
        }
        // The first normal page of this batch that is due.
        let skip = after.saturating_sub(seen) as usize;
        if let Some((changed, pages)) = rewrite(record, Pick::After(skip), self.fault) {
            *record = changed;
            self.fired = true;
            self.pages = pages;
        }
    }

    /// Applies a flipped byte to `packet` (a multifd channel packet:
    /// `header_len` bytes of header and entries, then `normal_pages`
    /// pages' data) when its turn has come; the other batch faults are the
    /// main stream's.
    pub fn channel_packet(
        &mut self,
        packet: &mut [u8],
        header_len: usize,
        block: u16,
        pages: &[u64],
    ) {
        let normal_pages = pages.len();
        let seen = self.normal_seen;
        self.normal_seen += normal_pages as u64;
        let Some(InjectedFault::FlippedByte { after }) = self.fault else {
            return;
        };
        if self.fired || normal_pages == 0 || seen + normal_pages as u64 <= after {
            return;
        }
        let page_len = (packet.len() - header_len) / normal_pages;
        let skip = after.saturating_sub(seen) as usize;
        // The page's middle byte, as the main-stream fault flips.
        if let Some(byte) = packet.get_mut(header_len + skip * page_len + page_len / 2) {
            *byte ^= 0x10;
            self.fired = true;
            self.pages = pages.get(skip).map(|&p| (block, p)).into_iter().collect();
        }
    }

    /// Applies the dirty-log fault to the log of block `block` just
    /// fetched: returns the bits it lost (to clear them from the log), or
    /// `None` when this sync is left alone.
    pub fn sync(&mut self, block: usize, words: &mut [u64]) -> Option<Vec<u64>> {
        if self.fault != Some(InjectedFault::MissedDirtyPages) {
            return None;
        }
        if block == 0 {
            self.syncs += 1;
        }
        if self.syncs <= 1 || words.iter().all(|&w| w == 0) {
            return None;
        }
        self.fired = true;
        let lost = words.to_vec();
        words.fill(0);
        Some(lost)
    }
}

/// `record` with the fault applied from its `skip`-th normal page on, and
/// the pages whose data changed, or `None` when the batch does not lend
/// itself (too few pages).
/// Which normal page of a batch a fault starts at.
#[derive(Clone, Copy)]
enum Pick {
    /// The first after this many.
    After(usize),
    /// This page, if the batch carries it.
    Page(PageAt),
}

fn rewrite(
    record: &[u8],
    pick: Pick,
    fault: Option<InjectedFault>,
) -> Option<(Vec<u8>, Vec<PageAt>)> {
    let mut stream = vec![0u8; STREAM_HEADER_LEN];
    wire::encode_stream_header(&mut stream).ok()?;
    stream.extend_from_slice(record);
    let mut scratch = vec![0u8; record.len()];
    let mut decoder = StreamDecoder::new(&mut scratch);
    let decoded = decoder.decode(&stream).ok()?;
    let Some(Record::Pages(batch)) = decoded.record else {
        return None;
    };
    let with_terms = batch.flags().contains(BatchFlags::TERMS);
    let postcopy = matches!(
        fault,
        Some(InjectedFault::FlippedByteInPostcopy | InjectedFault::FlippedByteInPostcopyTwice)
    );
    if postcopy && !with_terms {
        return None;
    }
    // Each normal page keeps its term (if the batch has them) wherever
    // its data goes: the term is the source's, of the page it sent.
    let mut terms = batch.terms();
    let mut pages: Vec<(PageEntry, Option<Vec<u8>>, Option<u64>)> = batch
        .pages()
        .map(|(e, d)| {
            let term = d.and_then(|_| terms.next());
            (e, d.map(<[u8]>::to_vec), term)
        })
        .collect();
    let block = batch.block();
    let normal_at = (0..pages.len()).filter(|&i| pages[i].0.kind == PageKind::Normal);
    let normal: Vec<usize> = match pick {
        Pick::After(skip) => normal_at.skip(skip).collect(),
        Pick::Page((b, p)) => normal_at
            .filter(|&i| b == block && pages[i].0.index == p)
            .collect(),
    };
    let hit = match fault? {
        InjectedFault::MisplacedPage { .. } => {
            let first = *normal.first()?;
            let other = normal
                .iter()
                .copied()
                .find(|&i| pages[i].1 != pages[first].1)?;
            let data = pages[first].1.take();
            pages[first].1 = pages[other].1.take();
            pages[other].1 = data;
            vec![(block, pages[first].0.index), (block, pages[other].0.index)]
        }
        InjectedFault::DroppedPage { .. } => {
            let (entry, _, _) = pages.remove(*normal.first()?);
            if pages.is_empty() {
                return None;
            }
            vec![(block, entry.index)]
        }
        InjectedFault::FlippedByte { .. }
        | InjectedFault::FlippedByteInPostcopy
        | InjectedFault::FlippedByteInPostcopyTwice => {
            let i = *normal.first()?;
            let index = pages[i].0.index;
            let data = pages[i].1.as_mut()?;
            let mid = data.len() / 2;
            data[mid] ^= 0x10;
            vec![(block, index)]
        }
        InjectedFault::MissedDirtyPages | InjectedFault::ChannelPagesAfterLastSync => return None,
    };
    let entries: Vec<PageEntry> = pages.iter().map(|(e, _, _)| *e).collect();
    let flags: BatchFlags = batch.flags();
    let mut out = vec![0u8; record.len()];
    let n = wire::encode_page_batch_header_with_terms(
        &mut out,
        batch.block(),
        batch.page_shift(),
        flags,
        &entries,
        pages.iter().filter_map(|(_, _, t)| *t),
    )
    .ok()?;
    out.truncate(n);
    for data in pages.iter().filter_map(|(_, d, _)| d.as_deref()) {
        out.extend_from_slice(data);
    }
    Some((out, hit))
}
