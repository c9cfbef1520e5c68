//! The integrity digest of guest memory, page by page.
//!
//! The digest of a memory is the wrapping sum of one term per non-zero
//! page, the term mixing the page's contents with its guest page number.
//! A sum does not depend on the order pages are visited in, so the source
//! can hash its stopped memory in any order, and a destination can add up
//! the terms of the pages it installed as it installed them.

use livemig_core::digest::DigestKey;

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

/// The self-check's term ([`DigestKey::term_of_words`]) of the page at
/// `p`, page `page` of RAM block `block`, read with volatile word loads
/// (sound while a vCPU writes the page: the term is then of some mix of
/// old and new bytes, and the dirty log has the page sent and hashed
/// again).
///
/// # Safety
/// `p` must point to the start of a whole page inside a live mapping.
pub(super) unsafe fn page_term(p: *const u8, key: &DigestKey, block: u16, page: u64) -> u64 {
    let words = p.cast::<u64>();
    key.term_of_words(block, page, PAGE_SIZE / 8, |i| {
        // SAFETY: `term_of_words` asks only for `i < PAGE_SIZE / 8`, a word
        // of the page, which is page-aligned (so the word is aligned) and
        // inside a live mapping per this function's contract.
        u64::from_le(unsafe { words.add(i).read_volatile() })
    })
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
