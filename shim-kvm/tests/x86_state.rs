//! Real-KVM tests of `livemig_kvm::x86`: a vCPU's whole state, the VM's
//! irqchip, PIT and clock, and the CPU model record survive a save, an
//! encoding, a decoding and a restore into a second VM, class by class;
//! and a vCPU restored that way runs on from the instruction it stopped at.
//! Each test skips loudly without `/dev/kvm` (see [`kvm_available`]).

use std::time::Duration;

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_HALTED, KVM_PIT_SPEAKER_DUMMY, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SHADOW, KVM_VCPUEVENT_VALID_SIPI_VECTOR, Msrs, kvm_clock_data, kvm_irqchip,
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_config, kvm_segment, kvm_xcrs,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use livemig_kvm::x86::{
    CpuModel, CpuidRegister, FpuState, Mismatch, VcpuCaps, VcpuState, VmState, msr,
};
use zerocopy::IntoBytes;

/// Whether `/dev/kvm` can be used. Without it a test skips loudly, unless
/// `LIVEMIG_REQUIRE_KVM=1` (CI on KVM hosts), where skipping is a failure.
/// The same rule as livemig-cli's `tests/common`, whose helpers need the
/// tool and the demo guest; these tests need neither.
fn kvm_available() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("LIVEMIG_REQUIRE_KVM").as_deref() != Ok("1"),
            "LIVEMIG_REQUIRE_KVM=1 but /dev/kvm is not available"
        );
        eprintln!("SKIPPED: /dev/kvm not available");
    }
    ok
}

/// One VM with an in-kernel irqchip and PIT and one vCPU given the host's
/// supported CPUID (or `cpuid_edit` of it).
struct TestVm {
    vm: VmFd,
    vcpu: VcpuFd,
    caps: VcpuCaps,
}

fn test_vm(kvm: &Kvm, cpuid_edit: impl FnOnce(&mut [kvm_bindings::kvm_cpuid_entry2])) -> TestVm {
    let vm = kvm.create_vm().expect("create_vm");
    vm.create_irq_chip().expect("create_irq_chip");
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .expect("create_pit2");
    let vcpu = vm.create_vcpu(0).expect("create_vcpu");
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .expect("supported cpuid");
    cpuid_edit(cpuid.as_mut_slice());
    vcpu.set_cpuid2(&cpuid).expect("set_cpuid2");
    let caps = VcpuCaps::probe(kvm, &vm, &vcpu).expect("probe the vCPU state KVM saves");
    TestVm { vm, vcpu, caps }
}

fn cpuid_has(vcpu: &VcpuFd, function: u32, reg: CpuidRegister, bit: u32) -> bool {
    let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).expect("get_cpuid2");
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == function && e.index == 0)
        .is_some_and(|e| {
            let v = match reg {
                CpuidRegister::Eax => e.eax,
                CpuidRegister::Ebx => e.ebx,
                CpuidRegister::Ecx => e.ecx,
                CpuidRegister::Edx => e.edx,
            };
            v >> bit & 1 == 1
        })
}

/// Saves, encodes, decodes: what a migration carries.
fn through_the_wire(vcpu: &VcpuFd, caps: &VcpuCaps) -> VcpuState {
    let saved = VcpuState::save(vcpu, caps).expect("save the vCPU state");
    let mut blob = Vec::new();
    saved.encode(&mut blob);
    let decoded = VcpuState::decode(&blob).expect("decode the vCPU state");
    assert!(decoded == saved, "the encoding lost something");
    decoded
}

// LAPIC register offsets.
const APIC_TPR: usize = 0x80;
const APIC_SPIV: usize = 0xf0;
const APIC_LVTT: usize = 0x320;
const APIC_LVT0: usize = 0x350;
const APIC_LVTERR: usize = 0x370;
const APIC_TDCR: usize = 0x3e0;
/// The timer's current count: computed by KVM on every read.
const APIC_TMCCT: usize = 0x390;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    u32::from_le_bytes(l.regs.as_bytes()[off..off + 4].try_into().expect("4 bytes"))
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    l.regs.as_mut_bytes()[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Offsets in the standard XSAVE layout.
const XSTATE_BV: usize = 512;
const XMM0: usize = 160;
const YMM_HI128: usize = 576;

/// The MSRs set to distinctive values (TSC and TSC_DEADLINE apart).
const MSR_VALUES: &[(u32, u64)] = &[
    (msr::IA32_SYSENTER_CS, 0x10),
    (msr::IA32_SYSENTER_ESP, 0xffff_8000_1234_0000),
    (msr::IA32_SYSENTER_EIP, 0xffff_ffff_8100_0040),
    (msr::IA32_PAT, 0x0007_0106_0007_0405),
    (msr::STAR, 0x0023_0010_0000_0000),
    (msr::LSTAR, 0xffff_ffff_8180_0000),
    (msr::CSTAR, 0xffff_ffff_8180_1000),
    (msr::FMASK, 0x4_7700),
    (msr::KERNEL_GS_BASE, 0xffff_8880_1000_0000),
];
/// TSC_AUX, set when the host's KVM offers it (RDTSCP or RDPID in CPUID).
const TSC_AUX: (u32, u64) = (msr::TSC_AUX, 0x1234_5678);
const TSC: u64 = 0x0000_1000_0000_0000;
const TSC_DEADLINE: u64 = TSC + 0x0100_0000_0000_0000;

fn set_msrs(vcpu: &VcpuFd, list: &[(u32, u64)]) {
    let entries: Vec<kvm_msr_entry> = list
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).expect("MSR batch");
    assert_eq!(vcpu.set_msrs(&msrs).expect("set_msrs"), list.len());
}

/// The distinctive value of general-purpose register `i` (rax = 0).
fn gpr(i: usize) -> u64 {
    0x0101_0101_0101_0101u64.wrapping_mul(i as u64 + 1) ^ 0x8000_0000_0000_0000
}

/// Puts a distinctive value into every class of `vcpu`'s state: a 64-bit
/// long-mode register file, XCR0 with AVX, an AVX register's upper half,
/// MSRs, LAPIC registers with the timer in TSC-deadline mode, a pending
/// NMI and an injected exception, debug registers, and a halted run state.
fn make_distinctive(t: &TestVm) {
    let v = &t.vcpu;
    assert!(
        cpuid_has(v, 1, CpuidRegister::Ecx, 28),
        "this host's KVM offers no AVX: the YMM check cannot run"
    );
    let mut sregs = v.get_sregs().expect("get_sregs");
    let seg = |selector: u16, type_: u8, l: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(l == 0),
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = seg(0x08, 0xb, 1);
    sregs.ds = seg(0x10, 0x3, 0);
    sregs.es = seg(0x10, 0x3, 0);
    sregs.ss = seg(0x10, 0x3, 0);
    sregs.fs = kvm_segment {
        base: 0x7f00_1234_5000,
        ..seg(0x10, 0x3, 0)
    };
    sregs.gs = kvm_segment {
        base: 0xffff_8880_0000_0000,
        ..seg(0x10, 0x3, 0)
    };
    sregs.tr = kvm_segment {
        base: 0x5000,
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        s: 0,
        db: 0,
        g: 0,
        ..seg(0x18, 0xb, 0)
    };
    sregs.gdt.base = 0x1000;
    sregs.gdt.limit = 0x27;
    sregs.idt.base = 0x2000;
    sregs.idt.limit = 0xfff;
    sregs.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
    sregs.cr3 = 0x12_3000;
    sregs.cr4 = 0x4_0620; // OSXSAVE | OSXMMEXCPT | OSFXSR | PAE
    sregs.efer = 0xd01; // NXE | LMA | LME | SCE
    sregs.cr8 = 5;
    v.set_sregs(&sregs).expect("set_sregs");

    let mut regs = v.get_regs().expect("get_regs");
    let gprs = [
        &mut regs.rax,
        &mut regs.rbx,
        &mut regs.rcx,
        &mut regs.rdx,
        &mut regs.rsi,
        &mut regs.rdi,
        &mut regs.rsp,
        &mut regs.rbp,
        &mut regs.r8,
        &mut regs.r9,
        &mut regs.r10,
        &mut regs.r11,
        &mut regs.r12,
        &mut regs.r13,
        &mut regs.r14,
        &mut regs.r15,
    ];
    for (i, r) in gprs.into_iter().enumerate() {
        *r = gpr(i);
    }
    regs.rip = 0xffff_ffff_8100_1234;
    regs.rflags = 0x246;
    v.set_regs(&regs).expect("set_regs");

    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = 0x7; // x87 | SSE | AVX
    v.set_xcrs(&xcrs).expect("set_xcrs");

    // The XSAVE area through the module itself: no unsafe in tests.
    let mut st = VcpuState::save(v, &t.caps).expect("save");
    let FpuState::Xsave(area) = &mut st.fpu else {
        panic!("this host's KVM has no XSAVE");
    };
    for (i, b) in area[XMM0..XMM0 + 16].iter_mut().enumerate() {
        *b = 0xa0 + i as u8;
    }
    for (i, b) in area[YMM_HI128..YMM_HI128 + 16 * 16].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7) ^ 0x5c;
    }
    area[XSTATE_BV] |= 0x7;
    st.restore(v, &t.caps).expect("restore the XSAVE area");

    let mut msrs = vec![(msr::IA32_TSC, TSC)];
    msrs.extend_from_slice(MSR_VALUES);
    if t.caps.msrs().contains(msr::TSC_AUX) {
        msrs.push(TSC_AUX);
    } else {
        eprintln!("NOTE: this host's KVM has no TSC_AUX (no RDTSCP/RDPID): not set");
    }
    set_msrs(v, &msrs);

    let mut lapic = v.get_lapic().expect("get_lapic");
    set_lapic_reg(&mut lapic, APIC_SPIV, 0x1ff);
    set_lapic_reg(&mut lapic, APIC_TPR, 0x50);
    set_lapic_reg(&mut lapic, APIC_LVTT, 2 << 17 | 0xec); // TSC-deadline, vector 0xec
    set_lapic_reg(&mut lapic, APIC_LVT0, 0x1_0700); // masked ExtINT
    set_lapic_reg(&mut lapic, APIC_LVTERR, 0xfe);
    set_lapic_reg(&mut lapic, APIC_TDCR, 0xb);
    v.set_lapic(&lapic).expect("set_lapic");
    set_msrs(v, &[(msr::IA32_TSC_DEADLINE, TSC_DEADLINE)]);

    let mut dr = v.get_debug_regs().expect("get_debug_regs");
    dr.db = [0x1000, 0x2000_0000, 0xffff_8000_0000_3000, 0x4444];
    dr.dr6 = 0xffff_4ff1;
    dr.dr7 = 0x0001_0403;
    v.set_debug_regs(&dr).expect("set_debug_regs");

    let mut ev = v.get_vcpu_events().expect("get_vcpu_events");
    ev.exception.injected = 1;
    ev.exception.nr = 13;
    ev.exception.has_error_code = 1;
    ev.exception.error_code = 0x18;
    ev.nmi.pending = 1;
    ev.nmi.masked = 1;
    ev.interrupt.shadow = 1;
    ev.sipi_vector = 0x9a;
    ev.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING
        | KVM_VCPUEVENT_VALID_SHADOW
        | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    v.set_vcpu_events(&ev).expect("set_vcpu_events");

    v.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_HALTED,
    })
    .expect("set_mp_state");
}

fn msr_value(st: &VcpuState, index: u32) -> u64 {
    st.msrs
        .iter()
        .find(|m| m.0 == index)
        .unwrap_or_else(|| panic!("MSR {index:#x} not in the saved state"))
        .1
}

#[test]
fn msr_list_keeps_the_well_known_set_and_each_restores() {
    if !kvm_available() {
        return;
    }
    let kvm = Kvm::new().expect("open /dev/kvm");
    let t = test_vm(&kvm, |_| {});
    let list = t.caps.msrs();
    eprintln!("MEASURE {} MSRs carried", list.indices().len());
    let listed = kvm.get_msr_index_list().expect("MSR index list");
    for &m in msr::WELL_KNOWN {
        if listed.as_slice().contains(&m) {
            assert!(
                list.contains(m),
                "MSR {m:#x} is listed by KVM but not carried"
            );
        } else {
            eprintln!("NOTE: this host's KVM does not list MSR {m:#x}");
        }
    }
    // Every MSR carried can be restored: each writes back on a fresh vCPU.
    for &m in list.indices() {
        let entry = kvm_msr_entry {
            index: m,
            ..Default::default()
        };
        let mut one = Msrs::from_entries(&[entry]).expect("one MSR");
        assert_eq!(
            t.vcpu.get_msrs(&mut one).expect("get_msrs"),
            1,
            "MSR {m:#x} reads"
        );
        assert_eq!(
            t.vcpu.set_msrs(&one).expect("set_msrs"),
            1,
            "MSR {m:#x} writes back"
        );
    }
    // Every x86-64 KVM has these.
    for m in [
        msr::IA32_TSC,
        msr::IA32_SYSENTER_CS,
        msr::IA32_PAT,
        msr::IA32_TSC_DEADLINE,
        msr::STAR,
        msr::LSTAR,
        msr::KERNEL_GS_BASE,
        msr::KVM_SYSTEM_TIME_NEW,
    ] {
        assert!(list.contains(m), "MSR {m:#x} is not carried");
    }
}

#[test]
fn every_vcpu_state_class_survives_save_and_restore() {
    if !kvm_available() {
        return;
    }
    let kvm = Kvm::new().expect("open /dev/kvm");
    let src = test_vm(&kvm, |_| {});
    let dst = test_vm(&kvm, |_| {});
    make_distinctive(&src);

    let a = through_the_wire(&src.vcpu, &src.caps);
    // What was put in is what was saved.
    assert_eq!(a.regs.r15, gpr(15));
    assert_eq!(a.regs.rip, 0xffff_ffff_8100_1234);
    assert_eq!(a.sregs.cr3, 0x12_3000);
    assert_eq!(a.sregs.efer & 0xd01, 0xd01);
    assert_eq!(a.sregs.fs.base, 0x7f00_1234_5000);
    assert_eq!(a.xcrs.expect("XCRs").xcrs[0].value, 0x7);
    let FpuState::Xsave(area) = &a.fpu else {
        panic!("no XSAVE area")
    };
    assert_eq!(area[YMM_HI128 + 1], 7 ^ 0x5c, "YMM0 upper half");
    assert_eq!(area[XSTATE_BV] & 0x7, 0x7);
    for &(index, value) in MSR_VALUES {
        assert_eq!(msr_value(&a, index), value, "MSR {index:#x}");
    }
    if src.caps.msrs().contains(msr::TSC_AUX) {
        assert_eq!(msr_value(&a, msr::TSC_AUX), TSC_AUX.1, "TSC_AUX");
    }
    // PVM (this project's CI) runs the guest on the host's TSC and ignores
    // a host's TSC write; KVM on hardware virtualization takes it.
    let tsc = msr_value(&a, msr::IA32_TSC);
    if tsc >= TSC && tsc - TSC < 1 << 40 {
        assert_eq!(msr_value(&a, msr::IA32_TSC_DEADLINE), TSC_DEADLINE);
    } else {
        eprintln!("NOTE: this host's KVM ignored the IA32_TSC write (guest TSC {tsc:#x})");
        assert_ne!(msr_value(&a, msr::IA32_TSC_DEADLINE), 0, "TSC_DEADLINE");
    }
    let lapic = a.lapic.expect("LAPIC");
    assert_eq!(lapic_reg(&lapic, APIC_TPR), 0x50);
    assert_eq!(lapic_reg(&lapic, APIC_LVTT), 2 << 17 | 0xec);
    assert_eq!(lapic_reg(&lapic, APIC_SPIV), 0x1ff);
    assert_eq!(a.events.nmi.pending, 1);
    assert_eq!(a.events.exception.nr, 13);
    assert_eq!(a.debugregs.db[2], 0xffff_8000_0000_3000);
    assert_eq!(a.mp_state.mp_state, KVM_MP_STATE_HALTED);

    a.restore(&dst.vcpu, &dst.caps)
        .expect("restore into the second VM");
    let b = VcpuState::save(&dst.vcpu, &dst.caps).expect("read back");

    assert_eq!(a.regs, b.regs, "regs");
    assert_eq!(a.sregs, b.sregs, "sregs");
    assert!(a.fpu == b.fpu, "the XSAVE area differs");
    assert_eq!(a.xcrs, b.xcrs, "xcrs");
    let (la, lb) = (a.lapic.expect("LAPIC"), b.lapic.expect("LAPIC"));
    for off in (0..1024).step_by(16).filter(|&o| o != APIC_TMCCT) {
        assert_eq!(
            lapic_reg(&la, off),
            lapic_reg(&lb, off),
            "LAPIC register {off:#x}"
        );
    }
    assert_eq!(a.events, b.events, "vcpu_events");
    assert_eq!(a.debugregs, b.debugregs, "debugregs");
    assert_eq!(a.mp_state, b.mp_state, "mp_state");
    let indices: Vec<u32> = a.msrs.iter().map(|m| m.0).collect();
    let b_indices: Vec<u32> = b.msrs.iter().map(|m| m.0).collect();
    assert_eq!(indices, b_indices, "the MSR lists differ");
    for (&(index, va), &(_, vb)) in a.msrs.iter().zip(&b.msrs) {
        if index == msr::IA32_TSC {
            // The restored TSC goes on from the saved one.
            assert!(
                vb >= va && vb - va < 1 << 40,
                "TSC: saved {va:#x}, read back {vb:#x}"
            );
        } else {
            assert_eq!(va, vb, "MSR {index:#x}");
        }
    }
}

fn chip_bytes(c: &kvm_irqchip) -> &[u8] {
    c.as_bytes()
}

/// Offsets inside `kvm_irqchip`'s chip union (after chip_id and pad).
const PIC_IMR: usize = 8 + 2;
const PIC_IRQ_BASE: usize = 8 + 5;
const IOAPIC_REDIR2: usize = 8 + 24 + 2 * 8;

#[test]
fn irqchip_pit_and_clock_survive_save_and_restore() {
    if !kvm_available() {
        return;
    }
    let kvm = Kvm::new().expect("open /dev/kvm");
    let src = test_vm(&kvm, |_| {});
    let dst = test_vm(&kvm, |_| {});

    for (id, imr, base) in [
        (KVM_IRQCHIP_PIC_MASTER, 0xfa, 0x20),
        (KVM_IRQCHIP_PIC_SLAVE, 0x7f, 0x28),
    ] {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        src.vm.get_irqchip(&mut chip).expect("get_irqchip");
        chip.as_mut_bytes()[PIC_IMR] = imr;
        chip.as_mut_bytes()[PIC_IRQ_BASE] = base;
        src.vm.set_irqchip(&chip).expect("set_irqchip");
    }
    let mut ioapic = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    src.vm.get_irqchip(&mut ioapic).expect("get_irqchip");
    let redir: u64 = 0x0300_0000_0001_a032; // dest 3, masked, level, vector 0x32
    ioapic.as_mut_bytes()[IOAPIC_REDIR2..IOAPIC_REDIR2 + 8].copy_from_slice(&redir.to_le_bytes());
    src.vm.set_irqchip(&ioapic).expect("set_irqchip");

    let mut pit = src.vm.get_pit2().expect("get_pit2");
    pit.channels[0].count = 0x1234;
    pit.channels[0].mode = 2;
    pit.channels[2].count = 0x4321;
    pit.channels[2].mode = 3;
    src.vm.set_pit2(&pit).expect("set_pit2");

    let clock = 123_000_000_000;
    src.vm
        .set_clock(&kvm_clock_data {
            clock,
            ..Default::default()
        })
        .expect("set_clock");

    let a = VmState::save(&src.vm).expect("save the VM state");
    let mut blob = Vec::new();
    a.encode(&mut blob);
    let a = VmState::decode(&blob).expect("decode the VM state");
    let chip = a.irqchip.as_ref().expect("the irqchip was saved");
    assert_eq!(chip_bytes(&chip.pic_master)[PIC_IMR], 0xfa);
    assert_eq!(chip_bytes(&chip.pic_slave)[PIC_IRQ_BASE], 0x28);
    assert_eq!(
        chip_bytes(&chip.ioapic)[IOAPIC_REDIR2..IOAPIC_REDIR2 + 8],
        redir.to_le_bytes()
    );
    let saved_pit = a.pit.expect("the PIT was saved");
    assert_eq!(saved_pit.channels[0].count, 0x1234);

    std::thread::sleep(Duration::from_millis(20));
    a.restore(&dst.vm).expect("restore into the second VM");
    let b = VmState::save(&dst.vm).expect("read back");

    let (ca, cb) = (chip, b.irqchip.as_ref().expect("irqchip"));
    assert_eq!(
        chip_bytes(&ca.pic_master),
        chip_bytes(&cb.pic_master),
        "PIC master"
    );
    assert_eq!(
        chip_bytes(&ca.pic_slave),
        chip_bytes(&cb.pic_slave),
        "PIC slave"
    );
    assert_eq!(chip_bytes(&ca.ioapic), chip_bytes(&cb.ioapic), "IOAPIC");
    let pb = b.pit.expect("PIT");
    assert_eq!(saved_pit.flags, pb.flags, "PIT flags");
    for (i, (x, y)) in saved_pit.channels.iter().zip(&pb.channels).enumerate() {
        // count_load_time is the host's time of the load, not guest state.
        let (mut x, mut y) = (*x, *y);
        x.count_load_time = 0;
        y.count_load_time = 0;
        assert_eq!(x, y, "PIT channel {i}");
    }
    // The clock never goes back, and goes on by about the time in flight
    // when the source's KVM reported the wall-clock time with it.
    let (sa, sb) = (a.clock.clock, b.clock.clock);
    assert!(sa >= clock, "the saved clock went back");
    assert!(
        sb >= sa && sb - sa < 5_000_000_000,
        "clock: saved {sa}, restored {sb}"
    );
    if a.clock.flags & kvm_bindings::KVM_CLOCK_REALTIME != 0 {
        assert!(sb - sa >= 20_000_000, "the 20 ms in flight were not added");
    }
    eprintln!(
        "MEASURE kvmclock advanced {} us over a 20 ms gap (flags {:#x})",
        (sb - sa) / 1000,
        a.clock.flags
    );
}

#[test]
fn vm_without_irqchip_saves_only_its_clock() {
    if !kvm_available() {
        return;
    }
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("create_vm");
    let st = VmState::save(&vm).expect("save");
    assert!(st.irqchip.is_none() && st.pit.is_none());
    let other = test_vm(&kvm, |_| {});
    // A destination with devices the source lacked keeps its own.
    st.restore(&other.vm).expect("restore the clock");
    // A destination lacking the source's devices refuses.
    let full = VmState::save(&other.vm).expect("save");
    let err = full.restore(&vm).expect_err("no irqchip to restore into");
    assert!(err.to_string().contains("KVM_SET_IRQCHIP"), "{err}");
}

#[test]
fn cpu_model_check_names_each_difference() {
    if !kvm_available() {
        return;
    }
    let kvm = Kvm::new().expect("open /dev/kvm");
    let src = test_vm(&kvm, |_| {});
    let dst = test_vm(&kvm, |_| {});
    let source = CpuModel::capture(&src.vcpu, 1).expect("capture");
    let here = CpuModel::capture(&dst.vcpu, 1).expect("capture");
    assert!(!source.cpuid.is_empty() && source.tsc_khz > 0);
    let mut blob = Vec::new();
    source.encode(&mut blob);
    let source = CpuModel::decode(&blob).expect("decode");
    here.check(&source).expect("equal models are compatible");

    // A per-vCPU field (the initial APIC ID) may differ.
    let mut other_apic = source.clone();
    let leaf1 = other_apic
        .cpuid
        .iter_mut()
        .find(|e| e.function == 1)
        .expect("leaf 1");
    leaf1.ebx ^= 3 << 24;
    here.check(&other_apic).expect("APIC IDs differ per vCPU");

    // A changed feature leaf: leaf 7 EBX with its lowest feature bit
    // cleared, as a destination with less would report it.
    let leaf7 = *here
        .cpuid
        .iter()
        .find(|e| e.function == 7 && e.index == 0)
        .expect("leaf 7");
    let bit = (0..32)
        .find(|b| leaf7.ebx >> b & 1 == 1)
        .expect("a leaf 7 EBX feature");
    let mut less = source.clone();
    for e in less
        .cpuid
        .iter_mut()
        .filter(|e| e.function == 7 && e.index == 0)
    {
        e.ebx &= !(1 << bit);
    }
    let err = here.check(&less).expect_err("a changed leaf");
    assert_eq!(
        err,
        Mismatch::CpuidRegister {
            function: 7,
            index: 0,
            register: CpuidRegister::Ebx,
            source: leaf7.ebx & !(1 << bit),
            destination: leaf7.ebx,
        }
    );
    let text = err.to_string();
    assert!(
        text.starts_with("CPUID function 0x7 index 0: EBX differs (source 0x"),
        "{text}"
    );

    let mut faster = source.clone();
    faster.tsc_khz += 100_000;
    let err = here.check(&faster).expect_err("another TSC frequency");
    assert_eq!(
        err.to_string(),
        format!(
            "TSC frequency: source {} kHz, destination {} kHz",
            faster.tsc_khz, here.tsc_khz
        )
    );

    let mut four = source.clone();
    four.vcpus = 4;
    let err = here.check(&four).expect_err("another vCPU count");
    assert_eq!(err.to_string(), "vCPU count: source 4, destination 1");

    let mut extra = source.clone();
    let mut leaf = extra.cpuid[0];
    leaf.function = 0x4000_00ff;
    leaf.index = 0;
    extra.cpuid.push(leaf);
    assert_eq!(
        here.check(&extra),
        Err(Mismatch::CpuidLeaf {
            function: 0x4000_00ff,
            index: 0,
            on_source: true
        })
    );
}

#[test]
fn vcpu_without_in_kernel_lapic_round_trips() {
    if !kvm_available() {
        return;
    }
    let kvm = Kvm::new().expect("open /dev/kvm");
    let bare = || {
        let vm = kvm.create_vm().expect("create_vm");
        let vcpu = vm.create_vcpu(0).expect("create_vcpu");
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("supported cpuid");
        vcpu.set_cpuid2(&cpuid).expect("set_cpuid2");
        let caps = VcpuCaps::probe(&kvm, &vm, &vcpu).expect("probe");
        TestVm { vm, vcpu, caps }
    };
    let (src, dst) = (bare(), bare());
    assert!(!src.caps.lapic(), "no irqchip, so no in-kernel LAPIC");
    // MSRs KVM reads but will not set without a LAPIC are left out.
    assert!(
        !src.caps.msrs().contains(0x4b56_4d06),
        "MSR_KVM_ASYNC_PF_INT"
    );
    let mut regs = src.vcpu.get_regs().expect("get_regs");
    regs.rbx = 0xfeed_f00d;
    src.vcpu.set_regs(&regs).expect("set_regs");
    let a = through_the_wire(&src.vcpu, &src.caps);
    assert!(a.lapic.is_none());
    a.restore(&dst.vcpu, &dst.caps).expect("restore");
    let b = VcpuState::save(&dst.vcpu, &dst.caps).expect("read back");
    assert_eq!(b.regs.rbx, 0xfeed_f00d);
    assert_eq!(a.sregs, b.sregs, "sregs");
    assert!(a.fpu == b.fpu, "the XSAVE area differs");
    assert_eq!(a.events, b.events, "vcpu_events");
    assert_eq!(a.mp_state, b.mp_state, "mp_state");
    // The VM has no irqchip or PIT to carry.
    let vm_state = VmState::save(&src.vm).expect("save");
    assert!(vm_state.irqchip.is_none() && vm_state.pit.is_none());
}

/// Guest code at [`CODE_GPA`], 16-bit real mode: `inc ebx; out 0x80, al;
/// jmp $-6`. Every port exit reports one more in rbx.
const CODE: [u8; 6] = [0x66, 0x43, 0xe6, 0x80, 0xeb, 0xfa];
const CODE_GPA: u64 = 0x1000;
const RAM_BYTES: usize = 0x10000;

/// Anonymous host memory registered as the VM's RAM at guest-physical 0.
struct Ram {
    addr: *mut libc::c_void,
}

impl Ram {
    fn new(vm: &VmFd) -> Ram {
        // SAFETY: a fresh private anonymous mapping; no Rust object
        // overlaps it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED, "mmap guest RAM");
        // SAFETY: the mapping is RAM_BYTES long and CODE_GPA + CODE fits
        // in it; no vCPU runs yet, so nothing else touches it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                CODE.as_ptr(),
                addr.cast::<u8>().add(CODE_GPA as usize),
                CODE.len(),
            )
        };
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: RAM_BYTES as u64,
            userspace_addr: addr as u64,
        };
        // SAFETY: the mapping stays valid until `Ram` drops, which is
        // after its VM (see `RunVm`).
        unsafe { vm.set_user_memory_region(region) }.expect("memslot");
        Ram { addr }
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `Ram::new`; its VM is gone.
        unsafe { libc::munmap(self.addr, RAM_BYTES) };
    }
}

/// A VM and the RAM registered with it. Fields drop in declaration
/// order, so the VM goes before its RAM is unmapped, even on a panic.
struct RunVm {
    t: TestVm,
    _ram: Ram,
}

fn run_vm(kvm: &Kvm) -> RunVm {
    let t = test_vm(kvm, |_| {});
    let ram = Ram::new(&t.vm);
    RunVm { t, _ram: ram }
}

/// Runs `vcpu` to its next port exit and returns rbx there, with the
/// port I/O completed (one more entry with `immediate_exit`), so the
/// vCPU is outside `KVM_RUN` at a consistent point.
fn run_to_exit(vcpu: &mut VcpuFd) -> u64 {
    match vcpu.run().expect("KVM_RUN") {
        kvm_ioctls::VcpuExit::IoOut(0x80, _) => {}
        other => panic!("unexpected exit {other:?}"),
    }
    vcpu.set_kvm_immediate_exit(1);
    let e = vcpu.run().expect_err("immediate exit");
    assert_eq!(e.errno(), libc::EINTR);
    vcpu.set_kvm_immediate_exit(0);
    vcpu.get_regs().expect("get_regs").rbx
}

#[test]
fn restored_vcpu_runs_on_from_where_it_stopped() {
    if !kvm_available() {
        return;
    }
    let kvm = Kvm::new().expect("open /dev/kvm");
    let mut src = run_vm(&kvm);
    let mut dst = run_vm(&kvm);
    let (src, dst) = (&mut src.t, &mut dst.t);
    let mut sregs = src.vcpu.get_sregs().expect("get_sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    src.vcpu.set_sregs(&sregs).expect("set_sregs");
    let mut regs = src.vcpu.get_regs().expect("get_regs");
    regs.rip = CODE_GPA;
    regs.rflags = 2;
    regs.rbx = 0;
    src.vcpu.set_regs(&regs).expect("set_regs");

    for want in 1..=100 {
        assert_eq!(run_to_exit(&mut src.vcpu), want);
    }
    let vcpu_state = through_the_wire(&src.vcpu, &src.caps);
    let mut vm_blob = Vec::new();
    VmState::save(&src.vm).expect("save").encode(&mut vm_blob);
    VmState::decode(&vm_blob)
        .expect("decode")
        .restore(&dst.vm)
        .expect("restore the VM state");
    vcpu_state
        .restore(&dst.vcpu, &dst.caps)
        .expect("restore the vCPU state");

    // The destination goes on counting from 100, and so would the source.
    for want in 101..=200 {
        assert_eq!(run_to_exit(&mut dst.vcpu), want);
    }
    assert_eq!(run_to_exit(&mut src.vcpu), 101);
}
