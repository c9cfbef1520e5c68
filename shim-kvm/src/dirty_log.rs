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

use std::fmt;

use kvm_bindings::{
    KVMIO, kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1,
};
use kvm_ioctls::VmFd;
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
    /// The slot index does not exist.
    NoSuchSlot(u32),
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
            DirtyLogError::NoSuchSlot(s) => write!(f, "dirty log: slot {s} does not exist"),
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
/// before any memslot is added. Returns the mode in use.
pub(crate) fn enable_manual_protect(vm: &VmFd) -> DirtyLogMode {
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

/// Issues `KVM_GET_DIRTY_LOG` for `slot` into `bitmap`, which must hold at
/// least `slot_pages.div_ceil(64)` words (checked by the caller, `Vm`).
pub(crate) fn get(vm: &VmFd, slot: u32, bitmap: &mut [u64]) -> Result<(), DirtyLogError> {
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
    if first_page % 64 != 0 || (num_pages % 64 != 0 && end != Some(slot_pages)) {
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
pub(crate) fn clear(
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
