//! The validated records of the main stream (the "representation" level).
//!
//! A [`Record`] is either decoded from bytes (and then borrows them, zero
//! copy) or built by a sender from its own values and slices. Decoding
//! validates everything once, so the engines never re-check a field; encoding
//! checks the same rules, so a sender cannot emit what its peer would reject.

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::cursor::{Reader, Writer};
use super::header::{RecordHeader, check_body_len, check_record_header, kind, put_record_header};
use super::{
    BlockId, DecodeError, DeviceId, EncodeError, MAX_RECORD_BODY, PageBatch, RECORD_HEADER_LEN,
};

/// Smallest RAM block page size (512 bytes).
pub const MIN_BLOCK_PAGE_SIZE: u32 = 512;
/// Largest RAM block page size (1 GiB).
pub const MAX_BLOCK_PAGE_SIZE: u32 = 1 << 30;

/// Command codes, as they appear first in a Command body.
pub mod command_code {
    /// Open the return path.
    pub const OPEN_RETURN_PATH: u16 = 1;
    /// Ping, answered by a return-path PONG.
    pub const PING: u16 = 2;
    /// Postcopy may follow; page sizes of both ends.
    pub const POSTCOPY_ADVISE: u16 = 3;
    /// Enter postcopy listen.
    pub const POSTCOPY_LISTEN: u16 = 4;
    /// Run the guest on the destination.
    pub const POSTCOPY_RUN: u16 = 5;
    /// Drop pages dirtied after being sent.
    pub const POSTCOPY_RAM_DISCARD: u16 = 6;
    /// Request the received-page bitmap of a block.
    pub const RECV_BITMAP: u16 = 7;
    /// Postcopy recovery is done.
    pub const POSTCOPY_RESUME: u16 = 8;
    /// The source is about to stop the guest.
    pub const SWITCHOVER_START: u16 = 9;
    /// The source has committed to the destination: start the guest there.
    pub const COMMIT: u16 = 10;
    /// Pages also travel on multifd channels: how many, and the migration
    /// id their hellos carry.
    pub const MULTIFD_SETUP: u16 = 11;
    /// Every multifd channel has ended a sync generation: wait for them.
    pub const MULTIFD_FLUSH: u16 = 12;
    /// The key of the migration's page digest (the source verifies).
    pub const DIGEST_KEY: u16 = 13;
    /// Requested pages also travel on the postcopy preempt channel, whose
    /// hello carries this migration id.
    pub const POSTCOPY_PREEMPT: u16 = 14;
}

/// One record of the main stream.
///
/// Equality compares contents, so a decoded record equals the record it was
/// encoded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// A control command.
    Command(Command<'a>),
    /// The list of RAM blocks, which Pages records index.
    RamBlocks(BlockList<'a>),
    /// A batch of pages of one block.
    Pages(PageBatch<'a>),
    /// One device's state.
    Device(DeviceState<'a>),
    /// Records delivered as one unit (the postcopy device state).
    Package(Package<'a>),
    /// The source's memory digest, one sum per RAM block, after the last
    /// page (see [`crate::digest`]).
    Digest(BlockSums<'a>),
    /// The source's sums of the parts of a range of one block, answering
    /// the destination's [`DigestQuery`](crate::return_path::RpMessage::DigestQuery)
    /// while it locates a mismatching page. The one record besides Commit
    /// allowed after EndOfStream.
    DigestRanges(RangeSums<'a>),
    /// A run of pages of one block that are all zero on the source: what a
    /// run of ZERO entries in [`Record::Pages`] says, in one fixed-size
    /// record whatever the run's length.
    ZeroRun(ZeroRun),
    /// The end of the stream; nothing may follow.
    EndOfStream,
}

/// A command record's meaning and arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// Ask the destination to open the return path.
    OpenReturnPath,
    /// Liveness / ordering probe; the destination echoes the value in a PONG.
    Ping(u32),
    /// Postcopy may be used; the source's page sizes, which the destination
    /// must be able to place.
    PostcopyAdvise {
        /// Host page size of the source, a power of two.
        host_page_size: u64,
        /// Target (guest) page size, a power of two.
        target_page_size: u64,
    },
    /// Enter postcopy listen: start serving page faults from the stream.
    PostcopyListen,
    /// Start the guest on the destination.
    PostcopyRun,
    /// Pages of `block` that were dirtied after being sent; the destination drops them.
    PostcopyRamDiscard {
        /// The RAM block.
        block: BlockId<'a>,
        /// The page ranges to drop (at least one).
        ranges: DiscardRanges<'a>,
    },
    /// Postcopy recovery: ask for the received-page bitmap of `block`.
    RecvBitmap {
        /// The RAM block.
        block: BlockId<'a>,
    },
    /// Postcopy recovery is complete; continue postcopy.
    PostcopyResume,
    /// The source is about to stop the guest for the switchover.
    SwitchoverStart,
    /// The end-of-migration commit (precopy with the return path): the
    /// source has given the guest up for good and will never resume it, so
    /// the destination, which reported the stream loaded, may start it. The
    /// only record allowed after EndOfStream, and the last one.
    Commit,
    /// Pages also travel on `channels` multifd channels, each its own
    /// connection opening with a hello that carries `migration_id` (so a
    /// stray connection is refused). Sent in the preamble.
    MultifdSetup {
        /// Number of channels, 1..=255.
        channels: u16,
        /// The id every channel's hello carries.
        migration_id: u64,
    },
    /// Every channel has sent the SYNC packet of `generation`: the
    /// destination applies nothing after this record until every channel
    /// has reached that SYNC (QEMU's RAM_SAVE_FLAG_MULTIFD_FLUSH).
    MultifdFlush {
        /// The sync generation that ends, from 0, one per pass.
        generation: u32,
    },
    /// The seed of the migration's [`DigestKey`](crate::digest::DigestKey):
    /// the source books every page it sends and sends its digest before
    /// the end of the stream, which the destination compares before the
    /// guest may start. Sent in the preamble, after the block list.
    DigestKey(u64),
    /// Postcopy's requested pages also travel on the preempt channel, its
    /// own connection opening with a hello that carries `migration_id`
    /// (so a stray connection is refused). Sent in the preamble, after
    /// PostcopyAdvise.
    PostcopyPreempt {
        /// The id the preempt channel's hello carries.
        migration_id: u64,
    },
}

/// A run of guest pages within a RAM block: `count` pages from page index
/// `first`. The unit of a discard range on the wire and of the engines'
/// page bookkeeping (requests, arrivals). A dirty-log clear is a
/// [`Chunk`](crate::clear_map::Chunk) instead: aligned, of fixed size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRange {
    /// First page index.
    pub first: u64,
    /// Number of pages (> 0 on the wire).
    pub count: u64,
}

impl PageRange {
    /// One past the last page (`first + count`), saturating so that a range
    /// built from untrusted values cannot overflow.
    pub fn end(&self) -> u64 {
        self.first.saturating_add(self.count)
    }
}

/// One discard range on the wire (packet level).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RangeRaw {
    first: U64,
    count: U64,
}

const RANGE_LEN: usize = size_of::<RangeRaw>();

/// The ranges of a discard command: validated wire bytes or the sender's slice.
#[derive(Clone, Copy, Debug)]
pub struct DiscardRanges<'a>(Ranges<'a>);

#[derive(Clone, Copy, Debug)]
enum Ranges<'a> {
    Wire(&'a [RangeRaw]),
    Slice(&'a [PageRange]),
}

impl PartialEq for DiscardRanges<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for DiscardRanges<'_> {}

impl<'a> DiscardRanges<'a> {
    /// Ranges to encode. They are checked (non-empty list, each count > 0, no
    /// overflow) when the command is encoded.
    pub fn from_slice(ranges: &'a [PageRange]) -> Self {
        Self(Ranges::Slice(ranges))
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        match self.0 {
            Ranges::Wire(r) => r.len(),
            Ranges::Slice(r) => r.len(),
        }
    }

    /// True if there are no ranges (never the case for a decoded command).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ranges in order.
    pub fn iter(&self) -> impl Iterator<Item = PageRange> + 'a {
        let ranges = self.0;
        (0..self.len()).map_while(move |i| match ranges {
            Ranges::Wire(r) => r.get(i).map(|r| PageRange {
                first: r.first.get(),
                count: r.count.get(),
            }),
            Ranges::Slice(r) => r.get(i).copied(),
        })
    }

    /// Parses a validated range list from the rest of a discard body.
    fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(RANGE_LEN) {
            return Err(DecodeError::DiscardListLength { len: bytes.len() });
        }
        let raw = <[RangeRaw]>::ref_from_bytes(bytes)
            .map_err(|_| DecodeError::DiscardListLength { len: bytes.len() })?;
        for r in raw {
            let (first, count) = (r.first.get(), r.count.get());
            if !range_ok(first, count) {
                return Err(DecodeError::BadDiscardRange { first, count });
            }
        }
        Ok(Self(Ranges::Wire(raw)))
    }

    fn check(&self) -> Result<(), EncodeError> {
        if self.is_empty() {
            return Err(EncodeError::NoDiscardRanges);
        }
        match self.iter().find(|r| !range_ok(r.first, r.count)) {
            Some(r) => Err(EncodeError::BadDiscardRange {
                first: r.first,
                count: r.count,
            }),
            None => Ok(()),
        }
    }
}

/// A discard range must cover at least one page and not wrap around.
fn range_ok(first: u64, count: u64) -> bool {
    count > 0 && first.checked_add(count).is_some()
}

/// A ZeroRun body (packet level).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct ZeroRunRaw {
    block: U16,
    page_shift: u8,
    reserved: u8,
    first: U64,
    count: U64,
}

/// Bytes of a ZeroRun body.
pub const ZERO_RUN_BODY_LEN: usize = size_of::<ZeroRunRaw>();

/// `range` of block `block`, pages of `1 << page_shift` bytes, all zero on
/// the source.
///
/// A source sends one for the pages of its first pass that its memory says
/// were never populated (they are neither read nor hashed), where a Pages
/// batch would spend an 8-byte entry on each: an idle 4 GiB guest is then
/// a few hundred of these instead of 8 MiB of entries. The destination
/// treats it exactly as the same pages sent as ZERO entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroRun {
    /// The RAM block (its position in the RamBlocks list).
    pub block: u16,
    /// log2 of the block's page size, 9 ..= 30.
    pub page_shift: u8,
    /// The pages (non-empty, not overflowing the page index space).
    pub range: PageRange,
}

impl ZeroRun {
    fn check(&self) -> Result<(), EncodeError> {
        if !(super::MIN_PAGE_SHIFT..=super::MAX_PAGE_SHIFT).contains(&self.page_shift) {
            return Err(EncodeError::BadPageShift {
                shift: self.page_shift,
            });
        }
        if !range_ok(self.range.first, self.range.count) {
            return Err(EncodeError::BadZeroRun {
                first: self.range.first,
                count: self.range.count,
            });
        }
        Ok(())
    }

    fn decode(body: &[u8]) -> Result<Self, DecodeError> {
        let raw = ZeroRunRaw::read_from_bytes(body).map_err(|_| DecodeError::BadLength {
            what: "zero run body",
            expected: ZERO_RUN_BODY_LEN,
            found: body.len(),
        })?;
        if raw.reserved != 0 {
            return Err(DecodeError::ReservedFlags {
                what: "zero run reserved byte",
                value: u64::from(raw.reserved),
            });
        }
        if !(super::MIN_PAGE_SHIFT..=super::MAX_PAGE_SHIFT).contains(&raw.page_shift) {
            return Err(DecodeError::BadPageShift {
                shift: raw.page_shift,
            });
        }
        let (first, count) = (raw.first.get(), raw.count.get());
        if !range_ok(first, count) {
            return Err(DecodeError::BadZeroRun { first, count });
        }
        Ok(Self {
            block: raw.block.get(),
            page_shift: raw.page_shift,
            range: PageRange { first, count },
        })
    }

    fn encode_body(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.check()?;
        w.put(&ZeroRunRaw {
            block: U16::new(self.block),
            page_shift: self.page_shift,
            reserved: 0,
            first: U64::new(self.range.first),
            count: U64::new(self.range.count),
        })
    }
}

/// A RAM block as announced in the RamBlocks record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockInfo<'a> {
    /// The block's name, which both ends agree on.
    pub id: BlockId<'a>,
    /// Length in bytes, a multiple of `page_size`.
    pub length: u64,
    /// Page size, a power of two in 512..=1 GiB.
    pub page_size: u32,
}

/// What is wrong with a block's length / page size pair.
enum BlockProblem {
    PageSize,
    NotMultiple,
}

fn block_problem(length: u64, page_size: u32) -> Option<BlockProblem> {
    if !page_size.is_power_of_two()
        || !(MIN_BLOCK_PAGE_SIZE..=MAX_BLOCK_PAGE_SIZE).contains(&page_size)
    {
        Some(BlockProblem::PageSize)
    } else if !length.is_multiple_of(u64::from(page_size)) {
        Some(BlockProblem::NotMultiple)
    } else {
        None
    }
}

impl<'a> BlockInfo<'a> {
    /// A validated block: `page_size` a power of two in 512..=1 GiB and
    /// `length` a multiple of it, so that every page index is whole.
    pub fn new(id: BlockId<'a>, length: u64, page_size: u32) -> Result<Self, EncodeError> {
        let info = Self {
            id,
            length,
            page_size,
        };
        info.check()?;
        Ok(info)
    }

    fn check(&self) -> Result<(), EncodeError> {
        match block_problem(self.length, self.page_size) {
            Some(BlockProblem::PageSize) => Err(EncodeError::BadPageSize {
                what: "RAM block page size",
                value: u64::from(self.page_size),
            }),
            Some(BlockProblem::NotMultiple) => Err(EncodeError::BlockLengthNotMultiple {
                length: self.length,
                page_size: self.page_size,
            }),
            None => Ok(()),
        }
    }

    /// Reads and validates one block entry.
    fn read(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let id = r.id("RAM block")?;
        let fixed: BlockFixed = r.read("RAM block length and page size")?;
        let (length, page_size) = (fixed.length.get(), fixed.page_size.get());
        match block_problem(length, page_size) {
            Some(BlockProblem::PageSize) => Err(DecodeError::BadPageSize {
                what: "RAM block page size",
                value: u64::from(page_size),
            }),
            Some(BlockProblem::NotMultiple) => {
                Err(DecodeError::BlockLengthNotMultiple { length, page_size })
            }
            None => Ok(Self {
                id,
                length,
                page_size,
            }),
        }
    }

    fn wire_len(&self) -> usize {
        self.id.wire_len() + size_of::<BlockFixed>()
    }
}

/// The fixed part of a block entry after its id (packet level).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct BlockFixed {
    length: U64,
    page_size: U32,
}

/// The RAM block list: validated wire bytes or the sender's slice.
#[derive(Clone, Copy, Debug)]
pub struct BlockList<'a>(Blocks<'a>);

#[derive(Clone, Copy, Debug)]
enum Blocks<'a> {
    /// `count` validated block entries.
    Wire {
        count: u16,
        entries: &'a [u8],
    },
    Slice(&'a [BlockInfo<'a>]),
}

impl PartialEq for BlockList<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for BlockList<'_> {}

impl<'a> BlockList<'a> {
    /// Blocks to encode; each is checked again when the record is encoded
    /// (the fields of [`BlockInfo`] are public).
    pub fn from_slice(blocks: &'a [BlockInfo<'a>]) -> Self {
        Self(Blocks::Slice(blocks))
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self.0 {
            Blocks::Wire { count, .. } => usize::from(count),
            Blocks::Slice(b) => b.len(),
        }
    }

    /// True if the list has no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The blocks in order.
    pub fn iter(&self) -> impl Iterator<Item = BlockInfo<'a>> + 'a {
        let blocks = self.0;
        let mut reader = match blocks {
            Blocks::Wire { entries, .. } => Reader::new(entries),
            Blocks::Slice(_) => Reader::new(&[]),
        };
        (0..self.len()).map_while(move |i| match blocks {
            // The entries were validated when the record was decoded.
            Blocks::Wire { .. } => BlockInfo::read(&mut reader).ok(),
            Blocks::Slice(b) => b.get(i).copied(),
        })
    }

    fn decode(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let count = r.read::<U16>("RAM block count")?.get();
        let entries = r.rest();
        for _ in 0..count {
            BlockInfo::read(&mut r)?;
        }
        r.finish("after the last RAM block")?;
        Ok(Self(Blocks::Wire { count, entries }))
    }

    fn body_len(&self) -> usize {
        match self.0 {
            Blocks::Wire { entries, .. } => 2 + entries.len(),
            Blocks::Slice(b) => 2 + b.iter().map(BlockInfo::wire_len).sum::<usize>(),
        }
    }

    fn encode_body(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        let count = u16::try_from(self.len())
            .map_err(|_| EncodeError::TooManyBlocks { count: self.len() })?;
        w.put(&U16::new(count))?;
        for b in self.iter() {
            b.check()?;
            w.id(b.id)?;
            w.put(&BlockFixed {
                length: U64::new(b.length),
                page_size: U32::new(b.page_size),
            })?;
        }
        Ok(())
    }
}

/// One device's saved state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceState<'a> {
    /// The device's name, which both ends agree on.
    pub id: DeviceId<'a>,
    /// Instance number, for several devices of one model.
    pub instance: u32,
    /// Version of the device's state format, for the device to check.
    pub version: u32,
    /// The state bytes, opaque to the stream.
    pub data: &'a [u8],
}

/// The fixed part of a Device body after its id (packet level).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct DeviceFixed {
    instance: U32,
    version: U32,
}

impl<'a> DeviceState<'a> {
    fn decode(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let id = r.id("device")?;
        let fixed: DeviceFixed = r.read("device instance and version")?;
        Ok(Self {
            id,
            instance: fixed.instance.get(),
            version: fixed.version.get(),
            data: r.rest(),
        })
    }

    fn body_len(&self) -> usize {
        device_prefix_len(self.id) + self.data.len()
    }
}

fn device_prefix_len(id: DeviceId<'_>) -> usize {
    id.wire_len() + size_of::<DeviceFixed>()
}

fn put_device_prefix(
    w: &mut Writer<'_>,
    id: DeviceId<'_>,
    instance: u32,
    version: u32,
) -> Result<(), EncodeError> {
    w.id(id)?;
    w.put(&DeviceFixed {
        instance: U32::new(instance),
        version: U32::new(version),
    })
}

/// Writes the record header and fixed part of a Device record whose state is
/// `data_len` bytes, and returns the bytes written. The caller then sends the
/// state itself, so a blob of several MiB is never copied into a staging
/// buffer.
pub fn encode_device_header(
    out: &mut [u8],
    id: DeviceId<'_>,
    instance: u32,
    version: u32,
    data_len: usize,
) -> Result<usize, EncodeError> {
    let prefix = device_prefix_len(id);
    let body = prefix.saturating_add(data_len);
    check_body_len(body)?;
    let mut w = Writer::new(out, RECORD_HEADER_LEN + prefix)?;
    put_record_header(&mut w, kind::DEVICE, body)?;
    put_device_prefix(&mut w, id, instance, version)?;
    Ok(w.written())
}

/// Writes the header of a Package record whose body, `body_len` bytes of
/// complete records, the caller writes next (so a source can wrap device
/// state it serialised elsewhere without copying it again).
pub fn encode_package_header(out: &mut [u8], body_len: usize) -> Result<usize, EncodeError> {
    check_body_len(body_len)?;
    let mut w = Writer::new(out, RECORD_HEADER_LEN)?;
    put_record_header(&mut w, kind::PACKAGE, body_len)?;
    Ok(w.written())
}

/// A sequence of complete records delivered as one unit.
///
/// The destination receives the whole package before loading any of it, so
/// that while the devices load (and fault on not-yet-received pages) it can
/// keep reading the stream. A package has been validated when it exists:
/// every inner record decodes, none is a Package or EndOfStream.
#[derive(Clone, Copy, Debug)]
pub struct Package<'a> {
    body: &'a [u8],
}

impl PartialEq for Package<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.body == other.body
    }
}

impl Eq for Package<'_> {}

impl<'a> Package<'a> {
    /// Validates `body` as a package (records encoded back to back, e.g. with
    /// [`Record::encode`]) so it can be sent with `Record::Package`.
    pub fn from_encoded(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut rest = body;
        while !rest.is_empty() {
            rest = decode_packaged(rest)?.1;
        }
        Ok(Self { body })
    }

    /// The encoded records.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.body
    }

    /// The records in order. The package was validated when it was built, so
    /// every item is `Ok`; the `Result` keeps the iterator safe to use on its
    /// own terms.
    pub fn records(&self) -> impl Iterator<Item = Result<Record<'a>, DecodeError>> + 'a {
        let mut rest = self.body;
        let mut failed = false;
        core::iter::from_fn(move || {
            if rest.is_empty() || failed {
                return None;
            }
            match decode_packaged(rest) {
                Ok((record, tail)) => {
                    rest = tail;
                    Some(Ok(record))
                }
                Err(e) => {
                    failed = true;
                    Some(Err(e))
                }
            }
        })
    }
}

/// Decodes the record at the start of a package body; returns it and the rest.
fn decode_packaged(bytes: &[u8]) -> Result<(Record<'_>, &[u8]), DecodeError> {
    let mut r = Reader::new(bytes);
    let header: RecordHeader = r.read("packaged record header")?;
    let (kind, len) = check_record_header(&header, MAX_RECORD_BODY)?;
    match kind {
        kind::PACKAGE => return Err(DecodeError::NestedPackage),
        kind::END_OF_STREAM => return Err(DecodeError::EndOfStreamInPackage),
        _ => {}
    }
    let body = r.take(len, "packaged record body")?;
    Ok((Record::decode_body(kind, body)?, r.rest()))
}

/// The per-block sums of a Digest record: validated wire bytes or the
/// sender's slice. On the wire: a be16 count, then count be64 sums, block
/// `i`'s at position `i`.
#[derive(Clone, Copy, Debug)]
pub struct BlockSums<'a>(Sums<'a>);

#[derive(Clone, Copy, Debug)]
enum Sums<'a> {
    Wire(&'a [U64]),
    Slice(&'a [u64]),
}

impl PartialEq for BlockSums<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for BlockSums<'_> {}

impl<'a> BlockSums<'a> {
    /// Sums to encode, block `i`'s at index `i` (at most 65535).
    pub fn from_slice(sums: &'a [u64]) -> Self {
        Self(Sums::Slice(sums))
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self.0 {
            Sums::Wire(s) => s.len(),
            Sums::Slice(s) => s.len(),
        }
    }

    /// True if there are no sums.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sum of block `block`.
    pub fn get(&self, block: usize) -> Option<u64> {
        match self.0 {
            Sums::Wire(s) => s.get(block).map(|v| v.get()),
            Sums::Slice(s) => s.get(block).copied(),
        }
    }

    /// The sums in block order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + 'a {
        let sums = *self;
        (0..self.len()).map_while(move |i| sums.get(i))
    }

    fn decode(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let count = usize::from(r.read::<U16>("digest block count")?.get());
        let expected = 2 + 8 * count;
        if body.len() != expected {
            return Err(DecodeError::BadLength {
                what: "digest body",
                expected,
                found: body.len(),
            });
        }
        let sums = <[U64]>::ref_from_bytes(r.rest()).map_err(|_| DecodeError::BadLength {
            what: "digest body",
            expected,
            found: body.len(),
        })?;
        Ok(Self(Sums::Wire(sums)))
    }

    fn body_len(&self) -> usize {
        2usize.saturating_add(self.len().saturating_mul(8))
    }

    fn encode_body(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        put_digest_body(w, self.len(), self.iter())
    }
}

/// Writes a whole Digest record of `count` sums taken from `sums` into
/// `out`, for a sender whose sums are not in one slice (the source engine
/// reads them from its per-block books); returns the bytes written.
pub fn encode_digest(
    out: &mut [u8],
    count: usize,
    sums: impl Iterator<Item = u64>,
) -> Result<usize, EncodeError> {
    if count > usize::from(u16::MAX) {
        return Err(EncodeError::TooManyBlocks { count });
    }
    let body_len = 2 + 8 * count;
    check_body_len(body_len)?;
    let mut w = Writer::new(out, RECORD_HEADER_LEN + body_len)?;
    put_record_header(&mut w, kind::DIGEST, body_len)?;
    put_digest_body(&mut w, count, sums)?;
    Ok(w.written())
}

fn put_digest_body(
    w: &mut Writer<'_>,
    count: usize,
    sums: impl Iterator<Item = u64>,
) -> Result<(), EncodeError> {
    let n = u16::try_from(count).map_err(|_| EncodeError::TooManyBlocks { count })?;
    w.put(&U16::new(n))?;
    let mut written = 0;
    for sum in sums.take(count) {
        w.put(&U64::new(sum))?;
        written += 1;
    }
    // A short iterator still leaves a well-formed record: zero sums, which
    // the destination finds unequal.
    for _ in written..count {
        w.put(&U64::new(0))?;
    }
    Ok(())
}

/// The fixed part of a DigestRanges body (packet level).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RangeSumsFixed {
    block: U16,
    first: U64,
    count: U64,
}

/// The body of a DigestRanges record: block, range, then one be64 sum per
/// part of the range as [`locate_parts`](crate::digest::locate_parts)
/// splits it, in order. The part count follows from the range, so a body
/// of any other length is refused.
#[derive(Clone, Copy, Debug)]
pub struct RangeSums<'a> {
    block: u16,
    range: PageRange,
    sums: Sums<'a>,
}

impl PartialEq for RangeSums<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.block == other.block && self.range == other.range && self.sums().eq(other.sums())
    }
}

impl Eq for RangeSums<'_> {}

/// Parts in a DigestRanges body for a range of `count` pages.
fn range_parts(count: u64) -> usize {
    let step = count.div_ceil(crate::digest::LOCATE_PARTS).max(1);
    usize::try_from(count.div_ceil(step)).unwrap_or(usize::MAX)
}

impl<'a> RangeSums<'a> {
    /// Sums to encode for `range` of `block`, one per part; checked (range
    /// non-empty and representable, one sum per part) when encoded.
    pub fn from_slice(block: u16, range: PageRange, sums: &'a [u64]) -> Self {
        Self {
            block,
            range,
            sums: Sums::Slice(sums),
        }
    }

    /// The block.
    pub fn block(&self) -> u16 {
        self.block
    }

    /// The range the sums split.
    pub fn range(&self) -> PageRange {
        self.range
    }

    /// The parts' sums in order.
    pub fn sums(&self) -> impl Iterator<Item = u64> + 'a {
        let sums = self.sums;
        let len = match sums {
            Sums::Wire(s) => s.len(),
            Sums::Slice(s) => s.len(),
        };
        (0..len).map_while(move |i| match sums {
            Sums::Wire(s) => s.get(i).map(|v| v.get()),
            Sums::Slice(s) => s.get(i).copied(),
        })
    }

    fn decode(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let fixed: RangeSumsFixed = r.read("digest ranges block and range")?;
        let (first, count) = (fixed.first.get(), fixed.count.get());
        if !range_ok(first, count) {
            return Err(DecodeError::BadDigestRange { first, count });
        }
        let expected = size_of::<RangeSumsFixed>().saturating_add(8 * range_parts(count));
        let bad_len = DecodeError::BadLength {
            what: "digest ranges body",
            expected,
            found: body.len(),
        };
        if body.len() != expected {
            return Err(bad_len);
        }
        let sums = <[U64]>::ref_from_bytes(r.rest()).map_err(|_| bad_len)?;
        Ok(Self {
            block: fixed.block.get(),
            range: PageRange { first, count },
            sums: Sums::Wire(sums),
        })
    }

    fn body_len(&self) -> usize {
        size_of::<RangeSumsFixed>().saturating_add(8usize.saturating_mul(self.sums().count()))
    }

    fn encode_body(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        put_range_sums(w, self.block, self.range, self.sums())
    }
}

/// Writes a whole DigestRanges record for `range` of `block` into `out`,
/// its sums taken from `sums` (the source engine sums its books part by
/// part); returns the bytes written.
pub fn encode_digest_ranges(
    out: &mut [u8],
    block: u16,
    range: PageRange,
    sums: impl Iterator<Item = u64>,
) -> Result<usize, EncodeError> {
    let body_len = size_of::<RangeSumsFixed>().saturating_add(8 * range_parts(range.count));
    check_body_len(body_len)?;
    let mut w = Writer::new(out, RECORD_HEADER_LEN + body_len)?;
    put_record_header(&mut w, kind::DIGEST_RANGES, body_len)?;
    put_range_sums(&mut w, block, range, sums)?;
    Ok(w.written())
}

fn put_range_sums(
    w: &mut Writer<'_>,
    block: u16,
    range: PageRange,
    sums: impl Iterator<Item = u64>,
) -> Result<(), EncodeError> {
    if !range_ok(range.first, range.count) {
        return Err(EncodeError::BadDigestRange {
            first: range.first,
            count: range.count,
        });
    }
    w.put(&RangeSumsFixed {
        block: U16::new(block),
        first: U64::new(range.first),
        count: U64::new(range.count),
    })?;
    let parts = range_parts(range.count);
    let mut written = 0;
    for sum in sums.take(parts) {
        w.put(&U64::new(sum))?;
        written += 1;
    }
    // As for the digest: a short iterator leaves a well-formed record.
    for _ in written..parts {
        w.put(&U64::new(0))?;
    }
    Ok(())
}

impl<'a> Command<'a> {
    fn code(&self) -> u16 {
        use command_code::*;
        match self {
            Self::OpenReturnPath => OPEN_RETURN_PATH,
            Self::Ping(_) => PING,
            Self::PostcopyAdvise { .. } => POSTCOPY_ADVISE,
            Self::PostcopyListen => POSTCOPY_LISTEN,
            Self::PostcopyRun => POSTCOPY_RUN,
            Self::PostcopyRamDiscard { .. } => POSTCOPY_RAM_DISCARD,
            Self::RecvBitmap { .. } => RECV_BITMAP,
            Self::PostcopyResume => POSTCOPY_RESUME,
            Self::SwitchoverStart => SWITCHOVER_START,
            Self::Commit => COMMIT,
            Self::MultifdSetup { .. } => MULTIFD_SETUP,
            Self::MultifdFlush { .. } => MULTIFD_FLUSH,
            Self::DigestKey(_) => DIGEST_KEY,
            Self::PostcopyPreempt { .. } => POSTCOPY_PREEMPT,
        }
    }

    fn body_len(&self) -> usize {
        2 + match self {
            Self::Ping(_) => 4,
            Self::DigestKey(_) | Self::PostcopyPreempt { .. } => 8,
            Self::PostcopyAdvise { .. } => size_of::<AdviseArgs>(),
            Self::PostcopyRamDiscard { block, ranges } => {
                block.wire_len() + RANGE_LEN * ranges.len()
            }
            Self::RecvBitmap { block } => block.wire_len(),
            Self::MultifdSetup { .. } => 10,
            Self::MultifdFlush { .. } => 4,
            Self::OpenReturnPath
            | Self::PostcopyListen
            | Self::PostcopyRun
            | Self::PostcopyResume
            | Self::SwitchoverStart
            | Self::Commit => 0,
        }
    }

    fn decode(body: &'a [u8]) -> Result<Self, DecodeError> {
        use command_code::*;
        let mut r = Reader::new(body);
        let code = r.read::<U16>("command code")?.get();
        let fixed_len = match code {
            OPEN_RETURN_PATH | POSTCOPY_LISTEN | POSTCOPY_RUN | POSTCOPY_RESUME
            | SWITCHOVER_START | COMMIT => Some(2),
            PING | MULTIFD_FLUSH => Some(6),
            DIGEST_KEY | POSTCOPY_PREEMPT => Some(10),
            MULTIFD_SETUP => Some(12),
            POSTCOPY_ADVISE => Some(2 + size_of::<AdviseArgs>()),
            POSTCOPY_RAM_DISCARD | RECV_BITMAP => None,
            code => return Err(DecodeError::UnknownCommand { code }),
        };
        // Fixed-size commands are checked whole first, so a wrong size is
        // reported as such rather than as whichever field ran short.
        if let Some(expected) = fixed_len
            && body.len() != expected
        {
            return Err(DecodeError::BadLength {
                what: "command body",
                expected,
                found: body.len(),
            });
        }
        let command = match code {
            OPEN_RETURN_PATH => Self::OpenReturnPath,
            PING => Self::Ping(r.read::<U32>("Ping value")?.get()),
            POSTCOPY_ADVISE => {
                let a: AdviseArgs = r.read("PostcopyAdvise page sizes")?;
                let (host_page_size, target_page_size) =
                    (a.host_page_size.get(), a.target_page_size.get());
                for (what, value) in [
                    ("host page size", host_page_size),
                    ("target page size", target_page_size),
                ] {
                    if !value.is_power_of_two() {
                        return Err(DecodeError::BadPageSize { what, value });
                    }
                }
                Self::PostcopyAdvise {
                    host_page_size,
                    target_page_size,
                }
            }
            POSTCOPY_LISTEN => Self::PostcopyListen,
            POSTCOPY_RUN => Self::PostcopyRun,
            POSTCOPY_RAM_DISCARD => {
                let block = r.id("discard block")?;
                let ranges = DiscardRanges::decode(r.rest())?;
                return Ok(Self::PostcopyRamDiscard { block, ranges });
            }
            RECV_BITMAP => Self::RecvBitmap {
                block: r.id("bitmap block")?,
            },
            POSTCOPY_RESUME => Self::PostcopyResume,
            SWITCHOVER_START => Self::SwitchoverStart,
            COMMIT => Self::Commit,
            MULTIFD_SETUP => {
                let channels = r.read::<U16>("MultifdSetup channels")?.get();
                let migration_id = r.read::<U64>("MultifdSetup migration id")?.get();
                if channels == 0 || channels > super::MAX_CHANNELS {
                    return Err(DecodeError::BadChannel {
                        index: 0,
                        count: channels,
                    });
                }
                Self::MultifdSetup {
                    channels,
                    migration_id,
                }
            }
            MULTIFD_FLUSH => Self::MultifdFlush {
                generation: r.read::<U32>("MultifdFlush generation")?.get(),
            },
            DIGEST_KEY => Self::DigestKey(r.read::<U64>("digest key")?.get()),
            POSTCOPY_PREEMPT => Self::PostcopyPreempt {
                migration_id: r.read::<U64>("PostcopyPreempt migration id")?.get(),
            },
            code => return Err(DecodeError::UnknownCommand { code }),
        };
        // RecvBitmap's length depends on its id; check that nothing follows it.
        let expected = command.body_len();
        if body.len() != expected {
            return Err(DecodeError::BadLength {
                what: "command body",
                expected,
                found: body.len(),
            });
        }
        Ok(command)
    }

    fn encode_body(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.put(&U16::new(self.code()))?;
        match *self {
            Self::Ping(value) => w.put(&U32::new(value)),
            Self::DigestKey(seed) => w.put(&U64::new(seed)),
            Self::PostcopyPreempt { migration_id } => w.put(&U64::new(migration_id)),
            Self::PostcopyAdvise {
                host_page_size,
                target_page_size,
            } => {
                for (what, value) in [
                    ("host page size", host_page_size),
                    ("target page size", target_page_size),
                ] {
                    if !value.is_power_of_two() {
                        return Err(EncodeError::BadPageSize { what, value });
                    }
                }
                w.put(&AdviseArgs {
                    host_page_size: U64::new(host_page_size),
                    target_page_size: U64::new(target_page_size),
                })
            }
            Self::PostcopyRamDiscard { block, ranges } => {
                ranges.check()?;
                w.id(block)?;
                for range in ranges.iter() {
                    w.put(&RangeRaw {
                        first: U64::new(range.first),
                        count: U64::new(range.count),
                    })?;
                }
                Ok(())
            }
            Self::RecvBitmap { block } => w.id(block),
            Self::MultifdSetup {
                channels,
                migration_id,
            } => {
                if channels == 0 || channels > super::MAX_CHANNELS {
                    return Err(EncodeError::BadChannel {
                        index: 0,
                        count: channels,
                    });
                }
                w.put(&U16::new(channels))?;
                w.put(&U64::new(migration_id))
            }
            Self::MultifdFlush { generation } => w.put(&U32::new(generation)),
            Self::OpenReturnPath
            | Self::PostcopyListen
            | Self::PostcopyRun
            | Self::PostcopyResume
            | Self::SwitchoverStart
            | Self::Commit => Ok(()),
        }
    }
}

/// PostcopyAdvise arguments (packet level).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct AdviseArgs {
    host_page_size: U64,
    target_page_size: U64,
}

impl<'a> Record<'a> {
    /// The record's kind code on the wire.
    pub fn kind(&self) -> u16 {
        match self {
            Self::Command(_) => kind::COMMAND,
            Self::RamBlocks(_) => kind::RAM_BLOCKS,
            Self::Pages(_) => kind::PAGES,
            Self::Device(_) => kind::DEVICE,
            Self::Package(_) => kind::PACKAGE,
            Self::Digest(_) => kind::DIGEST,
            Self::DigestRanges(_) => kind::DIGEST_RANGES,
            Self::ZeroRun(_) => kind::ZERO_RUN,
            Self::EndOfStream => kind::END_OF_STREAM,
        }
    }

    /// Length of the body alone.
    fn body_len(&self) -> usize {
        match self {
            Self::Command(c) => c.body_len(),
            Self::RamBlocks(b) => b.body_len(),
            Self::Pages(p) => p.body_len(),
            Self::Device(d) => d.body_len(),
            Self::Package(p) => p.body.len(),
            Self::Digest(d) => d.body_len(),
            Self::DigestRanges(r) => r.body_len(),
            Self::ZeroRun(_) => ZERO_RUN_BODY_LEN,
            Self::EndOfStream => 0,
        }
    }

    /// Bytes [`Record::encode`] writes: the record header plus the body.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_LEN.saturating_add(self.body_len())
    }

    /// Writes the record (header and body) into `out`; returns the bytes written.
    ///
    /// For large page batches and device blobs prefer
    /// [`super::encode_page_batch_header`] and [`encode_device_header`],
    /// which let the caller send the payload from where it already is.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let body_len = self.body_len();
        check_body_len(body_len)?;
        let mut w = Writer::new(out, RECORD_HEADER_LEN + body_len)?;
        put_record_header(&mut w, self.kind(), body_len)?;
        match self {
            Self::Command(c) => c.encode_body(&mut w)?,
            Self::RamBlocks(b) => b.encode_body(&mut w)?,
            Self::Pages(p) => p.encode_body(&mut w)?,
            Self::Device(d) => {
                put_device_prefix(&mut w, d.id, d.instance, d.version)?;
                w.bytes(d.data)?;
            }
            Self::Package(p) => w.bytes(p.body)?,
            Self::Digest(d) => d.encode_body(&mut w)?,
            Self::DigestRanges(r) => r.encode_body(&mut w)?,
            Self::ZeroRun(z) => z.encode_body(&mut w)?,
            Self::EndOfStream => {}
        }
        Ok(w.written())
    }

    /// Parses and validates the body of a record of `kind` (whose header has
    /// already passed `check_record_header`).
    pub(crate) fn decode_body(kind: u16, body: &'a [u8]) -> Result<Self, DecodeError> {
        Ok(match kind {
            kind::COMMAND => Self::Command(Command::decode(body)?),
            kind::RAM_BLOCKS => Self::RamBlocks(BlockList::decode(body)?),
            kind::PAGES => Self::Pages(PageBatch::decode(body)?),
            kind::DEVICE => Self::Device(DeviceState::decode(body)?),
            kind::PACKAGE => Self::Package(Package::from_encoded(body)?),
            kind::DIGEST => Self::Digest(BlockSums::decode(body)?),
            kind::DIGEST_RANGES => Self::DigestRanges(RangeSums::decode(body)?),
            kind::ZERO_RUN => Self::ZeroRun(ZeroRun::decode(body)?),
            kind::END_OF_STREAM => Self::EndOfStream,
            kind => return Err(DecodeError::UnknownRecord { kind }),
        })
    }
}
