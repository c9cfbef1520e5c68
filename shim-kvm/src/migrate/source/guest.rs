//! The source guest as the driver touches it: every call the driver makes
//! on the VMM's vCPUs and devices goes through these few methods (the
//! dirty log has its own, in `dirty_log.rs`).

use super::super::sections::{
    self, CPU_MODEL_SECTION, CPU_MODEL_VERSION, CPU_SECTION, CPU_STATE_VERSION, RUNSTATE_SECTION,
    RUNSTATE_VERSION, VM_SECTION, VM_STATE_VERSION,
};
use super::super::vcpu_access::on_vcpu;
use super::SourceVm;
use super::failure::SourceFailure;
use crate::memory::GuestMemory;
use crate::vmm::VmmError;
use crate::x86::{CpuModel, VcpuCaps, VcpuState, VmState};

/// The VMM's guest, lent for the migration, with what livemig learned of
/// its vCPUs at the start.
pub(super) struct SourceGuest {
    pub(super) vm: SourceVm,
    pub(super) caps: VcpuCaps,
    pub(super) model: CpuModel,
}

impl SourceGuest {
    /// Guest RAM, read by the engine's zero-page checks and sent from.
    pub(super) fn ram(&self) -> &GuestMemory {
        &self.vm.memory
    }

    /// Pauses the vCPUs of a running guest (a paused one stays as it is).
    pub(super) fn pause(&self) -> Result<(), VmmError> {
        if self.vm.running {
            self.vm.vcpus.pause_all()?;
        }
        Ok(())
    }

    /// The kernel thread ids of the VMM's vCPU threads, as far as it tells.
    pub(super) fn vcpu_threads(&self) -> Vec<i32> {
        self.vm.vcpus.thread_ids()
    }

    /// Lets the vCPUs of a guest that was running go on.
    pub(super) fn resume(&self) -> Result<(), VmmError> {
        if self.vm.running {
            self.vm.vcpus.resume_all()?;
        }
        Ok(())
    }

    /// Holds the vCPUs back for `percent` % of their time (0: not at all).
    pub(super) fn throttle(&self, percent: u8) -> Result<(), VmmError> {
        self.vm.vcpus.throttle(percent)
    }

    /// The setup-time sections: the CPU model and the runstate.
    pub(super) fn setup_records(&self) -> Result<Vec<u8>, SourceFailure> {
        let mut model = Vec::new();
        self.model.encode(&mut model);
        let mut out = Vec::new();
        sections::append_record(&mut out, CPU_MODEL_SECTION, 0, CPU_MODEL_VERSION, &model)
            .map_err(SourceFailure::DeviceRecord)?;
        let running = [u8::from(self.vm.running)];
        sections::append_record(&mut out, RUNSTATE_SECTION, 0, RUNSTATE_VERSION, &running)
            .map_err(SourceFailure::DeviceRecord)?;
        Ok(out)
    }

    /// Tells each device the vCPUs stopped
    /// ([`crate::vmm::DeviceSection::before_save`]): called before the
    /// last dirty-log sync, so what a device writes while it quiesces is
    /// still sent.
    pub(super) fn quiesce_devices(&mut self) -> Result<(), SourceFailure> {
        for device in &mut self.vm.devices {
            device
                .before_save()
                .map_err(|error| SourceFailure::SaveDevice {
                    id: device.id().to_string(),
                    instance: device.instance(),
                    error,
                })?;
        }
        Ok(())
    }

    /// The state after the stop as Device records: every vCPU, the
    /// VM-wide devices and the VMM's devices.
    pub(super) fn device_records(&mut self) -> Result<Vec<u8>, SourceFailure> {
        let mut out = Vec::new();
        let mut blob = Vec::new();
        for index in 0..self.vm.vcpus.count() {
            let caps = &self.caps;
            let state = on_vcpu(self.vm.vcpus.as_ref(), index, |fd| {
                VcpuState::save(fd, caps)
            })
            .map_err(SourceFailure::SaveVcpu)?;
            blob.clear();
            state.encode(&mut blob);
            let instance = u32::try_from(index).map_err(|_| SourceFailure::TooManyVcpus(index))?;
            sections::append_record(&mut out, CPU_SECTION, instance, CPU_STATE_VERSION, &blob)
                .map_err(SourceFailure::DeviceRecord)?;
        }
        let vm_state = VmState::save(&self.vm.vm).map_err(SourceFailure::SaveVmState)?;
        blob.clear();
        vm_state.encode(&mut blob);
        sections::append_record(&mut out, VM_SECTION, 0, VM_STATE_VERSION, &blob)
            .map_err(SourceFailure::DeviceRecord)?;
        for device in &mut self.vm.devices {
            blob.clear();
            let (id, instance) = (device.id().to_string(), device.instance());
            device
                .save(&mut blob)
                .map_err(|error| SourceFailure::SaveDevice {
                    id: id.clone(),
                    instance,
                    error,
                })?;
            sections::append_record(&mut out, &id, instance, device.version(), &blob)
                .map_err(SourceFailure::DeviceRecord)?;
        }
        Ok(out)
    }
}
