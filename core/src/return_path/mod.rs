//! The return path: messages the destination sends back to the source.
//!
//! A migration stream flows source -> destination; the return path is the
//! narrow channel in the other direction. The destination uses it to end the
//! conversation ([`RpMessage::Shut`]), answer pings ([`RpMessage::Pong`]),
//! ask for pages it faulted on during postcopy ([`RpMessage::ReqPagesId`],
//! [`RpMessage::ReqPages`]), drive postcopy recovery
//! ([`RpMessage::RecvBitmap`] and the bitmap that follows it,
//! [`RpMessage::ResumeAck`]), allow the
//! switchover ([`RpMessage::SwitchoverAck`]) and, livemig extensions,
//! report a complete stream loaded and waiting for the source's commit
//! ([`RpMessage::Loaded`]) or say that its operator interrupted it
//! ([`RpMessage::Interrupted`]).
//!
//! The framing is byte-compatible with QEMU's so that either side can be
//! QEMU: a big-endian `u16` type, a big-endian `u16` payload length, then the
//! payload. `docs/wire-format.md` (part 2) lays out every
//! byte.
//!
//! The module has the smoltcp split: [`message`] holds the fixed layouts
//! (zerocopy structs, the "packet" level) and the validated [`RpMessage`]
//! (the "representation"), [`decoder`] turns a byte stream arriving in
//! arbitrary pieces into validated messages without a heap.

pub mod decoder;
pub mod message;

pub use decoder::{InvalidPageSize, RpDecodeError, RpDecoder};
pub use message::{RpEncodeError, RpMessage, SignalName};

/// Bytes in every message header: `u16` type and `u16` payload length, both
/// big-endian. Exported so transports can size their reads.
pub const RP_HEADER_LEN: usize = 4;

/// Longest block id a page request or bitmap request can carry: the id
/// length travels in one byte, so QEMU caps ids at 255 bytes.
pub const RP_MAX_ID_LEN: usize = 255;

/// Bytes in the fixed prefix of a page request: `be64` start, `be32` length.
pub(crate) const PAGE_RANGE_LEN: usize = 12;

/// Payload of `DIGEST_QUERY`: be16 block, be64 first page, be64 count.
pub(crate) const DIGEST_QUERY_LEN: usize = 18;

/// Payload of `DIGEST_MISMATCH` and `RESEND_PAGE`: be16 block, be64 page.
pub(crate) const BLOCK_PAGE_LEN: usize = 10;

/// Largest payload of any valid message: `REQ_PAGES_ID` with a 255-byte id
/// (12 bytes of range, one length byte, the id).
pub const RP_MAX_PAYLOAD: usize = PAGE_RANGE_LEN + 1 + RP_MAX_ID_LEN;

/// Largest encoded message (header plus [`RP_MAX_PAYLOAD`]). The decoder's
/// internal buffer has exactly this size, and a sender never needs more.
pub const RP_MAX_MESSAGE: usize = RP_HEADER_LEN + RP_MAX_PAYLOAD;

/// The mark QEMU writes after a received-pages bitmap
/// (`RAMBLOCK_RECV_BITMAP_ENDING`): a bitmap not followed by it was cut
/// or is not a bitmap.
pub const RECV_BITMAP_END_MARK: u64 = 0x0123_4567_89ab_cdef;

/// Bytes of the be64 size in front of a received-pages bitmap and of the
/// be64 end mark behind it.
pub const RECV_BITMAP_FIELD_LEN: usize = 8;

/// Bytes of the received-pages bitmap of a block of `pages` pages, as
/// QEMU's `ramblock_recv_bitmap_send` sizes it: one bit a page, rounded up
/// to whole 64-bit words.
pub const fn recv_bitmap_len(pages: u64) -> u64 {
    pages.div_ceil(64) * 8
}

/// The only value QEMU accepts in a `RESUME_ACK` (its
/// `MIGRATION_RESUME_ACK_VALUE`); anything else means the peers disagree
/// about the recovery handshake.
pub const RESUME_ACK_VALUE: u32 = 1;

/// The wire type codes of the return path: QEMU's 1..=7, numbered as QEMU
/// numbers them, and livemig's extensions from [`LIVEMIG_TYPE_BASE`] on.
///
/// Code 0 is QEMU's `MIG_RP_MSG_INVALID`, 8 and above are beyond its
/// `MIG_RP_MSG_MAX`, and livemig's own codes start far above that so a
/// future QEMU type can never collide with them; no other code has a
/// variant, so holding an `RpMessageType` means holding a valid code. A
/// QEMU source refuses livemig's types as invalid, which fails its
/// migration, as they mean to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum RpMessageType {
    /// `MIG_RP_MSG_SHUT`: the destination will send nothing more.
    Shut = 1,
    /// `MIG_RP_MSG_PONG`: answer to a ping on the main stream.
    Pong = 2,
    /// `MIG_RP_MSG_REQ_PAGES_ID`: page request naming its RAM block.
    ReqPagesId = 3,
    /// `MIG_RP_MSG_REQ_PAGES`: page request in the previously named block.
    ReqPages = 4,
    /// `MIG_RP_MSG_RECV_BITMAP`: the received-pages bitmap of a block follows.
    RecvBitmap = 5,
    /// `MIG_RP_MSG_RESUME_ACK`: the destination is ready to resume postcopy.
    ResumeAck = 6,
    /// `MIG_RP_MSG_SWITCHOVER_ACK`: the destination allows the switchover.
    SwitchoverAck = 7,
    /// livemig extension: the whole stream is loaded and validated, the
    /// guest is paused, and the destination waits for the source's Commit.
    Loaded = LIVEMIG_TYPE_BASE,
    /// livemig extension: the destination was interrupted (a signal) and
    /// stops loading; `be32` signal number.
    Interrupted = LIVEMIG_TYPE_BASE + 1,
    /// livemig's own: the destination, locating a page whose digest terms
    /// differ, asks for the sums of the parts of a range.
    DigestQuery = LIVEMIG_TYPE_BASE + 2,
    /// livemig's own: the destination names the first page whose digest
    /// terms differ (before its SHUT).
    DigestMismatch = LIVEMIG_TYPE_BASE + 3,
    /// livemig's own: in postcopy, a page's copy failed its term at the
    /// destination; the source sends the page again.
    ResendPage = LIVEMIG_TYPE_BASE + 4,
}

/// The first return-path type code of livemig's own messages: far beyond
/// QEMU's `MIG_RP_MSG_MAX` (8), so QEMU's messages keep their codes and a
/// QEMU peer rejects ours as an invalid type instead of misreading them.
pub const LIVEMIG_TYPE_BASE: u16 = 0x0100;

/// How long a message's payload may be: QEMU's `rp_cmd_args` table records a
/// fixed length or "variable" (-1); for variable types we also record the
/// structural minimum and the largest valid payload, so a decoder can reject
/// a bad length from the header alone, before buffering the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LenRule {
    /// The payload has exactly this many bytes.
    Fixed(u16),
    /// The payload has between `min` and `max` bytes; its contents say how
    /// many exactly.
    Variable {
        /// Fixed fields plus the id length byte.
        min: u16,
        /// Fixed fields plus the longest id.
        max: u16,
    },
}

impl RpMessageType {
    /// Every valid type, in code order (for tests and table-driven tools).
    pub const ALL: [RpMessageType; 12] = [
        Self::Shut,
        Self::Pong,
        Self::ReqPagesId,
        Self::ReqPages,
        Self::RecvBitmap,
        Self::ResumeAck,
        Self::SwitchoverAck,
        Self::Loaded,
        Self::Interrupted,
        Self::DigestQuery,
        Self::DigestMismatch,
        Self::ResendPage,
    ];

    /// The type for a wire code, or `None` for codes no type has (0, QEMU's
    /// invalid code; 8 up to livemig's extensions; unused codes after them).
    pub const fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            1 => Self::Shut,
            2 => Self::Pong,
            3 => Self::ReqPagesId,
            4 => Self::ReqPages,
            5 => Self::RecvBitmap,
            6 => Self::ResumeAck,
            7 => Self::SwitchoverAck,
            LIVEMIG_TYPE_BASE => Self::Loaded,
            0x0101 => Self::Interrupted,
            0x0102 => Self::DigestQuery,
            0x0103 => Self::DigestMismatch,
            0x0104 => Self::ResendPage,
            _ => return None,
        })
    }

    /// The wire code.
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// QEMU's name for the type (as in its `rp_cmd_args` table), used in
    /// error messages so they can be matched against QEMU's logs; livemig's
    /// extensions have names in the same style.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Shut => "SHUT",
            Self::Pong => "PONG",
            Self::ReqPagesId => "REQ_PAGES_ID",
            Self::ReqPages => "REQ_PAGES",
            Self::RecvBitmap => "RECV_BITMAP",
            Self::ResumeAck => "RESUME_ACK",
            Self::SwitchoverAck => "SWITCHOVER_ACK",
            Self::Loaded => "LOADED",
            Self::Interrupted => "INTERRUPTED",
            Self::DigestQuery => "DIGEST_QUERY",
            Self::DigestMismatch => "DIGEST_MISMATCH",
            Self::ResendPage => "RESEND_PAGE",
        }
    }

    /// The payload length rule, QEMU's `rp_cmd_args` with bounds filled in.
    pub const fn len_rule(self) -> LenRule {
        const RANGE: u16 = PAGE_RANGE_LEN as u16;
        const MAX_ID: u16 = RP_MAX_ID_LEN as u16;
        match self {
            Self::Shut | Self::Pong | Self::ResumeAck | Self::Interrupted => LenRule::Fixed(4),
            Self::ReqPages => LenRule::Fixed(RANGE),
            Self::SwitchoverAck | Self::Loaded => LenRule::Fixed(0),
            Self::DigestQuery => LenRule::Fixed(DIGEST_QUERY_LEN as u16),
            Self::DigestMismatch | Self::ResendPage => LenRule::Fixed(BLOCK_PAGE_LEN as u16),
            Self::ReqPagesId => LenRule::Variable {
                min: RANGE + 1,
                max: RANGE + 1 + MAX_ID,
            },
            Self::RecvBitmap => LenRule::Variable {
                min: 1,
                max: 1 + MAX_ID,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_invalid_codes_have_no_type() {
        for ty in RpMessageType::ALL {
            assert_eq!(RpMessageType::from_code(ty.code()), Some(ty));
        }
        assert_eq!(RpMessageType::from_code(0x100), Some(RpMessageType::Loaded));
        assert_eq!(RpMessageType::Interrupted.code(), 0x101);
        for code in [0u16, 8, 9, 0xff, 0x105, 0x8001, 0xffff] {
            assert_eq!(RpMessageType::from_code(code), None);
        }
    }

    #[test]
    fn len_rules_match_qemu_rp_cmd_args() {
        use RpMessageType::*;
        assert_eq!(Shut.len_rule(), LenRule::Fixed(4));
        assert_eq!(Pong.len_rule(), LenRule::Fixed(4));
        assert_eq!(ReqPages.len_rule(), LenRule::Fixed(12));
        assert_eq!(ResumeAck.len_rule(), LenRule::Fixed(4));
        assert_eq!(SwitchoverAck.len_rule(), LenRule::Fixed(0));
        assert_eq!(Loaded.len_rule(), LenRule::Fixed(0));
        assert_eq!(
            ReqPagesId.len_rule(),
            LenRule::Variable { min: 13, max: 268 }
        );
        assert_eq!(
            RecvBitmap.len_rule(),
            LenRule::Variable { min: 1, max: 256 }
        );
        assert_eq!(RP_MAX_MESSAGE, 272);
        // QEMU's source reads payloads into a 512-byte buffer; every valid
        // message fits it.
        const { assert!(RP_MAX_PAYLOAD <= 512) };
    }
}
