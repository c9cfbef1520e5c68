//! The source's half of the self-check: booking each page as its batch is
//! handed out, the optional audit of memory at the stop, and the Digest
//! record before the end of the stream (see [`crate::digest`]).

use super::{
    EndReason, POPULATED_WINDOW, PageReader, SourceAction, SourceEngine, SourceError, Step,
    Violation,
};
use crate::digest::{DigestBooks, DigestKey, Verification, locate_parts};
use crate::status::MigrationStatus;
use crate::wire::{self, EncodeError, PageRange};

/// What a verifying source keeps: the key, the books and whether to
/// audit.
pub(super) struct Verify<'a> {
    pub key: DigestKey,
    pub books: &'a mut [DigestBooks<'a>],
    pub audit: bool,
}

impl<'a> Verify<'a> {
    /// The first page whose memory no longer matches its books, if any.
    /// With the guest stopped, [`PageReader::populated`] is exact: a page
    /// never populated is zero, so its term is 0 and it is checked without
    /// being read (reading would fault it in).
    fn audit(&self, ram: &impl PageReader) -> Option<(u16, u64)> {
        let mut mask = [0u64; POPULATED_WINDOW / 64];
        for (block, books) in self.books.iter().enumerate() {
            let block = block as u16;
            let pages = books.pages();
            let mut first = 0;
            while first < pages {
                ram.populated(block, first, &mut mask);
                let end = pages.min(first + POPULATED_WINDOW as u64);
                for page in first..end {
                    let bit = page - first;
                    let populated = mask
                        .get((bit / 64) as usize)
                        .is_none_or(|w| w >> (bit % 64) & 1 == 1);
                    let term = if populated {
                        ram.page_term(block, page, &self.key)
                    } else {
                        0
                    };
                    if books.term(page) != Some(term) {
                        return Some((block, page));
                    }
                }
                first = end;
            }
        }
        None
    }
}

/// In a verifying postcopy, the key and the books of `block`: each normal
/// page's term travels in its batch's header
/// ([`BatchFlags::TERMS`](crate::wire::BatchFlags::TERMS)), for the
/// destination to check the page before it installs it: the scan's term
/// for a background page, a requested page hashed as the header is
/// encoded. The guest is stopped here, so the bytes hashed are the bytes
/// written after the header, and the term is booked at once.
pub(super) fn postcopy_books<'v, 'a>(
    verify: &'v mut Option<Verify<'a>>,
    status: MigrationStatus,
    block: usize,
) -> Option<(DigestKey, &'v mut DigestBooks<'a>)> {
    if status != MigrationStatus::PostcopyActive {
        return None;
    }
    let v = verify.as_mut()?;
    let key = v.key;
    v.books.get_mut(block).map(|b| (key, b))
}

/// Books a zero entry as it goes into a batch (a free function, so that
/// the scan can call it while it holds the tracking entry); normal pages
/// are booked as their batch is encoded ([`book_batch`]).
pub(super) fn book_zero(verify: &mut Option<Verify<'_>>, block: u16, page: u64) {
    if let Some(b) = verify
        .as_mut()
        .and_then(|v| v.books.get_mut(usize::from(block)))
    {
        b.record(page, 0);
    }
}

/// Books the normal `pages` of a batch of `block` as it is handed out,
/// with `terms` (one per page, same order) when the scan hashed them as it
/// read them, or else with their terms as `ram` reads them now. The caller
/// writes the pages after this; see [`crate::digest`] for why the last
/// term booked for a page is still that of the bytes last sent for it.
pub(super) fn book_batch(
    verify: &mut Option<Verify<'_>>,
    ram: &impl PageReader,
    block: u16,
    pages: &[u64],
    terms: Option<&[u64]>,
) {
    let Some(v) = verify.as_mut() else {
        return;
    };
    let Some(b) = v.books.get_mut(usize::from(block)) else {
        return;
    };
    for (i, &page) in pages.iter().enumerate() {
        let term = terms
            .and_then(|t| t.get(i).copied())
            .unwrap_or_else(|| ram.page_term(block, page, &v.key));
        b.record(page, term);
    }
}

impl<'a> SourceEngine<'a> {
    /// Verifies this migration: every page sent is booked in `books` (one
    /// per block of the layout, built with [`DigestBooks::new`]) under
    /// `key` (pick its seed at random per migration), the key goes out in
    /// the preamble and the per-block digest before the end of the stream,
    /// and the destination compares it before its guest may start. Call
    /// before [`start`](Self::start).
    pub fn verify_with(
        &mut self,
        key: DigestKey,
        books: &'a mut [DigestBooks<'a>],
    ) -> Result<(), SourceError> {
        if self.step != Step::NotStarted {
            return Err(self.unexpected("verify_with"));
        }
        if books.len() != self.layout.len()
            || books
                .iter()
                .zip(self.tracking.iter())
                .any(|(b, t)| b.pages() != t.pages)
        {
            return Err(SourceError::DigestBooksMismatch);
        }
        self.verify = Some(Verify {
            key,
            books,
            audit: false,
        });
        self.stats.verification = Verification::Pending;
        Ok(())
    }

    /// With `audit`, the source reads all of its memory again at the stop
    /// (vCPUs stopped, before the digest goes out) and compares every
    /// page's term with its books: a page that changed after its last send
    /// without a dirty bit (a dirty log that missed a write) fails the
    /// migration, naming block and page, and the guest runs on here. It
    /// costs a hash of all RAM inside the stop. Needs
    /// [`verify_with`](Self::verify_with) first.
    pub fn audit_at_stop(&mut self, audit: bool) -> Result<(), SourceError> {
        match &mut self.verify {
            Some(v) if self.step == Step::NotStarted => {
                v.audit = audit;
                Ok(())
            }
            _ => Err(self.unexpected("audit_at_stop")),
        }
    }

    /// The audit (when asked for) and the Digest record, encoded into
    /// scratch ahead of the end of the stream; returns the bytes written.
    /// `Err(None)` when the audit failed (the migration has failed).
    pub(super) fn encode_digest(
        &mut self,
        ram: &impl PageReader,
    ) -> Result<usize, Option<EncodeError>> {
        let Some(v) = &self.verify else {
            return Ok(0);
        };
        if v.audit
            && let Some((block, page)) = v.audit(ram)
        {
            self.stats.verification = Verification::AuditFailed { block, page };
            self.fail(
                EndReason::LocalFailure,
                format_args!(
                    "verification failed: page {page} of RAM block {block} changed after \
                         it was last sent and its dirty bit was never set (a dirty-log miss); \
                         the guest runs on here"
                ),
            );
            return Err(None);
        }
        let sums = v.books.iter().map(DigestBooks::sum);
        wire::encode_digest(self.scratch, v.books.len(), sums).map_err(Some)
    }

    /// The destination found the digest of `block` unequal and asks for
    /// the sums of the parts of `range` (it locates the first mismatching
    /// page, see [`crate::digest`]): answered at the next poll, from the
    /// books alone.
    pub(super) fn digest_query(&mut self, block: u16, range: PageRange) {
        let in_block = self
            .verify
            .as_ref()
            .and_then(|v| v.books.get(usize::from(block)))
            .is_some_and(|b| {
                range.count > 0
                    && range
                        .first
                        .checked_add(range.count)
                        .is_some_and(|end| end <= b.pages())
            });
        if !in_block || self.step != Step::AwaitLoaded {
            self.fail(
                EndReason::Protocol(Violation::UnexpectedDigestMessage),
                format_args!(
                    "the destination asked for the digest sums of {} pages from {} of RAM block \
                     {block}, out of place or outside the block",
                    range.count, range.first
                ),
            );
            return;
        };
        if !matches!(self.stats.verification, Verification::Mismatch { .. }) {
            self.stats.verification = Verification::Mismatch { block, page: None };
        }
        self.step = Step::DigestRanges(block, range);
    }

    /// The destination named `block` (and `page` of it, once located) as
    /// the first whose digest differs; its SHUT follows.
    pub(super) fn digest_mismatch(&mut self, block: u16, page: Option<u64>) {
        // After the digest went out: waiting for LOADED (precopy) or for
        // the end's confirmation (postcopy, or an older destination); or
        // in postcopy, where the destination checks each page as it
        // installs it.
        let in_place = matches!(self.step, Step::AwaitLoaded | Step::AwaitShut)
            || (self.status == MigrationStatus::PostcopyActive && page.is_some());
        if self.verify.is_none() || !in_place {
            self.fail(
                EndReason::Protocol(Violation::UnexpectedDigestMessage),
                format_args!("the destination reported a digest mismatch out of place"),
            );
            return;
        }
        self.stats.verification = Verification::Mismatch { block, page };
    }

    /// The answer to the destination's digest query for `range` of
    /// `block`: the sums of its parts, from the books.
    pub(super) fn digest_ranges(&mut self, block: u16, range: PageRange) -> SourceAction<'_> {
        self.step = Step::AwaitLoaded;
        let books = self
            .verify
            .as_ref()
            .and_then(|v| v.books.get(usize::from(block)));
        let sums = locate_parts(range).map(|part| books.map_or(0, |b| b.range_sum(part)));
        let len = match wire::encode_digest_ranges(self.scratch, block, range, sums) {
            Ok(len) => len,
            Err(e) => return self.encode_failed(e),
        };
        self.count_sent(len as u64, 0);
        // The confirm timeout runs again, for the next query or LOADED.
        self.end.sent_at = self.now;
        SourceAction::Send(&self.scratch[..len])
    }

    /// The destination confirmed the end of a stream that carried the
    /// digest: it compared equal.
    pub(super) fn digest_confirmed(&mut self) {
        if self.verify.is_some() && self.stats.verification == Verification::Pending {
            self.stats.verification = Verification::Verified;
        }
    }
}
