//! Incremental, heap-free decoding of the return path.
//!
//! Transports hand the decoder whatever bytes they happen to have (a whole
//! read, or one byte); the decoder keeps a partial message in a fixed buffer
//! of [`RP_MAX_MESSAGE`] bytes, validates it as strictly as QEMU's
//! `source_return_path_thread` (and a little more), and yields one
//! [`RpMessage`] at a time.

use core::fmt;

use zerocopy::FromBytes;

use super::message::{Be32Payload, PageRange, RpHeader};
use super::{
    LenRule, RESUME_ACK_VALUE, RP_HEADER_LEN, RP_MAX_MESSAGE, RP_MAX_PAYLOAD, RpMessage,
    RpMessageType,
};

/// Why bytes on the return path were rejected. Every variant is fatal for
/// the connection: after one, the decoder keeps returning it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpDecodeError {
    /// The type code is 0 (QEMU's `INVALID`) or beyond the known types.
    UnknownType(u16),
    /// A fixed-length message arrived with another length.
    BadLength {
        /// QEMU's name for the message type.
        msg: &'static str,
        /// The only valid payload length.
        expected: u16,
        /// The length in the header.
        found: u16,
    },
    /// A variable-length message is shorter than its fixed fields.
    TooShort {
        /// QEMU's name for the message type.
        msg: &'static str,
        /// Smallest structurally possible payload length.
        min: u16,
        /// The length in the header.
        found: u16,
    },
    /// A variable-length message is longer than any valid one of its type
    /// (a 255-byte id is the largest); rejecting it from the header alone
    /// bounds the decoder's buffer.
    TooLong {
        /// QEMU's name for the message type.
        msg: &'static str,
        /// Largest valid payload length.
        max: u16,
        /// The length in the header.
        found: u16,
    },
    /// The id length byte disagrees with the bytes that follow it.
    IdLengthMismatch {
        /// QEMU's name for the message type.
        msg: &'static str,
        /// The id length the message claims.
        id_len: u8,
        /// The bytes actually left for the id.
        remaining: usize,
    },
    /// A block id is empty; no RAM block has an empty name.
    EmptyId {
        /// QEMU's name for the message type.
        msg: &'static str,
    },
    /// A block id is not UTF-8 (QEMU's ids are ASCII names such as `pc.ram`).
    IdNotUtf8 {
        /// QEMU's name for the message type.
        msg: &'static str,
    },
    /// A page request asks for zero bytes.
    EmptyRequest {
        /// Start offset of the empty request.
        start: u64,
    },
    /// A page request is not whole pages; QEMU's source refuses these too.
    Misaligned {
        /// Requested start offset in the block.
        start: u64,
        /// Requested length in bytes.
        len: u32,
        /// Page size the decoder was created with.
        page_size: u32,
    },
    /// A page request's end lies beyond the 64-bit offset space.
    Overflow {
        /// Requested start offset in the block.
        start: u64,
        /// Requested length in bytes.
        len: u32,
    },
    /// `RESUME_ACK` carried something other than [`RESUME_ACK_VALUE`].
    BadResumeAck(u32),
    /// The peer closed the return path in the middle of a message.
    Truncated {
        /// The message type, if its header had arrived.
        msg: Option<&'static str>,
        /// Bytes of the message received.
        have: usize,
        /// Bytes the message needed (just the header if that was incomplete).
        need: usize,
    },
}

impl fmt::Display for RpDecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::UnknownType(code) => {
                write!(f, "return path: invalid message type 0x{code:04x}")
            }
            Self::BadLength {
                msg,
                expected,
                found,
            } => write!(
                f,
                "return path: {msg} message with length {found}, expected {expected}"
            ),
            Self::TooShort { msg, min, found } => write!(
                f,
                "return path: {msg} message with length {found}, at least {min} needed"
            ),
            Self::TooLong { msg, max, found } => write!(
                f,
                "return path: {msg} message with length {found}, at most {max} allowed"
            ),
            Self::IdLengthMismatch {
                msg,
                id_len,
                remaining,
            } => write!(
                f,
                "return path: {msg} claims a {id_len}-byte block id but carries {remaining} bytes"
            ),
            Self::EmptyId { msg } => write!(f, "return path: {msg} with an empty block id"),
            Self::IdNotUtf8 { msg } => {
                write!(f, "return path: {msg} with a block id that is not UTF-8")
            }
            Self::EmptyRequest { start } => write!(
                f,
                "return path: page request of zero bytes at offset 0x{start:x}"
            ),
            Self::Misaligned {
                start,
                len,
                page_size,
            } => write!(
                f,
                "return path: misaligned page request, start 0x{start:x} length 0x{len:x} \
                 (page size 0x{page_size:x})"
            ),
            Self::Overflow { start, len } => write!(
                f,
                "return path: page request at 0x{start:x} length 0x{len:x} overflows 64 bits"
            ),
            Self::BadResumeAck(value) => write!(
                f,
                "return path: RESUME_ACK value {value}, expected {RESUME_ACK_VALUE}"
            ),
            Self::Truncated { msg, have, need } => write!(
                f,
                "return path closed mid-message ({}): {have} of {need} bytes received",
                msg.unwrap_or("header")
            ),
        }
    }
}

/// The page size given to [`RpDecoder::new`] is not a power of two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidPageSize(pub u32);

impl fmt::Display for InvalidPageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "return path page size {} is not a power of two",
            self.0
        )
    }
}

/// A message whose header passed validation and whose payload is arriving.
#[derive(Clone, Copy, Debug)]
struct Pending {
    kind: RpMessageType,
    len: usize,
}

/// Turns return-path bytes into validated [`RpMessage`]s.
///
/// Owns its buffer (messages are at most [`RP_MAX_MESSAGE`] bytes), so the
/// caller needs no storage. Create one per return-path connection: after
/// an error it stays failed, because a framing error leaves no way to find
/// the next message boundary.
#[derive(Clone, Debug)]
pub struct RpDecoder {
    head: [u8; RP_HEADER_LEN],
    head_filled: usize,
    payload: [u8; RP_MAX_PAYLOAD],
    payload_filled: usize,
    pending: Option<Pending>,
    page_size: u32,
    failed: Option<RpDecodeError>,
}

impl RpDecoder {
    /// A decoder that checks page requests against `page_size` (the
    /// source's page size; QEMU insists both sides use the same one).
    pub fn new(page_size: u32) -> Result<Self, InvalidPageSize> {
        if !page_size.is_power_of_two() {
            return Err(InvalidPageSize(page_size));
        }
        Ok(Self {
            head: [0; RP_HEADER_LEN],
            head_filled: 0,
            payload: [0; RP_MAX_PAYLOAD],
            payload_filled: 0,
            pending: None,
            page_size,
            failed: None,
        })
    }

    /// The page size requests are checked against.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Consumes a prefix of `input` and returns how many bytes it took and
    /// the message they completed, if any.
    ///
    /// At most one message is returned per call, so callers loop while
    /// bytes remain. Works with any split of the stream, down to one byte
    /// per call. A message that arrives whole in one `input` borrows it
    /// without copying; a message split across calls borrows the decoder.
    /// Bad headers are rejected as soon as the four header bytes are in,
    /// before any payload is buffered.
    pub fn decode<'a>(
        &'a mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<RpMessage<'a>>), RpDecodeError> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        if self.head_filled == 0 {
            if let Ok((header, rest)) = RpHeader::read_from_prefix(input) {
                let pending = self.check(check_header(header))?;
                if let Some((payload, _)) = rest.split_at_checked(pending.len) {
                    let msg = self.check(parse_payload(pending.kind, payload, self.page_size))?;
                    return Ok((RP_HEADER_LEN + pending.len, Some(msg)));
                }
            }
        }
        self.decode_buffered(input)
    }

    /// The slow path of [`RpDecoder::decode`]: accumulate into the buffer.
    fn decode_buffered<'a>(
        &'a mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<RpMessage<'a>>), RpDecodeError> {
        let mut used = 0;
        let pending = match self.pending {
            Some(pending) => pending,
            None => {
                used += fill(&mut self.head, &mut self.head_filled, RP_HEADER_LEN, input);
                if self.head_filled < RP_HEADER_LEN {
                    return Ok((used, None));
                }
                let header: RpHeader = zerocopy::transmute!(self.head);
                let pending = self.check(check_header(header))?;
                self.pending = Some(pending);
                pending
            }
        };
        let rest = input.get(used..).unwrap_or_default();
        used += fill(&mut self.payload, &mut self.payload_filled, pending.len, rest);
        if self.payload_filled < pending.len {
            return Ok((used, None));
        }
        self.head_filled = 0;
        self.payload_filled = 0;
        self.pending = None;
        // Split the borrow: the message borrows `payload` while a failure
        // is recorded in `failed`.
        let Self {
            payload,
            failed,
            page_size,
            ..
        } = self;
        let result = match payload.get(..pending.len) {
            Some(bytes) => parse_payload(pending.kind, bytes, *page_size),
            None => Err(length_error(pending.kind, pending.len)),
        };
        match result {
            Ok(msg) => Ok((used, Some(msg))),
            Err(err) => {
                *failed = Some(err);
                Err(err)
            }
        }
    }

    /// Records an error so that the decoder stays failed.
    fn check<T>(&mut self, result: Result<T, RpDecodeError>) -> Result<T, RpDecodeError> {
        if let Err(err) = result {
            self.failed = Some(err);
        }
        result
    }

    /// Call when the peer closed the return path: reports a message cut
    /// short (or the error the decoder already failed with).
    pub fn finish(&self) -> Result<(), RpDecodeError> {
        if let Some(err) = self.failed {
            return Err(err);
        }
        match self.pending {
            None if self.head_filled == 0 => Ok(()),
            None => Err(RpDecodeError::Truncated {
                msg: None,
                have: self.head_filled,
                need: RP_HEADER_LEN,
            }),
            Some(pending) => Err(RpDecodeError::Truncated {
                msg: Some(pending.kind.name()),
                have: RP_HEADER_LEN + self.payload_filled,
                need: RP_HEADER_LEN + pending.len,
            }),
        }
    }
}

/// Copies from `src` into `dst[*filled..want]`, returning the bytes copied.
/// Iterator-based so no length can index out of bounds.
fn fill(dst: &mut [u8], filled: &mut usize, want: usize, src: &[u8]) -> usize {
    let copied = dst
        .iter_mut()
        .take(want)
        .skip(*filled)
        .zip(src)
        .map(|(d, s)| *d = *s)
        .count();
    *filled += copied;
    copied
}

/// The error for a payload of `found` bytes that breaks `kind`'s length rule.
fn length_error(kind: RpMessageType, found: usize) -> RpDecodeError {
    let msg = kind.name();
    let found = u16::try_from(found).unwrap_or(u16::MAX);
    match kind.len_rule() {
        LenRule::Fixed(expected) => RpDecodeError::BadLength {
            msg,
            expected,
            found,
        },
        LenRule::Variable { min, .. } if found < min => RpDecodeError::TooShort { msg, min, found },
        LenRule::Variable { max, .. } => RpDecodeError::TooLong { msg, max, found },
    }
}

/// Checks a payload length against `kind`'s rule (QEMU's `rp_cmd_args`).
fn check_len(kind: RpMessageType, len: usize) -> Result<(), RpDecodeError> {
    let ok = match kind.len_rule() {
        LenRule::Fixed(expected) => len == usize::from(expected),
        LenRule::Variable { min, max } => (usize::from(min)..=usize::from(max)).contains(&len),
    };
    if ok {
        Ok(())
    } else {
        Err(length_error(kind, len))
    }
}

/// Validates a header: known type, length allowed for it.
fn check_header(header: RpHeader) -> Result<Pending, RpDecodeError> {
    let code = header.kind.get();
    let kind = RpMessageType::from_code(code).ok_or(RpDecodeError::UnknownType(code))?;
    let len = usize::from(header.len.get());
    check_len(kind, len)?;
    Ok(Pending { kind, len })
}

/// Validates a complete payload of `kind` and builds the message.
fn parse_payload(
    kind: RpMessageType,
    payload: &[u8],
    page_size: u32,
) -> Result<RpMessage<'_>, RpDecodeError> {
    check_len(kind, payload.len())?;
    // What a size mismatch means here; `check_len` has ruled it out already.
    let bad_len = length_error(kind, payload.len());
    let be32 = || {
        Be32Payload::read_from_bytes(payload)
            .map(|p| p.value.get())
            .map_err(|_| bad_len)
    };
    Ok(match kind {
        RpMessageType::Shut => RpMessage::Shut {
            error: be32()? != 0,
        },
        RpMessageType::Pong => {
            RpMessage::Pong(be32()?)
        }
        RpMessageType::ResumeAck => {
            let value = be32()?;
            if value != RESUME_ACK_VALUE {
                return Err(RpDecodeError::BadResumeAck(value));
            }
            RpMessage::ResumeAck
        }
        RpMessageType::SwitchoverAck => RpMessage::SwitchoverAck,
        RpMessageType::ReqPages => {
            let range = PageRange::read_from_bytes(payload).map_err(|_| bad_len)?;
            let (start, len) = check_range(range, page_size)?;
            RpMessage::ReqPages { start, len }
        }
        RpMessageType::ReqPagesId => {
            let (range, id) = PageRange::read_from_prefix(payload).map_err(|_| bad_len)?;
            // QEMU checks the id framing before the range; so do we.
            let block = parse_id(kind, id)?;
            let (start, len) = check_range(range, page_size)?;
            RpMessage::ReqPagesId { block, start, len }
        }
        RpMessageType::RecvBitmap => RpMessage::RecvBitmap {
            block: parse_id(kind, payload)?,
        },
    })
}

/// Parses a length-prefixed block id that must fill `bytes` exactly.
fn parse_id(kind: RpMessageType, bytes: &[u8]) -> Result<&str, RpDecodeError> {
    let msg = kind.name();
    let (&id_len, id) = bytes
        .split_first()
        .ok_or(RpDecodeError::TooShort {
            msg,
            min: 1,
            found: 0,
        })?;
    if usize::from(id_len) != id.len() {
        return Err(RpDecodeError::IdLengthMismatch {
            msg,
            id_len,
            remaining: id.len(),
        });
    }
    if id.is_empty() {
        return Err(RpDecodeError::EmptyId { msg });
    }
    core::str::from_utf8(id).map_err(|_| RpDecodeError::IdNotUtf8 { msg })
}

/// Checks a page request: non-empty, whole pages, end representable.
fn check_range(range: PageRange, page_size: u32) -> Result<(u64, u32), RpDecodeError> {
    let start = range.start.get();
    let len = range.len.get();
    if len == 0 {
        return Err(RpDecodeError::EmptyRequest { start });
    }
    let mask = u64::from(page_size).saturating_sub(1);
    if start & mask != 0 || u64::from(len) & mask != 0 {
        return Err(RpDecodeError::Misaligned {
            start,
            len,
            page_size,
        });
    }
    if start.checked_add(u64::from(len)).is_none() {
        return Err(RpDecodeError::Overflow { start, len });
    }
    Ok((start, len))
}

// The decoder's two buffers together hold exactly the largest message.
const _: () = assert!(RP_HEADER_LEN + RP_MAX_PAYLOAD == RP_MAX_MESSAGE);
