//! Multifd channels: the extra connections that carry guest pages beside
//! the main stream (QEMU's multifd, `zero-page-detection=multifd`).
//!
//! Each channel is its own connection. It opens with a 24-byte
//! [`ChannelHello`] (magic `"LMFD"`, version, the migration id the main
//! stream announced in [`Command::MultifdSetup`](super::Command), the
//! channel's index and the channel count), then carries packets: a 28-byte
//! [`PacketHeader`] (magic `"LMFP"`, flags, page shift, channel, sync
//! generation, entry count, packet number, block), the entry table (8 bytes
//! per page, the Pages record's encoding: page index and a zero flag) and
//! the bytes of every normal page in entry order. The header and table
//! come first so a sender `writev`s the pages straight from guest memory
//! and a receiver `readv`s them straight into it, knowing where each page
//! goes before a byte of it arrives.
//!
//! A packet with the [`PacketFlags::SYNC`] flag carries no pages: it ends
//! generation `g` on its channel. The main stream's
//! [`Command::MultifdFlush`](super::Command) of the same generation tells
//! the destination to wait until every channel has reached its SYNC before
//! it goes on, and no channel applies a packet of generation `g + 1` before
//! then: a page copy of one pass can never land after the next pass's copy
//! of the same page (QEMU's `multifd_flush_after_each_section`).
//!
//! [`ChannelReceiver`] is the sequencing a receiver checks, packet by
//! packet: the right channel, consecutive packet numbers, the current
//! generation.

use core::fmt;

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::cursor::Writer;
use super::pages::{check_entries, data_len};
use super::{
    DecodeError, EncodeError, MAX_BATCH_PAGES, MAX_PAGE_SHIFT, MIN_PAGE_SHIFT, PAGE_ENTRY_LEN,
    PageEntry, PageKind,
};

/// First four bytes of a channel: not `"LMIG"`, so that a channel accepted
/// as a main stream (or the reverse) is refused at once.
pub const CHANNEL_MAGIC: [u8; 4] = *b"LMFD";
/// First four bytes of every packet: a desynchronised channel is caught at
/// its next header rather than read as page data.
pub const PACKET_MAGIC: [u8; 4] = *b"LMFP";
/// The channel format version this code reads and writes.
pub const CHANNEL_VERSION: u32 = 1;
/// Bytes of [`ChannelHello`].
pub const HELLO_LEN: usize = 24;
/// Bytes of [`PacketHeader`].
pub const PACKET_HEADER_LEN: usize = 28;
/// Most channels a migration may open (`multifd-channels` is a `u8`).
pub const MAX_CHANNELS: u16 = 255;

/// The 24-byte first message of a channel (packet level).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct HelloRaw {
    magic: [u8; 4],
    version: U32,
    migration_id: U64,
    index: U16,
    count: U16,
    reserved: U32,
}

/// The 28-byte header of every packet (packet level).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct PacketRaw {
    magic: [u8; 4],
    flags: u8,
    page_shift: u8,
    channel: U16,
    generation: U32,
    count: U32,
    packet: U64,
    block: U16,
    reserved: U16,
}

const _: () = assert!(size_of::<HelloRaw>() == HELLO_LEN);
const _: () = assert!(size_of::<PacketRaw>() == PACKET_HEADER_LEN);

bitflags::bitflags! {
    /// Flags of a packet.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PacketFlags: u8 {
        /// The packet ends its generation on this channel and carries no
        /// pages.
        const SYNC = 1;
    }
}

/// A validated channel hello: which migration, which channel of how many.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelHello {
    /// The migration id of [`Command::MultifdSetup`](super::Command).
    pub migration_id: u64,
    /// This channel's index, `< count`.
    pub index: u16,
    /// How many channels the migration has, 1..=[`MAX_CHANNELS`].
    pub count: u16,
}

impl ChannelHello {
    /// Writes the hello into `out`; returns [`HELLO_LEN`].
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        if self.count == 0 || self.count > MAX_CHANNELS || self.index >= self.count {
            return Err(EncodeError::BadChannel {
                index: self.index,
                count: self.count,
            });
        }
        let mut w = Writer::new(out, HELLO_LEN)?;
        w.put(&HelloRaw {
            magic: CHANNEL_MAGIC,
            version: U32::new(CHANNEL_VERSION),
            migration_id: U64::new(self.migration_id),
            index: U16::new(self.index),
            count: U16::new(self.count),
            reserved: U32::new(0),
        })?;
        Ok(w.written())
    }

    /// Parses and validates a hello (exactly [`HELLO_LEN`] bytes).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let raw = HelloRaw::read_from_bytes(bytes).map_err(|_| DecodeError::BadLength {
            what: "channel hello",
            expected: HELLO_LEN,
            found: bytes.len(),
        })?;
        if raw.magic != CHANNEL_MAGIC {
            return Err(DecodeError::BadMagic { found: raw.magic });
        }
        if raw.version.get() != CHANNEL_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                found: raw.version.get(),
                supported: CHANNEL_VERSION,
            });
        }
        if raw.reserved.get() != 0 {
            return Err(DecodeError::ReservedFlags {
                what: "channel hello",
                value: u64::from(raw.reserved.get()),
            });
        }
        let (index, count) = (raw.index.get(), raw.count.get());
        if count == 0 || count > MAX_CHANNELS || index >= count {
            return Err(DecodeError::BadChannel { index, count });
        }
        Ok(Self {
            migration_id: raw.migration_id.get(),
            index,
            count,
        })
    }
}

/// What a packet carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketKind {
    /// `count` entries of block `block`, pages of `1 << page_shift` bytes.
    Pages {
        /// Index of the RAM block in the RamBlocks list.
        block: u16,
        /// log2 of the page size, 9..=30.
        page_shift: u8,
        /// Entries that follow the header, 1..=[`MAX_BATCH_PAGES`].
        count: u32,
    },
    /// The end of the packet's generation on its channel.
    Sync,
}

/// A validated packet header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketHeader {
    /// The channel the packet travels on.
    pub channel: u16,
    /// The sync generation (one per pass) the packet belongs to.
    pub generation: u32,
    /// The packet's number on its channel, from 0, consecutive.
    pub packet: u64,
    /// Pages or a sync.
    pub kind: PacketKind,
}

impl PacketHeader {
    /// Bytes of the entry table that follows the header.
    pub fn entries_len(&self) -> usize {
        match self.kind {
            // count <= MAX_BATCH_PAGES, checked when the header was built.
            PacketKind::Pages { count, .. } => PAGE_ENTRY_LEN * count as usize,
            PacketKind::Sync => 0,
        }
    }

    /// Writes the header and the entry table of `entries` (empty for a
    /// sync) into `out`; returns the bytes written. The caller then sends
    /// the bytes of every normal entry, in entry order.
    pub fn encode(&self, entries: &[PageEntry], out: &mut [u8]) -> Result<usize, EncodeError> {
        let (flags, block, page_shift) = match self.kind {
            PacketKind::Pages {
                block,
                page_shift,
                count,
            } => {
                if !(MIN_PAGE_SHIFT..=MAX_PAGE_SHIFT).contains(&page_shift) {
                    return Err(EncodeError::BadPageShift { shift: page_shift });
                }
                if entries.is_empty() || entries.len() != count as usize {
                    return Err(EncodeError::PacketEntries {
                        count,
                        entries: entries.len(),
                    });
                }
                check_entries(entries)?;
                (PacketFlags::empty(), block, page_shift)
            }
            PacketKind::Sync => {
                if !entries.is_empty() {
                    return Err(EncodeError::PacketEntries {
                        count: 0,
                        entries: entries.len(),
                    });
                }
                (PacketFlags::SYNC, 0, 0)
            }
        };
        let mut w = Writer::new(out, PACKET_HEADER_LEN + PAGE_ENTRY_LEN * entries.len())?;
        w.put(&PacketRaw {
            magic: PACKET_MAGIC,
            flags: flags.bits(),
            page_shift,
            channel: U16::new(self.channel),
            generation: U32::new(self.generation),
            count: U32::new(entries.len() as u32),
            packet: U64::new(self.packet),
            block: U16::new(block),
            reserved: U16::new(0),
        })?;
        for e in entries {
            w.put(&U64::new(e.to_wire()?))?;
        }
        Ok(w.written())
    }

    /// Parses and validates a header (exactly [`PACKET_HEADER_LEN`] bytes).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let raw = PacketRaw::read_from_bytes(bytes).map_err(|_| DecodeError::BadLength {
            what: "packet header",
            expected: PACKET_HEADER_LEN,
            found: bytes.len(),
        })?;
        if raw.magic != PACKET_MAGIC {
            return Err(DecodeError::BadMagic { found: raw.magic });
        }
        let flags = PacketFlags::from_bits(raw.flags).ok_or(DecodeError::ReservedFlags {
            what: "packet flags",
            value: u64::from(raw.flags),
        })?;
        if raw.reserved.get() != 0 {
            return Err(DecodeError::ReservedFlags {
                what: "packet header",
                value: u64::from(raw.reserved.get()),
            });
        }
        let count = raw.count.get();
        let kind = if flags.contains(PacketFlags::SYNC) {
            if count != 0 || raw.block.get() != 0 || raw.page_shift != 0 {
                return Err(DecodeError::BadSyncPacket);
            }
            PacketKind::Sync
        } else {
            if !(MIN_PAGE_SHIFT..=MAX_PAGE_SHIFT).contains(&raw.page_shift) {
                return Err(DecodeError::BadPageShift {
                    shift: raw.page_shift,
                });
            }
            if count == 0 || count as usize > MAX_BATCH_PAGES {
                return Err(DecodeError::TooManyPages { count });
            }
            PacketKind::Pages {
                block: raw.block.get(),
                page_shift: raw.page_shift,
                count,
            }
        };
        Ok(Self {
            channel: raw.channel.get(),
            generation: raw.generation.get(),
            packet: raw.packet.get(),
            kind,
        })
    }
}

/// A packet's validated entry table.
#[derive(Clone, Copy, Debug)]
pub struct PacketEntries<'a> {
    raw: &'a [U64],
    normal: usize,
}

impl<'a> PacketEntries<'a> {
    /// Validates the entry table of a packet (`bytes` is exactly
    /// [`PacketHeader::entries_len`] long).
    pub fn decode(header: &PacketHeader, bytes: &'a [u8]) -> Result<Self, DecodeError> {
        let expected = header.entries_len();
        let raw = <[U64]>::ref_from_bytes(bytes)
            .ok()
            .filter(|_| bytes.len() == expected)
            .ok_or(DecodeError::BadLength {
                what: "packet entries",
                expected,
                found: bytes.len(),
            })?;
        let mut normal = 0;
        for e in raw {
            if PageEntry::from_wire(e.get())?.kind == PageKind::Normal {
                normal += 1;
            }
        }
        Ok(Self { raw, normal })
    }

    /// Every entry, in order.
    pub fn iter(&self) -> impl Iterator<Item = PageEntry> + 'a {
        // Validated in `decode`.
        self.raw
            .iter()
            .filter_map(|e| PageEntry::from_wire(e.get()).ok())
    }

    /// Entries whose bytes follow.
    pub fn normal(&self) -> usize {
        self.normal
    }

    /// Bytes of page data that follow the table, for pages of
    /// `1 << page_shift` bytes.
    pub fn data_len(&self, page_shift: u8) -> usize {
        data_len(self.normal, page_shift)
    }
}

/// Why a channel's packets are out of sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SequenceError {
    /// The hello names another migration: a stray connection.
    WrongMigration {
        /// The id the main stream announced.
        expected: u64,
        /// The id the hello carries.
        found: u64,
    },
    /// The hello names a different channel count than the main stream.
    WrongCount {
        /// The count the main stream announced.
        expected: u16,
        /// The count the hello carries.
        found: u16,
    },
    /// A packet names another channel than the one it arrived on.
    WrongChannel {
        /// The channel it arrived on.
        expected: u16,
        /// The channel it names.
        found: u16,
    },
    /// A packet number is not the next one: a packet was lost or repeated.
    PacketOutOfOrder {
        /// The number expected.
        expected: u64,
        /// The number received.
        found: u64,
    },
    /// A packet of another generation than the channel's current one.
    WrongGeneration {
        /// The channel's generation.
        expected: u32,
        /// The packet's.
        found: u32,
    },
    /// A packet after the SYNC, before the destination released the
    /// channel into the next generation.
    PacketAfterSync,
}

impl fmt::Display for SequenceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::WrongMigration { expected, found } => write!(
                f,
                "multifd channel of migration {found:#018x}, expected {expected:#018x} \
                 (a stray connection)"
            ),
            Self::WrongCount { expected, found } => {
                write!(
                    f,
                    "multifd channel says {found} channels, the stream {expected}"
                )
            }
            Self::WrongChannel { expected, found } => {
                write!(
                    f,
                    "packet for channel {found} arrived on channel {expected}"
                )
            }
            Self::PacketOutOfOrder { expected, found } => {
                write!(f, "packet {found} arrived where packet {expected} was due")
            }
            Self::WrongGeneration { expected, found } => write!(
                f,
                "packet of sync generation {found} arrived in generation {expected}"
            ),
            Self::PacketAfterSync => f.write_str("packet after the channel's sync"),
        }
    }
}

impl core::error::Error for SequenceError {}

/// One channel's receiving side, as a sequence check: the hello, then
/// packets numbered from 0 in the current generation; a SYNC parks the
/// channel until [`ChannelReceiver::release`] moves it into the next
/// generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelReceiver {
    migration_id: u64,
    count: u16,
    index: Option<u16>,
    next_packet: u64,
    generation: u32,
    synced: bool,
}

impl ChannelReceiver {
    /// A receiver for a migration the main stream announced with `count`
    /// channels and id `migration_id`.
    pub fn new(migration_id: u64, count: u16) -> Self {
        Self {
            migration_id,
            count,
            index: None,
            next_packet: 0,
            generation: 0,
            synced: false,
        }
    }

    /// Checks the channel's hello against the announcement; returns the
    /// channel's index.
    pub fn hello(&mut self, hello: &ChannelHello) -> Result<u16, SequenceError> {
        if hello.migration_id != self.migration_id {
            return Err(SequenceError::WrongMigration {
                expected: self.migration_id,
                found: hello.migration_id,
            });
        }
        if hello.count != self.count {
            return Err(SequenceError::WrongCount {
                expected: self.count,
                found: hello.count,
            });
        }
        self.index = Some(hello.index);
        Ok(hello.index)
    }

    /// Checks the next packet's header against the sequence. A SYNC packet
    /// parks the channel.
    pub fn packet(&mut self, header: &PacketHeader) -> Result<(), SequenceError> {
        let index = self.index.unwrap_or(u16::MAX);
        if header.channel != index {
            return Err(SequenceError::WrongChannel {
                expected: index,
                found: header.channel,
            });
        }
        if self.synced {
            return Err(SequenceError::PacketAfterSync);
        }
        if header.packet != self.next_packet {
            return Err(SequenceError::PacketOutOfOrder {
                expected: self.next_packet,
                found: header.packet,
            });
        }
        if header.generation != self.generation {
            return Err(SequenceError::WrongGeneration {
                expected: self.generation,
                found: header.generation,
            });
        }
        self.next_packet += 1;
        self.synced = header.kind == PacketKind::Sync;
        Ok(())
    }

    /// The generation the channel is in.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// True once the channel has read the SYNC of its generation.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Every channel reached the sync: this one may go on with the next
    /// generation. Does nothing before the channel's SYNC.
    pub fn release(&mut self) {
        if self.synced {
            self.synced = false;
            self.generation = self.generation.wrapping_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: PacketKind) -> PacketHeader {
        PacketHeader {
            channel: 1,
            generation: 0,
            packet: 0,
            kind,
        }
    }

    #[test]
    fn hello_round_trip_and_refusals() {
        let hello = ChannelHello {
            migration_id: 0x0102_0304_0506_0708,
            index: 1,
            count: 2,
        };
        let mut out = [0; HELLO_LEN];
        assert_eq!(hello.encode(&mut out), Ok(HELLO_LEN));
        assert_eq!(ChannelHello::decode(&out), Ok(hello));
        assert_eq!(
            ChannelHello { index: 2, ..hello }.encode(&mut out),
            Err(EncodeError::BadChannel { index: 2, count: 2 })
        );
        let mut bad = out;
        bad[0] = b'X';
        assert!(matches!(
            ChannelHello::decode(&bad),
            Err(DecodeError::BadMagic { .. })
        ));
        let mut bad = out;
        bad[17] = 5; // index 5 of 2
        assert_eq!(
            ChannelHello::decode(&bad),
            Err(DecodeError::BadChannel { index: 5, count: 2 })
        );
        assert!(ChannelHello::decode(&out[..10]).is_err());
    }

    #[test]
    fn packets_round_trip() {
        let entries = [
            PageEntry {
                index: 3,
                kind: PageKind::Normal,
            },
            PageEntry {
                index: 9,
                kind: PageKind::Zero,
            },
        ];
        let h = header(PacketKind::Pages {
            block: 0,
            page_shift: 12,
            count: 2,
        });
        let mut out = [0; 64];
        let n = h.encode(&entries, &mut out).unwrap();
        assert_eq!(n, PACKET_HEADER_LEN + 16);
        let back = PacketHeader::decode(&out[..PACKET_HEADER_LEN]).unwrap();
        assert_eq!(back, h);
        let table = PacketEntries::decode(&back, &out[PACKET_HEADER_LEN..n]).unwrap();
        assert_eq!(table.normal(), 1);
        assert_eq!(table.data_len(12), 4096);
        assert!(table.iter().eq(entries.iter().copied()));
        // A short table, an empty packet and a sync with pages are refused.
        assert!(PacketEntries::decode(&back, &out[PACKET_HEADER_LEN..n - 1]).is_err());
        assert!(h.encode(&[], &mut out).is_err());
        assert!(header(PacketKind::Sync).encode(&entries, &mut out).is_err());
        let s = header(PacketKind::Sync);
        let n = s.encode(&[], &mut out).unwrap();
        assert_eq!(PacketHeader::decode(&out[..n]), Ok(s));
        out[5] = 12;
        assert_eq!(
            PacketHeader::decode(&out[..n]),
            Err(DecodeError::BadSyncPacket)
        );
    }

    #[test]
    fn receiver_sequence() {
        let mut rx = ChannelReceiver::new(7, 2);
        let hello = ChannelHello {
            migration_id: 8,
            index: 1,
            count: 2,
        };
        assert_eq!(
            rx.hello(&hello),
            Err(SequenceError::WrongMigration {
                expected: 7,
                found: 8
            })
        );
        assert_eq!(
            rx.hello(&ChannelHello {
                migration_id: 7,
                ..hello
            }),
            Ok(1)
        );
        let pages = header(PacketKind::Pages {
            block: 0,
            page_shift: 12,
            count: 1,
        });
        assert_eq!(rx.packet(&pages), Ok(()));
        assert_eq!(
            rx.packet(&pages),
            Err(SequenceError::PacketOutOfOrder {
                expected: 1,
                found: 0
            })
        );
        let sync = PacketHeader {
            packet: 1,
            ..header(PacketKind::Sync)
        };
        assert_eq!(rx.packet(&sync), Ok(()));
        assert!(rx.is_synced());
        let next = PacketHeader {
            packet: 2,
            generation: 1,
            ..pages
        };
        assert_eq!(rx.packet(&next), Err(SequenceError::PacketAfterSync));
        rx.release();
        assert_eq!(rx.generation(), 1);
        assert_eq!(rx.packet(&next), Ok(()));
        let stale = PacketHeader { packet: 3, ..pages };
        assert_eq!(
            rx.packet(&stale),
            Err(SequenceError::WrongGeneration {
                expected: 1,
                found: 0
            })
        );
        let other = PacketHeader {
            channel: 0,
            ..stale
        };
        assert_eq!(
            rx.packet(&other),
            Err(SequenceError::WrongChannel {
                expected: 1,
                found: 0
            })
        );
    }
}
