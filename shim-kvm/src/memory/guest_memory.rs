//! The guest's RAM: a checked, ordered set of regions.

use std::any::Any;
use std::collections::HashSet;
use std::fmt;
use std::num::NonZeroUsize;
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use livemig_core::digest::DigestKey;

use super::digest::{copy_page_term, page_is_zero, page_term, term};
use super::populated::Pagemap;
use super::{Backing, GuestRegion, MemoryError, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// A guest's RAM as livemig sees it: regions in guest-physical order,
/// checked once to be page aligned, disjoint, and uniquely named and
/// numbered (one name is one RAM block of the stream, one number one KVM
/// memslot). Region `i` of [`GuestMemory::regions`] is RAM block `i`.
///
/// Cloning is cheap (the regions are shared) and clones may be used from
/// any thread. Every access is a raw copy: the guest and the VMM's devices
/// may write the memory at the same time, in which case a read returns
/// some mix of old and new bytes (the dirty log makes a migration resend
/// such a page) and never undefined behaviour.
#[derive(Clone)]
pub struct GuestMemory {
    inner: Arc<Inner>,
}

struct Inner {
    regions: Vec<GuestRegion>,
    size: u64,
    /// Where [`GuestMemory::populated`] asks (`None`: nowhere to ask,
    /// every page may hold data).
    pagemap: Option<Pagemap>,
    /// Set once [`GuestMemory::prealloc`] populated every page: no page
    /// is missing any more, which postcopy's userfaultfd would need.
    preallocated: AtomicBool,
    /// Whatever keeps the mappings alive (a vm-memory `GuestMemoryMmap`,
    /// livemig's own anonymous mappings), dropped after the last clone.
    _owner: Option<Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestMemory")
            .field("regions", &self.inner.regions)
            .field("size", &self.inner.size)
            .finish_non_exhaustive()
    }
}

impl GuestMemory {
    /// The memory made of `regions` (in any order; they are sorted by
    /// guest-physical address), keeping `owner` alive as long as any clone
    /// of the result exists: pass whatever owns the mappings when the
    /// regions' [`GuestRegion::new`] promise rests on it.
    ///
    /// Refused: no region, two regions overlapping in guest-physical space,
    /// two with the same name, two with the same memslot.
    pub fn new(
        mut regions: Vec<GuestRegion>,
        owner: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Result<GuestMemory, MemoryError> {
        if regions.is_empty() {
            return Err(MemoryError::NoRegions);
        }
        regions.sort_by_key(GuestRegion::guest_phys);
        for pair in regions.windows(2) {
            if pair[1].guest_phys() < pair[0].guest_end() {
                return Err(MemoryError::Overlap {
                    first: pair[0].name().into(),
                    second: pair[1].name().into(),
                });
            }
        }
        let mut names = HashSet::new();
        for r in &regions {
            if !names.insert(r.name()) {
                return Err(MemoryError::DuplicateName(r.name().into()));
            }
        }
        for (i, r) in regions.iter().enumerate() {
            if let Some(other) = regions[..i].iter().find(|o| o.slot() == r.slot()) {
                return Err(MemoryError::DuplicateSlot {
                    slot: r.slot(),
                    first: other.name().into(),
                    second: r.name().into(),
                });
            }
        }
        let size = regions.iter().map(GuestRegion::len).sum();
        Ok(GuestMemory {
            inner: Arc::new(Inner {
                regions,
                size,
                pagemap: Pagemap::open(),
                preallocated: AtomicBool::new(false),
                _owner: owner,
            }),
        })
    }

    /// The regions, in guest-physical order (the RAM blocks' order).
    pub fn regions(&self) -> &[GuestRegion] {
        &self.inner.regions
    }

    /// Region `index`.
    pub fn region(&self, index: usize) -> Result<&GuestRegion, MemoryError> {
        self.inner
            .regions
            .get(index)
            .ok_or(MemoryError::NoSuchRegion(index))
    }

    /// The region holding guest-physical `gpa`, with its index.
    pub fn locate(&self, gpa: u64) -> Option<(usize, &GuestRegion)> {
        let regions = &self.inner.regions;
        let after = regions.partition_point(|r| r.guest_phys() <= gpa);
        let index = after.checked_sub(1)?;
        let region = &regions[index];
        region.contains(gpa).then_some((index, region))
    }

    /// Total RAM in bytes (the sum of the regions' lengths).
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// One past the highest guest-physical address of RAM (the size of a
    /// bitmap indexed by guest page number, holes included).
    pub fn guest_end(&self) -> u64 {
        self.inner.regions.last().map_or(0, GuestRegion::guest_end)
    }

    /// Host pointer and length for `gpa .. gpa + len`, which must lie inside
    /// one region (one mapping). For vectored I/O (`iovec`) and
    /// `UFFDIO_COPY`: the memory may change under the caller while the
    /// guest runs, so the caller reads it only through the kernel or raw
    /// copies.
    pub fn host_range(&self, gpa: u64, len: u64) -> Result<(*mut u8, usize), MemoryError> {
        // Called per page by the gathers of both ends: the error is only
        // built when there is one.
        let out = || MemoryError::RangeOutOfRam { gpa, len };
        let (_, region) = self.locate(gpa).ok_or_else(out)?;
        let (host, rest) = region.host_at(gpa - region.guest_phys()).ok_or_else(out)?;
        if len > rest {
            return Err(out());
        }
        Ok((host, len as usize))
    }

    /// Calls `f(host, offset, len)` for each piece of `gpa .. gpa + len`
    /// split at region boundaries, after checking that the whole range is
    /// RAM (adjacent regions, no hole), so a refused range touches nothing.
    fn for_each_piece(
        &self,
        gpa: u64,
        len: u64,
        mut f: impl FnMut(*mut u8, usize, usize),
    ) -> Result<(), MemoryError> {
        let end = gpa
            .checked_add(len)
            .ok_or(MemoryError::RangeOutOfRam { gpa, len })?;
        for pass in [false, true] {
            let mut at = gpa;
            while at < end {
                let (host, rest) = self
                    .locate(at)
                    .and_then(|(_, r)| r.host_at(at - r.guest_phys()))
                    .ok_or(MemoryError::RangeOutOfRam { gpa, len })?;
                let piece = rest.min(end - at);
                if pass {
                    f(host, (at - gpa) as usize, piece as usize);
                }
                at += piece;
            }
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes of guest memory at `gpa` into `buf`. The
    /// range may span adjacent regions; a range that is not all RAM is
    /// refused before anything is copied. Sound while the guest runs (the
    /// copy may observe a torn page, which the dirty log makes the
    /// migration resend).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let dst = buf.as_mut_ptr();
        self.for_each_piece(gpa, buf.len() as u64, |src, off, len| {
            // SAFETY: `src .. src + len` is inside a live mapping
            // (for_each_piece) and `dst + off .. + len` inside `buf`, a host
            // buffer distinct from guest RAM (no reference to guest RAM is
            // ever handed out).
            unsafe { ptr::copy_nonoverlapping(src, dst.add(off), len) }
        })
    }

    /// Copies `data` into guest memory at `gpa` (loading images, parameter
    /// blocks, received pages); split and refused as [`GuestMemory::read`].
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let src = data.as_ptr();
        self.for_each_piece(gpa, data.len() as u64, |dst, off, len| {
            // SAFETY: `dst .. dst + len` is inside a live mapping and
            // `src + off .. + len` inside `data`, a host buffer that cannot
            // overlap guest RAM.
            unsafe { ptr::copy_nonoverlapping(src.add(off), dst, len) }
        })
    }

    /// Maps `gpa .. gpa + len` writable before it is written
    /// (`MADV_POPULATE_WRITE`, Linux 5.14): the kernel allocates the pages
    /// of a run in one call, instead of the writer taking one page fault
    /// per page. A page already populated is left as it is (its contents
    /// stay). Split at region boundaries and refused as
    /// [`GuestMemory::read`]; the kernel's refusal (an older kernel, a
    /// mapping it cannot populate, no memory) is its errno, and the range
    /// is then as populated as the kernel got, which is harmless: a write
    /// faults in what is missing.
    ///
    /// Why: the first write of a page of fresh anonymous memory costs a
    /// fault whose entry and exit are most of its price under nested KVM
    /// (`livemig bench --case first-touch`: 2.2-3.9 against 1.5-2.4 us a page
    /// here); a destination writing received pages populates each run
    /// first.
    pub fn populate_write(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let mut errno = 0;
        self.for_each_piece(gpa, len, |host, _, len| {
            if errno != 0 {
                return;
            }
            // SAFETY: `host .. host + len` is inside a live mapping of guest
            // RAM (for_each_piece). Populating changes no byte of it: a
            // page already present is skipped, a missing one is mapped as
            // the zero-filled page a write would have faulted in.
            let r = unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) };
            if r != 0 {
                errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            }
        })?;
        match errno {
            0 => Ok(()),
            e => Err(MemoryError::Populate(e)),
        }
    }

    /// Populates every page of guest RAM writable up front
    /// (`MADV_POPULATE_WRITE`, QEMU's `-mem-prealloc`), from `threads`
    /// threads taking 2 MiB pieces in turn. A page already present keeps
    /// its contents; a missing one becomes a zero page, so what the memory
    /// reads does not change.
    ///
    /// Why: a destination receiving a precopy writes every page it is sent
    /// into RAM never touched, and that first write (the allocation, its
    /// zeroing and, nested, the host's own first touch) is most of what it
    /// pays per page. A VMM that preallocates at its start-up, before it
    /// takes a migration, pays it outside the migration. The price is the
    /// whole RAM resident from the start, pages never sent included, and
    /// no postcopy: userfaultfd reports only missing pages, and after this
    /// none is missing ([`GuestMemory::is_preallocated`] says so, and a
    /// destination refuses a postcopy over such RAM).
    ///
    /// The kernel's refusal (before 5.14, a mapping it cannot populate, no
    /// memory) is its errno; the RAM is then as populated as the kernel
    /// got, and not marked preallocated.
    pub fn prealloc(&self, threads: NonZeroUsize) -> Result<(), MemoryError> {
        const PIECE: u64 = 2 << 20;
        let end = self.size().div_ceil(PIECE);
        let next = AtomicU64::new(0);
        // Pieces are counted over the regions laid end to end, so that a
        // piece never spans two regions (their gaps are not RAM).
        let piece = |i: u64| -> Option<(u64, u64)> {
            let mut skip = i * PIECE;
            for r in self.regions() {
                if skip < r.len() {
                    return Some((r.guest_phys() + skip, PIECE.min(r.len() - skip)));
                }
                skip -= r.len();
            }
            None
        };
        let work = || -> Result<(), MemoryError> {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    return Ok(());
                }
                let Some((gpa, len)) = piece(i) else {
                    return Ok(());
                };
                self.populate_write(gpa, len).inspect_err(|_| {
                    // The others stop at their next piece.
                    next.store(end, Ordering::Relaxed);
                })?;
            }
        };
        std::thread::scope(|s| {
            let helpers: Vec<_> = (1..threads.get()).map(|_| s.spawn(work)).collect();
            let mine = work();
            helpers
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .fold(mine, Result::and)
        })?;
        self.inner.preallocated.store(true, Ordering::Release);
        Ok(())
    }

    /// Whether [`GuestMemory::prealloc`] populated all of this RAM (on
    /// this memory or a clone of it).
    pub fn is_preallocated(&self) -> bool {
        self.inner.preallocated.load(Ordering::Acquire)
    }

    /// Copies page `page` of region `region` into `out`.
    pub fn read_page(
        &self,
        region: usize,
        page: u64,
        out: &mut [u8; PAGE_SIZE],
    ) -> Result<(), MemoryError> {
        let src = self.region(region)?.page_ptr(region, page)?;
        // SAFETY: `src` is the start of a whole page inside the mapping; `out`
        // is a host buffer of one page.
        unsafe { ptr::copy_nonoverlapping(src, out.as_mut_ptr(), PAGE_SIZE) };
        Ok(())
    }

    /// Overwrites page `page` of region `region` with `data`.
    pub fn write_page(
        &self,
        region: usize,
        page: u64,
        data: &[u8; PAGE_SIZE],
    ) -> Result<(), MemoryError> {
        let dst = self.region(region)?.page_ptr(region, page)?;
        // SAFETY: `dst` is the start of a whole page inside the mapping; `data`
        // is a host buffer of one page, disjoint from guest RAM.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), dst, PAGE_SIZE) };
        Ok(())
    }

    /// Overwrites page `page` of region `region` with `data` and returns
    /// the self-check's term of it as page `page` of RAM block `region`
    /// ([`slice_page_term`](super::slice_page_term)'s): what a verifying
    /// destination does with each page it places, reading the received
    /// bytes once for the copy and the hash where the two calls read them
    /// twice (with AVX-512 each 64 bytes are loaded once for both).
    pub fn write_page_term(
        &self,
        region: usize,
        page: u64,
        data: &[u8; PAGE_SIZE],
        key: &DigestKey,
    ) -> Result<u64, MemoryError> {
        let dst = self.region(region)?.page_ptr(region, page)?;
        let block = u16::try_from(region).map_err(|_| MemoryError::NoSuchRegion(region))?;
        // SAFETY: `page_ptr` returned the start of a whole page of the
        // mapping, which is writable RAM; `data` is a host buffer of one
        // page, disjoint from guest RAM.
        Ok(unsafe { copy_page_term(dst, data, key, block, page) })
    }

    /// Whether page `page` of region `region` is all zero bytes (sent as a
    /// zero page instead of 4 KiB). Stops at the first non-zero byte.
    pub fn is_zero_page(&self, region: usize, page: u64) -> Result<bool, MemoryError> {
        let p = self.region(region)?.page_ptr(region, page)?;
        // SAFETY: `page_ptr` returned the start of a whole page of the mapping.
        Ok(unsafe { page_is_zero(p) })
    }

    /// The self-check's term of page `page` of region `region` (RAM block
    /// `region`), as [`DigestKey::page_term`] computes it over the page's
    /// bytes: what a verifying source books when it sends the page.
    pub fn page_term(&self, region: usize, page: u64, key: &DigestKey) -> Result<u64, MemoryError> {
        let p = self.region(region)?.page_ptr(region, page)?;
        let block = u16::try_from(region).map_err(|_| MemoryError::NoSuchRegion(region))?;
        // SAFETY: `page_ptr` returned the start of a whole page of the mapping.
        Ok(unsafe { page_term(p, key, block, page) })
    }

    /// Which of pages `first .. first + 64 * mask.len()` of region
    /// `region` may hold data: bit `i` of word `w` (page `first + 64 * w +
    /// i`) is set for a page that is, or may be, populated, and clear for
    /// one never populated (it reads as zero) — found out without touching
    /// the pages, so none is faulted in (see the `populated` module for
    /// the mechanism). Pages of a region whose [`Backing`] is
    /// [`Backing::Other`] are all set, as are bits past the region's end.
    ///
    /// The answer holds at the moment of the call: a page written after it
    /// is populated, which only a dirty log can tell later. On an error the
    /// mask says every page may hold data.
    pub fn populated(
        &self,
        region: usize,
        first: u64,
        mask: &mut [u64],
    ) -> Result<(), MemoryError> {
        let r = self.region(region)?;
        mask.fill(u64::MAX);
        let (Backing::PrivateAnonymous, Some(pagemap)) = (r.backing(), &self.inner.pagemap) else {
            return Ok(());
        };
        if first >= r.pages() {
            return Ok(());
        }
        let pages = (r.pages() - first).min(mask.len() as u64 * 64);
        let addr = r.host_addr() + first * PAGE;
        pagemap.populated(addr, pages, mask).map_err(|e| {
            // Nothing known after all: every page may hold data.
            mask.fill(u64::MAX);
            MemoryError::Pagemap(e.raw_os_error().unwrap_or(0))
        })
    }

    /// A 64-bit digest of all guest memory: every byte of every page that
    /// may hold data is read ([`GuestMemory::populated`]: a page never
    /// populated is zero without being read, or faulted in), all-zero
    /// pages contribute nothing (so sparse memory hashes at scan speed),
    /// and each non-zero page adds its [`page_digest`](super::page_digest)
    /// term, which mixes in its guest page number (guest-physical address /
    /// page size). Two memories with equal contents at equal guest-physical
    /// addresses have equal digests, however they are cut into regions.
    /// Only meaningful while the guest is paused.
    pub fn digest(&self) -> u64 {
        const WINDOW: u64 = 4096;
        let mut acc = 0u64;
        let mut buf = [0u64; PAGE_SIZE / 8];
        let mut mask = [0u64; (WINDOW / 64) as usize];
        for (index, region) in self.inner.regions.iter().enumerate() {
            let first = region.guest_phys() / PAGE;
            for page in 0..region.pages() {
                if page % WINDOW == 0 {
                    // An error leaves every bit set: every page is read.
                    let _ = self.populated(index, page, &mut mask);
                }
                let bit = page % WINDOW;
                if mask[(bit / 64) as usize] >> (bit % 64) & 1 == 0 {
                    continue;
                }
                // `page < pages`: page_ptr cannot refuse it.
                let Ok(p) = region.page_ptr(index, page) else {
                    continue;
                };
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

    /// The [`digest`](GuestMemory::digest) of memory in which every page
    /// not listed in `pages` (guest page numbers) is known to be zero,
    /// computed by reading only the listed pages. A destination that tracks
    /// the pages it wrote into fresh (all-zero) RAM gets the full digest in
    /// time proportional to what arrived instead of to the RAM size. Listed
    /// pages outside RAM are an error; each page must be listed at most once.
    pub fn digest_of(&self, pages: impl IntoIterator<Item = u64>) -> Result<u64, MemoryError> {
        let mut acc = 0u64;
        let mut buf = [0u64; PAGE_SIZE / 8];
        for gfn in pages {
            let gpa = gfn.checked_mul(PAGE).ok_or(MemoryError::RangeOutOfRam {
                gpa: u64::MAX,
                len: PAGE,
            })?;
            let (p, _) = self.host_range(gpa, PAGE)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{RegionLayout, page_digest};

    fn layout(regions: &[(&str, u64, u64)]) -> Vec<RegionLayout> {
        regions
            .iter()
            .enumerate()
            .map(|(slot, &(name, first_page, pages))| RegionLayout {
                name: name.into(),
                guest_phys: first_page * PAGE,
                len: pages * PAGE,
                slot: slot as u32,
            })
            .collect()
    }

    /// Pages 0..4 and 4..8 in two adjacent regions, then a hole, then
    /// pages 16..20.
    fn three_regions() -> GuestMemory {
        GuestMemory::anonymous(&layout(&[("high", 16, 4), ("low", 0, 4), ("mid", 4, 4)])).unwrap()
    }

    fn fake(name: &str, first_page: u64, pages: u64, host: u64, slot: u32) -> GuestRegion {
        // SAFETY: these regions are only validated by GuestMemory::new,
        // never accessed.
        unsafe { GuestRegion::new(name, first_page * PAGE, host as *mut u8, pages * PAGE, slot) }
            .unwrap()
    }

    #[test]
    fn new_sorts_and_refuses_overlaps_duplicates_and_nothing() {
        let m = three_regions();
        let names: Vec<_> = m.regions().iter().map(GuestRegion::name).collect();
        assert_eq!(names, ["low", "mid", "high"]);
        assert_eq!((m.size(), m.guest_end()), (12 * PAGE, 20 * PAGE));
        assert_eq!(m.locate(5 * PAGE).map(|(i, _)| i), Some(1));
        assert_eq!(m.locate(19 * PAGE + 4095).map(|(i, _)| i), Some(2));
        assert!(m.locate(8 * PAGE).is_none() && m.locate(20 * PAGE).is_none());

        let host = 0x7000_0000;
        assert_eq!(
            GuestMemory::new(
                vec![
                    fake("a", 0, 4, host, 0),
                    fake("b", 3, 4, host + 0x10_0000, 1)
                ],
                None
            )
            .unwrap_err(),
            MemoryError::Overlap {
                first: "a".into(),
                second: "b".into()
            }
        );
        assert_eq!(
            GuestMemory::new(
                vec![
                    fake("a", 0, 4, host, 0),
                    fake("a", 4, 4, host + 0x10_0000, 1)
                ],
                None
            )
            .unwrap_err(),
            MemoryError::DuplicateName("a".into())
        );
        assert_eq!(
            GuestMemory::new(
                vec![
                    fake("a", 0, 4, host, 7),
                    fake("b", 4, 4, host + 0x10_0000, 7)
                ],
                None
            )
            .unwrap_err(),
            MemoryError::DuplicateSlot {
                slot: 7,
                first: "a".into(),
                second: "b".into()
            }
        );
        assert_eq!(
            GuestMemory::new(Vec::new(), None).unwrap_err(),
            MemoryError::NoRegions
        );
        assert!(matches!(
            GuestMemory::anonymous(&layout(&[("a", 0, 0)])),
            Err(MemoryError::EmptyRegion(_))
        ));
    }

    #[test]
    fn contiguous_layouts_name_and_number_their_regions() {
        let l = RegionLayout::contiguous("pc.ram", 5 * PAGE, 2 * PAGE).unwrap();
        let got: Vec<_> = l
            .iter()
            .map(|r| (r.name.as_str(), r.guest_phys / PAGE, r.len / PAGE, r.slot))
            .collect();
        assert_eq!(
            got,
            [
                ("pc.ram", 0, 2, 0),
                ("pc.ram.1", 2, 2, 1),
                ("pc.ram.2", 4, 1, 2)
            ]
        );
        assert_eq!(
            RegionLayout::contiguous("r", 100, 4096),
            Err(MemoryError::BadSize(100))
        );
        assert_eq!(
            RegionLayout::contiguous("r", 4096, 0),
            Err(MemoryError::BadSlotSize(0))
        );
    }

    #[test]
    fn reads_and_writes_split_across_adjacent_regions_and_refuse_holes() {
        let m = three_regions();
        // 4 bytes across the low/mid boundary.
        m.write(4 * PAGE - 2, &[1, 2, 3, 4]).unwrap();
        let mut page = [0u8; PAGE_SIZE];
        m.read_page(0, 3, &mut page).unwrap();
        assert_eq!(page[PAGE_SIZE - 2..], [1, 2]);
        m.read_page(1, 0, &mut page).unwrap();
        assert_eq!(page[..2], [3, 4]);
        let mut back = [0u8; 4];
        m.read(4 * PAGE - 2, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3, 4]);
        // A range running into the hole is refused whole: nothing written.
        assert_eq!(
            m.write(8 * PAGE - 1, &[9, 9]),
            Err(MemoryError::RangeOutOfRam {
                gpa: 8 * PAGE - 1,
                len: 2
            })
        );
        m.read_page(1, 3, &mut page).unwrap();
        assert_eq!(page[PAGE_SIZE - 1], 0);
        assert!(m.read(u64::MAX, &mut back).is_err());
        // host_range never spans two mappings.
        assert!(m.host_range(4 * PAGE - 2, 4).is_err());
        assert!(m.host_range(16 * PAGE, 4 * PAGE).is_ok());
        assert!(m.host_range(16 * PAGE, 4 * PAGE + 1).is_err());
        // Page access by region.
        assert_eq!(
            m.read_page(3, 0, &mut page),
            Err(MemoryError::NoSuchRegion(3))
        );
        assert_eq!(
            m.is_zero_page(2, 4),
            Err(MemoryError::PageOutOfRange {
                region: 2,
                page: 4,
                pages: 4
            })
        );
    }

    #[test]
    fn zero_pages_and_digest() {
        let a = three_regions();
        let b = three_regions();
        assert_eq!(a.digest(), b.digest());
        assert!(a.is_zero_page(2, 3).unwrap());
        a.write(17 * PAGE + 4095, &[7]).unwrap();
        assert!(!a.is_zero_page(2, 1).unwrap());
        assert_ne!(a.digest(), b.digest());
        let mut page = [0u8; PAGE_SIZE];
        a.read_page(2, 1, &mut page).unwrap();
        assert_eq!(page[4095], 7);
        b.write_page(2, 1, &page).unwrap();
        assert_eq!(a.digest(), b.digest());
        // The same contents at another page number hash differently.
        let c = three_regions();
        c.write_page(2, 2, &page).unwrap();
        assert_ne!(a.digest(), c.digest());
        // Equal contents at equal addresses, cut into other regions: equal.
        let d = GuestMemory::anonymous(&layout(&[("all", 0, 8), ("top", 16, 4)])).unwrap();
        d.write_page(1, 1, &page).unwrap();
        assert_eq!(d.digest(), a.digest());
    }

    #[test]
    fn page_digests_sum_to_the_digest() {
        let a = three_regions();
        a.write(2 * PAGE + 100, &[7, 8, 9]).unwrap();
        a.write(5 * PAGE, &[1]).unwrap();
        a.write(19 * PAGE, &[2]).unwrap();
        let mut page = [0u8; PAGE_SIZE];
        let sum = (0..8u64).chain(16..20).fold(0u64, |acc, p| {
            a.read(p * PAGE, &mut page).unwrap();
            acc.wrapping_add(page_digest(p, &page))
        });
        assert_eq!(sum, a.digest());
        assert_eq!(page_digest(3, &[0; PAGE_SIZE]), 0);
        a.read(5 * PAGE, &mut page).unwrap();
        assert_ne!(page_digest(5, &page), page_digest(6, &page));
    }

    #[test]
    fn digest_of_written_pages_equals_full_digest() {
        let a = three_regions();
        a.write(3 * PAGE + 9, &[1, 2, 3]).unwrap();
        a.write(17 * PAGE, &[4]).unwrap();
        // Listing zero pages too changes nothing.
        assert_eq!(a.digest_of([3, 17, 7]).unwrap(), a.digest());
        assert_eq!(a.digest_of([]).unwrap(), three_regions().digest());
        assert_ne!(a.digest_of([3]).unwrap(), a.digest());
        assert!(a.digest_of([8]).is_err()); // the hole
        assert!(a.digest_of([20]).is_err());
        assert!(a.digest_of([u64::MAX]).is_err());
    }

    #[test]
    fn populated_tells_written_pages_from_untouched_ones_without_touching_them() {
        let m = GuestMemory::anonymous(&layout(&[("big", 0, 200), ("small", 300, 3)])).unwrap();
        assert_eq!(m.region(0).unwrap().backing(), Backing::PrivateAnonymous);
        m.write(5 * PAGE, &[1]).unwrap();
        m.write(130 * PAGE + 7, &[0]).unwrap(); // written, if with a zero
        let mut mask = [0u64; 4];
        m.populated(0, 0, &mut mask).unwrap();
        assert_eq!(mask, [1 << 5, 0, 1 << 2, u64::MAX << (200 - 192)]);
        // Asked from page 128: page 130 is bit 2; past the end is set.
        let mut mask = [0u64; 2];
        m.populated(0, 128, &mut mask).unwrap();
        assert_eq!(mask, [1 << 2, u64::MAX << (200 - 192)]);
        // The question itself faulted nothing in, and the digest reads only
        // populated pages: still one page resident of the first 128.
        let digest = m.digest();
        let mut mask = [0u64; 2];
        m.populated(0, 0, &mut mask).unwrap();
        assert_eq!(mask, [1 << 5, 0]);
        let mut five = [0u8; PAGE_SIZE];
        five[0] = 1;
        assert_eq!(digest, page_digest(5, &five));
        // A page dropped back (MADV_DONTNEED) is unpopulated again.
        let (host, _) = m.host_range(5 * PAGE, PAGE).unwrap();
        // SAFETY: one whole page of the region's private anonymous mapping;
        // dropping it makes it read as zero, which nothing here relies on
        // being otherwise.
        unsafe { libc::madvise(host.cast(), PAGE_SIZE, libc::MADV_DONTNEED) };
        m.populated(0, 0, &mut mask).unwrap();
        assert_eq!(mask, [0, 0]);
        assert_eq!(
            m.populated(2, 0, &mut mask),
            Err(MemoryError::NoSuchRegion(2))
        );
        // A region livemig was not told about: every page may hold data.
        let host = m.region(1).unwrap().host_addr();
        // SAFETY: the region of `m` (alive for the whole test), never
        // written through this view.
        let other = unsafe { GuestRegion::new("other", 0, host as *mut u8, 3 * PAGE, 0) }.unwrap();
        let other = GuestMemory::new(vec![other], None).unwrap();
        let mut mask = [0u64; 1];
        other.populated(0, 0, &mut mask).unwrap();
        assert_eq!(mask, [u64::MAX]);
    }

    #[test]
    fn clones_share_the_memory_across_threads() {
        let a = three_regions();
        let b = a.clone();
        std::thread::spawn(move || b.write(6 * PAGE, &[5]).unwrap())
            .join()
            .unwrap();
        let mut byte = [0u8; 1];
        a.read(6 * PAGE, &mut byte).unwrap();
        assert_eq!(byte, [5]);
    }
}
