//! The source guest as the driver touches it: every call the driver makes
//! on the VM's memory and its vCPU goes through these few methods (the
//! dirty log has its own, in `dirty_log.rs`).

use livemig_core::wire::{self, DeviceId};

use super::super::{CPU_DEVICE_ID, CPU_STATE_VERSION};
use super::failure::SourceFailure;
use crate::memory::GuestMemory;
use crate::vcpu::{Vcpu, VcpuError};
use crate::vm::Vm;

/// The VM and its vCPU, borrowed for the migration.
pub(super) struct SourceGuest<'e> {
    pub(super) vm: &'e Vm,
    pub(super) vcpu: &'e Vcpu,
}

impl SourceGuest<'_> {
    /// Guest RAM, read by the engine's zero-page checks and sent from.
    pub(super) fn ram(&self) -> &GuestMemory {
        self.vm.ram()
    }

    /// Pauses the vCPU; returns the guest generation it had reached.
    pub(super) fn pause(&self) -> Result<u64, VcpuError> {
        self.vcpu.pause()?;
        Ok(self.vcpu.stats().generation)
    }

    /// Lets the vCPU run again.
    pub(super) fn resume(&self) -> Result<(), VcpuError> {
        self.vcpu.resume()
    }

    /// Holds the guest to at most `pages_per_sec` newly dirtied pages a
    /// second (0: no limit).
    pub(super) fn limit_dirty_rate(&self, pages_per_sec: u64) {
        self.vcpu.set_dirty_rate_limit(pages_per_sec);
    }

    /// The device state as `Device` records: the stopped vCPU's registers.
    pub(super) fn device_records(&self) -> Result<Vec<u8>, SourceFailure> {
        let blob = self.vcpu.save_state().map_err(SourceFailure::SaveVcpu)?;
        let id = DeviceId::new(CPU_DEVICE_ID)
            .map_err(|e| SourceFailure::DeviceRecord(wire::EncodeError::Id(e)))?;
        let mut records = vec![0u8; 64];
        let n = wire::encode_device_header(&mut records, id, 0, CPU_STATE_VERSION, blob.len())
            .map_err(SourceFailure::DeviceRecord)?;
        records.truncate(n);
        records.extend_from_slice(&blob);
        Ok(records)
    }
}
