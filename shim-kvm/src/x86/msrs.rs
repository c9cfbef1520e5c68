//! Which MSRs a vCPU's state carries.
//!
//! The rule: every MSR in KVM's index list (`KVM_GET_MSR_INDEX_LIST`: the
//! MSRs KVM saves for the host plus the ones it emulates) that, probed
//! once on a vCPU of this VM one MSR at a time, `KVM_GET_MSRS` reads and
//! `KVM_SET_MSRS` takes back. KVM lists MSRs it cannot read for this
//! guest (Hyper-V MSRs without Hyper-V CPUID, feature MSRs of absent
//! features) and MSRs it reads but refuses to set in this configuration
//! (`MSR_KVM_ASYNC_PF_INT` without an in-kernel LAPIC); either would fail
//! every save or restore, so both are left out. The write-back stores the
//! value just read, which changes nothing on a vCPU that is not in
//! `KVM_RUN`; IA32_TSC is the exception (a write re-bases the guest TSC on
//! some kernels), so it is only read: KVM always lets userspace set it.
//!
//! On the KVM hosts this was built on the rule keeps the set QEMU carries
//! — the TSC and TSC_ADJUST, SYSENTER_*, STAR/LSTAR/CSTAR/FMASK,
//! KERNEL_GS_BASE, TSC_AUX (where the CPU has RDTSCP), PAT, MISC_ENABLE,
//! TSC_DEADLINE, the kvmclock and paravirtual MSRs; `shim-kvm/tests/
//! x86_state.rs` checks it. Should a destination refuse an MSR anyway,
//! the restore fails naming it ([`super::StateError::Msr`]).
//!
//! EFER and APIC_BASE are not needed here: they travel in `kvm_sregs`.

use kvm_bindings::{KVM_MAX_MSR_ENTRIES, Msrs, kvm_msr_entry};
use kvm_ioctls::{Kvm, VcpuFd};

use super::error::{StateError, kvm};

/// MSR indices this module orders restores by, and the well-known set.
pub mod msr {
    /// IA32_TSC: the guest's TSC. Restored first.
    pub const IA32_TSC: u32 = 0x10;
    /// IA32_SYSENTER_CS.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// IA32_MISC_ENABLE.
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// IA32_PAT.
    pub const IA32_PAT: u32 = 0x277;
    /// IA32_TSC_DEADLINE: relative to the guest TSC and ignored unless the
    /// LAPIC timer is in TSC-deadline mode, so restored after both.
    pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
    /// STAR.
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR.
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR.
    pub const CSTAR: u32 = 0xc000_0083;
    /// FMASK (SYSCALL_MASK).
    pub const FMASK: u32 = 0xc000_0084;
    /// KERNEL_GS_BASE.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// TSC_AUX (what RDTSCP returns in ECX).
    pub const TSC_AUX: u32 = 0xc000_0103;
    /// kvmclock: wall clock page (new numbering).
    pub const KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
    /// kvmclock: per-vCPU system time page (new numbering).
    pub const KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
    /// Paravirtual async page faults.
    pub const KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
    /// Paravirtual steal time.
    pub const KVM_STEAL_TIME: u32 = 0x4b56_4d03;
    /// Paravirtual end of interrupt.
    pub const KVM_PV_EOI_EN: u32 = 0x4b56_4d04;

    /// The architectural and kvmclock MSRs every x86 VMM migrates.
    pub const WELL_KNOWN: &[u32] = &[
        IA32_TSC,
        IA32_SYSENTER_CS,
        IA32_SYSENTER_ESP,
        IA32_SYSENTER_EIP,
        IA32_MISC_ENABLE,
        IA32_PAT,
        IA32_TSC_DEADLINE,
        STAR,
        LSTAR,
        CSTAR,
        FMASK,
        KERNEL_GS_BASE,
        TSC_AUX,
        KVM_WALL_CLOCK_NEW,
        KVM_SYSTEM_TIME_NEW,
        KVM_ASYNC_PF_EN,
        KVM_STEAL_TIME,
        KVM_PV_EOI_EN,
    ];
}

/// The MSRs a vCPU's state carries on this host (see the module doc for
/// the rule), in KVM's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsrList {
    indices: Vec<u32>,
}

impl MsrList {
    /// Probes KVM's index list on `vcpu` (given its CPUID, not in
    /// `KVM_RUN`): keeps each MSR that reads and writes back (IA32_TSC:
    /// reads).
    pub fn probe(kvm_fd: &Kvm, vcpu: &VcpuFd) -> Result<MsrList, StateError> {
        let listed = kvm_fd
            .get_msr_index_list()
            .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
        let mut indices = Vec::new();
        for &index in listed.as_slice() {
            let entry = kvm_msr_entry {
                index,
                ..Default::default()
            };
            let mut one = Msrs::from_entries(&[entry]).map_err(|_| StateError::TooMany {
                what: "MSRs",
                count: 1,
                max: KVM_MAX_MSR_ENTRIES,
            })?;
            if vcpu.get_msrs(&mut one).map_err(kvm("KVM_GET_MSRS"))? != 1 {
                continue;
            }
            if index == msr::IA32_TSC || vcpu.set_msrs(&one).map_err(kvm("KVM_SET_MSRS"))? == 1 {
                indices.push(index);
            }
        }
        Ok(MsrList { indices })
    }

    /// The indices, in KVM's order.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// Whether the list carries MSR `index`.
    pub fn contains(&self, index: u32) -> bool {
        self.indices.contains(&index)
    }
}
