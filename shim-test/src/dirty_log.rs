//! A simulated KVM dirty log, with manual-protect semantics.
//!
//! KVM tracks guest writes per memslot in a bitmap: bit `i` of 64-bit word
//! `w` is page `64 * w + i` of the slot. This module reproduces what a VMM
//! sees through the two ioctls, so the engines' bookkeeping can be tested
//! against the same rules the real shim obeys:
//!
//! * **Manual protect** (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, used by
//!   livemig-kvm). `KVM_GET_DIRTY_LOG` ([`SimDirtyLog::get`]) only *copies*
//!   the bitmap; nothing is cleared and no page is write-protected, so it is
//!   cheap (microseconds for 4 GiB). The VMM later calls
//!   `KVM_CLEAR_DIRTY_LOG` ([`SimDirtyLog::clear`]) on a range of pages with
//!   a mask: only pages whose mask bit is set are cleared (and re-protected,
//!   so the next guest write sets the bit again). Clearing just before a
//!   page is sent, in chunks, is what lets QEMU (and livemig's clear map)
//!   spread the ~31 ns/page re-protection cost over the iteration and avoid
//!   losing writes: a write after the clear but before the send re-dirties
//!   the page, a write before the clear is in the data sent.
//!   The range rules are KVM's: `first_page` must be a multiple of 64, and
//!   `count` a multiple of 64 unless the range ends exactly at the end of
//!   the slot; the range must lie inside the slot. Word 0 of the mask covers
//!   pages `first_page..first_page + 64`.
//! * **Initially set** (`KVM_DIRTY_LOG_INITIALLY_SET`, on this machine's
//!   KVM). When logging is enabled every page starts dirty (and writable),
//!   so the first round sends all of memory without KVM having to
//!   write-protect everything up front. [`SimDirtyLog::new`] starts this way;
//!   [`SimDirtyLog::new_initially_clear`] models KVM without that flag.
//! * **Legacy** (no manual protect). `KVM_GET_DIRTY_LOG` copies the bitmap
//!   and clears it atomically, re-protecting every dirty page in one go
//!   (8 ms for an all-dirty 1 GiB slot here):
//!   [`SimDirtyLog::legacy_get_and_clear`].
//!
//! A guest write is [`SimDirtyLog::mark`]; the simulated
//! [`Workload`](crate::workload::Workload) calls it for every store. Bits
//! past the end of a slot are never set, as in KVM. Counters let a test
//! check how many ioctls an engine would have issued.

use std::fmt;

use crate::memory::BlockSpec;

/// Why a dirty-log operation was refused (the kernel would return `EINVAL`
/// or `EFAULT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirtyLogError {
    /// A block index past the end of the slot list.
    UnknownBlock {
        /// The rejected block index.
        block: usize,
        /// Number of blocks.
        blocks: usize,
    },
    /// A page index past the end of its block.
    PageOutOfRange {
        /// The block index.
        block: usize,
        /// The rejected page.
        page: u64,
        /// Number of pages in the block.
        pages: u64,
    },
    /// A caller buffer (output bitmap or clear mask) with fewer words than
    /// the operation needs.
    BufferTooShort {
        /// Words needed.
        needed: usize,
        /// Words given.
        given: usize,
    },
    /// `first_page` of a clear is not a multiple of 64.
    UnalignedFirstPage {
        /// The rejected first page.
        first_page: u64,
    },
    /// `count` of a clear is not a multiple of 64 and the range does not end
    /// at the end of the block.
    UnalignedCount {
        /// The rejected count.
        count: u64,
    },
    /// The cleared range extends past the end of the block.
    RangeOutOfBlock {
        /// First page of the range.
        first_page: u64,
        /// Number of pages in the range.
        count: u64,
        /// Number of pages in the block.
        pages: u64,
    },
}

impl fmt::Display for DirtyLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyLogError::UnknownBlock { block, blocks } => {
                write!(
                    f,
                    "dirty log: block index {block} out of range (have {blocks} blocks)"
                )
            }
            DirtyLogError::PageOutOfRange { block, page, pages } => {
                write!(
                    f,
                    "dirty log: page {page} out of range for block {block} of {pages} pages"
                )
            }
            DirtyLogError::BufferTooShort { needed, given } => {
                write!(f, "dirty log: buffer of {given} words, {needed} needed")
            }
            DirtyLogError::UnalignedFirstPage { first_page } => {
                write!(
                    f,
                    "dirty log clear: first_page {first_page} is not a multiple of 64"
                )
            }
            DirtyLogError::UnalignedCount { count } => write!(
                f,
                "dirty log clear: count {count} is not a multiple of 64 and does not reach the \
                 end of the block"
            ),
            DirtyLogError::RangeOutOfBlock {
                first_page,
                count,
                pages,
            } => write!(
                f,
                "dirty log clear: pages {first_page}+{count} extend past the block's {pages} pages"
            ),
        }
    }
}

impl std::error::Error for DirtyLogError {}

/// One slot's bitmap.
#[derive(Clone, Debug)]
struct SlotLog {
    pages: u64,
    words: Vec<u64>,
}

/// Number of 64-bit words covering `pages` pages.
fn words_for(pages: u64) -> usize {
    // Block page counts come from a `SimRam`-style layout whose slot vector
    // fits in memory, so the word count fits in usize.
    pages.div_ceil(64) as usize
}

/// Per-block dirty bitmaps with KVM's manual-protect (and legacy) rules.
#[derive(Clone, Debug)]
pub struct SimDirtyLog {
    slots: Vec<SlotLog>,
    get_calls: u64,
    clear_calls: u64,
    cleared_pages: u64,
}

impl SimDirtyLog {
    /// A dirty log for the given block layout with every page dirty, as KVM
    /// with `KVM_DIRTY_LOG_INITIALLY_SET` starts.
    pub fn new(blocks: &[BlockSpec]) -> Self {
        let mut log = Self::new_initially_clear(blocks);
        for s in &mut log.slots {
            s.words.fill(u64::MAX);
            let tail = s.pages % 64;
            if let (Some(last), true) = (s.words.last_mut(), tail != 0) {
                *last = (1u64 << tail) - 1;
            }
        }
        log
    }

    /// A dirty log with no page dirty, as KVM starts without
    /// `KVM_DIRTY_LOG_INITIALLY_SET` (the VMM must then send all memory in
    /// its first round on its own).
    pub fn new_initially_clear(blocks: &[BlockSpec]) -> Self {
        SimDirtyLog {
            slots: blocks
                .iter()
                .map(|b| SlotLog {
                    pages: b.pages,
                    words: vec![0; words_for(b.pages)],
                })
                .collect(),
            get_calls: 0,
            clear_calls: 0,
            cleared_pages: 0,
        }
    }

    fn slot(&self, block: usize) -> Result<&SlotLog, DirtyLogError> {
        self.slots.get(block).ok_or(DirtyLogError::UnknownBlock {
            block,
            blocks: self.slots.len(),
        })
    }

    fn slot_mut(&mut self, block: usize) -> Result<&mut SlotLog, DirtyLogError> {
        let blocks = self.slots.len();
        self.slots
            .get_mut(block)
            .ok_or(DirtyLogError::UnknownBlock { block, blocks })
    }

    /// Number of `u64` words a bitmap of `block` takes: the minimum length
    /// of the buffer given to [`SimDirtyLog::get`].
    pub fn bitmap_words(&self, block: usize) -> Result<usize, DirtyLogError> {
        Ok(self.slot(block)?.words.len())
    }

    /// Records a guest write to `page` of `block` (sets its bit).
    pub fn mark(&mut self, block: usize, page: u64) -> Result<(), DirtyLogError> {
        let s = self.slot_mut(block)?;
        if page >= s.pages {
            return Err(DirtyLogError::PageOutOfRange {
                block,
                page,
                pages: s.pages,
            });
        }
        s.words[(page / 64) as usize] |= 1 << (page % 64);
        Ok(())
    }

    /// Whether `page` of `block` is currently dirty (a test's view; a VMM
    /// only sees the log through [`SimDirtyLog::get`]).
    pub fn is_dirty(&self, block: usize, page: u64) -> Result<bool, DirtyLogError> {
        let s = self.slot(block)?;
        if page >= s.pages {
            return Err(DirtyLogError::PageOutOfRange {
                block,
                page,
                pages: s.pages,
            });
        }
        Ok(s.words[(page / 64) as usize] & (1 << (page % 64)) != 0)
    }

    /// Number of dirty pages in `block`.
    pub fn dirty_pages(&self, block: usize) -> Result<u64, DirtyLogError> {
        Ok(self
            .slot(block)?
            .words
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum())
    }

    /// Number of dirty pages over all blocks.
    pub fn total_dirty_pages(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|s| &s.words)
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// `KVM_GET_DIRTY_LOG` in manual-protect mode: copies the bitmap of
    /// `block` into the first [`bitmap_words`](Self::bitmap_words) words of
    /// `out` and clears nothing. Words of `out` past that are left alone.
    pub fn get(&mut self, block: usize, out: &mut [u64]) -> Result<(), DirtyLogError> {
        let s = self.slot(block)?;
        out_prefix(out, s.words.len())?.copy_from_slice(&s.words);
        self.get_calls += 1;
        Ok(())
    }

    /// `KVM_CLEAR_DIRTY_LOG`: clears, within pages `first_page..first_page +
    /// count` of `block`, the bits that are set in `mask` (mask word 0 bit
    /// `i` = page `first_page + i`). Returns how many pages went from dirty
    /// to clean.
    ///
    /// Enforces KVM's rules: `first_page % 64 == 0`; `count % 64 == 0`
    /// unless `first_page + count` is the end of the block; the range inside
    /// the block; `mask` at least `ceil(count / 64)` words.
    pub fn clear(
        &mut self,
        block: usize,
        first_page: u64,
        count: u64,
        mask: &[u64],
    ) -> Result<u64, DirtyLogError> {
        let s = self.slot_mut(block)?;
        if !first_page.is_multiple_of(64) {
            return Err(DirtyLogError::UnalignedFirstPage { first_page });
        }
        if first_page > s.pages || count > s.pages - first_page {
            return Err(DirtyLogError::RangeOutOfBlock {
                first_page,
                count,
                pages: s.pages,
            });
        }
        if !count.is_multiple_of(64) && first_page + count != s.pages {
            return Err(DirtyLogError::UnalignedCount { count });
        }
        let n = words_for(count);
        let mask = mask.get(..n).ok_or(DirtyLogError::BufferTooShort {
            needed: n,
            given: mask.len(),
        })?;
        let first_word = (first_page / 64) as usize;
        let mut cleared = 0;
        // Only the last word can be partial; its bits past the end of the
        // block are never set, so no extra masking is needed.
        for (w, &m) in s.words[first_word..first_word + n].iter_mut().zip(mask) {
            let hit = *w & m;
            *w &= !m;
            cleared += u64::from(hit.count_ones());
        }
        self.clear_calls += 1;
        self.cleared_pages += cleared;
        Ok(cleared)
    }

    /// Legacy `KVM_GET_DIRTY_LOG` (no manual protect): copies the bitmap of
    /// `block` into `out` and clears it in the same call. Returns how many
    /// pages were dirty. Counts as a get call, and its pages as cleared.
    pub fn legacy_get_and_clear(
        &mut self,
        block: usize,
        out: &mut [u64],
    ) -> Result<u64, DirtyLogError> {
        let s = self.slot_mut(block)?;
        let dst = out_prefix(out, s.words.len())?;
        let mut dirty = 0;
        for (d, w) in dst.iter_mut().zip(&mut s.words) {
            dirty += u64::from(w.count_ones());
            *d = std::mem::take(w);
        }
        self.get_calls += 1;
        self.cleared_pages += dirty;
        Ok(dirty)
    }

    /// Number of successful get calls (manual or legacy) so far.
    pub fn get_calls(&self) -> u64 {
        self.get_calls
    }

    /// Number of successful [`clear`](Self::clear) calls so far: each is
    /// one `KVM_CLEAR_DIRTY_LOG` ioctl a real VMM would pay for.
    pub fn clear_calls(&self) -> u64 {
        self.clear_calls
    }

    /// Number of pages taken from dirty to clean (and hence re-protected)
    /// by clears and legacy gets so far.
    pub fn cleared_pages(&self) -> u64 {
        self.cleared_pages
    }
}

/// The first `needed` words of a caller's bitmap buffer, or the error
/// saying it is too short (as KVM would fault on a short user buffer).
fn out_prefix(out: &mut [u64], needed: usize) -> Result<&mut [u64], DirtyLogError> {
    let given = out.len();
    out.get_mut(..needed)
        .ok_or(DirtyLogError::BufferTooShort { needed, given })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(pages: u64) -> SimDirtyLog {
        SimDirtyLog::new(&[
            BlockSpec::new("ram", pages, 4096),
            BlockSpec::new("rom", 64, 4096),
        ])
    }

    #[test]
    fn initially_all_set_within_the_block() {
        let mut l = log(130);
        assert_eq!(l.bitmap_words(0).unwrap(), 3);
        let mut out = [0u64; 4];
        l.get(0, &mut out).unwrap();
        assert_eq!(
            out,
            [u64::MAX, u64::MAX, 0b11, 0],
            "bits past the end stay clear"
        );
        assert_eq!(l.dirty_pages(0).unwrap(), 130);
        assert_eq!(l.total_dirty_pages(), 194);
        let l = SimDirtyLog::new_initially_clear(&[BlockSpec::new("ram", 130, 4096)]);
        assert_eq!(l.total_dirty_pages(), 0);
    }

    #[test]
    fn get_does_not_clear() {
        let mut l = log(128);
        let mut out = [0u64; 2];
        l.get(0, &mut out).unwrap();
        l.get(0, &mut out).unwrap();
        assert_eq!(out, [u64::MAX; 2]);
        assert_eq!(l.get_calls(), 2);
        assert_eq!(l.cleared_pages(), 0);
    }

    #[test]
    fn clear_only_masked_bits_then_mark_redirties() {
        let mut l = log(256);
        assert_eq!(l.clear(0, 64, 128, &[0b1010, 1 << 63]).unwrap(), 3);
        assert!(!l.is_dirty(0, 65).unwrap());
        assert!(l.is_dirty(0, 64).unwrap());
        assert!(!l.is_dirty(0, 67).unwrap());
        assert!(!l.is_dirty(0, 191).unwrap());
        // Clearing already-clean pages clears nothing but is still an ioctl.
        assert_eq!(l.clear(0, 64, 64, &[0b10]).unwrap(), 0);
        assert_eq!((l.clear_calls(), l.cleared_pages()), (2, 3));
        l.mark(0, 65).unwrap();
        assert!(l.is_dirty(0, 65).unwrap());
        assert_eq!(l.dirty_pages(0).unwrap(), 254);
    }

    #[test]
    fn clear_enforces_kvm_range_rules() {
        let mut l = log(130);
        assert_eq!(
            l.clear(0, 1, 64, &[1]),
            Err(DirtyLogError::UnalignedFirstPage { first_page: 1 })
        );
        assert_eq!(
            l.clear(0, 0, 65, &[1, 1]),
            Err(DirtyLogError::UnalignedCount { count: 65 })
        );
        assert_eq!(
            l.clear(0, 128, 64, &[1]),
            Err(DirtyLogError::RangeOutOfBlock {
                first_page: 128,
                count: 64,
                pages: 130
            })
        );
        assert_eq!(
            l.clear(0, 192, 0, &[]),
            Err(DirtyLogError::RangeOutOfBlock {
                first_page: 192,
                count: 0,
                pages: 130
            })
        );
        assert_eq!(
            l.clear(0, 0, 128, &[1]),
            Err(DirtyLogError::BufferTooShort {
                needed: 2,
                given: 1
            })
        );
        assert_eq!(
            l.clear(3, 0, 64, &[1]),
            Err(DirtyLogError::UnknownBlock {
                block: 3,
                blocks: 2
            })
        );
        assert_eq!(l.clear_calls(), 0, "refused clears are not counted");
        // An unaligned count is fine when the range ends at the block end.
        assert_eq!(l.clear(0, 128, 2, &[u64::MAX]).unwrap(), 2);
        assert_eq!(l.clear(0, 0, 130, &[u64::MAX; 3]).unwrap(), 128);
        assert_eq!(l.clear(0, 0, 0, &[]).unwrap(), 0);
        assert_eq!(l.total_dirty_pages(), 64);
        assert!(
            l.clear(0, 1, 64, &[1])
                .unwrap_err()
                .to_string()
                .contains("clear")
        );
    }

    #[test]
    fn get_rejects_short_buffers_and_bad_addresses() {
        let mut l = log(130);
        let mut out = [0u64; 2];
        assert_eq!(
            l.get(0, &mut out),
            Err(DirtyLogError::BufferTooShort {
                needed: 3,
                given: 2
            })
        );
        assert!(l.legacy_get_and_clear(0, &mut out).is_err());
        assert!(l.get(2, &mut out).is_err());
        assert_eq!(
            l.mark(1, 64),
            Err(DirtyLogError::PageOutOfRange {
                block: 1,
                page: 64,
                pages: 64
            })
        );
        assert!(l.is_dirty(1, 64).is_err());
        assert!(l.dirty_pages(7).is_err());
        assert_eq!(l.get_calls(), 0);
        assert_eq!(l.total_dirty_pages(), 194, "failed calls change nothing");
    }

    #[test]
    fn legacy_get_and_clear_clears_everything_it_reports() {
        let mut l = log(100);
        let mut out = [0u64; 2];
        assert_eq!(l.legacy_get_and_clear(0, &mut out).unwrap(), 100);
        assert_eq!(out, [u64::MAX, (1 << 36) - 1]);
        assert_eq!(l.dirty_pages(0).unwrap(), 0);
        l.mark(0, 99).unwrap();
        assert_eq!(l.legacy_get_and_clear(0, &mut out).unwrap(), 1);
        assert_eq!(out, [0, 1 << 35]);
        assert_eq!(
            (l.get_calls(), l.cleared_pages(), l.clear_calls()),
            (2, 101, 0)
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const PAGES: u64 = 300;

        proptest! {
            /// Any sequence of marks and valid clears keeps the bitmap equal
            /// to a per-page boolean model, and clear reports exactly the
            /// pages it turned clean.
            #[test]
            fn matches_a_boolean_model(
                ops in proptest::collection::vec(
                    (any::<bool>(), 0..PAGES, 0..6u64, proptest::collection::vec(any::<u64>(), 5)),
                    0..100,
                ),
            ) {
                let mut log = SimDirtyLog::new(&[BlockSpec::new("m", PAGES, 4096)]);
                let mut model = vec![true; PAGES as usize];
                for (is_mark, page, words, mask) in ops {
                    if is_mark {
                        log.mark(0, page).unwrap();
                        model[page as usize] = true;
                        continue;
                    }
                    let first = page / 64 * 64;
                    let count = (words * 64).min(PAGES - first);
                    let mut expect = 0;
                    for p in first..first + count {
                        let i = (p - first) as usize;
                        if mask[i / 64] & (1 << (i % 64)) != 0 && model[p as usize] {
                            model[p as usize] = false;
                            expect += 1;
                        }
                    }
                    prop_assert_eq!(log.clear(0, first, count, &mask).unwrap(), expect);
                }
                let mut out = vec![0u64; 5];
                log.get(0, &mut out).unwrap();
                for (p, &dirty) in model.iter().enumerate() {
                    prop_assert_eq!(out[p / 64] & (1 << (p % 64)) != 0, dirty, "page {}", p);
                }
                prop_assert_eq!(out[4] >> (PAGES % 64), 0, "no bit past the end");
            }
        }
    }
}
