//! Errors of the main-stream codec: what a malformed stream looked like, and
//! why a record could not be encoded.
//!
//! Every variant names the field or structure at fault (`what`) so that a
//! failed migration's error description points at the byte that broke it.

use core::fmt;

/// Why an id (RAM block or device name) was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdError {
    /// The id is empty; ids identify blocks and devices, so one is required.
    Empty,
    /// The id is longer than [`super::MAX_ID_LEN`] bytes (its length is one byte on the wire).
    TooLong {
        /// Length of the rejected id in bytes.
        len: usize,
    },
}

impl fmt::Display for IdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("id is empty"),
            Self::TooLong { len } => {
                write!(
                    f,
                    "id is {len} bytes long, the maximum is {}",
                    super::MAX_ID_LEN
                )
            }
        }
    }
}

/// Where the peer closed the connection before the stream was complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EofAt {
    /// Inside the 8-byte stream header, after `have` bytes.
    StreamHeader {
        /// Bytes of the stream header received.
        have: usize,
    },
    /// Between two records, without an EndOfStream record.
    BetweenRecords,
    /// Inside a record header, after `have` of its 8 bytes.
    RecordHeader {
        /// Bytes of the record header received.
        have: usize,
    },
    /// Inside the body of a record of `kind`, after `have` of `len` bytes.
    Body {
        /// The record's kind code.
        kind: u16,
        /// Body bytes received.
        have: usize,
        /// The body length announced by the record header.
        len: usize,
    },
}

impl fmt::Display for EofAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::StreamHeader { have } => {
                write!(f, "in the stream header after {have} of 8 bytes")
            }
            Self::BetweenRecords => f.write_str("between records, before EndOfStream"),
            Self::RecordHeader { have } => write!(f, "in a record header after {have} of 8 bytes"),
            Self::Body { kind, have, len } => {
                write!(
                    f,
                    "in the body of a record of kind {kind:#06x} after {have} of {len} bytes"
                )
            }
        }
    }
}

/// A malformed main stream. The decoder reports the first one and stays failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The first four bytes are not `"LMIG"`: the peer is not livemig.
    BadMagic {
        /// The bytes received instead.
        found: [u8; 4],
    },
    /// The peer speaks a stream version this code does not.
    UnsupportedVersion {
        /// Version announced by the peer.
        found: u32,
        /// Version this code speaks.
        supported: u32,
    },
    /// A record kind that version 1 does not define.
    UnknownRecord {
        /// The kind code received.
        kind: u16,
    },
    /// A command code that version 1 does not define.
    UnknownCommand {
        /// The command code received.
        code: u16,
    },
    /// Bits that must be zero are set.
    ReservedFlags {
        /// Which field (record flags, batch flags, page entry).
        what: &'static str,
        /// The offending field value.
        value: u64,
    },
    /// A body or field whose length is fixed has another length.
    BadLength {
        /// Which body or field.
        what: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it has.
        found: usize,
    },
    /// A record header announces a body above the decoder's limit.
    Oversized {
        /// Announced body length.
        len: usize,
        /// The decoder's limit (`min(MAX_RECORD_BODY, scratch length)`).
        limit: usize,
    },
    /// A field runs past the end of the record body.
    Truncated {
        /// The field that did not fit.
        what: &'static str,
    },
    /// A zero-length id.
    EmptyId {
        /// Whose id (block or device).
        what: &'static str,
    },
    /// An id that is not UTF-8.
    IdNotUtf8 {
        /// Whose id (block or device).
        what: &'static str,
    },
    /// A page size that is not a power of two or is out of range.
    BadPageSize {
        /// Which page size.
        what: &'static str,
        /// The value received.
        value: u64,
    },
    /// A RAM block whose length is not a multiple of its page size.
    BlockLengthNotMultiple {
        /// Block length in bytes.
        length: u64,
        /// Its page size.
        page_size: u32,
    },
    /// A batch page shift outside 9..=30.
    BadPageShift {
        /// The shift received.
        shift: u8,
    },
    /// A batch with more than [`super::MAX_BATCH_PAGES`] entries.
    TooManyPages {
        /// The count received.
        count: u32,
    },
    /// A discard range that is empty or overflows the page index space.
    BadDiscardRange {
        /// First page of the range.
        first: u64,
        /// Page count of the range.
        count: u64,
    },
    /// A DigestRanges record's range is empty or overflows the page index
    /// space.
    BadDigestRange {
        /// First page of the range.
        first: u64,
        /// Page count of the range.
        count: u64,
    },
    /// A ZeroRun record's range is empty or overflows the page index space.
    BadZeroRun {
        /// First page of the run.
        first: u64,
        /// Page count of the run.
        count: u64,
    },
    /// The discard range list is empty or not a whole number of 16-byte ranges.
    DiscardListLength {
        /// Bytes left for the range list.
        len: usize,
    },
    /// A Package record inside a Package.
    NestedPackage,
    /// An EndOfStream record inside a Package.
    EndOfStreamInPackage,
    /// Bytes where none may be (after EndOfStream, after the last RAM block).
    TrailingData {
        /// Where the extra bytes were.
        what: &'static str,
        /// How many extra bytes arrived.
        len: usize,
    },
    /// A multifd channel index outside the channel count, or a count
    /// outside 1..=255.
    BadChannel {
        /// The index received.
        index: u16,
        /// The count received.
        count: u16,
    },
    /// A multifd SYNC packet with pages, a block or a page shift.
    BadSyncPacket,
    /// The connection closed before EndOfStream.
    UnexpectedEof {
        /// Where the stream was cut.
        at: EofAt,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic { found } => {
                write!(
                    f,
                    "bad stream magic {found:02x?}: the peer is not a livemig source"
                )
            }
            Self::UnsupportedVersion { found, supported } => {
                write!(
                    f,
                    "stream version {found} is not supported (this end speaks {supported})"
                )
            }
            Self::UnknownRecord { kind } => write!(f, "unknown record kind {kind:#06x}"),
            Self::UnknownCommand { code } => write!(f, "unknown command code {code}"),
            Self::ReservedFlags { what, value } => {
                write!(f, "reserved bits set in {what}: {value:#x}")
            }
            Self::BadLength {
                what,
                expected,
                found,
            } => {
                write!(f, "{what} is {found} bytes, expected {expected}")
            }
            Self::Oversized { len, limit } => {
                write!(f, "record body of {len} bytes exceeds the limit of {limit}")
            }
            Self::Truncated { what } => write!(f, "{what} runs past the end of the record"),
            Self::EmptyId { what } => write!(f, "{what} id is empty"),
            Self::IdNotUtf8 { what } => write!(f, "{what} id is not UTF-8"),
            Self::BadPageSize { what, value } => {
                write!(f, "{what} {value} is not a valid page size")
            }
            Self::BlockLengthNotMultiple { length, page_size } => {
                write!(
                    f,
                    "RAM block length {length} is not a multiple of its page size {page_size}"
                )
            }
            Self::BadPageShift { shift } => write!(f, "page shift {shift} is outside 9..=30"),
            Self::TooManyPages { count } => {
                write!(
                    f,
                    "page batch of {count} entries exceeds {}",
                    super::MAX_BATCH_PAGES
                )
            }
            Self::BadDiscardRange { first, count } => {
                write!(
                    f,
                    "discard range of {count} pages from {first} is empty or overflows"
                )
            }
            Self::BadDigestRange { first, count } => {
                write!(
                    f,
                    "digest range of {count} pages from {first} is empty or overflows"
                )
            }
            Self::BadZeroRun { first, count } => {
                write!(
                    f,
                    "zero run of {count} pages from {first} is empty or overflows"
                )
            }
            Self::DiscardListLength { len } => {
                write!(
                    f,
                    "discard range list of {len} bytes is not a nonzero multiple of 16"
                )
            }
            Self::NestedPackage => f.write_str("a package contains a package"),
            Self::EndOfStreamInPackage => f.write_str("a package contains EndOfStream"),
            Self::TrailingData { what, len } => write!(f, "{len} unexpected bytes {what}"),
            Self::BadChannel { index, count } => {
                write!(f, "multifd channel {index} of {count} is out of range")
            }
            Self::BadSyncPacket => {
                f.write_str("multifd sync packet with pages, a block or a page shift")
            }
            Self::UnexpectedEof { at } => write!(f, "connection closed {at}"),
        }
    }
}

/// Why a record could not be encoded. Encoding checks the same rules as
/// decoding, so a peer never receives what it would reject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The output buffer cannot hold the encoding.
    BufferTooSmall {
        /// Bytes the encoding needs.
        needed: usize,
        /// Bytes the buffer has.
        available: usize,
    },
    /// An id was rejected.
    Id(IdError),
    /// A record body above [`super::MAX_RECORD_BODY`].
    Oversized {
        /// The body length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A page size that is not a power of two or is out of range.
    BadPageSize {
        /// Which page size.
        what: &'static str,
        /// The value given.
        value: u64,
    },
    /// A RAM block whose length is not a multiple of its page size.
    BlockLengthNotMultiple {
        /// Block length in bytes.
        length: u64,
        /// Its page size.
        page_size: u32,
    },
    /// More RAM blocks than a be16 count can carry.
    TooManyBlocks {
        /// The number of blocks given.
        count: usize,
    },
    /// A batch page shift outside 9..=30.
    BadPageShift {
        /// The shift given.
        shift: u8,
    },
    /// A batch with more than [`super::MAX_BATCH_PAGES`] entries.
    TooManyPages {
        /// The number of entries given.
        count: usize,
    },
    /// A page index that does not fit in the entry's 56 index bits.
    PageIndexTooLarge {
        /// The index given.
        index: u64,
    },
    /// A page batch's terms do not match its flags and normal entries.
    TermCount {
        /// Terms the batch needs: one per normal page with
        /// [`BatchFlags::TERMS`](super::BatchFlags::TERMS), else none.
        expected: usize,
        /// Terms given.
        found: usize,
    },
    /// Page data whose length is not `normal entries × page size`.
    DataLength {
        /// Bytes the entries call for.
        expected: usize,
        /// Bytes given.
        found: usize,
    },
    /// A discard command without ranges.
    NoDiscardRanges,
    /// A discard range that is empty or overflows the page index space.
    BadDiscardRange {
        /// First page of the range.
        first: u64,
        /// Page count of the range.
        count: u64,
    },
    /// A DigestRanges record's range is empty or overflows the page index
    /// space.
    BadDigestRange {
        /// First page of the range.
        first: u64,
        /// Page count of the range.
        count: u64,
    },
    /// A ZeroRun record's range is empty or overflows the page index space.
    BadZeroRun {
        /// First page of the run.
        first: u64,
        /// Page count of the run.
        count: u64,
    },
    /// A multifd channel index outside the channel count, or a count
    /// outside 1..=255.
    BadChannel {
        /// The channel index.
        index: u16,
        /// The channel count.
        count: u16,
    },
    /// A multifd packet whose entries do not match its kind: a pages
    /// packet needs 1..=1024 entries and `count` of them, a sync none.
    PacketEntries {
        /// The count the header announces.
        count: u32,
        /// The entries given.
        entries: usize,
    },
}

impl From<IdError> for EncodeError {
    fn from(e: IdError) -> Self {
        Self::Id(e)
    }
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BufferTooSmall { needed, available } => {
                write!(
                    f,
                    "output buffer of {available} bytes is too small, {needed} needed"
                )
            }
            Self::Id(e) => write!(f, "bad id: {e}"),
            Self::Oversized { len, limit } => {
                write!(f, "record body of {len} bytes exceeds the limit of {limit}")
            }
            Self::BadPageSize { what, value } => {
                write!(f, "{what} {value} is not a valid page size")
            }
            Self::BlockLengthNotMultiple { length, page_size } => {
                write!(
                    f,
                    "RAM block length {length} is not a multiple of its page size {page_size}"
                )
            }
            Self::TooManyBlocks { count } => write!(f, "{count} RAM blocks exceed {}", u16::MAX),
            Self::BadPageShift { shift } => write!(f, "page shift {shift} is outside 9..=30"),
            Self::TooManyPages { count } => {
                write!(
                    f,
                    "page batch of {count} entries exceeds {}",
                    super::MAX_BATCH_PAGES
                )
            }
            Self::PageIndexTooLarge { index } => {
                write!(f, "page index {index} does not fit in 56 bits")
            }
            Self::TermCount { expected, found } => write!(
                f,
                "{found} page terms for a batch that needs {expected} (one per normal page with TERMS)"
            ),
            Self::DataLength { expected, found } => {
                write!(f, "page data is {found} bytes, the entries need {expected}")
            }
            Self::NoDiscardRanges => f.write_str("a discard command needs at least one range"),
            Self::BadDiscardRange { first, count } => {
                write!(
                    f,
                    "discard range of {count} pages from {first} is empty or overflows"
                )
            }
            Self::BadDigestRange { first, count } => {
                write!(
                    f,
                    "digest range of {count} pages from {first} is empty or overflows"
                )
            }
            Self::BadZeroRun { first, count } => {
                write!(
                    f,
                    "zero run of {count} pages from {first} is empty or overflows"
                )
            }
            Self::BadChannel { index, count } => {
                write!(f, "multifd channel {index} of {count} is out of range")
            }
            Self::PacketEntries { count, entries } => write!(
                f,
                "multifd packet announces {count} entries and has {entries}"
            ),
        }
    }
}

impl core::error::Error for IdError {}
impl core::error::Error for DecodeError {}
impl core::error::Error for EncodeError {}
