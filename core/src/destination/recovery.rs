//! Postcopy pause and recovery on the destination.
//!
//! Once postcopy runs the guest here, a lost connection must not stop it:
//! the destination pauses (postcopy-paused), its guest keeps running, and
//! a vCPU that touches a missing page waits while its request is only
//! recorded. On the caller's new connection ([`DestinationEngine::recover`],
//! postcopy-paused -> postcopy-recover as QEMU's `postcopy_try_recover`)
//! the stream starts over with a header; each RECV_BITMAP request is
//! answered with the RECV_BITMAP message and the block's received-pages
//! bitmap in QEMU's layout (be64 size, the bitmap as little-endian 64-bit
//! words, be64 end mark), streamed by
//! [`poll_return_path`](DestinationEngine::poll_return_path) from the
//! tracking itself; POSTCOPY_RESUME is answered with RESUME_ACK and every
//! outstanding page request again, and the migration is postcopy-active.
//! A cut during this returns to postcopy-paused.
//!
//! The postcopy preempt channel dies with the connection. The new stream
//! may announce a new one (PostcopyPreempt right after its header, with a
//! fresh migration id): the host accepts it as at setup
//! ([`PostcopyHost::open_preempt`](super::PostcopyHost::open_preempt)),
//! its hello must carry the new id (a stale connection of the old channel
//! is refused and pauses again), and requested pages, the re-sent ones
//! first, come on it again. A channel that does not come pauses again; a
//! stream that does not announce one leaves requested pages to the main
//! stream.

use core::fmt;

use super::{DestError, DestinationEngine, Loader, PostcopyTracking};
use crate::digest::Verification;
use crate::return_path::{RECV_BITMAP_END_MARK, RECV_BITMAP_FIELD_LEN, RpMessage, recv_bitmap_len};
use crate::status::MigrationStatus;
use crate::time::Instant;

/// Bitmap requests the destination holds while it streams an earlier
/// bitmap. A livemig source asks for one block at a time; a source that
/// asks for more than this at once is refused.
pub const PENDING_BITMAPS: usize = 16;

/// Free room the return-path queue keeps when re-sent page requests fill
/// it: a request with the longest id, and the final message.
const RESEND_ROOM: usize = 300;

/// A bitmap on its way out: `pos` bytes of the block's size, bitmap and
/// end mark handed out so far.
#[derive(Clone, Copy, Debug)]
struct BitmapOut {
    block: u16,
    pos: u64,
}

/// The destination's recovery bookkeeping.
pub(super) struct Recovery {
    /// The bitmap being streamed, after the queue's first `mark` bytes.
    bitmap: Option<BitmapOut>,
    /// Queue bytes (the RECV_BITMAP message and whatever came before it)
    /// that go out before the bitmap.
    mark: usize,
    /// Bitmap requests waiting for the one being streamed.
    pending: heapless::Deque<u16, PENDING_BITMAPS>,
    /// After RESUME_ACK: the (block, page) from which outstanding requests
    /// are still to be re-sent.
    resend: Option<(u16, u64)>,
    /// A pause took the preempt channel down, and no recovery's stream
    /// has announced a new one since.
    pub preempt_closed: bool,
}

impl Recovery {
    pub fn new() -> Self {
        Recovery {
            bitmap: None,
            mark: 0,
            pending: heapless::Deque::new(),
            resend: None,
            preempt_closed: false,
        }
    }

    /// Forgets what was on its way to the lost connection.
    pub fn reset(&mut self) {
        self.bitmap = None;
        self.mark = 0;
        self.pending.clear();
        self.resend = None;
    }
}

impl<'a> DestinationEngine<'a> {
    /// True while postcopy is paused: the guest runs here, the caller owes
    /// a new connection ([`recover`](Self::recover)) or a decision to give
    /// up. The question to ask after a close, an error or a timeout: once
    /// postcopy runs the guest here they pause rather than fail.
    pub fn is_paused(&self) -> bool {
        self.loader.status == MigrationStatus::PostcopyPaused
    }

    /// The caller accepted a new connection from the source (main stream
    /// and return path): postcopy-paused -> postcopy-recover. The new
    /// stream starts with a stream header; feed it to
    /// [`handle_input`](Self::handle_input) and drain
    /// [`poll_return_path`](Self::poll_return_path) to the new return path
    /// as before. A destination that had completed (the source missed its
    /// SHUT) says so again with SHUT(0). Refused with
    /// [`DestError::Transition`] otherwise.
    pub fn recover(&mut self, now: Instant) -> Result<(), DestError> {
        let l = &mut self.loader;
        if l.status == MigrationStatus::Completed {
            self.decoder.restart();
            l.rp_queue.clear();
            l.recovery.reset();
            l.queue_final(&RpMessage::Shut { error: false });
            return Ok(());
        }
        l.move_to(MigrationStatus::PostcopyRecover)?;
        self.decoder.restart();
        l.last_input_at = now;
        // The old preempt channel is gone: a new one is taken only once
        // the new stream announces it, with its own migration id, and it
        // starts with its hello.
        l.preempt_id = None;
        l.stats.postcopy_preempt_pages = 0;
        if let Some(p) = self.preempt.as_mut() {
            p.hello_fill = 0;
            p.decoder.restart_records();
        }
        // The source sends its digest again with the end of the stream.
        if l.stats.verification == Verification::Verified {
            l.stats.verification = Verification::Pending;
        }
        Ok(())
    }

    /// The caller stops waiting for the source (its deadline passed):
    /// postcopy-paused -> failed, and `error_desc` says where the guest's
    /// pages are. Refused with [`DestError::RecoveryOutOfOrder`] unless
    /// paused or recovering.
    pub fn give_up(&mut self, now: Instant) -> Result<(), DestError> {
        let l = &mut self.loader;
        if !matches!(
            l.status,
            MigrationStatus::PostcopyPaused | MigrationStatus::PostcopyRecover
        ) {
            return Err(DestError::RecoveryOutOfOrder(
                "giving up while postcopy is neither paused nor recovering",
            ));
        }
        if l.status == MigrationStatus::PostcopyRecover {
            l.move_to(MigrationStatus::PostcopyPaused)?;
        }
        l.move_to(MigrationStatus::Failed)?;
        l.update_time(now);
        let (have, total) = l.postcopy.as_deref().map_or((0, 0), |t| {
            t.iter()
                .fold((0, 0), |(h, n), b| (h + b.received_count(), n + b.pages()))
        });
        l.stats.error_desc.set(format_args!(
            "postcopy recovery abandoned: the guest ran here with {have} of its {total} pages; \
             the other {} exist only on the source",
            total - have
        ));
        l.waiting_since = None;
        l.rp_queue.clear();
        l.recovery.reset();
        Ok(())
    }

    /// The connection failed: a write on the return path or a read of the
    /// main stream. Once postcopy runs the guest here it pauses (see
    /// [`is_paused`](Self::is_paused)); before, the migration fails with
    /// [`DestError::ConnectionFailed`].
    pub fn handle_io_error(&mut self, now: Instant, reason: fmt::Arguments<'_>) {
        let l = &mut self.loader;
        if l.pauses() {
            l.pause(now, reason);
        } else if !matches!(
            l.status,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::PostcopyPaused
        ) {
            l.fail_with(now, DestError::ConnectionFailed, reason);
        }
    }
}

impl Loader<'_> {
    /// Whether a lost connection pauses rather than fails: the guest runs
    /// here in postcopy.
    pub(super) fn pauses(&self) -> bool {
        self.guest_running
            && matches!(
                self.status,
                MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover
            )
    }

    /// Postcopy-active or -recover -> postcopy-paused, for `reason`.
    pub(super) fn pause(&mut self, now: Instant, reason: fmt::Arguments<'_>) {
        if self.move_to(MigrationStatus::PostcopyPaused).is_err() {
            return;
        }
        self.update_time(now);
        self.stats.error_desc.set(format_args!(
            "postcopy paused ({reason}); the guest runs here and the pages it lacks are on \
             the source: recover over a new connection"
        ));
        // No request timeout while nobody can answer.
        self.waiting_since = None;
        // Bytes for the lost connection are dropped; requests are re-sent
        // after the recovery.
        self.rp_queue.clear();
        self.recovery.reset();
        self.last_request_block = None;
        self.recovery.preempt_closed = true;
    }

    /// A RECV_BITMAP request for block `id`.
    pub(super) fn bitmap_request(&mut self, id: &str) -> Result<(), DestError> {
        if self.status != MigrationStatus::PostcopyRecover {
            return Err(DestError::UnexpectedCommand(
                "recv-bitmap outside a recovery",
            ));
        }
        let block = self
            .layout
            .iter()
            .position(|b| b.id.as_str() == id)
            .and_then(|i| u16::try_from(i).ok())
            .ok_or(DestError::RecoveryOutOfOrder(
                "a bitmap request for an unknown block",
            ))?;
        if self.recovery.bitmap.is_some() {
            return self
                .recovery
                .pending
                .push_back(block)
                .map_err(|_| DestError::RecoveryOutOfOrder("too many bitmap requests at once"));
        }
        self.start_bitmap(block)
    }

    /// Queues the RECV_BITMAP message of `block`; its bitmap follows.
    fn start_bitmap(&mut self, block: u16) -> Result<(), DestError> {
        let Some(info) = self.layout.get(usize::from(block)) else {
            return Err(DestError::RecoveryOutOfOrder(
                "a bitmap request for an unknown block",
            ));
        };
        self.queue(&RpMessage::RecvBitmap {
            block: info.id.as_str(),
        })?;
        self.recovery.mark = self.rp_queue.len();
        self.recovery.bitmap = Some(BitmapOut { block, pos: 0 });
        Ok(())
    }

    /// POSTCOPY_RESUME: every bitmap has gone out; postcopy-recover ->
    /// postcopy-active, RESUME_ACK and the outstanding requests again.
    pub(super) fn resume(&mut self, now: Instant) -> Result<(), DestError> {
        if self.status != MigrationStatus::PostcopyRecover {
            return Err(DestError::UnexpectedCommand(
                "postcopy-resume outside a recovery",
            ));
        }
        if self.recovery.bitmap.is_some() || !self.recovery.pending.is_empty() {
            return Err(DestError::RecoveryOutOfOrder(
                "postcopy-resume before the bitmaps were sent",
            ));
        }
        self.move_to(MigrationStatus::PostcopyActive)?;
        self.queue(&RpMessage::ResumeAck)?;
        self.stats.postcopy_recoveries += 1;
        self.stats.error_desc.set(format_args!(""));
        self.recovery.resend = Some((0, 0));
        if self.outstanding > 0 {
            self.waiting_since = Some(now);
        }
        self.refill_requests();
        Ok(())
    }

    /// Queues re-sent page requests from the resend cursor while the queue
    /// has room.
    pub(super) fn refill_requests(&mut self) {
        while let Some((block, from)) = self.recovery.resend {
            let free = self.rp_queue.capacity() - self.rp_queue.len();
            if free < RESEND_ROOM {
                return;
            }
            let next = self
                .postcopy
                .as_deref()
                .and_then(|t| t.get(usize::from(block)))
                .map(|t| t.next_requested(from));
            let page = match next {
                // No such block: every block is done.
                None => {
                    self.recovery.resend = None;
                    return;
                }
                Some(None) => {
                    self.recovery.resend = Some((block + 1, 0));
                    continue;
                }
                Some(Some(page)) => page,
            };
            self.recovery.resend = Some((block, page + 1));
            if self.send_request(block, page).is_err() {
                // Cannot happen with RESEND_ROOM free; stop rather than loop.
                self.recovery.resend = None;
            }
        }
    }

    /// Copies the bitmap's next bytes into `out`, returning how many; ends
    /// the bitmap (and starts the next one asked for) when all are out.
    pub(super) fn bitmap_bytes(&mut self, out: &mut [u8]) -> usize {
        let Some(mut b) = self.recovery.bitmap else {
            return 0;
        };
        let Some(t) = self
            .postcopy
            .as_deref()
            .and_then(|t| t.get(usize::from(b.block)))
        else {
            self.recovery.bitmap = None;
            return 0;
        };
        let size = recv_bitmap_len(t.pages());
        let field = RECV_BITMAP_FIELD_LEN as u64;
        let total = 2 * field + size;
        let mut n = 0;
        for slot in out.iter_mut() {
            if b.pos >= total {
                break;
            }
            *slot = bitmap_byte(t, size, b.pos);
            b.pos += 1;
            n += 1;
        }
        if b.pos < total {
            self.recovery.bitmap = Some(b);
            return n;
        }
        self.recovery.bitmap = None;
        if let Some(next) = self.recovery.pending.pop_front()
            && let Err(e) = self.start_bitmap(next)
        {
            self.stats.error_desc.set(format_args!("{e}"));
        }
        n
    }

    /// Queue bytes that go out before the bitmap being streamed.
    pub(super) fn before_bitmap(&self) -> Option<usize> {
        self.recovery.bitmap.map(|_| self.recovery.mark)
    }

    /// `n` queue bytes went out.
    pub(super) fn drained(&mut self, n: usize) {
        self.recovery.mark = self.recovery.mark.saturating_sub(n);
    }
}

/// Byte `pos` of a block's bitmap payload: be64 `size`, the received-pages
/// bitmap as little-endian words (bits past the last page clear), be64
/// end mark.
fn bitmap_byte(t: &PostcopyTracking<'_>, size: u64, pos: u64) -> u8 {
    let field = RECV_BITMAP_FIELD_LEN as u64;
    if pos < field {
        return size.to_be_bytes()[pos as usize];
    }
    let k = pos - field;
    if k >= size {
        return RECV_BITMAP_END_MARK.to_be_bytes()[(k - size) as usize % 8];
    }
    let word = t.received_word((k / 8) as usize);
    let first_page = k / 8 * 64;
    // Bits past the block's last page stay clear.
    let valid = t.pages().saturating_sub(first_page).min(64);
    let mask = if valid == 64 {
        u64::MAX
    } else {
        (1u64 << valid) - 1
    };
    (word & mask).to_le_bytes()[(k % 8) as usize]
}
