//! The return path's reader thread: reads a clone of the connection and
//! forwards the bytes over a channel, so the migration thread can wait on
//! it no longer than the engine's next deadline.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::thread;

use crate::clock;
use crate::priority;
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

/// The reader thread: its events, its handle and its kernel thread id (0
/// until the thread has started), which the stop raises with the
/// migration thread's.
pub(super) struct Reader {
    pub(super) events: Receiver<RpEvent>,
    pub(super) handle: thread::JoinHandle<()>,
    pub(super) tid: Arc<AtomicI32>,
}

/// Reads `conn` until its end, on a thread of its own.
pub(super) fn spawn_reader(conn: Connection) -> io::Result<Reader> {
    let (tx, events) = mpsc::channel();
    let tid = Arc::new(AtomicI32::new(0));
    let own_tid = Arc::clone(&tid);
    let handle = thread::Builder::new()
        .name("livemig-rp".into())
        .spawn(move || {
            own_tid.store(priority::current_tid(), Ordering::Release);
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
        })?;
    Ok(Reader {
        events,
        handle,
        tid,
    })
}
