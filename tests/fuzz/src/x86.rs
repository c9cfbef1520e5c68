//! The x86 state decoders of `livemig-kvm` under fuzzing: the vCPU state,
//! the VM-wide device state and the CPU model record.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_clock_data,
    kvm_cpuid_entry2, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_pit_state2, kvm_xcrs,
};
use livemig_kvm::x86::{CpuModel, FpuState, Irqchip, StateError, VcpuState, VmState, msr};

/// Checks one decoder: whatever it accepts re-encodes to bytes it decodes
/// again to the same encoding (a decoded value is always encodable, and
/// encoding is deterministic). Returns whether `data` was accepted.
fn stable<T>(
    data: &[u8],
    decode: fn(&[u8]) -> Result<T, StateError>,
    encode: fn(&T, &mut Vec<u8>),
) -> bool {
    let Ok(value) = decode(data) else {
        return false;
    };
    let mut once = Vec::new();
    encode(&value, &mut once);
    let again = decode(&once).expect("an encoding of a decoded value decodes");
    let mut twice = Vec::new();
    encode(&again, &mut twice);
    assert_eq!(once, twice, "re-encoding changed the bytes");
    true
}

/// libFuzzer entry point for the vCPU state decoder.
pub fn x86_vcpu_state(data: &[u8]) {
    x86_vcpu_state_accepts(data);
}

/// Decodes `data` as a vCPU state; see `stable` for what is checked.
pub fn x86_vcpu_state_accepts(data: &[u8]) -> bool {
    stable(data, VcpuState::decode, VcpuState::encode)
}

/// Valid vCPU states: one with an XSAVE area, XCRs and a LAPIC, one with
/// only the legacy FPU.
pub fn x86_vcpu_state_corpus() -> Vec<Vec<u8>> {
    let mut full = VcpuState {
        regs: Default::default(),
        sregs: Default::default(),
        fpu: FpuState::Xsave(vec![0x11; 4096]),
        xcrs: Some(kvm_xcrs::default()),
        lapic: Some(kvm_lapic_state::default()),
        msrs: vec![(msr::IA32_TSC, 1 << 40), (msr::IA32_TSC_DEADLINE, 5)],
        mp_state: Default::default(),
        events: Default::default(),
        debugregs: Default::default(),
    };
    full.regs.rip = 0xffff_ffff_8100_0000;
    let mut legacy = full.clone();
    legacy.fpu = FpuState::Fpu(Box::new(kvm_fpu {
        fcw: 0x37f,
        ..Default::default()
    }));
    legacy.xcrs = None;
    legacy.lapic = None;
    [full, legacy]
        .iter()
        .map(|s| {
            let mut b = Vec::new();
            s.encode(&mut b);
            b
        })
        .collect()
}

/// libFuzzer entry point for the VM state decoder.
pub fn x86_vm_state(data: &[u8]) {
    x86_vm_state_accepts(data);
}

/// Decodes `data` as a VM state; see `stable` for what is checked.
pub fn x86_vm_state_accepts(data: &[u8]) -> bool {
    stable(data, VmState::decode, VmState::encode)
}

/// Valid VM states: with irqchip and PIT, and with the clock alone.
pub fn x86_vm_state_corpus() -> Vec<Vec<u8>> {
    let chip = |chip_id| kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    let full = VmState {
        irqchip: Some(Irqchip {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
            ioapic: chip(KVM_IRQCHIP_IOAPIC),
        }),
        pit: Some(kvm_pit_state2::default()),
        clock: kvm_clock_data {
            clock: 1 << 33,
            ..Default::default()
        },
    };
    let bare = VmState {
        irqchip: None,
        pit: None,
        ..full.clone()
    };
    [full, bare]
        .iter()
        .map(|s| {
            let mut b = Vec::new();
            s.encode(&mut b);
            b
        })
        .collect()
}

/// libFuzzer entry point for the CPU model decoder.
pub fn x86_cpu_model(data: &[u8]) {
    x86_cpu_model_accepts(data);
}

/// Decodes `data` as a CPU model; see `stable` for what is checked, and
/// a decoded model is compatible with itself.
pub fn x86_cpu_model_accepts(data: &[u8]) -> bool {
    if let Ok(m) = CpuModel::decode(data) {
        assert_eq!(m.check(&m), Ok(()), "a model must match itself");
    }
    stable(data, CpuModel::decode, CpuModel::encode)
}

/// A valid CPU model of two leaves.
pub fn x86_cpu_model_corpus() -> Vec<Vec<u8>> {
    let model = CpuModel {
        cpuid: vec![
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0xd,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0100_0800,
                ..Default::default()
            },
        ],
        tsc_khz: 2_000_000,
        vcpus: 2,
    };
    let mut b = Vec::new();
    model.encode(&mut b);
    vec![b]
}
