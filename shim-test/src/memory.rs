//! Sparse simulated guest RAM.
//!
//! A simulated guest may be 4 GiB while a test touches a few megabytes of it,
//! and the whole migration must run in milliseconds. [`SimRam`] therefore
//! stores only pages that have been written, in a two-level page table per
//! block: a vector of optional leaves, each leaf 512 optional page buffers.
//! An idle 4 GiB block is 2048 empty leaf pointers (16 KiB), an absent page
//! reads as the shared static zero page, and "is this page zero" is one or
//! two pointer checks for absent pages. Direct indexing keeps a scan of an
//! idle 4 GiB guest (1 Mi `is_zero` calls) cheap, where a hash map would
//! hash every lookup, and digests and diffs skip empty leaves whole.
//!
//! Blocks are addressed by their position in [`SimRam::blocks`] (the order
//! the RAM block list is sent in), which is what the engines carry on the
//! wire; [`SimRam::find_block`] maps a block id to that position.

use std::fmt;

/// Largest page size a block may use: 2 MiB, a huge page. It bounds the
/// static zero page returned for absent pages.
pub const MAX_PAGE_SIZE: usize = 2 << 20;

/// Smallest page size a block may use. The workload stamps 32 bytes into a
/// page, and no real host uses pages this small anyway.
pub const MIN_PAGE_SIZE: usize = 64;

/// What every absent page reads as. Lives in `.bss`: costs no memory until a
/// page of it is actually read.
static ZERO_PAGE: [u8; MAX_PAGE_SIZE] = [0; MAX_PAGE_SIZE];

/// The shape of one RAM block (one KVM memslot, one QEMU RAMBlock).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockSpec {
    /// The block's name, as sent in the RAM block list (e.g. `"pc.ram"`).
    pub id: String,
    /// Number of pages in the block.
    pub pages: u64,
    /// Page size in bytes: a power of two in
    /// [`MIN_PAGE_SIZE`]..=[`MAX_PAGE_SIZE`]; 4096 is typical.
    pub page_size: usize,
}

impl BlockSpec {
    /// A block named `id` of `pages` pages of `page_size` bytes.
    pub fn new(id: impl Into<String>, pages: u64, page_size: usize) -> Self {
        BlockSpec {
            id: id.into(),
            pages,
            page_size,
        }
    }

    /// Size of the block in bytes (saturating; [`SimRam::new`] rejects
    /// blocks whose size overflows).
    pub fn bytes(&self) -> u64 {
        self.pages.saturating_mul(self.page_size as u64)
    }
}

/// Why a [`SimRam`] operation was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryError {
    /// A block spec had an empty id; ids name blocks on the wire.
    EmptyBlockId,
    /// Two block specs had the same id.
    DuplicateBlockId {
        /// The repeated id.
        id: String,
    },
    /// A block's page size is not a power of two in the supported range.
    BadPageSize {
        /// The block's id.
        id: String,
        /// The rejected page size.
        page_size: usize,
    },
    /// A block has zero pages, or so many that its size or its page table
    /// cannot be represented on this host.
    BadPageCount {
        /// The block's id.
        id: String,
        /// The rejected page count.
        pages: u64,
    },
    /// A block index past the end of the block list.
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
        /// The rejected page index.
        page: u64,
        /// Number of pages in the block.
        pages: u64,
    },
    /// A write whose byte range does not fit inside one page.
    WriteOutsidePage {
        /// Offset of the write inside the page.
        offset: usize,
        /// Length of the write.
        len: usize,
        /// The page size.
        page_size: usize,
    },
    /// A whole-page write whose data is not exactly one page long.
    WrongPageLength {
        /// Length of the data given.
        len: usize,
        /// The page size.
        page_size: usize,
    },
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryError::EmptyBlockId => write!(f, "RAM block id is empty"),
            MemoryError::DuplicateBlockId { id } => write!(f, "RAM block id {id:?} appears twice"),
            MemoryError::BadPageSize { id, page_size } => write!(
                f,
                "RAM block {id:?}: page size {page_size} is not a power of two in \
                 {MIN_PAGE_SIZE}..={MAX_PAGE_SIZE}"
            ),
            MemoryError::BadPageCount { id, pages } => {
                write!(
                    f,
                    "RAM block {id:?}: page count {pages} is zero or too large"
                )
            }
            MemoryError::UnknownBlock { block, blocks } => {
                write!(
                    f,
                    "RAM block index {block} out of range (have {blocks} blocks)"
                )
            }
            MemoryError::PageOutOfRange { block, page, pages } => {
                write!(
                    f,
                    "page {page} out of range for RAM block {block} of {pages} pages"
                )
            }
            MemoryError::WriteOutsidePage {
                offset,
                len,
                page_size,
            } => write!(
                f,
                "write of {len} bytes at offset {offset} does not fit in a {page_size}-byte page"
            ),
            MemoryError::WrongPageLength { len, page_size } => {
                write!(f, "page data is {len} bytes, page size is {page_size}")
            }
        }
    }
}

impl std::error::Error for MemoryError {}

/// Where two memories first differ, for test failure messages.
///
/// When the block layouts differ, `block` names the first block that is
/// missing or differently sized on one side and `page` is the first page
/// index that exists on only one side (0 for a missing block).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirstDifference {
    /// Id of the block holding the first difference.
    pub block: String,
    /// Index of the first differing page within that block.
    pub page: u64,
}

impl fmt::Display for FirstDifference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "memories first differ at block {:?} page {}",
            self.block, self.page
        )
    }
}

/// A page's storage: `None` while the page is all zero.
type Slot = Option<Box<[u8]>>;

/// Pages per leaf of a block's page table: 512 slots (8 KiB) cover 2 MiB of
/// 4 KiB pages, so an idle 4 GiB block needs only 2048 empty leaf pointers.
const LEAF_PAGES: usize = 512;

/// One block: its spec and a two-level page table. A leaf is allocated on
/// the first write of a nonzero page in its range; an absent leaf means all
/// its pages are zero.
#[derive(Clone, Debug)]
struct Block {
    spec: BlockSpec,
    leaves: Vec<Option<Box<[Slot]>>>,
}

impl Block {
    /// The slot of page `i` (already bounds-checked), `None` if its leaf
    /// was never allocated.
    fn slot(&self, i: usize) -> Option<&Slot> {
        self.leaves[i / LEAF_PAGES]
            .as_ref()
            .map(|l| &l[i % LEAF_PAGES])
    }

    /// The slot of page `i` (already bounds-checked), allocating its leaf.
    fn slot_mut(&mut self, i: usize) -> &mut Slot {
        let leaf = self.leaves[i / LEAF_PAGES]
            .get_or_insert_with(|| std::iter::repeat_with(|| None).take(LEAF_PAGES).collect());
        &mut leaf[i % LEAF_PAGES]
    }

    /// The slot of page `i` if its leaf exists, without allocating.
    fn existing_slot_mut(&mut self, i: usize) -> Option<&mut Slot> {
        self.leaves[i / LEAF_PAGES]
            .as_mut()
            .map(|l| &mut l[i % LEAF_PAGES])
    }

    /// Every present page buffer with its page index, in page order.
    fn present(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.leaves.iter().enumerate().flat_map(|(li, leaf)| {
            leaf.iter().flat_map(move |l| {
                l.iter().enumerate().filter_map(move |(o, s)| {
                    s.as_deref().map(|p| ((li * LEAF_PAGES + o) as u64, p))
                })
            })
        })
    }

    /// Page `i` reads as zero (already bounds-checked).
    fn is_zero(&self, i: usize) -> bool {
        self.slot(i)
            .and_then(|s| s.as_deref())
            .is_none_or(is_all_zero)
    }
}

/// Sparse guest RAM: named blocks of pages, untouched pages cost nothing.
///
/// Used as the source guest's memory (written by a
/// [`Workload`](crate::workload::Workload), read by the source engine) and as
/// the destination's (written by the destination engine), then compared with
/// [`SimRam::digest`] / [`SimRam::diff`].
#[derive(Clone, Debug)]
pub struct SimRam {
    blocks: Vec<Block>,
    specs: Vec<BlockSpec>,
}

impl SimRam {
    /// Builds an all-zero memory with the given block layout.
    ///
    /// Rejects empty or duplicate ids, page sizes that are not a power of
    /// two in [`MIN_PAGE_SIZE`]..=[`MAX_PAGE_SIZE`], and page counts that
    /// are zero or whose byte size overflows `u64`.
    pub fn new(specs: Vec<BlockSpec>) -> Result<Self, MemoryError> {
        let mut blocks = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            if spec.id.is_empty() {
                return Err(MemoryError::EmptyBlockId);
            }
            if specs[..i].iter().any(|s| s.id == spec.id) {
                return Err(MemoryError::DuplicateBlockId {
                    id: spec.id.clone(),
                });
            }
            if !spec.page_size.is_power_of_two()
                || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&spec.page_size)
            {
                return Err(MemoryError::BadPageSize {
                    id: spec.id.clone(),
                    page_size: spec.page_size,
                });
            }
            let bad_count = || MemoryError::BadPageCount {
                id: spec.id.clone(),
                pages: spec.pages,
            };
            if spec.pages == 0 || spec.pages.checked_mul(spec.page_size as u64).is_none() {
                return Err(bad_count());
            }
            let leaves =
                usize::try_from(spec.pages.div_ceil(LEAF_PAGES as u64)).map_err(|_| bad_count())?;
            let mut v = Vec::new();
            v.try_reserve_exact(leaves).map_err(|_| bad_count())?;
            v.resize(leaves, None);
            blocks.push(Block {
                spec: spec.clone(),
                leaves: v,
            });
        }
        Ok(SimRam { blocks, specs })
    }

    /// The block layout, in the order given to [`SimRam::new`]; a block's
    /// position here is its index in every other method.
    pub fn blocks(&self) -> &[BlockSpec] {
        &self.specs
    }

    /// The index of the block named `id`, if there is one.
    pub fn find_block(&self, id: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.id == id)
    }

    /// Total number of pages over all blocks.
    pub fn total_pages(&self) -> u64 {
        self.specs.iter().map(|s| s.pages).sum()
    }

    /// Number of pages that currently hold a buffer (written at least once
    /// and not dropped back to zero): the simulation's real memory use.
    pub fn present_pages(&self) -> u64 {
        self.blocks.iter().map(|b| b.present().count() as u64).sum()
    }

    fn block(&self, block: usize) -> Result<&Block, MemoryError> {
        self.blocks.get(block).ok_or(MemoryError::UnknownBlock {
            block,
            blocks: self.blocks.len(),
        })
    }

    /// The block and the page's index in it, bounds-checked.
    fn locate(&self, block: usize, page: u64) -> Result<(&Block, usize), MemoryError> {
        let b = self.block(block)?;
        if page >= b.spec.pages {
            return Err(MemoryError::PageOutOfRange {
                block,
                page,
                pages: b.spec.pages,
            });
        }
        // pages <= leaves * LEAF_PAGES, which fits usize (checked in new()).
        Ok((b, page as usize))
    }

    fn locate_mut(&mut self, block: usize, page: u64) -> Result<(&mut Block, usize), MemoryError> {
        self.locate(block, page)?;
        Ok((&mut self.blocks[block], page as usize))
    }

    /// The contents of page `page` of block `block`: its buffer, or the
    /// shared zero page if it was never written.
    pub fn page(&self, block: usize, page: u64) -> Result<&[u8], MemoryError> {
        let (b, i) = self.locate(block, page)?;
        Ok(b.slot(i)
            .and_then(|s| s.as_deref())
            .unwrap_or(&ZERO_PAGE[..b.spec.page_size]))
    }

    /// Whether the page reads as all zero. Constant time for pages never
    /// written; a `memcmp` against the zero page for present ones.
    pub fn is_zero(&self, block: usize, page: u64) -> Result<bool, MemoryError> {
        let (b, i) = self.locate(block, page)?;
        Ok(b.is_zero(i))
    }

    /// Which pages from `first` hold a buffer, one bit each in `mask`
    /// (bit `i` of word `w` is page `first + 64 * w + i`): a page never
    /// written, or dropped back to zero, is clear, as an untouched page of
    /// anonymous memory is to the kernel. Pages past the block's end, and
    /// every page of a block that does not exist, are clear.
    pub fn populated(&self, block: usize, first: u64, mask: &mut [u64]) {
        mask.fill(0);
        let Ok(b) = self.block(block) else {
            return;
        };
        for (w, word) in mask.iter_mut().enumerate() {
            for bit in 0..64 {
                let page = first.saturating_add(w as u64 * 64 + bit);
                if page < b.spec.pages && b.slot(page as usize).is_some_and(Option::is_some) {
                    *word |= 1 << bit;
                }
            }
        }
    }

    /// Writes `bytes` at `offset` inside one page, as a guest store would.
    /// The write must fit inside the page; an absent page is materialised
    /// (zero-filled) first.
    pub fn write(
        &mut self,
        block: usize,
        page: u64,
        offset: usize,
        bytes: &[u8],
    ) -> Result<(), MemoryError> {
        let (b, i) = self.locate_mut(block, page)?;
        let page_size = b.spec.page_size;
        let end = offset
            .checked_add(bytes.len())
            .filter(|&e| e <= page_size)
            .ok_or(MemoryError::WriteOutsidePage {
                offset,
                len: bytes.len(),
                page_size,
            })?;
        if bytes.is_empty() {
            return Ok(());
        }
        let p = b
            .slot_mut(i)
            .get_or_insert_with(|| vec![0u8; page_size].into_boxed_slice());
        p[offset..end].copy_from_slice(bytes);
        Ok(())
    }

    /// Replaces a whole page, as the destination does when it places a
    /// received page. All-zero data drops the page back to absent so the
    /// destination's memory stays as sparse as the source's.
    pub fn write_page(&mut self, block: usize, page: u64, data: &[u8]) -> Result<(), MemoryError> {
        let (b, i) = self.locate_mut(block, page)?;
        let page_size = b.spec.page_size;
        if data.len() != page_size {
            return Err(MemoryError::WrongPageLength {
                len: data.len(),
                page_size,
            });
        }
        if is_all_zero(data) {
            if let Some(slot) = b.existing_slot_mut(i) {
                *slot = None;
            }
            return Ok(());
        }
        match b.slot_mut(i) {
            Some(p) => p.copy_from_slice(data),
            slot @ None => *slot = Some(data.into()),
        }
        Ok(())
    }

    /// Makes a page all zero and frees its buffer (a received zero page, or
    /// a discarded one).
    pub fn zero_page(&mut self, block: usize, page: u64) -> Result<(), MemoryError> {
        let (b, i) = self.locate_mut(block, page)?;
        if let Some(slot) = b.existing_slot_mut(i) {
            *slot = None;
        }
        Ok(())
    }

    /// A deterministic 64-bit digest of all memory contents.
    ///
    /// Only pages with nonzero contents contribute, each with its block id
    /// and page index, so a present-but-zero page hashes like an absent one
    /// and the cost is proportional to the pages written. Equal memories
    /// always give equal digests, in every run and on every host; unequal
    /// ones differ with overwhelming probability (use [`SimRam::diff`] to
    /// locate the difference).
    pub fn digest(&self) -> u64 {
        self.blocks.iter().fold(DIGEST_SEED, Self::digest_block)
    }

    /// The digest of one block alone (same rules as [`SimRam::digest`]).
    pub fn block_digest(&self, block: usize) -> Result<u64, MemoryError> {
        Ok(Self::digest_block(DIGEST_SEED, self.block(block)?))
    }

    /// Chains the nonzero pages of `b` into `h`.
    fn digest_block(mut h: u64, b: &Block) -> u64 {
        let id = hash_bytes(DIGEST_SEED, b.spec.id.as_bytes());
        for (i, p) in b.present() {
            if !is_all_zero(p) {
                h = mix(h ^ id ^ mix(i) ^ hash_bytes(i, p).rotate_left(17));
            }
        }
        h
    }

    /// Where `self` and `other` first differ (block order, then page
    /// order), or `None` if layouts and contents are identical. Skips
    /// ranges where both sides have no leaf, so it costs what was written.
    pub fn diff(&self, other: &SimRam) -> Option<FirstDifference> {
        for (i, a) in self.blocks.iter().enumerate() {
            let Some(b) = other.blocks.get(i).filter(|b| b.spec.id == a.spec.id) else {
                return Some(FirstDifference {
                    block: a.spec.id.clone(),
                    page: 0,
                });
            };
            let common = a.spec.pages.min(b.spec.pages) as usize;
            for (li, (la, lb)) in a.leaves.iter().zip(&b.leaves).enumerate() {
                if la.is_none() && lb.is_none() {
                    continue;
                }
                let start = li * LEAF_PAGES;
                for page in start..(start + LEAF_PAGES).min(common) {
                    let same = match (a.slot(page).and_then(|s| s.as_deref()), b.slot(page)) {
                        (Some(p), Some(Some(q))) => p == &q[..],
                        _ => a.is_zero(page) && b.is_zero(page),
                    };
                    if !same {
                        return Some(FirstDifference {
                            block: a.spec.id.clone(),
                            page: page as u64,
                        });
                    }
                }
            }
            if a.spec != b.spec {
                return Some(FirstDifference {
                    block: a.spec.id.clone(),
                    page: common as u64,
                });
            }
        }
        other
            .blocks
            .get(self.blocks.len())
            .map(|b| FirstDifference {
                block: b.spec.id.clone(),
                page: 0,
            })
    }
}

/// `memcmp` against the static zero page: fast even in debug builds.
fn is_all_zero(p: &[u8]) -> bool {
    p.chunks(MAX_PAGE_SIZE).all(|c| c == &ZERO_PAGE[..c.len()])
}

const DIGEST_SEED: u64 = 0x6c69_7665_6d69_6721; // "livemig!"

/// A 64-bit finaliser (splitmix64's): every input bit affects every output
/// bit, so combining with xor does not cancel structure.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Word-at-a-time hash of a byte string, with four independent lanes so it
/// keeps up with memory bandwidth in release builds. Not cryptographic:
/// it only has to tell test memories apart.
fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut lanes = [
        seed ^ K,
        seed.rotate_left(16),
        seed.rotate_left(32) ^ K,
        !seed,
    ];
    let mut blocks = bytes.chunks_exact(32);
    for blk in &mut blocks {
        for (lane, w) in lanes.iter_mut().zip(blk.chunks_exact(8)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            *lane = (*lane ^ u64::from_le_bytes(word))
                .wrapping_mul(K)
                .rotate_left(29);
        }
    }
    let mut tail = [0u8; 32];
    let rest = blocks.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    let mut h = mix(bytes.len() as u64);
    for (lane, w) in lanes.iter().zip(tail.chunks_exact(8)) {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        h = mix(h ^ *lane ^ u64::from_le_bytes(word).wrapping_mul(K));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(pages: u64) -> SimRam {
        SimRam::new(vec![
            BlockSpec::new("pc.ram", pages, 4096),
            BlockSpec::new("vga", 16, 4096),
        ])
        .unwrap()
    }

    #[test]
    fn absent_pages_read_as_zero() {
        let r = ram(1024);
        assert_eq!(r.page(0, 1023).unwrap(), &[0u8; 4096][..]);
        assert!(r.is_zero(1, 15).unwrap());
        assert_eq!(r.present_pages(), 0);
        assert_eq!(r.total_pages(), 1040);
        assert_eq!(r.find_block("vga"), Some(1));
        assert_eq!(r.find_block("nope"), None);
    }

    #[test]
    fn write_materialises_one_page() {
        let mut r = ram(1024);
        r.write(0, 7, 100, &[1, 2, 3]).unwrap();
        assert_eq!(r.present_pages(), 1);
        assert_eq!(&r.page(0, 7).unwrap()[99..104], &[0, 1, 2, 3, 0]);
        assert!(!r.is_zero(0, 7).unwrap());
        r.write(0, 7, 100, &[0, 0, 0]).unwrap();
        assert!(r.is_zero(0, 7).unwrap(), "present but zero reads as zero");
        r.zero_page(0, 7).unwrap();
        assert_eq!(r.present_pages(), 0);
    }

    #[test]
    fn bad_addresses_are_typed_errors() {
        let mut r = ram(8);
        assert_eq!(
            r.page(2, 0),
            Err(MemoryError::UnknownBlock {
                block: 2,
                blocks: 2
            })
        );
        assert_eq!(
            r.page(0, 8),
            Err(MemoryError::PageOutOfRange {
                block: 0,
                page: 8,
                pages: 8
            })
        );
        assert_eq!(
            r.write(0, 0, 4095, &[1, 2]),
            Err(MemoryError::WriteOutsidePage {
                offset: 4095,
                len: 2,
                page_size: 4096
            })
        );
        assert_eq!(
            r.write(0, 0, usize::MAX, &[1]),
            Err(MemoryError::WriteOutsidePage {
                offset: usize::MAX,
                len: 1,
                page_size: 4096
            })
        );
        assert_eq!(
            r.write_page(0, 0, &[1; 100]),
            Err(MemoryError::WrongPageLength {
                len: 100,
                page_size: 4096
            })
        );
        assert!(r.zero_page(0, u64::MAX).is_err());
        assert!(r.is_zero(5, 0).is_err());
        assert!(r.block_digest(9).is_err());
        assert_eq!(r.present_pages(), 0, "failed writes allocate nothing");
        let e = r.page(0, 8).unwrap_err().to_string();
        assert!(e.contains("page 8") && e.contains("8 pages"), "{e}");
    }

    #[test]
    fn bad_layouts_are_rejected() {
        let e = |specs| SimRam::new(specs).unwrap_err();
        assert_eq!(
            e(vec![BlockSpec::new("", 1, 4096)]),
            MemoryError::EmptyBlockId
        );
        assert!(matches!(
            e(vec![
                BlockSpec::new("a", 1, 4096),
                BlockSpec::new("a", 1, 4096)
            ]),
            MemoryError::DuplicateBlockId { .. }
        ));
        for ps in [0, 3000, 32, MAX_PAGE_SIZE * 2] {
            assert!(matches!(
                e(vec![BlockSpec::new("a", 1, ps)]),
                MemoryError::BadPageSize { .. }
            ));
        }
        for pages in [0, u64::MAX / 2] {
            assert!(matches!(
                e(vec![BlockSpec::new("a", pages, 4096)]),
                MemoryError::BadPageCount { .. }
            ));
        }
    }

    #[test]
    fn write_page_and_zero_data_stay_sparse() {
        let mut r = ram(16);
        let mut data = vec![0u8; 4096];
        r.write_page(0, 3, &data).unwrap();
        assert_eq!(r.present_pages(), 0);
        data[4095] = 9;
        r.write_page(0, 3, &data).unwrap();
        assert_eq!(r.page(0, 3).unwrap(), &data[..]);
        data[4095] = 10;
        r.write_page(0, 3, &data).unwrap();
        assert_eq!(r.page(0, 3).unwrap()[4095], 10);
        r.write_page(0, 3, &[0; 4096]).unwrap();
        assert_eq!(r.present_pages(), 0);
    }

    #[test]
    fn digest_ignores_zero_pages_and_sees_contents_and_position() {
        let mut a = ram(64);
        let b = ram(64);
        let empty = a.digest();
        assert_eq!(empty, b.digest());
        a.write(0, 5, 0, &[0; 8]).unwrap();
        assert_eq!(a.digest(), empty, "present zero page hashes like absent");
        a.write(0, 5, 0, &[1]).unwrap();
        let one = a.digest();
        assert_ne!(one, empty);
        let mut c = ram(64);
        c.write(0, 6, 0, &[1]).unwrap();
        assert_ne!(c.digest(), one, "page index matters");
        let mut d = ram(64);
        d.write(1, 5, 0, &[1]).unwrap();
        assert_ne!(d.digest(), one, "block matters");
        let mut e = ram(64);
        e.write(0, 5, 1, &[1]).unwrap();
        assert_ne!(e.digest(), one, "byte position matters");
        assert_eq!(a.block_digest(1).unwrap(), b.block_digest(1).unwrap());
        assert_ne!(a.block_digest(0).unwrap(), b.block_digest(0).unwrap());
        // Deterministic across runs: a fixed memory has a fixed digest.
        assert_eq!(one, a.clone().digest());
    }

    #[test]
    fn diff_locates_first_difference() {
        let mut a = ram(64);
        let mut b = ram(64);
        assert_eq!(a.diff(&b), None);
        a.write(0, 40, 10, &[1]).unwrap();
        b.write(0, 40, 10, &[1]).unwrap();
        b.write(0, 20, 0, &[0]).unwrap(); // present but zero: not a difference
        assert_eq!(a.diff(&b), None);
        b.write(1, 3, 0, &[7]).unwrap();
        a.write(0, 41, 0, &[7]).unwrap();
        let d = a.diff(&b).unwrap();
        assert_eq!(
            d,
            FirstDifference {
                block: "pc.ram".into(),
                page: 41
            }
        );
        assert!(d.to_string().contains("41"));
        let c = SimRam::new(vec![BlockSpec::new("pc.ram", 64, 4096)]).unwrap();
        assert_eq!(
            c.diff(&ram(64)),
            Some(FirstDifference {
                block: "vga".into(),
                page: 0
            })
        );
        let small = SimRam::new(vec![BlockSpec::new("pc.ram", 32, 4096)]).unwrap();
        assert_eq!(
            small.diff(&c),
            Some(FirstDifference {
                block: "pc.ram".into(),
                page: 32
            })
        );
    }

    #[test]
    fn leaf_edges_and_partial_last_leaf() {
        let mut a = SimRam::new(vec![BlockSpec::new("r", 1000, 4096)]).unwrap();
        let mut b = a.clone();
        for p in [0, 511, 512, 999] {
            a.write(0, p, 0, &p.to_le_bytes()).unwrap();
            b.write(0, p, 8, &[1]).unwrap();
            b.write(0, p, 8, &[0]).unwrap();
            b.write(0, p, 0, &p.to_le_bytes()).unwrap();
        }
        assert_eq!(a.diff(&b), None);
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.present_pages(), 4);
        b.write(0, 512, 4095, &[1]).unwrap();
        assert_eq!(
            a.diff(&b),
            Some(FirstDifference {
                block: "r".into(),
                page: 512
            })
        );
        b.zero_page(0, 512).unwrap();
        assert_eq!(
            b.diff(&a),
            Some(FirstDifference {
                block: "r".into(),
                page: 512
            })
        );
        // Zero data into a never-touched leaf allocates nothing.
        let mut c = SimRam::new(vec![BlockSpec::new("r", 1000, 4096)]).unwrap();
        c.write_page(0, 700, &[0; 4096]).unwrap();
        c.zero_page(0, 900).unwrap();
        assert!(
            c.blocks
                .iter()
                .all(|b| b.leaves.iter().all(Option::is_none))
        );
        assert_eq!(c.page(0, 999).unwrap().len(), 4096);
    }

    #[test]
    fn idle_4gib_guest_is_cheap() {
        let r = SimRam::new(vec![BlockSpec::new("pc.ram", 1 << 20, 4096)]).unwrap();
        let mut zero = 0u64;
        for p in 0..(1u64 << 20) {
            zero += u64::from(r.is_zero(0, p).unwrap());
        }
        assert_eq!(zero, 1 << 20);
        assert_eq!(r.digest(), SimRam::new(vec![]).unwrap().digest());
    }

    #[test]
    fn hash_distinguishes_lengths_and_tails() {
        assert_ne!(hash_bytes(0, &[]), hash_bytes(0, &[0]));
        assert_ne!(hash_bytes(0, &[1; 33]), hash_bytes(0, &[1; 34]));
        let mut x = [0u8; 40];
        let h0 = hash_bytes(1, &x);
        x[39] = 1;
        assert_ne!(h0, hash_bytes(1, &x));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        const PAGES: u64 = 1100; // crosses two leaf edges, partial last leaf
        const PS: usize = 64;

        #[derive(Clone, Debug)]
        enum Op {
            Write {
                page: u64,
                offset: usize,
                bytes: Vec<u8>,
            },
            WritePage {
                page: u64,
                fill: u8,
            },
            Zero {
                page: u64,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (
                    0..PAGES + 2,
                    0..PS + 2,
                    proptest::collection::vec(any::<u8>(), 0..8)
                )
                    .prop_map(|(page, offset, bytes)| Op::Write {
                        page,
                        offset,
                        bytes
                    }),
                (0..PAGES, prop_oneof![Just(0u8), any::<u8>()])
                    .prop_map(|(page, fill)| Op::WritePage { page, fill }),
                (0..PAGES).prop_map(|page| Op::Zero { page }),
            ]
        }

        proptest! {
            /// SimRam behaves like a dense array of pages, and two memories
            /// with equal contents built different ways compare equal.
            #[test]
            fn matches_a_dense_model(ops in proptest::collection::vec(op(), 0..200)) {
                let spec = vec![BlockSpec::new("m", PAGES, PS)];
                let mut ram = SimRam::new(spec.clone()).unwrap();
                let mut model = vec![vec![0u8; PS]; PAGES as usize];
                for op in ops {
                    match op {
                        Op::Write { page, offset, bytes } => {
                            let ok = page < PAGES && offset + bytes.len() <= PS;
                            prop_assert_eq!(ram.write(0, page, offset, &bytes).is_ok(), ok);
                            if ok {
                                model[page as usize][offset..offset + bytes.len()]
                                    .copy_from_slice(&bytes);
                            }
                        }
                        Op::WritePage { page, fill } => {
                            let mut data = vec![fill; PS];
                            data[0] = fill.wrapping_mul(3);
                            ram.write_page(0, page, &data).unwrap();
                            model[page as usize] = data;
                        }
                        Op::Zero { page } => {
                            ram.zero_page(0, page).unwrap();
                            model[page as usize].fill(0);
                        }
                    }
                }
                let mut rebuilt = SimRam::new(spec).unwrap();
                for (p, data) in model.iter().enumerate() {
                    prop_assert_eq!(ram.page(0, p as u64).unwrap(), &data[..]);
                    prop_assert_eq!(ram.is_zero(0, p as u64).unwrap(), data.iter().all(|&b| b == 0));
                    rebuilt.write_page(0, p as u64, data).unwrap();
                }
                prop_assert_eq!(ram.diff(&rebuilt), None);
                prop_assert_eq!(ram.digest(), rebuilt.digest());
            }
        }
    }
}
