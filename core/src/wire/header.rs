//! The fixed-layout headers of the main stream: the "packet" level.
//!
//! These are plain zerocopy structs with big-endian fields, read and written
//! without copying field by field. They carry raw values; the checks that
//! turn them into a validated [`super::Record`] live beside the records.

use zerocopy::byteorder::big_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::cursor::Writer;
use super::{DecodeError, EncodeError, MAGIC, RECORD_HEADER_LEN, STREAM_HEADER_LEN, VERSION};

/// The 8-byte stream header: magic `"LMIG"` and the format version.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct StreamHeader {
    /// Must be [`MAGIC`].
    pub magic: [u8; 4],
    /// Must be [`VERSION`].
    pub version: U32,
}

/// The 8-byte header in front of every record body.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RecordHeader {
    /// Record kind code (`kind::*`).
    pub kind: U16,
    /// Reserved, zero in version 1.
    pub flags: U16,
    /// Number of body bytes after this header.
    pub body_len: U32,
}

/// Record kind codes, as they appear in [`RecordHeader::kind`].
pub mod kind {
    /// A command (control message).
    pub const COMMAND: u16 = 0x0001;
    /// The RAM block list.
    pub const RAM_BLOCKS: u16 = 0x0002;
    /// A batch of pages.
    pub const PAGES: u16 = 0x0003;
    /// One device's state.
    pub const DEVICE: u16 = 0x0004;
    /// A sequence of records delivered as one unit.
    pub const PACKAGE: u16 = 0x0005;
    /// The end of the stream.
    pub const END_OF_STREAM: u16 = 0x0006;
    /// The source's memory digest.
    pub const DIGEST: u16 = 0x0007;
    /// The source's sums of the parts of a range, answering a
    /// destination that locates a mismatching page.
    pub const DIGEST_RANGES: u16 = 0x0008;
    /// A run of pages of one block, all zero on the source.
    pub const ZERO_RUN: u16 = 0x0009;
}

/// Writes the 8-byte stream header into `out`; returns the bytes written (8).
///
/// The source sends it once, before any record, so that a destination can
/// tell a livemig peer of the right version from anything else.
pub fn encode_stream_header(out: &mut [u8]) -> Result<usize, EncodeError> {
    let mut w = Writer::new(out, STREAM_HEADER_LEN)?;
    w.put(&StreamHeader {
        magic: MAGIC,
        version: U32::new(VERSION),
    })?;
    Ok(w.written())
}

/// Checks a complete stream header.
pub(crate) fn check_stream_header(h: &StreamHeader) -> Result<(), DecodeError> {
    if h.magic != MAGIC {
        return Err(DecodeError::BadMagic { found: h.magic });
    }
    if h.version.get() != VERSION {
        return Err(DecodeError::UnsupportedVersion {
            found: h.version.get(),
            supported: VERSION,
        });
    }
    Ok(())
}

/// Writes a record header announcing `body_len` body bytes.
pub(crate) fn put_record_header(
    w: &mut Writer<'_>,
    kind: u16,
    body_len: usize,
) -> Result<(), EncodeError> {
    let len = check_body_len(body_len)?;
    w.put(&RecordHeader {
        kind: U16::new(kind),
        flags: U16::new(0),
        body_len: U32::new(len),
    })
}

/// Checks a body length against [`super::MAX_RECORD_BODY`] and narrows it to the wire's be32.
pub(crate) fn check_body_len(body_len: usize) -> Result<u32, EncodeError> {
    let limit = super::MAX_RECORD_BODY;
    let oversized = EncodeError::Oversized {
        len: body_len,
        limit,
    };
    if body_len > limit {
        return Err(oversized);
    }
    u32::try_from(body_len).map_err(|_| oversized)
}

/// Validates a record header from its bytes alone: the flags, the kind, the
/// body length against `limit`, and EndOfStream's empty body. Returns the
/// kind and body length. Deciding all of this before any body byte is
/// buffered is what makes `Oversized` independent of input chunking.
pub(crate) fn check_record_header(
    h: &RecordHeader,
    limit: usize,
) -> Result<(u16, usize), DecodeError> {
    let flags = h.flags.get();
    if flags != 0 {
        return Err(DecodeError::ReservedFlags {
            what: "record flags",
            value: u64::from(flags),
        });
    }
    let kind = h.kind.get();
    if !(kind::COMMAND..=kind::ZERO_RUN).contains(&kind) {
        return Err(DecodeError::UnknownRecord { kind });
    }
    // A be32 always fits a usize on the targets livemig supports (32 and 64 bit);
    // saturating keeps a hypothetical 16-bit target safe (it becomes Oversized).
    let len = usize::try_from(h.body_len.get()).unwrap_or(usize::MAX);
    if len > limit {
        return Err(DecodeError::Oversized { len, limit });
    }
    if kind == kind::END_OF_STREAM && len != 0 {
        return Err(DecodeError::BadLength {
            what: "EndOfStream body",
            expected: 0,
            found: len,
        });
    }
    Ok((kind, len))
}

const _: () = assert!(size_of::<StreamHeader>() == STREAM_HEADER_LEN);
const _: () = assert!(size_of::<RecordHeader>() == RECORD_HEADER_LEN);
