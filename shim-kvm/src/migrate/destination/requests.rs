//! Page requests written by the fault thread itself, as QEMU 8's fault
//! thread does: a fault's request goes on the return path the moment it
//! is read, instead of waiting for the migration thread to wake (it is
//! usually busy placing the background pass, and on a loaded host each
//! wake-up of another thread is tens of microseconds to milliseconds).
//!
//! The engine still owns the protocol: it is told of each request after
//! the fact ([`DestinationEngine::handle_page_fault_sent`]), names the
//! block in every request it queues itself from the moment this is opened
//! ([`DestinationEngine::set_host_requests`]), and the migration thread's
//! return-path writes take the same lock, so no message is ever cut by
//! another. The writer is open only while postcopy is active on a live
//! connection: a pause closes it (the engine re-sends every outstanding
//! request after the recovery), and the first write of any other state
//! closes it under the lock, so no request follows the destination's SHUT.
//!
//! [`DestinationEngine::handle_page_fault_sent`]: livemig_core::destination::DestinationEngine::handle_page_fault_sent
//! [`DestinationEngine::set_host_requests`]: livemig_core::destination::DestinationEngine::set_host_requests

use std::sync::{Mutex, MutexGuard};

use livemig_core::return_path::RpMessage;

use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::transport::Connection;

/// Room for one REQ_PAGES_ID: header, range, and a block id of up to 255
/// bytes with its length byte.
pub(super) const REQUEST_LEN: usize = 4 + 12 + 1 + 255;

/// The return path's write side, shared by the migration thread and the
/// fault thread.
#[derive(Default)]
pub(super) struct ReturnPathWriter {
    /// A clone of the connection while the fault thread may write on it.
    direct: Mutex<Option<Connection>>,
}

impl ReturnPathWriter {
    /// The lock every return-path write holds.
    pub(super) fn lock(&self) -> MutexGuard<'_, Option<Connection>> {
        // A panic under the lock leaves nothing half-done but a write,
        // which the peer then refuses.
        self.direct.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the fault thread writes its requests now.
    pub(super) fn is_open(&self) -> bool {
        self.lock().is_some()
    }

    /// Lets the fault thread write its requests on `conn` (false: it could
    /// not be duplicated, and faults keep going through the engine).
    pub(super) fn open(&self, conn: &Connection) -> bool {
        match conn.try_clone() {
            Ok(c) => {
                *self.lock() = Some(c);
                true
            }
            Err(_) => false,
        }
    }

    /// Faults go through the engine again.
    pub(super) fn close(&self) {
        *self.lock() = None;
    }

    /// On the fault thread: writes the request for the page at `gpa` of
    /// `memory` if the writer is open. Returns whether it went out; a
    /// failed write closes the writer (the migration thread hears of the
    /// broken connection from its reader).
    pub(super) fn request(&self, memory: &GuestMemory, gpa: u64, buf: &mut [u8]) -> bool {
        let mut direct = self.lock();
        let Some(conn) = direct.as_ref() else {
            return false;
        };
        let Some((_, region)) = memory.locate(gpa) else {
            return false;
        };
        let msg = RpMessage::ReqPagesId {
            block: region.name(),
            start: gpa - region.guest_phys(),
            len: PAGE_SIZE as u32,
        };
        let Ok(n) = msg.encode(buf) else {
            return false;
        };
        if conn.write_all(buf.get(..n).unwrap_or_default()).is_err() {
            *direct = None;
            return false;
        }
        true
    }
}
