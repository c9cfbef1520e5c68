//! Where the demo VMM puts guest RAM: as a PC does, up to [`LOW_RAM_MAX`]
//! from guest-physical 0 and the rest from [`HIGH_RAM_START`], so that the
//! 32-bit MMIO hole between them (the LAPIC, the IOAPIC, KVM's TSS) stays
//! free of memslots. Each part is its own vm-memory region and KVM memslot:
//! region 0 at 0, region 1 (only for guests above [`LOW_RAM_MAX`]) at 4 GiB.

use vm_memory::GuestAddress;

use super::BootError;

/// Most RAM below the 32-bit hole: 3 GiB, where QEMU's `pc` machine also
/// ends it for guests of 3.5 GiB and more, so a working set that fits here
/// fits under QEMU too.
pub const LOW_RAM_MAX: u64 = 3 << 30;

/// Where RAM above the 32-bit hole starts: 4 GiB.
pub const HIGH_RAM_START: u64 = 1 << 32;

/// The smallest RAM the demo guest boots in: page tables at 64 KiB, image
/// at 1 MiB, default working set at 2 MiB.
pub const MIN_MEM_BYTES: u64 = 4 << 20;

/// Most guest RAM: `livemig demo` runs the source and the destination on
/// one host. RAM is mapped `MAP_NORESERVE` and a page takes host memory
/// only once written; the guest writes no more than its working set
/// (below [`LOW_RAM_MAX`]) and the destination leaves zero pages
/// unpopulated, so two 16 GiB guests fit a 24 GiB host with room to spare,
/// while their dirty bitmaps stay small (512 KiB per guest).
pub const MAX_MEM_BYTES: u64 = 16 << 30;

/// How a guest's RAM splits around the 32-bit hole: `low` bytes at 0 and
/// `high` bytes at [`HIGH_RAM_START`]. Built only by [`RamLayout::new`], so
/// the sizes are whole pages, `low` is at most [`LOW_RAM_MAX`] and `high`
/// is 0 unless `low` is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamLayout {
    low: u64,
    high: u64,
}

impl RamLayout {
    /// The layout of `mem_bytes` of RAM: whole pages, from
    /// [`MIN_MEM_BYTES`] to [`MAX_MEM_BYTES`].
    pub fn new(mem_bytes: u64) -> Result<RamLayout, BootError> {
        let page = livemig_kvm::memory::PAGE_SIZE as u64;
        if !mem_bytes.is_multiple_of(page) || !(MIN_MEM_BYTES..=MAX_MEM_BYTES).contains(&mem_bytes)
        {
            return Err(BootError::MemorySize(mem_bytes));
        }
        let low = mem_bytes.min(LOW_RAM_MAX);
        Ok(RamLayout {
            low,
            high: mem_bytes - low,
        })
    }

    /// RAM from guest-physical 0 up to the hole (or the end): where the
    /// demo guest's parameters, page tables, image and working set live.
    pub fn low_bytes(&self) -> u64 {
        self.low
    }

    /// RAM from [`HIGH_RAM_START`] up; 0 for a guest of at most
    /// [`LOW_RAM_MAX`].
    pub fn high_bytes(&self) -> u64 {
        self.high
    }

    /// All of the guest's RAM.
    pub fn total_bytes(&self) -> u64 {
        self.low + self.high
    }

    /// The vm-memory ranges (start, length), in guest-physical order: one
    /// per region and memslot.
    pub fn ranges(&self) -> Vec<(GuestAddress, usize)> {
        let mut ranges = vec![(GuestAddress(0), self.low as usize)];
        if self.high > 0 {
            ranges.push((GuestAddress(HIGH_RAM_START), self.high as usize));
        }
        ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn ram_splits_around_the_hole_as_a_pc_does() {
        let small = RamLayout::new(64 * MIB).unwrap();
        assert_eq!(small.ranges(), [(GuestAddress(0), (64 * MIB) as usize)]);
        let full_low = RamLayout::new(LOW_RAM_MAX).unwrap();
        assert_eq!((full_low.low_bytes(), full_low.high_bytes()), (3 << 30, 0));
        assert_eq!(full_low.ranges().len(), 1);
        let big = RamLayout::new(4608 * MIB).unwrap();
        assert_eq!(
            big.ranges(),
            [
                (GuestAddress(0), (3072 * MIB) as usize),
                (GuestAddress(1 << 32), (1536 * MIB) as usize)
            ]
        );
        assert_eq!(big.total_bytes(), 4608 * MIB);
        let top = RamLayout::new(MAX_MEM_BYTES).unwrap();
        assert_eq!(top.high_bytes(), MAX_MEM_BYTES - LOW_RAM_MAX);
    }

    #[test]
    fn sizes_outside_the_bounds_or_not_whole_pages_are_refused() {
        for bad in [0, MIN_MEM_BYTES - 4096, MAX_MEM_BYTES + 4096, 64 * MIB + 1] {
            assert!(
                matches!(RamLayout::new(bad), Err(BootError::MemorySize(b)) if b == bad),
                "{bad}"
            );
        }
        let line = RamLayout::new(MAX_MEM_BYTES + 4096)
            .unwrap_err()
            .to_string();
        assert!(line.contains("at most 16384 MiB"), "{line}");
    }
}
