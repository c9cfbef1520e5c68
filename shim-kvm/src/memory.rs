//! Guest RAM: anonymous host mappings that back KVM memslots.
//!
//! Guest memory is written by the vCPU at any moment, so this module never
//! hands out `&[u8]` or `&mut [u8]` over it (that would be a data race the
//! compiler is allowed to miscompile). Every access goes through raw
//! pointers: page copies with `ptr::copy_nonoverlapping`, zero checks with
//! `memcmp`. Callers that need zero-copy I/O (`writev`,
//! `UFFDIO_COPY`) get a raw pointer and a length from
//! [`GuestRam::host_range`] and own the reasoning about it.
//!
//! The RAM is split into slots of at most [`GuestRam::new`]'s `slot_bytes`
//! (1 GiB by default) so each dirty log stays small; slot `i` is KVM memslot
//! `i` and covers guest-physical addresses `i * slot_bytes ..`.

use std::fmt;
use std::ptr;

/// Size of a guest page (x86 base pages); dirty logs track this granularity.
pub const PAGE_SIZE: usize = 4096;

/// Default memslot size: 1 GiB keeps a slot's dirty bitmap at 32 KiB.
pub const DEFAULT_SLOT_BYTES: u64 = 1 << 30;

/// Why a guest-memory operation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryError {
    /// The requested RAM size is zero or not a multiple of the page size.
    BadSize(u64),
    /// The slot size is zero or not a multiple of the page size.
    BadSlotSize(u64),
    /// `mmap` failed with this errno while reserving a slot.
    Mmap(i32),
    /// The slot index does not exist.
    NoSuchSlot(u32),
    /// The page index is beyond the end of the slot.
    PageOutOfRange {
        /// Slot index.
        slot: u32,
        /// Requested page.
        page: u64,
        /// Pages in the slot.
        pages: u64,
    },
    /// The guest-physical range is not entirely inside one slot.
    RangeOutOfRam {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
    },
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryError::BadSize(s) => {
                write!(
                    f,
                    "guest RAM size {s} is zero or not a multiple of {PAGE_SIZE}"
                )
            }
            MemoryError::BadSlotSize(s) => {
                write!(
                    f,
                    "memslot size {s} is zero or not a multiple of {PAGE_SIZE}"
                )
            }
            MemoryError::Mmap(e) => write!(f, "mmap of guest RAM failed: errno {e}"),
            MemoryError::NoSuchSlot(s) => write!(f, "memory slot {s} does not exist"),
            MemoryError::PageOutOfRange { slot, page, pages } => {
                write!(f, "page {page} is outside slot {slot} ({pages} pages)")
            }
            MemoryError::RangeOutOfRam { gpa, len } => write!(
                f,
                "guest-physical range {gpa:#x}+{len:#x} is not inside one RAM slot"
            ),
        }
    }
}

impl std::error::Error for MemoryError {}

/// One contiguous host mapping registered as one KVM memslot.
#[derive(Debug)]
pub struct Slot {
    index: u32,
    guest_phys: u64,
    host: *mut u8,
    len: usize,
}

// SAFETY: `host` points to a private anonymous mapping owned by the slot for
// its whole life; all accesses through it are raw-pointer copies or volatile
// reads that tolerate concurrent writers, so sharing across threads is sound.
unsafe impl Send for Slot {}
// SAFETY: as above; no method gives out references into the mapping.
unsafe impl Sync for Slot {}

impl Slot {
    /// KVM memslot number (also the index in [`GuestRam::slots`]).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// First guest-physical address covered by the slot.
    pub fn guest_phys(&self) -> u64 {
        self.guest_phys
    }

    /// Size of the slot in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether the slot has no pages (never true for a slot built by `GuestRam`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of pages in the slot: the bit count of its dirty log.
    pub fn pages(&self) -> u64 {
        (self.len / PAGE_SIZE) as u64
    }

    /// Number of `u64` words a dirty bitmap of this slot needs.
    pub fn bitmap_words(&self) -> usize {
        (self.len / PAGE_SIZE).div_ceil(64)
    }

    /// Host address of the mapping, for registering the memslot.
    pub fn host_addr(&self) -> u64 {
        self.host as u64
    }

    fn page_ptr(&self, page: u64) -> Result<*mut u8, MemoryError> {
        if page >= self.pages() {
            return Err(MemoryError::PageOutOfRange {
                slot: self.index,
                page,
                pages: self.pages(),
            });
        }
        // SAFETY: `page < pages`, so the offset stays inside the mapping.
        Ok(unsafe { self.host.add(page as usize * PAGE_SIZE) })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // SAFETY: `host`/`len` are exactly what mmap returned; nothing refers to
        // the mapping after the slot is gone (KVM memslots are torn down with the
        // VM fd, which `Vm` drops first).
        unsafe {
            libc::munmap(self.host.cast(), self.len);
        }
    }
}

/// The guest's RAM: guest-physical `0 .. size`, split into slots.
#[derive(Debug)]
pub struct GuestRam {
    slots: Vec<Slot>,
    size: u64,
}

impl GuestRam {
    /// Reserves `size` bytes of guest RAM in slots of `slot_bytes`.
    ///
    /// Memory is `MAP_NORESERVE` and untouched, so a 4 GiB guest costs
    /// nothing until pages are written.
    pub fn new(size: u64, slot_bytes: u64) -> Result<Self, MemoryError> {
        if size == 0 || size % PAGE_SIZE as u64 != 0 {
            return Err(MemoryError::BadSize(size));
        }
        if slot_bytes == 0 || slot_bytes % PAGE_SIZE as u64 != 0 {
            return Err(MemoryError::BadSlotSize(slot_bytes));
        }
        let mut slots = Vec::new();
        let mut gpa = 0u64;
        while gpa < size {
            let len = (size - gpa).min(slot_bytes) as usize;
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
            // Transparent huge pages: a read of untouched memory (a zero-page
            // scan) then maps the huge zero page once per 2 MiB instead of
            // faulting every 4 KiB, and first writes fault per 2 MiB. Only a
            // hint: without THP the mapping works the same, just slower.
            // SAFETY: `host .. host + len` is the mapping just created.
            unsafe { libc::madvise(host, len, libc::MADV_HUGEPAGE) };
            slots.push(Slot {
                index: slots.len() as u32,
                guest_phys: gpa,
                host: host.cast(),
                len,
            });
            gpa += len as u64;
        }
        Ok(GuestRam { slots, size })
    }

    /// Total RAM size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The slots, in guest-physical order.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// One slot by index.
    pub fn slot(&self, slot: u32) -> Result<&Slot, MemoryError> {
        self.slots
            .get(slot as usize)
            .ok_or(MemoryError::NoSuchSlot(slot))
    }

    /// Host pointer and length for `gpa .. gpa + len`, which must lie inside
    /// one slot. For vectored I/O (`iovec`) and `UFFDIO_COPY`: the memory may
    /// change under the caller while the guest runs.
    pub fn host_range(&self, gpa: u64, len: u64) -> Result<(*mut u8, usize), MemoryError> {
        let out = MemoryError::RangeOutOfRam { gpa, len };
        let slot = self
            .slots
            .iter()
            .find(|s| gpa >= s.guest_phys && gpa < s.guest_phys + s.len())
            .ok_or(out.clone())?;
        let off = gpa - slot.guest_phys;
        if len > slot.len() - off {
            return Err(out);
        }
        // SAFETY: `off + len <= slot.len`, so the pointer stays inside the mapping.
        Ok((unsafe { slot.host.add(off as usize) }, len as usize))
    }

    /// Copies `buf.len()` bytes of guest memory at `gpa` into `buf`.
    /// Sound while the vCPU runs (the copy may observe a torn page, which the
    /// dirty log makes the migration resend).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let (src, len) = self.host_range(gpa, buf.len() as u64)?;
        // SAFETY: `src..src+len` is inside a live mapping (host_range) and `buf`
        // is a distinct host buffer of exactly `len` bytes.
        unsafe { ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), len) };
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa` (loading images, parameter
    /// blocks, received pages).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let (dst, len) = self.host_range(gpa, data.len() as u64)?;
        // SAFETY: `dst..dst+len` is inside a live mapping and `data` is a host
        // buffer of `len` bytes that cannot overlap guest RAM (no reference to
        // guest RAM is ever handed out).
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), dst, len) };
        Ok(())
    }

    /// Copies page `page` of slot `slot` into `out`.
    pub fn read_page(
        &self,
        slot: u32,
        page: u64,
        out: &mut [u8; PAGE_SIZE],
    ) -> Result<(), MemoryError> {
        let src = self.slot(slot)?.page_ptr(page)?;
        // SAFETY: `src` is the start of a whole page inside the mapping; `out` is
        // a host buffer of one page.
        unsafe { ptr::copy_nonoverlapping(src, out.as_mut_ptr(), PAGE_SIZE) };
        Ok(())
    }

    /// Overwrites page `page` of slot `slot` with `data` (destination side).
    pub fn write_page(
        &self,
        slot: u32,
        page: u64,
        data: &[u8; PAGE_SIZE],
    ) -> Result<(), MemoryError> {
        let dst = self.slot(slot)?.page_ptr(page)?;
        // SAFETY: `dst` is the start of a whole page inside the mapping; `data` is
        // a host buffer of one page, disjoint from guest RAM.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), dst, PAGE_SIZE) };
        Ok(())
    }

    /// Whether page `page` of slot `slot` is all zero bytes (sent as a zero
    /// page instead of 4 KiB). Stops at the first non-zero byte.
    pub fn is_zero_page(&self, slot: u32, page: u64) -> Result<bool, MemoryError> {
        let p = self.slot(slot)?.page_ptr(page)?;
        // SAFETY: `page_ptr` returned the start of a whole page of the mapping.
        Ok(unsafe { page_is_zero(p) })
    }

    /// A 64-bit digest of all guest memory: every byte is read, all-zero pages
    /// contribute nothing (so sparse memory hashes at scan speed), and each
    /// non-zero page is hashed together with its guest page number. Two RAMs
    /// of the same size with equal contents have equal digests. Only
    /// meaningful while the vCPU is paused.
    pub fn digest(&self) -> u64 {
        let mut acc = 0u64;
        let mut buf = [0u64; PAGE_SIZE / 8];
        for slot in &self.slots {
            let first = slot.guest_phys / PAGE_SIZE as u64;
            for page in 0..slot.pages() {
                // SAFETY: `page < slot.pages()`, so the page lies inside the mapping.
                let p = unsafe { slot.host.add(page as usize * PAGE_SIZE) };
                // SAFETY: `p` is the start of a whole page of the mapping.
                if unsafe { page_is_zero(p) } {
                    continue;
                }
                // SAFETY: one whole page inside the mapping into a disjoint
                // host buffer of one page.
                unsafe { ptr::copy_nonoverlapping(p, buf.as_mut_ptr().cast(), PAGE_SIZE) };
                acc = acc.wrapping_add(term(first + page, &buf));
            }
        }
        acc
    }

    /// The [`digest`](GuestRam::digest) of memory in which every page not
    /// listed in `pages` (guest page numbers) is known to be zero, computed
    /// by reading only the listed pages. A destination that tracks the pages
    /// it wrote into fresh (all-zero) RAM gets the full digest in time
    /// proportional to what arrived instead of to the RAM size. Listed pages
    /// outside RAM are an error; each page must be listed at most once.
    pub fn digest_of(&self, pages: impl IntoIterator<Item = u64>) -> Result<u64, MemoryError> {
        let mut acc = 0u64;
        let mut buf = [0u64; PAGE_SIZE / 8];
        for gfn in pages {
            let gpa = gfn
                .checked_mul(PAGE_SIZE as u64)
                .ok_or(MemoryError::RangeOutOfRam {
                    gpa: u64::MAX,
                    len: PAGE_SIZE as u64,
                })?;
            let (p, _) = self.host_range(gpa, PAGE_SIZE as u64)?;
            // SAFETY: `host_range` returned a whole page inside a live mapping.
            if unsafe { page_is_zero(p) } {
                continue;
            }
            // SAFETY: one whole page inside the mapping into a disjoint host
            // buffer of one page.
            unsafe { ptr::copy_nonoverlapping(p, buf.as_mut_ptr().cast(), PAGE_SIZE) };
            acc = acc.wrapping_add(term(gfn, &buf));
        }
        Ok(acc)
    }
}

/// What guest page `gfn` holding `page` adds to a [`GuestRam::digest`]
/// (0 for a zero page): the digest is the wrapping sum of these, so a
/// destination can account for a page by its contents at the time it
/// installed it, after its guest has changed it.
pub fn page_digest(gfn: u64, page: &[u8; PAGE_SIZE]) -> u64 {
    if page == &ZERO_PAGE {
        return 0;
    }
    let mut words = [0u64; PAGE_SIZE / 8];
    for (w, b) in words.iter_mut().zip(page.chunks_exact(8)) {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(b);
        // Native order, as the digest's copy of the page into words has.
        *w = u64::from_ne_bytes(bytes);
    }
    term(gfn, &words)
}

/// The digest term of a non-zero page `gfn` read as words.
fn term(gfn: u64, words: &[u64; PAGE_SIZE / 8]) -> u64 {
    mix(hash_words(words) ^ gfn)
}

/// An all-zero page to compare against.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Whether the page at `p` is all zero.
///
/// # Safety
/// `p` must point to the start of a whole page inside a live mapping.
unsafe fn page_is_zero(p: *const u8) -> bool {
    // libc's memcmp is vectorised even in debug builds and reads through a raw
    // pointer, which is sound while the guest writes the page (the answer is
    // then just stale, as any read of live memory is).
    // SAFETY: per this function's contract `p` is a whole page inside a live
    // mapping; ZERO_PAGE is a page-sized static.
    unsafe { libc::memcmp(p.cast(), ZERO_PAGE.as_ptr().cast(), PAGE_SIZE) == 0 }
}

fn hash_words(words: &[u64; PAGE_SIZE / 8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut lanes = [1u64, 2, 3, 4];
    for chunk in words.chunks_exact(4) {
        for (lane, w) in lanes.iter_mut().zip(chunk) {
            *lane = (*lane ^ w).wrapping_mul(K).rotate_left(29);
        }
    }
    lanes.iter().fold(0u64, |a, l| mix(a ^ l).wrapping_add(K))
}

/// splitmix64 finaliser: spreads every input bit over the output.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_split_and_bounds() {
        let ram = GuestRam::new(5 * PAGE_SIZE as u64, 2 * PAGE_SIZE as u64).unwrap();
        assert_eq!(ram.slots().len(), 3);
        assert_eq!(ram.slots()[2].pages(), 1);
        assert_eq!(ram.slots()[2].guest_phys(), 4 * PAGE_SIZE as u64);
        let mut page = [0u8; PAGE_SIZE];
        assert!(matches!(
            ram.read_page(2, 1, &mut page),
            Err(MemoryError::PageOutOfRange { .. })
        ));
        assert_eq!(
            ram.read_page(3, 0, &mut page),
            Err(MemoryError::NoSuchSlot(3))
        );
        // A range straddling two slots is refused rather than split.
        assert!(ram.write(2 * PAGE_SIZE as u64 - 1, &[1, 2]).is_err());
        assert!(GuestRam::new(100, 4096).is_err());
        assert!(GuestRam::new(4096, 0).is_err());
    }

    #[test]
    fn zero_pages_and_digest() {
        let a = GuestRam::new(8 * PAGE_SIZE as u64, 4 * PAGE_SIZE as u64).unwrap();
        let b = GuestRam::new(8 * PAGE_SIZE as u64, 4 * PAGE_SIZE as u64).unwrap();
        assert_eq!(a.digest(), b.digest());
        assert!(a.is_zero_page(1, 3).unwrap());
        a.write(5 * PAGE_SIZE as u64 + 4095, &[7]).unwrap();
        assert!(!a.is_zero_page(1, 1).unwrap());
        assert_ne!(a.digest(), b.digest());
        let mut page = [0u8; PAGE_SIZE];
        a.read_page(1, 1, &mut page).unwrap();
        assert_eq!(page[4095], 7);
        b.write_page(1, 1, &page).unwrap();
        assert_eq!(a.digest(), b.digest());
        // The same contents at another page number hash differently.
        let c = GuestRam::new(8 * PAGE_SIZE as u64, 4 * PAGE_SIZE as u64).unwrap();
        c.write_page(1, 2, &page).unwrap();
        assert_ne!(a.digest(), c.digest());
    }

    #[test]
    fn page_digests_sum_to_the_digest() {
        let a = GuestRam::new(8 * PAGE_SIZE as u64, 4 * PAGE_SIZE as u64).unwrap();
        a.write(2 * PAGE_SIZE as u64 + 100, &[7, 8, 9]).unwrap();
        a.write(5 * PAGE_SIZE as u64, &[1]).unwrap();
        let mut page = [0u8; PAGE_SIZE];
        let sum = (0..8u64).fold(0u64, |acc, p| {
            a.read(p * PAGE_SIZE as u64, &mut page).unwrap();
            acc.wrapping_add(page_digest(p, &page))
        });
        assert_eq!(sum, a.digest());
        assert_eq!(page_digest(3, &[0; PAGE_SIZE]), 0);
        // The same bytes at another page number count differently.
        a.read(5 * PAGE_SIZE as u64, &mut page).unwrap();
        assert_ne!(page_digest(5, &page), page_digest(6, &page));
    }

    #[test]
    fn digest_of_written_pages_equals_full_digest() {
        let a = GuestRam::new(8 * PAGE_SIZE as u64, 4 * PAGE_SIZE as u64).unwrap();
        a.write(3 * PAGE_SIZE as u64 + 9, &[1, 2, 3]).unwrap();
        a.write(6 * PAGE_SIZE as u64, &[4]).unwrap();
        // Listing zero pages too changes nothing.
        assert_eq!(a.digest_of([3, 6, 7]).unwrap(), a.digest());
        assert_eq!(
            a.digest_of([]).unwrap(),
            GuestRam::new(4096, 4096).unwrap().digest()
        );
        assert_ne!(a.digest_of([3]).unwrap(), a.digest());
        assert!(a.digest_of([8]).is_err());
        assert!(a.digest_of([u64::MAX]).is_err());
    }
}
