//! Guest RAM that livemig maps itself: anonymous private mappings, for a
//! VMM (or a test) that has no memory of its own yet.

use std::ptr;
use std::sync::Arc;

use super::{Backing, GuestMemory, GuestRegion, MemoryError, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// Where one region of [`GuestMemory::anonymous`] goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionLayout {
    /// The region's name (its RAM block id).
    pub name: String,
    /// First guest-physical address.
    pub guest_phys: u64,
    /// Length in bytes.
    pub len: u64,
    /// The KVM memslot it is to be registered as.
    pub slot: u32,
}

impl RegionLayout {
    /// `size` bytes of RAM at guest-physical `0 .. size`, cut into regions
    /// of at most `region_bytes` (memslots 0, 1, ...), named `name`,
    /// `name.1`, `name.2`, ...: RAM up to `region_bytes` is the one
    /// region `name`.
    pub fn contiguous(
        name: &str,
        size: u64,
        region_bytes: u64,
    ) -> Result<Vec<RegionLayout>, MemoryError> {
        if size == 0 || !size.is_multiple_of(PAGE) {
            return Err(MemoryError::BadSize(size));
        }
        if region_bytes == 0 || !region_bytes.is_multiple_of(PAGE) {
            return Err(MemoryError::BadSlotSize(region_bytes));
        }
        let count = size.div_ceil(region_bytes);
        (0..count)
            .map(|i| {
                let guest_phys = i * region_bytes;
                let slot = u32::try_from(i).map_err(|_| MemoryError::SlotOverflow {
                    first_slot: 0,
                    regions: count as usize,
                })?;
                Ok(RegionLayout {
                    name: if i == 0 {
                        name.to_owned()
                    } else {
                        format!("{name}.{i}")
                    },
                    guest_phys,
                    len: (size - guest_phys).min(region_bytes),
                    slot,
                })
            })
            .collect()
    }
}

/// The anonymous mappings behind a [`GuestMemory::anonymous`], unmapped
/// when the last clone of that memory is gone.
struct Mappings(Vec<(*mut libc::c_void, usize)>);

// SAFETY: the pointers are only passed to `munmap`, once, on drop.
unsafe impl Send for Mappings {}
// SAFETY: as above; `&Mappings` gives no access to them.
unsafe impl Sync for Mappings {}

impl Drop for Mappings {
    fn drop(&mut self) {
        for &(host, len) in &self.0 {
            // SAFETY: `host`/`len` are exactly what mmap returned; the last
            // GuestMemory referring to them is gone (this is its owner).
            // A KVM memslot over them is the registrant's to remove first
            // (a VM drops its fd, and with it its memslots, before this).
            unsafe { libc::munmap(host, len) };
        }
    }
}

impl GuestMemory {
    /// Fresh, zero-filled guest RAM laid out as `layout`, in private
    /// anonymous mappings that live as long as the returned memory (and
    /// its clones).
    ///
    /// The mappings are `MAP_NORESERVE` and untouched, so a 4 GiB guest
    /// costs nothing until pages are written, and advised for transparent
    /// huge pages.
    pub fn anonymous(layout: &[RegionLayout]) -> Result<GuestMemory, MemoryError> {
        let mut mappings = Mappings(Vec::with_capacity(layout.len()));
        let mut regions = Vec::with_capacity(layout.len());
        for l in layout {
            if l.len == 0 {
                return Err(MemoryError::EmptyRegion(l.name.clone()));
            }
            let len =
                usize::try_from(l.len).map_err(|_| MemoryError::AddressOverflow(l.name.clone()))?;
            // SAFETY: a fresh anonymous private mapping; no existing memory is
            // affected and the result is checked for MAP_FAILED.
            let host = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if host == libc::MAP_FAILED {
                return Err(MemoryError::Mmap(
                    std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
                ));
            }
            mappings.0.push((host, len));
            // Transparent huge pages: a read of untouched memory (a zero-page
            // scan) then maps the huge zero page once per 2 MiB instead of
            // faulting every 4 KiB, and first writes fault per 2 MiB. Only a
            // hint: without THP the mapping works the same, just slower.
            // SAFETY: `host .. host + len` is the mapping just created.
            unsafe { libc::madvise(host, len, libc::MADV_HUGEPAGE) };
            // SAFETY: `host .. host + len` is readable and writable and stays
            // mapped until `mappings`, the memory's owner, is dropped after
            // the last GuestMemory clone.
            let region = unsafe {
                GuestRegion::new(l.name.clone(), l.guest_phys, host.cast(), l.len, l.slot)
            }?;
            regions.push(region.with_backing(Backing::PrivateAnonymous));
        }
        GuestMemory::new(regions, Some(Arc::new(mappings)))
    }
}
