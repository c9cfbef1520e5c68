//! The vm-memory adapter (cargo feature `vm-memory`): a VMM's
//! `GuestMemoryMmap` as a [`GuestMemory`], and its `AtomicBitmap` as the
//! [`DeviceDirtyLog`] of what the VMM's devices wrote through vm-memory.

use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use super::{Backing, GuestMemory, GuestRegion, MemoryError, PAGE_SIZE};
use crate::vmm::{DeviceDirtyLog, VmmError};

impl GuestMemory {
    /// The regions of `memory`, in its (guest-physical) order, named
    /// `ram0`, `ram1`, ... and numbered as KVM memslots `first_slot`,
    /// `first_slot + 1`, ...: register each vm-memory region `i` as memslot
    /// `first_slot + i`. A clone of `memory` is kept alive as the owner of
    /// the mappings.
    ///
    /// Refused: a region not mapped read-write, addresses or lengths not
    /// page aligned, memslot numbers past `u32::MAX`.
    ///
    /// # Example
    ///
    /// ```
    /// use livemig_kvm::memory::{GuestMemory, VmMemoryDirtyLog};
    /// use livemig_kvm::vmm::DeviceDirtyLog;
    /// use vm_memory::bitmap::AtomicBitmap;
    /// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    ///
    /// // The VMM's RAM: 1 MiB below a hole, 2 MiB above it, registered
    /// // (by the VMM) as memslots 0 and 1.
    /// let vmm_memory = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
    ///     (GuestAddress(0), 1 << 20),
    ///     (GuestAddress(4 << 20), 2 << 20),
    /// ])?;
    /// let memory = GuestMemory::from_vm_memory(&vmm_memory, 0)?;
    /// // What its devices write through vm-memory, livemig merges into
    /// // every sync.
    /// let mut device_dirty: Box<dyn DeviceDirtyLog> =
    ///     Box::new(VmMemoryDirtyLog::new(&vmm_memory));
    ///
    /// vmm_memory.write_slice(b"virtio ring", GuestAddress((4 << 20) + 0x3000))?;
    /// let mut bitmap = vec![0u64; memory.region(1)?.bitmap_words()];
    /// device_dirty.take_dirty(1, &mut bitmap)?;
    /// assert_eq!(bitmap[0], 1 << 3);
    /// # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    /// ```
    pub fn from_vm_memory<B>(
        memory: &GuestMemoryMmap<B>,
        first_slot: u32,
    ) -> Result<GuestMemory, MemoryError>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let count = memory.num_regions();
        let mut regions = Vec::with_capacity(count);
        for (i, region) in memory.iter().enumerate() {
            let name = format!("ram{i}");
            let slot = u32::try_from(i)
                .ok()
                .and_then(|i| first_slot.checked_add(i))
                .ok_or(MemoryError::SlotOverflow {
                    first_slot,
                    regions: count,
                })?;
            let mapping: &MmapRegion<B> = region;
            if mapping.prot() & (libc::PROT_READ | libc::PROT_WRITE)
                != libc::PROT_READ | libc::PROT_WRITE
            {
                return Err(MemoryError::NotWritable(name));
            }
            // SAFETY: `mapping` is a live mmap of `len` bytes, readable and
            // writable (checked above); it stays mapped as long as the
            // GuestMemory built here, which owns a clone of `memory` (and so
            // an `Arc` of every region's mapping).
            let lent = unsafe {
                GuestRegion::new(
                    name,
                    region.start_addr().0,
                    mapping.as_ptr(),
                    region.len(),
                    slot,
                )
            }?;
            // vm-memory's own anonymous regions (`from_ranges`) are
            // `MAP_PRIVATE | MAP_ANONYMOUS` without a file.
            let private_anonymous = mapping.file_offset().is_none()
                && mapping.flags() & (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_SHARED)
                    == libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
            regions.push(if private_anonymous {
                lent.with_backing(Backing::PrivateAnonymous)
            } else {
                lent
            });
        }
        GuestMemory::new(regions, Some(Arc::new(memory.clone())))
    }
}

/// The pages a VMM's devices wrote through vm-memory: every write through
/// a `GuestMemoryMmap<AtomicBitmap>` (`Bytes::write_slice`, volatile
/// slices, virtio queues) sets its page's bit in the region's bitmap, and
/// [`DeviceDirtyLog::take_dirty`] takes and resets them, region by region
/// (region `i` of the `GuestMemoryMmap` is region `i` of the
/// [`GuestMemory::from_vm_memory`] built over it).
#[derive(Debug, Clone)]
pub struct VmMemoryDirtyLog {
    memory: GuestMemoryMmap<AtomicBitmap>,
}

impl VmMemoryDirtyLog {
    /// The dirty log of `memory`'s bitmaps (a clone of it is kept).
    pub fn new(memory: &GuestMemoryMmap<AtomicBitmap>) -> VmMemoryDirtyLog {
        VmMemoryDirtyLog {
            memory: memory.clone(),
        }
    }
}

impl DeviceDirtyLog for VmMemoryDirtyLog {
    fn take_dirty(&mut self, region: usize, bitmap: &mut [u64]) -> Result<(), VmmError> {
        let r = self
            .memory
            .iter()
            .nth(region)
            .ok_or(MemoryError::NoSuchRegion(region))?;
        let mapping: &MmapRegion<AtomicBitmap> = r;
        let bits = mapping.bitmap();
        let pages = r.len().div_ceil(PAGE_SIZE as u64);
        if bits.len() as u64 != pages {
            return Err(MemoryError::BitmapPageSize { region }.into());
        }
        let needed = bits.len().div_ceil(64);
        if bitmap.len() < needed {
            return Err(MemoryError::BitmapTooSmall {
                needed,
                given: bitmap.len(),
            }
            .into());
        }
        for (out, word) in bitmap.iter_mut().zip(bits.get_and_reset()) {
            *out |= word;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    const PAGE: u64 = PAGE_SIZE as u64;

    fn vmm_memory() -> GuestMemoryMmap<AtomicBitmap> {
        // Two regions with a hole between them, as a PC's RAM below and
        // above a PCI hole.
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 * PAGE as usize),
            (GuestAddress(0x10_0000), 32 * PAGE as usize),
        ])
        .unwrap()
    }

    #[test]
    fn adapter_maps_the_same_bytes() {
        let vmm = vmm_memory();
        let memory = GuestMemory::from_vm_memory(&vmm, 3).unwrap();
        let names: Vec<_> = memory.regions().iter().map(|r| r.name()).collect();
        assert_eq!(names, ["ram0", "ram1"]);
        let r1 = memory.region(1).unwrap();
        assert_eq!(
            (r1.guest_phys(), r1.len(), r1.slot()),
            (0x10_0000, 32 * PAGE, 4)
        );
        vmm.write_slice(b"from the VMM", GuestAddress(0x10_0000 + 5 * PAGE + 7))
            .unwrap();
        let mut got = [0u8; 12];
        memory.read(0x10_0000 + 5 * PAGE + 7, &mut got).unwrap();
        assert_eq!(&got, b"from the VMM");
        memory.write(63 * PAGE, b"from livemig").unwrap();
        let mut back = [0u8; 12];
        vmm.read_slice(&mut back, GuestAddress(63 * PAGE)).unwrap();
        assert_eq!(&back, b"from livemig");
        // The hole is not RAM.
        assert!(memory.write(64 * PAGE, &[1]).is_err());
        // The mappings outlive the VMM's handle.
        let digest = memory.digest();
        drop(vmm);
        assert_eq!(memory.digest(), digest);
        assert!(matches!(
            GuestMemory::from_vm_memory(&vmm_memory(), u32::MAX),
            Err(MemoryError::SlotOverflow { .. })
        ));
    }

    #[test]
    fn dirty_log_reports_exactly_the_pages_written_through_vm_memory() {
        let vmm = vmm_memory();
        let mut log: Box<dyn DeviceDirtyLog> = Box::new(VmMemoryDirtyLog::new(&vmm));
        vmm.write_slice(&[1], GuestAddress(2 * PAGE + 100)).unwrap();
        vmm.write_slice(&[2; 4], GuestAddress(63 * PAGE + 4092))
            .unwrap();
        vmm.write_slice(&[3; 2], GuestAddress(0x10_0000 + 31 * PAGE + 4094))
            .unwrap();
        let mut words = vec![0u64; 1];
        log.take_dirty(0, &mut words).unwrap();
        assert_eq!(words, vec![(1 << 2) | (1 << 63)]);
        let mut words = vec![0u64; 1];
        log.take_dirty(1, &mut words).unwrap();
        assert_eq!(words, vec![1 << 31]);
        // Taken means reset.
        let mut again = vec![0u64; 1];
        log.take_dirty(0, &mut again).unwrap();
        log.take_dirty(1, &mut again).unwrap();
        assert_eq!(again, vec![0]);
        assert!(log.take_dirty(2, &mut again).is_err());
        assert!(log.take_dirty(0, &mut []).is_err());
    }
}
