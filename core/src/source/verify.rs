//! The source's half of the self-check: booking each page as it is put in
//! a batch, the optional audit of memory at the stop, and the Digest
//! record before the end of the stream (see [`crate::digest`]).

use super::{EndReason, PageReader, SourceEngine, SourceError, Step};
use crate::digest::{DigestBooks, DigestKey, Verification};
use crate::wire::{self, EncodeError};

/// What a verifying source keeps: the key, the books, whether to audit.
pub(super) struct Verify<'a> {
    pub key: DigestKey,
    pub books: &'a mut [DigestBooks<'a>],
    pub audit: bool,
}

impl<'a> Verify<'a> {
    /// Books page `page` of `block` as it goes into a batch: a zero entry
    /// (or a page that reads as zero) is the zero term, any other page's
    /// term is read from memory now, after its dirty-log clear.
    pub fn book(&mut self, ram: &impl PageReader, block: u16, page: u64, zero: bool) {
        let term = if zero {
            0
        } else {
            ram.page_term(block, page, &self.key)
        };
        if let Some(b) = self.books.get_mut(usize::from(block)) {
            b.record(page, term);
        }
    }

    /// The first page whose memory no longer matches its books, if any.
    fn audit(&self, ram: &impl PageReader) -> Option<(u16, u64)> {
        for (block, books) in self.books.iter().enumerate() {
            let block = block as u16;
            for page in 0..books.pages() {
                if books.term(page) != Some(ram.page_term(block, page, &self.key)) {
                    return Some((block, page));
                }
            }
        }
        None
    }
}

/// Books `page` when the source verifies (a free function, so that the
/// scan can call it while it holds the tracking entry).
pub(super) fn book(
    verify: &mut Option<Verify<'_>>,
    ram: &impl PageReader,
    block: u16,
    page: u64,
    zero: bool,
) {
    if let Some(v) = verify {
        v.book(ram, block, page, zero);
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
        if books.len() != self.layout.len() {
            return Err(SourceError::BlockCountMismatch {
                layout: self.layout.len(),
                tracking: books.len(),
            });
        }
        if let Some(i) = books
            .iter()
            .zip(self.tracking.iter())
            .position(|(b, t)| b.pages() != t.pages)
        {
            return Err(SourceError::TrackingMismatch { block: i as u16 });
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
        if v.audit {
            if let Some((block, page)) = v.audit(ram) {
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
        }
        let sums = v.books.iter().map(DigestBooks::sum);
        wire::encode_digest(self.scratch, v.books.len(), sums).map_err(Some)
    }

    /// The destination confirmed the end of a stream that carried the
    /// digest: it compared equal.
    pub(super) fn digest_confirmed(&mut self) {
        if self.verify.is_some() && self.stats.verification == Verification::Pending {
            self.stats.verification = Verification::Verified;
        }
    }
}
