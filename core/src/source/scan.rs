//! The scan over the dirty bitmaps: where the pass is, the batch being
//! assembled, and how many dirty bytes are still to send.

use super::BATCH_PAGES;
use crate::wire::{PageEntry, PageKind};

/// The source's position in its pass over the RAM blocks.
pub(super) struct Scan {
    /// Block the pass is in.
    pub block: usize,
    /// Next page of `block` to look at.
    pub page: u64,
    /// The page batch being assembled.
    pub batch: Batch,
    /// Bytes of guest memory marked dirty and not yet sent.
    pub remaining_bytes: u64,
    /// True once a whole pass has gone by: every page was sent once.
    pub first_pass_done: bool,
    /// At a postcopy switch during the first pass: the (block, page) from
    /// which nothing was ever sent, so nothing needs discarding.
    pub never_sent_from: Option<(usize, u64)>,
}

impl Scan {
    /// A scan at the start of the first pass, with `total` bytes to send.
    pub fn new(total: u64) -> Self {
        Scan {
            block: 0,
            page: 0,
            batch: Batch {
                block: 0,
                entries: [Batch::EMPTY_ENTRY; BATCH_PAGES],
                len: 0,
                normal: [0; BATCH_PAGES],
                normal_len: 0,
            },
            remaining_bytes: total,
            first_pass_done: false,
            never_sent_from: None,
        }
    }

    /// Back to the first page of the first block.
    pub fn rewind(&mut self) {
        self.block = 0;
        self.page = 0;
    }
}

/// The page batch being assembled.
pub(super) struct Batch {
    pub block: usize,
    pub entries: [PageEntry; BATCH_PAGES],
    pub len: usize,
    pub normal: [u64; BATCH_PAGES],
    pub normal_len: usize,
}

impl Batch {
    const EMPTY_ENTRY: PageEntry = PageEntry {
        index: 0,
        kind: PageKind::Zero,
    };

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == BATCH_PAGES
    }

    pub fn clear(&mut self) {
        self.len = 0;
        self.normal_len = 0;
    }

    pub fn push(&mut self, index: u64, zero: bool) {
        let kind = if zero {
            PageKind::Zero
        } else {
            PageKind::Normal
        };
        if let Some(slot) = self.entries.get_mut(self.len) {
            *slot = PageEntry { index, kind };
            self.len += 1;
            if !zero {
                if let Some(n) = self.normal.get_mut(self.normal_len) {
                    *n = index;
                    self.normal_len += 1;
                }
            }
        }
    }
}
