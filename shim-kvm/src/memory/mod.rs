//! Guest memory as the VMM owns it, lent to livemig as raw views.
//!
//! A VMM maps its guest's RAM itself (vm-memory's `GuestMemoryMmap`, or
//! its own `mmap`s) and registers each mapping as a KVM memslot. livemig
//! works over those mappings without owning them:
//!
//! - [`GuestRegion`]: one region of guest RAM (name, guest-physical
//!   address, host address, length, memslot). One region is one RAM block
//!   of the stream (block id = region name) and one KVM memslot.
//! - [`GuestMemory`]: the checked, ordered set of a guest's regions, cheap
//!   to clone and shared across threads, optionally keeping the VMM's owner
//!   of the mappings alive; reads, writes, zero-page checks, which pages
//!   were ever populated ([`GuestMemory::populated`], asked of the kernel
//!   without touching them), the integrity [digest](GuestMemory::digest)
//!   and host ranges for `writev` and `UFFDIO_COPY`.
//! - [`GuestMemory::anonymous`]: anonymous mappings livemig creates itself,
//!   for a VMM (or a test) that has none yet.
//! - `GuestMemory::from_vm_memory` (cargo feature `vm-memory`, on by
//!   default): the regions of a vm-memory `GuestMemoryMmap`.
//! - [`SharedDirtyBitmap`] and `VmMemoryDirtyLog`: the two
//!   [`DeviceDirtyLog`](crate::vmm::DeviceDirtyLog)s, for pages the VMM's
//!   devices write (KVM's dirty log never sees them).
//! - [`PageIovecs`]: guest pages gathered into iovecs for one vectored send.
//!
//! Guest memory is written by vCPUs and devices at any moment, so this
//! module never forms `&[u8]` or `&mut [u8]` over it (that would be a data
//! race the compiler is allowed to miscompile). Every access goes through
//! raw pointers: copies with `ptr::copy_nonoverlapping`, zero checks with
//! `memcmp`; iovecs are built as raw `iovec`s.

mod anonymous;
mod digest;
mod error;
mod gather;
mod guest_memory;
mod populated;
mod region;
mod shared_dirty;
#[cfg(feature = "vm-memory")]
mod vm_memory;

pub use anonymous::RegionLayout;
pub use digest::{page_digest, slice_page_term};
pub use error::MemoryError;
pub use gather::PageIovecs;
pub use guest_memory::GuestMemory;
pub use populated::Backing;
pub use region::GuestRegion;
pub use shared_dirty::SharedDirtyBitmap;
#[cfg(feature = "vm-memory")]
pub use vm_memory::VmMemoryDirtyLog;

/// Size of a guest page (x86 base pages); dirty logs track this granularity.
pub const PAGE_SIZE: usize = 4096;

/// Default region (= memslot) size for RAM livemig maps itself: 1 GiB
/// keeps a slot's dirty bitmap at 32 KiB and first-touch faults cheap.
pub const DEFAULT_SLOT_BYTES: u64 = 1 << 30;
