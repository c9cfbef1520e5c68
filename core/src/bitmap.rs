//! Dirty-page bitmaps over caller-provided memory.
//!
//! Migration tracks one bit per guest page: "this page changed since it was
//! last sent". A 4 GiB guest has a million 4 KiB pages, and the bitmap is
//! scanned, merged and counted on every iteration, so every operation here
//! works a 64-bit word at a time (`trailing_zeros` to find the next dirty
//! page, `count_ones` to count them, one OR per word to merge a fetched log).
//!
//! The core owns no heap: the caller hands in the words (`&mut [u64]`, or
//! `&[AtomicU64]` for a log shared with another thread) and
//! [`words_for`] says how many it needs. The layout is KVM's
//! (`KVM_GET_DIRTY_LOG`): bit `i` of word `w` stands for page `64 * w + i`,
//! so a log fetched from the kernel can be merged without conversion.
//!
//! Bits past the bitmap's length in its last word are always kept zero, which
//! lets counting and merging work on whole words without masking every one.
//!
//! * [`DirtyBitmap`] is single-owner (`&mut`): the migration bitmap of a RAM
//!   block, a received-pages bitmap, a clear map's chunk bits.
//! * [`AtomicBitmap`] is shared: another thread (a simulated vCPU, a
//!   userfaultfd fault thread) marks bits while the owner drains them into a
//!   [`DirtyBitmap`] without losing or double-counting any.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

/// Bits per storage word.
const WORD_BITS: u64 = u64::BITS as u64;

/// Number of `u64` words needed to hold `bits` bits: `ceil(bits / 64)`.
///
/// Callers use it to size the storage they pass to [`DirtyBitmap::new`] or
/// [`AtomicBitmap::new`]. On a target whose `usize` cannot hold the result
/// it saturates at `usize::MAX`, so the constructor then reports the storage
/// as too small instead of silently accepting a truncated length.
pub const fn words_for(bits: u64) -> usize {
    let words = bits / WORD_BITS + !bits.is_multiple_of(WORD_BITS) as u64;
    if words > usize::MAX as u64 {
        usize::MAX
    } else {
        words as usize
    }
}

/// Mask of the valid bits in the last word of a bitmap of `bits` bits
/// (all ones when `bits` is a multiple of 64).
const fn tail_mask(bits: u64) -> u64 {
    match bits % WORD_BITS {
        0 => u64::MAX,
        rem => (1u64 << rem) - 1,
    }
}

/// Word index and bit mask of `bit`; callers check `bit < bits` first, so
/// the index fits in `usize` (the storage holding it exists).
const fn locate(bit: u64) -> (usize, u64) {
    ((bit / WORD_BITS) as usize, 1u64 << (bit % WORD_BITS))
}

/// Why a bitmap could not be built or an operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BitmapError {
    /// The storage handed in is shorter than [`words_for`] the requested
    /// number of bits.
    TooSmall {
        /// Words required.
        needed_words: usize,
        /// Words provided.
        got_words: usize,
    },
    /// An operation named a bit the bitmap does not have. For ranges, `bit`
    /// is the first requested bit that does not exist.
    OutOfRange {
        /// The offending bit.
        bit: u64,
        /// Number of bits the bitmap holds.
        bits: u64,
    },
}

impl fmt::Display for BitmapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BitmapError::TooSmall {
                needed_words,
                got_words,
            } => write!(
                f,
                "bitmap storage too small: {needed_words} words needed, {got_words} given"
            ),
            BitmapError::OutOfRange { bit, bits } => {
                write!(f, "bit {bit} out of range for a bitmap of {bits} bits")
            }
        }
    }
}

impl core::error::Error for BitmapError {}

/// Checks that storage of `got` words can hold `bits` bits and returns the
/// number of words actually used.
fn check_storage(got: usize, bits: u64) -> Result<usize, BitmapError> {
    let needed = words_for(bits);
    // `words_for` saturates at `usize::MAX` for unaddressable sizes; no
    // `u64` slice is that long, so those are rejected here too.
    if got < needed {
        return Err(BitmapError::TooSmall {
            needed_words: needed,
            got_words: got,
        });
    }
    Ok(needed)
}

/// A dirty bitmap of `bits` bits stored in caller memory, one bit per page.
///
/// All mutation goes through `&mut self`, so it needs no atomics; see
/// [`AtomicBitmap`] for a log written by another thread.
pub struct DirtyBitmap<'a> {
    words: &'a mut [u64],
    bits: u64,
}

/// Shows the size and the dirty count, not the words: a 4 GiB guest's
/// bitmap is 16 Ki words.
impl fmt::Debug for DirtyBitmap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("bits", &self.bits)
            .field("set", &self.count())
            .finish()
    }
}

impl<'a> DirtyBitmap<'a> {
    /// Builds a bitmap of `bits` bits over `words`.
    ///
    /// `words` must hold at least [`words_for`]`(bits)` words; only that many
    /// are used. Their current contents are kept (a caller may re-attach a
    /// bitmap it filled earlier), except the bits past `bits` in the last
    /// word, which are cleared so whole-word counting and merging stay exact.
    pub fn new(words: &'a mut [u64], bits: u64) -> Result<Self, BitmapError> {
        let n = check_storage(words.len(), bits)?;
        // `check_storage` guarantees `n <= words.len()`.
        let (words, _) = words.split_at_mut(n);
        if let Some(last) = words.last_mut() {
            *last &= tail_mask(bits);
        }
        Ok(DirtyBitmap { words, bits })
    }

    /// Number of bits (pages) the bitmap tracks.
    pub fn bits(&self) -> u64 {
        self.bits
    }

    /// The storage words in use (KVM layout), e.g. to hand to a shim or to
    /// send as a received-pages bitmap.
    pub fn words(&self) -> &[u64] {
        self.words
    }

    fn out_of_range(&self, bit: u64) -> BitmapError {
        BitmapError::OutOfRange {
            bit,
            bits: self.bits,
        }
    }

    /// Word and mask of `bit`, or `None` when it is past the end.
    fn slot(&mut self, bit: u64) -> Option<(&mut u64, u64)> {
        if bit >= self.bits {
            return None;
        }
        let (w, mask) = locate(bit);
        self.words.get_mut(w).map(|word| (word, mask))
    }

    /// Marks `bit` dirty. A bit past the end is refused, not ignored: it
    /// means the caller's page arithmetic is wrong.
    pub fn set(&mut self, bit: u64) -> Result<(), BitmapError> {
        let err = self.out_of_range(bit);
        let (word, mask) = self.slot(bit).ok_or(err)?;
        *word |= mask;
        Ok(())
    }

    /// Marks `bit` clean. Errors as [`DirtyBitmap::set`] does.
    pub fn clear(&mut self, bit: u64) -> Result<(), BitmapError> {
        let err = self.out_of_range(bit);
        let (word, mask) = self.slot(bit).ok_or(err)?;
        *word &= !mask;
        Ok(())
    }

    /// Whether `bit` is dirty; `false` for bits past the end, which have no
    /// page to send.
    pub fn test(&self, bit: u64) -> bool {
        if bit >= self.bits {
            return false;
        }
        let (w, mask) = locate(bit);
        self.words.get(w).is_some_and(|word| word & mask != 0)
    }

    /// Clears `bit` and returns whether it was dirty: the sender's "claim
    /// this page" step. `false` for bits past the end.
    pub fn test_and_clear(&mut self, bit: u64) -> bool {
        match self.slot(bit) {
            Some((word, mask)) => {
                let was = *word & mask != 0;
                *word &= !mask;
                was
            }
            None => false,
        }
    }

    /// Validates `[start, start + count)` and returns its end.
    fn check_range(&self, start: u64, count: u64) -> Result<u64, BitmapError> {
        match start.checked_add(count) {
            Some(end) if end <= self.bits => Ok(end),
            _ => Err(self.out_of_range(start.max(self.bits))),
        }
    }

    /// Applies `f(word, mask)` to every word overlapping `[start, end)`,
    /// `mask` selecting the bits of the word inside the range. The range
    /// must already be validated.
    fn for_range(&mut self, start: u64, end: u64, mut f: impl FnMut(&mut u64, u64)) {
        if start >= end {
            return;
        }
        let (first, _) = locate(start);
        let (last, _) = locate(end - 1);
        let head = u64::MAX << (start % WORD_BITS);
        let tail = tail_mask(end);
        if let Some(words) = self.words.get_mut(first..=last) {
            let n = words.len();
            for (i, word) in words.iter_mut().enumerate() {
                let mut mask = u64::MAX;
                if i == 0 {
                    mask &= head;
                }
                if i + 1 == n {
                    mask &= tail;
                }
                f(word, mask);
            }
        }
    }

    /// Marks `count` bits from `start` dirty, a word at a time. The whole
    /// range must exist; otherwise nothing changes.
    pub fn set_range(&mut self, start: u64, count: u64) -> Result<(), BitmapError> {
        let end = self.check_range(start, count)?;
        self.for_range(start, end, |w, m| *w |= m);
        Ok(())
    }

    /// Marks `count` bits from `start` clean. Errors as
    /// [`DirtyBitmap::set_range`] does.
    pub fn clear_range(&mut self, start: u64, count: u64) -> Result<(), BitmapError> {
        let end = self.check_range(start, count)?;
        self.for_range(start, end, |w, m| *w &= !m);
        Ok(())
    }

    /// Marks every bit dirty: the first iteration sends all of memory.
    pub fn fill(&mut self) {
        self.words.fill(u64::MAX);
        if let Some(last) = self.words.last_mut() {
            *last = tail_mask(self.bits);
        }
    }

    /// Marks every bit clean.
    pub fn clear_all(&mut self) {
        self.words.fill(0);
    }

    /// First bit at or after `from` whose word, masked by `invert`, has it
    /// set. With `invert = u64::MAX` this finds clear bits.
    fn find_from(&self, from: u64, invert: u64) -> Option<u64> {
        if from >= self.bits {
            return None;
        }
        let (first, _) = locate(from);
        let skip = u64::MAX << (from % WORD_BITS);
        let words = self.words.get(first..)?;
        for (i, &w) in words.iter().enumerate() {
            let mut w = w ^ invert;
            if i == 0 {
                w &= skip;
            }
            if w != 0 {
                let bit = (first + i) as u64 * WORD_BITS + u64::from(w.trailing_zeros());
                // Padding bits past the end read as clear; never report them.
                return (bit < self.bits).then_some(bit);
            }
        }
        None
    }

    /// The first dirty bit at or after `from`, skipping clean words whole.
    pub fn find_next_set(&self, from: u64) -> Option<u64> {
        self.find_from(from, 0)
    }

    /// The first clean bit at or after `from`, skipping full words whole.
    pub fn find_next_clear(&self, from: u64) -> Option<u64> {
        self.find_from(from, u64::MAX)
    }

    /// Number of dirty bits: the pages still to send.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Number of dirty bits in `[start, start + count)`. Bits past the end
    /// do not exist and count as clean, so a range running off the end is
    /// counted up to the end.
    pub fn count_range(&self, start: u64, count: u64) -> u64 {
        let end = start.saturating_add(count).min(self.bits);
        if start >= end {
            return 0;
        }
        let (first, _) = locate(start);
        let (last, _) = locate(end - 1);
        let head = u64::MAX << (start % WORD_BITS);
        let tail = tail_mask(end);
        let Some(words) = self.words.get(first..=last) else {
            return 0;
        };
        let n = words.len();
        words
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let mut w = w;
                if i == 0 {
                    w &= head;
                }
                if i + 1 == n {
                    w &= tail;
                }
                u64::from(w.count_ones())
            })
            .sum()
    }

    /// ORs a freshly fetched dirty log (KVM layout) into this bitmap and
    /// returns how many bits were newly set — QEMU's
    /// `num_dirty_pages_period`, the pages dirtied again since they were
    /// last sent, which drives the dirty-rate estimate.
    ///
    /// Bits past the end of the bitmap are ignored (a kernel log is rounded
    /// up to whole words); a log shorter than the bitmap merges only the
    /// pages it covers.
    pub fn merge(&mut self, log: &[u64]) -> u64 {
        self.merge_at(0, log)
    }

    /// ORs `log` into this bitmap starting at word `offset` (bit
    /// `64 * offset`), returning the number of newly set bits. Used where a
    /// log arrives in word-aligned pieces, e.g. a RAM block backed by
    /// several memslots, or a clear map built a word of chunks at a time.
    /// Words falling past the end are ignored, as in [`DirtyBitmap::merge`].
    pub fn merge_at(&mut self, offset: usize, log: &[u64]) -> u64 {
        let tail = tail_mask(self.bits);
        let n = self.words.len();
        let Some(words) = self.words.get_mut(offset..) else {
            return 0;
        };
        let mut newly = 0;
        for (i, (word, &src)) in words.iter_mut().zip(log).enumerate() {
            let mut fresh = src & !*word;
            if offset + i + 1 == n {
                fresh &= tail;
            }
            newly += u64::from(fresh.count_ones());
            *word |= fresh;
        }
        newly
    }
}

/// A dirty bitmap in caller memory that several threads may mark at once.
///
/// Writers call [`AtomicBitmap::set`] (one `fetch_or`); the owner moves the
/// marks into its private [`DirtyBitmap`] with [`AtomicBitmap::drain_into`],
/// which swaps each word with zero so that a bit set concurrently is either
/// drained now or left for the next drain — never lost, never counted twice.
/// Setting a bit is a release and draining an acquire, so a writer that fills
/// a page and then marks it publishes the page contents to the drainer.
pub struct AtomicBitmap<'a> {
    words: &'a [AtomicU64],
    bits: u64,
}

/// Shows the size and the current mark count, not the words.
impl fmt::Debug for AtomicBitmap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AtomicBitmap")
            .field("bits", &self.bits)
            .field("set", &self.count())
            .finish()
    }
}

impl<'a> AtomicBitmap<'a> {
    /// Builds a shared bitmap of `bits` bits over `words`, which must hold at
    /// least [`words_for`]`(bits)` words (only those are used). Existing
    /// marks are kept; padding bits past `bits` are cleared.
    pub fn new(words: &'a [AtomicU64], bits: u64) -> Result<Self, BitmapError> {
        let n = check_storage(words.len(), bits)?;
        // `check_storage` guarantees `n <= words.len()`.
        let (words, _) = words.split_at(n);
        if let Some(last) = words.last() {
            last.fetch_and(tail_mask(bits), Ordering::AcqRel);
        }
        Ok(AtomicBitmap { words, bits })
    }

    /// Number of bits (pages) the bitmap tracks.
    pub fn bits(&self) -> u64 {
        self.bits
    }

    fn slot(&self, bit: u64) -> Result<(&AtomicU64, u64), BitmapError> {
        let err = BitmapError::OutOfRange {
            bit,
            bits: self.bits,
        };
        if bit >= self.bits {
            return Err(err);
        }
        let (w, mask) = locate(bit);
        self.words.get(w).map(|word| (word, mask)).ok_or(err)
    }

    /// Marks `bit` and returns whether it was already marked, so a fault
    /// thread can tell a first fault on a page from a repeat.
    pub fn set(&self, bit: u64) -> Result<bool, BitmapError> {
        let (word, mask) = self.slot(bit)?;
        Ok(word.fetch_or(mask, Ordering::AcqRel) & mask != 0)
    }

    /// Whether `bit` is marked; `false` past the end.
    pub fn test(&self, bit: u64) -> bool {
        self.slot(bit)
            .is_ok_and(|(word, mask)| word.load(Ordering::Acquire) & mask != 0)
    }

    /// Unmarks `bit` and returns whether it was marked; exactly one of
    /// several racing callers sees `true`. `false` past the end.
    pub fn test_and_clear(&self, bit: u64) -> bool {
        self.slot(bit)
            .is_ok_and(|(word, mask)| word.fetch_and(!mask, Ordering::AcqRel) & mask != 0)
    }

    /// Number of marked bits at the moment each word is read (a snapshot
    /// only if no writer is running).
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// The first marked bit at or after `from`.
    pub fn find_next_set(&self, from: u64) -> Option<u64> {
        if from >= self.bits {
            return None;
        }
        let (first, _) = locate(from);
        let skip = u64::MAX << (from % WORD_BITS);
        let words = self.words.get(first..)?;
        for (i, w) in words.iter().enumerate() {
            let mut w = w.load(Ordering::Acquire);
            if i == 0 {
                w &= skip;
            }
            if w != 0 {
                let bit = (first + i) as u64 * WORD_BITS + u64::from(w.trailing_zeros());
                return (bit < self.bits).then_some(bit);
            }
        }
        None
    }

    /// Moves every mark into `dst` (OR) and unmarks it here, a word at a
    /// time; returns how many bits were newly set in `dst`.
    ///
    /// Only bits that `dst` can hold are taken: if `dst` is shorter, the
    /// marks past its end stay in this bitmap rather than being dropped.
    pub fn drain_into(&self, dst: &mut DirtyBitmap<'_>) -> u64 {
        let limit = self.bits.min(dst.bits);
        let full = (limit / WORD_BITS) as usize;
        let rem = limit % WORD_BITS;
        let mut newly = 0;
        for (src, word) in self.words.iter().zip(dst.words.iter_mut()).take(full) {
            let taken = src.swap(0, Ordering::AcqRel);
            newly += u64::from((taken & !*word).count_ones());
            *word |= taken;
        }
        if rem != 0 {
            let mask = (1u64 << rem) - 1;
            if let (Some(src), Some(word)) = (self.words.get(full), dst.words.get_mut(full)) {
                let taken = src.fetch_and(!mask, Ordering::AcqRel) & mask;
                newly += u64::from((taken & !*word).count_ones());
                *word |= taken;
            }
        }
        newly
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;
    use std::vec;
    use std::vec::Vec;

    /// One operation against both the bitmap and a `Vec<bool>` model. Bit
    /// arguments range a little past the end so out-of-range paths are hit.
    #[derive(Clone, Debug)]
    enum Op {
        Set(u64),
        Clear(u64),
        TestAndClear(u64),
        SetRange(u64, u64),
        ClearRange(u64, u64),
        FindSet(u64),
        FindClear(u64),
        CountRange(u64, u64),
        Merge(Vec<u64>),
        Fill,
        ClearAll,
    }

    fn op(bits: u64) -> impl Strategy<Value = Op> {
        let b = bits + 70;
        prop_oneof![
            (0..b).prop_map(Op::Set),
            (0..b).prop_map(Op::Clear),
            (0..b).prop_map(Op::TestAndClear),
            (0..b, 0..b).prop_map(|(s, c)| Op::SetRange(s, c)),
            (0..b, 0..b).prop_map(|(s, c)| Op::ClearRange(s, c)),
            (0..b).prop_map(Op::FindSet),
            (0..b).prop_map(Op::FindClear),
            (0..b, 0..b).prop_map(|(s, c)| Op::CountRange(s, c)),
            proptest::collection::vec(any::<u64>(), 0..(words_for(bits) + 2)).prop_map(Op::Merge),
            Just(Op::Fill),
            Just(Op::ClearAll),
        ]
    }

    fn case() -> impl Strategy<Value = (u64, Vec<Op>)> {
        prop_oneof![Just(0u64), Just(64), Just(128), 1u64..300]
            .prop_flat_map(|bits| (Just(bits), proptest::collection::vec(op(bits), 0..60)))
    }

    fn check_same(bm: &DirtyBitmap<'_>, model: &[bool]) {
        for (i, &m) in model.iter().enumerate() {
            assert_eq!(bm.test(i as u64), m, "bit {i}");
        }
        assert_eq!(bm.count(), model.iter().filter(|&&b| b).count() as u64);
        // Padding bits stay zero.
        if let Some(&last) = bm.words().last() {
            assert_eq!(last & !tail_mask(bm.bits()), 0);
        }
    }

    proptest! {
        #[test]
        fn dirty_bitmap_matches_model((bits, ops) in case(), garbage in any::<u64>()) {
            let mut storage = vec![garbage; words_for(bits) + 1];
            let mut bm = DirtyBitmap::new(&mut storage, bits).unwrap();
            // Start from the contents the constructor kept (garbage, masked).
            let mut model: Vec<bool> = (0..bits).map(|i| bm.test(i)).collect();
            check_same(&bm, &model);
            let oob = |bit: u64| Err(BitmapError::OutOfRange { bit, bits });
            for op in ops {
                let before: Vec<u64> = bm.words().to_vec();
                match op {
                    Op::Set(b) => {
                        if b < bits {
                            prop_assert_eq!(bm.set(b), Ok(()));
                            model[b as usize] = true;
                        } else {
                            prop_assert_eq!(bm.set(b), oob(b));
                            prop_assert_eq!(bm.words(), &before[..]);
                        }
                    }
                    Op::Clear(b) => {
                        if b < bits {
                            prop_assert_eq!(bm.clear(b), Ok(()));
                            model[b as usize] = false;
                        } else {
                            prop_assert_eq!(bm.clear(b), oob(b));
                            prop_assert_eq!(bm.words(), &before[..]);
                        }
                    }
                    Op::TestAndClear(b) => {
                        let want = b < bits && model[b as usize];
                        prop_assert_eq!(bm.test_and_clear(b), want);
                        if b < bits {
                            model[b as usize] = false;
                        }
                    }
                    Op::SetRange(s, c) | Op::ClearRange(s, c) => {
                        let value = matches!(op, Op::SetRange(..));
                        let r = if value { bm.set_range(s, c) } else { bm.clear_range(s, c) };
                        if s + c <= bits {
                            prop_assert_eq!(r, Ok(()));
                            model[s as usize..(s + c) as usize].fill(value);
                        } else {
                            prop_assert_eq!(r, oob(s.max(bits)));
                            prop_assert_eq!(bm.words(), &before[..]);
                        }
                    }
                    Op::FindSet(from) => {
                        let want = (from..bits).find(|&i| model[i as usize]);
                        prop_assert_eq!(bm.find_next_set(from), want);
                    }
                    Op::FindClear(from) => {
                        let want = (from..bits).find(|&i| !model[i as usize]);
                        prop_assert_eq!(bm.find_next_clear(from), want);
                    }
                    Op::CountRange(s, c) => {
                        let want = (s..(s + c).min(bits)).filter(|&i| model[i as usize]).count();
                        prop_assert_eq!(bm.count_range(s, c), want as u64);
                    }
                    Op::Merge(log) => {
                        let mut newly = 0;
                        for (i, m) in model.iter_mut().enumerate() {
                            let in_log = log.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1);
                            if in_log && !*m {
                                *m = true;
                                newly += 1;
                            }
                        }
                        prop_assert_eq!(bm.merge(&log), newly);
                    }
                    Op::Fill => {
                        bm.fill();
                        model.fill(true);
                    }
                    Op::ClearAll => {
                        bm.clear_all();
                        model.fill(false);
                    }
                }
                check_same(&bm, &model);
            }
        }

        #[test]
        fn atomic_drain_matches_model(
            (abits, dbits) in (0u64..260, 0u64..260),
            marks in proptest::collection::vec(0u64..300, 0..80),
            pre in proptest::collection::vec(0u64..300, 0..40),
        ) {
            let storage: Vec<AtomicU64> = (0..words_for(abits)).map(|_| AtomicU64::new(0)).collect();
            let ab = AtomicBitmap::new(&storage, abits).unwrap();
            let mut dwords = vec![0u64; words_for(dbits)];
            let mut dst = DirtyBitmap::new(&mut dwords, dbits).unwrap();
            let mut amodel = vec![false; abits as usize];
            let mut dmodel = vec![false; dbits as usize];
            for &p in &pre {
                if p < dbits {
                    dst.set(p).unwrap();
                    dmodel[p as usize] = true;
                }
            }
            for &m in &marks {
                if m < abits {
                    prop_assert_eq!(ab.set(m), Ok(amodel[m as usize]));
                    amodel[m as usize] = true;
                } else {
                    prop_assert_eq!(ab.set(m), Err(BitmapError::OutOfRange { bit: m, bits: abits }));
                }
                prop_assert!(!ab.test(m) || m < abits);
            }
            prop_assert_eq!(ab.count(), amodel.iter().filter(|&&b| b).count() as u64);
            let first = (0..abits).find(|&i| amodel[i as usize]);
            prop_assert_eq!(ab.find_next_set(0), first);
            let mut newly = 0;
            for i in 0..abits.min(dbits) as usize {
                if amodel[i] {
                    amodel[i] = false;
                    if !dmodel[i] {
                        dmodel[i] = true;
                        newly += 1;
                    }
                }
            }
            prop_assert_eq!(ab.drain_into(&mut dst), newly);
            check_same(&dst, &dmodel);
            // Marks past the destination's end are kept, not dropped.
            for (i, &m) in amodel.iter().enumerate() {
                prop_assert_eq!(ab.test(i as u64), m);
            }
        }
    }

    #[test]
    fn constructor_rejects_short_storage_and_masks_padding() {
        let mut w = [0u64; 1];
        assert_eq!(
            DirtyBitmap::new(&mut w, 65).unwrap_err(),
            BitmapError::TooSmall {
                needed_words: 2,
                got_words: 1
            }
        );
        let mut w = [u64::MAX; 2];
        let bm = DirtyBitmap::new(&mut w, 70).unwrap();
        assert_eq!(bm.count(), 70);
        assert_eq!(bm.find_next_clear(0), None);
        assert_eq!(words_for(0), 0);
        assert_eq!(words_for(64), 1);
        assert_eq!(words_for(65), 2);
        assert_eq!(words_for(u64::MAX), (u64::MAX / 64 + 1) as usize);
        let a: [AtomicU64; 0] = [];
        assert!(AtomicBitmap::new(&a, 1).is_err());
        assert!(std::format!("{}", BitmapError::OutOfRange { bit: 9, bits: 3 }).contains("bit 9"));
    }

    #[test]
    fn two_writers_one_drainer_collect_every_bit_once() {
        const BITS: u64 = 100_003;
        let storage: Arc<Vec<AtomicU64>> =
            Arc::new((0..words_for(BITS)).map(|_| AtomicU64::new(0)).collect());
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let storage = Arc::clone(&storage);
                std::thread::spawn(move || {
                    let ab = AtomicBitmap::new(&storage, BITS).unwrap();
                    // Thread t owns the bits congruent to t mod 2, so each is
                    // set exactly once overall and must arrive exactly once.
                    let mut b = t;
                    while b < BITS {
                        assert_eq!(ab.set(b), Ok(false));
                        b += 2;
                    }
                })
            })
            .collect();
        let ab = AtomicBitmap::new(&storage, BITS).unwrap();
        let mut words = vec![0u64; words_for(BITS)];
        let mut dst = DirtyBitmap::new(&mut words, BITS).unwrap();
        let mut total = 0;
        let mut rounds = 0u64;
        loop {
            let done = writers.iter().all(|w| w.is_finished());
            let got = ab.drain_into(&mut dst);
            total += got;
            rounds += 1;
            if done && got == 0 {
                break;
            }
        }
        for w in writers {
            w.join().unwrap();
        }
        total += ab.drain_into(&mut dst);
        // Every bit was newly set in dst exactly once: counted once in total.
        assert_eq!(total, BITS);
        assert_eq!(dst.count(), BITS);
        assert_eq!(ab.count(), 0);
        assert!(rounds >= 1);
    }
}
