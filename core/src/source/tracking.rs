//! Per-block dirty tracking on the source: which pages still need sending,
//! and which dirty-log chunks still need clearing before they are read.

use crate::bitmap::{DirtyBitmap, words_for};
use crate::clear_map::{ClearMap, ClearMapError, chunk_words};
use crate::wire::BlockInfo;

/// The source's bookkeeping for one RAM block, over storage the caller
/// provides (so the core needs no heap, and a firmware VMM can place it
/// statically).
pub struct BlockTracking<'a> {
    /// Pages that must be sent (set) or are up to date on the destination
    /// (clear). Starts all set: every page is sent at least once.
    pub(crate) dirty: DirtyBitmap<'a>,
    /// Chunks whose dirty log must be cleared before any page of theirs is
    /// read.
    pub(crate) clear: ClearMap<'a>,
    pub(crate) pages: u64,
    pub(crate) page_shift: u8,
}

/// Why a block's tracking could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackingError {
    /// The dirty-bitmap storage holds fewer words than the block needs.
    DirtyStorageTooSmall {
        /// Words required.
        needed: usize,
        /// Words provided.
        got: usize,
    },
    /// The clear map could not be built (bad shift or storage too small).
    ClearMap(ClearMapError),
}

impl core::fmt::Display for TrackingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TrackingError::DirtyStorageTooSmall { needed, got } => write!(
                f,
                "dirty bitmap storage too small: {needed} words needed, {got} given"
            ),
            TrackingError::ClearMap(e) => write!(f, "clear map: {e}"),
        }
    }
}

impl core::error::Error for TrackingError {}

impl<'a> BlockTracking<'a> {
    /// Words of storage the dirty bitmap of `block` needs.
    pub fn dirty_words(block: &BlockInfo<'_>) -> usize {
        words_for(block_pages(block))
    }

    /// Words of storage the clear map of `block` needs with chunks of
    /// `1 << clear_bitmap_shift` pages.
    pub fn clear_words(block: &BlockInfo<'_>, clear_bitmap_shift: u8) -> usize {
        chunk_words(block_pages(block), clear_bitmap_shift)
    }

    /// Tracking for `block`, with every page marked as needing to be sent.
    pub fn new(
        block: &BlockInfo<'_>,
        clear_bitmap_shift: u8,
        dirty_words: &'a mut [u64],
        clear_words: &'a mut [u64],
    ) -> Result<Self, TrackingError> {
        let pages = block_pages(block);
        let got = dirty_words.len();
        let mut dirty = DirtyBitmap::new(dirty_words, pages).map_err(|_| {
            TrackingError::DirtyStorageTooSmall {
                needed: words_for(pages),
                got,
            }
        })?;
        dirty.fill();
        let clear = ClearMap::new(clear_words, pages, clear_bitmap_shift)
            .map_err(TrackingError::ClearMap)?;
        Ok(BlockTracking {
            dirty,
            clear,
            pages,
            page_shift: block.page_size.trailing_zeros() as u8,
        })
    }

    /// Pages in the block.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Pages currently marked as needing to be sent.
    pub fn dirty_pages(&self) -> u64 {
        self.dirty.count()
    }
}

fn block_pages(block: &BlockInfo<'_>) -> u64 {
    block.length / u64::from(block.page_size)
}
