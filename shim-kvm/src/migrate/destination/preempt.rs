//! The postcopy preempt channel on the destination: accepted on the VMM's
//! listener when the main stream announces it, then read on a thread of
//! its own into a queue of its own. The migration thread drains that queue
//! ahead of the main stream's buffers (and between pieces of them), so a
//! requested page never waits behind background pages already read.
//!
//! The bytes go to the engine as they are
//! ([`DestinationEngine::handle_preempt_input`](livemig_core::destination::DestinationEngine::handle_preempt_input)),
//! which checks the hello and places each page under userfaultfd like the
//! main stream's. A read error or a close is an event on the migration
//! thread's main queue, after the bytes read before it, handled where the
//! main connection's are.

use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::Event;
use super::failure::HostFailure;
use crate::transport::{Connection, Listener};

/// Largest read of the preempt channel: requested pages are one or a few
/// pages each.
const READ: usize = 256 * 1024;

/// The preempt channel's connection and its reader thread.
pub(super) struct PreemptReader {
    /// A clone of the connection, to shut it down at the end.
    conn: Connection,
    thread: JoinHandle<()>,
    bytes: Receiver<Vec<u8>>,
}

impl PreemptReader {
    /// Accepts the channel on `listener` (within `deadline`) and starts
    /// its reader; `wake` tells the migration thread that bytes arrived or
    /// that the channel failed.
    pub(super) fn open(
        listener: &Listener,
        deadline: Duration,
        wake: &Sender<Event>,
    ) -> Result<Self, HostFailure> {
        let conn = listener
            .accept_within(deadline)
            .map_err(HostFailure::AcceptPreempt)?;
        let reader = conn.try_clone().map_err(HostFailure::AcceptPreempt)?;
        let (tx, bytes) = mpsc::channel();
        let wake = wake.clone();
        let spawned = thread::Builder::new()
            .name("livemig-preempt".into())
            .spawn(move || {
                loop {
                    let mut buf = vec![0u8; READ];
                    let event = match reader.read(&mut buf) {
                        Ok(0) => Event::PreemptEof,
                        Ok(n) => {
                            buf.truncate(n);
                            if tx.send(buf).is_err() {
                                return;
                            }
                            Event::Preempt
                        }
                        Err(e) => Event::PreemptReadError(e),
                    };
                    let last = !matches!(event, Event::Preempt);
                    if wake.send(event).is_err() || last {
                        return;
                    }
                }
            });
        let thread = spawned.map_err(HostFailure::SpawnPreempt)?;
        Ok(PreemptReader {
            conn,
            thread,
            bytes,
        })
    }

    /// The bytes read so far, in order.
    pub(super) fn take(&self) -> impl Iterator<Item = Vec<u8>> + '_ {
        self.bytes.try_iter()
    }

    /// Ends the reader: the connection is shut down (a read in progress
    /// wakes) and the thread joined.
    pub(super) fn finish(self) {
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        drop(self.bytes);
        let _ = self.thread.join();
    }
}
