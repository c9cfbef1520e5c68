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
//! The hash is not cryptographic: it catches accidents, not an adversary
//! who can write the stream (that is TLS's job). What it catches:
//!
//! - always: any change confined to one aligned 4-byte half of a word,
//!   such as a flipped bit or byte ([`nh_word`] says why), barring the
//!   2^-64 chance of a fold to 0 or 1;
//! - the same contents under another index or block: always for page
//!   indices below 2^48, barring that same chance (the finish packs block
//!   and page into one word, a bijection, before its `mix`);
//! - anything else (changes in both halves of a word, in several words, a
//!   whole page replaced): caught unless a lane's sum comes out unchanged.
//!   Each stripe's lane sums are NH-style sums: for a change in both
//!   halves of one word, at most about 2^-31 of the per-migration keys
//!   leave that word's contribution unchanged (two bad values of a key
//!   half, from the wrap of the added word). A lane sum that changes
//!   changes its lane's chained state (the fold is a bijection), and a
//!   change of one lane's state always changes the term (the finish's
//!   merge multiplies each lane by an odd key word, a bijection); that
//!   changes of several lanes do not cancel in the merge's sum is a
//!   heuristic (about 2^-64), not a bound proven here. The stripes of a
//!   page share their key words, so the same change repeated in several
//!   stripes of one lane gets no independent chances.
//!
//! The key, chosen per migration by the source, makes a page left over
//! from another migration or another guest unlikely to match by chance.
//! The term takes one 32x32-bit multiply a word, which the KVM shim
//! computes eight at a time with AVX-512 and four with AVX2 (`vpmuludq`)
//! on both hosts. This
//! crate's portable code gives the same terms but does not vectorise
//! well: measured on a loaded machine at 0.55-0.95 us a page, no faster
//! than the term it replaced (0.54), so a host that keeps the default
//! [`DestinationHost::page_term`](crate::destination::DestinationHost::page_term),
//! the simulator and the fuzz targets pay that. The term it replaced (one
//! 64-bit multiply a word over eight chains, about 2^-64 for any change)
//! could not vectorise before AVX-512DQ, and cost 5-10 % of a busy
//! migration's throughput on two shared cores; docs/benchmarks.md has the
//! figures of both.
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
//! destination's channel receivers keep their pages' terms outside the
//! engine's books; on a mismatch the books adopt them first (the channels
//! are over by then: the stream fails), so the page is named there too. A
//! destination without the return path names the block only.

use core::fmt;

use crate::wire::{BlockInfo, PageRange};

/// Lanes of the page hash: word `i` of a stripe goes into lane `i %
/// LANES`, so that a lane's words are the same 64-bit position of each
/// 64-byte run, and eight lanes are two 256-bit vectors.
pub const LANES: usize = 8;

/// Words (64-bit) of a stripe: a page is hashed as stripes of this many
/// words (the last one shorter if the page is), each word with its own
/// key word. The key covers one stripe, not a page, because pages go up to
/// 1 GiB; each stripe's sums are folded into the lanes' chained state
/// before the next stripe, so the same key on two stripes does not make
/// stripes commute.
pub const STRIPE_WORDS: usize = 128;

/// An odd 64-bit constant (2^64 / φ): multiplying by it is a bijection.
const K: u64 = 0x9E37_79B9_7F4A_7C15;

/// The per-migration key of the page hash. The source picks the seed
/// (any 64 bits, random per migration) and sends it in the preamble
/// ([`Command::DigestKey`](crate::wire::Command::DigestKey)), so both ends
/// hash with the same key.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DigestKey {
    seed: u64,
    /// Each lane's state before the first stripe.
    lanes: [u64; LANES],
    /// The odd multiplier of each lane in the finish's merge.
    merge: [u64; LANES],
    stripe: StripeKey,
}

/// The key word of each word position of a stripe (see [`StripeSums`]),
/// each two 32-bit key halves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StripeKey([u64; STRIPE_WORDS]);

impl StripeKey {
    /// The key words, one per word position of a stripe.
    pub fn words(&self) -> &[u64; STRIPE_WORDS] {
        &self.0
    }
}

impl fmt::Debug for DigestKey {
    /// The seed only: the rest is derived from it, and 1 KiB of key words
    /// would drown a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestKey")
            .field("seed", &self.seed)
            .finish()
    }
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
        let mut words = [0u64; STRIPE_WORDS];
        let mut i = 0;
        while i < STRIPE_WORDS {
            words[i] = mix(seed.wrapping_add(K.wrapping_mul((LANES + i) as u64 + 1)));
            i += 1;
        }
        // Odd, so that each lane's product is a bijection of the lane.
        let mut merge = [0u64; LANES];
        let mut i = 0;
        while i < LANES {
            let n = (LANES + STRIPE_WORDS + i) as u64 + 1;
            merge[i] = mix(seed.wrapping_add(K.wrapping_mul(n))) | 1;
            i += 1;
        }
        Self {
            seed,
            lanes,
            merge,
            stripe: StripeKey(words),
        }
    }

    /// The seed the key was made from, as it goes on the wire.
    pub const fn seed(&self) -> u64 {
        self.seed
    }

    /// The key words of a stripe, for a caller that computes
    /// [`StripeSums`] its own way (a shim's vector code over guest memory).
    pub fn stripe_key(&self) -> &StripeKey {
        &self.stripe
    }

    /// The term of page `page` of block `block` holding `data` (a whole
    /// page, its bytes read as little-endian 64-bit words; a trailing part
    /// shorter than a word is ignored, and no page size livemig accepts
    /// has one). 0 for an all-zero page, never 0 otherwise.
    pub fn page_term(&self, block: u16, page: u64, data: &[u8]) -> u64 {
        let words = data.len() / 8;
        self.term_of_stripes(block, page, words, |first, len, key| {
            StripeSums::of_bytes(key, data.get(8 * first..8 * (first + len)).unwrap_or(&[]))
        })
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
        self.term_of_stripes(block, page, words, |first, len, key| {
            StripeSums::of_words(key, len, |j| word(first + j))
        })
    }

    /// The same term again, with each stripe's sums computed by
    /// `stripe(first, len, key)`: the [`StripeSums`] of the `len` words
    /// from word `first` on (`first` a multiple of [`STRIPE_WORDS`], `len`
    /// at most that, word `first + j` hashed with key words `j`). Called
    /// once per stripe, in order, only for words in `0..words`: what a
    /// shim's vector code plugs in (it must give the sums
    /// [`StripeSums::of_words`] gives).
    #[inline]
    pub fn term_of_stripes(
        &self,
        block: u16,
        page: u64,
        words: usize,
        mut stripe: impl FnMut(usize, usize, &StripeKey) -> StripeSums,
    ) -> u64 {
        let mut lanes = self.lanes;
        let mut any = 0u64;
        let mut first = 0;
        while first < words {
            let len = (words - first).min(STRIPE_WORDS);
            let sums = stripe(first, len, &self.stripe);
            any |= sums.any;
            for (lane, sum) in lanes.iter_mut().zip(sums.lanes) {
                *lane = fold(*lane, sum);
            }
            first += len;
        }
        self.finish(block, page, lanes, any)
    }

    /// The term from the lanes after the last stripe (`any`: the OR of all
    /// words, 0 for a zero page): the lanes merged into one word by a sum
    /// of products with odd key words, and that word and the page's place
    /// (block and index packed into one word) through one `mix`.
    ///
    /// Why this shape: each product is a bijection of its lane, so a
    /// change of one lane always changes the merged word, and `mix` is a
    /// bijection, so it always changes the term; the eight products are
    /// independent, so the merge costs about one multiply's latency and
    /// the page two `mix`es in a row, where the chain it replaced (`h =
    /// mix(h ^ lane)` for each lane, after two for the place) cost ten in
    /// a row: with the shim's page loop, a page's term in cache went from
    /// 59 ns to 37 (docs/benchmarks.md). Inlined into a shim's vector code
    /// with the rest of the term.
    #[inline]
    fn finish(&self, block: u16, page: u64, lanes: [u64; LANES], any: u64) -> u64 {
        if any == 0 {
            return 0;
        }
        // A bijection of (block, page) for pages below 2^48 (2^60 bytes of
        // 4 KiB pages): the same contents elsewhere always differ.
        let place = mix(self.seed ^ (u64::from(block) << 48) ^ page);
        let mut merged = 0u64;
        for (lane, m) in lanes.iter().zip(self.merge) {
            merged = merged.wrapping_add(lane.wrapping_mul(m));
        }
        // 0 is the zero page's term.
        mix(place ^ merged).max(1)
    }
}

/// One stripe's sums: per lane, the wrapping sum of [`nh_word`] over the
/// lane's words, and the OR of all the words (0 iff they are all zero).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StripeSums {
    /// The sum of each lane.
    pub lanes: [u64; LANES],
    /// The OR of the stripe's words.
    pub any: u64,
}

impl StripeSums {
    /// The sums of `len` words (at most [`STRIPE_WORDS`]) read by
    /// `word(j)`, word `j` into lane `j % LANES` with key word `j`: those
    /// of the words' little-endian bytes, gathered into one stripe's
    /// buffer for [`of_bytes`](Self::of_bytes), the one definition (the
    /// gather measured no slower than the word-by-word loop it replaced).
    #[inline]
    pub fn of_words(key: &StripeKey, len: usize, mut word: impl FnMut(usize) -> u64) -> Self {
        let mut stripe = [0u8; 8 * STRIPE_WORDS];
        let len = len.min(STRIPE_WORDS);
        for (j, bytes) in stripe.chunks_exact_mut(8).take(len).enumerate() {
            bytes.copy_from_slice(&word(j).to_le_bytes());
        }
        Self::of_bytes(key, stripe.get(..8 * len).unwrap_or(&[]))
    }

    /// The sums of the little-endian words of `bytes` (at most a stripe's;
    /// a trailing part shorter than a word is ignored), word `j` into lane
    /// `j % LANES` with key word `j`: the definition every other way of
    /// computing them (a shim's vector code) must match. Written as whole
    /// runs of [`LANES`] words so that no lane index is computed or checked
    /// per word.
    #[inline]
    pub fn of_bytes(key: &StripeKey, bytes: &[u8]) -> Self {
        let mut sums = Self::default();
        let mut runs = bytes.chunks_exact(8 * LANES);
        let mut keys = key.0.chunks_exact(LANES);
        for (run, k) in (&mut runs).zip(&mut keys) {
            for ((sum, word), k) in sums.lanes.iter_mut().zip(run.chunks_exact(8)).zip(k) {
                let w = le_word(word);
                sums.any |= w;
                *sum = sum.wrapping_add(nh_word(w, *k));
            }
        }
        if let Some(k) = keys.next() {
            for ((lane, word), k) in runs.remainder().chunks_exact(8).enumerate().zip(k) {
                sums.absorb(lane, le_word(word), *k);
            }
        }
        sums
    }

    #[inline(always)]
    fn absorb(&mut self, lane: usize, w: u64, k: u64) {
        self.any |= w;
        if let Some(sum) = self.lanes.get_mut(lane) {
            *sum = sum.wrapping_add(nh_word(w, k));
        }
    }
}

/// What word `w` with key word `k` adds to its lane's sum: with `a` and
/// `b` its low and high 32-bit halves each plus the key's half (mod 2^32),
/// the 64-bit product `a * b` (NH's, one `pmuludq` lane) plus the keyed
/// word `a + 2^32 b` itself. The added word makes a change of one half
/// always change the result: changing `a` alone changes it by
/// `Δa (b + 1)`, changing `b` alone by `Δb (a + 2^32)`, neither of which
/// is 0 mod 2^64 for `0 < |Δ| < 2^32` (a bare `a * b` does not change at
/// all when the other half is 0).
#[inline(always)]
pub fn nh_word(w: u64, k: u64) -> u64 {
    let a = (w as u32).wrapping_add(k as u32);
    let b = ((w >> 32) as u32).wrapping_add((k >> 32) as u32);
    let keyed = u64::from(a) | u64::from(b) << 32;
    (u64::from(a) * u64::from(b)).wrapping_add(keyed)
}

/// A stripe's lane sum into the lane's chained state: xor, multiply by an
/// odd constant, rotate. A bijection of either argument with the other
/// fixed, so a change of one lane's sum changes its state whatever the
/// other stripes hold, and not commutative, so stripes do not commute.
#[inline(always)]
fn fold(lane: u64, sum: u64) -> u64 {
    (lane ^ sum).wrapping_mul(K).rotate_left(29)
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
        let Some(slot) = slot(self.terms, page) else {
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

    /// Page `page`'s term `term`, already in the sum through
    /// [`add_elsewhere`](Self::add_elsewhere), is booked here from now
    /// on: it joins the page's slot (the sum does not change), so that a
    /// later [`record`](Self::record) of the page replaces it. A postcopy
    /// destination adopts the multifd channels' pages at the switch
    /// ([`ChannelsHost::end_channels`](crate::destination::ChannelsHost::end_channels)),
    /// since postcopy may send a page again on the main stream. False (and
    /// nothing booked) for a page outside the block.
    pub fn adopt(&mut self, page: u64, term: u64) -> bool {
        let Some(slot) = slot(self.terms, page) else {
            return false;
        };
        *slot = slot.wrapping_add(term);
        true
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

/// Page `page`'s slot in a block's `terms`, if the page is in the block.
fn slot(terms: &mut [u64], page: u64) -> Option<&mut u64> {
    usize::try_from(page).ok().and_then(|p| terms.get_mut(p))
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

    /// A pseudo-random page (xorshift64 from `seed`).
    fn random_page(seed: u64) -> [u8; PAGE] {
        let mut x = seed | 1;
        core::array::from_fn(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
    }

    fn words_of(p: &[u8]) -> impl Fn(usize) -> u64 + '_ {
        |i| u64::from_le_bytes(p[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]))
    }

    /// The stripe sums as their doc says, word by word: word `j` into lane
    /// `j % LANES` with key word `j`.
    fn reference_sums(key: &StripeKey, len: usize, word: impl Fn(usize) -> u64) -> StripeSums {
        let mut sums = StripeSums::default();
        for j in 0..len {
            let w = word(j);
            sums.any |= w;
            sums.lanes[j % LANES] = sums.lanes[j % LANES].wrapping_add(nh_word(w, key.0[j]));
        }
        sums
    }

    #[test]
    fn stripe_sums_by_bytes_and_by_words_are_the_word_by_word_definition() {
        let key = DigestKey::new(0xfeed);
        let mut edge = [0u8; PAGE];
        edge.iter_mut().step_by(9).for_each(|b| *b = 0xff);
        for p in [random_page(1), random_page(2), [0xff; PAGE], edge] {
            for len in [0, 1, 7, 8, 9, 63, 64, STRIPE_WORDS - 1, STRIPE_WORDS] {
                let bytes = &p[..8 * len];
                let want = reference_sums(key.stripe_key(), len, words_of(bytes));
                assert_eq!(
                    StripeSums::of_bytes(key.stripe_key(), bytes),
                    want,
                    "{len} words"
                );
                assert_eq!(
                    StripeSums::of_words(key.stripe_key(), len, words_of(bytes)),
                    want,
                    "{len} words"
                );
            }
            // Every page size from livemig's smallest (512 bytes: less
            // than a stripe) up, and a length that ends mid-stripe.
            for len in [512, 1024, 1032, 2048, PAGE] {
                let q = &p[..len];
                assert_eq!(
                    key.page_term(1, 2, q),
                    key.term_of_words(1, 2, len / 8, words_of(q)),
                    "{len} bytes"
                );
            }
        }
    }

    #[test]
    fn a_change_of_one_aligned_4_byte_word_always_changes_the_term() {
        let key = DigestKey::new(3);
        for seed in 1..4 {
            let p = random_page(seed);
            let t = key.page_term(0, 1, &p);
            for word in 0..PAGE / 8 {
                for bit in 0..64 {
                    let mut q = p;
                    q[8 * word + bit / 8] ^= 1 << (bit % 8);
                    assert_ne!(key.page_term(0, 1, &q), t, "word {word} bit {bit}");
                }
            }
        }
        // One bit in an otherwise zero page, at every position.
        let mut seen = [0u64; 64];
        for word in 0..PAGE / 8 {
            for bit in 0..64 {
                let mut q = [0u8; PAGE];
                q[8 * word + bit / 8] = 1 << (bit % 8);
                let t = key.page_term(0, 1, &q);
                assert_ne!(t, 0);
                seen[bit] = t;
            }
        }
        assert!(seen.iter().enumerate().all(|(i, t)| !seen[..i].contains(t)));
    }

    #[test]
    fn a_half_word_change_is_caught_where_the_other_half_keys_to_zero() {
        // The case a bare NH product misses: the other half plus its key
        // half is 0 mod 2^32, so the product is 0 whatever this half holds.
        let key = DigestKey::new(11);
        let at = 5;
        let k = key.stripe_key().words()[at];
        let zero_hi = u64::from(((k >> 32) as u32).wrapping_neg()) << 32;
        let zero_lo = u64::from((k as u32).wrapping_neg());
        for (w, changed, other_half) in [
            (zero_hi | 0x1234, zero_hi | 0x1235, 32),
            (zero_lo | 0x1234 << 32, zero_lo | 0x1235 << 32, 0),
        ] {
            let keyed = |w: u64| ((w >> other_half) as u32).wrapping_add((k >> other_half) as u32);
            assert_eq!(keyed(w), 0, "the product is 0");
            assert_ne!(nh_word(w, k), nh_word(changed, k));
            let mut p = random_page(9);
            p[8 * at..8 * at + 8].copy_from_slice(&w.to_le_bytes());
            let t = key.page_term(0, 0, &p);
            p[8 * at..8 * at + 8].copy_from_slice(&changed.to_le_bytes());
            assert_ne!(key.page_term(0, 0, &p), t);
        }
    }

    #[test]
    fn stripes_do_not_commute() {
        // Stripes share their key words: swapping two must still show.
        let key = DigestKey::new(5);
        let p = random_page(4);
        let mut q = p;
        let stripe = 8 * STRIPE_WORDS;
        q[..stripe].copy_from_slice(&p[stripe..2 * stripe]);
        q[stripe..2 * stripe].copy_from_slice(&p[..stripe]);
        assert_ne!(key.page_term(0, 0, &p), key.page_term(0, 0, &q));
        // Two words of one lane swapped inside a stripe, too.
        let mut q = p;
        q[..8].copy_from_slice(&p[64..72]);
        q[64..72].copy_from_slice(&p[..8]);
        assert_ne!(key.page_term(0, 0, &p), key.page_term(0, 0, &q));
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
