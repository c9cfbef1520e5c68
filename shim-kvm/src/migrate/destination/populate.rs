//! Received pages' memory populated just before the pages are written
//! ([`ReceiveOptions::populate`](super::ReceiveOptions::populate)).
//!
//! Every page a destination receives lands in fresh anonymous RAM, whose
//! first write is a page fault; under nested KVM its entry and exit are a
//! good part of its 2.2-3.9 us (`livemig bench --case first-touch`,
//! three runs).
//! `MADV_POPULATE_WRITE` over a run of pages that are about to be written
//! allocates them in one call, without the faults (1.5-2.4 us a page in
//! the same runs). A helper thread populating ahead of the writer did
//! better only on a quiet machine (1.4 against 1.5 us by memcpy) and
//! worse under load (3.2 against 2.0): not done, not yet.
//! Only pages that arrived are populated, at the moment they are written,
//! so a page never sent stays untouched: an idle 4 GiB guest costs what
//! its populated pages cost, not 4 GiB. Only a page's first copy is: a
//! page this migration wrote before is populated already, and asking
//! again costs the kernel a walk of it for nothing (0.3 us a page in a
//! run, 0.6 alone, measured here in a loop of `madvise` and `memcpy`).
//! The engine hands runs of consecutive pages to one `place_pages`, so
//! one call populates a run: one call a page cost 1.6 us a page against
//! 1.2 for runs of 16. Huge pages are not asked for: on
//! this nested host a fresh 2 MiB page cost 4-6 times as much per 4 KiB as
//! a 4 KiB one (the table in `docs/benchmarks.md`).
//!
//! A kernel that refuses (before 5.14, or a mapping it cannot populate)
//! turns population off for the rest of the migration: the writes then
//! fault their pages in as without it, and the report says why.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// Whether to populate, and what it did, shared by the migration thread
/// and the multifd receivers.
#[derive(Debug)]
pub(super) struct Populate {
    on: AtomicBool,
    /// Pages passed to `MADV_POPULATE_WRITE` (some may have been present).
    pages: AtomicU64,
    /// The errno of the refusal that turned population off (0: none).
    refused: AtomicI32,
}

impl Populate {
    pub(super) fn new(on: bool) -> Populate {
        Populate {
            on: AtomicBool::new(on),
            pages: AtomicU64::new(0),
            refused: AtomicI32::new(0),
        }
    }

    /// Populates `pages` guest pages from `gpa`, about to be written.
    /// Never fails the migration: a refusal turns population off.
    pub(super) fn run(&self, memory: &GuestMemory, gpa: u64, pages: u64) {
        if pages == 0 || !self.on.load(Ordering::Relaxed) {
            return;
        }
        match memory.populate_write(gpa, pages * PAGE) {
            Ok(()) => {
                self.pages.fetch_add(pages, Ordering::Relaxed);
            }
            Err(e) => {
                self.on.store(false, Ordering::Relaxed);
                let errno = match e {
                    MemoryError::Populate(errno) => errno,
                    _ => libc::EINVAL,
                };
                self.refused.store(errno, Ordering::Relaxed);
            }
        }
    }

    /// Populates guest pages `gfns` (in the order they will be written),
    /// one call per run of consecutive pages.
    pub(super) fn pages(&self, memory: &GuestMemory, gfns: impl IntoIterator<Item = u64>) {
        let mut run: Option<(u64, u64)> = None;
        for gfn in gfns {
            run = match run {
                Some((first, n)) if first + n == gfn => Some((first, n + 1)),
                other => {
                    if let Some((first, n)) = other {
                        self.run(memory, first * PAGE, n);
                    }
                    Some((gfn, 1))
                }
            };
        }
        if let Some((first, n)) = run {
            self.run(memory, first * PAGE, n);
        }
    }

    /// No more population: guest RAM is about to be registered with
    /// userfaultfd, where a populate would raise the missing-page faults
    /// the fault thread answers.
    pub(super) fn stop(&self) {
        self.on.store(false, Ordering::Relaxed);
    }

    /// Pages populated so far.
    pub(super) fn populated_pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }

    /// The errno that turned population off, if one did.
    pub(super) fn refused(&self) -> Option<i32> {
        match self.refused.load(Ordering::Relaxed) {
            0 => None,
            e => Some(e),
        }
    }
}
