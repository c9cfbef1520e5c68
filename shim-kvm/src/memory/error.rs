//! Why a guest-memory operation or a memory layout was refused.

use std::fmt;

use livemig_core::wire::IdError;

use super::PAGE_SIZE;

/// Why a guest-memory operation or a memory layout was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryError {
    /// A region's name is not a valid RAM block id (1 to 255 bytes).
    BadName {
        /// The refused name.
        name: String,
        /// What is wrong with it.
        reason: IdError,
    },
    /// A region's guest-physical address, host address or length is not a
    /// multiple of the page size.
    Unaligned {
        /// The region.
        region: String,
        /// Which of its values: "guest-physical address", "host address"
        /// or "length".
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// A region has no pages.
    EmptyRegion(String),
    /// A region's guest-physical or host range wraps around the address space.
    AddressOverflow(String),
    /// Two regions cover the same guest-physical addresses.
    Overlap {
        /// The region that starts first.
        first: String,
        /// The region that starts inside it.
        second: String,
    },
    /// Two regions have the same name (one name is one RAM block).
    DuplicateName(String),
    /// Two regions are the same KVM memslot.
    DuplicateSlot {
        /// The memslot.
        slot: u32,
        /// One region using it.
        first: String,
        /// The other.
        second: String,
    },
    /// The memslot numbers of a vm-memory adapter run past `u32::MAX`.
    SlotOverflow {
        /// First memslot asked for.
        first_slot: u32,
        /// Regions to number.
        regions: usize,
    },
    /// A guest memory without any region.
    NoRegions,
    /// The requested anonymous RAM size is zero or not a multiple of the page size.
    BadSize(u64),
    /// The requested region size is zero or not a multiple of the page size.
    BadSlotSize(u64),
    /// `mmap` failed with this errno while mapping anonymous RAM.
    Mmap(i32),
    /// Reading `/proc/self/pagemap` (which pages are populated) failed
    /// with this errno.
    Pagemap(i32),
    /// `MADV_POPULATE_WRITE` over guest RAM failed with this errno
    /// (`EINVAL`: a kernel before 5.14, or a mapping it cannot populate).
    Populate(i32),
    /// The region index does not exist.
    NoSuchRegion(usize),
    /// The page index is beyond the end of the region.
    PageOutOfRange {
        /// Region index.
        region: usize,
        /// Requested page.
        page: u64,
        /// Pages in the region.
        pages: u64,
    },
    /// A caller's dirty bitmap has fewer words than the region needs.
    BitmapTooSmall {
        /// Words needed.
        needed: usize,
        /// Words given.
        given: usize,
    },
    /// A vm-memory region's dirty bitmap does not track pages of
    /// [`PAGE_SIZE`] bytes.
    BitmapPageSize {
        /// Region index.
        region: usize,
    },
    /// A vm-memory region is not mapped readable and writable.
    NotWritable(String),
    /// The guest-physical range is not (entirely) guest RAM.
    RangeOutOfRam {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
    },
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryError::BadName { name, reason } => {
                write!(f, "guest memory region name {name:?}: {reason}")
            }
            MemoryError::Unaligned {
                region,
                what,
                value,
            } => write!(
                f,
                "guest memory region {region:?}: {what} {value:#x} is not a multiple of {PAGE_SIZE}"
            ),
            MemoryError::EmptyRegion(r) => write!(f, "guest memory region {r:?} is empty"),
            MemoryError::AddressOverflow(r) => {
                write!(
                    f,
                    "guest memory region {r:?} wraps around the address space"
                )
            }
            MemoryError::Overlap { first, second } => write!(
                f,
                "guest memory regions {first:?} and {second:?} overlap in guest-physical space"
            ),
            MemoryError::DuplicateName(r) => {
                write!(f, "two guest memory regions are named {r:?}")
            }
            MemoryError::DuplicateSlot {
                slot,
                first,
                second,
            } => write!(
                f,
                "guest memory regions {first:?} and {second:?} are both KVM memslot {slot}"
            ),
            MemoryError::SlotOverflow {
                first_slot,
                regions,
            } => write!(
                f,
                "{regions} regions numbered from memslot {first_slot} run past memslot {}",
                u32::MAX
            ),
            MemoryError::NoRegions => f.write_str("guest memory has no region"),
            MemoryError::BadSize(s) => {
                write!(
                    f,
                    "guest RAM size {s} is zero or not a multiple of {PAGE_SIZE}"
                )
            }
            MemoryError::BadSlotSize(s) => {
                write!(
                    f,
                    "memslot size {s} is zero or not a multiple of {PAGE_SIZE}"
                )
            }
            MemoryError::Mmap(e) => write!(f, "mmap of guest RAM failed: errno {e}"),
            MemoryError::Pagemap(e) => write!(f, "reading /proc/self/pagemap failed: errno {e}"),
            MemoryError::Populate(e) => {
                write!(
                    f,
                    "populating guest RAM (MADV_POPULATE_WRITE) failed: errno {e}"
                )
            }
            MemoryError::NoSuchRegion(r) => write!(f, "guest memory region {r} does not exist"),
            MemoryError::PageOutOfRange {
                region,
                page,
                pages,
            } => {
                write!(f, "page {page} is outside region {region} ({pages} pages)")
            }
            MemoryError::BitmapTooSmall { needed, given } => {
                write!(
                    f,
                    "dirty bitmap has {given} words, the region needs {needed}"
                )
            }
            MemoryError::BitmapPageSize { region } => write!(
                f,
                "the dirty bitmap of region {region} does not track {PAGE_SIZE}-byte pages"
            ),
            MemoryError::NotWritable(r) => {
                write!(f, "guest memory region {r:?} is not mapped read-write")
            }
            MemoryError::RangeOutOfRam { gpa, len } => {
                write!(f, "guest-physical range {gpa:#x}+{len:#x} is not guest RAM")
            }
        }
    }
}

impl std::error::Error for MemoryError {}
