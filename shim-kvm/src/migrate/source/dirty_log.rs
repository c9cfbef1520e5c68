//! The source's view of guest RAM: zero-page checks for the engine, and
//! the dirty log of the one RAM block across its memslots.

use livemig_core::clear_map::Chunk;
use livemig_core::source::PageReader;

use super::super::SlotMap;
use crate::dirty_log::{DirtyLogError, DirtyLogMode};
use crate::memory::GuestMemory;
use crate::vm::Vm;

/// Guest memory as the engine reads it: zero-page checks through the slot
/// map, with volatile-safe reads (sound while the guest runs).
pub(super) struct KvmPages<'r> {
    pub(super) ram: &'r GuestMemory,
    pub(super) map: &'r SlotMap,
}

impl PageReader for KvmPages<'_> {
    fn is_zero_page(&self, _block: u16, page: u64) -> bool {
        self.map
            .locate(page)
            .and_then(|(slot, p)| self.ram.is_zero_page(slot, p).ok())
            .unwrap_or(false)
    }
}

/// The dirty log of the one RAM block, fetched slot by slot into one
/// bitmap that is kept as the mask of the following clears.
pub(super) struct DirtyLog<'v> {
    vm: &'v Vm,
    map: SlotMap,
    fetched: Vec<u64>,
    legacy: bool,
    first: bool,
}

impl<'v> DirtyLog<'v> {
    pub(super) fn new(vm: &'v Vm) -> Self {
        let map = SlotMap::new(vm.ram());
        let pages: u64 = map.slots().iter().map(|s| s.2).sum();
        DirtyLog {
            vm,
            map,
            fetched: vec![0; pages.div_ceil(64) as usize],
            legacy: vm.dirty_log_mode() == DirtyLogMode::Legacy,
            first: true,
        }
    }

    /// Where each block page lives among the memslots.
    pub(super) fn map(&self) -> &SlotMap {
        &self.map
    }

    /// Fetches every slot's log into `fetched`.
    pub(super) fn fetch(&mut self) -> Result<&[u64], DirtyLogError> {
        for &(slot, first, pages) in self.map.slots() {
            let from = (first / 64) as usize;
            let to = from + pages.div_ceil(64) as usize;
            let words = self
                .fetched
                .get_mut(from..to)
                .ok_or(DirtyLogError::NoSuchRegion(slot))?;
            self.vm.get_dirty_log(slot, words)?;
        }
        if self.legacy && self.first {
            // Legacy logs start clean; the engine expects initially-set bits
            // (for the block's pages only, not the tail of the last word).
            self.fetched.fill(u64::MAX);
            let pages: u64 = self.map.slots().iter().map(|s| s.2).sum();
            if let (Some(last), tail @ 1..) = (self.fetched.last_mut(), pages % 64) {
                *last = (1u64 << tail) - 1;
            }
        }
        self.first = false;
        Ok(&self.fetched)
    }

    /// Clears `chunk` with the fetched bits as the mask (split per slot).
    /// In legacy mode the fetch already re-protected everything.
    pub(super) fn clear(&self, chunk: Chunk) -> Result<(), DirtyLogError> {
        if self.legacy {
            return Ok(());
        }
        for (slot, first, count, block_page) in self.map.split(chunk.first, chunk.count) {
            let mask = self
                .fetched
                .get((block_page / 64) as usize..)
                .ok_or(DirtyLogError::NoSuchRegion(slot))?;
            self.vm.clear_dirty_log(slot, first, count, mask)?;
        }
        Ok(())
    }
}
