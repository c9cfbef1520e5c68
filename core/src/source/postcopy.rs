//! The source's side of postcopy: the switchover (discard ranges, the
//! packaged device state between listen and run), page requests from the
//! destination served ahead of the background pass, and the end of the
//! stream once every page has gone.

use super::{EndReason, PageReader, SourceAction, SourceEngine, Step, Violation, verify};
use crate::capabilities::Capabilities;
use crate::return_path::RpMessage;
use crate::status::MigrationStatus;
use crate::time::Instant;
use crate::wire::{self, BatchFlags, Command, DiscardRanges, PageRange, RECORD_HEADER_LEN, Record};

use super::SourceError;

/// Page requests the source can hold. The destination asks once per
/// missing page per faulting vCPU, so a few hundred covers any realistic
/// number of vCPUs; a destination that exceeds it is misbehaving and the
/// migration fails rather than dropping a request (which would hang a
/// vCPU forever).
pub const REQUEST_QUEUE: usize = 256;

/// Discard ranges per `postcopy-ram-discard` record.
pub const DISCARD_RANGES_PER_RECORD: usize = 512;

/// The value of the ping that follows the switchover package on the main
/// stream (QEMU sends the same ping, 4, at the same place "for getting a
/// better measurement of downtime at the source"). The destination reads
/// it after the package, that is after it ran the guest, so its PONG tells
/// the source that the guest runs there: the source's vCPU stop to that
/// PONG bounds the postcopy downtime from above by one return trip.
pub const POSTCOPY_RUN_PING: u32 = 4;

/// The first value of the pings a verifying postcopy source sends after
/// its last page, before the end of the stream, each next one this plus
/// the pings sent before: the destination checks every page before a ping
/// against its term before it answers it, so a RESEND_PAGE for any of
/// them reaches the source ahead of the PONG, while the source can still
/// send the page. Far from QEMU's and livemig's other ping values.
pub const POSTCOPY_END_PING: u32 = 0x454e_0000;

/// A validated page request: pages of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PageRequest {
    pub block: u16,
    pub range: PageRange,
}

impl PageRequest {
    /// The part of this request from `page` to `end` (exclusive): what is
    /// left of it when a batch fills up.
    fn rest(&self, page: u64, end: u64) -> Self {
        Self {
            block: self.block,
            range: PageRange {
                first: page,
                count: end - page,
            },
        }
    }
}

/// The source's postcopy bookkeeping.
pub(super) struct Postcopy {
    /// The operator asked for postcopy (`migrate-start-postcopy`).
    pub requested: bool,
    /// The guest is being stopped to switch to postcopy rather than to
    /// complete precopy.
    pub switching: bool,
    /// The postcopy package (with its run command) has been handed out:
    /// the guest runs on the destination.
    pub guest_on_destination: bool,
    /// Page requests from the destination, served before anything else.
    pub requests: heapless::Deque<PageRequest, REQUEST_QUEUE>,
    /// The block of the last REQ_PAGES_ID (REQ_PAGES reuses it).
    pub last_request_block: Option<u16>,
    /// The end of the stream has been handed out after the switchover: a
    /// destination that says it completed (SHUT(0)) is believed.
    pub end_sent: bool,
    /// A pause took the preempt channel down and no resume has opened a
    /// new one ([`resume_with_preempt`](super::SourceEngine::resume_with_preempt)):
    /// requested pages travel on the main stream.
    pub preempt_lost: bool,
    /// End pings sent ([`POSTCOPY_END_PING`]): the value of the last is
    /// `POSTCOPY_END_PING + end_pings - 1`.
    pub end_pings: u32,
    /// The early discards' cursor (block, page) over the dirty pages.
    pub early: (usize, u64),
    /// The first page the early discards leave alone, as
    /// [`Scan::never_sent_from`](super::scan::Scan): never sent, so not
    /// on the destination.
    pub early_never_sent_from: Option<(usize, u64)>,
}

impl Postcopy {
    pub fn new() -> Self {
        Postcopy {
            requested: false,
            switching: false,
            guest_on_destination: false,
            requests: heapless::Deque::new(),
            last_request_block: None,
            end_sent: false,
            preempt_lost: false,
            end_pings: 0,
            early: (0, 0),
            early_never_sent_from: None,
        }
    }
}

/// What the caller writes around the serialised device records at the
/// postcopy switchover (see [`SourceAction::PackageDevices`]).
#[derive(Debug, PartialEq, Eq)]
pub struct PackageFraming<'e> {
    /// Package record header and the postcopy-listen command.
    pub head: &'e [u8],
    /// The postcopy-run command, the package's last record, then a
    /// [`POSTCOPY_RUN_PING`] after the package.
    pub tail: &'e [u8],
}

impl<'a> SourceEngine<'a> {
    /// Asks for the switch to postcopy (QMP's `migrate-start-postcopy`).
    /// It happens at the next step of the precopy loop, unless the
    /// remaining memory fits within the downtime limit, in which case
    /// precopy simply completes.
    pub fn start_postcopy(&mut self, now: Instant) -> Result<(), SourceError> {
        if !self
            .config
            .capabilities
            .contains(Capabilities::POSTCOPY_RAM)
        {
            return Err(SourceError::PostcopyNotEnabled);
        }
        if !matches!(
            self.status,
            MigrationStatus::Setup | MigrationStatus::Active
        ) {
            return Err(self.unexpected("start-postcopy"));
        }
        self.advance_clock(now);
        self.postcopy.requested = true;
        Ok(())
    }

    /// Frames the serialised device records (`records_len` bytes) of a
    /// [`SourceAction::PackageDevices`]. The guest starts on the
    /// destination when it reads the tail.
    pub fn package_devices(
        &mut self,
        now: Instant,
        records_len: usize,
    ) -> Result<PackageFraming<'_>, SourceError> {
        if self.step != Step::AwaitPackage {
            return Err(self.unexpected("packaged device state"));
        }
        self.advance_clock(now);
        let listen = Record::Command(Command::PostcopyListen);
        let run = Record::Command(Command::PostcopyRun);
        let ping = Record::Command(Command::Ping(POSTCOPY_RUN_PING));
        let body = listen.encoded_len() + records_len + run.encoded_len();
        let head_len = RECORD_HEADER_LEN + listen.encoded_len();
        let tail_len = run.encoded_len() + ping.encoded_len();
        let (head, rest) = self.scratch.split_at_mut(head_len);
        let (run_buf, ping_buf) = rest.split_at_mut(run.encoded_len());
        let framed = wire::encode_package_header(head, body)
            .and_then(|n| listen.encode(&mut head[n..]))
            .and_then(|_| run.encode(run_buf))
            .and_then(|_| ping.encode(ping_buf));
        if framed.is_err() {
            return Err(SourceError::PackageTooLarge { len: records_len });
        }
        self.count_sent((head_len + records_len + tail_len) as u64, 0);
        // The guest is stopped from here until the destination runs it:
        // postcopy's downtime, as the seeds' postcopy_start measures it.
        if let Some(stopped) = self.stopped_at {
            self.stats.downtime_ms = Some((self.now - stopped).as_millis() as u64);
        }
        self.step = Step::AwaitPackageSent;
        Ok(PackageFraming {
            head: &self.scratch[..head_len],
            tail: &self.scratch[head_len..head_len + tail_len],
        })
    }

    /// The whole package has been written: the destination will run the
    /// guest when it reads it, so from now on the source must never restart
    /// it. (A write that failed part-way left the destination without the
    /// run command: report it with `handle_io_error` instead, and the guest
    /// resumes here.)
    pub fn handle_package_sent(&mut self, now: Instant) -> Result<(), SourceError> {
        if self.step != Step::AwaitPackageSent {
            return Err(self.unexpected("package sent"));
        }
        self.advance_clock(now);
        self.postcopy.guest_on_destination = true;
        self.step = Step::Postcopy;
        Ok(())
    }

    /// The command that advises the destination of postcopy at setup.
    pub(super) fn postcopy_advise(&self) -> Command<'static> {
        let sizes = self.layout.iter().map(|b| u64::from(b.page_size));
        Command::PostcopyAdvise {
            host_page_size: sizes.clone().max().unwrap_or(4096),
            target_page_size: sizes.min().unwrap_or(4096),
        }
    }

    /// Whether the switch to postcopy is due at this convergence check.
    pub(super) fn wants_postcopy(&self) -> bool {
        let caps = self.config.capabilities;
        if !caps.contains(Capabilities::POSTCOPY_RAM) {
            return false;
        }
        self.postcopy.requested
            || self
                .config
                .limits
                .postcopy_after_iterations
                .is_some_and(|n| self.stats.iterations >= n)
    }

    /// After the last sync with the guest stopped: the dirty bitmap is
    /// final; send discards for it, then the package, then pages.
    pub(super) fn enter_postcopy(&mut self) {
        // Synced when the switch began (see `begin_switch`); from here
        // every page goes on the main stream or the preempt channel.
        self.channels = None;
        self.scan.never_sent_from =
            (!self.scan.first_pass_done).then_some((self.scan.block, self.scan.page));
        self.meter
            .set_limit(self.config.parameters.max_postcopy_bandwidth);
        if self.preempt() {
            self.scan
                .batch
                .set_limit(super::PREEMPT_BACKGROUND_BATCH_PAGES);
        }
        self.scan.rewind();
        self.step = Step::Discard;
    }

    /// The switch to postcopy is decided. With the return path, the
    /// guest runs on while the destination drops the pages dirty now
    /// ([`Step::EarlyDiscard`], then [`CATCH_UP_PING`](super::CATCH_UP_PING)), so the
    /// stop's own discards find them gone: measured here, discarding a
    /// 64 MiB working set (`MADV_DONTNEED` of 16 384 populated pages) and
    /// registering 1 GiB with userfaultfd took 15-40 ms of a postcopy
    /// stop, and the destination was still placing megabytes of queued
    /// precopy pages when the stop began. Without the return path the
    /// guest stops at once.
    ///
    /// With multifd, the channels are synced first (their last precopy
    /// pages must land before any discard) and carry nothing after:
    /// postcopy's pages go on the main stream and the preempt channel.
    pub(super) fn begin_switch(&mut self) {
        self.postcopy.switching = true;
        if let Some(ch) = self.channels.as_mut() {
            ch.request_sync();
        }
        if !self.end.return_path {
            self.step = Step::StopVcpus;
            return;
        }
        self.postcopy.early = (0, 0);
        self.postcopy.early_never_sent_from =
            (!self.scan.first_pass_done).then_some((self.scan.block, self.scan.page));
        self.step = Step::EarlyDiscard;
    }

    /// Emits the next early `postcopy-ram-discard` (see
    /// [`begin_switch`](Self::begin_switch)).
    pub(super) fn next_early_discard(&mut self) -> SourceAction<'_> {
        let (block, page) = self.postcopy.early;
        let never_sent_from = self.postcopy.early_never_sent_from;
        match self.encode_discards(block, page, never_sent_from) {
            Ok((len, next)) => {
                self.postcopy.early = next;
                if next.0 >= self.tracking.len() {
                    self.step = Step::CatchUpPing;
                }
                self.count_sent(len as u64, 0);
                SourceAction::Send(&self.scratch[..len])
            }
            Err(e) => self.encode_failed(e),
        }
    }

    /// Emits the next `postcopy-ram-discard` of the stop: runs of dirty
    /// pages that were sent before, which the destination may hold stale
    /// copies of and must drop so the guest faults on them instead of
    /// reading old data. (Pages the first pass never reached are not there
    /// to drop.)
    pub(super) fn next_discard(&mut self) -> SourceAction<'_> {
        let (block, page) = (self.scan.block, self.scan.page);
        match self.encode_discards(block, page, self.scan.never_sent_from) {
            Ok((len, (block, page))) => {
                (self.scan.block, self.scan.page) = (block, page);
                if block >= self.tracking.len() {
                    self.scan.rewind();
                    self.step = Step::PackageDevices;
                }
                self.count_sent(len as u64, 0);
                SourceAction::Send(&self.scratch[..len])
            }
            Err(e) => self.encode_failed(e),
        }
    }

    /// Encodes into the scratch buffer one `postcopy-ram-discard` of the
    /// runs of dirty pages of `block` from `page` on, below
    /// `never_sent_from`: its length (0 when the block has none there) and
    /// where the next record starts.
    fn encode_discards(
        &mut self,
        block: usize,
        mut page: u64,
        never_sent_from: Option<(usize, u64)>,
    ) -> Result<(usize, (usize, u64)), wire::EncodeError> {
        let mut ranges = [PageRange { first: 0, count: 0 }; DISCARD_RANGES_PER_RECORD];
        let mut n = 0;
        let mut next = (block + 1, 0);
        if let Some(t) = self.tracking.get(block) {
            let sent_below = match never_sent_from {
                Some((b, _)) if block > b => 0,
                Some((b, p)) if block == b => p,
                _ => t.pages,
            };
            while n < DISCARD_RANGES_PER_RECORD {
                let Some(first) = t.dirty.find_next_set(page).filter(|&f| f < sent_below) else {
                    page = t.pages;
                    break;
                };
                let end = t
                    .dirty
                    .find_next_clear(first)
                    .unwrap_or(t.pages)
                    .min(sent_below);
                ranges[n] = PageRange {
                    first,
                    count: end - first,
                };
                n += 1;
                page = end;
            }
            if page < t.pages {
                next = (block, page);
            }
        }
        let len = match (n, self.layout.get(block)) {
            (1.., Some(info)) => Record::Command(Command::PostcopyRamDiscard {
                block: info.id,
                ranges: DiscardRanges::from_slice(&ranges[..n]),
            })
            .encode(self.scratch)?,
            _ => 0,
        };
        Ok((len, next))
    }

    /// Validates and queues a page request from the return path.
    pub(super) fn handle_page_request(&mut self, block: Option<&str>, start: u64, len: u32) {
        if self.status != MigrationStatus::PostcopyActive {
            self.fail(
                EndReason::Protocol(Violation::RequestOutsidePostcopy),
                format_args!("the destination requested pages but postcopy is not active"),
            );
            return;
        }
        let index = match block {
            Some(id) => self
                .layout
                .iter()
                .position(|b| b.id.as_str() == id)
                .and_then(|i| u16::try_from(i).ok()),
            None => self.postcopy.last_request_block,
        };
        let Some((index, info)) = index.and_then(|i| Some((i, self.layout.get(usize::from(i))?)))
        else {
            self.fail(
                EndReason::Protocol(Violation::RequestUnknownBlock),
                format_args!("the destination requested pages of an unknown RAM block"),
            );
            return;
        };
        self.postcopy.last_request_block = Some(index);
        let page_size = u64::from(info.page_size);
        let end = start.checked_add(u64::from(len));
        if !start.is_multiple_of(page_size)
            || u64::from(len) % page_size != 0
            || end.is_none_or(|e| e > info.length)
        {
            self.fail(
                EndReason::Protocol(Violation::RequestOutOfBlock),
                format_args!(
                    "the destination requested {len} bytes at {start:#x} of block {}, outside it or not page-aligned",
                    info.id.as_str()
                ),
            );
            return;
        }
        let range = PageRange {
            first: start / page_size,
            count: u64::from(len) / page_size,
        };
        self.stats.ram.postcopy_requests += 1;
        self.queue_request(PageRequest {
            block: index,
            range,
        });
    }

    /// Queues `request` ahead of the background pass; a destination with
    /// more than [`REQUEST_QUEUE`] outstanding fails the migration.
    fn queue_request(&mut self, request: PageRequest) {
        if self.postcopy.requests.push_back(request).is_err() {
            self.fail(
                EndReason::Protocol(Violation::TooManyRequests),
                format_args!(
                    "the destination has more than {REQUEST_QUEUE} page requests outstanding"
                ),
            );
        }
    }

    /// RESEND_PAGE: the copy of `page` of `block` failed its term at the
    /// destination, which did not install it and waits for it. Marked
    /// dirty again, so that the pass takes it (the request path sends only
    /// pages still dirty: a page requested after it was sent is normally in
    /// flight), and without the preempt channel queued as a request too,
    /// ahead of the background pass; with it, the page goes on the main
    /// stream anyway, ordered before the next end ping
    /// ([`POSTCOPY_END_PING`]). After the end of the stream nothing more
    /// can be sent: the migration fails, naming the page (with the end
    /// pings, only a page damaged on the way to the destination a second
    /// time gets there).
    pub(super) fn handle_resend(&mut self, block: u16, page: u64) {
        if self.status != MigrationStatus::PostcopyActive {
            self.fail(
                EndReason::Protocol(Violation::RequestOutsidePostcopy),
                format_args!("the destination asked for a page again but postcopy is not active"),
            );
            return;
        }
        if self.postcopy.end_sent {
            self.fail(
                EndReason::DestinationFailed,
                format_args!(
                    "page {page} of RAM block {block} arrived damaged at the destination after the end of the stream, too late to send it again"
                ),
            );
            return;
        }
        let preempt = self.preempt();
        let Some(t) = self
            .tracking
            .get_mut(usize::from(block))
            .filter(|t| page < t.pages)
        else {
            self.fail(
                EndReason::Protocol(Violation::RequestOutOfBlock),
                format_args!(
                    "the destination asked again for page {page} of block {block}, outside RAM"
                ),
            );
            return;
        };
        if !t.dirty.test(page) && t.dirty.set(page).is_ok() {
            self.scan.remaining_bytes += 1u64 << t.page_shift;
        }
        if self.step == Step::AwaitEndPong {
            self.step = Step::Postcopy;
        }
        // With the preempt channel the background pass takes it, on the
        // main stream, ahead of the next end ping.
        if preempt {
            return;
        }
        self.queue_request(PageRequest {
            block,
            range: PageRange {
                first: page,
                count: 1,
            },
        });
    }

    /// The host served the page request `msg` (a REQ_PAGES or
    /// REQ_PAGES_ID) itself, writing `bytes` on the preempt channel from
    /// the thread that read it, so that the request need not wait for the
    /// migration thread (busy with the background pass, and on a loaded
    /// host often without a CPU for milliseconds). It is validated and
    /// counted as [`handle_return_path`](Self::handle_return_path) would,
    /// but not queued: its pages are on their way. Any other message, or
    /// a request outside active postcopy or during a recovery, is handed
    /// to `handle_return_path` as it is.
    ///
    /// The host must have served it as this engine would: the pages of the
    /// request, on the preempt channel, each with its term when
    /// [`page_term_key`](Self::page_term_key) gives one. `terms` are those
    /// terms, one a page of the request in order (0 for a page sent as a
    /// zero entry), empty when the migration does not verify: the engine
    /// books them as it books the pages it sends itself, since a postcopy
    /// recovery may learn that the destination has such a page and never
    /// send it again. A verifying request with another number of terms is
    /// queued and served by the engine after all.
    pub fn handle_served_request(
        &mut self,
        now: Instant,
        msg: &RpMessage<'_>,
        bytes: u64,
        terms: &[u64],
    ) -> Result<(), SourceError> {
        let (block, start, len) = match *msg {
            RpMessage::ReqPagesId { block, start, len } => (Some(block), start, len),
            RpMessage::ReqPages { start, len } => (None, start, len),
            _ => return self.handle_return_path(now, msg),
        };
        if self.status != MigrationStatus::PostcopyActive || self.recovering() || !self.preempt() {
            return self.handle_return_path(now, msg);
        }
        self.advance_clock(now);
        let queued = self.postcopy.requests.len();
        self.handle_page_request(block, start, len);
        let served = self.postcopy.requests.back().copied();
        if self.postcopy.requests.len() > queued
            && served.is_some_and(|req| self.book_served(req, terms))
        {
            let _ = self.postcopy.requests.pop_back();
        }
        self.count_sent(bytes, 0);
        Ok(())
    }

    /// Books the terms of the pages of `req` the host served; false when
    /// this migration verifies and `terms` is not one a page.
    fn book_served(&mut self, req: PageRequest, terms: &[u64]) -> bool {
        let Some(v) = self.verify.as_mut() else {
            return true;
        };
        if terms.len() as u64 != req.range.count {
            return false;
        }
        if let Some(books) = v.books.get_mut(usize::from(req.block)) {
            for (page, &term) in (req.range.first..).zip(terms) {
                books.record(page, term);
            }
        }
        true
    }

    /// The key of the terms a verifying postcopy sends with each page
    /// (`None`: this migration does not verify), for a host thread that
    /// serves requests itself ([`handle_served_request`](Self::handle_served_request)).
    pub fn page_term_key(&self) -> Option<crate::digest::DigestKey> {
        self.verify.as_ref().map(|v| v.key)
    }

    /// Whether page requests from the destination wait to be served: the
    /// next action then carries requested pages, not the background pass.
    /// A driver that paces the background pass (the preempt channel's
    /// main stream, see livemig-kvm) must not hold back such an action.
    pub fn has_page_requests(&self) -> bool {
        self.status == MigrationStatus::PostcopyActive && !self.postcopy.requests.is_empty()
    }

    /// True when requested pages travel on the postcopy preempt channel.
    pub(super) fn preempt(&self) -> bool {
        !self.postcopy.preempt_lost
            && self
                .config
                .capabilities
                .contains(Capabilities::POSTCOPY_PREEMPT)
    }

    /// Postcopy preempt: the requested pages, each sent on the preempt
    /// channel whether or not the main stream has sent it already (it may
    /// still sit in the main socket's queue, behind background pages).
    /// Their dirty bits stay: the main stream still carries every page, so
    /// it alone completes the migration, and the destination keeps the
    /// copy that comes first.
    fn preempt_pages(&mut self, ram: &impl PageReader) -> Option<SourceAction<'_>> {
        let zero_detection = self
            .config
            .capabilities
            .contains(Capabilities::ZERO_PAGE_DETECTION);
        while let Some(req) = self.postcopy.requests.pop_front() {
            let Some(t) = self.tracking.get(usize::from(req.block)) else {
                continue;
            };
            self.scan.batch.set_block(req.block);
            let end = req.range.end().min(t.pages);
            for page in req.range.first..end {
                let Some(zero) = self.scan.batch.push_read(ram, page, zero_detection) else {
                    let _ = self.postcopy.requests.push_front(req.rest(page, end));
                    break;
                };
                if zero {
                    verify::book_zero(&mut self.verify, req.block, page);
                }
            }
            if !self.scan.batch.is_empty() {
                return Some(self.emit_preempt_batch(ram));
            }
        }
        None
    }

    /// Postcopy sending: requested pages first (never held back by the
    /// rate limit: a vCPU is waiting; on the preempt channel when there is
    /// one), then the background pass.
    pub(super) fn postcopy_pages(&mut self, ram: &impl PageReader) -> Option<SourceAction<'_>> {
        if self.preempt() {
            let tracking = &*self.tracking;
            let pending = self.postcopy.requests.iter().any(|r| {
                tracking
                    .get(usize::from(r.block))
                    .is_some_and(|t| r.range.count > 0 && r.range.first < t.pages)
            });
            if pending {
                return self.preempt_pages(ram);
            }
            // Requests with no page left are dropped with the rest.
            self.postcopy.requests.clear();
            return self.next_pages(ram, false);
        }
        while let Some(req) = self.postcopy.requests.pop_front() {
            let Some(t) = self.tracking.get_mut(usize::from(req.block)) else {
                continue;
            };
            let page_size = 1u64 << t.page_shift;
            self.scan.batch.set_block(req.block);
            let end = req.range.end().min(t.pages);
            for page in req.range.first..end {
                if self.scan.batch.is_full() {
                    // The rest of a large request goes in the next batch,
                    // still ahead of the background pass.
                    let _ = self.postcopy.requests.push_front(req.rest(page, end));
                    break;
                }
                // A page no longer dirty has been sent already, maybe still
                // in flight: the destination will get it.
                if t.dirty.test_and_clear(page) {
                    self.scan.remaining_bytes = self.scan.remaining_bytes.saturating_sub(page_size);
                    // A vCPU waits for this page: one read (at worst a
                    // zero-page fault, a few us) beats asking a whole
                    // populated window (tens to hundreds of us). Not
                    // full: checked above.
                    let zero_detection = self
                        .config
                        .capabilities
                        .contains(Capabilities::ZERO_PAGE_DETECTION);
                    if self.scan.batch.push_read(ram, page, zero_detection) == Some(true) {
                        verify::book_zero(&mut self.verify, req.block, page);
                    }
                }
            }
            if !self.scan.batch.is_empty() {
                return Some(self.emit_batch(ram, BatchFlags::empty()));
            }
        }
        self.next_pages(ram, false)
    }
}

impl SourceEngine<'_> {
    /// After a postcopy pass: another, for pages marked dirty again
    /// (RESEND_PAGE) since it went by them; else, verifying with the
    /// return path, an end ping first (see [`POSTCOPY_END_PING`]); else
    /// the end of the stream.
    pub(super) fn postcopy_end_step(&self) -> Step {
        if self.tracking.iter().any(|t| t.dirty.count() > 0) {
            Step::Postcopy
        } else if self.verify.is_some() && self.end.return_path {
            Step::EndPing
        } else {
            Step::EndOfStream
        }
    }

    /// The value of the last end ping sent.
    pub(super) fn last_end_ping(&self) -> u32 {
        POSTCOPY_END_PING.wrapping_add(self.postcopy.end_pings.wrapping_sub(1))
    }

    /// [`Step::EndPing`]: the next end ping; then the wait for its PONG,
    /// under the confirm timeout (a silent destination pauses postcopy).
    pub(super) fn end_ping(&mut self) -> SourceAction<'_> {
        let value = POSTCOPY_END_PING.wrapping_add(self.postcopy.end_pings);
        match Record::Command(Command::Ping(value)).encode(self.scratch) {
            Ok(len) => {
                self.postcopy.end_pings = self.postcopy.end_pings.wrapping_add(1);
                self.end.sent_at = self.now;
                self.step = Step::AwaitEndPong;
                self.count_sent(len as u64, 0);
                SourceAction::Send(&self.scratch[..len])
            }
            Err(e) => self.encode_failed(e),
        }
    }
}
