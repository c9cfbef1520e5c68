//! What a VMM lends livemig: its vCPUs, its devices' state, and the guest
//! pages its devices write. livemig owns none of these; the VMM implements
//! the traits below over the objects it already has.
//!
//! Threads: livemig calls these from its own migration thread (and, on a
//! destination in postcopy, never from the fault thread). Every method may
//! be called while the VMM's vCPU threads run, except where it says that
//! the vCPUs are paused.

use kvm_ioctls::VcpuFd;

/// A failure inside the VMM (its vCPU threads, a device). livemig reports
/// it as the migration's error and, on the source, leaves the guest
/// running.
pub type VmmError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The VMM's vCPUs. livemig never runs `KVM_RUN`: the VMM's own threads do,
/// and livemig asks them to stop and go on.
pub trait Vcpus: Send + Sync {
    /// How many vCPUs the guest has (indices `0 .. count()`).
    fn count(&self) -> usize;

    /// Stops every vCPU and returns once each is outside `KVM_RUN`, its
    /// last exit (port or MMIO I/O) completed, and will not enter it again
    /// until [`Vcpus::resume_all`]. The stop of a migration's downtime.
    fn pause_all(&self) -> Result<(), VmmError>;

    /// Lets the paused vCPUs run again.
    fn resume_all(&self) -> Result<(), VmmError>;

    /// Calls `f` with vCPU `index`'s file descriptor. Only called between
    /// [`Vcpus::pause_all`] and [`Vcpus::resume_all`] (or before the
    /// destination's vCPUs ever ran), so no `KVM_RUN` is in progress.
    fn with_vcpu(&self, index: usize, f: &mut dyn FnMut(&VcpuFd)) -> Result<(), VmmError>;

    /// Holds the vCPUs back for `percent` % of their time (auto-converge);
    /// zero lifts it. A VMM that cannot throttle keeps this default, and
    /// the source refuses the `auto-converge` capability.
    fn throttle(&self, percent: u8) -> Result<(), VmmError> {
        let _ = percent;
        Err("this VMM cannot throttle its vCPUs".into())
    }

    /// Whether [`Vcpus::throttle`] works (the default: no).
    fn can_throttle(&self) -> bool {
        false
    }

    /// The kernel thread ids of the threads that run the vCPUs. Until they
    /// have left `KVM_RUN` and parked they are the stop, so the source
    /// raises them with its own threads for [`Vcpus::pause_all`]
    /// (`SourceOptions::stop_priority`) and puts them back
    /// once it returns. The default, none, leaves them as they are.
    fn thread_ids(&self) -> Vec<i32> {
        Vec::new()
    }
}

/// One device's migratable state, registered by the VMM on both hosts as
/// a section of the stream: the source saves it after the vCPUs stopped,
/// the destination loads it before its guest starts.
///
/// The destination refuses a stream carrying a section nobody registered,
/// one whose version is newer than [`DeviceSection::version`] or older
/// than [`DeviceSection::oldest_loadable`], and one that lacks a
/// registered section.
pub trait DeviceSection: Send {
    /// The section id, as the stream names it (at most 255 bytes).
    fn id(&self) -> &str;

    /// Which of several devices with the same id this is.
    fn instance(&self) -> u32 {
        0
    }

    /// The version [`DeviceSection::save`] writes.
    fn version(&self) -> u32;

    /// The oldest version [`DeviceSection::load`] still reads.
    fn oldest_loadable(&self) -> u32 {
        self.version()
    }

    /// Called on the source once the vCPUs are paused and before any
    /// device state is saved (QEMU's `vm_state_notify`): a device that
    /// runs on its own (a virtio queue worker, a timer) quiesces here.
    fn before_save(&mut self) -> Result<(), VmmError> {
        Ok(())
    }

    /// Appends the device's state to `out`.
    fn save(&mut self, out: &mut Vec<u8>) -> Result<(), VmmError>;

    /// Loads state written by `save` at `version` (already checked to be
    /// within `oldest_loadable() ..= version()`).
    fn load(&mut self, version: u32, data: &[u8]) -> Result<(), VmmError>;
}

/// Guest pages the VMM itself wrote (virtio rings, emulated DMA): KVM's
/// dirty log never sees them, so the source merges these into every sync.
pub trait DeviceDirtyLog: Send {
    /// ORs into `bitmap` (one bit per page of guest-memory region
    /// `region`, bit `p % 64` of word `p / 64` for page `p`) every page the
    /// VMM wrote since the last call for that region, and forgets them.
    /// A region the log does not know, or a bitmap shorter than the
    /// region's pages, is an error (and forgets nothing): the source then
    /// fails the migration rather than miss a page.
    fn take_dirty(&mut self, region: usize, bitmap: &mut [u64]) -> Result<(), VmmError>;
}
