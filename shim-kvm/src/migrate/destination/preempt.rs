//! The postcopy preempt channel on the destination: accepted on the VMM's
//! listener when the main stream announces it, then read on a thread of
//! its own, which places each requested page itself the moment it is
//! read (as QEMU's preempt thread does): the vCPU waiting for it need not
//! wait for the migration thread to wake, which is busy placing the
//! background pass and on a loaded host takes milliseconds to get a CPU.
//!
//! The engine still owns the protocol. The reader places a batch only
//! once it is armed (postcopy active, guest RAM registered) and only if
//! [`check_preempt_pages`] passes it (what the engine accepts too), and
//! hands every byte on to the migration thread's queue all the same. The
//! migration thread drains that queue ahead of the main stream's buffers
//! (and between pieces of them) into
//! [`DestinationEngine::handle_preempt_input`](livemig_core::destination::DestinationEngine::handle_preempt_input),
//! which checks the hello, books each page and places it as it places the
//! main stream's: a page the reader installed is found present then and
//! left as it is. A batch the reader passed over (not armed, or refused)
//! is placed, or refused, there. A read error or a close is an event on
//! the migration thread's main queue, after the bytes read before it,
//! handled where the main connection's are.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::memory::slice_page_term;
use livemig_core::destination::check_preempt_pages;
use livemig_core::digest::DigestKey;
use livemig_core::wire::{self, PREEMPT_HELLO_LEN, PageBatch, PreemptHello, Record, StreamDecoder};

use super::Event;
use super::failure::HostFailure;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::migrate::ram_layout;
use crate::postcopy::PostcopyRam;
use crate::transport::{Connection, Listener};

/// What the reader places with, once armed.
struct Armed {
    ram: Arc<PostcopyRam>,
    /// The engine's [`page_term_key`](livemig_core::destination::DestinationEngine::page_term_key).
    key: Option<DigestKey>,
}

/// The reader's own reading of the channel, to place pages ahead of the
/// engine: the hello (checked against the migration id), then records.
struct Ahead {
    memory: GuestMemory,
    migration_id: u64,
    armed: Arc<Mutex<Option<Armed>>>,
    hello: [u8; PREEMPT_HELLO_LEN],
    hello_fill: usize,
    /// Set on anything the reader cannot follow (a bad hello, bytes that
    /// do not decode): from then on the engine alone reads the channel,
    /// and refuses it.
    lost: bool,
}

impl Ahead {
    /// Places the checked pages of `input` that are still missing.
    fn place(&mut self, decoder: &mut StreamDecoder<'_>, mut input: &[u8]) {
        if self.lost {
            return;
        }
        if self.hello_fill < PREEMPT_HELLO_LEN {
            let take = (PREEMPT_HELLO_LEN - self.hello_fill).min(input.len());
            self.hello[self.hello_fill..self.hello_fill + take].copy_from_slice(&input[..take]);
            self.hello_fill += take;
            input = &input[take..];
            if self.hello_fill < PREEMPT_HELLO_LEN {
                return;
            }
            match PreemptHello::decode(&self.hello) {
                Ok(h) if h.migration_id == self.migration_id => {}
                _ => {
                    self.lost = true;
                    return;
                }
            }
        }
        while !input.is_empty() {
            let Ok(decoded) = decoder.decode(input) else {
                self.lost = true;
                return;
            };
            input = input.get(decoded.consumed..).unwrap_or_default();
            if let Some(Record::Pages(batch)) = decoded.record {
                self.place_batch(&batch);
            }
        }
    }

    fn place_batch(&self, batch: &PageBatch<'_>) {
        let armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        let Some(armed) = armed.as_ref() else {
            return;
        };
        let Ok(layout) = ram_layout(&self.memory) else {
            return;
        };
        if check_preempt_pages(&layout, armed.key, batch, slice_page_term).is_err() {
            return;
        }
        let Ok(region) = self.memory.region(usize::from(batch.block())) else {
            return;
        };
        for (entry, data) in batch.pages() {
            let gpa = region.guest_phys() + entry.index * PAGE_SIZE as u64;
            // A failure here is the engine's to report: it places the same
            // page next and meets the same error.
            let _ = match data {
                Some(data) => armed.ram.place(gpa, data),
                None => armed.ram.place_zero(gpa, PAGE_SIZE as u64),
            };
        }
    }
}

/// Largest read of the preempt channel: requested pages are one or a few
/// pages each.
const READ: usize = 256 * 1024;

/// The preempt channel's connection and its reader thread.
pub(super) struct PreemptReader {
    /// A clone of the connection, to shut it down at the end.
    conn: Connection,
    thread: JoinHandle<()>,
    bytes: Receiver<Vec<u8>>,
    /// Where [`PreemptReader::arm`] lets the reader place pages.
    armed: Arc<Mutex<Option<Armed>>>,
}

impl PreemptReader {
    /// Accepts the channel on `listener` (within `deadline`) and starts
    /// its reader; `wake` tells the migration thread that bytes arrived or
    /// that the channel failed.
    /// `memory` is the guest's RAM, and `migration_id` the one the
    /// channel's hello must carry, for the pages the reader places itself.
    pub(super) fn open(
        listener: &Listener,
        deadline: Duration,
        wake: &Sender<Event>,
        memory: GuestMemory,
        migration_id: u64,
    ) -> Result<Self, HostFailure> {
        let conn = listener
            .accept_within(deadline)
            .map_err(HostFailure::AcceptPreempt)?;
        let reader = conn.try_clone().map_err(HostFailure::AcceptPreempt)?;
        let (tx, bytes) = mpsc::channel();
        let wake = wake.clone();
        let armed = Arc::new(Mutex::new(None));
        let mut ahead = Ahead {
            memory,
            migration_id,
            armed: Arc::clone(&armed),
            hello: [0; PREEMPT_HELLO_LEN],
            hello_fill: 0,
            lost: false,
        };
        let spawned = thread::Builder::new()
            .name("livemig-preempt".into())
            .spawn(move || {
                let mut scratch = vec![0u8; wire::MAX_RECORD_BODY + wire::RECORD_HEADER_LEN];
                let mut decoder = StreamDecoder::records(&mut scratch);
                // One buffer for the thread's life, and only the bytes read
                // go to the migration thread: a fresh zeroed 256 KiB a read
                // cost this thread ~35 us of CPU per request here (perf
                // sched: 45 us on the CPU per wake-up, median, 10 us
                // since), on a host whose two cores the guest's vCPUs and
                // the background pass already want.
                let mut buf = vec![0u8; READ];
                loop {
                    let event = match reader.read(&mut buf) {
                        Ok(0) => Event::PreemptEof,
                        Ok(n) => {
                            ahead.place(&mut decoder, &buf[..n]);
                            if tx.send(buf[..n].to_vec()).is_err() {
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
            armed,
        })
    }

    /// From now on the reader places the pages it reads into `ram`,
    /// checked with `key` (see the module docs); the migration thread arms
    /// it once postcopy is active.
    pub(super) fn arm(&self, ram: Arc<PostcopyRam>, key: Option<DigestKey>) {
        *self.armed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Armed { ram, key });
    }

    /// Whether [`arm`](Self::arm) was called.
    pub(super) fn is_armed(&self) -> bool {
        self.armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
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
