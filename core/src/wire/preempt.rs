//! The postcopy preempt channel: a second connection that carries only the
//! pages the destination asked for (QEMU's `postcopy-preempt`), so that a
//! faulting vCPU never waits behind background pages already queued in the
//! main stream's socket.
//!
//! The channel opens with a 16-byte [`PreemptHello`] (magic `"LMPC"`,
//! version, the migration id the main stream announced in
//! [`Command::PostcopyPreempt`](super::Command)), then carries Pages
//! records framed exactly as on the main stream, and nothing else: no
//! stream header, no other record kind.
//!
//! The main stream still carries every page; the channel only carries
//! copies of requested pages ahead of it. In postcopy the source's memory
//! no longer changes, so both copies are equal, but the destination's
//! guest runs and may have written the page since the first copy landed:
//! the destination places whichever copy arrives first and drops the
//! other (its received-page bitmap decides, as QEMU places each page once
//! in postcopy).

use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::cursor::Writer;
use super::{DecodeError, EncodeError};

/// First four bytes of the preempt channel: neither `"LMIG"` nor
/// `"LMFD"`, so a connection taken for the wrong one is refused at once.
pub const PREEMPT_MAGIC: [u8; 4] = *b"LMPC";
/// The preempt channel format version this code reads and writes.
pub const PREEMPT_VERSION: u32 = 1;
/// Bytes of [`PreemptHello`].
pub const PREEMPT_HELLO_LEN: usize = 16;

/// The 16-byte first message of the preempt channel (packet level).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct PreemptHelloRaw {
    magic: [u8; 4],
    version: U32,
    migration_id: U64,
}

const _: () = assert!(size_of::<PreemptHelloRaw>() == PREEMPT_HELLO_LEN);

/// A validated preempt channel hello: which migration it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreemptHello {
    /// The migration id of [`Command::PostcopyPreempt`](super::Command).
    pub migration_id: u64,
}

impl PreemptHello {
    /// Writes the hello into `out`; returns [`PREEMPT_HELLO_LEN`].
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let mut w = Writer::new(out, PREEMPT_HELLO_LEN)?;
        w.put(&PreemptHelloRaw {
            magic: PREEMPT_MAGIC,
            version: U32::new(PREEMPT_VERSION),
            migration_id: U64::new(self.migration_id),
        })?;
        Ok(w.written())
    }

    /// Parses and validates a hello (exactly [`PREEMPT_HELLO_LEN`] bytes).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let raw = PreemptHelloRaw::read_from_bytes(bytes).map_err(|_| DecodeError::BadLength {
            what: "preempt hello",
            expected: PREEMPT_HELLO_LEN,
            found: bytes.len(),
        })?;
        if raw.magic != PREEMPT_MAGIC {
            return Err(DecodeError::BadMagic { found: raw.magic });
        }
        if raw.version.get() != PREEMPT_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                found: raw.version.get(),
                supported: PREEMPT_VERSION,
            });
        }
        Ok(Self {
            migration_id: raw.migration_id.get(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_refuses_foreign_bytes() {
        let hello = PreemptHello {
            migration_id: 0x0102_0304_0506_0708,
        };
        let mut out = [0; PREEMPT_HELLO_LEN];
        assert_eq!(hello.encode(&mut out), Ok(PREEMPT_HELLO_LEN));
        assert_eq!(PreemptHello::decode(&out), Ok(hello));
        assert!(matches!(
            PreemptHello::decode(&out[..15]),
            Err(DecodeError::BadLength {
                expected: 16,
                found: 15,
                ..
            })
        ));
        let mut main = out;
        main[..4].copy_from_slice(b"LMIG");
        assert_eq!(
            PreemptHello::decode(&main),
            Err(DecodeError::BadMagic { found: *b"LMIG" })
        );
        let mut newer = out;
        newer[7] = 2;
        assert_eq!(
            PreemptHello::decode(&newer),
            Err(DecodeError::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        );
        assert!(hello.encode(&mut [0; 8]).is_err());
    }
}
