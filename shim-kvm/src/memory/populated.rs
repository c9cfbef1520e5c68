//! Which pages of guest RAM hold data, asked of the kernel without
//! touching them.
//!
//! Reading a page of anonymous memory that was never written maps the
//! kernel's shared zero page: one page fault per page, which costs
//! microseconds under nested (PVM) KVM, so a zero-page check over an idle
//! 1 GiB guest spends most of a second faulting. Asking first avoids it.
//!
//! The question is asked of `/proc/self/pagemap`, one 64-bit entry per
//! page, read in batches (one `pread` per [`ENTRIES_PER_READ`] pages). A
//! page of a private anonymous mapping holds data exactly when its entry
//! is *present* (mapped) or *swapped* (bits 63 and 62; a page under
//! migration or a swapped-out THP is "swapped" too); a page with neither
//! was never written, or was dropped back (`MADV_DONTNEED`), and reads as
//! zero. The alternatives were weighed and refused:
//!
//! - `mincore` says *resident*: a swapped-out page of data is not resident,
//!   so it would be taken for a zero page and lost.
//! - `SEEK_DATA`/`SEEK_HOLE` needs the file behind memfd-backed RAM, which
//!   a [`GuestRegion`](super::GuestRegion) does not have (not yet).
//!
//! A page that was only *read* is present but mapped to the zero page (its
//! PFN is the zero page's). Telling that apart needs the PFN, which the
//! kernel shows only with `CAP_SYS_ADMIN`; it does not matter here: such a
//! page is read and found zero by a `memcmp` that no longer faults (the
//! mapping exists), so the answer stays correct and only costs a scan.
//!
//! Cost, measured here: a 4096-page query takes ~30 us over untouched
//! memory and ~310 us over populated memory (the kernel looks at each
//! mapped page), against the ~5 us fault of every untouched page it
//! saves; the engine therefore asks only in its first pass. Linux 6.7's
//! `PAGEMAP_SCAN` ioctl answers in ranges and took ~135 us over the same
//! populated pages; using it where the kernel has it is not done yet.
//!
//! Only private anonymous mappings are asked ([`Backing`]): for shared
//! memory and files, a page can hold data that is not mapped in this
//! process (another process wrote it, or the file has it), so pagemap's
//! "not present" says nothing there, and every page is read.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::PAGE_SIZE;

/// What lies behind a region's mapping, which decides whether the kernel
/// can tell a page that never held data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory (`MAP_PRIVATE | MAP_ANONYMOUS`, no file):
    /// a page never populated reads as zero, and pagemap tells which.
    PrivateAnonymous,
    /// Anything else, or a mapping livemig was not told about: every page
    /// may hold data and is read.
    Other,
}

/// Pagemap bit 63: the page is mapped.
const PRESENT: u64 = 1 << 63;
/// Pagemap bit 62: the page is in swap (or under migration).
const SWAPPED: u64 = 1 << 62;
/// Pagemap entries read per `pread`: 8 KiB, 4 MiB of guest pages.
const ENTRIES_PER_READ: usize = 1024;

/// This process's `/proc/self/pagemap`.
#[derive(Debug)]
pub(super) struct Pagemap(File);

impl Pagemap {
    /// Opens the pagemap; `None` where there is none (no procfs), in which
    /// case every page is read.
    pub(super) fn open() -> Option<Pagemap> {
        File::open("/proc/self/pagemap").ok().map(Pagemap)
    }

    /// Sets bit `i` of `mask` (bit `i % 64` of word `i / 64`) for each page
    /// `i` of the `pages` pages mapped from host address `addr` that is
    /// present or swapped, and clears it for the others; bits from `pages`
    /// on are left alone. `mask` must hold at least `pages` bits.
    pub(super) fn populated(&self, addr: u64, pages: u64, mask: &mut [u64]) -> io::Result<()> {
        let mut bytes = [0u8; ENTRIES_PER_READ * 8];
        let mut done = 0u64;
        while done < pages {
            let n = (pages - done).min(ENTRIES_PER_READ as u64) as usize;
            let offset = (addr / PAGE_SIZE as u64 + done) * 8;
            self.0.read_exact_at(&mut bytes[..n * 8], offset)?;
            for (i, entry) in bytes[..n * 8].chunks_exact(8).enumerate() {
                let mut e = [0u8; 8];
                e.copy_from_slice(entry);
                let held = u64::from_ne_bytes(e) & (PRESENT | SWAPPED) != 0;
                let page = done + i as u64;
                let word = mask
                    .get_mut((page / 64) as usize)
                    .ok_or(io::ErrorKind::InvalidInput)?;
                let bit = 1u64 << (page % 64);
                if held {
                    *word |= bit;
                } else {
                    *word &= !bit;
                }
            }
            done += n as u64;
        }
        Ok(())
    }
}
