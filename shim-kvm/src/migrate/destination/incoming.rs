//! The source's connection as the destination reads it, and what a paused
//! postcopy waits for instead.
//!
//! [`Incoming`] is one connection: the socket (whose write side is the
//! return path), its reader thread and the reader's pool of buffers. A
//! postcopy cut closes it and the destination waits, [`Pause`], for the
//! source to connect again on the recovery listener; the new connection
//! is a new [`Incoming`], so nothing of the old stream (half a record, a
//! buffer in flight) can reach the engine after it.

use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::AtomicI32;
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Event, READ_BUFFER, READ_BUFFERS, spawn_reader};
use crate::migrate::MigrateError;
use crate::migrate::handle::{MigrationEvent, Shared};
use crate::transport::{Connection, Listener, TransportError};

/// How often a paused destination tells the handle it still waits.
const AWAITING_EVERY: Duration = Duration::from_secs(5);

/// One connection from the source, read on its own thread.
pub(super) struct Incoming {
    pub(super) conn: Connection,
    /// Where the migration thread hands the reader's buffers back.
    pub(super) pool: Sender<Vec<u8>>,
    reader: JoinHandle<()>,
}

impl Incoming {
    /// Starts reading `conn` into [`READ_BUFFERS`] buffers of its own,
    /// each read sent to `events`. Fails if the connection cannot be
    /// duplicated for the reader or the reader's thread cannot start.
    /// The reader stores its kernel thread id in `tid` as it starts.
    pub(super) fn open(
        conn: Connection,
        events: &Sender<Event>,
        tid: &Arc<AtomicI32>,
    ) -> Result<Self, MigrateError> {
        let reader_conn = conn.try_clone()?;
        let (pool, buffers) = mpsc::channel();
        for _ in 0..READ_BUFFERS {
            // The receiver is alive: it is `buffers`, moved into the reader.
            let _ = pool.send(vec![0u8; READ_BUFFER]);
        }
        let reader = spawn_reader(reader_conn, events.clone(), buffers, Arc::clone(tid)).map_err(
            |error| MigrateError::Spawn {
                thread: "main stream reader",
                error,
            },
        )?;
        Ok(Incoming { conn, pool, reader })
    }

    /// Stops the reader and waits for it: without buffers it stops at its
    /// next one, and shutting `how` down frees a read in progress.
    pub(super) fn close(self, how: Shutdown) {
        drop(self.pool);
        let _ = self.conn.shutdown(how);
        let _ = self.reader.join();
    }
}

/// A paused postcopy waiting for the source's new connection.
pub(super) struct Pause {
    /// When the destination gives up.
    deadline: Instant,
    /// When the handle was last told it still waits.
    told: Option<Instant>,
}

/// What a look at the recovery listener found.
pub(super) enum Awaited {
    /// The source's new connection.
    Connection(Connection),
    /// Nothing yet; the deadline has not passed.
    Nothing,
    /// The deadline passed, or there is nothing to listen on: why.
    GiveUp(String),
}

impl Pause {
    pub(super) fn new(timeout: Duration) -> Self {
        Pause {
            deadline: Instant::now() + timeout,
            told: None,
        }
    }

    /// Takes the source's new connection from `listener` if it is there,
    /// without waiting; tells the handle every [`AWAITING_EVERY`] that the
    /// wait goes on.
    pub(super) fn poll(&mut self, listener: Option<&Listener>, shared: &Shared) -> Awaited {
        let Some(listener) = listener else {
            return Awaited::GiveUp(
                "no listener to take the source's new connection on (give the receive a \
                 listener or a recovery address)"
                    .into(),
            );
        };
        match listener.accept_within(Duration::ZERO) {
            Ok(conn) => return Awaited::Connection(conn),
            Err(TransportError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Awaited::GiveUp(format!("the recovery listener failed: {e}")),
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Awaited::GiveUp(format!(
                "the source did not reconnect on {} in time",
                address(listener)
            ));
        }
        if self.told.is_none_or(|t| t.elapsed() >= AWAITING_EVERY) {
            self.told = Some(Instant::now());
            shared.emit(MigrationEvent::AwaitingRecovery {
                address: address(listener),
                seconds_left: left.as_secs(),
                last_error: None,
            });
        }
        Awaited::Nothing
    }
}

/// Where `listener` listens, as the operator gives it.
fn address(listener: &Listener) -> String {
    listener
        .local_uri()
        .map_or_else(|_| "its listener".into(), |u| u.to_string())
}
