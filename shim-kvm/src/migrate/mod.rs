//! A live migration of a KVM guest: the glue between the sans-IO engines of
//! `livemig-core` and this crate's VM, vCPU, dirty log and transport.
//!
//! - [`source`]: drives a [`livemig_core::source::SourceEngine`] on the
//!   migration thread, with the return path read on a second thread.
//! - [`destination`]: feeds the incoming stream to a
//!   [`livemig_core::destination::DestinationEngine`] that places pages in
//!   guest RAM and loads the vCPU state, then starts the guest.
//!
//! # RAM layout
//!
//! The demo VM's RAM is one block, [`RAM_BLOCK_ID`], covering guest-physical
//! `0 .. size`, so a RAM size mismatch is reported by the destination in
//! bytes. Its guest memory is regions of [`crate::memory::DEFAULT_SLOT_BYTES`]
//! (one KVM memslot each), contiguous from 0; [`SlotMap`] translates block
//! pages to (region, page) and splits any dirty-log clear that crosses a
//! region boundary. One block per region, for a VMM's memory with holes, is
//! not there yet.

pub mod destination;
pub mod source;

use std::fmt;

use livemig_core::wire::{BlockId, BlockInfo, EncodeError};

use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};

/// The id of the one RAM block (QEMU's name for a PC's main RAM).
pub const RAM_BLOCK_ID: &str = "pc.ram";
/// The id of the vCPU's device-state record.
pub const CPU_DEVICE_ID: &str = "cpu0";
/// Version of the vCPU state record (the blob of [`crate::x86::VcpuState`]).
pub const CPU_STATE_VERSION: u32 = 1;

/// The one-block layout both ends announce and compare.
pub fn ram_layout(ram: &GuestMemory) -> Result<BlockInfo<'static>, EncodeError> {
    // RAM_BLOCK_ID is short and non-empty: BlockId::new cannot refuse it.
    let id = BlockId::new(RAM_BLOCK_ID).map_err(EncodeError::Id)?;
    BlockInfo::new(id, ram.size(), PAGE_SIZE as u32)
}

/// Where each page of the RAM block lives among the guest memory's regions.
#[derive(Debug, Clone)]
pub struct SlotMap {
    /// (region index, first block page, pages) in guest-physical order.
    slots: Vec<(usize, u64, u64)>,
}

impl SlotMap {
    /// The map of `ram`'s regions.
    pub fn new(ram: &GuestMemory) -> SlotMap {
        let page = PAGE_SIZE as u64;
        SlotMap {
            slots: ram
                .regions()
                .iter()
                .enumerate()
                .map(|(i, r)| (i, r.guest_phys() / page, r.pages()))
                .collect(),
        }
    }

    /// The region holding block page `page`, and the page's index in it.
    pub fn locate(&self, page: u64) -> Option<(usize, u64)> {
        self.slots
            .iter()
            .find(|&&(_, first, pages)| page >= first && page - first < pages)
            .map(|&(slot, first, _)| (slot, page - first))
    }

    /// Each region with its first block page and page count.
    pub fn slots(&self) -> &[(usize, u64, u64)] {
        &self.slots
    }

    /// The parts of block pages `first .. first + count` in each region:
    /// (region, first page in the region, pages, first block page).
    pub fn split(
        &self,
        first: u64,
        count: u64,
    ) -> impl Iterator<Item = (usize, u64, u64, u64)> + '_ {
        let end = first.saturating_add(count);
        self.slots.iter().filter_map(move |&(slot, start, pages)| {
            let lo = first.max(start);
            let hi = end.min(start + pages);
            (lo < hi).then(|| (slot, lo - start, hi - lo, lo))
        })
    }
}

/// Runs of set bits (first page, count) among the first `pages` bits of
/// `words`: the pages a guest wrote, compactly (a working set is one run).
pub fn written_ranges(words: &[u64], pages: u64) -> Vec<(u64, u64)> {
    let bit = |p: u64| {
        words
            .get((p / 64) as usize)
            .is_some_and(|w| w >> (p % 64) & 1 == 1)
    };
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut p = 0;
    while p < pages {
        if words.get((p / 64) as usize) == Some(&0) {
            p = (p / 64 + 1) * 64;
            continue;
        }
        if bit(p) {
            match ranges.last_mut() {
                Some((first, count)) if *first + *count == p => *count += 1,
                _ => ranges.push((p, 1)),
            }
        }
        p += 1;
    }
    ranges
}

/// The [`GuestMemory::digest`] of every page *not* in `written` (sorted,
/// disjoint runs of guest pages, as [`written_ranges`] gives): how both ends
/// of a postcopy compare memory the destination guest has not changed.
/// Runs reaching past the RAM are an error.
pub fn digest_outside(ram: &GuestMemory, written: &[(u64, u64)]) -> Result<u64, MemoryError> {
    let pages = ram.size() / PAGE_SIZE as u64;
    if let Some(&(first, count)) = written
        .iter()
        .find(|&&(first, count)| first.checked_add(count).is_none_or(|end| end > pages))
    {
        return Err(MemoryError::RangeOutOfRam {
            gpa: first.saturating_mul(PAGE_SIZE as u64),
            len: count.saturating_mul(PAGE_SIZE as u64),
        });
    }
    let mut runs = written.iter().peekable();
    ram.digest_of((0..pages).filter(move |&p| {
        while runs
            .peek()
            .is_some_and(|&&(first, count)| first + count <= p)
        {
            runs.next();
        }
        runs.peek().is_none_or(|&&(first, _)| first > p)
    }))
}

/// Why a migration could not be set up or carried on (as opposed to a
/// migration that ran and failed, which is a reported status).
#[derive(Debug)]
pub enum MigrateError {
    /// The connection could not be made or duplicated.
    Transport(crate::transport::TransportError),
    /// The engine refused its configuration or was driven wrongly.
    Engine(String),
    /// A KVM operation on the vCPU failed.
    Vcpu(crate::vcpu::VcpuError),
    /// The RAM layout could not be described.
    Layout(EncodeError),
}

impl fmt::Display for MigrateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrateError::Transport(e) => e.fmt(f),
            MigrateError::Engine(e) => write!(f, "migration engine: {e}"),
            MigrateError::Vcpu(e) => write!(f, "vCPU: {e}"),
            MigrateError::Layout(e) => write!(f, "RAM layout: {e}"),
        }
    }
}

impl std::error::Error for MigrateError {}

impl From<crate::transport::TransportError> for MigrateError {
    fn from(e: crate::transport::TransportError) -> Self {
        MigrateError::Transport(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionLayout;

    #[test]
    fn clears_are_split_at_slot_boundaries() {
        let map = SlotMap {
            slots: vec![(0, 0, 1 << 18), (1, 1 << 18, 1 << 17)],
        };
        assert_eq!(map.locate(5), Some((0, 5)));
        assert_eq!(map.locate((1 << 18) + 7), Some((1, 7)));
        assert_eq!(map.locate((1 << 18) + (1 << 17)), None);
        let parts: Vec<_> = map.split((1 << 18) - 64, 128).collect();
        assert_eq!(
            parts,
            vec![(0, (1 << 18) - 64, 64, (1 << 18) - 64), (1, 0, 64, 1 << 18)]
        );
        assert_eq!(map.split(0, 1 << 20).count(), 2);
        assert_eq!(map.split(1 << 20, 64).count(), 0);
    }

    #[test]
    fn written_pages_become_runs() {
        let mut words = vec![0u64; 4];
        for p in [0, 1, 2, 63, 64, 65, 130, 200] {
            words[p / 64] |= 1 << (p % 64);
        }
        assert_eq!(
            written_ranges(&words, 256),
            vec![(0, 3), (63, 3), (130, 1), (200, 1)]
        );
        // Bits past the page count are not pages.
        assert_eq!(written_ranges(&words, 131), vec![(0, 3), (63, 3), (130, 1)]);
        assert!(written_ranges(&[0; 4], 256).is_empty());
    }

    #[test]
    fn digest_outside_skips_exactly_the_written_runs() {
        let ram = GuestMemory::anonymous(
            &RegionLayout::contiguous("ram", 64 * PAGE_SIZE as u64, 1 << 30).unwrap(),
        )
        .unwrap();
        for p in 0..64u64 {
            ram.write(p * PAGE_SIZE as u64, &[p as u8 + 1; 16]).unwrap();
        }
        let all = ram.digest();
        assert_eq!(digest_outside(&ram, &[]).unwrap(), all);
        let skip = [(3, 2), (10, 1), (63, 1)];
        let want = ram
            .digest_of((0..64).filter(|p| ![3, 4, 10, 63].contains(p)))
            .unwrap();
        assert_eq!(digest_outside(&ram, &skip).unwrap(), want);
        assert_ne!(want, all);
        assert!(digest_outside(&ram, &[(60, 5)]).is_err());
    }
}
