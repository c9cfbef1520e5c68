//! The demo's KVM virtual machine: the VM fd, guest RAM it maps and
//! registers as memslots itself (as any VMM does), and dirty logging on
//! those memslots for the VM's whole life.

use std::fmt;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};

use crate::dirty_log::{DirtyLogError, DirtyLogMode, DirtyLogging};
use crate::memory::{GuestMemory, MemoryError, RegionLayout};
use crate::migrate::RAM_BLOCK_ID;

/// Why a VM could not be created.
#[derive(Debug)]
pub enum VmError {
    /// Opening `/dev/kvm` or creating the VM failed.
    Kvm(kvm_ioctls::Error),
    /// Mapping guest RAM failed.
    Memory(MemoryError),
    /// Registering memslot `slot` failed.
    Memslot {
        /// Slot index.
        slot: u32,
        /// The KVM error.
        err: kvm_ioctls::Error,
    },
    /// Turning dirty logging on failed.
    DirtyLog(DirtyLogError),
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::Kvm(e) => write!(f, "KVM VM creation failed: {e}"),
            VmError::Memory(e) => write!(f, "guest RAM: {e}"),
            VmError::Memslot { slot, err } => write!(f, "registering memslot {slot}: {err}"),
            VmError::DirtyLog(e) => write!(f, "dirty logging: {e}"),
        }
    }
}

impl std::error::Error for VmError {}

impl From<MemoryError> for VmError {
    fn from(e: MemoryError) -> Self {
        VmError::Memory(e)
    }
}

/// A VM with guest RAM at guest-physical 0 and dirty logging on every slot.
pub struct Vm {
    /// Logging first: dropping it turns logging off while the fd is open.
    dirty: DirtyLogging<Arc<VmFd>>,
    pub(crate) kvm: Kvm,
    pub(crate) fd: Arc<VmFd>,
    ram: GuestMemory,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("ram", &self.ram)
            .field("mode", &self.dirty.mode())
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates a VM with `ram_bytes` of RAM in memslots of `slot_bytes`
    /// (see [`crate::memory::DEFAULT_SLOT_BYTES`]): regions named
    /// [`RAM_BLOCK_ID`], `pc.ram.1`, ... (RAM up to `slot_bytes` is the one
    /// region `pc.ram`). Manual-protect dirty logging is used when KVM
    /// offers it, otherwise the legacy mode.
    pub fn new(ram_bytes: u64, slot_bytes: u64) -> Result<Vm, VmError> {
        Vm::with_dirty_log_mode(ram_bytes, slot_bytes, DirtyLogMode::ManualProtect)
    }

    /// Like [`Vm::new`], with the dirty-log mode chosen by the caller:
    /// `ManualProtect` is a preference (legacy when KVM lacks it), `Legacy`
    /// is used even when KVM offers manual protect, so the get-and-clear
    /// fallback can be exercised and compared on any host.
    pub fn with_dirty_log_mode(
        ram_bytes: u64,
        slot_bytes: u64,
        wanted: DirtyLogMode,
    ) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let fd = Arc::new(kvm.create_vm().map_err(VmError::Kvm)?);
        let ram = GuestMemory::anonymous(&RegionLayout::contiguous(
            RAM_BLOCK_ID,
            ram_bytes,
            slot_bytes,
        )?)?;
        for region in ram.regions() {
            let memslot = kvm_userspace_memory_region {
                slot: region.slot(),
                flags: 0,
                guest_phys_addr: region.guest_phys(),
                memory_size: region.len(),
                userspace_addr: region.host_addr(),
            };
            // SAFETY: the memslot describes a live mapping owned by `ram`,
            // which this Vm (and every vCPU, through a clone) keeps alive at
            // least as long as the VM fd that refers to it.
            unsafe { fd.set_user_memory_region(memslot) }.map_err(|err| VmError::Memslot {
                slot: region.slot(),
                err,
            })?;
        }
        let dirty =
            DirtyLogging::start(Arc::clone(&fd), ram.clone(), wanted).map_err(VmError::DirtyLog)?;
        Ok(Vm {
            dirty,
            kvm,
            fd,
            ram,
        })
    }

    /// The guest RAM (shared with the vCPU, which keeps it alive).
    pub fn ram(&self) -> &GuestMemory {
        &self.ram
    }

    /// The dirty-log mode in use.
    pub fn dirty_log_mode(&self) -> DirtyLogMode {
        self.dirty.mode()
    }

    /// Fetches the dirty log of region `region`: see [`DirtyLogging::get`].
    pub fn get_dirty_log(&self, region: usize, bitmap: &mut [u64]) -> Result<(), DirtyLogError> {
        self.dirty.get(region, bitmap)
    }

    /// Clears part of region `region`'s dirty log: see
    /// [`DirtyLogging::clear`].
    pub fn clear_dirty_log(
        &self,
        region: usize,
        first_page: u64,
        num_pages: u64,
        mask: &[u64],
    ) -> Result<(), DirtyLogError> {
        self.dirty.clear(region, first_page, num_pages, mask)
    }

    /// How many `KVM_CLEAR_DIRTY_LOG` calls were issued (for statistics and
    /// for checking that chunked clearing happened as planned).
    pub fn clear_calls(&self) -> u64 {
        self.dirty.clear_calls()
    }
}
