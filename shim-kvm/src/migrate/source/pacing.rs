//! The background pass of a postcopy with the preempt channel, paced so
//! that page requests are never stuck behind a full main socket.
//!
//! With preempt the background pass runs unlimited: it writes as fast as
//! the main socket takes its bytes, and once the destination falls behind
//! the socket is full and the migration thread sits in `write`. A page
//! request the return path delivers meanwhile waits for that write to
//! return: measured here, up to 15 ms, while the preempt channel itself
//! stood empty. So before each action the driver checks the main socket's
//! queue, and while it holds more than [`MAIN_QUEUE_BYTES`] it waits on
//! the return path instead, in slices of [`ROOM_WAIT`], and serves a
//! request the moment one comes. The queue left is still more than the
//! link moves in a slice, so the background pass loses no wire time.

use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use livemig_core::status::MigrationStatus;

use super::MAX_BURST;
use super::driver::SourceDriver;
use crate::clock;

/// Unsent main-stream bytes above which the background pass waits: about
/// half a millisecond of loopback TCP at 2 GB/s, a quarter of the socket's
/// buffer.
pub(super) const MAIN_QUEUE_BYTES: u64 = 1 << 20;

/// Longest one wait for the return path while the main socket drains.
pub(super) const ROOM_WAIT: Duration = Duration::from_micros(100);

impl SourceDriver<'_> {
    /// In postcopy with the preempt channel: waits, serving the return
    /// path, until the main socket has room for the next background batch
    /// or a page request is waiting, for at most [`MAX_BURST`]: a socket
    /// that does not drain by then is left to the write, whose timeout
    /// fails a dead link. Elsewhere returns at once.
    pub(super) fn await_main_room(&mut self) {
        if self.link.preempt.is_none() {
            return;
        }
        let deadline = clock::monotonic_ns() + MAX_BURST.as_nanos() as u64;
        while self.engine.status() == MigrationStatus::PostcopyActive
            && clock::monotonic_ns() < deadline
            && !self.engine.has_page_requests()
            && !self.reader_done
        {
            match self.link.conn.unsent_bytes() {
                Ok(unsent) if unsent + self.link.held.len() as u64 > MAIN_QUEUE_BYTES => {}
                // Room (or a socket that cannot say: then the write waits).
                _ => return,
            }
            match self.events.recv_timeout(ROOM_WAIT) {
                Ok(ev) => {
                    self.on_return_path(ev);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.reader_done = true,
            }
        }
    }
}
