//! vCPU register state as a self-describing device blob.
//!
//! Layout (little-endian): magic `u32` "LMCP", version `u16`, section count
//! `u16`, payload length `u32`, then sections of `tag u32, len u32, bytes`.
//! Register structures are kvm-bindings' plain-old-data types copied as their
//! in-memory bytes (this only migrates between x86-64 hosts, like every KVM
//! VMM). Every length is checked on decode; a truncated, oversized or
//! unknown blob is a typed [`StateError`], never a panic.

use std::fmt;

use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use zerocopy::{FromBytes, IntoBytes};

/// Blob magic ("LMCP" little-endian).
pub const STATE_MAGIC: u32 = 0x5043_4D4C;
/// Blob layout version written by [`VcpuState::encode`].
pub const STATE_VERSION: u16 = 1;

const HEADER_LEN: usize = 12;
const TAG_REGS: u32 = 1;
const TAG_SREGS: u32 = 2;
const TAG_FPU: u32 = 3;
const TAG_MSRS: u32 = 4;
const TAG_XCRS: u32 = 5;
const TAG_XSAVE: u32 = 6;
const TAG_MP_STATE: u32 = 7;
const TAG_EVENTS: u32 = 8;
const TAG_DEBUGREGS: u32 = 9;
/// Serialised `kvm_fpu`: 8 x 16 fpr, fcw, fsw, ftwx, last_opcode, last_ip,
/// last_dp, 16 x 16 xmm, mxcsr (kvm_fpu has padding, so no byte view).
const FPU_LEN: usize = 128 + 2 + 2 + 1 + 2 + 8 + 8 + 256 + 4;

/// Why a state blob was rejected (or could not be applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateError {
    /// The blob is shorter than its header or than a length it declares.
    Truncated {
        /// Bytes needed at the point of failure.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// The magic number is wrong: not a vCPU state blob.
    BadMagic(u32),
    /// A layout version this code does not read.
    BadVersion(u16),
    /// The header's payload length disagrees with the blob length.
    LengthMismatch {
        /// Declared payload length.
        declared: usize,
        /// Actual payload length.
        actual: usize,
    },
    /// A section has the wrong size for its type.
    BadSectionLength {
        /// Section tag.
        tag: u32,
        /// Its length.
        len: usize,
    },
    /// A section tag this version does not define.
    UnknownSection(u32),
    /// A section appears twice.
    DuplicateSection(u32),
    /// A required section (regs, sregs, fpu) is missing.
    MissingSection(u32),
    /// KVM refused a register set (operation name and errno).
    Kvm(&'static str, i32),
    /// The vCPU is not paused, so its registers cannot be read or written.
    NotPaused,
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Truncated { needed, have } => {
                write!(f, "vCPU state truncated: need {needed} bytes, have {have}")
            }
            StateError::BadMagic(m) => write!(f, "vCPU state has bad magic {m:#010x}"),
            StateError::BadVersion(v) => {
                write!(
                    f,
                    "vCPU state version {v} unsupported (want {STATE_VERSION})"
                )
            }
            StateError::LengthMismatch { declared, actual } => write!(
                f,
                "vCPU state declares {declared} payload bytes but carries {actual}"
            ),
            StateError::BadSectionLength { tag, len } => {
                write!(f, "vCPU state section {tag} has bad length {len}")
            }
            StateError::UnknownSection(t) => write!(f, "vCPU state section {t} is unknown"),
            StateError::DuplicateSection(t) => write!(f, "vCPU state section {t} repeated"),
            StateError::MissingSection(t) => write!(f, "vCPU state section {t} missing"),
            StateError::Kvm(op, e) => write!(f, "restoring vCPU state: {op} failed: errno {e}"),
            StateError::NotPaused => f.write_str("vCPU state needs a paused vCPU"),
        }
    }
}

impl std::error::Error for StateError {}

/// Everything of one vCPU that must travel with a migration.
#[derive(Default)]
pub struct VcpuState {
    /// General-purpose registers, rip, rflags.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state (also inside `xsave` when present).
    pub fpu: kvm_fpu,
    /// MSRs that could be read: (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// Extended control registers (XCR0), if KVM supports them.
    pub xcrs: Option<kvm_xcrs>,
    /// XSAVE area, if KVM supports it.
    pub xsave: Option<kvm_xsave>,
    /// Run state (runnable, halted...).
    pub mp_state: Option<kvm_mp_state>,
    /// Pending exceptions, interrupts, NMIs, interrupt shadow.
    pub events: Option<kvm_vcpu_events>,
    /// Debug registers.
    pub debugregs: Option<kvm_debugregs>,
}

impl fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .field("xsave", &self.xsave.is_some())
            .finish_non_exhaustive()
    }
}

fn section(out: &mut Vec<u8>, count: &mut u16, tag: u32, bytes: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
    *count += 1;
}

fn encode_fpu(fpu: &kvm_fpu) -> Vec<u8> {
    let mut b = Vec::with_capacity(FPU_LEN);
    fpu.fpr.iter().for_each(|r| b.extend_from_slice(r));
    b.extend_from_slice(&fpu.fcw.to_le_bytes());
    b.extend_from_slice(&fpu.fsw.to_le_bytes());
    b.push(fpu.ftwx);
    b.extend_from_slice(&fpu.last_opcode.to_le_bytes());
    b.extend_from_slice(&fpu.last_ip.to_le_bytes());
    b.extend_from_slice(&fpu.last_dp.to_le_bytes());
    fpu.xmm.iter().for_each(|r| b.extend_from_slice(r));
    b.extend_from_slice(&fpu.mxcsr.to_le_bytes());
    b
}

/// A cursor over validated bytes; every take is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let have = self.bytes.len() - self.pos;
        if n > have {
            return Err(StateError::Truncated {
                needed: self.pos + n,
                have: self.bytes.len(),
            });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

fn decode_fpu(bytes: &[u8]) -> Result<kvm_fpu, StateError> {
    if bytes.len() != FPU_LEN {
        return Err(StateError::BadSectionLength {
            tag: TAG_FPU,
            len: bytes.len(),
        });
    }
    let mut r = Reader { bytes, pos: 0 };
    let mut fpu = kvm_fpu::default();
    for reg in fpu.fpr.iter_mut() {
        *reg = r.array()?;
    }
    fpu.fcw = r.u16()?;
    fpu.fsw = r.u16()?;
    fpu.ftwx = r.array::<1>()?[0];
    fpu.last_opcode = r.u16()?;
    fpu.last_ip = r.u64()?;
    fpu.last_dp = r.u64()?;
    for reg in fpu.xmm.iter_mut() {
        *reg = r.array()?;
    }
    fpu.mxcsr = r.u32()?;
    Ok(fpu)
}

fn pod<T: FromBytes>(tag: u32, bytes: &[u8]) -> Result<T, StateError> {
    T::read_from_bytes(bytes).map_err(|_| StateError::BadSectionLength {
        tag,
        len: bytes.len(),
    })
}

fn set_once<T>(slot: &mut Option<T>, tag: u32, v: T) -> Result<(), StateError> {
    if slot.is_some() {
        return Err(StateError::DuplicateSection(tag));
    }
    *slot = Some(v);
    Ok(())
}

impl VcpuState {
    /// Serialises the state into a versioned, length-checked blob.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let mut count = 0u16;
        section(&mut body, &mut count, TAG_REGS, self.regs.as_bytes());
        section(&mut body, &mut count, TAG_SREGS, self.sregs.as_bytes());
        section(&mut body, &mut count, TAG_FPU, &encode_fpu(&self.fpu));
        let msrs: Vec<u8> = self
            .msrs
            .iter()
            .flat_map(|(i, v)| i.to_le_bytes().into_iter().chain(v.to_le_bytes()))
            .collect();
        section(&mut body, &mut count, TAG_MSRS, &msrs);
        if let Some(x) = &self.xcrs {
            section(&mut body, &mut count, TAG_XCRS, x.as_bytes());
        }
        if let Some(x) = &self.xsave {
            section(&mut body, &mut count, TAG_XSAVE, x.as_bytes());
        }
        if let Some(x) = &self.mp_state {
            section(&mut body, &mut count, TAG_MP_STATE, x.as_bytes());
        }
        if let Some(x) = &self.events {
            section(&mut body, &mut count, TAG_EVENTS, x.as_bytes());
        }
        if let Some(x) = &self.debugregs {
            section(&mut body, &mut count, TAG_DEBUGREGS, x.as_bytes());
        }
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&STATE_MAGIC.to_le_bytes());
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Parses a blob written by [`VcpuState::encode`], validating every length.
    pub fn decode(blob: &[u8]) -> Result<VcpuState, StateError> {
        let mut r = Reader {
            bytes: blob,
            pos: 0,
        };
        let magic = r.u32()?;
        if magic != STATE_MAGIC {
            return Err(StateError::BadMagic(magic));
        }
        let version = r.u16()?;
        if version != STATE_VERSION {
            return Err(StateError::BadVersion(version));
        }
        let count = r.u16()?;
        let declared = r.u32()? as usize;
        let actual = blob.len() - HEADER_LEN;
        if declared != actual {
            return Err(StateError::LengthMismatch { declared, actual });
        }
        let (mut regs, mut sregs, mut fpu, mut msrs) = (None, None, None, None);
        let mut st = VcpuState::default();
        for _ in 0..count {
            let tag = r.u32()?;
            let len = r.u32()? as usize;
            let bytes = r.take(len)?;
            match tag {
                TAG_REGS => set_once(&mut regs, tag, pod(tag, bytes)?)?,
                TAG_SREGS => set_once(&mut sregs, tag, pod(tag, bytes)?)?,
                TAG_FPU => set_once(&mut fpu, tag, decode_fpu(bytes)?)?,
                TAG_MSRS => {
                    if len % 12 != 0 {
                        return Err(StateError::BadSectionLength { tag, len });
                    }
                    let list = bytes
                        .chunks_exact(12)
                        .map(|c| {
                            let mut rr = Reader { bytes: c, pos: 0 };
                            Ok((rr.u32()?, rr.u64()?))
                        })
                        .collect::<Result<Vec<_>, StateError>>()?;
                    set_once(&mut msrs, tag, list)?;
                }
                TAG_XCRS => set_once(&mut st.xcrs, tag, pod(tag, bytes)?)?,
                TAG_XSAVE => set_once(&mut st.xsave, tag, pod(tag, bytes)?)?,
                TAG_MP_STATE => set_once(&mut st.mp_state, tag, pod(tag, bytes)?)?,
                TAG_EVENTS => set_once(&mut st.events, tag, pod(tag, bytes)?)?,
                TAG_DEBUGREGS => set_once(&mut st.debugregs, tag, pod(tag, bytes)?)?,
                other => return Err(StateError::UnknownSection(other)),
            }
        }
        if r.pos != blob.len() {
            return Err(StateError::LengthMismatch {
                declared,
                actual: r.pos - HEADER_LEN,
            });
        }
        st.regs = regs.ok_or(StateError::MissingSection(TAG_REGS))?;
        st.sregs = sregs.ok_or(StateError::MissingSection(TAG_SREGS))?;
        st.fpu = fpu.ok_or(StateError::MissingSection(TAG_FPU))?;
        st.msrs = msrs.ok_or(StateError::MissingSection(TAG_MSRS))?;
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        let mut s = VcpuState::default();
        s.regs.rip = 0x10_0020;
        s.regs.rflags = 0x3002;
        s.sregs.cr0 = 1;
        s.sregs.cs.selector = 0x1b;
        s.fpu.fcw = 0x37f;
        s.fpu.xmm[3][7] = 9;
        s.fpu.mxcsr = 0x1f80;
        s.msrs = vec![(0x10, 12345), (0xC000_0080, 0)];
        let mut x = kvm_xsave::default();
        x.region[5] = 0xdead;
        s.xsave = Some(x);
        s.mp_state = Some(kvm_mp_state { mp_state: 0 });
        s
    }

    #[test]
    fn roundtrip() {
        let blob = sample().encode();
        let back = VcpuState::decode(&blob).unwrap();
        assert_eq!(back.regs.rip, 0x10_0020);
        assert_eq!(back.sregs.cs.selector, 0x1b);
        assert_eq!(back.fpu.fcw, 0x37f);
        assert_eq!(back.fpu.xmm[3][7], 9);
        assert_eq!(back.fpu.mxcsr, 0x1f80);
        assert_eq!(back.msrs, vec![(0x10, 12345), (0xC000_0080, 0)]);
        assert_eq!(back.xsave.as_ref().unwrap().region[5], 0xdead);
        assert!(back.xcrs.is_none());
        assert_eq!(back.encode(), blob);
    }

    #[test]
    fn every_truncation_is_rejected() {
        let blob = sample().encode();
        for len in 0..blob.len() {
            assert!(VcpuState::decode(&blob[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn bad_header_fields_are_rejected() {
        let blob = sample().encode();
        let mut b = blob.clone();
        b[0] ^= 1;
        assert!(matches!(
            VcpuState::decode(&b),
            Err(StateError::BadMagic(_))
        ));
        let mut b = blob.clone();
        b[4] = 2;
        assert_eq!(
            VcpuState::decode(&b).unwrap_err(),
            StateError::BadVersion(2)
        );
        let mut b = blob.clone();
        b.push(0);
        assert!(matches!(
            VcpuState::decode(&b),
            Err(StateError::LengthMismatch { .. })
        ));
        // One section fewer than declared leaves trailing bytes.
        let mut b = blob.clone();
        b[6] -= 1;
        assert!(matches!(
            VcpuState::decode(&b),
            Err(StateError::LengthMismatch { .. })
        ));
        // A section length that lies is caught, not read past.
        let mut b = blob.clone();
        b[HEADER_LEN + 4] ^= 0x40;
        assert!(VcpuState::decode(&b).is_err());
        // An unknown tag in place of regs.
        let mut b = blob;
        b[HEADER_LEN] = 99;
        assert_eq!(
            VcpuState::decode(&b).unwrap_err(),
            StateError::UnknownSection(99)
        );
    }

    #[test]
    fn required_sections_and_duplicates() {
        let s = sample();
        let mut body = Vec::new();
        let mut count = 0;
        section(&mut body, &mut count, TAG_REGS, s.regs.as_bytes());
        section(&mut body, &mut count, TAG_REGS, s.regs.as_bytes());
        let mut blob = STATE_MAGIC.to_le_bytes().to_vec();
        blob.extend_from_slice(&STATE_VERSION.to_le_bytes());
        blob.extend_from_slice(&count.to_le_bytes());
        blob.extend_from_slice(&(body.len() as u32).to_le_bytes());
        blob.extend_from_slice(&body);
        assert_eq!(
            VcpuState::decode(&blob).unwrap_err(),
            StateError::DuplicateSection(TAG_REGS)
        );
        let mut blob = STATE_MAGIC.to_le_bytes().to_vec();
        blob.extend_from_slice(&STATE_VERSION.to_le_bytes());
        blob.extend_from_slice(&0u16.to_le_bytes());
        blob.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            VcpuState::decode(&blob).unwrap_err(),
            StateError::MissingSection(TAG_REGS)
        );
    }
}
