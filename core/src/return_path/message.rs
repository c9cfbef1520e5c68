//! Return-path messages: the validated representation and its encoder, plus
//! the fixed big-endian layouts of the payloads.

use core::fmt;

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::{
    RECV_BITMAP_END_MARK, RECV_BITMAP_FIELD_LEN, RESUME_ACK_VALUE, RP_HEADER_LEN, RP_MAX_ID_LEN,
    RpMessageType,
};

/// The header in front of every message, as QEMU's
/// `migrate_send_rp_message` writes it.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct RpHeader {
    /// Wire type code ([`RpMessageType::code`]).
    pub(crate) kind: U16,
    /// Payload length in bytes, header excluded.
    pub(crate) len: U16,
}

/// The payload of `SHUT`, `PONG` and `RESUME_ACK`: one big-endian `u32`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct Be32Payload {
    pub(crate) value: U32,
}

/// The byte range of a page request: the whole payload of `REQ_PAGES`
/// and the prefix of `REQ_PAGES_ID`. Both fields are in bytes, relative to
/// the RAM block (a [`crate::wire::PageRange`] counts pages instead).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct ReqPagesRange {
    pub(crate) start: U64,
    pub(crate) len: U32,
}

/// One validated return-path message.
///
/// A value borrowing a block id is only produced by the decoder after the id
/// has been checked (1..=255 bytes of UTF-8), so engines can use it directly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpMessage<'a> {
    /// The destination will send nothing more; `error` says whether it
    /// stopped because something failed (QEMU sends a non-zero `be32`).
    Shut {
        /// The destination hit an error.
        error: bool,
    },
    /// Answer to a ping, echoing the ping's value.
    Pong(u32),
    /// Postcopy page request naming the RAM block; later [`RpMessage::ReqPages`]
    /// refer to the same block.
    ReqPagesId {
        /// RAM block id (QEMU's `RAMBlock.idstr`).
        block: &'a str,
        /// Byte offset of the first requested page within the block.
        start: u64,
        /// Bytes requested, a multiple of the page size.
        len: u32,
    },
    /// Postcopy page request in the block named by the last
    /// [`RpMessage::ReqPagesId`]; saves resending the id on every fault.
    ReqPages {
        /// Byte offset of the first requested page within the block.
        start: u64,
        /// Bytes requested, a multiple of the page size.
        len: u32,
    },
    /// Postcopy recovery: the destination's received-pages bitmap of `block`
    /// follows on the same channel (outside this framing, as in QEMU).
    RecvBitmap {
        /// RAM block id the bitmap belongs to.
        block: &'a str,
    },
    /// Postcopy recovery, the first part of the bitmap after a
    /// [`RpMessage::RecvBitmap`]: its length in bytes (be64 on the wire, a
    /// multiple of 8: whole little-endian `u64` words). Not a framed
    /// message: QEMU writes the bitmap after RECV_BITMAP, outside the
    /// framing, and the decoder yields it in these three parts.
    RecvBitmapSize {
        /// Bytes of bitmap that follow.
        size: u64,
    },
    /// Postcopy recovery: bitmap bytes `offset .. offset + bytes.len()`
    /// (bit `i` of byte `k` is page `8 * k + i` of the block, set when the
    /// destination has it). A bitmap arrives in as many parts as its reads.
    RecvBitmapBytes {
        /// Offset of the first byte in the bitmap.
        offset: u64,
        /// The bytes, as the wire carries them.
        bytes: &'a [u8],
    },
    /// Postcopy recovery: the bitmap ended with its end mark
    /// ([`RECV_BITMAP_END_MARK`], checked by
    /// the decoder).
    RecvBitmapEnd,
    /// Postcopy recovery: the destination is ready for the source to resume
    /// sending. Carries [`RESUME_ACK_VALUE`] on the wire.
    ResumeAck,
    /// The destination agrees to the switchover (QEMU's switchover-ack
    /// capability), e.g. after its devices have loaded their initial state.
    SwitchoverAck,
    /// livemig extension, the first half of the end-of-migration
    /// handshake: the destination has loaded and validated the whole
    /// stream (every required device section included), keeps the guest
    /// paused, and waits for the source's Commit before starting it.
    Loaded,
    /// livemig's own: the destination was interrupted by the operator
    /// (signal number `signal`, e.g. 2 for SIGINT) before its guest ran,
    /// and stops loading; the source keeps its guest. Sent instead of an
    /// error SHUT, so the source can say what happened.
    Interrupted {
        /// The signal number (Linux numbering).
        signal: u32,
    },
    /// livemig's own: the destination found the digest of block `block`
    /// unequal and locates the first mismatching page: it asks for the
    /// source's sums of the parts of `first .. first + count`
    /// ([`locate_parts`](crate::digest::locate_parts)), which come back
    /// in a [`Record::DigestRanges`](crate::wire::Record::DigestRanges).
    DigestQuery {
        /// The block.
        block: u16,
        /// First page of the range.
        first: u64,
        /// Pages in the range.
        count: u64,
    },
    /// livemig's own: block `block` is the first whose digests differ, and
    /// page `page` of it the first whose terms differ, when the destination
    /// could locate it; the destination refuses the guest (its SHUT
    /// follows), and the source reports the block and page. On the wire a
    /// page not located is all ones (no page index comes near it).
    DigestMismatch {
        /// The block.
        block: u16,
        /// The page, in the block, once located.
        page: Option<u64>,
    },
    /// livemig's own: in postcopy, the copy of page `page` of block
    /// `block` that arrived failed its term; the destination did not
    /// install it and waits for the page, which the source sends again
    /// (as for a page request, though it was sent before).
    ResendPage {
        /// The block.
        block: u16,
        /// The page, in the block.
        page: u64,
    },
}

/// The payload of `DIGEST_QUERY`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct DigestQueryPayload {
    pub(crate) block: U16,
    pub(crate) first: U64,
    pub(crate) count: U64,
}

/// `DIGEST_MISMATCH`'s page when the page was not located.
pub(crate) const PAGE_NOT_LOCATED: u64 = u64::MAX;

/// The payload of `DIGEST_MISMATCH` and `RESEND_PAGE`.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct BlockPagePayload {
    pub(crate) block: U16,
    pub(crate) page: U64,
}

const _: () = assert!(size_of::<DigestQueryPayload>() == super::DIGEST_QUERY_LEN);
const _: () = assert!(size_of::<BlockPagePayload>() == super::BLOCK_PAGE_LEN);

/// A signal number of [`RpMessage::Interrupted`], displayed by its name
/// (`SIGINT`, `SIGTERM`...) when it is one an operator sends, else as
/// `signal N`; 0 is a cancel asked for without a signal (through the
/// VMM's own control interface).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalName(pub u32);

impl fmt::Display for SignalName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            0 => "a cancel request",
            1 => "SIGHUP",
            2 => "SIGINT",
            3 => "SIGQUIT",
            15 => "SIGTERM",
            n => return write!(f, "signal {n}"),
        };
        f.write_str(name)
    }
}

/// Why a message could not be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpEncodeError {
    /// The output buffer is shorter than [`RpMessage::encoded_len`].
    BufferTooSmall {
        /// Bytes the message needs.
        needed: usize,
        /// Bytes the caller provided.
        available: usize,
    },
    /// A block id is empty; no RAM block has an empty id and the decoder
    /// rejects it.
    EmptyId,
    /// A block id is longer than its one-byte length field can say.
    IdTooLong {
        /// Length of the id in bytes.
        len: usize,
    },
}

impl fmt::Display for RpEncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BufferTooSmall { needed, available } => write!(
                f,
                "return-path message needs {needed} bytes but the buffer has {available}"
            ),
            Self::EmptyId => f.write_str("return-path block id is empty"),
            Self::IdTooLong { len } => write!(
                f,
                "return-path block id is {len} bytes, at most {RP_MAX_ID_LEN} fit"
            ),
        }
    }
}

impl core::error::Error for RpEncodeError {}

impl RpMessage<'_> {
    /// The wire type of this message.
    pub const fn kind(&self) -> RpMessageType {
        match self {
            Self::Shut { .. } => RpMessageType::Shut,
            Self::Pong(_) => RpMessageType::Pong,
            Self::ReqPagesId { .. } => RpMessageType::ReqPagesId,
            Self::ReqPages { .. } => RpMessageType::ReqPages,
            Self::RecvBitmap { .. }
            | Self::RecvBitmapSize { .. }
            | Self::RecvBitmapBytes { .. }
            | Self::RecvBitmapEnd => RpMessageType::RecvBitmap,
            Self::ResumeAck => RpMessageType::ResumeAck,
            Self::SwitchoverAck => RpMessageType::SwitchoverAck,
            Self::Loaded => RpMessageType::Loaded,
            Self::Interrupted { .. } => RpMessageType::Interrupted,
            Self::DigestQuery { .. } => RpMessageType::DigestQuery,
            Self::DigestMismatch { .. } => RpMessageType::DigestMismatch,
            Self::ResendPage { .. } => RpMessageType::ResendPage,
        }
    }

    /// True for the three parts of a bitmap, which travel without the
    /// message header.
    const fn is_bitmap_part(&self) -> bool {
        matches!(
            self,
            Self::RecvBitmapSize { .. } | Self::RecvBitmapBytes { .. } | Self::RecvBitmapEnd
        )
    }

    /// Payload bytes, header excluded (for a bitmap part: all its bytes).
    fn payload_len(&self) -> usize {
        match self {
            Self::RecvBitmapSize { .. } | Self::RecvBitmapEnd => RECV_BITMAP_FIELD_LEN,
            Self::RecvBitmapBytes { bytes, .. } => bytes.len(),
            Self::Shut { .. } | Self::Pong(_) | Self::ResumeAck | Self::Interrupted { .. } => {
                size_of::<Be32Payload>()
            }
            Self::ReqPages { .. } => size_of::<ReqPagesRange>(),
            Self::ReqPagesId { block, .. } => size_of::<ReqPagesRange>() + 1 + block.len(),
            Self::RecvBitmap { block } => 1 + block.len(),
            Self::SwitchoverAck | Self::Loaded => 0,
            Self::DigestQuery { .. } => size_of::<DigestQueryPayload>(),
            Self::DigestMismatch { .. } | Self::ResendPage { .. } => size_of::<BlockPagePayload>(),
        }
    }

    /// Bytes [`RpMessage::encode`] writes: header plus payload. Never more
    /// than [`super::RP_MAX_MESSAGE`] for a message that encodes, except
    /// [`RpMessage::RecvBitmapBytes`], which is its bytes alone.
    pub fn encoded_len(&self) -> usize {
        if self.is_bitmap_part() {
            return self.payload_len();
        }
        RP_HEADER_LEN + self.payload_len()
    }

    /// Writes the message at the start of `out` exactly as QEMU's destination
    /// would, returning the number of bytes written.
    ///
    /// Refuses ids the decoder would reject (empty, over 255 bytes) so a
    /// livemig destination never sends what a livemig source cannot read.
    /// Page alignment is the caller's business: the encoder does not know
    /// the page size. Nothing is written when an error is returned.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, RpEncodeError> {
        // Only messages carrying an id use this byte; checking the id here
        // keeps every refusal ahead of the first write.
        let id_len = match self {
            Self::ReqPagesId { block, .. } | Self::RecvBitmap { block } => id_len_byte(block)?,
            _ => 0,
        };
        let needed = self.encoded_len();
        if out.len() < needed {
            return Err(RpEncodeError::BufferTooSmall {
                needed,
                available: out.len(),
            });
        }
        let header = RpHeader {
            kind: U16::new(self.kind().code()),
            // Cannot truncate: ids are at most 255 bytes, so payloads are at
            // most RP_MAX_PAYLOAD (268) bytes.
            len: U16::new(self.payload_len() as u16),
        };
        let mut w = Writer { out, pos: 0 };
        match *self {
            Self::RecvBitmapSize { size } => {
                w.put(&size.to_be_bytes());
                return Ok(w.pos);
            }
            Self::RecvBitmapBytes { bytes, .. } => {
                w.put(bytes);
                return Ok(w.pos);
            }
            Self::RecvBitmapEnd => {
                w.put(&RECV_BITMAP_END_MARK.to_be_bytes());
                return Ok(w.pos);
            }
            _ => w.put(header.as_bytes()),
        }
        match *self {
            Self::Shut { error } => w.put(be32(u32::from(error)).as_bytes()),
            Self::Pong(value) => w.put(be32(value).as_bytes()),
            Self::ResumeAck => w.put(be32(RESUME_ACK_VALUE).as_bytes()),
            Self::ReqPages { start, len } => w.put(range(start, len).as_bytes()),
            Self::ReqPagesId { block, start, len } => {
                w.put(range(start, len).as_bytes());
                w.put(&[id_len]);
                w.put(block.as_bytes());
            }
            Self::RecvBitmap { block } => {
                w.put(&[id_len]);
                w.put(block.as_bytes());
            }
            Self::SwitchoverAck
            | Self::Loaded
            | Self::RecvBitmapSize { .. }
            | Self::RecvBitmapBytes { .. }
            | Self::RecvBitmapEnd => {}
            Self::Interrupted { signal } => w.put(be32(signal).as_bytes()),
            Self::DigestQuery {
                block,
                first,
                count,
            } => w.put(
                DigestQueryPayload {
                    block: U16::new(block),
                    first: U64::new(first),
                    count: U64::new(count),
                }
                .as_bytes(),
            ),
            Self::DigestMismatch { block, page } => w.put(
                BlockPagePayload {
                    block: U16::new(block),
                    page: U64::new(page.unwrap_or(PAGE_NOT_LOCATED)),
                }
                .as_bytes(),
            ),
            Self::ResendPage { block, page } => w.put(
                BlockPagePayload {
                    block: U16::new(block),
                    page: U64::new(page),
                }
                .as_bytes(),
            ),
        }
        Ok(w.pos)
    }
}

/// The id length byte for `block`, or why `block` cannot be sent.
fn id_len_byte(block: &str) -> Result<u8, RpEncodeError> {
    if block.is_empty() {
        return Err(RpEncodeError::EmptyId);
    }
    u8::try_from(block.len()).map_err(|_| RpEncodeError::IdTooLong { len: block.len() })
}

fn be32(value: u32) -> Be32Payload {
    Be32Payload {
        value: U32::new(value),
    }
}

fn range(start: u64, len: u32) -> ReqPagesRange {
    ReqPagesRange {
        start: U64::new(start),
        len: U32::new(len),
    }
}

/// Appends to a buffer already checked to be long enough; copies through
/// iterators so even a broken length computation cannot index out of bounds.
struct Writer<'b> {
    out: &'b mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let written = self
            .out
            .iter_mut()
            .skip(self.pos)
            .zip(bytes)
            .map(|(dst, src)| *dst = *src)
            .count();
        self.pos += written;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::return_path::RP_MAX_MESSAGE;
    use std::string::String;

    fn encode_vec(msg: &RpMessage<'_>) -> std::vec::Vec<u8> {
        let mut buf = [0u8; RP_MAX_MESSAGE];
        let n = msg.encode(&mut buf).expect("encodes");
        assert_eq!(n, msg.encoded_len());
        buf[..n].to_vec()
    }

    #[test]
    fn req_pages_id_matches_qemu_layout() {
        // migrate_send_rp_req_pages: be64 start, be32 len, u8 strlen, name
        // without its NUL; header be16 type 3, be16 length 12 + 1 + 6 = 19.
        let msg = RpMessage::ReqPagesId {
            block: "pc.ram",
            start: 0x2000,
            len: 0x1000,
        };
        assert_eq!(
            encode_vec(&msg),
            [
                0x00, 0x03, 0x00, 0x13, 0, 0, 0, 0, 0, 0, 0x20, 0x00, 0x00, 0x00, 0x10, 0x00, 6,
                b'p', b'c', b'.', b'r', b'a', b'm'
            ]
        );
    }

    #[test]
    fn fixed_messages_match_qemu_layout() {
        assert_eq!(
            encode_vec(&RpMessage::Shut { error: false }),
            [0, 1, 0, 4, 0, 0, 0, 0]
        );
        assert_eq!(
            encode_vec(&RpMessage::Shut { error: true }),
            [0, 1, 0, 4, 0, 0, 0, 1]
        );
        assert_eq!(
            encode_vec(&RpMessage::Pong(0xdead_beef)),
            [0, 2, 0, 4, 0xde, 0xad, 0xbe, 0xef]
        );
        assert_eq!(
            encode_vec(&RpMessage::ReqPages {
                start: 0x1_0000_0000,
                len: 0x20_0000
            }),
            [0, 4, 0, 12, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0x20, 0, 0]
        );
        assert_eq!(encode_vec(&RpMessage::ResumeAck), [0, 6, 0, 4, 0, 0, 0, 1]);
        assert_eq!(encode_vec(&RpMessage::SwitchoverAck), [0, 7, 0, 0]);
        assert_eq!(encode_vec(&RpMessage::Loaded), [1, 0, 0, 0]);
    }

    /// The return-path examples of `docs/wire-format.md` marked
    /// `<!-- rp-example: NAME -->` are what the encoder writes and what the
    /// decoder reads back.
    #[test]
    fn documented_examples_match_the_encoder() {
        const DOC: &str = include_str!("../../../docs/wire-format.md");
        let example = |name: &str| -> std::vec::Vec<u8> {
            let marker = std::format!("<!-- rp-example: {name} -->");
            let start = DOC.find(&marker).expect("the example is in the document");
            let mut lines = DOC[start..].lines().skip(1);
            assert_eq!(lines.next(), Some("```"));
            lines
                .take_while(|l| *l != "```")
                .flat_map(|l| l.split("  ").next().unwrap_or_default().split_whitespace())
                .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
                .collect()
        };
        let bytes = example("loaded");
        assert_eq!(bytes, encode_vec(&RpMessage::Loaded));
        let mut decoder = crate::return_path::RpDecoder::new(4096).unwrap();
        assert_eq!(
            decoder.decode(&bytes),
            Ok((bytes.len(), Some(RpMessage::Loaded)))
        );
        let interrupted = RpMessage::Interrupted { signal: 2 };
        let bytes = example("interrupted");
        assert_eq!(bytes, encode_vec(&interrupted));
        assert_eq!(decoder.decode(&bytes), Ok((bytes.len(), Some(interrupted))));
        let query = RpMessage::DigestQuery {
            block: 0,
            first: 0,
            count: 3,
        };
        let bytes = example("digest-query");
        assert_eq!(bytes, encode_vec(&query));
        assert_eq!(decoder.decode(&bytes), Ok((bytes.len(), Some(query))));
        let mismatch = RpMessage::DigestMismatch {
            block: 0,
            page: Some(2),
        };
        let bytes = example("digest-mismatch");
        assert_eq!(bytes, encode_vec(&mismatch));
        assert_eq!(decoder.decode(&bytes), Ok((bytes.len(), Some(mismatch))));
        let resend = RpMessage::ResendPage {
            block: 0,
            page: 0x1000,
        };
        let bytes = example("resend-page");
        assert_eq!(bytes, encode_vec(&resend));
        assert_eq!(decoder.decode(&bytes), Ok((bytes.len(), Some(resend))));

        // The bitmap of a 70-page block with pages 0-15, 63 and 64-69.
        let mut words = [0u64; 2];
        for page in (0..16).chain(63..70) {
            words[page / 64] |= 1 << (page % 64);
        }
        let bitmap: std::vec::Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(crate::return_path::recv_bitmap_len(70), bitmap.len() as u64);
        let parts = [
            RpMessage::RecvBitmap { block: "pc.ram" },
            RpMessage::RecvBitmapSize { size: 16 },
            RpMessage::RecvBitmapBytes {
                offset: 0,
                bytes: &bitmap,
            },
            RpMessage::RecvBitmapEnd,
        ];
        let bytes = example("recv-bitmap");
        let encoded: std::vec::Vec<u8> = parts.iter().flat_map(encode_vec).collect();
        assert_eq!(bytes, encoded);
        let mut at = 0;
        for part in parts {
            let (n, msg) = decoder.decode(&bytes[at..]).unwrap();
            assert_eq!(msg, Some(part));
            at += n;
        }
        assert_eq!(at, bytes.len());
        assert_eq!(decoder.finish(), Ok(()));
    }

    #[test]
    fn recv_bitmap_counts_length_byte_but_sends_no_nul() {
        // migrate_send_rp_recv_bitmap: buf[0] = strlen, then the name, and
        // a message length of strlen + 1 (the length byte, not a NUL).
        assert_eq!(
            encode_vec(&RpMessage::RecvBitmap { block: "pc.ram" }),
            [0, 5, 0, 7, 6, b'p', b'c', b'.', b'r', b'a', b'm']
        );
    }

    #[test]
    fn longest_id_fills_max_message_exactly() {
        let id: String = "x".repeat(RP_MAX_ID_LEN);
        let msg = RpMessage::ReqPagesId {
            block: &id,
            start: 0,
            len: 4096,
        };
        assert_eq!(msg.encoded_len(), RP_MAX_MESSAGE);
        assert_eq!(encode_vec(&msg).len(), RP_MAX_MESSAGE);
    }

    #[test]
    fn bad_ids_and_short_buffers_are_refused_without_writing() {
        let long: String = "y".repeat(RP_MAX_ID_LEN + 1);
        let mut buf = [0xaau8; 2 * RP_MAX_MESSAGE];
        let cases = [
            (RpMessage::RecvBitmap { block: "" }, RpEncodeError::EmptyId),
            (
                RpMessage::ReqPagesId {
                    block: "",
                    start: 0,
                    len: 4096,
                },
                RpEncodeError::EmptyId,
            ),
            (
                RpMessage::RecvBitmap { block: &long },
                RpEncodeError::IdTooLong { len: 256 },
            ),
            (
                RpMessage::ReqPagesId {
                    block: &long,
                    start: 0,
                    len: 4096,
                },
                RpEncodeError::IdTooLong { len: 256 },
            ),
        ];
        for (msg, err) in cases {
            assert_eq!(msg.encode(&mut buf), Err(err));
        }
        assert!(buf.iter().all(|&b| b == 0xaa));
        let msg = RpMessage::Pong(7);
        assert_eq!(
            msg.encode(&mut buf[..7]),
            Err(RpEncodeError::BufferTooSmall {
                needed: 8,
                available: 7
            })
        );
        assert!(buf.iter().all(|&b| b == 0xaa));
        assert_eq!(
            std::format!("{}", RpEncodeError::IdTooLong { len: 300 }),
            "return-path block id is 300 bytes, at most 255 fit"
        );
    }
}
