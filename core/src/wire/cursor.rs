//! Bounds-checked reading and writing of byte buffers.
//!
//! All parsing goes through [`Reader`] and all emitting through [`Writer`], so
//! no codec code indexes a slice directly: a short input becomes
//! [`DecodeError::Truncated`], a short output [`EncodeError::BufferTooSmall`],
//! never a panic.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{BlockId, DecodeError, EncodeError, IdError};

/// A read position in a record body.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads `buf` from its start.
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { rest: buf }
    }

    /// The bytes not read yet.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.rest
    }

    /// Takes the next `n` bytes, or fails naming the field `what`.
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let (head, tail) = self
            .rest
            .split_at_checked(n)
            .ok_or(DecodeError::Truncated { what })?;
        self.rest = tail;
        Ok(head)
    }

    /// Reads a fixed-layout value (a zerocopy packet struct).
    pub(crate) fn read<T: FromBytes + KnownLayout + Immutable>(
        &mut self,
        what: &'static str,
    ) -> Result<T, DecodeError> {
        let (value, tail) =
            T::read_from_prefix(self.rest).map_err(|_| DecodeError::Truncated { what })?;
        self.rest = tail;
        Ok(value)
    }

    /// Reads one byte.
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.read::<u8>(what)
    }

    /// Reads a `u8 id_len` + UTF-8 id of a block or device (`what`).
    pub(crate) fn id(&mut self, what: &'static str) -> Result<BlockId<'a>, DecodeError> {
        let len = usize::from(self.u8(what)?);
        let bytes = self.take(len, what)?;
        BlockId::from_wire(bytes, what)
    }

    /// Fails unless every byte was read; `what` says where the extra bytes are.
    pub(crate) fn finish(self, what: &'static str) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingData {
                what,
                len: self.rest.len(),
            })
        }
    }
}

/// A write position in an output buffer.
pub(crate) struct Writer<'o> {
    out: &'o mut [u8],
    pos: usize,
}

impl<'o> Writer<'o> {
    /// Writes into `out` after checking that it can hold `needed` bytes, so a
    /// short buffer is reported with the full size the caller must provide.
    pub(crate) fn new(out: &'o mut [u8], needed: usize) -> Result<Self, EncodeError> {
        if out.len() < needed {
            return Err(EncodeError::BufferTooSmall {
                needed,
                available: out.len(),
            });
        }
        Ok(Self { out, pos: 0 })
    }

    /// Appends raw bytes.
    pub(crate) fn bytes(&mut self, bytes: &[u8]) -> Result<(), EncodeError> {
        let available = self.out.len();
        let end = self.pos.saturating_add(bytes.len());
        let dst = self
            .out
            .get_mut(self.pos..end)
            .ok_or(EncodeError::BufferTooSmall {
                needed: end,
                available,
            })?;
        dst.copy_from_slice(bytes);
        self.pos = end;
        Ok(())
    }

    /// Appends a fixed-layout value (a zerocopy packet struct).
    pub(crate) fn put<T: IntoBytes + Immutable>(&mut self, value: &T) -> Result<(), EncodeError> {
        self.bytes(value.as_bytes())
    }

    /// Appends a `u8 id_len` + id.
    pub(crate) fn id(&mut self, id: BlockId<'_>) -> Result<(), EncodeError> {
        // `BlockId` guarantees 1..=255 bytes, so the length fits a byte.
        let len = u8::try_from(id.as_str().len()).map_err(|_| IdError::TooLong {
            len: id.as_str().len(),
        })?;
        self.bytes(&[len])?;
        self.bytes(id.as_str().as_bytes())
    }

    /// Bytes written so far.
    pub(crate) fn written(&self) -> usize {
        self.pos
    }
}
