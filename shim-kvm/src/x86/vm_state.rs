//! The VM-wide state KVM keeps in the kernel: the in-kernel irqchip (two
//! 8259 PICs and the IOAPIC), the 8254 PIT, and kvmclock.
//!
//! Each device is saved only when the VM has it: `KVM_GET_IRQCHIP` and
//! `KVM_GET_PIT2` fail with ENXIO on a VM that never created them; every
//! VM has a clock. Save after the vCPUs stopped; restore before the
//! destination's vCPUs first run.

use kvm_bindings::{
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    kvm_clock_data, kvm_irqchip, kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use zerocopy::IntoBytes;

use super::error::{Blob, StateError, kvm};
use super::wire::{self, Writer};

/// Blob magic ("LMVM" little-endian).
const MAGIC: u32 = 0x4D56_4D4C;
/// Layout version written by [`VmState::encode`].
const VERSION: u16 = 1;

const TAG_PIC_MASTER: u32 = 1;
const TAG_PIC_SLAVE: u32 = 2;
const TAG_IOAPIC: u32 = 3;
const TAG_PIT: u32 = 4;
const TAG_CLOCK: u32 = 5;

pub(super) const SECTION_NAMES: &[(u32, &str)] = &[
    (TAG_PIC_MASTER, "pic master"),
    (TAG_PIC_SLAVE, "pic slave"),
    (TAG_IOAPIC, "ioapic"),
    (TAG_PIT, "pit2"),
    (TAG_CLOCK, "kvmclock"),
];

/// The in-kernel irqchip's three chips, as `KVM_GET_IRQCHIP` gives them.
#[derive(Clone)]
pub struct Irqchip {
    /// The master 8259 PIC (IRQ 0-7).
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC (IRQ 8-15).
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
}

impl std::fmt::Debug for Irqchip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // kvm_irqchip is a union of the chip kinds: no Debug of its own.
        f.debug_struct("Irqchip").finish_non_exhaustive()
    }
}

/// The VM-wide in-kernel device state.
#[derive(Clone)]
pub struct VmState {
    /// The irqchip, when the VM has one (`create_irq_chip`).
    pub irqchip: Option<Irqchip>,
    /// The PIT, when the VM has one (`create_pit2`).
    pub pit: Option<kvm_pit_state2>,
    /// kvmclock, as `KVM_GET_CLOCK` gives it.
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("irqchip", &self.irqchip.is_some())
            .field("pit", &self.pit.is_some())
            .field("clock", &self.clock.clock)
            .finish()
    }
}

/// `Ok(None)` for ENXIO (the device was never created), the error else.
fn absent_if_enxio<T>(
    r: Result<T, kvm_ioctls::Error>,
    op: &'static str,
) -> Result<Option<T>, StateError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.errno() == libc::ENXIO => Ok(None),
        Err(e) => Err(kvm(op)(e)),
    }
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<Option<kvm_irqchip>, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    absent_if_enxio(vm.get_irqchip(&mut chip).map(|()| chip), "KVM_GET_IRQCHIP")
}

impl VmState {
    /// Reads the devices `vm` has, and its clock.
    pub fn save(vm: &VmFd) -> Result<VmState, StateError> {
        let irqchip = match get_chip(vm, KVM_IRQCHIP_PIC_MASTER)? {
            None => None,
            Some(pic_master) => Some(Irqchip {
                pic_master,
                pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?.ok_or(StateError::Kvm {
                    op: "KVM_GET_IRQCHIP (slave PIC)",
                    errno: libc::ENXIO,
                })?,
                ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?.ok_or(StateError::Kvm {
                    op: "KVM_GET_IRQCHIP (IOAPIC)",
                    errno: libc::ENXIO,
                })?,
            }),
        };
        Ok(VmState {
            irqchip,
            pit: absent_if_enxio(vm.get_pit2(), "KVM_GET_PIT2")?,
            clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes the state into `vm`, which must have the same devices (an
    /// absent one fails with ENXIO). The clock is set with
    /// `KVM_CLOCK_REALTIME` when the source's KVM reported it: KVM then
    /// adds the wall-clock time since the save (never subtracts), so
    /// kvmclock goes on from where it was plus the time in flight instead
    /// of standing still or jumping back. Without it the clock resumes at
    /// the saved value.
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        if let Some(chip) = &self.irqchip {
            for c in [&chip.pic_master, &chip.pic_slave, &chip.ioapic] {
                vm.set_irqchip(c).map_err(kvm("KVM_SET_IRQCHIP"))?;
            }
        }
        if let Some(pit) = &self.pit {
            vm.set_pit2(pit).map_err(kvm("KVM_SET_PIT2"))?;
        }
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            flags: self.clock.flags & KVM_CLOCK_REALTIME,
            realtime: self.clock.realtime,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))
    }

    /// Appends the state's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(MAGIC, VERSION);
        if let Some(chip) = &self.irqchip {
            w.section(TAG_PIC_MASTER, chip.pic_master.as_bytes());
            w.section(TAG_PIC_SLAVE, chip.pic_slave.as_bytes());
            w.section(TAG_IOAPIC, chip.ioapic.as_bytes());
        }
        if let Some(pit) = &self.pit {
            w.section(TAG_PIT, pit.as_bytes());
        }
        w.section(TAG_CLOCK, self.clock.as_bytes());
        w.finish(out);
    }

    /// Parses an encoding from [`VmState::encode`]. The irqchip sections
    /// come as all three or none, each carrying its own chip id.
    pub fn decode(bytes: &[u8]) -> Result<VmState, StateError> {
        const B: Blob = Blob::VmState;
        let (mut master, mut slave, mut ioapic, mut pit, mut clock) =
            (None, None, None, None, None);
        for (tag, body) in wire::sections(B, MAGIC, VERSION, bytes)? {
            match tag {
                TAG_PIC_MASTER => wire::set_once(&mut master, B, tag, chip(tag, body)?)?,
                TAG_PIC_SLAVE => wire::set_once(&mut slave, B, tag, chip(tag, body)?)?,
                TAG_IOAPIC => wire::set_once(&mut ioapic, B, tag, chip(tag, body)?)?,
                TAG_PIT => wire::set_once(&mut pit, B, tag, wire::pod(B, tag, body)?)?,
                TAG_CLOCK => wire::set_once(&mut clock, B, tag, wire::pod(B, tag, body)?)?,
                _ => return Err(StateError::UnknownSection { blob: B, tag }),
            }
        }
        let irqchip = match (master, slave, ioapic) {
            (None, None, None) => None,
            (master, slave, ioapic) => Some(Irqchip {
                pic_master: wire::required(master, B, TAG_PIC_MASTER)?,
                pic_slave: wire::required(slave, B, TAG_PIC_SLAVE)?,
                ioapic: wire::required(ioapic, B, TAG_IOAPIC)?,
            }),
        };
        Ok(VmState {
            irqchip,
            pit,
            clock: wire::required(clock, B, TAG_CLOCK)?,
        })
    }
}

/// An irqchip section, whose chip id must be the one its tag names.
fn chip(tag: u32, body: &[u8]) -> Result<kvm_irqchip, StateError> {
    let chip: kvm_irqchip = wire::pod(Blob::VmState, tag, body)?;
    let want = match tag {
        TAG_PIC_MASTER => KVM_IRQCHIP_PIC_MASTER,
        TAG_PIC_SLAVE => KVM_IRQCHIP_PIC_SLAVE,
        _ => KVM_IRQCHIP_IOAPIC,
    };
    if chip.chip_id != want {
        return Err(StateError::BadChipId {
            tag,
            chip_id: chip.chip_id,
        });
    }
    Ok(chip)
}

#[cfg(test)]
mod tests {
    use zerocopy::FromZeros;

    use super::*;
    use crate::x86::wire;
    use crate::x86::wire::tests::rejects_prefixes_survives_flips;

    fn chip_of(chip_id: u32) -> kvm_irqchip {
        let mut c = kvm_irqchip::new_zeroed();
        c.chip_id = chip_id;
        c.as_mut_bytes()[10] = 0xfa;
        c
    }

    fn sample(devices: bool) -> VmState {
        let mut pit = kvm_pit_state2::default();
        pit.channels[0].count = 0x1234;
        VmState {
            irqchip: devices.then(|| Irqchip {
                pic_master: chip_of(KVM_IRQCHIP_PIC_MASTER),
                pic_slave: chip_of(KVM_IRQCHIP_PIC_SLAVE),
                ioapic: chip_of(KVM_IRQCHIP_IOAPIC),
            }),
            pit: devices.then_some(pit),
            clock: kvm_clock_data {
                clock: 99,
                flags: KVM_CLOCK_REALTIME,
                realtime: 5,
                ..Default::default()
            },
        }
    }

    fn encoded(s: &VmState) -> Vec<u8> {
        let mut b = Vec::new();
        s.encode(&mut b);
        b
    }

    /// A blob of the given sections, in order.
    fn blob_of(sections: &[(u32, &[u8])]) -> Vec<u8> {
        wire::tests::blob_of(MAGIC, VERSION, sections)
    }

    #[test]
    fn roundtrips_with_and_without_devices() {
        for devices in [true, false] {
            let blob = encoded(&sample(devices));
            let back = VmState::decode(&blob).unwrap();
            assert_eq!(back.irqchip.is_some(), devices);
            assert_eq!(
                back.pit.map(|p| p.channels[0].count),
                devices.then_some(0x1234)
            );
            assert_eq!(back.clock, sample(devices).clock);
            assert_eq!(encoded(&back), blob);
        }
    }

    #[test]
    fn every_prefix_is_rejected_and_no_flip_panics() {
        rejects_prefixes_survives_flips(&encoded(&sample(true)), VmState::decode);
    }

    #[test]
    fn irqchip_sections_are_checked() {
        let clock = kvm_clock_data::default();
        let master = chip_of(KVM_IRQCHIP_PIC_MASTER);
        let err = |b: Vec<u8>| VmState::decode(&b).unwrap_err();
        assert_eq!(
            err(blob_of(&[
                (TAG_PIC_MASTER, master.as_bytes()),
                (TAG_CLOCK, clock.as_bytes())
            ])),
            StateError::MissingSection {
                blob: Blob::VmState,
                tag: TAG_PIC_SLAVE
            }
        );
        assert_eq!(
            err(blob_of(&[(TAG_PIC_SLAVE, master.as_bytes())])),
            StateError::BadChipId {
                tag: TAG_PIC_SLAVE,
                chip_id: KVM_IRQCHIP_PIC_MASTER
            }
        );
        assert_eq!(
            err(blob_of(&[])),
            StateError::MissingSection {
                blob: Blob::VmState,
                tag: TAG_CLOCK
            }
        );
        assert!(matches!(
            err(blob_of(&[(TAG_PIT, &[0; 3])])),
            StateError::BadSectionLength {
                tag: TAG_PIT,
                len: 3,
                ..
            }
        ));
    }
}
