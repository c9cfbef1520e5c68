//! Guest pages gathered into iovecs for one vectored send.

use std::fmt;
use std::io::IoSlice;
use std::marker::PhantomData;

use super::{GuestMemory, MemoryError, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// A record header plus guest pages, as iovecs for one vectored write
/// (`sendmsg`): the kernel copies the pages straight out of guest RAM,
/// without an intermediate copy. Each run of pages that are adjacent in the
/// list, in guest memory and in one region becomes a single iovec.
///
/// The iovecs are raw `iovec`s: no Rust reference to guest memory is ever
/// formed. They are only handed to the kernel, through
/// [`PageIovecs::as_io_slices`]; that is also why `Debug` shows only sizes.
pub struct PageIovecs<'a> {
    iov: Vec<libc::iovec>,
    bytes: usize,
    /// The header and the memory the iovecs point into, borrowed for 'a.
    _borrows: PhantomData<(&'a [u8], &'a GuestMemory)>,
}

// SAFETY: the iovecs point into the header and the guest memory, both
// borrowed for 'a and both shareable between threads (`&[u8]` and
// `GuestMemory` are Sync); PageIovecs itself never reads through them.
unsafe impl Send for PageIovecs<'_> {}
// SAFETY: as above; `&PageIovecs` only reads the iovecs' lengths.
unsafe impl Sync for PageIovecs<'_> {}

impl fmt::Debug for PageIovecs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageIovecs")
            .field("iovecs", &self.iov.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl<'a> PageIovecs<'a> {
    /// Gathers `header` and the guest pages numbered `pages` (guest-physical
    /// address / [`PAGE_SIZE`]), in that order. The receiver gets the header
    /// bytes followed by `pages.len()` whole pages. A page that is not RAM
    /// is refused.
    ///
    /// Sending straight from guest RAM while the vCPU runs may send a page
    /// the guest is half-way through writing. That is harmless: the engine
    /// clears a page's dirty bit before sending it, so the write that tore
    /// the copy marks the page dirty again and it is sent again later, at
    /// the latest in the stop-and-copy, when the vCPUs are paused.
    pub fn new(
        memory: &'a GuestMemory,
        header: &'a [u8],
        pages: &[u64],
    ) -> Result<PageIovecs<'a>, MemoryError> {
        let mut iov = Vec::with_capacity(1 + pages.len());
        let mut bytes = header.len();
        if !header.is_empty() {
            iov.push(iovec(header.as_ptr().cast_mut(), header.len()));
        }
        // The current run: first guest address, host start, length.
        let mut run: Option<(u64, *mut u8, usize)> = None;
        for &gfn in pages {
            let gpa = gfn.checked_mul(PAGE).ok_or(MemoryError::RangeOutOfRam {
                gpa: u64::MAX,
                len: PAGE,
            })?;
            let extended = run.and_then(|(start, host, len)| {
                if gpa.checked_sub(start) != Some(len as u64) {
                    return None;
                }
                // Succeeds only if the longer run still lies in one region,
                // i.e. one mapping, starting at the same host address.
                memory
                    .host_range(start, len as u64 + PAGE)
                    .ok()
                    .map(|(_, l)| (start, host, l))
            });
            match extended {
                Some(r) => run = Some(r),
                None => {
                    if let Some((_, host, len)) = run {
                        iov.push(iovec(host, len));
                    }
                    let (host, len) = memory.host_range(gpa, PAGE)?;
                    run = Some((gpa, host, len));
                }
            }
            bytes += PAGE_SIZE;
        }
        if let Some((_, host, len)) = run {
            iov.push(iovec(host, len));
        }
        Ok(PageIovecs {
            iov,
            bytes,
            _borrows: PhantomData,
        })
    }

    /// Number of iovecs: 1 for the header (if any) plus one per run of
    /// contiguous pages.
    pub fn iovec_count(&self) -> usize {
        self.iov.len()
    }

    /// Total bytes the iovecs cover: header plus pages.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The iovecs as the `IoSlice`s a vectored write takes, to be given to
    /// the kernel (`sendmsg`, `writev`) and advanced past what it took.
    /// Never dereference them: they point into live guest memory.
    pub fn as_io_slices(&mut self) -> &mut [IoSlice<'a>] {
        // SAFETY: std guarantees that `IoSlice` is ABI compatible with
        // `iovec` on Unix, so the vector's elements may be viewed as
        // `IoSlice`s of the same count. Each one covers a header borrowed for
        // 'a or whole pages inside a region of the memory borrowed for 'a
        // (checked by `host_range`), so the memory outlives the view. No
        // `&[u8]` is formed here; the caller hands the slices to the kernel,
        // which copies the bytes with `copy_from_user`.
        unsafe { std::slice::from_raw_parts_mut(self.iov.as_mut_ptr().cast(), self.iov.len()) }
    }
}

fn iovec(base: *mut u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionLayout;

    /// What the kernel would read from the iovecs (the memory is not
    /// written meanwhile, so reading it here is sound).
    fn gathered(iov: &mut PageIovecs<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        for s in iov.as_io_slices().iter() {
            let start = out.len();
            out.resize(start + s.len(), 0);
            // SAFETY: each iovec covers a live header or whole pages inside
            // the memory, which no thread writes during this test.
            unsafe {
                std::ptr::copy_nonoverlapping(s.as_ptr(), out[start..].as_mut_ptr(), s.len())
            };
        }
        out
    }

    #[test]
    fn runs_within_a_region_become_one_iovec() {
        // Regions of 4 pages: 3 and 4 are adjacent in guest memory but in
        // two mappings.
        let memory =
            GuestMemory::anonymous(&RegionLayout::contiguous("ram", 8 * PAGE, 4 * PAGE).unwrap())
                .unwrap();
        for p in 0..8u64 {
            memory.write(p * PAGE, &[p as u8 + 1; PAGE_SIZE]).unwrap();
        }
        let pages = [1u64, 2, 3, 4, 5, 0];
        let mut iov = PageIovecs::new(&memory, b"HDR", &pages).unwrap();
        // header, 1-3, 4-5, 0
        assert_eq!(iov.iovec_count(), 4);
        assert_eq!(iov.bytes(), 3 + pages.len() * PAGE_SIZE);
        let bytes = gathered(&mut iov);
        assert_eq!(&bytes[..3], b"HDR");
        for (chunk, &p) in bytes[3..].chunks(PAGE_SIZE).zip(&pages) {
            assert!(chunk.iter().all(|&b| b == p as u8 + 1), "page {p}");
        }
        assert_eq!(
            PageIovecs::new(&memory, b"", &[8]).unwrap_err(),
            MemoryError::RangeOutOfRam {
                gpa: 8 * PAGE,
                len: PAGE
            }
        );
        assert!(PageIovecs::new(&memory, b"", &[u64::MAX / 2]).is_err());
        assert_eq!(PageIovecs::new(&memory, b"", &[]).unwrap().iovec_count(), 0);
    }
}
