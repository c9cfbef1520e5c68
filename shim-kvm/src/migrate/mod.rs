//! A live migration of a KVM guest: the glue between the sans-IO engines of
//! `livemig-core` and the VMM's VM, vCPUs, devices and guest memory.
//!
//! - [`source`]: [`migrate`] drives a [`livemig_core::source::SourceEngine`]
//!   over a [`SourceVm`] on the migration thread, with the return path read
//!   on a second thread.
//! - [`destination`]: [`receive`] feeds the incoming stream to a
//!   [`livemig_core::destination::DestinationEngine`] that places pages in
//!   the [`DestinationVm`]'s memory and loads its vCPUs and devices, then
//!   starts the guest.
//! - [`MigrationHandle`] and [`ReceiveHandle`]: what [`migrate`] and
//!   [`receive`] return at once, while the migration runs on a thread
//!   livemig owns: live statistics, cancel, and the report.
//! - [`MigrateError`]: why a migration could not be set up or carried on.
//! - [`recovery`]: how a postcopy paused by a cut connection gets a new
//!   one ([`Recovery`]); [`MigrationEvent`]s tell the caller as it happens.
//! - [`sections`]: the sections livemig writes itself (CPU model,
//!   runstate, each vCPU, the VM-wide devices).
//!
//! # RAM layout
//!
//! Each region of the VMM's [`GuestMemory`] is one RAM block of the stream:
//! block index = region index, block id = region name, block page `p` =
//! guest page `region.guest_phys() / 4096 + p`. Both ends announce and
//! compare that list, so a destination whose regions differ in number,
//! name or size is refused before any page.

mod cancel;
pub mod destination;
mod error;
mod handle;
pub mod recovery;
pub mod sections;
pub mod source;
mod vcpu_access;

use livemig_core::wire::{BlockId, BlockInfo, EncodeError};

pub use destination::{
    DestinationReport, DestinationVm, ReceiveOptions, receive, receive_with_channels,
};
pub use error::MigrateError;
pub use handle::{CancelRefused, MigrationEvent, MigrationHandle, ReceiveHandle};
pub use recovery::Recovery;
pub use source::{
    SourceOptions, SourceReport, SourceVm, extra_connections, migrate, migrate_with_channels,
};
pub use vcpu_access::VcpuAccess;

use crate::memory::{GuestMemory, PAGE_SIZE};

/// The block list both ends announce and compare: one block per region.
pub fn ram_layout(ram: &GuestMemory) -> Result<Vec<BlockInfo<'_>>, EncodeError> {
    ram.regions()
        .iter()
        .map(|r| {
            let id = BlockId::new(r.name()).map_err(EncodeError::Id)?;
            BlockInfo::new(id, r.len(), PAGE_SIZE as u32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionLayout;

    #[test]
    fn each_region_is_a_block() {
        let ram = GuestMemory::anonymous(
            &RegionLayout::contiguous("ram", 3 * 64 * PAGE_SIZE as u64, 128 * PAGE_SIZE as u64)
                .unwrap(),
        )
        .unwrap();
        let layout = ram_layout(&ram).unwrap();
        assert_eq!(layout.len(), 2);
        for (block, region) in layout.iter().zip(ram.regions()) {
            assert_eq!(block.id.as_str(), region.name());
            assert_eq!(block.length, region.len());
        }
    }
}
