//! The CPU model compatibility record: what the guest was told about its
//! CPUs, which the destination must tell it identically.
//!
//! The source sends it before any RAM; the destination compares it with
//! its own (built the same way, from its vCPU 0 after `KVM_SET_CPUID2`)
//! and refuses the migration on the first difference, which
//! [`Mismatch`] names. The TSC frequency must match exactly: the guest
//! calibrated against it, and scaling it on the destination
//! (`KVM_SET_TSC_KHZ` with TSC scaling) is not yet done.
//!
//! CPUID bits that differ per vCPU by design are left out of the
//! comparison: the initial APIC ID (leaf 0x1 EBX bits 31:24), the x2APIC
//! ID (leaves 0xB and 0x1F, EDX) and AMD's extended APIC ID (leaf
//! 0x8000_001E, EAX).

use std::fmt;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::VcpuFd;
use zerocopy::IntoBytes;

use super::error::{Blob, StateError, kvm};
use super::wire::{self, Writer};

/// Blob magic ("LMCM" little-endian).
const MAGIC: u32 = 0x4D43_4D4C;
/// Layout version written by [`CpuModel::encode`].
const VERSION: u16 = 1;

const TAG_VCPUS: u32 = 1;
const TAG_TSC_KHZ: u32 = 2;
const TAG_CPUID: u32 = 3;

pub(super) const SECTION_NAMES: &[(u32, &str)] = &[
    (TAG_VCPUS, "vcpu count"),
    (TAG_TSC_KHZ, "tsc khz"),
    (TAG_CPUID, "cpuid"),
];

/// One of the four CPUID output registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuidRegister {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

impl fmt::Display for CpuidRegister {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuidRegister::Eax => "EAX",
            CpuidRegister::Ebx => "EBX",
            CpuidRegister::Ecx => "ECX",
            CpuidRegister::Edx => "EDX",
        })
    }
}

/// The first way a destination's CPU model differs from the source's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// The guests have different numbers of vCPUs.
    VcpuCount {
        /// The source's count.
        source: u32,
        /// The destination's count.
        destination: u32,
    },
    /// The TSC runs at another frequency.
    TscKhz {
        /// The source's frequency in kHz.
        source: u32,
        /// The destination's frequency in kHz.
        destination: u32,
    },
    /// A CPUID leaf exists on one side only.
    CpuidLeaf {
        /// The leaf (EAX input).
        function: u32,
        /// The subleaf (ECX input).
        index: u32,
        /// Whether the source has it (else the destination does).
        on_source: bool,
    },
    /// A CPUID register differs (outside the per-vCPU fields).
    CpuidRegister {
        /// The leaf (EAX input).
        function: u32,
        /// The subleaf (ECX input).
        index: u32,
        /// Which register.
        register: CpuidRegister,
        /// The source's value, per-vCPU fields zeroed.
        source: u32,
        /// The destination's value, per-vCPU fields zeroed.
        destination: u32,
    },
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::VcpuCount {
                source,
                destination,
            } => write!(f, "vCPU count: source {source}, destination {destination}"),
            Mismatch::TscKhz {
                source,
                destination,
            } => write!(
                f,
                "TSC frequency: source {source} kHz, destination {destination} kHz"
            ),
            Mismatch::CpuidLeaf {
                function,
                index,
                on_source,
            } => {
                let side = if *on_source {
                    "the source only"
                } else {
                    "the destination only"
                };
                write!(f, "CPUID function {function:#x} index {index}: on {side}")
            }
            Mismatch::CpuidRegister {
                function,
                index,
                register,
                source,
                destination,
            } => write!(
                f,
                "CPUID function {function:#x} index {index}: {register} differs \
                 (source {source:#x}, destination {destination:#x})"
            ),
        }
    }
}

impl std::error::Error for Mismatch {}

/// The compatibility record of a guest's CPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuModel {
    /// The CPUID the vCPUs were given (`KVM_GET_CPUID2` on vCPU 0).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest TSC frequency in kHz.
    pub tsc_khz: u32,
    /// How many vCPUs the guest has.
    pub vcpus: u32,
}

impl CpuModel {
    /// Reads the model from `vcpu0` of a guest with `vcpus` vCPUs.
    pub fn capture(vcpu0: &VcpuFd, vcpus: u32) -> Result<CpuModel, StateError> {
        let cpuid = vcpu0
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?;
        Ok(CpuModel {
            cpuid: cpuid.as_slice().to_vec(),
            tsc_khz: vcpu0.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?,
            vcpus,
        })
    }

    /// Checks, on the destination (`self`), that the `source` guest can
    /// run here: the same vCPU count, TSC frequency and CPUID outside the
    /// per-vCPU fields (see the module doc).
    pub fn check(&self, source: &CpuModel) -> Result<(), Mismatch> {
        if source.vcpus != self.vcpus {
            return Err(Mismatch::VcpuCount {
                source: source.vcpus,
                destination: self.vcpus,
            });
        }
        if source.tsc_khz != self.tsc_khz {
            return Err(Mismatch::TscKhz {
                source: source.tsc_khz,
                destination: self.tsc_khz,
            });
        }
        for s in &source.cpuid {
            let Some(d) = find(&self.cpuid, s) else {
                return Err(Mismatch::CpuidLeaf {
                    function: s.function,
                    index: s.index,
                    on_source: true,
                });
            };
            let (s_regs, d_regs) = (comparable(s), comparable(d));
            let names = [
                CpuidRegister::Eax,
                CpuidRegister::Ebx,
                CpuidRegister::Ecx,
                CpuidRegister::Edx,
            ];
            for ((register, sv), dv) in names.into_iter().zip(s_regs).zip(d_regs) {
                if sv != dv {
                    return Err(Mismatch::CpuidRegister {
                        function: s.function,
                        index: s.index,
                        register,
                        source: sv,
                        destination: dv,
                    });
                }
            }
        }
        match self.cpuid.iter().find(|d| find(&source.cpuid, d).is_none()) {
            Some(d) => Err(Mismatch::CpuidLeaf {
                function: d.function,
                index: d.index,
                on_source: false,
            }),
            None => Ok(()),
        }
    }

    /// Appends the model's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(MAGIC, VERSION);
        w.section(TAG_VCPUS, &self.vcpus.to_le_bytes());
        w.section(TAG_TSC_KHZ, &self.tsc_khz.to_le_bytes());
        w.section(TAG_CPUID, self.cpuid.as_bytes());
        w.finish(out);
    }

    /// Parses an encoding from [`CpuModel::encode`]; more CPUID entries
    /// than KVM takes is [`StateError::TooMany`], a leaf listed twice
    /// [`StateError::DuplicateCpuidLeaf`].
    pub fn decode(bytes: &[u8]) -> Result<CpuModel, StateError> {
        const B: Blob = Blob::CpuModel;
        let (mut vcpus, mut tsc_khz, mut cpuid) = (None, None, None);
        for (tag, body) in wire::sections(B, MAGIC, VERSION, bytes)? {
            match tag {
                TAG_VCPUS => wire::set_once(&mut vcpus, B, tag, u32_section(tag, body)?)?,
                TAG_TSC_KHZ => wire::set_once(&mut tsc_khz, B, tag, u32_section(tag, body)?)?,
                TAG_CPUID => {
                    let entries: Vec<kvm_cpuid_entry2> =
                        wire::pod_list(B, tag, body, "CPUID entries", KVM_MAX_CPUID_ENTRIES)?;
                    for (i, e) in entries.iter().enumerate() {
                        if find(&entries[..i], e).is_some() {
                            return Err(StateError::DuplicateCpuidLeaf {
                                function: e.function,
                                index: e.index,
                            });
                        }
                    }
                    wire::set_once(&mut cpuid, B, tag, entries)?
                }
                _ => return Err(StateError::UnknownSection { blob: B, tag }),
            }
        }
        Ok(CpuModel {
            cpuid: wire::required(cpuid, B, TAG_CPUID)?,
            tsc_khz: wire::required(tsc_khz, B, TAG_TSC_KHZ)?,
            vcpus: wire::required(vcpus, B, TAG_VCPUS)?,
        })
    }
}

fn u32_section(tag: u32, body: &[u8]) -> Result<u32, StateError> {
    let bytes: [u8; 4] = body.try_into().map_err(|_| StateError::BadSectionLength {
        blob: Blob::CpuModel,
        tag,
        len: body.len(),
    })?;
    Ok(u32::from_le_bytes(bytes))
}

/// The entry of `list` for the same leaf and subleaf as `e`.
fn find<'a>(list: &'a [kvm_cpuid_entry2], e: &kvm_cpuid_entry2) -> Option<&'a kvm_cpuid_entry2> {
    list.iter()
        .find(|x| x.function == e.function && x.index == e.index)
}

/// EAX, EBX, ECX, EDX of `e` with the per-vCPU fields masked out.
fn comparable(e: &kvm_cpuid_entry2) -> [u32; 4] {
    let mut regs = [e.eax, e.ebx, e.ecx, e.edx];
    match e.function {
        // Initial APIC ID.
        0x1 => regs[1] &= 0x00ff_ffff,
        // x2APIC ID.
        0xb | 0x1f => regs[3] = 0,
        // Extended APIC ID.
        0x8000_001e => regs[0] = 0,
        _ => {}
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86::wire::tests::rejects_prefixes_survives_flips;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn model() -> CpuModel {
        CpuModel {
            cpuid: vec![
                entry(0, 0, [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
                entry(1, 0, [0x906ea, 0x0008_0800, 0xfffa_3203, 0x1f8b_fbff]),
                entry(7, 0, [0, 0x029c_6fbf, 0x4, 0xbc00_0400]),
                entry(0xb, 1, [4, 2, 0x201, 0]),
                entry(0x8000_001e, 0, [0, 0x100, 0, 0]),
            ],
            tsc_khz: 2_000_000,
            vcpus: 4,
        }
    }

    fn encoded(m: &CpuModel) -> Vec<u8> {
        let mut b = Vec::new();
        m.encode(&mut b);
        b
    }

    #[test]
    fn roundtrips() {
        let blob = encoded(&model());
        assert_eq!(CpuModel::decode(&blob).unwrap(), model());
    }

    #[test]
    fn every_prefix_is_rejected_and_no_flip_panics() {
        rejects_prefixes_survives_flips(&encoded(&model()), CpuModel::decode);
    }

    #[test]
    fn decoding_bounds_the_cpuid() {
        let mut m = model();
        m.cpuid = vec![entry(0, 0, [0; 4]); KVM_MAX_CPUID_ENTRIES + 1];
        assert_eq!(
            CpuModel::decode(&encoded(&m)).unwrap_err(),
            StateError::TooMany {
                what: "CPUID entries",
                count: KVM_MAX_CPUID_ENTRIES + 1,
                max: KVM_MAX_CPUID_ENTRIES
            }
        );
        let mut m = model();
        m.cpuid.push(m.cpuid[2]);
        assert_eq!(
            CpuModel::decode(&encoded(&m)).unwrap_err(),
            StateError::DuplicateCpuidLeaf {
                function: 7,
                index: 0
            }
        );
        let mut w = Writer::new(MAGIC, VERSION);
        w.section(TAG_VCPUS, &[1, 0, 0]);
        let mut blob = Vec::new();
        w.finish(&mut blob);
        assert_eq!(
            CpuModel::decode(&blob).unwrap_err(),
            StateError::BadSectionLength {
                blob: Blob::CpuModel,
                tag: TAG_VCPUS,
                len: 3
            }
        );
    }

    #[test]
    fn per_vcpu_fields_are_ignored() {
        let mut other = model();
        other.cpuid[1].ebx ^= 0x0300_0000; // initial APIC ID
        other.cpuid[3].edx = 7; // x2APIC ID
        other.cpuid[4].eax = 3; // extended APIC ID
        model().check(&other).unwrap();
        other.cpuid[1].ebx ^= 0x0000_0100; // CLFLUSH size: not per vCPU
        assert_eq!(
            model().check(&other).unwrap_err().to_string(),
            "CPUID function 0x1 index 0: EBX differs (source 0x80900, destination 0x80800)"
        );
    }

    #[test]
    fn the_first_difference_is_named() {
        let here = model();
        let mut src = model();
        src.vcpus = 2;
        src.tsc_khz = 2_100_000;
        assert_eq!(
            here.check(&src).unwrap_err().to_string(),
            "vCPU count: source 2, destination 4"
        );
        src.vcpus = 4;
        assert_eq!(
            here.check(&src).unwrap_err().to_string(),
            "TSC frequency: source 2100000 kHz, destination 2000000 kHz"
        );
        let mut src = model();
        src.cpuid.pop();
        assert_eq!(
            here.check(&src).unwrap_err(),
            Mismatch::CpuidLeaf {
                function: 0x8000_001e,
                index: 0,
                on_source: false
            }
        );
        assert_eq!(
            here.check(&src).unwrap_err().to_string(),
            "CPUID function 0x8000001e index 0: on the destination only"
        );
    }
}
