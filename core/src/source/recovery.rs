//! Postcopy pause and recovery on the source.
//!
//! After the switchover the guest runs on the destination and its memory
//! is split: pages the destination has, pages only the source has. A lost
//! connection then must not fail the migration (neither host could run a
//! whole guest afterwards): the source pauses, keeps every page, and waits
//! for the caller's new connection ([`SourceEngine::resume`]). On it the
//! source asks for each block's received-pages bitmap (QEMU's RECV_BITMAP),
//! one block at a time, checks it against the block (size, end mark, no
//! bit past the last page), makes its dirty bitmap the pages NOT received,
//! sends POSTCOPY_RESUME, and on RESUME_ACK is back in postcopy-active:
//! the destination re-sends its outstanding requests, served first, then
//! the background pass sends what is left. A bitmap that fails its checks,
//! an answer out of place, or a cut or silence anywhere in this handshake
//! pauses again; the caller may resume again, as often as it likes, or
//! [`give_up`](SourceEngine::give_up) at its own deadline.
//!
//! The postcopy preempt channel dies with the connection. A caller that
//! has a new preempt connection too resumes with
//! [`resume_with_preempt`](SourceEngine::resume_with_preempt): the new
//! stream announces the channel again (PostcopyPreempt, a fresh migration
//! id, so that a stale connection of the old channel is refused), the new
//! channel's hello goes out before the first bitmap request, and after
//! RESUME_ACK requested pages take it again instead of queueing behind
//! the background pass on the main stream.

use core::fmt;

use super::{EndReason, SourceAction, SourceEngine, SourceError, Step, Violation};
use crate::capabilities::Capabilities;
use crate::return_path::{RpMessage, recv_bitmap_len};
use crate::status::MigrationStatus;
use crate::time::Instant;
use crate::wire::{self, Command, Record};

/// What the next bitmap part must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// The RECV_BITMAP message naming the block asked for.
    Message,
    /// The bitmap's be64 size.
    Size,
    /// Bitmap bytes, `size` in all.
    Bytes { size: u64 },
    /// The end mark.
    End,
}

/// The bitmap being received.
pub(super) struct Recovery {
    /// The block whose bitmap was asked for last.
    block: u16,
    expect: Expect,
    /// Bitmap bytes applied so far.
    offset: u64,
}

impl Recovery {
    pub fn new() -> Self {
        Recovery {
            block: 0,
            expect: Expect::Message,
            offset: 0,
        }
    }
}

impl SourceEngine<'_> {
    /// True while postcopy is paused: the caller owes a new connection
    /// ([`resume`](Self::resume)) or a decision to give up. The question to
    /// ask after reporting a failure: after the switchover a lost
    /// connection pauses rather than fails.
    pub fn is_paused(&self) -> bool {
        self.status == MigrationStatus::PostcopyPaused
    }

    /// The caller has a new connection (main stream and return path; read
    /// the new return path with a new decoder): postcopy-paused ->
    /// postcopy-recover-setup. The next polls hand out the new stream's
    /// header and the bitmap requests. Refused with
    /// [`SourceError::Transition`] unless paused.
    pub fn resume(&mut self, now: Instant) -> Result<(), SourceError> {
        self.advance_clock(now);
        self.move_to(MigrationStatus::PostcopyRecoverSetup)
            .map_err(SourceError::Transition)?;
        self.recovery = Recovery::new();
        self.end.sent_at = self.now;
        self.step = Step::RecoverStart;
        Ok(())
    }

    /// [`resume`](Self::resume) with a new postcopy preempt channel too (a
    /// connection of its own from the same connector, made after the new
    /// main one): the new stream's header is followed by a PostcopyPreempt
    /// with `migration_id`, the next poll hands out the new channel's hello
    /// ([`SourceAction::SendPreempt`]), and once postcopy is active again
    /// requested pages travel on it. `migration_id` must differ from the
    /// channel's before ([`SourceError::PreemptIdReused`]), so that the
    /// destination refuses a stale connection of the old one. Refused with
    /// [`SourceError::UnexpectedEvent`] without `postcopy-preempt`, and as
    /// `resume` is unless paused; a refusal changes nothing.
    pub fn resume_with_preempt(
        &mut self,
        now: Instant,
        migration_id: u64,
    ) -> Result<(), SourceError> {
        if !self
            .config
            .capabilities
            .contains(Capabilities::POSTCOPY_PREEMPT)
        {
            return Err(self.unexpected("a resume with a preempt channel"));
        }
        if migration_id == self.migration_id {
            return Err(SourceError::PreemptIdReused(migration_id));
        }
        self.resume(now)?;
        self.migration_id = migration_id;
        self.postcopy.preempt_lost = false;
        // The background pass's batches small again, as in a postcopy
        // with the channel from the start.
        self.scan
            .batch
            .set_limit(super::PREEMPT_BACKGROUND_BATCH_PAGES);
        Ok(())
    }

    /// The caller stops trying to recover (its deadline passed): the
    /// migration fails ([`EndReason::RecoveryAbandoned`]), the guest stays
    /// stopped here, and `error_desc` says where its pages are. Refused
    /// with [`SourceError::UnexpectedEvent`] unless postcopy is paused or
    /// recovering.
    pub fn give_up(&mut self, now: Instant) -> Result<(), SourceError> {
        self.advance_clock(now);
        if !self.status.in_postcopy() || self.status == MigrationStatus::PostcopyActive {
            return Err(self.unexpected("giving up a recovery"));
        }
        if matches!(
            self.status,
            MigrationStatus::PostcopyRecoverSetup | MigrationStatus::PostcopyRecover
        ) {
            self.move_to(MigrationStatus::PostcopyPaused)
                .map_err(SourceError::Transition)?;
        }
        self.move_to(MigrationStatus::Failed)
            .map_err(SourceError::Transition)?;
        let only_here: u64 = self.tracking.iter().map(|t| t.dirty.count()).sum();
        self.stats.error_desc.set(format_args!(
            "postcopy recovery abandoned after {} recoveries: the guest was handed to \
             the destination; up to {only_here} of its pages (those the destination was not \
             known to have) exist only on this source, whose guest stays stopped",
            self.stats.postcopy_recoveries
        ));
        self.scan.batch.clear();
        self.postcopy.requests.clear();
        self.step = Step::Finish(EndReason::RecoveryAbandoned);
        Ok(())
    }

    /// Pauses postcopy after the switchover: `reason` says why. Does
    /// nothing before the switchover, once the migration is ending, or
    /// while already paused.
    pub(super) fn pause(&mut self, reason: fmt::Arguments<'_>) {
        if !self.postcopy.guest_on_destination
            || matches!(
                self.step,
                Step::Done | Step::Finish(_) | Step::PauseNotice | Step::Paused
            )
        {
            return;
        }
        if self.move_to(MigrationStatus::PostcopyPaused).is_err() {
            return;
        }
        self.stats.error_desc.set(format_args!(
            "postcopy paused ({reason}); the guest runs on the destination and the pages it \
             lacks are here: resume over a new connection"
        ));
        self.scan.batch.clear();
        self.postcopy.requests.clear();
        self.postcopy.last_request_block = None;
        // The preempt channel is gone with the connection: requested pages
        // take the main stream unless a resume opens a new one.
        self.postcopy.preempt_lost = true;
        self.scan.batch.set_limit(super::BATCH_PAGES);
        self.step = Step::PauseNotice;
    }

    /// The new stream's header and the first bitmap request; with a new
    /// preempt channel, the header and its announcement, and the channel's
    /// hello next.
    pub(super) fn recover_start(&mut self) -> SourceAction<'_> {
        let mut len = match wire::encode_stream_header(self.scratch) {
            Ok(len) => len,
            Err(e) => return self.encode_failed(e),
        };
        if self.preempt() {
            let announce = Record::Command(Command::PostcopyPreempt {
                migration_id: self.migration_id,
            });
            match announce.encode(&mut self.scratch[len..]) {
                Ok(n) => len += n,
                Err(e) => return self.encode_failed(e),
            }
            self.count_sent(len as u64, 0);
            self.step = Step::RecoverPreemptHello;
            return SourceAction::Send(&self.scratch[..len]);
        }
        self.count_sent(len as u64, 0);
        if self.layout.is_empty() {
            self.step = Step::SendResume;
            return SourceAction::Send(&self.scratch[..len]);
        }
        self.bitmap_request(0, len)
    }

    /// The new preempt channel's hello; the bitmap requests follow.
    pub(super) fn recover_preempt_hello(&mut self) -> SourceAction<'_> {
        let next = if self.layout.is_empty() {
            Step::SendResume
        } else {
            Step::RequestBitmap(0)
        };
        self.preempt_hello(next)
    }

    /// Asks for the bitmap of `block`.
    pub(super) fn request_bitmap(&mut self, block: u16) -> SourceAction<'_> {
        self.bitmap_request(block, 0)
    }

    /// Encodes the bitmap request for `block` after the `at` bytes already
    /// in scratch, and hands them all out.
    fn bitmap_request(&mut self, block: u16, at: usize) -> SourceAction<'_> {
        let Some(info) = self.layout.get(usize::from(block)) else {
            self.step = Step::SendResume;
            return SourceAction::Send(&self.scratch[..at]);
        };
        let record = Record::Command(Command::RecvBitmap { block: info.id });
        // The scratch holds at least MIN_SCRATCH bytes: a stream header
        // and a request with the longest id fit.
        let (_, rest) = self.scratch.split_at_mut(at.min(self.scratch.len()));
        let len = match record.encode(rest) {
            Ok(len) => len,
            Err(e) => return self.encode_failed(e),
        };
        self.count_sent(len as u64, 0);
        self.recovery = Recovery {
            block,
            ..Recovery::new()
        };
        self.end.sent_at = self.now;
        self.step = Step::AwaitBitmap;
        SourceAction::Send(&self.scratch[..at + len])
    }

    /// Every bitmap is in: postcopy-recover-setup -> postcopy-recover, and
    /// POSTCOPY_RESUME goes out.
    pub(super) fn send_resume(&mut self) -> SourceAction<'_> {
        if let Err(e) = self.move_to(MigrationStatus::PostcopyRecover) {
            self.pause(format_args!("{e}"));
            return self.poll_paused();
        }
        let len = match Record::Command(Command::PostcopyResume).encode(self.scratch) {
            Ok(len) => len,
            Err(e) => return self.encode_failed(e),
        };
        self.count_sent(len as u64, 0);
        self.end.sent_at = self.now;
        self.step = Step::AwaitResumeAck;
        SourceAction::Send(&self.scratch[..len])
    }

    /// The [`SourceAction::Paused`] of a pause that happened inside a poll.
    fn poll_paused(&mut self) -> SourceAction<'static> {
        self.step = Step::Paused;
        SourceAction::Paused
    }

    /// A recovery message (RECV_BITMAP, its bitmap, RESUME_ACK) arrived.
    pub(super) fn recovery_message(&mut self, msg: &RpMessage<'_>) {
        let expect = self.recovery.expect;
        match (self.step, *msg) {
            (Step::AwaitBitmap, RpMessage::RecvBitmap { block }) if expect == Expect::Message => {
                let asked = self
                    .layout
                    .get(usize::from(self.recovery.block))
                    .map(|b| b.id.as_str());
                if asked != Some(block) {
                    return self.pause(format_args!(
                        "the destination sent the bitmap of block '{block}', not of the block \
                         asked for"
                    ));
                }
                self.recovery.expect = Expect::Size;
            }
            (Step::AwaitBitmap, RpMessage::RecvBitmapSize { size }) if expect == Expect::Size => {
                let pages = self.block_pages();
                let want = recv_bitmap_len(pages);
                if size != want {
                    let block = self.recovery.block;
                    return self.pause(format_args!(
                        "the destination's bitmap of block {block} has {size} bytes, its \
                         {pages} pages need {want}"
                    ));
                }
                self.recovery.expect = if size == 0 {
                    Expect::End
                } else {
                    Expect::Bytes { size }
                };
            }
            (Step::AwaitBitmap, RpMessage::RecvBitmapBytes { offset, bytes })
                if matches!(expect, Expect::Bytes { .. }) =>
            {
                self.apply_bitmap(offset, bytes);
            }
            (Step::AwaitBitmap, RpMessage::RecvBitmapEnd) if expect == Expect::End => {
                let next = self.recovery.block + 1;
                self.step = if usize::from(next) < self.layout.len() {
                    Step::RequestBitmap(next)
                } else {
                    self.bitmaps_applied();
                    Step::SendResume
                };
            }
            (Step::AwaitResumeAck, RpMessage::ResumeAck) => {
                if let Err(e) = self.move_to(MigrationStatus::PostcopyActive) {
                    return self.pause(format_args!("{e}"));
                }
                self.stats.postcopy_recoveries += 1;
                self.stats.error_desc.set(format_args!(""));
                // Requests follow the ACK; then the background pass from
                // the start, over what the destination lacks.
                self.scan.rewind();
                self.step = Step::Postcopy;
            }
            _ if self.recovering() => {
                self.pause(format_args!(
                    "the destination sent {} out of place in the recovery handshake",
                    msg.kind().name()
                ));
            }
            _ => self.fail(
                EndReason::Protocol(Violation::UnexpectedRecovery),
                format_args!(
                    "the destination sent a recovery message but no recovery is in progress"
                ),
            ),
        }
    }

    /// A message during the recovery handshake that is not part of it:
    /// SHUT(0) from a destination that had completed before the cut (its
    /// first SHUT(0) was lost), only believed once the end of the stream
    /// was handed out; SHUT(1) fails; PONG is harmless; anything else
    /// pauses again.
    pub(super) fn recovery_interruption(&mut self, msg: &RpMessage<'_>) {
        match *msg {
            RpMessage::Shut { error: false }
                if self.postcopy.end_sent
                    && self.status == MigrationStatus::PostcopyRecoverSetup =>
            {
                if let Err(e) = self.move_to(MigrationStatus::Completed) {
                    return self.pause(format_args!("{e}"));
                }
                self.digest_confirmed();
                self.end.confirmed = true;
                self.step = Step::Finish(EndReason::Completed);
            }
            RpMessage::Shut { error: true } => self.fail(
                EndReason::DestinationFailed,
                format_args!("the destination failed during the postcopy recovery"),
            ),
            RpMessage::Pong(_) => {}
            _ => self.pause(format_args!(
                "the destination sent {} in the recovery handshake",
                msg.kind().name()
            )),
        }
    }

    /// True from [`resume`](Self::resume) to RESUME_ACK.
    pub(super) fn recovering(&self) -> bool {
        matches!(
            self.step,
            Step::RecoverStart
                | Step::RecoverPreemptHello
                | Step::RequestBitmap(_)
                | Step::AwaitBitmap
                | Step::SendResume
                | Step::AwaitResumeAck
        )
    }

    /// Pages of the block whose bitmap is arriving.
    fn block_pages(&self) -> u64 {
        self.tracking
            .get(usize::from(self.recovery.block))
            .map_or(0, |t| t.pages)
    }

    /// Bitmap bytes from `offset`: each bit a page, set when the
    /// destination has it; the page is dirty (to send) when it is clear.
    /// A gap, an overrun or a bit past the block's last page pauses again.
    fn apply_bitmap(&mut self, offset: u64, bytes: &[u8]) {
        let Expect::Bytes { size } = self.recovery.expect else {
            return;
        };
        let end = offset.checked_add(bytes.len() as u64);
        let block = self.recovery.block;
        if offset != self.recovery.offset || end.is_none_or(|e| e > size) {
            return self.pause(format_args!(
                "the destination's bitmap of block {block} is out of order"
            ));
        }
        let Some(t) = self.tracking.get_mut(usize::from(block)) else {
            return;
        };
        let pages = t.pages;
        let mut lie = None;
        for (k, &byte) in (offset..).zip(bytes) {
            for bit in 0..8u64 {
                let page = k * 8 + bit;
                let received = byte & (1 << bit) != 0;
                if page >= pages {
                    if received {
                        lie = Some(page);
                    }
                    continue;
                }
                let _ = if received {
                    t.dirty.clear(page)
                } else {
                    t.dirty.set(page)
                };
            }
        }
        if let Some(page) = lie {
            return self.pause(format_args!(
                "the destination's bitmap of block {block} has page {page} set, past its \
                 {pages} pages"
            ));
        }
        self.recovery.offset = end.unwrap_or(size);
        if self.recovery.offset == size {
            self.recovery.expect = Expect::End;
        }
    }

    /// Every block's dirty bitmap now says what the destination lacks.
    fn bitmaps_applied(&mut self) {
        self.scan.remaining_bytes = self
            .tracking
            .iter()
            .map(|t| t.dirty.count() << t.page_shift)
            .sum();
        self.refresh_stats();
    }
}
