//! The migration's self-check: an order-independent digest of guest memory,
//! kept page by page as pages are sent and placed, compared at the end.
//!
//! # What is summed
//!
//! Each page contributes a *term*, a keyed hash of (block index, page
//! index, contents) ([`DigestKey::page_term`]); a block's digest is the
//! wrapping sum of its pages' terms. An all-zero page's term is 0, so a
//! page never sent (a fresh destination's page reads as zero), a page sent
//! as a zero entry and a page sent as zero bytes all count the same. A sum
//! does not depend on the order pages go by, and a page sent again replaces
//! its earlier term: [`DigestBooks`] keeps each page's current term (8 bytes
//! a page, in storage the caller hands in, so this crate stays heap-free)
//! and adjusts the sum by the difference.
//!
//! # Who hashes what
//!
//! The source hashes each page when its scan reads it, right after the
//! dirty-log clear that covers it and before the page goes in a batch
//! (through [`PageReader::page_term`](crate::source::PageReader::page_term):
//! the shim owns guest memory). The zero-page check reads the page there
//! anyway, and the term is 0 exactly for an all-zero page, so one pass over
//! the page's words does both and the term costs no read of its own; the
//! engine keeps the batch's terms with its page list and books them as
//! the batch is handed out. (It used to hash after the caller's write,
//! a second read of each page, from memory again once a pass's working
//! set is larger than the cache: verification cost 10 % of the
//! throughput.)
//!
//! The caller writes the page later, from guest memory, so with the guest
//! running the bytes hashed (at the read, time `h`) and the bytes sent (at
//! the write, `w > h`) can differ. Why the books are still exact, page by
//! page:
//!
//! - Only the *last* term booked for a page counts; it replaces every
//!   earlier one, on both ends.
//! - If the bytes of a send differ from the bytes hashed, the guest (or a
//!   device) wrote the page between `h` and `w`. That is after the page's
//!   dirty-log clear (the clear comes before the read), so the write set
//!   the page's dirty bit (the device dirty log, for a device) and the
//!   next sync finds it: the page is sent, and hashed, again. A send
//!   whose term may differ from its bytes is therefore never a page's
//!   last send.
//! - Every migration ends with a sync and a pass with the vCPUs and the
//!   devices stopped (the precopy stop-and-copy, or the postcopy switch,
//!   after which every page left goes out from stopped memory). Nothing
//!   writes guest memory between `h` and `w` there, so that pass's terms
//!   are of the bytes it sends; and by the point above a page's last
//!   send is one made with nothing writing between the read and the write.
//!
//! So the last term the source books for each page is the term of the
//! bytes the destination last received for it. That earlier passes run
//! live does not matter: a pass's mismatched terms are all replaced later.
//! The argument is the one that makes precopy correct at all (a page
//! written after its clear is sent again), and needs nothing more: what
//! it does need, a dirty log that misses no write, is what the audit
//! below checks. A copy of each batch into a buffer that is hashed and
//! sent would make the term exact without the dirty log's help, but at the
//! cost of a store and a load of every page more and of sending from a
//! copy; and a guest write between the copy and the send that the dirty
//! log missed would leave the destination stale with the digests equal,
//! where the hash at the read shows the mismatch.
//!
//! Pages requested in postcopy are hashed as their batch's header is
//! encoded (their terms travel in it, see below), from stopped memory.
//!
//! The destination hashes the bytes of each page as the engine hands them
//! to [`DestinationHost::place_pages`](crate::destination::DestinationHost::place_pages),
//! at the index the stream gave. The source sends its per-block sums after
//! the last page ([`Record::Digest`](crate::wire::Record::Digest)); the
//! destination compares them before it reports the stream loaded, so a
//! mismatch refuses to start the guest there, and the source, told by the
//! return path, resumes its own.
//!
//! # What it detects, and what not
//!
//! The comparison proves that the destination holds, for every page, the
//! last contents the source sent for it: it catches a byte flipped after
//! the transport's checks, a page placed under the wrong index or block,
//! and a page dropped (or a zero page not zeroed). It does not by itself
//! catch a dirty-log sync that missed a page: the source then never sends
//! the page's last contents, and both ends book the same stale term. That
//! takes a reading of the source's memory at the stop, the *audit*
//! ([`SourceEngine::audit_at_stop`](crate::source::SourceEngine::audit_at_stop)):
//! with the vCPUs stopped the source hashes every page again and compares
//! with its books, so a page that changed without a dirty bit is named
//! (block and page) and the migration fails before the end of the stream,
//! the guest running on at the source. The audit reads all of RAM inside
//! the stop (measured at 22-28 GB/s per second of CPU on the development
//! machine: some 40 ms a GiB when the core is free), so it is off unless
//! asked for.
//!
//! In postcopy the guest already runs on the destination when the stream
//! ends, so the comparison at the end is too late to keep it from reading
//! a bad page. From its switch to postcopy on, a verifying source sends
//! each normal page's term with the page
//! ([`BatchFlags::TERMS`](crate::wire::BatchFlags::TERMS)), and the
//! destination checks every page of a batch against it before it installs
//! any: a page that differs is never installed, and the migration fails
//! with block and page named (the guest cannot go back to the source,
//! whose copy is stale). The sums at the end still cover the rest.
//!
//! The hash is not cryptographic: it catches accidents (any change
//! confined to one aligned 8-byte word, such as a flipped bit or byte, and
//! the same contents under another index or block, always, barring the
//! 2^-64 chance of a fold to 0 or 1; anything else but with probability
//! about 2^-64), not
//! an adversary who can write the stream (that is TLS's job). The key,
//! chosen per migration by the source, makes a page left over from another
//! migration or another guest unlikely to match by chance. It takes one
//! 64-bit multiply a word (some 18 GB/s a core): a faster one that takes
//! two words a multiply would miss some two-bit changes across a word pair.
//!
//! # Naming the first mismatching page
//!
//! The per-block sums name the first mismatching block; a sum alone cannot
//! name a page. With the return path open, a precopy destination that
//! finds a block's sums unequal then *locates* the page before it refuses
//! the guest: it asks the source for the sums of [`LOCATE_PARTS`] equal
//! parts of the block ([`RpMessage::DigestQuery`](crate::return_path::RpMessage::DigestQuery)),
//! the source answers from its books
//! ([`Record::DigestRanges`](crate::wire::Record::DigestRanges)), the
//! destination compares each part with its own books and asks again for
//! the first part whose sums differ, until a part is one page. That page
//! is the first one whose terms differ (barring sums that cancel, with
//! probability about 2^-64), and the destination tells the source
//! ([`RpMessage::DigestMismatch`](crate::return_path::RpMessage::DigestMismatch))
//! before its SHUT. A 1 GiB block of 4 KiB pages takes three rounds, each
//! a return trip and a sum over the part's books on either end; it runs
//! only after a mismatch, so a sound migration pays nothing for it. Both
//! ends read only their books: no guest memory is touched. A multifd
//! destination keeps its channels' pages' terms outside the engine's
//! books, so it names the block only (the page: not yet), as does a
//! destination without the return path.

use core::fmt;

use crate::wire::{BlockInfo, PageRange};

/// Word lanes of the page hash: eight independent multiply chains, which
/// keep a core's multiplier busy.
const LANES: usize = 8;

/// An odd 64-bit constant (2^64 / φ): multiplying by it is a bijection.
const K: u64 = 0x9E37_79B9_7F4A_7C15;

/// The per-migration key of the page hash. The source picks the seed
/// (any 64 bits, random per migration) and sends it in the preamble
/// ([`Command::DigestKey`](crate::wire::Command::DigestKey)), so both ends
/// hash with the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DigestKey {
    seed: u64,
    lanes: [u64; LANES],
}

impl DigestKey {
    /// The key for `seed`.
    pub const fn new(seed: u64) -> Self {
        let mut lanes = [0u64; LANES];
        let mut i = 0;
        while i < LANES {
            lanes[i] = mix(seed.wrapping_add(K.wrapping_mul(i as u64 + 1)));
            i += 1;
        }
        Self { seed, lanes }
    }

    /// The seed the key was made from, as it goes on the wire.
    pub const fn seed(&self) -> u64 {
        self.seed
    }

    /// The term of page `page` of block `block` holding `data` (a whole
    /// page, its bytes read as little-endian 64-bit words; a trailing part
    /// shorter than a word is ignored, and no page size livemig accepts
    /// has one). 0 for an all-zero page, never 0 otherwise.
    pub fn page_term(&self, block: u16, page: u64, data: &[u8]) -> u64 {
        let mut lanes = self.lanes;
        let mut any = 0u64;
        let mut stripes = data.chunks_exact(8 * LANES);
        for stripe in &mut stripes {
            for (lane, word) in lanes.iter_mut().zip(stripe.chunks_exact(8)) {
                absorb(lane, &mut any, le_word(word));
            }
        }
        for (lane, word) in lanes.iter_mut().zip(stripes.remainder().chunks_exact(8)) {
            absorb(lane, &mut any, le_word(word));
        }
        self.finish(block, page, lanes, any)
    }

    /// The same term as [`page_term`](Self::page_term), with the page's
    /// `words` 64-bit words read by `word(i)` (little-endian value of word
    /// `i`), for a caller whose memory is not a Rust slice: a shim reads
    /// guest memory a vCPU may write with volatile loads, never through a
    /// reference. `word` is called once for each `i` in `0..words`, and
    /// never with `i >= words`: a caller may rely on it for the soundness
    /// of its reads.
    #[inline]
    pub fn term_of_words(
        &self,
        block: u16,
        page: u64,
        words: usize,
        mut word: impl FnMut(usize) -> u64,
    ) -> u64 {
        let mut lanes = self.lanes;
        let mut any = 0u64;
        let mut i = 0;
        while i + LANES <= words {
            for (j, lane) in lanes.iter_mut().enumerate() {
                absorb(lane, &mut any, word(i + j));
            }
            i += LANES;
        }
        for (j, lane) in lanes.iter_mut().enumerate().take(words - i) {
            absorb(lane, &mut any, word(i + j));
        }
        self.finish(block, page, lanes, any)
    }

    /// The term from the lanes after the last word (`any`: the OR of all
    /// words, 0 for a zero page).
    fn finish(&self, block: u16, page: u64, lanes: [u64; LANES], any: u64) -> u64 {
        if any == 0 {
            return 0;
        }
        let mut h = mix(mix(self.seed ^ u64::from(block)) ^ page);
        for lane in lanes {
            h = mix(h ^ lane);
        }
        // 0 is the zero page's term.
        h.max(1)
    }
}

/// One word into its lane: xor, multiply by an odd constant, rotate. Each
/// step is a bijection of the lane, so a change of one word changes its
/// lane's result whatever the other words are.
#[inline(always)]
fn absorb(lane: &mut u64, any: &mut u64, w: u64) {
    *any |= w;
    *lane = (*lane ^ w).wrapping_mul(K).rotate_left(29);
}

/// An 8-byte chunk as a little-endian word.
#[inline(always)]
fn le_word(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().unwrap_or([0; 8]))
}

/// splitmix64's finaliser: a bijection that spreads every input bit over
/// the output.
const fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// One block's books: the current term of each of its pages, in storage
/// the caller owns (one `u64` a page: [`DigestBooks::words`]), and their
/// sum.
#[derive(Debug)]
pub struct DigestBooks<'a> {
    terms: &'a mut [u64],
    sum: u64,
}

/// Why a [`DigestBooks`] could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BooksSizeMismatch {
    /// Words the block needs (its page count).
    pub needed: usize,
    /// Words given.
    pub got: usize,
}

impl fmt::Display for BooksSizeMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "digest books of {} words for a block of {} pages",
            self.got, self.needed
        )
    }
}

impl core::error::Error for BooksSizeMismatch {}

impl<'a> DigestBooks<'a> {
    /// Words of storage the books of `block` need: one per page.
    pub fn words(block: &BlockInfo<'_>) -> usize {
        usize::try_from(block.length / u64::from(block.page_size)).unwrap_or(usize::MAX)
    }

    /// Books for `block` over `terms` ([`words`](Self::words) long), which
    /// are reset to every page's zero term.
    pub fn new(block: &BlockInfo<'_>, terms: &'a mut [u64]) -> Result<Self, BooksSizeMismatch> {
        let needed = Self::words(block);
        if terms.len() != needed {
            return Err(BooksSizeMismatch {
                needed,
                got: terms.len(),
            });
        }
        terms.fill(0);
        Ok(Self { terms, sum: 0 })
    }

    /// Pages the books cover.
    pub fn pages(&self) -> u64 {
        self.terms.len() as u64
    }

    /// Page `page` now holds contents whose term is `term`: it replaces
    /// the page's earlier term in the sum. False (and nothing booked) for
    /// a page outside the block.
    pub fn record(&mut self, page: u64, term: u64) -> bool {
        let Some(slot) = usize::try_from(page)
            .ok()
            .and_then(|p| self.terms.get_mut(p))
        else {
            return false;
        };
        self.sum = self.sum.wrapping_sub(*slot).wrapping_add(term);
        *slot = term;
        true
    }

    /// Adds `delta` to the sum: the change (new terms minus replaced ones,
    /// wrapping) that pages booked elsewhere made to the block's digest.
    /// A multifd destination's channel receivers place pages without the
    /// engine and keep those pages' terms in slots of their own
    /// ([`ChannelsHost::take_channel_digest`](crate::destination::ChannelsHost::take_channel_digest));
    /// a page booked both here and there would count twice, which can
    /// only make the digests differ, never hide a difference.
    pub fn add_elsewhere(&mut self, delta: u64) {
        self.sum = self.sum.wrapping_add(delta);
    }

    /// The term booked for `page`, if it is in the block.
    pub fn term(&self, page: u64) -> Option<u64> {
        usize::try_from(page)
            .ok()
            .and_then(|p| self.terms.get(p))
            .copied()
    }

    /// The block's digest: the sum of its pages' terms.
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// The sum of the terms of the pages of `range` (the part of it inside
    /// the block): what a located part is compared by.
    pub fn range_sum(&self, range: PageRange) -> u64 {
        let pages = self.pages();
        let (first, end) = (range.first.min(pages), range.end().min(pages));
        let (first, end) = (first as usize, end as usize);
        self.terms
            .get(first..end)
            .unwrap_or(&[])
            .iter()
            .fold(0u64, |sum, t| sum.wrapping_add(*t))
    }
}

/// Parts a located range is split into per round (see the module docs):
/// 64 sums make an answer of 530 bytes, and three rounds take a block of
/// 2^18 pages down to one page.
pub const LOCATE_PARTS: u64 = 64;

/// The parts of `range` one locate round compares: [`LOCATE_PARTS`] runs
/// of equal length (the last one shorter when the count does not divide),
/// fewer when the range has fewer pages. Both ends split a range the same
/// way, so a query names the range and the answer's sums follow this order.
pub fn locate_parts(range: PageRange) -> impl Iterator<Item = PageRange> {
    let step = range.count.div_ceil(LOCATE_PARTS).max(1);
    let parts = range.count.div_ceil(step);
    (0..parts).map(move |i| {
        let first = range.first + i * step;
        PageRange {
            first,
            count: step.min(range.end() - first),
        }
    })
}

/// Where a migration's self-check stands, on either end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Verification {
    /// The migration is not verified (one end has no books).
    #[default]
    Off,
    /// Pages are being booked; the comparison has not happened yet.
    Pending,
    /// The destination compared every block's digest and found them equal
    /// (on the source: the destination said so, by reporting the stream
    /// loaded or the migration completed after the digest).
    Verified,
    /// The destination's digest of block `block` differs from the
    /// source's: the destination refused to start the guest.
    Mismatch {
        /// Index of the first block whose digests differ.
        block: u16,
        /// Index (in the block) of the first page whose terms differ,
        /// once located (see the module docs); `None` while the locating
        /// goes on, or where it cannot run.
        page: Option<u64>,
    },
    /// The source's audit at the stop found page `page` of block `block`
    /// changed since it was last sent, without a dirty bit: the source
    /// failed the migration and keeps its guest.
    AuditFailed {
        /// Index of the block.
        block: u16,
        /// Index of the page in the block.
        page: u64,
    },
}

impl Verification {
    /// True when the destination found the digests equal.
    pub fn is_verified(self) -> bool {
        self == Self::Verified
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::BlockId;

    #[test]
    fn locate_parts_cover_the_range_in_order() {
        let parts = |first, count| {
            let mut v = [PageRange { first: 0, count: 0 }; 64];
            let mut n = 0;
            for p in locate_parts(PageRange { first, count }) {
                v[n] = p;
                n += 1;
            }
            (v, n)
        };
        let (v, n) = parts(0, 1 << 18);
        assert_eq!(n, 64);
        assert_eq!(
            v[1],
            PageRange {
                first: 4096,
                count: 4096
            }
        );
        let (v, n) = parts(10, 100);
        assert_eq!(n, 50, "step 2 for 100 pages");
        assert_eq!(
            v[49],
            PageRange {
                first: 108,
                count: 2
            }
        );
        let (v, n) = parts(7, 65);
        assert_eq!(n, 33);
        assert_eq!(
            v[32],
            PageRange {
                first: 71,
                count: 1
            },
            "the last part is shorter"
        );
        let (v, n) = parts(5, 3);
        assert_eq!(n, 3);
        assert_eq!(v[2], PageRange { first: 7, count: 1 });
    }

    const PAGE: usize = 4096;

    fn page(fill: impl Fn(usize) -> u8) -> [u8; PAGE] {
        core::array::from_fn(fill)
    }

    #[test]
    fn zero_page_term_is_zero_and_others_are_not() {
        let key = DigestKey::new(7);
        assert_eq!(key.page_term(0, 3, &[0; PAGE]), 0);
        let mut p = [0u8; PAGE];
        p[PAGE - 1] = 1;
        assert_ne!(key.page_term(0, 3, &p), 0);
    }

    #[test]
    fn term_depends_on_key_block_page_and_every_byte() {
        let key = DigestKey::new(1);
        let p = page(|i| (i * 7 + 3) as u8);
        let t = key.page_term(0, 5, &p);
        assert_ne!(t, DigestKey::new(2).page_term(0, 5, &p));
        assert_ne!(t, key.page_term(1, 5, &p));
        assert_ne!(t, key.page_term(0, 6, &p));
        for at in [0, 1, 7, 8, 63, 64, 2048, PAGE - 1] {
            for bit in [0x01, 0x80] {
                let mut q = p;
                q[at] ^= bit;
                assert_ne!(key.page_term(0, 5, &q), t, "byte {at} bit {bit:#x}");
            }
        }
    }

    #[test]
    fn words_and_slice_agree() {
        let key = DigestKey::new(99);
        let p = page(|i| (i % 251) as u8);
        let words: [u64; PAGE / 8] = core::array::from_fn(|i| {
            u64::from_le_bytes(p[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]))
        });
        assert_eq!(
            key.term_of_words(2, 9, words.len(), |i| words[i]),
            key.page_term(2, 9, &p)
        );
    }

    #[test]
    fn books_replace_terms_in_any_order() {
        let info =
            BlockInfo::new(BlockId::new("ram").unwrap(), 4 * PAGE as u64, PAGE as u32).unwrap();
        let mut a = [9u64; 4];
        let mut b = [0u64; 4];
        let mut a = DigestBooks::new(&info, &mut a).unwrap();
        let mut b = DigestBooks::new(&info, &mut b).unwrap();
        assert_eq!(a.sum(), 0, "new books are the zero pages' sum");
        // a: page 1 sent twice, then page 2; b: page 2, then page 1 once.
        assert!(a.record(1, 100));
        assert!(a.record(1, 5));
        assert!(a.record(2, 7));
        assert!(b.record(2, 7));
        assert!(b.record(1, 5));
        assert_eq!(a.sum(), b.sum());
        assert_eq!(a.term(1), Some(5));
        assert!(a.record(1, 0), "a page zeroed again");
        assert_eq!(a.sum(), 7);
        assert!(!a.record(4, 1), "outside the block");
        assert_eq!(a.sum(), 7);
        assert_eq!(a.range_sum(PageRange { first: 1, count: 2 }), 7);
        assert_eq!(a.range_sum(PageRange { first: 3, count: 9 }), 0);
        let mut short = [0u64; 3];
        assert_eq!(
            DigestBooks::new(&info, &mut short).unwrap_err(),
            BooksSizeMismatch { needed: 4, got: 3 }
        );
    }
}
