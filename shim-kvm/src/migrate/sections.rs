//! The sections livemig writes itself, beside the VMM's devices: their
//! ids and versions, and the framing of one Device record.
//!
//! At setup, before any RAM, the source sends the CPU model record
//! ([`CPU_MODEL_SECTION`]) and the runstate ([`RUNSTATE_SECTION`]); the
//! destination refuses a model that is not its own before a page moves.
//! After the stop come one [`CPU_SECTION`] per vCPU (instance = vCPU
//! index), the VM-wide in-kernel devices ([`VM_SECTION`]), then the VMM's
//! [`DeviceSection`]s.

use livemig_core::wire::{self, DeviceId, EncodeError, RECORD_HEADER_LEN};

use super::MigrateError;
use crate::vmm::DeviceSection;

/// The CPU model record ([`crate::x86::CpuModel`]), sent at setup.
pub const CPU_MODEL_SECTION: &str = "cpu-model";
/// Version of the CPU model record.
pub const CPU_MODEL_VERSION: u32 = 1;
/// Whether the source guest was running, sent at setup: one byte, 1 for
/// running, 0 for paused.
pub const RUNSTATE_SECTION: &str = "runstate";
/// Version of the runstate record.
pub const RUNSTATE_VERSION: u32 = 1;
/// One vCPU's state ([`crate::x86::VcpuState`]), instance = vCPU index.
pub const CPU_SECTION: &str = "cpu";
/// Version of the vCPU state record: the blob layout of
/// [`crate::x86::VcpuState::encode`].
pub const CPU_STATE_VERSION: u32 = 2;
/// The VM-wide in-kernel devices ([`crate::x86::VmState`]: irqchip, PIT,
/// kvmclock, each when the VM has it).
pub const VM_SECTION: &str = "kvm-vm";
/// Version of the VM-wide record.
pub const VM_STATE_VERSION: u32 = 1;

/// The ids above: a VMM's device may not use them.
const RESERVED: [&str; 4] = [CPU_MODEL_SECTION, RUNSTATE_SECTION, CPU_SECTION, VM_SECTION];

/// Refuses VMM devices that livemig could not tell apart in a stream: one
/// with an id livemig writes itself, or two with the same id and instance.
pub(crate) fn check_devices(devices: &[Box<dyn DeviceSection>]) -> Result<(), MigrateError> {
    let mut seen = std::collections::HashSet::new();
    for d in devices {
        if RESERVED.contains(&d.id()) {
            return Err(MigrateError::ReservedSection(d.id().to_string()));
        }
        if !seen.insert((d.id(), d.instance())) {
            return Err(MigrateError::DuplicateSection {
                id: d.id().to_string(),
                instance: d.instance(),
            });
        }
    }
    Ok(())
}

/// The longest Device record header: the record header, the id's length
/// byte, at most 255 id bytes, the instance and the version.
const MAX_DEVICE_HEADER: usize = RECORD_HEADER_LEN + 1 + 255 + 8;

/// Appends one Device record (`id`, `instance`, `version`, `data`) to
/// `out`.
pub(crate) fn append_record(
    out: &mut Vec<u8>,
    id: &str,
    instance: u32,
    version: u32,
    data: &[u8],
) -> Result<(), EncodeError> {
    let id = DeviceId::new(id).map_err(EncodeError::Id)?;
    let mut header = [0u8; MAX_DEVICE_HEADER];
    let n = wire::encode_device_header(&mut header, id, instance, version, data.len())?;
    out.extend_from_slice(header.get(..n).unwrap_or_default());
    out.extend_from_slice(data);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_frames_its_state_and_refuses_a_long_id() {
        let mut out = Vec::new();
        append_record(&mut out, "serial", 3, 7, b"state").unwrap();
        // Record header, id length and id, instance and version, the state.
        assert_eq!(out.len(), RECORD_HEADER_LEN + 1 + 6 + 8 + 5);
        assert!(out.ends_with(b"state"));
        let mut long = Vec::new();
        append_record(&mut long, &"x".repeat(255), 0, 1, b"").unwrap();
        assert_eq!(long.len(), MAX_DEVICE_HEADER);
        assert!(append_record(&mut long, &"y".repeat(256), 0, 1, b"").is_err());
    }
}
