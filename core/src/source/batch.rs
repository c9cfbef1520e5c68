//! One page batch being assembled and its header's encoding, heap-free:
//! the engine's own batches and a host thread that serves postcopy page
//! requests itself (livemig-kvm's return-path reader) build their batches
//! with the same code, so that zero detection, the page terms of a
//! verifying postcopy and the header cannot drift apart between the two
//! (the destination refuses a batch whose terms do not match its pages).

use super::PageReader;
use crate::digest::DigestKey;
use crate::wire::{
    self, BATCH_HEADER_LEN, BatchFlags, EncodeError, PAGE_ENTRY_LEN, PAGE_TERM_LEN, PageEntry,
    PageKind, RECORD_HEADER_LEN,
};

/// Up to `N` pages of one block, each a zero or a normal entry, in the
/// order they go on the wire; the normal pages' indices are kept apart,
/// in the same order, for the caller's write of their contents.
#[derive(Debug, Clone)]
pub struct BatchBuilder<const N: usize> {
    block: u16,
    entries: [PageEntry; N],
    len: usize,
    normal: [u64; N],
    /// With `hashed`, the term of each page of `normal` (same index), as
    /// the caller read it.
    terms: [u64; N],
    normal_len: usize,
    /// Every normal page has its term in `terms`: the batch was filled by
    /// [`push_hashed`](Self::push_hashed) only (a verifying scan, which
    /// hashes each page in the read its zero check makes anyway). A page
    /// pushed without one makes the header's encoding hash them all.
    hashed: bool,
    limit: usize,
}

impl<const N: usize> Default for BatchBuilder<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> BatchBuilder<N> {
    /// Room for the header of a full batch, terms included: a buffer this
    /// long never fails [`encode_header`](Self::encode_header) for room.
    pub const HEADER_ROOM: usize =
        RECORD_HEADER_LEN + BATCH_HEADER_LEN + (PAGE_ENTRY_LEN + PAGE_TERM_LEN) * N;

    /// An empty batch of block 0, full at `N` pages.
    pub const fn new() -> Self {
        BatchBuilder {
            block: 0,
            entries: [PageEntry {
                index: 0,
                kind: PageKind::Zero,
            }; N],
            len: 0,
            normal: [0; N],
            terms: [0; N],
            normal_len: 0,
            hashed: true,
            limit: N,
        }
    }

    /// The block the pages are of.
    pub fn block(&self) -> u16 {
        self.block
    }

    /// Names the block of the pages pushed next (the caller empties the
    /// batch before it changes blocks: a batch is of one block).
    pub fn set_block(&mut self, block: u16) {
        self.block = block;
    }

    /// Makes the batch full at `limit` pages (at most `N`): the postcopy
    /// preempt channel's main stream sends smaller batches, so that a
    /// request is never queued behind a large one.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.min(N);
    }

    /// Pages in the batch.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no page is in it.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when it holds its limit of pages.
    pub fn is_full(&self) -> bool {
        self.len >= self.limit
    }

    /// Empties it. The normal pages stay readable with
    /// [`sent_normal`](Self::sent_normal) until the next push.
    pub fn clear(&mut self) {
        self.len = 0;
        self.normal_len = 0;
        self.hashed = true;
    }

    /// Adds `page` as a zero or normal entry, without its term; false
    /// (nothing added) when the batch is full.
    pub fn push(&mut self, page: u64, zero: bool) -> bool {
        if self.is_full() {
            return false;
        }
        if !zero {
            self.hashed = false;
        }
        self.put(page, zero)
    }

    /// Adds `page` with `term`, its digest term as the caller read it
    /// (ignored for a zero entry, whose term is 0); false (nothing added)
    /// when the batch is full.
    pub fn push_hashed(&mut self, page: u64, zero: bool, term: u64) -> bool {
        if self.is_full() {
            return false;
        }
        if let Some(t) = self.terms.get_mut(self.normal_len).filter(|_| !zero) {
            *t = term;
        }
        self.put(page, zero)
    }

    fn put(&mut self, page: u64, zero: bool) -> bool {
        let kind = if zero {
            PageKind::Zero
        } else {
            PageKind::Normal
        };
        let (Some(slot), Some(n)) = (
            self.entries.get_mut(self.len),
            self.normal.get_mut(self.normal_len),
        ) else {
            return false;
        };
        *slot = PageEntry { index: page, kind };
        self.len += 1;
        if !zero {
            *n = page;
            self.normal_len += 1;
        }
        true
    }

    /// Adds `page`, a zero entry when `zero_detection` is on and `ram`
    /// reads it as all zero: `Some(zero)`, or `None` when the batch is
    /// full (then `ram` is not read).
    pub fn push_read(
        &mut self,
        ram: &impl PageReader,
        page: u64,
        zero_detection: bool,
    ) -> Option<bool> {
        if self.is_full() {
            return None;
        }
        let zero = zero_detection && ram.is_zero_page(self.block, page);
        self.push(page, zero).then_some(zero)
    }

    /// The entries, in order.
    pub fn entries(&self) -> &[PageEntry] {
        self.entries.get(..self.len).unwrap_or_default()
    }

    /// The normal pages, in order: the contents the caller writes after
    /// the header.
    pub fn normal(&self) -> &[u64] {
        self.normal.get(..self.normal_len).unwrap_or_default()
    }

    /// The first `n` normal pages of the batch last cleared (before any
    /// push since): for a caller that hands the pages out after emptying
    /// the batch.
    pub fn sent_normal(&self, n: usize) -> &[u64] {
        self.normal.get(..n).unwrap_or_default()
    }

    /// The normal pages' terms, in order, when every one was pushed with
    /// its term ([`push_hashed`](Self::push_hashed)).
    pub fn terms(&self) -> Option<&[u64]> {
        self.hashed
            .then(|| self.terms.get(..self.normal_len).unwrap_or_default())
    }

    /// Encodes the batch's record header into `out` and returns its
    /// length; the caller then writes each normal page's contents, in
    /// order. With a `key` (a verifying postcopy) the header carries each
    /// normal page's term (the one it was pushed with, else read from
    /// `ram` now), each handed to `on_term` (page, term) for the books;
    /// `flags` then gains [`BatchFlags::TERMS`].
    pub fn encode_header(
        &self,
        out: &mut [u8],
        ram: &impl PageReader,
        page_shift: u8,
        flags: BatchFlags,
        key: Option<&DigestKey>,
        mut on_term: impl FnMut(u64, u64),
    ) -> Result<usize, EncodeError> {
        let block = self.block;
        match key {
            Some(key) => wire::encode_page_batch_header_with_terms(
                out,
                block,
                page_shift,
                flags | BatchFlags::TERMS,
                self.entries(),
                self.normal().iter().enumerate().map(|(i, &page)| {
                    let term = self
                        .terms()
                        .and_then(|t| t.get(i).copied())
                        .unwrap_or_else(|| ram.page_term(block, page, key));
                    on_term(page, term);
                    term
                }),
            ),
            None => wire::encode_page_batch_header(out, block, page_shift, flags, self.entries()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::wire::{Record, STREAM_HEADER_LEN, StreamDecoder, encode_stream_header};

    /// Pages whose every byte is the page index (page 0 and every third
    /// page all zero).
    struct Ram;

    const PAGE: usize = 4096;

    fn contents(page: u64) -> [u8; PAGE] {
        [if page.is_multiple_of(3) {
            0
        } else {
            page as u8
        }; PAGE]
    }

    impl PageReader for Ram {
        fn is_zero_page(&self, _block: u16, page: u64) -> bool {
            contents(page).iter().all(|&b| b == 0)
        }

        fn page_term(&self, block: u16, page: u64, key: &DigestKey) -> u64 {
            key.page_term(block, page, &contents(page))
        }
    }

    /// A stream of the batch: the stream header, the batch's header and
    /// the normal pages' contents, as a caller writes them; and the terms
    /// booked.
    fn stream(batch: &BatchBuilder<8>, key: Option<&DigestKey>) -> (Vec<u8>, Vec<(u64, u64)>) {
        let mut out = vec![0u8; STREAM_HEADER_LEN];
        encode_stream_header(&mut out).unwrap();
        let mut header = vec![0u8; BatchBuilder::<8>::HEADER_ROOM];
        let mut booked = Vec::new();
        let n = batch
            .encode_header(&mut header, &Ram, 12, BatchFlags::empty(), key, |p, t| {
                booked.push((p, t))
            })
            .unwrap();
        out.extend_from_slice(&header[..n]);
        for &page in batch.normal() {
            out.extend_from_slice(&contents(page));
        }
        (out, booked)
    }

    /// Decodes `stream`'s batch and checks each entry's kind, index and
    /// contents against `Ram`; returns its block, flags and terms.
    fn decoded(stream: &[u8]) -> (u16, BatchFlags, Vec<u64>, usize) {
        let mut scratch = vec![0u8; 64 * 1024];
        let mut dec = StreamDecoder::new(&mut scratch);
        let Some(Record::Pages(batch)) = dec.decode(stream).unwrap().record else {
            panic!("not a batch");
        };
        for (entry, data) in batch.pages() {
            match entry.kind {
                PageKind::Zero => assert!(data.is_none() && Ram.is_zero_page(0, entry.index)),
                PageKind::Normal => assert_eq!(data, Some(&contents(entry.index)[..])),
            }
        }
        (
            batch.block(),
            batch.flags(),
            batch.terms().collect(),
            batch.len(),
        )
    }

    #[test]
    fn zero_detection_splits_entries_and_the_header_decodes_to_them() {
        let mut batch = BatchBuilder::<8>::new();
        batch.set_block(2);
        for page in 3..7 {
            assert!(batch.push_read(&Ram, page, true).is_some());
        }
        assert_eq!(batch.normal(), [4, 5]);
        let kinds: Vec<_> = batch.entries().iter().map(|e| e.kind).collect();
        use PageKind::{Normal, Zero};
        assert_eq!(kinds, [Zero, Normal, Normal, Zero]);
        let (bytes, booked) = stream(&batch, None);
        assert!(booked.is_empty());
        let (block, flags, terms, len) = decoded(&bytes);
        assert_eq!((block, len), (2, 4));
        assert!(!flags.contains(BatchFlags::TERMS) && terms.is_empty());
        // Without zero detection every page is normal.
        let mut all = BatchBuilder::<8>::new();
        assert_eq!(all.push_read(&Ram, 3, false), Some(false));
        assert_eq!(all.normal(), [3]);
    }

    #[test]
    fn a_key_puts_each_normal_pages_term_in_the_header_and_books_it() {
        let key = DigestKey::new(7);
        let mut batch = BatchBuilder::<8>::new();
        for page in [1, 3, 4] {
            batch.push_read(&Ram, page, true);
        }
        let (bytes, booked) = stream(&batch, Some(&key));
        let want: Vec<_> = [1u64, 4]
            .iter()
            .map(|&p| (p, key.page_term(0, p, &contents(p))))
            .collect();
        assert_eq!(booked, want);
        let (_, flags, terms, len) = decoded(&bytes);
        assert!(flags.contains(BatchFlags::TERMS));
        assert_eq!((terms, len), (vec![want[0].1, want[1].1], 3));
    }

    #[test]
    fn a_full_batch_takes_no_more_and_keeps_its_pages_after_clear() {
        let mut batch = BatchBuilder::<2>::new();
        assert!(batch.push(10, false) && batch.push(11, false));
        assert!(batch.is_full());
        assert!(!batch.push(12, false));
        assert_eq!(batch.push_read(&Ram, 12, true), None);
        batch.clear();
        assert!(batch.is_empty());
        assert_eq!(batch.sent_normal(2), [10, 11]);
        batch.set_limit(1);
        assert!(batch.push(13, true) && batch.is_full());
        batch.set_limit(5);
        assert!(!batch.is_full() && batch.push(14, false) && batch.is_full());
    }

    /// A batch carries its pushers' terms for its normal pages, in their
    /// order, as long as every normal page came with one (a zero entry
    /// needs none); a batch without them hashes at its header's encoding.
    #[test]
    fn a_batch_keeps_its_terms_while_every_normal_page_has_one() {
        let mut b = BatchBuilder::<8>::new();
        assert!(b.push_hashed(3, false, 30));
        assert!(b.push_hashed(4, true, 0));
        assert!(b.push(5, true));
        assert!(b.push_hashed(6, false, 60));
        assert_eq!(b.normal(), [3, 6]);
        assert_eq!(b.terms(), Some(&[30, 60][..]));
        assert!(b.push(7, false));
        assert_eq!(b.terms(), None, "page 7 has no term");
        b.clear();
        assert!(b.is_empty());
        assert_eq!(b.terms(), Some(&[][..]));
    }

    /// The header carries the terms pushed with the pages, not terms read
    /// again from memory: what was hashed is what the books get.
    #[test]
    fn a_hashed_batch_encodes_the_terms_it_was_given() {
        let key = DigestKey::new(7);
        let mut b = BatchBuilder::<8>::new();
        b.push_hashed(1, false, 111);
        b.push_hashed(2, false, 222);
        let (_, booked) = stream(&b, Some(&key));
        assert_eq!(booked, [(1, 111), (2, 222)]);
    }
}
