//! The complete x86 state of one vCPU.
//!
//! Saved from and restored to a `&VcpuFd` that is not in `KVM_RUN` (the
//! VMM's vCPU thread is parked, or the vCPU never ran). The restore order
//! keeps the constraints KVM puts on it, which QEMU's
//! `kvm_arch_put_registers` and Cloud Hypervisor's `set_state` both
//! respect though they differ in the rest:
//!
//! 1. sregs: CR0/CR3/CR4, EFER and APIC_BASE first, because the LAPIC's
//!    register layout (xAPIC or x2APIC) depends on APIC_BASE;
//! 2. regs, then XCRs and XSAVE (or the legacy FPU): `KVM_SET_REGS`
//!    discards a pending exception, so the events come later;
//! 3. the MSRs, IA32_TSC first so the MSRs relative to the TSC see the
//!    restored one, all but TSC_DEADLINE;
//! 4. the LAPIC, then TSC_DEADLINE (KVM ignores a deadline written while
//!    the LAPIC timer is not in TSC-deadline mode);
//! 5. debug registers, then the pending events (exception, interrupt,
//!    NMI, interrupt shadow, SMM);
//! 6. the run state last: a halted or INIT-received vCPU needs its LAPIC
//!    and events in place.

use kvm_bindings::{
    KVM_MAX_MSR_ENTRIES, KVM_VCPUEVENT_VALID_SIPI_VECTOR, Msrs, Xsave, kvm_debugregs, kvm_fpu,
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use zerocopy::IntoBytes;

use super::error::{Blob, MsrAccess, StateError, kvm};
use super::msrs::{MsrList, msr};
use super::wire::{self, Reader, Writer};

/// Blob magic ("LMCP" little-endian).
const MAGIC: u32 = 0x5043_4D4C;
/// Layout version written by [`VcpuState::encode`]. Version 1 was the
/// one-vCPU blob without LAPIC that this replaced.
const VERSION: u16 = 2;

const TAG_REGS: u32 = 1;
const TAG_SREGS: u32 = 2;
const TAG_FPU: u32 = 3;
const TAG_MSRS: u32 = 4;
const TAG_XCRS: u32 = 5;
const TAG_XSAVE: u32 = 6;
const TAG_MP_STATE: u32 = 7;
const TAG_EVENTS: u32 = 8;
const TAG_DEBUGREGS: u32 = 9;
const TAG_LAPIC: u32 = 10;

pub(super) const SECTION_NAMES: &[(u32, &str)] = &[
    (TAG_REGS, "regs"),
    (TAG_SREGS, "sregs"),
    (TAG_FPU, "fpu"),
    (TAG_MSRS, "msrs"),
    (TAG_XCRS, "xcrs"),
    (TAG_XSAVE, "xsave"),
    (TAG_MP_STATE, "mp_state"),
    (TAG_EVENTS, "vcpu_events"),
    (TAG_DEBUGREGS, "debugregs"),
    (TAG_LAPIC, "lapic"),
];

/// Serialised `kvm_fpu`: 8 x 16 fpr, fcw, fsw, ftwx, last_opcode, last_ip,
/// last_dp, 16 x 16 xmm, mxcsr (kvm_fpu has padding, so no byte view).
const FPU_LEN: usize = 128 + 2 + 2 + 1 + 2 + 8 + 8 + 256 + 4;
/// One MSR on the wire: index `u32`, value `u64`.
const MSR_LEN: usize = 12;
/// The legacy XSAVE area (`struct kvm_xsave`), the smallest one KVM has.
const LEGACY_XSAVE_LEN: usize = size_of::<kvm_xsave>();
/// The largest XSAVE area a blob may carry. With every component x86
/// defines today (AMX tiles included) the area is under 12 KiB.
const MAX_XSAVE_LEN: usize = 64 * 1024;

/// How this host's KVM hands out the floating-point state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FpuAccess {
    /// `KVM_GET_XSAVE2` with an area of this many bytes (`KVM_CAP_XSAVE2`).
    Xsave2(usize),
    /// The legacy 4 KiB `KVM_GET_XSAVE` (`KVM_CAP_XSAVE` without XSAVE2).
    Xsave,
    /// Neither: `KVM_GET_FPU` (x87 and SSE only).
    Fpu,
}

/// What this host's KVM saves and restores of a vCPU: how it hands out the
/// XSAVE area, whether it has XCRs and an in-kernel LAPIC, and the
/// [`MsrList`]. Probed once per VM, on a vCPU not in `KVM_RUN`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuCaps {
    fpu: FpuAccess,
    xcrs: bool,
    lapic: bool,
    msrs: MsrList,
}

impl VcpuCaps {
    /// Probes `vm` and its vCPU `vcpu` (created after any in-kernel
    /// irqchip, as KVM requires, given its CPUID with `KVM_SET_CPUID2`,
    /// which decides some MSRs, and not in `KVM_RUN`). `kvm_fd` is any
    /// open `/dev/kvm`: the MSR index list is a system ioctl. The LAPIC is in the
    /// kernel exactly when `KVM_GET_LAPIC` works (without an irqchip it
    /// fails with EINVAL).
    pub fn probe(kvm_fd: &Kvm, vm: &VmFd, vcpu: &VcpuFd) -> Result<VcpuCaps, StateError> {
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        let fpu = if xsave2 > 0 {
            FpuAccess::Xsave2((xsave2 as usize).max(LEGACY_XSAVE_LEN))
        } else if vm.check_extension(Cap::Xsave) {
            FpuAccess::Xsave
        } else {
            FpuAccess::Fpu
        };
        let lapic = match vcpu.get_lapic() {
            Ok(_) => true,
            Err(e) if e.errno() == libc::EINVAL => false,
            Err(e) => return Err(kvm("KVM_GET_LAPIC")(e)),
        };
        Ok(VcpuCaps {
            fpu,
            xcrs: vm.check_extension(Cap::Xcrs),
            lapic,
            msrs: MsrList::probe(kvm_fd, vcpu)?,
        })
    }

    /// The MSRs a saved state carries.
    pub fn msrs(&self) -> &MsrList {
        &self.msrs
    }

    /// Whether the vCPUs have an in-kernel LAPIC.
    pub fn lapic(&self) -> bool {
        self.lapic
    }

    /// The XSAVE area this host's KVM hands out, in bytes (0 when it only
    /// has the legacy FPU).
    pub fn xsave_len(&self) -> usize {
        match self.fpu {
            FpuAccess::Xsave2(len) => len,
            FpuAccess::Xsave => LEGACY_XSAVE_LEN,
            FpuAccess::Fpu => 0,
        }
    }
}

/// The floating-point and vector state: the XSAVE area when KVM has one
/// (it holds x87 and SSE too), else the legacy FPU.
#[derive(Debug, Clone, PartialEq)]
pub enum FpuState {
    /// The XSAVE area in the standard (uncompacted) format of
    /// `KVM_GET_XSAVE2`: legacy region, XSAVE header at byte 512, then the
    /// extended components (YMM upper halves at 576, ...).
    Xsave(Vec<u8>),
    /// `KVM_GET_FPU`'s x87/SSE state.
    Fpu(Box<kvm_fpu>),
}

/// Everything of one x86 vCPU that must travel with a migration.
#[derive(Clone, PartialEq)]
pub struct VcpuState {
    /// General-purpose registers, rip, rflags.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// Floating-point and vector registers.
    pub fpu: FpuState,
    /// Extended control registers (XCR0), when KVM has them.
    pub xcrs: Option<kvm_xcrs>,
    /// The local APIC's registers, when it is in the kernel.
    pub lapic: Option<kvm_lapic_state>,
    /// The MSRs of the host's [`MsrList`]: (index, value), in its order.
    pub msrs: Vec<(u32, u64)>,
    /// Run state (runnable, halted, INIT received...).
    pub mp_state: kvm_mp_state,
    /// Pending exception, interrupt and NMI, interrupt shadow, SMM.
    pub events: kvm_vcpu_events,
    /// Debug registers DR0-3, DR6, DR7.
    pub debugregs: kvm_debugregs,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .field("lapic", &self.lapic.is_some())
            .finish_non_exhaustive()
    }
}

impl VcpuState {
    /// Reads the whole state of `vcpu`, which must not be in `KVM_RUN`.
    pub fn save(vcpu: &VcpuFd, caps: &VcpuCaps) -> Result<VcpuState, StateError> {
        let fpu = match caps.fpu {
            FpuAccess::Xsave2(len) => {
                let mut area = new_xsave(len)?;
                // SAFETY: `area` was allocated for `len` bytes, the size
                // KVM_CAP_XSAVE2 reported for this VM; this VMM enables no
                // dynamic XSTATE feature afterwards, so KVM writes no more.
                unsafe { vcpu.get_xsave2(&mut area) }.map_err(kvm("KVM_GET_XSAVE2"))?;
                let mut bytes = area.as_fam_struct_ref().xsave.region.as_bytes().to_vec();
                bytes.extend_from_slice(area.as_slice().as_bytes());
                bytes.truncate(len);
                FpuState::Xsave(bytes)
            }
            FpuAccess::Xsave => {
                let area = vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
                FpuState::Xsave(area.region.as_bytes().to_vec())
            }
            FpuAccess::Fpu => FpuState::Fpu(Box::new(vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?)),
        };
        let indices = caps.msrs.indices();
        let mut msrs = msr_batch(indices.iter().map(|&index| (index, 0)))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if read != indices.len() {
            return Err(StateError::Msr {
                index: indices[read],
                access: MsrAccess::Read,
            });
        }
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            fpu,
            xcrs: caps
                .xcrs
                .then(|| vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS")))
                .transpose()?,
            lapic: caps
                .lapic
                .then(|| vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC")))
                .transpose()?,
            msrs: msrs.as_slice().iter().map(|e| (e.index, e.data)).collect(),
            mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Writes the state into `vcpu` (not in `KVM_RUN`, and on the
    /// destination not yet run), in the order of the module doc.
    pub fn restore(&self, vcpu: &VcpuFd, caps: &VcpuCaps) -> Result<(), StateError> {
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        }
        match &self.fpu {
            FpuState::Xsave(bytes) => restore_xsave(vcpu, caps, bytes)?,
            FpuState::Fpu(fpu) => vcpu.set_fpu(fpu).map_err(kvm("KVM_SET_FPU"))?,
        }
        let tsc = self.msrs.iter().filter(|m| m.0 == msr::IA32_TSC);
        let others = self
            .msrs
            .iter()
            .filter(|m| m.0 != msr::IA32_TSC && m.0 != msr::IA32_TSC_DEADLINE);
        set_msrs(vcpu, tsc.chain(others).copied())?;
        if let Some(lapic) = &self.lapic {
            vcpu.set_lapic(lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        }
        let deadline = self.msrs.iter().filter(|m| m.0 == msr::IA32_TSC_DEADLINE);
        set_msrs(vcpu, deadline.copied())?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        let mut events = self.events;
        // KVM_GET_VCPU_EVENTS reports the SIPI vector without flagging it.
        events.flags |= KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        vcpu.set_vcpu_events(&events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))
    }

    /// Appends the state's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(MAGIC, VERSION);
        w.section(TAG_REGS, self.regs.as_bytes());
        w.section(TAG_SREGS, self.sregs.as_bytes());
        match &self.fpu {
            FpuState::Xsave(bytes) => w.section(TAG_XSAVE, bytes),
            FpuState::Fpu(fpu) => w.section(TAG_FPU, &encode_fpu(fpu)),
        }
        if let Some(xcrs) = &self.xcrs {
            w.section(TAG_XCRS, xcrs.as_bytes());
        }
        if let Some(lapic) = &self.lapic {
            w.section(TAG_LAPIC, lapic.as_bytes());
        }
        let mut msrs = Vec::with_capacity(self.msrs.len() * MSR_LEN);
        for (index, value) in &self.msrs {
            msrs.extend_from_slice(&index.to_le_bytes());
            msrs.extend_from_slice(&value.to_le_bytes());
        }
        w.section(TAG_MSRS, &msrs);
        w.section(TAG_MP_STATE, self.mp_state.as_bytes());
        w.section(TAG_EVENTS, self.events.as_bytes());
        w.section(TAG_DEBUGREGS, self.debugregs.as_bytes());
        w.finish(out);
    }

    /// Parses an encoding from [`VcpuState::encode`], validating every
    /// length and count before anything is used.
    pub fn decode(bytes: &[u8]) -> Result<VcpuState, StateError> {
        const B: Blob = Blob::VcpuState;
        let (mut regs, mut sregs, mut fpu, mut xcrs, mut lapic) = (None, None, None, None, None);
        let (mut msrs, mut mp_state, mut events, mut debugregs) = (None, None, None, None);
        for (tag, body) in wire::sections(B, MAGIC, VERSION, bytes)? {
            match tag {
                TAG_REGS => wire::set_once(&mut regs, B, tag, wire::pod(B, tag, body)?)?,
                TAG_SREGS => wire::set_once(&mut sregs, B, tag, wire::pod(B, tag, body)?)?,
                TAG_FPU => {
                    wire::set_once(&mut fpu, B, tag, FpuState::Fpu(Box::new(decode_fpu(body)?)))?
                }
                TAG_XSAVE => wire::set_once(&mut fpu, B, tag, decode_xsave(body)?)?,
                TAG_XCRS => wire::set_once(&mut xcrs, B, tag, wire::pod(B, tag, body)?)?,
                TAG_LAPIC => wire::set_once(&mut lapic, B, tag, wire::pod(B, tag, body)?)?,
                TAG_MSRS => wire::set_once(&mut msrs, B, tag, decode_msrs(body)?)?,
                TAG_MP_STATE => wire::set_once(&mut mp_state, B, tag, wire::pod(B, tag, body)?)?,
                TAG_EVENTS => wire::set_once(&mut events, B, tag, wire::pod(B, tag, body)?)?,
                TAG_DEBUGREGS => wire::set_once(&mut debugregs, B, tag, wire::pod(B, tag, body)?)?,
                _ => return Err(StateError::UnknownSection { blob: B, tag }),
            }
        }
        Ok(VcpuState {
            regs: wire::required(regs, B, TAG_REGS)?,
            sregs: wire::required(sregs, B, TAG_SREGS)?,
            fpu: wire::required(fpu, B, TAG_XSAVE)?,
            xcrs,
            lapic,
            msrs: wire::required(msrs, B, TAG_MSRS)?,
            mp_state: wire::required(mp_state, B, TAG_MP_STATE)?,
            events: wire::required(events, B, TAG_EVENTS)?,
            debugregs: wire::required(debugregs, B, TAG_DEBUGREGS)?,
        })
    }
}

/// An `Xsave` buffer for an area of `len` bytes (at least the legacy 4 KiB).
fn new_xsave(len: usize) -> Result<Xsave, StateError> {
    let fam = len
        .saturating_sub(LEGACY_XSAVE_LEN)
        .div_ceil(size_of::<u32>());
    Xsave::new(fam).map_err(|_| StateError::XsaveTooLarge {
        len,
        max: LEGACY_XSAVE_LEN,
    })
}

/// Restores an XSAVE area no larger than this host's; a shorter one (from
/// a host with fewer XSAVE components) is padded with zeros, which the
/// XSAVE header marks as components in their initial state.
fn restore_xsave(vcpu: &VcpuFd, caps: &VcpuCaps, bytes: &[u8]) -> Result<(), StateError> {
    let max = caps.xsave_len();
    if bytes.len() > max {
        return Err(StateError::XsaveTooLarge {
            len: bytes.len(),
            max,
        });
    }
    let (legacy, extended) = bytes.split_at(bytes.len().min(LEGACY_XSAVE_LEN));
    match caps.fpu {
        FpuAccess::Xsave2(len) => {
            let mut area = new_xsave(len)?;
            // SAFETY: only the register region is written through this
            // reference, never the FAM's `len` field.
            let fam = unsafe { area.as_mut_fam_struct() };
            fam.xsave.region.as_mut_bytes()[..legacy.len()].copy_from_slice(legacy);
            area.as_mut_slice().as_mut_bytes()[..extended.len()].copy_from_slice(extended);
            // SAFETY: `area` holds `len` bytes, the size KVM_CAP_XSAVE2
            // reported for this VM, so KVM reads no more than was allocated.
            unsafe { vcpu.set_xsave2(&area) }.map_err(kvm("KVM_SET_XSAVE2"))
        }
        FpuAccess::Xsave => {
            let mut area = kvm_xsave::default();
            area.region.as_mut_bytes()[..legacy.len()].copy_from_slice(legacy);
            // SAFETY: without KVM_CAP_XSAVE2 KVM reads exactly the legacy
            // 4 KiB `kvm_xsave`, which `area` is.
            unsafe { vcpu.set_xsave(&area) }.map_err(kvm("KVM_SET_XSAVE"))
        }
        FpuAccess::Fpu => Err(StateError::XsaveTooLarge {
            len: bytes.len(),
            max: 0,
        }),
    }
}

/// A `KVM_GET_MSRS` / `KVM_SET_MSRS` batch of (index, value).
fn msr_batch(entries: impl Iterator<Item = (u32, u64)>) -> Result<Msrs, StateError> {
    let entries: Vec<kvm_msr_entry> = entries
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| StateError::TooMany {
        what: "MSRs",
        count: entries.len(),
        max: KVM_MAX_MSR_ENTRIES,
    })
}

/// Sets MSRs in the given order; the first one KVM refuses is named.
fn set_msrs(vcpu: &VcpuFd, entries: impl Iterator<Item = (u32, u64)>) -> Result<(), StateError> {
    let msrs = msr_batch(entries)?;
    let list = msrs.as_slice();
    if list.is_empty() {
        return Ok(());
    }
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    match list.get(set) {
        None => Ok(()),
        Some(refused) => Err(StateError::Msr {
            index: refused.index,
            access: MsrAccess::Write,
        }),
    }
}

fn decode_msrs(body: &[u8]) -> Result<Vec<(u32, u64)>, StateError> {
    if !body.len().is_multiple_of(MSR_LEN) {
        return Err(StateError::BadSectionLength {
            blob: Blob::VcpuState,
            tag: TAG_MSRS,
            len: body.len(),
        });
    }
    let count = body.len() / MSR_LEN;
    if count > KVM_MAX_MSR_ENTRIES {
        return Err(StateError::TooMany {
            what: "MSRs",
            count,
            max: KVM_MAX_MSR_ENTRIES,
        });
    }
    let mut r = Reader::new(Blob::VcpuState, body);
    (0..count).map(|_| Ok((r.u32()?, r.u64()?))).collect()
}

fn decode_xsave(body: &[u8]) -> Result<FpuState, StateError> {
    if body.len() < LEGACY_XSAVE_LEN
        || body.len() > MAX_XSAVE_LEN
        || !body.len().is_multiple_of(size_of::<u32>())
    {
        return Err(StateError::BadSectionLength {
            blob: Blob::VcpuState,
            tag: TAG_XSAVE,
            len: body.len(),
        });
    }
    Ok(FpuState::Xsave(body.to_vec()))
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

fn decode_fpu(body: &[u8]) -> Result<kvm_fpu, StateError> {
    if body.len() != FPU_LEN {
        return Err(StateError::BadSectionLength {
            blob: Blob::VcpuState,
            tag: TAG_FPU,
            len: body.len(),
        });
    }
    let mut r = Reader::new(Blob::VcpuState, body);
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

#[cfg(test)]
mod tests {
    use zerocopy::FromZeros;

    use super::*;
    use crate::x86::wire;
    use crate::x86::wire::tests::rejects_prefixes_survives_flips;

    fn sample(fpu: FpuState) -> VcpuState {
        let mut s = VcpuState {
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            fpu,
            xcrs: Some(kvm_xcrs::default()),
            lapic: Some(kvm_lapic_state::new_zeroed()),
            msrs: vec![(msr::IA32_TSC, 12345), (msr::STAR, 7)],
            mp_state: kvm_mp_state { mp_state: 3 },
            events: kvm_vcpu_events::default(),
            debugregs: kvm_debugregs::default(),
        };
        s.regs.rip = 0x10_0020;
        s.sregs.cs.selector = 0x1b;
        s.lapic.as_mut().unwrap().regs[0x80] = 0x50;
        s.events.nmi.pending = 1;
        s.debugregs.dr7 = 0x401;
        s
    }

    fn xsave_sample() -> VcpuState {
        let mut area = vec![0u8; LEGACY_XSAVE_LEN + 256];
        area[600] = 0xaa;
        sample(FpuState::Xsave(area))
    }

    fn fpu_sample() -> VcpuState {
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.xmm[3][7] = 9;
        let mut s = sample(FpuState::Fpu(Box::new(fpu)));
        s.xcrs = None;
        s.lapic = None;
        s
    }

    fn encoded(s: &VcpuState) -> Vec<u8> {
        let mut b = Vec::new();
        s.encode(&mut b);
        b
    }

    /// A blob of the given sections, in order.
    fn blob_of(sections: &[(u32, &[u8])]) -> Vec<u8> {
        wire::tests::blob_of(MAGIC, VERSION, sections)
    }

    #[test]
    fn roundtrips() {
        for s in [xsave_sample(), fpu_sample()] {
            let blob = encoded(&s);
            let back = VcpuState::decode(&blob).unwrap();
            assert!(back == s);
            assert_eq!(encoded(&back), blob);
        }
    }

    #[test]
    fn every_prefix_is_rejected_and_no_flip_panics() {
        rejects_prefixes_survives_flips(&encoded(&fpu_sample()), VcpuState::decode);
        let blob = encoded(&xsave_sample());
        for len in 0..blob.len() {
            assert!(VcpuState::decode(&blob[..len]).is_err(), "prefix {len}");
        }
    }

    #[test]
    fn sections_are_checked() {
        let s = fpu_sample();
        let regs = s.regs.as_bytes();
        let err = |b: Vec<u8>| VcpuState::decode(&b).unwrap_err();
        assert_eq!(
            err(blob_of(&[(TAG_REGS, regs)])),
            StateError::MissingSection {
                blob: Blob::VcpuState,
                tag: TAG_SREGS
            }
        );
        assert_eq!(
            err(blob_of(&[(TAG_REGS, regs), (TAG_REGS, regs)])),
            StateError::DuplicateSection {
                blob: Blob::VcpuState,
                tag: TAG_REGS
            }
        );
        let fpu = encode_fpu(&kvm_fpu::default());
        let area = [0u8; LEGACY_XSAVE_LEN];
        assert_eq!(
            err(blob_of(&[(TAG_FPU, &fpu), (TAG_XSAVE, &area)])),
            StateError::DuplicateSection {
                blob: Blob::VcpuState,
                tag: TAG_XSAVE
            }
        );
        assert_eq!(
            err(blob_of(&[(TAG_REGS, &regs[1..])])),
            StateError::BadSectionLength {
                blob: Blob::VcpuState,
                tag: TAG_REGS,
                len: regs.len() - 1
            }
        );
        assert_eq!(
            err(blob_of(&[(99, b"")])),
            StateError::UnknownSection {
                blob: Blob::VcpuState,
                tag: 99
            }
        );
        assert!(matches!(
            err(blob_of(&[(TAG_FPU, &fpu[1..])])),
            StateError::BadSectionLength { tag: TAG_FPU, .. }
        ));
    }

    #[test]
    fn msr_and_xsave_sizes_are_bounded() {
        let err =
            |tag: u32, bytes: &[u8]| VcpuState::decode(&blob_of(&[(tag, bytes)])).unwrap_err();
        assert_eq!(
            err(TAG_MSRS, &vec![0; MSR_LEN * (KVM_MAX_MSR_ENTRIES + 1)]),
            StateError::TooMany {
                what: "MSRs",
                count: KVM_MAX_MSR_ENTRIES + 1,
                max: KVM_MAX_MSR_ENTRIES
            }
        );
        assert!(matches!(
            err(TAG_MSRS, &[0; 13]),
            StateError::BadSectionLength {
                tag: TAG_MSRS,
                len: 13,
                ..
            }
        ));
        for len in [
            0,
            100,
            LEGACY_XSAVE_LEN - 4,
            LEGACY_XSAVE_LEN + 2,
            MAX_XSAVE_LEN + 4,
        ] {
            assert_eq!(
                err(TAG_XSAVE, &vec![0; len]),
                StateError::BadSectionLength {
                    blob: Blob::VcpuState,
                    tag: TAG_XSAVE,
                    len
                },
                "XSAVE of {len} bytes"
            );
        }
    }

    #[test]
    fn errors_name_the_section() {
        let e = StateError::MissingSection {
            blob: Blob::VcpuState,
            tag: TAG_LAPIC,
        };
        assert_eq!(e.to_string(), "vCPU state section 10 (lapic) missing");
    }
}
