//! The scan over the dirty bitmaps: where the pass is, the batch being
//! assembled, how many dirty bytes are still to send, and the scan itself
//! (clears before reads, batches, the end of a pass).

use super::batch::BatchBuilder;
use super::{
    BATCH_PAGES, POPULATED_WINDOW, PageReader, SourceAction, SourceEngine, Step, SyncKind, verify,
};
use crate::capabilities::Capabilities;
use crate::status::MigrationStatus;
use crate::wire::{self, BatchFlags};

/// The source's position in its pass over the RAM blocks.
pub(super) struct Scan {
    /// Block the pass is in.
    pub block: usize,
    /// Next page of `block` to look at.
    pub page: u64,
    /// The page batch being assembled.
    pub batch: Batch,
    /// Bytes of guest memory marked dirty and not yet sent.
    pub remaining_bytes: u64,
    /// True once a whole pass has gone by: every page was sent once.
    pub first_pass_done: bool,
    /// At a postcopy switch during the first pass: the (block, page) from
    /// which nothing was ever sent, so nothing needs discarding.
    pub never_sent_from: Option<(usize, u64)>,
    /// The reader's last answer on which pages are populated.
    pub populated: PopulatedWindow,
}

impl Scan {
    /// A scan at the start of the first pass, with `total` bytes to send.
    pub fn new(total: u64) -> Self {
        Scan {
            block: 0,
            page: 0,
            batch: Batch::new(),
            remaining_bytes: total,
            first_pass_done: false,
            never_sent_from: None,
            populated: PopulatedWindow {
                answered: None,
                mask: [0; POPULATED_WINDOW / 64],
            },
        }
    }

    /// Back to the first page of the first block.
    pub fn rewind(&mut self) {
        self.block = 0;
        self.page = 0;
    }
}

/// The reader's last [`PageReader::populated`] answer, for one window of
/// one block. Forgotten ([`PopulatedWindow::forget`]) at every clear and
/// every sync: an answer is only used while no dirty-log reset came after
/// it (see [`PageReader::populated`] for why that makes it safe).
pub(super) struct PopulatedWindow {
    /// The (block, first page) the mask answers for, if it still holds.
    answered: Option<(usize, u64)>,
    mask: [u64; POPULATED_WINDOW / 64],
}

impl PopulatedWindow {
    /// Drops the answer: the next question asks the reader again.
    pub fn forget(&mut self) {
        self.answered = None;
    }

    /// Whether `page` of `block` may hold data, asking `ram` about its
    /// aligned window of `window` pages (a power of two from 64 to
    /// [`POPULATED_WINDOW`], at most the clear chunk) unless the last
    /// answer covers it.
    fn may_hold_data(
        &mut self,
        ram: &impl PageReader,
        block: usize,
        page: u64,
        window: u64,
    ) -> bool {
        let first = page & !(window - 1);
        if self.answered != Some((block, first)) {
            let words = (window / 64) as usize;
            let mask = &mut self.mask[..words];
            ram.populated(block as u16, first, mask);
            self.answered = Some((block, first));
        }
        let bit = page - first;
        self.mask
            .get((bit / 64) as usize)
            .is_none_or(|w| w >> (bit % 64) & 1 == 1)
    }
}

/// Fewest never-populated pages sent as one [`ZeroRun`](wire::ZeroRun)
/// rather than as ZERO entries: the record's 28 bytes against 8 an entry.
pub(super) const MIN_ZERO_RUN: u64 = 8;

/// The page batch being assembled.
pub(super) type Batch = BatchBuilder<BATCH_PAGES>;

impl SourceEngine<'_> {
    /// Scans for dirty pages and returns the next clear or batch.
    /// `live`: the guest runs (precopy iterations) rather than being
    /// stopped for the last pass.
    pub(super) fn next_pages(
        &mut self,
        ram: &impl PageReader,
        live: bool,
    ) -> Option<SourceAction<'_>> {
        if self.throttle.pending {
            return Some(self.throttle_action(self.throttle.percent));
        }
        if self.scan.batch.is_empty() && self.meter.exhausted() {
            return None;
        }
        if live && self.scan.batch.is_empty() {
            if let Some(until) = self.convergence.drain_until {
                if self.now < until {
                    return None;
                }
                self.convergence.drain_until = None;
            }
            // The seeds check convergence before every step, not only at the
            // end of a pass: a sync is cheap and an early switchover saves a
            // whole pass.
            if self.switchover_sync_due() && self.scan.remaining_bytes > 0 {
                return Some(self.begin_sync(SyncKind::Iteration));
            }
            if self.postcopy.requested {
                // Still more than the threshold to send: switch now rather
                // than at the end of the pass (the seeds' check runs before
                // every iteration step too).
                self.begin_switch();
                if self
                    .channels
                    .as_ref()
                    .is_some_and(super::Channels::has_pending)
                {
                    return self.next_channel_message();
                }
                return match self.step {
                    Step::EarlyDiscard => Some(self.next_early_discard()),
                    _ => {
                        self.step = Step::AwaitStopped;
                        Some(SourceAction::StopVcpus)
                    }
                };
            }
        }
        loop {
            let Some(t) = self.tracking.get_mut(self.scan.block) else {
                // End of a pass over all blocks.
                return Some(self.end_of_pass(ram, live));
            };
            if !self.scan.batch.is_empty()
                && usize::from(self.scan.batch.block()) != self.scan.block
            {
                return Some(self.emit_pages(ram));
            }
            let Some(page) = t.dirty.find_next_set(self.scan.page) else {
                self.scan.block += 1;
                self.scan.page = 0;
                continue;
            };
            if !self.vcpus_stopped
                && let Some(chunk) = t.clear.take(page)
            {
                self.scan.page = page;
                self.stats.dirty_log_clears += 1;
                self.scan.populated.forget();
                return Some(SourceAction::ClearDirtyLog {
                    block: self.scan.block as u16,
                    chunk,
                });
            }
            if let Some(run) = self.unpopulated_run(ram, page) {
                if !self.scan.batch.is_empty() {
                    // The batch goes first; the run is found again next.
                    return Some(self.emit_pages(ram));
                }
                return Some(self.emit_zero_run(run));
            }
            // The block the loop's head found, borrowed again after the
            // run check (which needed the whole engine).
            let Some(t) = self.tracking.get_mut(self.scan.block) else {
                continue;
            };
            t.dirty.test_and_clear(page);
            let page_size = 1u64 << t.page_shift;
            self.scan.remaining_bytes = self.scan.remaining_bytes.saturating_sub(page_size);
            self.scan.batch.set_block(self.scan.block as u16);
            match self.verify.as_ref().map(|v| v.key) {
                Some(key) => {
                    let (zero, term) = self.classify(ram, self.scan.block, page, &key);
                    if zero {
                        verify::book_zero(&mut self.verify, self.scan.block as u16, page);
                    }
                    self.scan.batch.push_hashed(page, zero, term);
                }
                None => {
                    let zero = self.sends_as_zero(ram, self.scan.block, page);
                    self.scan.batch.push(page, zero);
                }
            }
            self.scan.page = page + 1;
            if self.scan.batch.is_full() {
                return Some(self.emit_pages(ram));
            }
        }
    }

    /// Whether page `page` of block `block` goes out as a zero page: with
    /// zero-page detection on, a page the reader says was never populated
    /// (counted in `ram.unpopulated`, never read) or one that reads as all
    /// zero.
    ///
    /// Only the first pass asks which pages are populated: every page
    /// dirty after it was written since (so populated), and asking costs
    /// (Linux's pagemap: ~75 ns a populated page here, more than reading
    /// a non-zero page).
    fn sends_as_zero(&mut self, ram: &impl PageReader, block: usize, page: u64) -> bool {
        self.detects_zero_pages()
            && (self.never_populated(ram, block, page) || ram.is_zero_page(block as u16, page))
    }

    /// The run of dirty pages from `page` (dirty, its chunk cleared) that
    /// the reader says were never populated, up to the end of `page`'s
    /// populated window, when it is long enough to go as one
    /// [`ZeroRun`](wire::ZeroRun) ([`MIN_ZERO_RUN`] pages or more).
    ///
    /// Only in the first pass (as [`never_populated`](Self::never_populated))
    /// and before postcopy. With multifd channels the run still goes on
    /// the main stream: its pages were never sent before, and any later
    /// copy of them travels in a later pass, on a channel the destination
    /// only applies after the main stream's flush that ends this pass
    /// (after the run). With postcopy as well, the switch syncs the
    /// channels before its discards, so a run's page dirtied since is
    /// dropped after the run was placed, whichever pass the switch cuts
    /// short. Elsewhere such pages go as ZERO entries of a batch.
    fn unpopulated_run(&mut self, ram: &impl PageReader, page: u64) -> Option<wire::ZeroRun> {
        if self.scan.first_pass_done
            || !self.detects_zero_pages()
            || self.status == MigrationStatus::PostcopyActive
        {
            return None;
        }
        let block = self.scan.block;
        let window = self.populated_window();
        let t = self.tracking.get(block)?;
        let end = ((page | (window - 1)) + 1).min(t.dirty.bits());
        let mut next = page;
        while next < end
            && t.dirty.test(next)
            && !self.scan.populated.may_hold_data(ram, block, next, window)
        {
            next += 1;
        }
        let count = next - page;
        (count >= MIN_ZERO_RUN).then_some(wire::ZeroRun {
            block: block as u16,
            page_shift: t.page_shift,
            range: wire::PageRange { first: page, count },
        })
    }

    /// Sends `run`, never-populated pages of the scan's block, as one
    /// record: taken from the dirty bitmap and booked as zero pages are,
    /// unread.
    fn emit_zero_run(&mut self, run: wire::ZeroRun) -> SourceAction<'_> {
        if let Some(t) = self.tracking.get_mut(usize::from(run.block)) {
            // Every page of the run is dirty and inside the block
            // (`unpopulated_run` found them so): the range cannot fail.
            let _ = t.dirty.clear_range(run.range.first, run.range.count);
        }
        for p in run.range.first..run.range.end() {
            verify::book_zero(&mut self.verify, run.block, p);
        }
        let count = run.range.count;
        self.scan.page = run.range.end();
        self.scan.remaining_bytes = self
            .scan
            .remaining_bytes
            .saturating_sub(count << run.page_shift);
        self.stats.ram.unpopulated += count;
        self.stats.ram.duplicate += count;
        match wire::Record::ZeroRun(run).encode(self.scratch) {
            Ok(len) => {
                self.count_sent(len as u64, count);
                self.meter
                    .record_scanned(count * wire::PAGE_ENTRY_LEN as u64);
                self.refresh_stats();
                SourceAction::Send(&self.scratch[..len])
            }
            Err(e) => self.encode_failed(e),
        }
    }

    /// Pages one [`PageReader::populated`] question covers: at most
    /// [`POPULATED_WINDOW`], never across a clear chunk (an answer must
    /// postdate its pages' clear).
    fn populated_window(&self) -> u64 {
        let chunk = 1u64 << self.config.parameters.clear_bitmap_shift;
        chunk.min(POPULATED_WINDOW as u64)
    }

    fn detects_zero_pages(&self) -> bool {
        self.config
            .capabilities
            .contains(Capabilities::ZERO_PAGE_DETECTION)
    }

    /// In the first pass, whether the reader says page `page` of block
    /// `block` was never populated (counted in `ram.unpopulated`).
    fn never_populated(&mut self, ram: &impl PageReader, block: usize, page: u64) -> bool {
        if self.scan.first_pass_done {
            return false;
        }
        let window = self.populated_window();
        if self.scan.populated.may_hold_data(ram, block, page, window) {
            return false;
        }
        self.stats.ram.unpopulated += 1;
        true
    }

    /// A verifying scan's read of page `page` of block `block`: whether it
    /// goes out as a zero page, and its term. One pass over the page both
    /// hashes it and finds it zero (its term is 0 exactly when it is all
    /// zero, [`DigestKey::page_term`](crate::digest::DigestKey::page_term)),
    /// so the term costs the zero check's read, not a read of its own
    /// after the send. A page the reader says was never populated is
    /// neither read nor hashed: zero, term 0. Without zero-page detection
    /// every page goes out whole, a zero one with term 0.
    ///
    /// The term is of the page as it is now, after its dirty-log clear;
    /// the caller writes it later. Why the books still end up with the
    /// term of the bytes the destination last received: see
    /// [`crate::digest`] ("Who hashes what").
    fn classify(
        &mut self,
        ram: &impl PageReader,
        block: usize,
        page: u64,
        key: &crate::digest::DigestKey,
    ) -> (bool, u64) {
        let detect = self.detects_zero_pages();
        if detect && self.never_populated(ram, block, page) {
            return (true, 0);
        }
        let term = ram.page_term(block as u16, page, key);
        (detect && term == 0, term)
    }

    pub(super) fn end_of_pass(&mut self, ram: &impl PageReader, live: bool) -> SourceAction<'_> {
        if !self.scan.batch.is_empty() {
            return self.emit_pages(ram);
        }
        self.scan.rewind();
        if let Some(ch) = self.channels.as_mut() {
            ch.request_sync();
        }
        self.stats.iterations += 1;
        self.scan.first_pass_done = true;
        self.step = if live {
            Step::Sync(SyncKind::Iteration)
        } else if self.status == MigrationStatus::PostcopyActive {
            self.postcopy_end_step()
        } else {
            Step::SaveDevices
        };
        // Mark the iteration boundary on the stream: the destination counts
        // passes, and a reader of a capture sees where each pass ends.
        self.emit_batch(ram, BatchFlags::END_OF_ITERATION)
    }

    /// The batch being assembled, on a multifd channel or the main stream.
    fn emit_pages(&mut self, ram: &impl PageReader) -> SourceAction<'_> {
        if self.channels.is_some() {
            self.emit_channel_batch(ram)
        } else {
            self.emit_batch(ram, BatchFlags::empty())
        }
    }

    pub(super) fn emit_batch(
        &mut self,
        ram: &impl PageReader,
        flags: BatchFlags,
    ) -> SourceAction<'_> {
        match self.encode_batch(ram, flags) {
            Ok((header_len, block, pages_len)) => SourceAction::SendPages {
                header: &self.scratch[..header_len],
                block,
                pages: self.scan.batch.sent_normal(pages_len),
            },
            Err(e) => self.encode_failed(e),
        }
    }

    /// [`emit_batch`](Self::emit_batch) for the postcopy preempt channel.
    pub(super) fn emit_preempt_batch(&mut self, ram: &impl PageReader) -> SourceAction<'_> {
        match self.encode_batch(ram, BatchFlags::empty()) {
            Ok((header_len, block, pages_len)) => SourceAction::SendPreemptPages {
                header: &self.scratch[..header_len],
                block,
                pages: self.scan.batch.sent_normal(pages_len),
            },
            Err(e) => self.encode_failed(e),
        }
    }

    /// Encodes the batch's header into scratch, counts and books it, and
    /// clears it (its normal pages stay readable until the next batch);
    /// returns the header's length, the block and the normal pages. In a
    /// verifying postcopy the header carries each normal page's term
    /// ([`verify::postcopy_books`]).
    fn encode_batch(
        &mut self,
        ram: &impl PageReader,
        flags: BatchFlags,
    ) -> Result<(usize, u16, usize), wire::EncodeError> {
        let block = usize::from(self.scan.batch.block());
        let shift = self.tracking.get(block).map_or(12, |t| t.page_shift);
        let header_len = match verify::postcopy_books(&mut self.verify, self.status, block) {
            Some((key, books)) => self.scan.batch.encode_header(
                self.scratch,
                ram,
                shift,
                flags,
                Some(&key),
                |page, term| {
                    books.record(page, term);
                },
            )?,
            None => {
                let batch = &self.scan.batch;
                let len = batch.encode_header(self.scratch, ram, shift, flags, None, |_, _| {})?;
                verify::book_batch(
                    &mut self.verify,
                    ram,
                    block as u16,
                    batch.normal(),
                    batch.terms(),
                );
                len
            }
        };
        let normal = self.scan.batch.normal().len() as u64;
        let zero = self.scan.batch.len() as u64 - normal;
        let data = normal << shift;
        self.stats.ram.normal += normal;
        self.stats.ram.duplicate += zero;
        self.stats.ram.normal_bytes += data;
        self.count_sent(header_len as u64 + data, self.scan.batch.len() as u64);
        self.refresh_stats();
        let pages_len = self.scan.batch.normal().len();
        self.scan.batch.clear();
        Ok((header_len, block as u16, pages_len))
    }
}
