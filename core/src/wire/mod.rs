//! The main migration stream, source to destination: format version 1.
//!
//! The stream is an 8-byte header (`"LMIG"`, be32 version) followed by
//! length-framed records: an 8-byte record header (be16 kind, be16 flags,
//! be32 body length) and a body. `docs/wire-format.md` is the specification,
//! with a worked example of every record that a test here checks byte for
//! byte.
//!
//! Two levels, as in smoltcp:
//! - the *packet* level: fixed layouts ([`StreamHeader`], [`RecordHeader`],
//!   [`BatchHeader`]) read and written with zerocopy, big-endian;
//! - the *representation* level: [`Record`] and what it holds, which exist
//!   only validated. Decoded records borrow the received bytes; records built
//!   by a sender borrow the sender's values and slices.
//!
//! [`StreamDecoder`] turns arbitrarily chunked input into records. For
//! sending, [`Record::encode`] writes a whole record, while
//! [`encode_page_batch_header`] and [`encode_device_header`] write only the
//! framing so that pages and device blobs go out from where they already are.
//!
//! Multifd channels, the extra connections that carry pages beside the
//! main stream, have their own hello and packet format (`multifd`); the
//! postcopy preempt channel has a hello of its own, then Pages records
//! (`preempt`).
//!
//! The return path (destination to source) is a separate format, in
//! `crate::return_path`.

mod cursor;
mod decoder;
#[cfg(test)]
mod doc_examples;
mod error;
mod header;
mod id;
mod multifd;
mod pages;
mod preempt;
mod record;
#[cfg(test)]
mod tests;

pub use decoder::{Decoded, StreamDecoder};
pub use error::{DecodeError, EncodeError, EofAt, IdError};
pub use header::{RecordHeader, StreamHeader, encode_stream_header, kind};
pub use id::{BlockId, DeviceId};
pub use multifd::{
    CHANNEL_MAGIC, CHANNEL_VERSION, ChannelHello, ChannelReceiver, HELLO_LEN, MAX_CHANNELS,
    PACKET_HEADER_LEN, PACKET_MAGIC, PacketEntries, PacketFlags, PacketHeader, PacketKind,
    SequenceError,
};
pub use pages::{
    BATCH_HEADER_LEN, BatchFlags, BatchHeader, MAX_PAGE_SHIFT, MIN_PAGE_SHIFT, PAGE_ENTRY_LEN,
    PAGE_TERM_LEN, PageBatch, PageEntry, PageKind, encode_page_batch_header,
    encode_page_batch_header_with_terms,
};
pub use preempt::{PREEMPT_HELLO_LEN, PREEMPT_MAGIC, PREEMPT_VERSION, PreemptHello};
pub use record::{
    BlockInfo, BlockList, BlockSums, Command, DeviceState, DiscardRanges, MAX_BLOCK_PAGE_SIZE,
    MIN_BLOCK_PAGE_SIZE, Package, PageRange, RangeSums, Record, ZERO_RUN_BODY_LEN, ZeroRun,
    command_code, encode_device_header, encode_digest, encode_digest_ranges, encode_package_header,
};

/// The stream's first four bytes. A peer sending anything else is not livemig.
pub const MAGIC: [u8; 4] = *b"LMIG";
/// The stream format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Bytes of the stream header (magic + version).
pub const STREAM_HEADER_LEN: usize = 8;
/// Bytes of every record header (kind, flags, body length).
pub const RECORD_HEADER_LEN: usize = 8;
/// Largest record body: 8 MiB + 64 KiB. Enough for a full batch of 1024
/// 4 KiB pages (4 MiB + 8 KiB of entries and header) and for a device blob of
/// several MiB, while bounding what a receiver must buffer.
pub const MAX_RECORD_BODY: usize = 8 * 1024 * 1024 + 64 * 1024;
/// Most entries in one page batch; bounds the entry table a receiver scans.
pub const MAX_BATCH_PAGES: usize = 1024;
/// Longest block or device id in bytes (its length is one byte on the wire).
pub const MAX_ID_LEN: usize = 255;
