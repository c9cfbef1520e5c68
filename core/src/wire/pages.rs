//! Page batches: the record that carries guest memory.
//!
//! A batch is a small header, a table of 8-byte entries (page index + zero
//! flag) and then the bytes of every non-zero page in entry order. The table
//! comes first so that a sender can emit header and entries from a small
//! buffer and `writev` the pages straight out of guest memory, and a receiver
//! knows where each page's bytes are before touching any of them. A batch
//! with [`BatchFlags::TERMS`] also carries, between the entries and the
//! bytes, the source's digest term of each normal page (see
//! [`crate::digest`]): postcopy's check of each page as it is installed.

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::cursor::{Reader, Writer};
use super::header::{kind, put_record_header};
use super::{DecodeError, EncodeError, MAX_BATCH_PAGES, RECORD_HEADER_LEN};

/// Smallest page shift a batch may use (512-byte pages).
pub const MIN_PAGE_SHIFT: u8 = 9;
/// Largest page shift a batch may use (1 GiB pages).
pub const MAX_PAGE_SHIFT: u8 = 30;
/// Bytes of the batch header inside a Pages body.
pub const BATCH_HEADER_LEN: usize = 8;
/// Bytes of one page entry.
pub const PAGE_ENTRY_LEN: usize = 8;

/// Entry bit marking a page whose contents are all zero (no data follows).
const ENTRY_ZERO: u64 = 1 << 63;
/// Entry bits 56..=62, reserved.
const ENTRY_RESERVED: u64 = 0x7f << 56;
/// Entry bits 0..=55, the page index within the block.
const ENTRY_INDEX: u64 = (1 << 56) - 1;

/// The batch header at the start of a Pages body (packet level).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BatchHeader {
    /// Index of the RAM block in the RamBlocks list.
    pub block: U16,
    /// log2 of the page size.
    pub page_shift: u8,
    /// [`BatchFlags`] bits.
    pub flags: u8,
    /// Number of entries that follow.
    pub count: U32,
}

bitflags::bitflags! {
    /// Flags of a page batch.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct BatchFlags: u8 {
        /// This batch ends an iteration over guest memory (a dirty-sync
        /// point): the destination may account a pass as complete.
        const END_OF_ITERATION = 1;
        /// The entries are followed by one be64 digest term per normal
        /// page, in entry order: the source's
        /// [`DigestKey::page_term`](crate::digest::DigestKey::page_term)
        /// of the bytes that follow, which a verifying postcopy
        /// destination checks before it installs each page.
        const TERMS = 2;
    }
}

/// Whether a page's bytes travel in the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageKind {
    /// The page's bytes follow in the batch data.
    Normal,
    /// The page is all zeros; only the entry is sent.
    Zero,
}

/// One entry of a batch: which page, and whether its bytes follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageEntry {
    /// Page index within the block (in units of the batch's page size), < 2^56.
    pub index: u64,
    /// Normal or zero page.
    pub kind: PageKind,
}

impl PageEntry {
    /// The entry's wire value, or an error if the index does not fit 56 bits.
    pub(crate) fn to_wire(self) -> Result<u64, EncodeError> {
        if self.index & !ENTRY_INDEX != 0 {
            return Err(EncodeError::PageIndexTooLarge { index: self.index });
        }
        Ok(match self.kind {
            PageKind::Normal => self.index,
            PageKind::Zero => self.index | ENTRY_ZERO,
        })
    }

    /// Decodes an entry; reserved bits must be clear.
    pub(crate) fn from_wire(raw: u64) -> Result<Self, DecodeError> {
        if raw & ENTRY_RESERVED != 0 {
            return Err(DecodeError::ReservedFlags {
                what: "page entry",
                value: raw,
            });
        }
        let kind = if raw & ENTRY_ZERO != 0 {
            PageKind::Zero
        } else {
            PageKind::Normal
        };
        Ok(Self {
            index: raw & ENTRY_INDEX,
            kind,
        })
    }
}

/// Where a batch's entries live: validated wire bytes, or the sender's slice.
#[derive(Clone, Copy, Debug)]
enum Entries<'a> {
    Wire(&'a [U64]),
    Slice(&'a [PageEntry]),
}

/// A validated batch of pages of one block (the representation level).
///
/// Built by the decoder (borrowing the received bytes) or by
/// [`PageBatch::new`] (borrowing the sender's entries and data). Either way
/// its entries are valid and its data is exactly `normal × page_size` bytes.
#[derive(Clone, Copy, Debug)]
pub struct PageBatch<'a> {
    block: u16,
    page_shift: u8,
    flags: BatchFlags,
    entries: Entries<'a>,
    terms: Terms<'a>,
    data: &'a [u8],
}

/// Where a batch's page terms live (none without [`BatchFlags::TERMS`]).
#[derive(Clone, Copy, Debug)]
enum Terms<'a> {
    Wire(&'a [U64]),
    Slice(&'a [u64]),
}

/// Checks a page shift for encoding.
fn check_shift(page_shift: u8) -> Result<(), EncodeError> {
    if (MIN_PAGE_SHIFT..=MAX_PAGE_SHIFT).contains(&page_shift) {
        Ok(())
    } else {
        Err(EncodeError::BadPageShift { shift: page_shift })
    }
}

/// Validates entries for encoding and counts the normal ones.
pub(crate) fn check_entries(entries: &[PageEntry]) -> Result<usize, EncodeError> {
    if entries.len() > MAX_BATCH_PAGES {
        return Err(EncodeError::TooManyPages {
            count: entries.len(),
        });
    }
    let mut normal = 0;
    for e in entries {
        e.to_wire()?;
        if e.kind == PageKind::Normal {
            normal += 1;
        }
    }
    Ok(normal)
}

/// Bytes of page data that `normal` pages of `1 << page_shift` bytes take.
pub(crate) fn data_len(normal: usize, page_shift: u8) -> usize {
    // normal <= 1024 and page_shift <= 30, so this stays below 2^41; it
    // saturates on 32-bit targets, where the result is then rejected as too long.
    normal.saturating_mul(
        1usize
            .checked_shl(u32::from(page_shift))
            .unwrap_or(usize::MAX),
    )
}

/// Bytes of one page term.
pub const PAGE_TERM_LEN: usize = 8;

/// Body length of a batch: header + entries + terms (`terms` of them) +
/// normal pages.
fn body_len(count: usize, terms: usize, normal: usize, page_shift: u8) -> usize {
    (BATCH_HEADER_LEN + PAGE_ENTRY_LEN * count + PAGE_TERM_LEN * terms)
        .saturating_add(data_len(normal, page_shift))
}

/// Checks that `terms` terms go with `normal` normal pages under `flags`:
/// one each with [`BatchFlags::TERMS`], none without.
fn check_terms(flags: BatchFlags, normal: usize, terms: usize) -> Result<(), EncodeError> {
    let expected = if flags.contains(BatchFlags::TERMS) {
        normal
    } else {
        0
    };
    if terms != expected {
        return Err(EncodeError::TermCount {
            expected,
            found: terms,
        });
    }
    Ok(())
}

impl PartialEq for PageBatch<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.block == other.block
            && self.page_shift == other.page_shift
            && self.flags == other.flags
            && self.len() == other.len()
            && self.pages().eq(other.pages())
            && self.terms().eq(other.terms())
    }
}

impl Eq for PageBatch<'_> {}

impl<'a> PageBatch<'a> {
    /// A batch to encode: `data` holds the bytes of each normal entry in
    /// entry order and must be exactly `normal × (1 << page_shift)` long.
    pub fn new(
        block: u16,
        page_shift: u8,
        flags: BatchFlags,
        entries: &'a [PageEntry],
        data: &'a [u8],
    ) -> Result<Self, EncodeError> {
        check_shift(page_shift)?;
        let normal = check_entries(entries)?;
        check_terms(flags, normal, 0)?;
        let expected = data_len(normal, page_shift);
        if data.len() != expected {
            return Err(EncodeError::DataLength {
                expected,
                found: data.len(),
            });
        }
        Ok(Self {
            block,
            page_shift,
            flags,
            entries: Entries::Slice(entries),
            terms: Terms::Slice(&[]),
            data,
        })
    }

    /// The same batch carrying `terms`, one per normal page in entry order
    /// ([`BatchFlags::TERMS`] set).
    pub fn with_terms(self, terms: &'a [u64]) -> Result<Self, EncodeError> {
        let flags = self.flags | BatchFlags::TERMS;
        let normal = self.pages().filter(|(_, data)| data.is_some()).count();
        check_terms(flags, normal, terms.len())?;
        Ok(Self {
            flags,
            terms: Terms::Slice(terms),
            ..self
        })
    }

    /// Parses and validates a Pages body.
    pub(crate) fn decode(body: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let h: BatchHeader = r.read("page batch header")?;
        let page_shift = h.page_shift;
        if !(MIN_PAGE_SHIFT..=MAX_PAGE_SHIFT).contains(&page_shift) {
            return Err(DecodeError::BadPageShift { shift: page_shift });
        }
        let flags = BatchFlags::from_bits(h.flags).ok_or(DecodeError::ReservedFlags {
            what: "page batch flags",
            value: u64::from(h.flags),
        })?;
        let count = h.count.get();
        let n = usize::try_from(count).unwrap_or(usize::MAX);
        if n > MAX_BATCH_PAGES {
            return Err(DecodeError::TooManyPages { count });
        }
        let (entries, _) = <[U64]>::ref_from_prefix_with_elems(r.rest(), n).map_err(|_| {
            DecodeError::Truncated {
                what: "page entries",
            }
        })?;
        let mut normal = 0;
        for raw in entries {
            if PageEntry::from_wire(raw.get())?.kind == PageKind::Normal {
                normal += 1;
            }
        }
        let term_count = if flags.contains(BatchFlags::TERMS) {
            normal
        } else {
            0
        };
        let expected = body_len(n, term_count, normal, page_shift);
        if body.len() != expected {
            return Err(DecodeError::BadLength {
                what: "page batch body",
                expected,
                found: body.len(),
            });
        }
        let after_entries = body
            .get(BATCH_HEADER_LEN + PAGE_ENTRY_LEN * n..)
            .unwrap_or_default();
        let (terms, data) = <[U64]>::ref_from_prefix_with_elems(after_entries, term_count)
            .map_err(|_| DecodeError::Truncated { what: "page terms" })?;
        Ok(Self {
            block: h.block.get(),
            page_shift,
            flags,
            entries: Entries::Wire(entries),
            terms: Terms::Wire(terms),
            data,
        })
    }

    /// Index of the RAM block (position in the RamBlocks list).
    pub fn block(&self) -> u16 {
        self.block
    }

    /// log2 of the page size.
    pub fn page_shift(&self) -> u8 {
        self.page_shift
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> usize {
        1 << self.page_shift
    }

    /// The batch flags.
    pub fn flags(&self) -> BatchFlags {
        self.flags
    }

    /// Number of entries (normal and zero pages).
    pub fn len(&self) -> usize {
        match self.entries {
            Entries::Wire(e) => e.len(),
            Entries::Slice(e) => e.len(),
        }
    }

    /// True for a batch without entries (a bare end-of-iteration marker).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The source's digest terms of the normal pages, in entry order:
    /// empty without [`BatchFlags::TERMS`].
    pub fn terms(&self) -> impl Iterator<Item = u64> + 'a {
        let terms = self.terms;
        let n = match terms {
            Terms::Wire(t) => t.len(),
            Terms::Slice(t) => t.len(),
        };
        (0..n).filter_map(move |i| match terms {
            Terms::Wire(t) => t.get(i).map(|t| t.get()),
            Terms::Slice(t) => t.get(i).copied(),
        })
    }

    /// The data of all normal pages, concatenated in entry order.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Each entry with its bytes: `Some(page)` for a normal page, `None` for a zero page.
    pub fn pages(&self) -> impl Iterator<Item = (PageEntry, Option<&'a [u8]>)> + 'a {
        let entries = self.entries;
        let page_size = self.page_size();
        let mut data = self.data;
        (0..self.len()).map_while(move |i| {
            let entry = match entries {
                // Wire entries were validated when the batch was decoded.
                Entries::Wire(e) => PageEntry::from_wire(e.get(i)?.get()).ok()?,
                Entries::Slice(e) => *e.get(i)?,
            };
            match entry.kind {
                PageKind::Zero => Some((entry, None)),
                PageKind::Normal => {
                    let (page, rest) = data.split_at_checked(page_size)?;
                    data = rest;
                    Some((entry, Some(page)))
                }
            }
        })
    }

    /// Bytes of the Pages body.
    pub(crate) fn body_len(&self) -> usize {
        BATCH_HEADER_LEN
            + PAGE_ENTRY_LEN * self.len()
            + PAGE_TERM_LEN * self.terms().count()
            + self.data.len()
    }

    /// Writes the body: batch header, entries, data.
    pub(crate) fn encode_body(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        put_batch_header(w, self.block, self.page_shift, self.flags, self.len())?;
        match self.entries {
            Entries::Wire(e) => {
                for raw in e {
                    w.put(raw)?;
                }
            }
            Entries::Slice(e) => {
                for entry in e {
                    w.put(&U64::new(entry.to_wire()?))?;
                }
            }
        }
        for term in self.terms() {
            w.put(&U64::new(term))?;
        }
        w.bytes(self.data)
    }
}

/// Writes a batch header for `count` entries.
fn put_batch_header(
    w: &mut Writer<'_>,
    block: u16,
    page_shift: u8,
    flags: BatchFlags,
    count: usize,
) -> Result<(), EncodeError> {
    let count = u32::try_from(count).map_err(|_| EncodeError::TooManyPages { count })?;
    w.put(&BatchHeader {
        block: U16::new(block),
        page_shift,
        flags: flags.bits(),
        count: U32::new(count),
    })
}

/// Writes the record header (announcing the full body, data included), the
/// batch header and the entries into `out`, and returns the bytes written.
///
/// The caller then sends the bytes of every normal entry, in entry order,
/// `1 << page_shift` each — typically with one `writev` from guest memory —
/// so pages are never copied into a staging buffer.
pub fn encode_page_batch_header(
    out: &mut [u8],
    block: u16,
    page_shift: u8,
    flags: BatchFlags,
    entries: &[PageEntry],
) -> Result<usize, EncodeError> {
    encode_page_batch_header_with_terms(out, block, page_shift, flags, entries, core::iter::empty())
}

/// [`encode_page_batch_header`] with the page terms after the entries:
/// with [`BatchFlags::TERMS`] in `flags`, `terms` yields one term per
/// normal entry, in entry order (it is read that many times at most);
/// without it, none.
pub fn encode_page_batch_header_with_terms(
    out: &mut [u8],
    block: u16,
    page_shift: u8,
    flags: BatchFlags,
    entries: &[PageEntry],
    terms: impl Iterator<Item = u64>,
) -> Result<usize, EncodeError> {
    check_shift(page_shift)?;
    let normal = check_entries(entries)?;
    let term_count = if flags.contains(BatchFlags::TERMS) {
        normal
    } else {
        0
    };
    let head = RECORD_HEADER_LEN
        + BATCH_HEADER_LEN
        + PAGE_ENTRY_LEN * entries.len()
        + PAGE_TERM_LEN * term_count;
    let mut w = Writer::new(out, head)?;
    put_record_header(
        &mut w,
        kind::PAGES,
        body_len(entries.len(), term_count, normal, page_shift),
    )?;
    put_batch_header(&mut w, block, page_shift, flags, entries.len())?;
    for e in entries {
        w.put(&U64::new(e.to_wire()?))?;
    }
    let mut given = 0;
    for term in terms.take(term_count) {
        w.put(&U64::new(term))?;
        given += 1;
    }
    check_terms(flags, normal, given)?;
    Ok(w.written())
}
