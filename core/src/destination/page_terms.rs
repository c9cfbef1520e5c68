//! Postcopy's check of each page as it is installed: a verifying source
//! sends its digest term of every normal page with the page
//! ([`BatchFlags::TERMS`]), and the destination compares it with its own
//! term of the bytes before it places any page of the batch.
//!
//! In precopy a mismatch can wait for the digest at the end, since the
//! guest only starts once it compared equal. In postcopy the guest already
//! runs here and would read a bad page the moment it is placed, so the
//! check comes first: a page whose terms differ is never installed, the
//! migration fails with block and page named (to the source too, by a
//! DIGEST_MISMATCH), and the destination guest stays paused on the page it
//! waits for. The source's copy is stale by then (the guest ran here), so
//! neither may simply run on: the failure is the one any broken postcopy
//! has. Asking the source for the page again before failing is not yet
//! done.

use super::{DestError, DestinationHost, Loader};
use crate::status::MigrationStatus;
use crate::wire::{BatchFlags, PageBatch};

impl Loader<'_> {
    /// Checks every normal page of `batch` against the source's term for
    /// it, before a page of the batch is placed. A batch without terms is
    /// refused where they are due: in postcopy, when this destination
    /// verifies. Terms without a key cannot be checked and are refused.
    pub(super) fn check_page_terms<H: DestinationHost>(
        &mut self,
        host: &H,
        batch: &PageBatch<'_>,
    ) -> Result<(), DestError> {
        let carries = batch.flags().contains(BatchFlags::TERMS);
        let Some(key) = self.key.filter(|_| self.books.is_some()) else {
            return if carries {
                Err(DestError::DigestOutOfOrder(
                    "page terms without a digest key",
                ))
            } else {
                Ok(())
            };
        };
        if !carries {
            let normal = batch.pages().any(|(_, data)| data.is_some());
            return if self.status == MigrationStatus::PostcopyActive && normal {
                Err(DestError::PageTermsMissing {
                    block: batch.block(),
                })
            } else {
                Ok(())
            };
        }
        let block = batch.block();
        let normal = batch
            .pages()
            .filter_map(|(entry, data)| Some((entry, data?)));
        for ((entry, data), theirs) in normal.zip(batch.terms()) {
            if host.page_term(&key, block, entry.index, data) != theirs {
                let page = entry.index;
                return Err(self.page_mismatch(block, page));
            }
        }
        Ok(())
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
