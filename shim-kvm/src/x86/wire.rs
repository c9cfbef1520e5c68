//! The container all three encodings share.
//!
//! Layout (little-endian): magic `u32`, version `u16`, section count
//! `u16`, body length `u32`, then `count` sections of `tag u32, len u32,
//! len bytes` that fill the body exactly. The parser checks each of these
//! before it hands a section out; what a section holds is its owner's to
//! check.

use zerocopy::FromBytes;

use super::error::{Blob, StateError};

/// Bytes before the first section.
pub(super) const HEADER_LEN: usize = 12;

/// Builds one blob, section by section.
pub(super) struct Writer {
    magic: u32,
    version: u16,
    count: u16,
    body: Vec<u8>,
}

impl Writer {
    pub(super) fn new(magic: u32, version: u16) -> Writer {
        Writer {
            magic,
            version,
            count: 0,
            body: Vec::new(),
        }
    }

    /// Appends a section. Sections are small fixed structures and lists
    /// bounded by KVM's limits, far below `u32::MAX` bytes, and an encoding
    /// has fewer than a dozen of them.
    pub(super) fn section(&mut self, tag: u32, bytes: &[u8]) {
        self.body.extend_from_slice(&tag.to_le_bytes());
        self.body
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.body.extend_from_slice(bytes);
        self.count += 1;
    }

    /// Appends the finished blob to `out`.
    pub(super) fn finish(self, out: &mut Vec<u8>) {
        out.reserve(HEADER_LEN + self.body.len());
        out.extend_from_slice(&self.magic.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.body);
    }
}

/// Splits a blob of kind `blob` into its sections, checking the header
/// and every length. Duplicates and unknown tags are the caller's to
/// judge (it knows which tags exist).
pub(super) fn sections(
    blob: Blob,
    magic: u32,
    version: u16,
    bytes: &[u8],
) -> Result<Vec<(u32, &[u8])>, StateError> {
    let mut r = Reader::new(blob, bytes);
    let found = r.u32()?;
    if found != magic {
        return Err(StateError::BadMagic { blob, found });
    }
    let found = r.u16()?;
    if found != version {
        return Err(StateError::BadVersion {
            blob,
            found,
            supported: version,
        });
    }
    let count = r.u16()?;
    let declared = r.u32()? as usize;
    let actual = bytes.len() - HEADER_LEN;
    if declared != actual {
        return Err(StateError::LengthMismatch {
            blob,
            declared,
            actual,
        });
    }
    let mut out = Vec::new();
    for _ in 0..count {
        let tag = r.u32()?;
        let len = r.u32()? as usize;
        out.push((tag, r.take(len)?));
    }
    if r.pos != bytes.len() {
        return Err(StateError::LengthMismatch {
            blob,
            declared,
            actual: r.pos - HEADER_LEN,
        });
    }
    Ok(out)
}

/// A bounds-checked cursor; every read past the end is
/// [`StateError::Truncated`].
pub(super) struct Reader<'a> {
    blob: Blob,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(blob: Blob, bytes: &'a [u8]) -> Reader<'a> {
        Reader {
            blob,
            bytes,
            pos: 0,
        }
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let rest = &self.bytes[self.pos..];
        if n > rest.len() {
            return Err(StateError::Truncated {
                blob: self.blob,
                needed: self.pos.saturating_add(n),
                have: self.bytes.len(),
            });
        }
        self.pos += n;
        Ok(&rest[..n])
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(super) fn u16(&mut self) -> Result<u16, StateError> {
        self.array().map(u16::from_le_bytes)
    }

    pub(super) fn u32(&mut self) -> Result<u32, StateError> {
        self.array().map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self) -> Result<u64, StateError> {
        self.array().map(u64::from_le_bytes)
    }
}

/// Reads a kvm-bindings structure from a section that must be exactly its
/// size.
pub(super) fn pod<T: FromBytes>(blob: Blob, tag: u32, bytes: &[u8]) -> Result<T, StateError> {
    T::read_from_bytes(bytes).map_err(|_| StateError::BadSectionLength {
        blob,
        tag,
        len: bytes.len(),
    })
}

/// Reads a section holding a list of `T`, at most `max` of them.
pub(super) fn pod_list<T: FromBytes>(
    blob: Blob,
    tag: u32,
    bytes: &[u8],
    what: &'static str,
    max: usize,
) -> Result<Vec<T>, StateError> {
    let size = size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        return Err(StateError::BadSectionLength {
            blob,
            tag,
            len: bytes.len(),
        });
    }
    let count = bytes.len() / size;
    if count > max {
        return Err(StateError::TooMany { what, count, max });
    }
    bytes
        .chunks_exact(size)
        .map(|c| pod(blob, tag, c))
        .collect()
}

/// Stores a section's value, refusing a second one.
pub(super) fn set_once<T>(
    slot: &mut Option<T>,
    blob: Blob,
    tag: u32,
    value: T,
) -> Result<(), StateError> {
    if slot.is_some() {
        return Err(StateError::DuplicateSection { blob, tag });
    }
    *slot = Some(value);
    Ok(())
}

/// A required section's value.
pub(super) fn required<T>(slot: Option<T>, blob: Blob, tag: u32) -> Result<T, StateError> {
    slot.ok_or(StateError::MissingSection { blob, tag })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    const MAGIC: u32 = 0x1234_5678;

    fn blob() -> Vec<u8> {
        let mut w = Writer::new(MAGIC, 3);
        w.section(1, b"abc");
        w.section(2, b"");
        w.section(7, &[9; 20]);
        let mut out = Vec::new();
        w.finish(&mut out);
        out
    }

    /// A blob of `sections` (tag, bytes), in order, under `magic` and
    /// `version`: how the decoder tests build blobs the encoders never
    /// write.
    pub(in crate::x86) fn blob_of(magic: u32, version: u16, sections: &[(u32, &[u8])]) -> Vec<u8> {
        let mut w = Writer::new(magic, version);
        for (tag, bytes) in sections {
            w.section(*tag, bytes);
        }
        let mut out = Vec::new();
        w.finish(&mut out);
        out
    }

    /// Asserts that `decode` rejects every proper prefix of `blob` and
    /// every one-byte change of it without panicking (a change may still
    /// decode: a register value is any value).
    pub(in crate::x86) fn rejects_prefixes_survives_flips<T>(
        blob: &[u8],
        decode: impl Fn(&[u8]) -> Result<T, StateError>,
    ) {
        for len in 0..blob.len() {
            assert!(decode(&blob[..len]).is_err(), "prefix of {len} bytes");
        }
        let mut b = blob.to_vec();
        for at in 0..b.len() {
            for x in [0x01, 0x80, 0xff] {
                b[at] ^= x;
                let _ = decode(&b);
                b[at] ^= x;
            }
        }
    }

    #[test]
    fn sections_come_back_in_order() {
        let b = blob();
        let s = sections(Blob::VmState, MAGIC, 3, &b).unwrap();
        assert_eq!(
            s,
            vec![(1, &b"abc"[..]), (2, &b""[..]), (7, &[9u8; 20][..])]
        );
    }

    #[test]
    fn header_errors_are_typed() {
        let b = blob();
        let check = |b: &[u8]| sections(Blob::CpuModel, MAGIC, 3, b).unwrap_err();
        assert_eq!(
            check(&b[..5]),
            StateError::Truncated {
                blob: Blob::CpuModel,
                needed: 6,
                have: 5
            }
        );
        let mut x = b.clone();
        x[0] ^= 1;
        assert!(matches!(check(&x), StateError::BadMagic { .. }));
        let mut x = b.clone();
        x[4] = 4;
        assert_eq!(
            check(&x),
            StateError::BadVersion {
                blob: Blob::CpuModel,
                found: 4,
                supported: 3
            }
        );
        let mut x = b.clone();
        x.push(0);
        assert!(matches!(check(&x), StateError::LengthMismatch { .. }));
        // One section fewer than there are leaves bytes over.
        let mut x = b.clone();
        x[6] = 2;
        assert!(matches!(check(&x), StateError::LengthMismatch { .. }));
        // One more than there are runs off the end.
        let mut x = b.clone();
        x[6] = 4;
        assert!(matches!(check(&x), StateError::Truncated { .. }));
        // A section length that lies is caught, not read past.
        let mut x = b;
        x[HEADER_LEN + 4] = 0xff;
        assert!(matches!(check(&x), StateError::Truncated { .. }));
    }

    #[test]
    fn lists_are_bounded() {
        let bytes = [0u8; 12];
        assert_eq!(
            pod_list::<u32>(Blob::VcpuState, 4, &bytes, "things", 2).unwrap_err(),
            StateError::TooMany {
                what: "things",
                count: 3,
                max: 2
            }
        );
        assert!(matches!(
            pod_list::<u32>(Blob::VcpuState, 4, &bytes[..7], "things", 9),
            Err(StateError::BadSectionLength { len: 7, .. })
        ));
        assert_eq!(
            pod_list::<u32>(Blob::VcpuState, 4, &bytes, "things", 3)
                .unwrap()
                .len(),
            3
        );
    }
}
