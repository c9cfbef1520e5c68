//! Multifd on the source: which channel the next batch goes to, each
//! channel's packet numbers, the sync generation, and the sync at the end
//! of every pass (a SYNC packet on each channel, then the flush on the
//! main stream).

use super::{PageReader, SourceAction, SourceEngine};
use crate::wire::{
    BatchFlags, ChannelHello, Command, MAX_CHANNELS, PacketHeader, PacketKind, Record,
};

/// The channels of a multifd migration and where their sequence is.
pub(super) struct Channels {
    /// Number of channels (1..=255).
    count: u16,
    /// The id every hello carries.
    migration_id: u64,
    /// Channels greeted so far; all of them before anything else is sent
    /// on the channels.
    greeted: u16,
    /// The channel the next batch goes to (round robin).
    next: u16,
    /// The next packet number of each channel.
    packets: [u64; MAX_CHANNELS as usize],
    /// The current sync generation.
    generation: u32,
    /// A sync is under way: SYNC packets sent to this many channels (the
    /// flush on the main stream follows the last).
    sync: Option<u16>,
    /// Packets sent in the current generation: a sync with nothing to
    /// order is skipped.
    dirty: bool,
}

impl Channels {
    /// `count` channels whose hellos carry `migration_id`.
    pub fn new(count: u16, migration_id: u64) -> Self {
        Channels {
            count: count.clamp(1, MAX_CHANNELS),
            migration_id,
            greeted: 0,
            next: 0,
            packets: [0; MAX_CHANNELS as usize],
            generation: 0,
            sync: None,
            dirty: false,
        }
    }

    /// Number of channels.
    pub fn count(&self) -> u16 {
        self.count
    }

    /// The migration id.
    pub fn migration_id(&self) -> u64 {
        self.migration_id
    }

    /// Asks for a sync before the next pass, if any packet went out since
    /// the last one.
    pub fn request_sync(&mut self) {
        if self.dirty && self.sync.is_none() {
            self.sync = Some(0);
        }
    }

    /// True while a sync or the hellos are still to go out.
    pub fn has_pending(&self) -> bool {
        self.greeted < self.count || self.sync.is_some()
    }

    /// Takes the channel and the header of the next pages packet.
    fn next_packet(&mut self, kind: PacketKind) -> PacketHeader {
        let channel = self.next;
        self.next = (self.next + 1) % self.count;
        self.dirty = true;
        self.header(channel, kind)
    }

    fn header(&mut self, channel: u16, kind: PacketKind) -> PacketHeader {
        let slot = &mut self.packets[usize::from(channel)];
        let packet = *slot;
        *slot += 1;
        PacketHeader {
            channel,
            generation: self.generation,
            packet,
            kind,
        }
    }
}

impl SourceEngine<'_> {
    /// The hellos, then the steps of a pending sync, one per call: a SYNC
    /// packet on each channel, then the flush on the main stream. `None`
    /// when nothing is pending.
    pub(super) fn next_channel_message(&mut self) -> Option<SourceAction<'_>> {
        let ch = self.channels.as_mut()?;
        let (channel, encoded) = if ch.greeted < ch.count {
            let channel = ch.greeted;
            ch.greeted += 1;
            let hello = ChannelHello {
                migration_id: ch.migration_id,
                index: channel,
                count: ch.count,
            };
            (Some(channel), hello.encode(self.scratch))
        } else {
            let sent = ch.sync?;
            if sent < ch.count {
                ch.sync = Some(sent + 1);
                let header = ch.header(sent, PacketKind::Sync);
                (Some(sent), header.encode(&[], self.scratch))
            } else {
                let generation = ch.generation;
                ch.generation = ch.generation.wrapping_add(1);
                ch.sync = None;
                ch.dirty = false;
                let flush = Record::Command(Command::MultifdFlush { generation });
                (None, flush.encode(self.scratch))
            }
        };
        let len = match encoded {
            Ok(len) => len,
            Err(e) => return Some(self.encode_failed(e)),
        };
        self.count_sent(len as u64, 0);
        let bytes = &self.scratch[..len];
        Some(match channel {
            Some(channel) => {
                self.stats.ram.multifd_bytes += len as u64;
                SourceAction::SendChannel { channel, bytes }
            }
            None => SourceAction::Send(bytes),
        })
    }

    /// The batch being assembled as a packet on the next channel.
    pub(super) fn emit_channel_batch(&mut self, ram: &impl PageReader) -> SourceAction<'_> {
        let block = usize::from(self.scan.batch.block());
        let shift = self.tracking.get(block).map_or(12, |t| t.page_shift);
        let entries = self.scan.batch.entries();
        let Some(ch) = self.channels.as_mut() else {
            return self.emit_batch(ram, BatchFlags::empty());
        };
        let header = ch.next_packet(PacketKind::Pages {
            block: block as u16,
            page_shift: shift,
            count: entries.len() as u32,
        });
        let header_len = match header.encode(entries, self.scratch) {
            Ok(len) => len,
            Err(e) => return self.encode_failed(e),
        };
        let normal = self.scan.batch.normal().len() as u64;
        let zero = self.scan.batch.len() as u64 - normal;
        let data = normal << shift;
        self.stats.ram.normal += normal;
        self.stats.ram.duplicate += zero;
        self.stats.ram.normal_bytes += data;
        self.stats.ram.multifd_bytes += header_len as u64 + data;
        self.count_sent(header_len as u64 + data, self.scan.batch.len() as u64);
        self.refresh_stats();
        let pages_len = self.scan.batch.normal().len();
        let batch = &self.scan.batch;
        super::verify::book_batch(
            &mut self.verify,
            ram,
            block as u16,
            batch.normal(),
            batch.terms(),
        );
        self.scan.batch.clear();
        SourceAction::SendChannelPages {
            channel: header.channel,
            header: &self.scratch[..header_len],
            block: block as u16,
            pages: self.scan.batch.sent_normal(pages_len),
        }
    }

    /// The preamble's announcement of the channels, if multifd is on.
    pub(super) fn channel_setup(&self) -> Option<Command<'static>> {
        self.channels.as_ref().map(|ch| Command::MultifdSetup {
            channels: ch.count(),
            migration_id: ch.migration_id(),
        })
    }
}

/// Bytes of the preamble's announcement.
pub(super) fn setup_len() -> usize {
    Record::Command(Command::MultifdSetup {
        channels: 1,
        migration_id: 0,
    })
    .encoded_len()
}
