//! A dirty bitmap of atomics for a VMM without vm-memory: its devices mark
//! the guest pages they write, livemig takes them at every sync.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{GuestMemory, MemoryError, PAGE_SIZE};
use crate::vmm::{DeviceDirtyLog, VmmError};

const PAGE: u64 = PAGE_SIZE as u64;

/// One bit per guest page, set by the VMM's devices with
/// [`SharedDirtyBitmap::mark`] from any thread, and taken (read and
/// cleared, word by word atomically) by livemig through
/// [`DeviceDirtyLog::take_dirty`]. Clones share the bits: the VMM keeps one
/// for its devices and lends livemig a boxed clone.
#[derive(Debug, Clone)]
pub struct SharedDirtyBitmap {
    regions: Arc<[RegionBits]>,
}

#[derive(Debug)]
struct RegionBits {
    guest_phys: u64,
    len: u64,
    words: Box<[AtomicU64]>,
}

impl SharedDirtyBitmap {
    /// A clean bitmap over the regions of `memory`, one per region and in
    /// the same order.
    pub fn new(memory: &GuestMemory) -> SharedDirtyBitmap {
        let regions = memory
            .regions()
            .iter()
            .map(|r| RegionBits {
                guest_phys: r.guest_phys(),
                len: r.len(),
                words: (0..r.bitmap_words()).map(|_| AtomicU64::new(0)).collect(),
            })
            .collect();
        SharedDirtyBitmap { regions }
    }

    /// Marks every page of `gpa .. gpa + len` dirty (a device wrote it).
    /// The range may span adjacent regions; a range that is not all RAM is
    /// refused and marks nothing. An empty range marks nothing.
    pub fn mark(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let refused = MemoryError::RangeOutOfRam { gpa, len };
        let end = gpa.checked_add(len).ok_or(refused.clone())?;
        for pass in [false, true] {
            let mut at = gpa;
            while at < end {
                let region = self
                    .regions
                    .iter()
                    .find(|r| at >= r.guest_phys && at - r.guest_phys < r.len)
                    .ok_or(refused.clone())?;
                let piece_end = end.min(region.guest_phys + region.len);
                if pass {
                    let first = (at - region.guest_phys) / PAGE;
                    let last = (piece_end - 1 - region.guest_phys) / PAGE;
                    for page in first..=last {
                        region.words[(page / 64) as usize]
                            .fetch_or(1 << (page % 64), Ordering::Relaxed);
                    }
                }
                at = piece_end;
            }
        }
        Ok(())
    }
}

impl DeviceDirtyLog for SharedDirtyBitmap {
    fn take_dirty(&mut self, region: usize, bitmap: &mut [u64]) -> Result<(), VmmError> {
        let bits = self
            .regions
            .get(region)
            .ok_or(MemoryError::NoSuchRegion(region))?;
        if bitmap.len() < bits.words.len() {
            return Err(MemoryError::BitmapTooSmall {
                needed: bits.words.len(),
                given: bitmap.len(),
            }
            .into());
        }
        for (out, word) in bitmap.iter_mut().zip(bits.words.iter()) {
            *out |= word.swap(0, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionLayout;

    #[test]
    fn reports_exactly_the_marked_pages_once() {
        let memory = GuestMemory::anonymous(
            &RegionLayout::contiguous("ram", 200 * PAGE, 100 * PAGE).unwrap(),
        )
        .unwrap();
        let vmm_side = SharedDirtyBitmap::new(&memory);
        let mut livemig_side: Box<dyn DeviceDirtyLog> = Box::new(vmm_side.clone());
        // Page 3 (one byte), pages 98..=101 across the region boundary,
        // page 199 (the last).
        vmm_side.mark(3 * PAGE + 17, 1).unwrap();
        vmm_side.mark(98 * PAGE + 1, 3 * PAGE).unwrap();
        vmm_side.mark(199 * PAGE, PAGE).unwrap();
        vmm_side.mark(50 * PAGE, 0).unwrap();
        let mut first = vec![0u64; 2];
        livemig_side.take_dirty(0, &mut first).unwrap();
        assert_eq!(first, vec![1 << 3, 0b11 << (98 - 64)]);
        let mut second = vec![0u64; 2];
        livemig_side.take_dirty(1, &mut second).unwrap();
        assert_eq!(second, vec![0b11, 1 << (99 - 64)]);
        // Taken means forgotten.
        let mut again = vec![0u64; 2];
        livemig_side.take_dirty(0, &mut again).unwrap();
        livemig_side.take_dirty(1, &mut again).unwrap();
        assert_eq!(again, vec![0, 0]);
        // Refusals.
        assert_eq!(
            vmm_side.mark(199 * PAGE, PAGE + 1),
            Err(MemoryError::RangeOutOfRam {
                gpa: 199 * PAGE,
                len: PAGE + 1
            })
        );
        assert!(vmm_side.mark(u64::MAX, 2).is_err());
        assert!(livemig_side.take_dirty(2, &mut again).is_err());
        assert!(livemig_side.take_dirty(0, &mut [0u64; 1]).is_err());
        // A refused mark marked nothing.
        livemig_side.take_dirty(1, &mut again).unwrap();
        assert_eq!(again, vec![0, 0]);
    }
}
