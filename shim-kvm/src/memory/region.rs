//! One region of VMM-owned guest RAM, seen through raw pointers.

use livemig_core::wire::BlockId;

use super::{Backing, MemoryError, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// A raw view of one region of guest RAM that the VMM mapped and
/// registered as one KVM memslot: one RAM block of the stream, whose id is
/// the region's name.
///
/// A region holds an address, not the mapping: [`GuestRegion::new`]'s
/// caller promises that the mapping outlives every use livemig makes of
/// it, usually by handing [`GuestMemory::new`](super::GuestMemory::new)
/// the mappings' owner.
#[derive(Debug)]
pub struct GuestRegion {
    name: String,
    guest_phys: u64,
    host: *mut u8,
    len: u64,
    slot: u32,
    backing: Backing,
}

// SAFETY: `host` points into a mapping that [`GuestRegion::new`]'s caller
// keeps alive and readable and writable for the region's life; every access
// through it is a raw copy, a `memcmp` or a kernel call (`sendmsg`,
// `UFFDIO_COPY`) that tolerates concurrent writers, so the pointer may move
// between threads.
unsafe impl Send for GuestRegion {}
// SAFETY: as above; no method hands out a reference into the mapping.
unsafe impl Sync for GuestRegion {}

impl GuestRegion {
    /// A region named `name` (its RAM block id, 1 to 255 bytes) of `len`
    /// bytes at guest-physical `guest_phys`, mapped at host address `host`
    /// and registered as KVM memslot `slot`.
    ///
    /// Refused with a typed error: a bad name, an address or length that
    /// is not page aligned, an empty region, a range that wraps around.
    ///
    /// Its [`Backing`] is [`Backing::Other`]: every page is read (the
    /// regions of [`GuestMemory::anonymous`](super::GuestMemory::anonymous)
    /// and `GuestMemory::from_vm_memory` know theirs).
    ///
    /// # Safety
    /// The caller promises that `host .. host + len` is one mapping of the
    /// calling process, readable and writable for all `len` bytes, and that
    /// it stays mapped (not unmapped, not remapped, not shrunk) as long as
    /// livemig holds this region or a [`GuestMemory`](super::GuestMemory)
    /// built from it. The guest and the VMM's devices may write it at any
    /// time: livemig never assumes they do not.
    ///
    /// If the region is KVM memory, `slot`, `guest_phys`, `host` and `len`
    /// must be exactly the VMM's registration of that memslot: turning
    /// dirty logging on ([`DirtyLogging`](crate::dirty_log::DirtyLogging))
    /// re-registers the memslot with these values, and other values would
    /// make KVM move or refuse it.
    pub unsafe fn new(
        name: impl Into<String>,
        guest_phys: u64,
        host: *mut u8,
        len: u64,
        slot: u32,
    ) -> Result<GuestRegion, MemoryError> {
        let name = name.into();
        if let Err(reason) = BlockId::new(&name) {
            return Err(MemoryError::BadName { name, reason });
        }
        let host_addr = host as u64;
        for (what, value) in [
            ("guest-physical address", guest_phys),
            ("host address", host_addr),
            ("length", len),
        ] {
            if value % PAGE != 0 {
                return Err(MemoryError::Unaligned {
                    region: name,
                    what,
                    value,
                });
            }
        }
        if len == 0 {
            return Err(MemoryError::EmptyRegion(name));
        }
        let fits = |start: u64| start.checked_add(len).is_some();
        if !fits(guest_phys) || !fits(host_addr) || usize::try_from(len).is_err() {
            return Err(MemoryError::AddressOverflow(name));
        }
        Ok(GuestRegion {
            name,
            guest_phys,
            host,
            len,
            slot,
            backing: Backing::Other,
        })
    }

    /// The region with `backing`, which its creator knows to be true of
    /// the whole mapping.
    pub(super) fn with_backing(self, backing: Backing) -> GuestRegion {
        GuestRegion { backing, ..self }
    }

    /// What lies behind the mapping.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The region's name: its RAM block id in the stream.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// First guest-physical address of the region.
    pub fn guest_phys(&self) -> u64 {
        self.guest_phys
    }

    /// One past the last guest-physical address of the region.
    pub fn guest_end(&self) -> u64 {
        self.guest_phys + self.len
    }

    /// Host address of the mapping (what the memslot was registered with).
    pub fn host_addr(&self) -> u64 {
        self.host as u64
    }

    /// Size of the region in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: [`GuestRegion::new`] refuses empty regions.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The KVM memslot the VMM registered the region as.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Number of pages in the region: the bit count of its dirty log.
    pub fn pages(&self) -> u64 {
        self.len / PAGE
    }

    /// Number of `u64` words a dirty bitmap of this region needs.
    pub fn bitmap_words(&self) -> usize {
        self.pages().div_ceil(64) as usize
    }

    /// Whether guest-physical `gpa` lies in the region.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.guest_phys && gpa - self.guest_phys < self.len
    }

    /// Host pointer to byte `offset` of the region, with the bytes left
    /// from there to its end.
    pub(super) fn host_at(&self, offset: u64) -> Option<(*mut u8, u64)> {
        (offset < self.len).then(|| {
            // SAFETY: `offset < len` and `host .. host + len` is one mapping
            // (the `new` contract), so the pointer stays inside it.
            (unsafe { self.host.add(offset as usize) }, self.len - offset)
        })
    }

    /// Host pointer to the start of page `page` of the region; `index` is
    /// the region's index, for the error.
    pub(super) fn page_ptr(&self, index: usize, page: u64) -> Result<*mut u8, MemoryError> {
        if page >= self.pages() {
            return Err(MemoryError::PageOutOfRange {
                region: index,
                page,
                pages: self.pages(),
            });
        }
        // SAFETY: `page < pages`, so the offset stays inside the mapping.
        Ok(unsafe { self.host.add((page * PAGE) as usize) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(name: &str, gpa: u64, host: u64, len: u64) -> Result<GuestRegion, MemoryError> {
        // SAFETY: these regions are only validated, never accessed.
        unsafe { GuestRegion::new(name, gpa, host as *mut u8, len, 0) }
    }

    #[test]
    fn new_refuses_each_bad_value_by_name() {
        let ok = region("ram0", 0x1000, 0x7000_0000, 0x2000).unwrap();
        assert_eq!(
            (ok.pages(), ok.bitmap_words(), ok.guest_end()),
            (2, 1, 0x3000)
        );
        assert!(ok.contains(0x2fff) && !ok.contains(0x3000) && !ok.contains(0xfff));
        assert!(matches!(
            region("", 0, 0x1000, 0x1000),
            Err(MemoryError::BadName { .. })
        ));
        assert!(matches!(
            region(&"x".repeat(256), 0, 0x1000, 0x1000),
            Err(MemoryError::BadName { .. })
        ));
        for (gpa, host, len, what, value) in [
            (0x10, 0x1000, 0x1000, "guest-physical address", 0x10),
            (0, 0x1001, 0x1000, "host address", 0x1001),
            (0, 0x1000, 0x1fff, "length", 0x1fff),
        ] {
            assert_eq!(
                region("r", gpa, host, len).unwrap_err(),
                MemoryError::Unaligned {
                    region: "r".into(),
                    what,
                    value,
                }
            );
        }
        assert_eq!(
            region("r", 0, 0x1000, 0).unwrap_err(),
            MemoryError::EmptyRegion("r".into())
        );
        assert_eq!(
            region("r", u64::MAX - 0xfff, 0x1000, 0x2000).unwrap_err(),
            MemoryError::AddressOverflow("r".into())
        );
    }
}
