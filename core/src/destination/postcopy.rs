//! The destination's postcopy bookkeeping for one block: which pages have
//! arrived, and which have been requested and not yet answered, so that a
//! page is never requested twice however many vCPUs fault on it.

use crate::bitmap::{BitmapError, DirtyBitmap, words_for};
use crate::wire::PageRange;

/// Received and requested pages of one RAM block, over caller storage.
pub struct PostcopyTracking<'a> {
    received: DirtyBitmap<'a>,
    requested: DirtyBitmap<'a>,
}

impl<'a> PostcopyTracking<'a> {
    /// Words each of the two bitmaps needs for a block of `pages` pages.
    pub const fn words(pages: u64) -> usize {
        words_for(pages)
    }

    /// Tracking for a block of `pages` pages, nothing received yet.
    pub fn new(
        received: &'a mut [u64],
        requested: &'a mut [u64],
        pages: u64,
    ) -> Result<Self, BitmapError> {
        let mut received = DirtyBitmap::new(received, pages)?;
        let mut requested = DirtyBitmap::new(requested, pages)?;
        received.clear_all();
        requested.clear_all();
        Ok(PostcopyTracking {
            received,
            requested,
        })
    }

    /// Pages in the block.
    pub fn pages(&self) -> u64 {
        self.received.bits()
    }

    /// True once `page` has arrived (and not been discarded since).
    pub fn is_received(&self, page: u64) -> bool {
        self.received.test(page)
    }

    /// Pages that have arrived.
    pub fn received_count(&self) -> u64 {
        self.received.count()
    }

    /// The first requested page at or after `from`.
    pub(crate) fn next_requested(&self, from: u64) -> Option<u64> {
        self.requested.find_next_set(from)
    }

    /// Word `index` of the received-pages bitmap (KVM's layout: bit `i`
    /// is page `64 * index + i`), zero past the end.
    pub(crate) fn received_word(&self, index: usize) -> u64 {
        self.received.words().get(index).copied().unwrap_or(0)
    }

    /// Marks `page` requested; false when it needs no request (already
    /// here, or already asked for).
    pub(crate) fn request(&mut self, page: u64) -> bool {
        if self.received.test(page) || self.requested.test(page) {
            return false;
        }
        self.requested.set(page).is_ok()
    }

    /// Marks `range` as arrived; returns how many of its pages had been
    /// requested (those requests are now answered).
    pub(crate) fn received(&mut self, range: PageRange) -> u64 {
        let _ = self.received.set_range(range.first, range.count);
        let answered = self.requested.count_range(range.first, range.count);
        if answered > 0 {
            let _ = self.requested.clear_range(range.first, range.count);
        }
        answered
    }

    /// Marks `range` as dropped: stale data the guest must fault on.
    pub(crate) fn discarded(&mut self, range: PageRange) {
        let _ = self.received.clear_range(range.first, range.count);
    }
}
