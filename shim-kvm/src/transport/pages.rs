//! Page batches: a record header and guest pages for one vectored write.

use std::fmt;
use std::io::IoSlice;

use super::TransportError;
use crate::memory::{GuestRam, MemoryError, PAGE_SIZE};

/// A page-batch record ready for one vectored write: the record header, then
/// the pages, with each run of pages that are adjacent in the list, in guest
/// memory and in one RAM slot gathered into a single iovec.
///
/// The iovecs point into live guest RAM and are only ever handed to the
/// kernel by [`Connection::write_page_batch`]; no Rust code reads through
/// them (see the `SAFETY` note in [`PageBatch::new`]'s body), which is also
/// why its `Debug` shows only sizes.
pub struct PageBatch<'a> {
    pub(super) iov: Vec<IoSlice<'a>>,
    bytes: usize,
}

impl fmt::Debug for PageBatch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageBatch")
            .field("iovecs", &self.iov.len())
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl<'a> PageBatch<'a> {
    /// Gathers `header` and the guest pages numbered `pages` (guest-physical
    /// address / [`PAGE_SIZE`]), in that order. The receiver gets the header
    /// bytes followed by `pages.len()` whole pages.
    ///
    /// Sending straight from guest RAM while the vCPU runs may send a page
    /// the guest is half-way through writing. That is harmless: the engine
    /// clears a page's dirty bit before sending it, so the write that tore
    /// the copy marks the page dirty again and it is sent again later, at
    /// the latest in the stop-and-copy, when the vCPU is paused.
    pub fn new(ram: &'a GuestRam, header: &'a [u8], pages: &[u64]) -> Result<Self, TransportError> {
        let page = PAGE_SIZE as u64;
        let mut iov = Vec::with_capacity(1 + pages.len());
        let mut bytes = header.len();
        if !header.is_empty() {
            iov.push(IoSlice::new(header));
        }
        // The current run: first guest address, host start, length.
        let mut run: Option<(u64, *mut u8, usize)> = None;
        for &gfn in pages {
            let gpa = gfn.checked_mul(page).ok_or(MemoryError::RangeOutOfRam {
                gpa: u64::MAX,
                len: page,
            })?;
            let extended = run.and_then(|(start, host, len)| {
                if gpa.checked_sub(start) != Some(len as u64) {
                    return None;
                }
                // Succeeds only if the longer run still lies in one slot,
                // i.e. one mapping, starting at the same host address.
                ram.host_range(start, len as u64 + page)
                    .ok()
                    .map(|(_, l)| (start, host, l))
            });
            match extended {
                Some(r) => run = Some(r),
                None => {
                    if let Some((_, host, len)) = run {
                        iov.push(guest_slice(ram, host, len));
                    }
                    let (host, len) = ram.host_range(gpa, page)?;
                    run = Some((gpa, host, len));
                }
            }
            bytes += PAGE_SIZE;
        }
        if let Some((_, host, len)) = run {
            iov.push(guest_slice(ram, host, len));
        }
        Ok(PageBatch { iov, bytes })
    }

    /// Number of iovecs: 1 for the header (if any) plus one per run of
    /// contiguous pages.
    pub fn iovec_count(&self) -> usize {
        self.iov.len()
    }

    /// Total bytes the batch sends: header plus pages.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// An iovec over `len` bytes of guest RAM at `host`, as returned by
/// [`GuestRam::host_range`] on `ram`.
fn guest_slice<'a>(_ram: &'a GuestRam, host: *mut u8, len: usize) -> IoSlice<'a> {
    // SAFETY: `host .. host + len` came from `ram.host_range`, so it lies
    // inside one slot's mapping, which stays mapped while `ram` is borrowed
    // for 'a. The vCPU may write these bytes concurrently; the shared slice
    // is still sound to form because no Rust code ever reads through it:
    // `PageBatch` keeps its iovecs private and only passes them to `sendmsg`,
    // where the kernel copies the bytes out with `copy_from_user`, exactly as
    // for a raw `iovec`. A torn copy is resent (see `PageBatch::new`).
    IoSlice::new(unsafe { std::slice::from_raw_parts(host.cast_const(), len) })
}
