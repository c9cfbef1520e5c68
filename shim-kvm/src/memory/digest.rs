//! The integrity digest of guest memory, page by page.
//!
//! The digest of a memory is the wrapping sum of one term per non-zero
//! page, the term mixing the page's contents with its guest page number.
//! A sum does not depend on the order pages are visited in, so the source
//! can hash its stopped memory in any order, and a destination can add up
//! the terms of the pages it installed as it installed them.

use livemig_core::digest::DigestKey;
#[cfg(target_arch = "x86_64")]
use livemig_core::digest::{LANES, STRIPE_WORDS, StripeSums, nh_word};

use super::PAGE_SIZE;

/// What guest page `gfn` holding `page` adds to a
/// [`GuestMemory::digest`](super::GuestMemory::digest) (0 for a zero
/// page): the digest is the wrapping sum of these, so a destination can
/// account for a page by its contents at the time it installed it, after
/// its guest has changed it.
pub fn page_digest(gfn: u64, page: &[u8; PAGE_SIZE]) -> u64 {
    if page == &ZERO_PAGE {
        return 0;
    }
    let mut words = [0u64; PAGE_SIZE / 8];
    for (w, b) in words.iter_mut().zip(page.chunks_exact(8)) {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(b);
        // Native order, as the digest's copy of the page into words has.
        *w = u64::from_ne_bytes(bytes);
    }
    term(gfn, &words)
}

/// The digest term of a non-zero page `gfn` read as words.
pub(super) fn term(gfn: u64, words: &[u64; PAGE_SIZE / 8]) -> u64 {
    mix(hash_words(words) ^ gfn)
}

/// An all-zero page to compare against.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Whether the page at `p` is all zero.
///
/// # Safety
/// `p` must point to the start of a whole page inside a live mapping.
pub(super) unsafe fn page_is_zero(p: *const u8) -> bool {
    // libc's memcmp is vectorised even in debug builds and reads through a raw
    // pointer, which is sound while the guest writes the page (the answer is
    // then just stale, as any read of live memory is).
    // SAFETY: per this function's contract `p` is a whole page inside a live
    // mapping; ZERO_PAGE is a page-sized static.
    unsafe { libc::memcmp(p.cast(), ZERO_PAGE.as_ptr().cast(), PAGE_SIZE) == 0 }
}

/// The self-check's term ([`DigestKey::page_term`]'s) of the page at `p`,
/// page `page` of RAM block `block`, read through raw pointers (sound
/// while a vCPU writes the page: the term is then of some mix of old and
/// new bytes, and the dirty log has the page sent and hashed again). With
/// AVX-512 the loads are 64 bytes wide and the arithmetic eight words at a
/// time ([`avx512::page_term`]), with AVX2 four ([`avx2::page_term`]);
/// otherwise word by word with volatile loads, which the compiler cannot
/// vectorise. The hash is on every page's path on both hosts.
///
/// # Safety
/// `p` must point to the start of a whole page inside a live mapping.
pub(super) unsafe fn page_term(p: *const u8, key: &DigestKey, block: u16, page: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above); `p` is a whole
        // page inside a live mapping per this function's contract.
        return unsafe { avx512::page_term(p, PAGE_SIZE, key, block, page, Ahead::NextPage) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above); `p` is a whole page
        // inside a live mapping per this function's contract.
        return unsafe { avx2::page_term(p, PAGE_SIZE, key, block, page, Ahead::NextPage) };
    }
    let words = p.cast::<u64>();
    key.term_of_words(block, page, PAGE_SIZE / 8, |i| {
        // SAFETY: `term_of_words` asks only for `i < PAGE_SIZE / 8`, a word
        // of the page, which is page-aligned (so the word is aligned) and
        // inside a live mapping per this function's contract.
        u64::from_le(unsafe { words.add(i).read_volatile() })
    })
}

/// [`DigestKey::page_term`] of `data`, a page the destination received
/// into a buffer of its own: the same term, with AVX-512 or AVX2 where the
/// CPU has it (the core's portable code is what an SSE2-only build of it
/// gets).
pub fn slice_page_term(key: &DigestKey, block: u16, page: u64, data: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above); the `data.len()`
        // bytes at `data.as_ptr()` are a live slice.
        return unsafe {
            avx512::page_term(data.as_ptr(), data.len(), key, block, page, Ahead::Nothing)
        };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above); the `data.len()` bytes
        // at `data.as_ptr()` are a live slice.
        return unsafe {
            avx2::page_term(data.as_ptr(), data.len(), key, block, page, Ahead::Nothing)
        };
    }
    key.page_term(block, page, data)
}

/// Stripes of a page.
#[cfg(target_arch = "x86_64")]
const PAGE_STRIPES: usize = PAGE_SIZE / (8 * STRIPE_WORDS);

/// Copies the page `data` to the page at `dst` and returns its term
/// ([`slice_page_term`]'s of `data`): a destination placing a received
/// page. With AVX-512 each 64 bytes are loaded once for the store and the
/// hash ([`avx512::copy_page_term`]), where a copy and then a hash read
/// the received bytes twice, the second time from wherever the copy left
/// them; otherwise it is the two.
///
/// # Safety
/// `dst` must point to the start of a whole page inside a live, writable
/// mapping, disjoint from `data`.
pub(super) unsafe fn copy_page_term(
    dst: *mut u8,
    data: &[u8; PAGE_SIZE],
    key: &DigestKey,
    block: u16,
    page: u64,
) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above); `data` is a whole
        // page and `dst` one per this function's contract.
        return unsafe { avx512::copy_page_term(dst, data.as_ptr(), key, block, page) };
    }
    // SAFETY: per this function's contract: `dst` is a whole writable page
    // disjoint from `data`, a host buffer.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, PAGE_SIZE) };
    slice_page_term(key, block, page, data)
}

/// What a vector term fetches ahead while it hashes a stripe.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Ahead {
    /// The same stripe of the next page: a page of guest memory, hashed in
    /// a scan that goes on to the next page more often than not (every
    /// page of the first pass). The hardware's prefetchers stop at a page's
    /// end, so each page began with a run of misses: hashing 64 MiB from
    /// memory took 0.50-0.63 us a page without, 0.35-0.42 with (`bench
    /// --case first-touch`), the same in cache.
    NextPage,
    /// Nothing: a buffer whose next page is not what comes next.
    Nothing,
}

#[cfg(target_arch = "x86_64")]
impl Ahead {
    /// Asks for the cache lines of the stripe of words `first .. first +
    /// len` of the page after the one at `p`. A prefetch never faults,
    /// whatever is mapped there.
    #[inline(always)]
    fn fetch(self, p: *const u8, first: usize, len: usize) {
        use core::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        if let Ahead::NextPage = self {
            let next = p.wrapping_add(PAGE_SIZE + 8 * first);
            for line in (0..8 * len).step_by(64) {
                // SAFETY: SSE is part of x86_64; a prefetch is a hint, not
                // an access, so any address is sound.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line).cast()) };
            }
        }
    }
}

/// Adds words `from .. len` at `words` (a stripe's tail, shorter than
/// [`LANES`]) to `sums` one at a time, as the vector forms' loops would
/// have, with key words `k`.
///
/// # Safety
/// The `len` words at `words` (aligned or not) must be inside a live
/// mapping.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn add_tail(
    sums: &mut StripeSums,
    words: *const u64,
    from: usize,
    len: usize,
    k: &[u64; STRIPE_WORDS],
) {
    for (j, &kj) in k.iter().enumerate().take(len).skip(from) {
        // SAFETY: `j < len`: a word of the caller's contract, read
        // unaligned, once, through the raw pointer (guest memory a vCPU
        // may write is never behind a reference).
        let w = u64::from_le(unsafe { words.add(j).read_unaligned() });
        sums.any |= w;
        sums.lanes[j % LANES] = sums.lanes[j % LANES].wrapping_add(nh_word(w, kj));
    }
}

/// The hash with AVX2 intrinsics, equal to [`DigestKey::page_term`] (the
/// tests compare them on random and edge pages).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::{
        __m256i, _mm256_add_epi32, _mm256_add_epi64, _mm256_loadu_si256, _mm256_mul_epu32,
        _mm256_or_si256, _mm256_setzero_si256, _mm256_srli_epi64, _mm256_storeu_si256,
    };
    use livemig_core::digest::{DigestKey, LANES, STRIPE_WORDS, StripeKey, StripeSums};

    use super::Ahead;

    /// The term of the `len` bytes at `p` (a trailing part shorter than a
    /// word ignored, as the core does), stripe by stripe through the
    /// core's [`DigestKey::term_of_stripes`], inlined here so that the
    /// whole page is one function compiled for AVX2.
    ///
    /// # Safety
    /// The CPU must have AVX2, and the `len` bytes at `p` must be inside a
    /// live mapping.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn page_term(
        p: *const u8,
        len: usize,
        key: &DigestKey,
        block: u16,
        page: u64,
        ahead: Ahead,
    ) -> u64 {
        let words = p.cast::<u64>();
        key.term_of_stripes(block, page, len / 8, |first, len, stripe| {
            ahead.fetch(p, first, len);
            // SAFETY: `term_of_stripes` asks for words `first .. first +
            // len` inside `0 .. len / 8` of the caller's bytes.
            unsafe { stripe_sums(words.add(first), len, stripe) }
        })
    }

    /// The sums of the `len` words (at most [`STRIPE_WORDS`]) at `words`,
    /// eight at a time (lanes 0-3 and 4-7 in a vector each), a tail
    /// shorter than [`LANES`] words one at a time.
    ///
    /// # Safety
    /// The CPU must have AVX2, and the `len` words at `words` (aligned or
    /// not) must be inside a live mapping.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn stripe_sums(words: *const u64, len: usize, key: &StripeKey) -> StripeSums {
        let len = len.min(STRIPE_WORDS);
        let k = key.words();
        let zero = _mm256_setzero_si256();
        let (mut low, mut high, mut any) = (zero, zero, zero);
        let runs = len / LANES;
        for at in (0..runs).map(|r| r * LANES) {
            // SAFETY: words `at .. at + 8` are inside the `len` words of
            // the caller's contract; the loads are unaligned ones. Guest
            // memory a vCPU may write is read through the raw pointer, no
            // reference to it made: a load reads some mix of old and new
            // bytes, and each word is loaded once.
            let (w0, w1) = unsafe {
                (
                    _mm256_loadu_si256(words.add(at).cast()),
                    _mm256_loadu_si256(words.add(at + 4).cast()),
                )
            };
            // SAFETY: `at + 8 <= len <= STRIPE_WORDS`, the key's length,
            // so the four words from `at` and from `at + 4` are in it.
            let (k0, k1) = unsafe {
                (
                    _mm256_loadu_si256(k.as_ptr().add(at).cast()),
                    _mm256_loadu_si256(k.as_ptr().add(at + 4).cast()),
                )
            };
            any = _mm256_or_si256(any, _mm256_or_si256(w0, w1));
            low = _mm256_add_epi64(low, nh(w0, k0));
            high = _mm256_add_epi64(high, nh(w1, k1));
        }
        let mut sums = StripeSums {
            lanes: lanes(low, high),
            any: lanes(any, zero).iter().fold(0, |a, w| a | w),
        };
        // SAFETY: words `runs * LANES .. len` are the caller's.
        unsafe { super::add_tail(&mut sums, words, runs * LANES, len, k) };
        sums
    }

    /// [`nh_word`](livemig_core::digest::nh_word) of four words: the 32-bit halves plus the key's, the
    /// low half times the high one (`vpmuludq` multiplies the low 32 bits
    /// of each 64-bit lane), plus the keyed word.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn nh(w: __m256i, k: __m256i) -> __m256i {
        let keyed = _mm256_add_epi32(w, k);
        let product = _mm256_mul_epu32(keyed, _mm256_srli_epi64::<32>(keyed));
        _mm256_add_epi64(product, keyed)
    }

    /// The eight lanes of two vectors, lanes 0-3 from `low`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn lanes(low: __m256i, high: __m256i) -> [u64; LANES] {
        let mut out = [0u64; LANES];
        // SAFETY: `out` is 64 bytes, two unaligned stores' width.
        unsafe {
            _mm256_storeu_si256(out.as_mut_ptr().cast(), low);
            _mm256_storeu_si256(out.as_mut_ptr().add(4).cast(), high);
        }
        out
    }
}

/// The hash with AVX-512F intrinsics: [`avx2`]'s, with the eight lanes
/// in one register (equal to [`DigestKey::page_term`] too; the tests
/// compare all three).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::arch::x86_64::{
        __m512i, _mm512_add_epi32, _mm512_add_epi64, _mm512_loadu_si512, _mm512_mul_epu32,
        _mm512_or_si512, _mm512_reduce_or_epi64, _mm512_setzero_si512, _mm512_srli_epi64,
        _mm512_storeu_si512,
    };
    use livemig_core::digest::{DigestKey, LANES, STRIPE_WORDS, StripeKey, StripeSums};

    use std::ptr;

    use super::{Ahead, PAGE_SIZE, PAGE_STRIPES};

    /// The term of the `len` bytes at `p`, as [`super::avx2::page_term`]
    /// (a whole page by [`page_sums`]).
    ///
    /// # Safety
    /// The CPU must have AVX-512F, and the `len` bytes at `p` must be
    /// inside a live mapping.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn page_term(
        p: *const u8,
        len: usize,
        key: &DigestKey,
        block: u16,
        page: u64,
        ahead: Ahead,
    ) -> u64 {
        let words = p.cast::<u64>();
        if len == PAGE_SIZE {
            // SAFETY: the CPU has AVX-512F and the page's bytes are live
            // per this function's contract.
            let sums =
                unsafe { page_sums::<false>(words, ptr::null_mut(), key.stripe_key(), ahead) };
            return term_of_page_sums(key, block, page, &sums);
        }
        key.term_of_stripes(block, page, len / 8, |first, len, stripe| {
            ahead.fetch(p, first, len);
            // SAFETY: `term_of_stripes` asks for words `first .. first +
            // len` inside `0 .. len / 8` of the caller's bytes.
            unsafe { stripe_sums(words.add(first), len, stripe) }
        })
    }

    /// Copies the page at `src` to the page at `dst` and returns its term,
    /// each 64 bytes loaded once for the store and the hash.
    ///
    /// # Safety
    /// The CPU must have AVX-512F; the page at `src` must be inside a live
    /// mapping, the page at `dst` inside a live, writable one, the two
    /// disjoint.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn copy_page_term(
        dst: *mut u8,
        src: *const u8,
        key: &DigestKey,
        block: u16,
        page: u64,
    ) -> u64 {
        // SAFETY: per this function's contract.
        let sums =
            unsafe { page_sums::<true>(src.cast(), dst.cast(), key.stripe_key(), Ahead::Nothing) };
        term_of_page_sums(key, block, page, &sums)
    }

    /// The term of a page from its stripes' sums.
    #[inline]
    fn term_of_page_sums(
        key: &DigestKey,
        block: u16,
        page: u64,
        sums: &[StripeSums; PAGE_STRIPES],
    ) -> u64 {
        key.term_of_stripes(block, page, PAGE_SIZE / 8, |first, _, _| {
            sums.get(first / STRIPE_WORDS).copied().unwrap_or_default()
        })
    }

    /// The sums of every stripe of the page at `words`, word position by
    /// word position: each key vector is loaded once for all the page's
    /// stripes (a stripe at a time loads one key vector per data vector),
    /// and the stripes' sums are independent chains, where a stripe at a
    /// time has one. A page's term in cache costs a quarter less so
    /// (`bench --case first-touch`, docs/benchmarks.md). The next page's
    /// lines are asked for in the order this page's are read. With `COPY`,
    /// each vector loaded is also stored at the same offset from `copy`:
    /// a destination's copy into guest memory and its hash in one read.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, and the page at `words` must be inside a
    /// live mapping; with `COPY`, the page at `copy` inside a live,
    /// writable one, disjoint from it (without, `copy` is not used).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn page_sums<const COPY: bool>(
        words: *const u64,
        copy: *mut u64,
        key: &StripeKey,
        ahead: Ahead,
    ) -> [StripeSums; PAGE_STRIPES] {
        let k = key.words();
        let zero = _mm512_setzero_si512();
        let (mut sums, mut any) = ([zero; PAGE_STRIPES], zero);
        for at in (0..STRIPE_WORDS / LANES).map(|r| r * LANES) {
            // SAFETY: `at + 8 <= STRIPE_WORDS`, the key's length.
            let kw = unsafe { _mm512_loadu_si512(k.as_ptr().add(at).cast()) };
            for (stripe, sum) in sums.iter_mut().enumerate() {
                let first = stripe * STRIPE_WORDS + at;
                ahead.fetch(words.cast(), first, LANES);
                // SAFETY: words `first .. first + 8` are inside the page
                // (`first + 8 <= PAGE_STRIPES * STRIPE_WORDS`), read with
                // one unaligned load through the raw pointer, as in
                // `stripe_sums`.
                let w = unsafe { _mm512_loadu_si512(words.add(first).cast()) };
                if COPY {
                    // SAFETY: the same words of the page at `copy`, live
                    // and writable per this function's contract; an
                    // unaligned store through the raw pointer (guest
                    // memory is never behind a reference).
                    unsafe { _mm512_storeu_si512(copy.add(first).cast(), w) };
                }
                any = _mm512_or_si512(any, w);
                *sum = _mm512_add_epi64(*sum, nh(w, kw));
            }
        }
        // The OR of the whole page on every stripe: the core ORs them.
        let any = _mm512_reduce_or_epi64(any) as u64;
        sums.map(|v| {
            let mut lanes = [0u64; LANES];
            // SAFETY: `lanes` is 64 bytes, one unaligned store's width.
            unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), v) };
            StripeSums { lanes, any }
        })
    }

    /// The sums of the `len` words (at most [`STRIPE_WORDS`]) at `words`,
    /// eight at a time (lane `j` of the vector is lane `j` of the sums),
    /// a tail shorter than [`LANES`] words one at a time.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, and the `len` words at `words` (aligned
    /// or not) must be inside a live mapping.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn stripe_sums(words: *const u64, len: usize, key: &StripeKey) -> StripeSums {
        const _: () = assert!(LANES == 8, "one 512-bit vector holds the lanes");
        let len = len.min(STRIPE_WORDS);
        let k = key.words();
        let (mut sums, mut any) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let runs = len / LANES;
        for at in (0..runs).map(|r| r * LANES) {
            // SAFETY: words `at .. at + 8` are inside the `len` words of
            // the caller's contract, read with one unaligned load through
            // the raw pointer (no reference to guest memory a vCPU may
            // write: the load reads some mix of old and new bytes).
            let w = unsafe { _mm512_loadu_si512(words.add(at).cast()) };
            // SAFETY: `at + 8 <= len <= STRIPE_WORDS`, the key's length.
            let kw = unsafe { _mm512_loadu_si512(k.as_ptr().add(at).cast()) };
            any = _mm512_or_si512(any, w);
            sums = _mm512_add_epi64(sums, nh(w, kw));
        }
        let mut lanes = [0u64; LANES];
        // SAFETY: `lanes` is 64 bytes, one unaligned store's width.
        unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), sums) };
        let mut out = StripeSums {
            lanes,
            any: _mm512_reduce_or_epi64(any) as u64,
        };
        // SAFETY: words `runs * LANES .. len` are the caller's.
        unsafe { super::add_tail(&mut out, words, runs * LANES, len, k) };
        out
    }

    /// [`nh_word`](livemig_core::digest::nh_word) of eight words, as [`super::avx2`]'s `nh` of four.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn nh(w: __m512i, k: __m512i) -> __m512i {
        let keyed = _mm512_add_epi32(w, k);
        let product = _mm512_mul_epu32(keyed, _mm512_srli_epi64::<32>(keyed));
        _mm512_add_epi64(product, keyed)
    }
}

fn hash_words(words: &[u64; PAGE_SIZE / 8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut lanes = [1u64, 2, 3, 4];
    for chunk in words.chunks_exact(4) {
        for (lane, w) in lanes.iter_mut().zip(chunk) {
            *lane = (*lane ^ w).wrapping_mul(K).rotate_left(29);
        }
    }
    lanes.iter().fold(0u64, |a, l| mix(a ^ l).wrapping_add(K))
}

/// splitmix64 finaliser: spreads every input bit over the output.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page-aligned page, as guest memory's pages are.
    #[repr(C, align(4096))]
    struct Aligned([u8; PAGE_SIZE]);

    /// Every way the shim computes a term, which must all be the core's:
    /// over guest memory (the vector form the CPU has, else volatile word
    /// loads), over a received buffer at any alignment, each vector form
    /// the CPU has, and the core's.
    fn terms_agree(key: &DigestKey, page: &[u8; PAGE_SIZE], what: &str) {
        let want = key.page_term(3, 77, page);
        let aligned = Box::new(Aligned(*page));
        // SAFETY: `aligned` is a whole, page-aligned page that lives
        // across the call.
        let got = unsafe { page_term(aligned.0.as_ptr(), key, 3, 77) };
        assert_eq!(got, want, "{what}: guest memory");
        let mut shifted = vec![0u8; PAGE_SIZE + 8];
        for offset in [1, 4, 8] {
            shifted[offset..offset + PAGE_SIZE].copy_from_slice(page);
            let data = &shifted[offset..offset + PAGE_SIZE];
            assert_eq!(
                slice_page_term(key, 3, 77, data),
                want,
                "{what}: a buffer at offset {offset}"
            );
        }
        // Each vector form the CPU has, whichever the dispatch picks.
        #[cfg(target_arch = "x86_64")]
        for (name, has, term) in [
            (
                "AVX-512",
                std::arch::is_x86_feature_detected!("avx512f"),
                avx512::page_term
                    as unsafe fn(*const u8, usize, &DigestKey, u16, u64, Ahead) -> u64,
            ),
            (
                "AVX2",
                std::arch::is_x86_feature_detected!("avx2"),
                avx2::page_term,
            ),
        ] {
            if !has {
                continue;
            }
            for offset in [0, 1, 4, 8] {
                shifted[offset..offset + PAGE_SIZE].copy_from_slice(page);
                for ahead in [Ahead::Nothing, Ahead::NextPage] {
                    // SAFETY: the CPU has the feature (checked above); the
                    // page's bytes at `offset` are inside `shifted`.
                    let got =
                        unsafe { term(shifted[offset..].as_ptr(), PAGE_SIZE, key, 3, 77, ahead) };
                    assert_eq!(got, want, "{what}: {name} at offset {offset}");
                }
            }
        }
        let mut copy = Box::new(Aligned([0x5a; PAGE_SIZE]));
        // SAFETY: `copy` is a whole, writable page, disjoint from `page`.
        let got = unsafe { copy_page_term(copy.0.as_mut_ptr(), page, key, 3, 77) };
        assert_eq!(got, want, "{what}: copied into a page");
        assert!(copy.0 == *page, "{what}: the copy holds the page");
        let words = aligned.0.as_ptr().cast::<u64>();
        let scalar = key.term_of_words(3, 77, PAGE_SIZE / 8, |i| {
            // SAFETY: `i` is a word of the aligned page.
            u64::from_le(unsafe { words.add(i).read_volatile() })
        });
        assert_eq!(scalar, want, "{what}: volatile word loads");
    }

    #[test]
    fn the_vector_term_is_the_cores_on_random_and_edge_pages() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for seed in [0, 1, 0x0123_4567_89ab_cdef, u64::MAX] {
            let key = DigestKey::new(seed);
            terms_agree(&key, &[0; PAGE_SIZE], "zero page");
            terms_agree(&key, &[0xff; PAGE_SIZE], "all ones");
            for _ in 0..8 {
                let page: [u8; PAGE_SIZE] = core::array::from_fn(|_| next() as u8);
                terms_agree(&key, &page, "random page");
            }
            // Words whose halves plus the key's are 0 or all ones mod
            // 2^32: the products' edge cases, in every word position.
            let k = key.stripe_key().words();
            let mut page = [0u8; PAGE_SIZE];
            for (i, w) in page.chunks_exact_mut(8).enumerate() {
                let kw = k[i % k.len()];
                let lo = (kw as u32).wrapping_neg().wrapping_sub((i % 2) as u32);
                let hi = ((kw >> 32) as u32)
                    .wrapping_neg()
                    .wrapping_sub((i % 3 / 2) as u32);
                w.copy_from_slice(&(u64::from(lo) | u64::from(hi) << 32).to_le_bytes());
            }
            terms_agree(&key, &page, "halves keyed to 0 and 2^32 - 1");
        }
        // One bit set, in each word position and each of its 64 bits.
        let key = DigestKey::new(42);
        for word in 0..PAGE_SIZE / 8 {
            for bit in 0..64 {
                let mut page = [0u8; PAGE_SIZE];
                page[8 * word + bit / 8] = 1 << (bit % 8);
                terms_agree(&key, &page, "one bit");
            }
        }
    }
}
