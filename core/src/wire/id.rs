//! Names of RAM blocks and devices on the wire.

use core::fmt;

use super::{DecodeError, IdError, MAX_ID_LEN};

/// A validated RAM block or device id: UTF-8, 1..=[`MAX_ID_LEN`] bytes.
///
/// The wire carries the length in one byte and both ends look blocks and
/// devices up by this name, so an empty or overlong id is rejected when the
/// value is built rather than when it is sent.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId<'a>(&'a str);

/// Device ids follow the same rules as block ids.
pub type DeviceId<'a> = BlockId<'a>;

impl<'a> BlockId<'a> {
    /// Validates `id` (1..=255 bytes).
    pub fn new(id: &'a str) -> Result<Self, IdError> {
        match id.len() {
            0 => Err(IdError::Empty),
            len if len > MAX_ID_LEN => Err(IdError::TooLong { len }),
            _ => Ok(Self(id)),
        }
    }

    /// Validates id bytes read from the wire; `what` names the owner in errors.
    /// The length came from a `u8`, so only emptiness and UTF-8 need checking.
    pub(crate) fn from_wire(bytes: &'a [u8], what: &'static str) -> Result<Self, DecodeError> {
        let s = core::str::from_utf8(bytes).map_err(|_| DecodeError::IdNotUtf8 { what })?;
        Self::new(s).map_err(|_| DecodeError::EmptyId { what })
    }

    /// The id as text.
    pub fn as_str(&self) -> &'a str {
        self.0
    }

    /// Bytes this id occupies on the wire (length byte + text).
    pub(crate) fn wire_len(&self) -> usize {
        1 + self.0.len()
    }
}

impl fmt::Debug for BlockId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0, f)
    }
}

impl fmt::Display for BlockId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths() {
        assert_eq!(BlockId::new(""), Err(IdError::Empty));
        let long = "x".repeat(256);
        assert_eq!(BlockId::new(&long), Err(IdError::TooLong { len: 256 }));
        let max = "y".repeat(255);
        assert_eq!(BlockId::new(&max).map(|i| i.wire_len()), Ok(256));
    }

    #[test]
    fn wire_checks() {
        assert_eq!(
            BlockId::from_wire(b"", "block"),
            Err(DecodeError::EmptyId { what: "block" })
        );
        assert_eq!(
            BlockId::from_wire(&[0xff, 0xfe], "device"),
            Err(DecodeError::IdNotUtf8 { what: "device" })
        );
        assert_eq!(
            BlockId::from_wire(b"pc.ram", "block").map(|i| i.as_str()),
            Ok("pc.ram")
        );
    }
}
