//! KVM dirty-page logging: fetch (`KVM_GET_DIRTY_LOG`) and chunked
//! re-protection (`KVM_CLEAR_DIRTY_LOG`).
//!
//! With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled (manual mode), a get only
//! copies the bitmap; pages stay writable until the migration clears the
//! chunk it is about to send. The clear takes the mask fetched by the last
//! get: KVM clears and write-protects only the pages whose bits are set in
//! it, so a page dirtied again after the get keeps its bit — chunked clearing
//! is race-free. With `KVM_DIRTY_LOG_INITIALLY_SET` every page starts dirty,
//! so the first get reports all memory without a full write-protect pass.
//!
//! Without the capability (legacy mode) a get also re-protects the whole
//! slot and clears are refused.
//!
//! The memslots are the VMM's: [`DirtyLogging::start`] turns logging on for
//! the slot of every region of a [`GuestMemory`] by re-registering it with
//! `KVM_MEM_LOG_DIRTY_PAGES`, and [`DirtyLogging::stop`] (or dropping the
//! guard, on any early return) turns it off again.

use std::borrow::Borrow;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{
    KVM_MEM_LOG_DIRTY_PAGES, KVMIO, kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1,
    kvm_dirty_log, kvm_dirty_log__bindgen_ty_1, kvm_userspace_memory_region,
};
use kvm_ioctls::VmFd;

use crate::memory::{GuestMemory, GuestRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`: gets stop re-protecting pages.
pub const MANUAL_PROTECT_ENABLE: u64 = 1 << 0;
/// `KVM_DIRTY_LOG_INITIALLY_SET`: every page starts dirty in a new slot.
pub const INITIALLY_SET: u64 = 1 << 1;

/// How the VM's dirty log behaves; chosen once, before memslots exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// Manual protect with initially-set bits: get copies, clear re-protects.
    ManualProtect,
    /// The capability is missing: get copies and re-protects the whole slot.
    Legacy,
}

impl fmt::Display for DirtyLogMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DirtyLogMode::ManualProtect => "manual-protect (initially set)",
            DirtyLogMode::Legacy => "legacy (get re-protects)",
        })
    }
}

/// Why a dirty-log operation was refused or failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirtyLogError {
    /// The region index does not exist.
    NoSuchRegion(usize),
    /// Re-registering memslot `slot` to turn dirty logging on or off failed.
    Memslot {
        /// The memslot.
        slot: u32,
        /// Whether logging was being turned on.
        on: bool,
        /// The errno.
        errno: i32,
    },
    /// Turning manual protect on or off (`KVM_ENABLE_CAP`) failed.
    ManualProtect(i32),
    /// The caller's bitmap has fewer words than the slot needs.
    BitmapTooSmall {
        /// Words needed.
        needed: usize,
        /// Words given.
        given: usize,
    },
    /// A clear range must start on a multiple of 64 pages and have a length
    /// that is a multiple of 64 unless it ends at the end of the slot.
    Misaligned {
        /// First page of the range.
        first_page: u64,
        /// Pages in the range.
        num_pages: u64,
    },
    /// The clear range is empty or runs past the end of the slot.
    OutOfRange {
        /// First page of the range.
        first_page: u64,
        /// Pages in the range.
        num_pages: u64,
        /// Pages in the slot.
        slot_pages: u64,
    },
    /// The mask has fewer words than the range needs.
    MaskTooSmall {
        /// Words needed.
        needed: usize,
        /// Words given.
        given: usize,
    },
    /// Clearing needs manual-protect mode, which this VM does not use.
    NotManualProtect,
    /// The ioctl failed with this errno.
    Kvm(i32),
}

impl fmt::Display for DirtyLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyLogError::NoSuchRegion(r) => {
                write!(f, "dirty log: guest memory region {r} does not exist")
            }
            DirtyLogError::Memslot { slot, on, errno } => write!(
                f,
                "turning dirty logging {} on memslot {slot} failed: errno {errno}",
                if *on { "on" } else { "off" }
            ),
            DirtyLogError::ManualProtect(e) => {
                write!(f, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 failed: errno {e}")
            }
            DirtyLogError::BitmapTooSmall { needed, given } => {
                write!(f, "dirty bitmap has {given} words, slot needs {needed}")
            }
            DirtyLogError::Misaligned {
                first_page,
                num_pages,
            } => write!(
                f,
                "dirty-log clear of pages {first_page}+{num_pages} is not 64-page aligned"
            ),
            DirtyLogError::OutOfRange {
                first_page,
                num_pages,
                slot_pages,
            } => write!(
                f,
                "dirty-log clear of pages {first_page}+{num_pages} is empty or outside the slot ({slot_pages} pages)"
            ),
            DirtyLogError::MaskTooSmall { needed, given } => {
                write!(
                    f,
                    "dirty-log clear mask has {given} words, range needs {needed}"
                )
            }
            DirtyLogError::NotManualProtect => {
                f.write_str("dirty-log clear needs manual-protect mode (legacy mode in use)")
            }
            DirtyLogError::Kvm(e) => write!(f, "dirty-log ioctl failed: errno {e}"),
        }
    }
}

impl std::error::Error for DirtyLogError {}

/// Turns on manual protect + initially set if KVM offers both; must run
/// before logging is turned on for any memslot. Returns the mode in use.
fn enable_manual_protect(vm: &VmFd) -> DirtyLogMode {
    let wanted = MANUAL_PROTECT_ENABLE | INITIALLY_SET;
    let offered =
        vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if offered < 0 || (offered as u64) & wanted != wanted {
        return DirtyLogMode::Legacy;
    }
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = wanted;
    match vm.enable_cap(&cap) {
        Ok(()) => DirtyLogMode::ManualProtect,
        Err(_) => DirtyLogMode::Legacy,
    }
}

/// Turns manual protect off again (`KVM_ENABLE_CAP` with no flags).
fn disable_manual_protect(vm: &VmFd) -> Result<(), DirtyLogError> {
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| DirtyLogError::ManualProtect(e.errno()))
}

/// Re-registers `region`'s memslot as the VMM registered it, with
/// `KVM_MEM_LOG_DIRTY_PAGES` on or off.
fn set_logging(vm: &VmFd, region: &GuestRegion, on: bool) -> Result<(), DirtyLogError> {
    let memslot = kvm_userspace_memory_region {
        slot: region.slot(),
        flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: region.guest_phys(),
        memory_size: region.len(),
        userspace_addr: region.host_addr(),
    };
    // SAFETY: the memslot is the VMM's own registration of this region (the
    // same slot, guest-physical address, host address and length, per
    // `GuestRegion::new`'s contract), so only its flags change; the mapping
    // stays alive as long as the region does.
    unsafe { vm.set_user_memory_region(memslot) }.map_err(|e| DirtyLogError::Memslot {
        slot: region.slot(),
        on,
        errno: e.errno(),
    })
}

/// Dirty logging turned on for the VMM's memslots of a [`GuestMemory`],
/// turned off again by [`DirtyLogging::stop`] or on drop.
///
/// `V` is how the guard holds the VMM's VM fd: `&VmFd`, `Arc<VmFd>` or the
/// fd itself. Pages are numbered per region (page `p` of region `i` is
/// guest-physical `regions()[i].guest_phys() + p * PAGE_SIZE`).
pub struct DirtyLogging<V: Borrow<VmFd>> {
    vm: V,
    memory: GuestMemory,
    mode: DirtyLogMode,
    /// Whether `start` turned manual protect on (and `stop` turns it off).
    enabled_manual: bool,
    /// Whether the memslots still log (cleared by `stop`).
    logging: bool,
    clear_calls: AtomicU64,
}

impl<V: Borrow<VmFd>> fmt::Debug for DirtyLogging<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyLogging")
            .field("memory", &self.memory)
            .field("mode", &self.mode)
            .field("logging", &self.logging)
            .finish_non_exhaustive()
    }
}

impl<V: Borrow<VmFd>> DirtyLogging<V> {
    /// Turns dirty logging on for the memslot of every region of `memory`
    /// (which the VMM registered on `vm` without flags: the re-registration
    /// sets `KVM_MEM_LOG_DIRTY_PAGES` alone, and clearing it on stop leaves
    /// no flag). `ManualProtect`
    /// is a preference: manual protect with initially-set bits is enabled
    /// first when KVM offers both, so every page starts dirty and nothing
    /// is write-protected until its chunk is cleared; otherwise, and when
    /// `Legacy` is asked for (to exercise and compare the fallback on any
    /// host), gets re-protect the whole slot. If a memslot refuses, the
    /// ones already turned on are turned off again.
    pub fn start(
        vm: V,
        memory: GuestMemory,
        wanted: DirtyLogMode,
    ) -> Result<DirtyLogging<V>, DirtyLogError> {
        let mode = match wanted {
            DirtyLogMode::ManualProtect => enable_manual_protect(vm.borrow()),
            DirtyLogMode::Legacy => DirtyLogMode::Legacy,
        };
        let logging = DirtyLogging {
            vm,
            memory,
            mode,
            enabled_manual: mode == DirtyLogMode::ManualProtect,
            logging: true,
            clear_calls: AtomicU64::new(0),
        };
        for region in logging.memory.regions() {
            // On failure the guard drops here and turns every slot off.
            set_logging(logging.vm.borrow(), region, true)?;
        }
        Ok(logging)
    }

    /// The dirty-log mode in use.
    pub fn mode(&self) -> DirtyLogMode {
        self.mode
    }

    /// The guest memory whose memslots log.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Fetches the dirty log of region `region` into `bitmap` (bit `i` of
    /// word `w` = page `64 * w + i` of the region). In manual mode nothing
    /// is re-protected; in legacy mode the whole slot is. `bitmap` is the
    /// caller's reused buffer and must hold
    /// [`GuestRegion::bitmap_words`] words.
    pub fn get(&self, region: usize, bitmap: &mut [u64]) -> Result<(), DirtyLogError> {
        let r = self.region(region)?;
        let needed = r.bitmap_words();
        if bitmap.len() < needed {
            return Err(DirtyLogError::BitmapTooSmall {
                needed,
                given: bitmap.len(),
            });
        }
        get(self.vm.borrow(), r.slot(), &mut bitmap[..needed])
    }

    /// Clears and re-protects the pages of `first_page .. first_page +
    /// num_pages` in region `region` whose bits are set in `mask` (bit `i`
    /// = page `first_page + i`): pass the bits fetched by the last get for
    /// that range. Alignment rules are those of [`validate_clear`]; legacy
    /// mode refuses every clear.
    pub fn clear(
        &self,
        region: usize,
        first_page: u64,
        num_pages: u64,
        mask: &[u64],
    ) -> Result<(), DirtyLogError> {
        if self.mode != DirtyLogMode::ManualProtect {
            return Err(DirtyLogError::NotManualProtect);
        }
        let r = self.region(region)?;
        let words = validate_clear(r.pages(), first_page, num_pages, mask.len())?;
        self.clear_calls.fetch_add(1, Ordering::Relaxed);
        clear(
            self.vm.borrow(),
            r.slot(),
            first_page,
            num_pages,
            &mask[..words],
        )
    }

    /// How many `KVM_CLEAR_DIRTY_LOG` calls were issued (for statistics and
    /// for checking that chunked clearing happened as planned).
    pub fn clear_calls(&self) -> u64 {
        self.clear_calls.load(Ordering::Relaxed)
    }

    /// Turns dirty logging off on every memslot (and manual protect, if
    /// `start` turned it on), reporting the first failure; every slot is
    /// tried even after one fails.
    pub fn stop(mut self) -> Result<(), DirtyLogError> {
        self.turn_off()
    }

    fn region(&self, region: usize) -> Result<&GuestRegion, DirtyLogError> {
        self.memory
            .region(region)
            .map_err(|_| DirtyLogError::NoSuchRegion(region))
    }

    fn turn_off(&mut self) -> Result<(), DirtyLogError> {
        if !std::mem::take(&mut self.logging) {
            return Ok(());
        }
        let vm = self.vm.borrow();
        let mut first = Ok(());
        for region in self.memory.regions() {
            if let Err(e) = set_logging(vm, region, false) {
                first = first.and(Err(e));
            }
        }
        if std::mem::take(&mut self.enabled_manual) {
            first = first.and(disable_manual_protect(vm));
        }
        first
    }
}

impl<V: Borrow<VmFd>> Drop for DirtyLogging<V> {
    fn drop(&mut self) {
        // An early return (a failed migration) lands here: the slots stop
        // logging all the same. A failure has nobody left to tell; the
        // explicit `stop` reports it.
        let _ = self.turn_off();
    }
}

/// Issues `KVM_GET_DIRTY_LOG` for `slot` into `bitmap`, which must hold at
/// least `slot_pages.div_ceil(64)` words (checked by the caller).
fn get(vm: &VmFd, slot: u32, bitmap: &mut [u64]) -> Result<(), DirtyLogError> {
    let log = kvm_dirty_log {
        slot,
        padding1: 0,
        __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `vm` is a VM fd and `bitmap` has at least one bit per page of the
    // slot (the caller checked), so KVM writes only inside it.
    let ret = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
    if ret == 0 {
        Ok(())
    } else {
        Err(DirtyLogError::Kvm(errno()))
    }
}

/// Checks a clear range against KVM's rules and returns the mask words it
/// needs: `first_page` a multiple of 64, `num_pages` non-zero and a multiple
/// of 64 unless the range ends exactly at the end of the slot.
pub fn validate_clear(
    slot_pages: u64,
    first_page: u64,
    num_pages: u64,
    mask_words: usize,
) -> Result<usize, DirtyLogError> {
    let end = first_page.checked_add(num_pages);
    if num_pages == 0 || end.is_none_or(|e| e > slot_pages) || num_pages > u64::from(u32::MAX) {
        return Err(DirtyLogError::OutOfRange {
            first_page,
            num_pages,
            slot_pages,
        });
    }
    if !first_page.is_multiple_of(64) || (!num_pages.is_multiple_of(64) && end != Some(slot_pages))
    {
        return Err(DirtyLogError::Misaligned {
            first_page,
            num_pages,
        });
    }
    let needed = num_pages.div_ceil(64) as usize;
    if mask_words < needed {
        return Err(DirtyLogError::MaskTooSmall {
            needed,
            given: mask_words,
        });
    }
    Ok(needed)
}

/// Issues `KVM_CLEAR_DIRTY_LOG`; the range was checked by [`validate_clear`].
fn clear(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u64,
    mask: &[u64],
) -> Result<(), DirtyLogError> {
    let log = kvm_clear_dirty_log {
        slot,
        num_pages: num_pages as u32,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: mask.as_ptr().cast_mut().cast(),
        },
    };
    // SAFETY: `vm` is a VM fd; KVM only reads `num_pages.div_ceil(64)` words of
    // the mask (validated to exist) and never writes to it.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &log) };
    if ret == 0 {
        Ok(())
    } else {
        Err(DirtyLogError::Kvm(errno()))
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_ranges_follow_kvm_alignment_rules() {
        assert_eq!(validate_clear(1000, 0, 64, 1), Ok(1));
        assert_eq!(validate_clear(1000, 960, 40, 1), Ok(1)); // tail of the slot
        assert_eq!(validate_clear(1000, 0, 1000, 16), Ok(16));
        assert!(matches!(
            validate_clear(1000, 1, 64, 1),
            Err(DirtyLogError::Misaligned { .. })
        ));
        assert!(matches!(
            validate_clear(1000, 64, 65, 2),
            Err(DirtyLogError::Misaligned { .. })
        ));
        assert!(matches!(
            validate_clear(1000, 960, 64, 1),
            Err(DirtyLogError::OutOfRange { .. })
        ));
        assert!(matches!(
            validate_clear(1000, 0, 0, 1),
            Err(DirtyLogError::OutOfRange { .. })
        ));
        assert!(matches!(
            validate_clear(1000, u64::MAX - 63, 64, 1),
            Err(DirtyLogError::OutOfRange { .. })
        ));
        assert_eq!(
            validate_clear(1000, 0, 128, 1),
            Err(DirtyLogError::MaskTooSmall {
                needed: 2,
                given: 1
            })
        );
    }
}
