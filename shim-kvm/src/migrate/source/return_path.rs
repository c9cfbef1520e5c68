//! The return path's reader thread: reads a clone of the connection and
//! forwards the bytes over a channel, so the migration thread can wait on
//! it no longer than the engine's next deadline.

use std::sync::mpsc::{self, Receiver};
use std::thread;

use crate::clock;
use crate::transport::{Connection, TransportError};

/// What the reader saw.
pub(super) enum RpEvent {
    /// Bytes read, and `CLOCK_MONOTONIC` nanoseconds when the read returned.
    Bytes(Vec<u8>, u64),
    /// The destination closed its end (or the connection was shut down).
    Eof,
    /// Reading failed.
    Error(TransportError),
}

impl RpEvent {
    /// Whether the reader stopped after this event.
    pub(super) fn is_last(&self) -> bool {
        !matches!(self, RpEvent::Bytes(..))
    }
}

/// Reads `conn` until its end, on a thread of its own.
pub(super) fn spawn_reader(conn: Connection) -> (Receiver<RpEvent>, thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let event = match conn.read(&mut buf) {
                Ok(0) => RpEvent::Eof,
                Ok(n) => RpEvent::Bytes(buf[..n].to_vec(), clock::monotonic_ns()),
                Err(e) => RpEvent::Error(e),
            };
            let last = event.is_last();
            if tx.send(event).is_err() || last {
                break;
            }
        }
    });
    (rx, handle)
}
