//! Postcopy's check of each page as it is installed: a verifying source
//! sends its digest term of every normal page with the page
//! ([`BatchFlags::TERMS`]), and the destination compares it with its own
//! term of the bytes before it places any page of the batch.
//!
//! In precopy a mismatch can wait for the digest at the end, since the
//! guest only starts once it compared equal. In postcopy the guest already
//! runs here and would read a bad page the moment it is placed, so the
//! check comes first: a page whose terms differ is never installed.
//! The source still holds the page as it was at the stop (its guest stays
//! stopped), so the destination asks for it again, as a vCPU's fault would,
//! and installs the copy that checks out; a vCPU waiting on it waits on.
//! Failing instead would lose the guest: the source's copy is stale once
//! the guest ran here. A page damaged twice, more than
//! [`MAX_REFETCHES_PER_BATCH`] in one batch or more than
//! [`MAX_REFETCHED_PAGES`] in a migration means a link that damages what
//! it carries, not a stray flip: the migration then fails with block and
//! page named (to the source too, by a DIGEST_MISMATCH), the failure any
//! broken postcopy has. The source ends its stream only at the PONG to a
//! ping it sends after its last page
//! ([`POSTCOPY_END_PING`](crate::source::POSTCOPY_END_PING)), which this
//! engine answers after it checked every page before it, so a refusal
//! reaches the source in time.

use super::{DestError, DestinationHost, Loader};
use crate::return_path::RpMessage;
use crate::status::MigrationStatus;
use crate::time::Instant;
use crate::wire::{BatchFlags, PageBatch};

/// Pages of one batch a postcopy destination may refuse and ask for again.
pub const MAX_REFETCHES_PER_BATCH: usize = 4;

/// Pages a postcopy destination may ask for again in one migration, each
/// once.
pub const MAX_REFETCHED_PAGES: usize = 16;

/// The pages of one batch refused by their terms, to be skipped when it is
/// placed (each asked for again).
pub(super) type Refused = heapless::Vec<u64, MAX_REFETCHES_PER_BATCH>;

impl Loader<'_> {
    /// Checks every normal page of `batch` against the source's term for
    /// it, before a page of the batch is placed: the pages refused, each
    /// asked for again. A batch without terms is refused where they are
    /// due: in postcopy, when this destination verifies. Terms without a
    /// key cannot be checked and are refused.
    pub(super) fn check_page_terms<H: DestinationHost>(
        &mut self,
        now: Instant,
        host: &H,
        batch: &PageBatch<'_>,
    ) -> Result<Refused, DestError> {
        let mut refused = Refused::new();
        let carries = batch.flags().contains(BatchFlags::TERMS);
        let Some(key) = self.key.filter(|_| self.books.is_some()) else {
            return if carries {
                Err(DestError::DigestOutOfOrder(
                    "page terms without a digest key",
                ))
            } else {
                Ok(refused)
            };
        };
        if !carries {
            let normal = batch.pages().any(|(_, data)| data.is_some());
            return if self.status == MigrationStatus::PostcopyActive && normal {
                Err(DestError::PageTermsMissing {
                    block: batch.block(),
                })
            } else {
                Ok(refused)
            };
        }
        let block = batch.block();
        let normal = batch
            .pages()
            .filter_map(|(entry, data)| Some((entry, data?)));
        for ((entry, data), theirs) in normal.zip(batch.terms()) {
            if host.page_term(&key, block, entry.index, data) == theirs {
                continue;
            }
            let page = entry.index;
            if !self.refetch(now, block, page, &mut refused)? {
                return Err(self.page_mismatch(block, page));
            }
        }
        Ok(refused)
    }

    /// Asks for page `page` of `block` again, its copy refused: false when
    /// it may not be (see the module's documentation), which fails the
    /// migration.
    fn refetch(
        &mut self,
        now: Instant,
        block: u16,
        page: u64,
        refused: &mut Refused,
    ) -> Result<bool, DestError> {
        // Another copy is installed already (a preempt channel's copy
        // damaged after the main stream's arrived): the batch skips it.
        if self.placed_already(block, page) {
            return Ok(true);
        }
        if self.status != MigrationStatus::PostcopyActive
            || self.refetched.contains(&(block, page))
            || self.refetched.is_full()
            || refused.push(page).is_err()
        {
            return Ok(false);
        }
        let _ = self.refetched.push((block, page));
        self.stats.postcopy_refetched += 1;
        // Outstanding as a requested page is (a vCPU may wait on it, the
        // request timeout applies), but asked for with RESEND_PAGE: the
        // source sends a requested page only if it has not sent it yet.
        if let Some(t) = self
            .postcopy
            .as_deref_mut()
            .and_then(|t| t.get_mut(usize::from(block)))
            && t.request(page)
        {
            self.outstanding += 1;
        }
        self.waiting_since.get_or_insert(now);
        self.queue(&RpMessage::ResendPage { block, page })?;
        Ok(true)
    }

    /// Page `page` of `block` arrived with other contents than the source
    /// sent: recorded, told to the source, and the error that fails the
    /// migration.
    fn page_mismatch(&mut self, block: u16, page: u64) -> DestError {
        match self.mismatch(block, Some(page)) {
            DestError::DigestMismatch { .. } => DestError::PageTermMismatch { block, page },
            other => other,
        }
    }
}
