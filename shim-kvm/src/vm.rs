//! A KVM virtual machine: the VM fd, its guest RAM registered as memslots
//! with dirty logging, and the dirty-log operations the migration drives.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};

use crate::dirty_log::{self, DirtyLogError, DirtyLogMode};
use crate::memory::{GuestRam, MemoryError};

/// Why a VM could not be created.
#[derive(Debug)]
pub enum VmError {
    /// Opening `/dev/kvm` or creating the VM failed.
    Kvm(kvm_ioctls::Error),
    /// Reserving guest RAM failed.
    Memory(MemoryError),
    /// Registering memslot `slot` failed.
    Memslot {
        /// Slot index.
        slot: u32,
        /// The KVM error.
        err: kvm_ioctls::Error,
    },
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::Kvm(e) => write!(f, "KVM VM creation failed: {e}"),
            VmError::Memory(e) => write!(f, "guest RAM: {e}"),
            VmError::Memslot { slot, err } => write!(f, "registering memslot {slot}: {err}"),
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
    pub(crate) kvm: Kvm,
    pub(crate) fd: VmFd,
    ram: Arc<GuestRam>,
    mode: DirtyLogMode,
    clear_calls: AtomicU64,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("ram", &self.ram)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates a VM with `ram_bytes` of RAM in memslots of `slot_bytes`
    /// (see [`crate::memory::DEFAULT_SLOT_BYTES`]). Manual-protect dirty
    /// logging is enabled first when KVM offers it (memslots added later
    /// inherit the mode); otherwise the legacy mode is used.
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
        let fd = kvm.create_vm().map_err(VmError::Kvm)?;
        let mode = match wanted {
            DirtyLogMode::ManualProtect => dirty_log::enable_manual_protect(&fd),
            DirtyLogMode::Legacy => DirtyLogMode::Legacy,
        };
        let ram = Arc::new(GuestRam::new(ram_bytes, slot_bytes)?);
        for slot in ram.slots() {
            let region = kvm_userspace_memory_region {
                slot: slot.index(),
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: slot.guest_phys(),
                memory_size: slot.len(),
                userspace_addr: slot.host_addr(),
            };
            // SAFETY: the region describes a live mapping owned by `ram`, which
            // this Vm (and every vCPU, via the Arc) keeps alive at least as long
            // as the VM fd that refers to it.
            unsafe { fd.set_user_memory_region(region) }.map_err(|err| VmError::Memslot {
                slot: slot.index(),
                err,
            })?;
        }
        Ok(Vm {
            kvm,
            fd,
            ram,
            mode,
            clear_calls: AtomicU64::new(0),
        })
    }

    /// The guest RAM (shared with the vCPU, which keeps it alive).
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The dirty-log mode in use.
    pub fn dirty_log_mode(&self) -> DirtyLogMode {
        self.mode
    }

    /// Fetches the dirty log of `slot` into `bitmap` (bit `i` of word `w` =
    /// page `64 * w + i` of the slot). In manual mode nothing is re-protected;
    /// in legacy mode the whole slot is. `bitmap` is the caller's reused
    /// buffer and must hold [`crate::memory::Slot::bitmap_words`] words.
    pub fn get_dirty_log(&self, slot: u32, bitmap: &mut [u64]) -> Result<(), DirtyLogError> {
        let s = self
            .ram
            .slot(slot)
            .map_err(|_| DirtyLogError::NoSuchSlot(slot))?;
        let needed = s.bitmap_words();
        if bitmap.len() < needed {
            return Err(DirtyLogError::BitmapTooSmall {
                needed,
                given: bitmap.len(),
            });
        }
        dirty_log::get(&self.fd, slot, &mut bitmap[..needed])
    }

    /// Clears and re-protects the pages of `first_page .. first_page +
    /// num_pages` in `slot` whose bits are set in `mask` (bit `i` = page
    /// `first_page + i`): pass the bits fetched by the last get for that
    /// range. Alignment rules are those of
    /// [`dirty_log::validate_clear`]; legacy mode refuses every clear.
    pub fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u64,
        mask: &[u64],
    ) -> Result<(), DirtyLogError> {
        if self.mode != DirtyLogMode::ManualProtect {
            return Err(DirtyLogError::NotManualProtect);
        }
        let s = self
            .ram
            .slot(slot)
            .map_err(|_| DirtyLogError::NoSuchSlot(slot))?;
        let words = dirty_log::validate_clear(s.pages(), first_page, num_pages, mask.len())?;
        self.clear_calls.fetch_add(1, Ordering::Relaxed);
        dirty_log::clear(&self.fd, slot, first_page, num_pages, &mask[..words])
    }

    /// How many `KVM_CLEAR_DIRTY_LOG` calls were issued (for statistics and
    /// for checking that chunked clearing happened as planned).
    pub fn clear_calls(&self) -> u64 {
        self.clear_calls.load(Ordering::Relaxed)
    }
}
