//! Multifd on the source: one sender thread per channel, each writing its
//! connection straight from guest memory (a `writev` of the packet header
//! and the page iovecs), fed by a bounded queue so that the migration
//! thread never runs more than a few packets ahead of the wire.
//!
//! A channel's write error ends its thread and is reported to the
//! migration thread, which fails the migration: the guest runs on here.
//!
//! The postcopy preempt channel has no sender thread (the migration thread
//! writes it, see the driver); its failures are reported as a
//! [`ChannelLost`] of [`ChannelKind::Preempt`].

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::thread::{self, JoinHandle};

use super::super::MigrateError;
use crate::memory::{GuestMemory, PAGE_SIZE, PageIovecs};
use crate::transport::{Connection, TransportError};

/// Packets queued per channel before the migration thread waits: two
/// 1 MiB batches keep the socket busy while the next is prepared.
const QUEUE: usize = 2;

/// What a sender thread writes.
enum Job {
    /// Encoded bytes (the hello, a SYNC packet).
    Bytes(Vec<u8>),
    /// A packet header and entries, then these guest pages.
    Pages { header: Vec<u8>, gfns: Vec<u64> },
}

impl Job {
    fn len(&self) -> u64 {
        match self {
            Job::Bytes(b) => b.len() as u64,
            Job::Pages { header, gfns } => (header.len() + gfns.len() * PAGE_SIZE) as u64,
        }
    }
}

/// What a sender thread's connection carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelKind {
    /// A multifd channel: background pages in packets.
    Multifd,
    /// The postcopy preempt channel: requested pages.
    Preempt,
}

impl ChannelKind {
    /// The name of channel `channel`'s sender thread (what `top -H` and a
    /// debugger show; Linux keeps 15 bytes).
    fn thread_name(self, channel: u16) -> String {
        match self {
            ChannelKind::Multifd => format!("livemig-mfd{channel}"),
            ChannelKind::Preempt => "livemig-preempt".into(),
        }
    }

    /// The sender thread, as [`MigrateError::Spawn`] names it.
    fn sender(self) -> &'static str {
        match self {
            ChannelKind::Multifd => "multifd channel sender",
            ChannelKind::Preempt => "postcopy preempt channel sender",
        }
    }
}

/// A channel's failure, as its sender thread saw it.
#[derive(Debug)]
pub struct ChannelLost {
    /// What the channel carries.
    pub kind: ChannelKind,
    /// The channel (0 for the preempt channel).
    pub channel: u16,
    /// The write that failed (`None`: the thread had already stopped).
    pub error: Option<TransportError>,
}

impl fmt::Display for ChannelLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.kind, &self.error) {
            (ChannelKind::Multifd, Some(e)) => {
                write!(f, "multifd channel {} lost: {e}", self.channel)
            }
            (ChannelKind::Multifd, None) => {
                write!(f, "multifd channel {} has stopped", self.channel)
            }
            (ChannelKind::Preempt, Some(e)) => write!(f, "postcopy preempt channel lost: {e}"),
            (ChannelKind::Preempt, None) => f.write_str("postcopy preempt channel has stopped"),
        }
    }
}

/// The sender threads of a multifd source.
pub(super) struct ChannelSenders {
    kind: ChannelKind,
    queues: Vec<SyncSender<Job>>,
    /// Clones of the connections: for `SIOCOUTQ` and the final shutdown.
    conns: Vec<Connection>,
    threads: Vec<JoinHandle<()>>,
    failures: Receiver<ChannelLost>,
    /// Bytes handed to the queues and not yet written.
    queued: Arc<AtomicU64>,
}

impl ChannelSenders {
    /// Starts a sender thread on each of `conns` (channel `i` on
    /// `conns[i]`), all of `kind`, reading pages from `ram`.
    pub(super) fn start(
        kind: ChannelKind,
        conns: Vec<Connection>,
        ram: &GuestMemory,
    ) -> Result<Self, MigrateError> {
        let (fail_tx, failures) = mpsc::channel();
        let queued = Arc::new(AtomicU64::new(0));
        let mut senders = ChannelSenders {
            kind,
            queues: Vec::new(),
            conns: Vec::new(),
            threads: Vec::new(),
            failures,
            queued: Arc::clone(&queued),
        };
        for (i, conn) in conns.into_iter().enumerate() {
            senders.conns.push(conn.try_clone()?);
            let (tx, rx) = mpsc::sync_channel(QUEUE);
            senders.queues.push(tx);
            let ram = ram.clone();
            let fail: Sender<ChannelLost> = fail_tx.clone();
            let queued = Arc::clone(&queued);
            let channel = i as u16;
            let thread = thread::Builder::new()
                .name(kind.thread_name(channel))
                .spawn(move || send_loop(kind, channel, &conn, &ram, &rx, &queued, &fail))
                .map_err(|error| MigrateError::Spawn {
                    thread: kind.sender(),
                    error,
                })?;
            senders.threads.push(thread);
        }
        Ok(senders)
    }

    /// Queues `bytes` for channel `channel`.
    pub(super) fn send(&self, channel: u16, bytes: &[u8]) -> Result<(), ChannelLost> {
        self.queue(channel, Job::Bytes(bytes.to_vec()))
    }

    /// Queues a packet header and the guest pages `gfns` for `channel`.
    pub(super) fn send_pages(
        &self,
        channel: u16,
        header: &[u8],
        gfns: &[u64],
    ) -> Result<(), ChannelLost> {
        self.queue(
            channel,
            Job::Pages {
                header: header.to_vec(),
                gfns: gfns.to_vec(),
            },
        )
    }

    fn queue(&self, channel: u16, job: Job) -> Result<(), ChannelLost> {
        let kind = self.kind;
        let Some(queue) = self.queues.get(usize::from(channel)) else {
            return Err(ChannelLost {
                kind,
                channel,
                error: None,
            });
        };
        let len = job.len();
        self.queued.fetch_add(len, Ordering::Relaxed);
        let sent = match queue.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) => queue.send(job).map_err(|_| ()),
            Err(TrySendError::Disconnected(_)) => Err(()),
        };
        sent.map_err(|()| {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            // The thread ended: it said why before it did.
            self.failures.recv().unwrap_or(ChannelLost {
                kind,
                channel,
                error: None,
            })
        })
    }

    /// The first channel failure reported since the last call.
    pub(super) fn failure(&self) -> Option<ChannelLost> {
        self.failures.try_recv().ok()
    }

    /// Bytes handed out and not yet taken by the destinations: queued here
    /// or in the channels' socket send queues.
    pub(super) fn unsent_bytes(&self) -> u64 {
        let in_sockets: u64 = self
            .conns
            .iter()
            .filter_map(|c| c.unsent_bytes().ok())
            .sum();
        self.queued.load(Ordering::Relaxed) + in_sockets
    }

    /// Ends the threads: the queues close, the connections are shut down
    /// (a thread blocked on a full socket wakes with an error), and every
    /// thread is joined.
    pub(super) fn finish(self) {
        drop(self.queues);
        for conn in &self.conns {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A sender thread: writes each job in order until the queue closes or a
/// write fails.
fn send_loop(
    kind: ChannelKind,
    channel: u16,
    conn: &Connection,
    ram: &GuestMemory,
    jobs: &Receiver<Job>,
    queued: &AtomicU64,
    fail: &Sender<ChannelLost>,
) {
    while let Ok(job) = jobs.recv() {
        let len = job.len();
        let written = match &job {
            Job::Bytes(bytes) => conn.write_all(bytes),
            Job::Pages { header, gfns } => PageIovecs::new(ram, header, gfns)
                .map_err(TransportError::from)
                .and_then(|p| conn.write_page_iovecs(p)),
        };
        queued.fetch_sub(len, Ordering::Relaxed);
        if let Err(error) = written {
            let _ = fail.send(ChannelLost {
                kind,
                channel,
                error: Some(error),
            });
            return;
        }
    }
}
