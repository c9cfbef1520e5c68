//! The guest's RAM: a checked, ordered set of regions.

use std::any::Any;
use std::collections::HashSet;
use std::fmt;
use std::ptr;
use std::sync::Arc;

use super::digest::{page_is_zero, term};
use super::{GuestRegion, MemoryError, PAGE_SIZE};

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
        let out = MemoryError::RangeOutOfRam { gpa, len };
        let (_, region) = self.locate(gpa).ok_or(out.clone())?;
        let (host, rest) = region
            .host_at(gpa - region.guest_phys())
            .ok_or(out.clone())?;
        if len > rest {
            return Err(out);
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

    /// Whether page `page` of region `region` is all zero bytes (sent as a
    /// zero page instead of 4 KiB). Stops at the first non-zero byte.
    pub fn is_zero_page(&self, region: usize, page: u64) -> Result<bool, MemoryError> {
        let p = self.region(region)?.page_ptr(region, page)?;
        // SAFETY: `page_ptr` returned the start of a whole page of the mapping.
        Ok(unsafe { page_is_zero(p) })
    }

    /// A 64-bit digest of all guest memory: every byte is read, all-zero
    /// pages contribute nothing (so sparse memory hashes at scan speed), and
    /// each non-zero page adds its [`page_digest`](super::page_digest) term,
    /// which mixes in its guest page number (guest-physical address / page
    /// size). Two memories with equal contents at equal guest-physical
    /// addresses have equal digests, however they are cut into regions.
    /// Only meaningful while the guest is paused.
    pub fn digest(&self) -> u64 {
        let mut acc = 0u64;
        let mut buf = [0u64; PAGE_SIZE / 8];
        for (index, region) in self.inner.regions.iter().enumerate() {
            let first = region.guest_phys() / PAGE;
            for page in 0..region.pages() {
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
