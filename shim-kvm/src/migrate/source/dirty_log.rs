//! The source's view of guest RAM: zero-page checks and populated pages
//! for the engine, and
//! the dirty log of every RAM block (one per guest-memory region, so block
//! `b` is memslot region `b`), with the pages the VMM's devices wrote
//! merged in.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use livemig_core::clear_map::Chunk;
use livemig_core::source::PageReader;

use super::failure::SourceFailure;
use crate::dirty_log::{DirtyLogMode, DirtyLogging};
use crate::memory::GuestMemory;
use crate::vmm::DeviceDirtyLog;

/// Guest memory as the engine reads it: block = region, with
/// volatile-safe reads (sound while the guest runs).
pub(super) struct KvmPages<'r> {
    pub(super) ram: &'r GuestMemory,
}

impl PageReader for KvmPages<'_> {
    fn is_zero_page(&self, block: u16, page: u64) -> bool {
        self.ram
            .is_zero_page(usize::from(block), page)
            .unwrap_or(false)
    }

    fn populated(&self, block: u16, first: u64, mask: &mut [u64]) {
        // An error leaves every bit set: every page is read, as without
        // the query.
        let _ = self.ram.populated(usize::from(block), first, mask);
    }
}

/// Each region's log: KVM's bits as fetched (the mask of the following
/// clears) and the log the engine sees (those bits with the device's).
struct RegionLog {
    fetched: Vec<u64>,
    merged: Vec<u64>,
}

/// Dirty logging on the VMM's memslots for the life of the migration
/// (turned off when this is dropped, whatever the outcome).
pub(super) struct DirtyLog {
    logging: DirtyLogging<Arc<VmFd>>,
    device: Option<Box<dyn DeviceDirtyLog>>,
    regions: Vec<RegionLog>,
    legacy: bool,
    first: bool,
}

impl DirtyLog {
    /// Turns logging on for every region of `ram` on `vm`.
    pub(super) fn start(
        vm: Arc<VmFd>,
        ram: &GuestMemory,
        wanted: DirtyLogMode,
        device: Option<Box<dyn DeviceDirtyLog>>,
    ) -> Result<DirtyLog, crate::dirty_log::DirtyLogError> {
        let logging = DirtyLogging::start(vm, ram.clone(), wanted)?;
        let regions = ram
            .regions()
            .iter()
            .map(|r| RegionLog {
                fetched: vec![0; r.bitmap_words()],
                merged: vec![0; r.bitmap_words()],
            })
            .collect();
        Ok(DirtyLog {
            legacy: logging.mode() == DirtyLogMode::Legacy,
            logging,
            device,
            regions,
            first: true,
        })
    }

    /// The mode KVM's log is read in.
    pub(super) fn mode(&self) -> DirtyLogMode {
        self.logging.mode()
    }

    /// `KVM_CLEAR_DIRTY_LOG` calls so far.
    pub(super) fn clear_calls(&self) -> u64 {
        self.logging.clear_calls()
    }

    /// Fetches every region's log and merges the device's pages into it;
    /// `feed` gets each region's merged log.
    pub(super) fn sync(
        &mut self,
        mut feed: impl FnMut(u16, &[u64]) -> Result<(), SourceFailure>,
    ) -> Result<(), SourceFailure> {
        let pages: Vec<u64> = self
            .logging
            .memory()
            .regions()
            .iter()
            .map(|r| r.pages())
            .collect();
        for (index, (log, &pages)) in self.regions.iter_mut().zip(&pages).enumerate() {
            self.logging
                .get(index, &mut log.fetched)
                .map_err(SourceFailure::DirtyLogFetch)?;
            if self.legacy && self.first {
                // Legacy logs start clean; the engine expects initially-set
                // bits (for the region's pages only, not the tail word).
                log.fetched.fill(u64::MAX);
                if let (Some(last), tail @ 1..) = (log.fetched.last_mut(), pages % 64) {
                    *last = (1u64 << tail) - 1;
                }
            }
            log.merged.copy_from_slice(&log.fetched);
            if let Some(device) = self.device.as_mut() {
                // Only adds pages to send: the clear mask stays KVM's own.
                device.take_dirty(index, &mut log.merged).map_err(|error| {
                    SourceFailure::DeviceDirtyLog {
                        region: index,
                        error,
                    }
                })?;
            }
            let block = u16::try_from(index).map_err(|_| SourceFailure::TooManyRegions(index))?;
            feed(block, &log.merged)?;
        }
        self.first = false;
        Ok(())
    }

    /// Clears `chunk` of block `block` with KVM's fetched bits as the mask.
    /// In legacy mode the fetch already re-protected everything.
    pub(super) fn clear(&self, block: u16, chunk: Chunk) -> Result<(), SourceFailure> {
        if self.legacy {
            return Ok(());
        }
        let region = usize::from(block);
        let mask = self
            .regions
            .get(region)
            .and_then(|r| r.fetched.get((chunk.first / 64) as usize..))
            .ok_or(SourceFailure::DirtyLogClear(
                crate::dirty_log::DirtyLogError::NoSuchRegion(region),
            ))?;
        self.logging
            .clear(region, chunk.first, chunk.count, mask)
            .map_err(SourceFailure::DirtyLogClear)
    }

    /// Turns logging off again, saying if that failed.
    pub(super) fn stop(self) -> Result<(), crate::dirty_log::DirtyLogError> {
        self.logging.stop()
    }
}
