//! The return path's reader thread: reads a clone of the connection and
//! forwards the bytes over a channel, so the migration thread can wait on
//! it no longer than the engine's next deadline.
//!
//! With the postcopy preempt channel, once the migration thread has armed
//! its [`Server`], the reader also serves each page request itself, the
//! moment it reads it: the pages go out on the preempt channel from this
//! thread, without waiting for the migration thread, which is busy with
//! the background pass and on a loaded host often waits milliseconds for
//! a CPU (measured: 0.8-5.7 ms from this read to the migration thread's,
//! for a request that then took 25 us to send). The reader decodes the
//! stream with a decoder of its own and serves only what it can check (a
//! named block of guest RAM, page-aligned, inside it, at most
//! [`MAX_SERVED_PAGES`] pages); its events say which requests it served,
//! in order, and the engine books those
//! ([`SourceEngine::handle_served_request`](livemig_core::source::SourceEngine::handle_served_request))
//! instead of serving them again. Every write on the preempt channel, the
//! migration thread's too, holds the server's lock, so no record is ever
//! cut by another.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;

use livemig_core::digest::DigestKey;
use livemig_core::return_path::{RpDecoder, RpMessage};
use livemig_core::source::BatchBuilder;
use livemig_core::wire::BatchFlags;

use crate::clock;
use crate::memory::{GuestMemory, PAGE_SIZE, PageIovecs};
use crate::priority;
use crate::transport::{Connection, TransportError};

use super::dirty_log::KvmPages;

/// Largest request the reader serves itself (a fault asks for one page);
/// a larger one goes to the engine.
pub(super) const MAX_SERVED_PAGES: usize = 16;

const PAGE: u64 = PAGE_SIZE as u64;

/// What the reader saw.
pub(super) enum RpEvent {
    /// Bytes read, `CLOCK_MONOTONIC` nanoseconds when the read returned,
    /// and for each page request whose last byte these bytes carry, in
    /// order, how the reader served it (`None`: not served).
    Bytes(Vec<u8>, u64, Vec<Option<Served>>),
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

/// A request the reader served: what
/// [`handle_served_request`](livemig_core::source::SourceEngine::handle_served_request)
/// books.
pub(super) struct Served {
    /// Bytes written on the preempt channel.
    pub(super) bytes: u64,
    /// The term of each page, in order (0 for a zero entry); empty when
    /// the migration does not verify.
    pub(super) terms: Vec<u64>,
}

/// How the reader serves requests, once armed.
pub(super) struct Serving {
    /// A clone of the preempt channel.
    pub(super) conn: Connection,
    /// The engine's [`page_term_key`](livemig_core::source::SourceEngine::page_term_key).
    pub(super) key: Option<DigestKey>,
    /// Whether zero pages go as zero entries (`zero-page-detection`).
    pub(super) zero_detection: bool,
}

/// The preempt channel's write lock and, while armed, what the reader
/// serves requests with.
pub(super) struct Server {
    ram: GuestMemory,
    serving: Mutex<Option<Serving>>,
}

impl Server {
    pub(super) fn new(ram: GuestMemory) -> Self {
        Server {
            ram,
            serving: Mutex::new(None),
        }
    }

    /// The lock every write on the preempt channel holds; `Some` while
    /// the reader serves.
    pub(super) fn lock(&self) -> MutexGuard<'_, Option<Serving>> {
        // A panic under the lock leaves at worst a record cut short, which
        // the destination refuses.
        self.serving.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves the pages of one request, if armed and checked: the bytes
    /// written and the pages' terms, or `None` (not served: the engine
    /// does it). A failed write
    /// disarms (the migration thread hears of the channel from its own
    /// writes, and the request was not served).
    fn serve(&self, block: u16, start: u64, len: u32) -> Option<Served> {
        let mut guard = self.lock();
        let serving = guard.as_ref()?;
        let region = self.ram.region(usize::from(block)).ok()?;
        let count = u64::from(len) / PAGE;
        let end = start.checked_add(u64::from(len))?;
        if !start.is_multiple_of(PAGE)
            || u64::from(len) % PAGE != 0
            || count == 0
            || count > MAX_SERVED_PAGES as u64
            || end > region.len()
        {
            return None;
        }
        let pages = KvmPages { ram: &self.ram };
        let mut batch = BatchBuilder::<MAX_SERVED_PAGES>::new();
        batch.set_block(block);
        for page in start / PAGE..end / PAGE {
            batch.push_read(&pages, page, serving.zero_detection)?;
        }
        let mut header = [0u8; BatchBuilder::<MAX_SERVED_PAGES>::HEADER_ROOM];
        // Zero entries have no term to hash: theirs is 0.
        let first = start / PAGE;
        let mut terms = vec![
            0u64;
            if serving.key.is_some() {
                count as usize
            } else {
                0
            }
        ];
        let n = batch
            .encode_header(
                &mut header,
                &pages,
                PAGE.trailing_zeros() as u8,
                BatchFlags::empty(),
                serving.key.as_ref(),
                |page, term| {
                    if let Some(t) = terms.get_mut((page - first) as usize) {
                        *t = term;
                    }
                },
            )
            .ok()?;
        let mut gfns = [0u64; MAX_SERVED_PAGES];
        let normal = batch.normal();
        for (gfn, page) in gfns.iter_mut().zip(normal) {
            *gfn = region.guest_phys() / PAGE + page;
        }
        let normal = normal.len();
        let written = PageIovecs::new(&self.ram, &header[..n], &gfns[..normal])
            .map_err(TransportError::from)
            .and_then(|p| serving.conn.write_page_iovecs(p));
        if written.is_err() {
            *guard = None;
            return None;
        }
        Some(Served {
            bytes: n as u64 + normal as u64 * PAGE,
            terms,
        })
    }

    /// The block index of `id` (a region's name).
    fn block(&self, id: &str) -> Option<u16> {
        let index = self.ram.regions().iter().position(|r| r.name() == id)?;
        u16::try_from(index).ok()
    }
}

/// The reader's own decoding of the return path, for the requests it
/// serves.
struct Requests {
    server: Arc<Server>,
    decoder: Option<RpDecoder>,
    /// The block of the last REQ_PAGES_ID (REQ_PAGES reuses it).
    last_block: Option<u16>,
}

impl Requests {
    /// Serves the requests `input` completes; returns what became of each.
    fn serve(&mut self, mut input: &[u8]) -> Vec<Option<Served>> {
        let mut served = Vec::new();
        let Some(decoder) = self.decoder.as_mut() else {
            return served;
        };
        while !input.is_empty() {
            let Ok((used, msg)) = decoder.decode(input) else {
                // The migration thread's decoder fails on the same bytes.
                self.decoder = None;
                return served;
            };
            input = input.get(used..).unwrap_or_default();
            match msg {
                Some(RpMessage::ReqPagesId { block, start, len }) => {
                    self.last_block = self.server.block(block);
                    served.push(
                        self.last_block
                            .and_then(|b| self.server.serve(b, start, len)),
                    );
                }
                Some(RpMessage::ReqPages { start, len }) => {
                    served.push(
                        self.last_block
                            .and_then(|b| self.server.serve(b, start, len)),
                    );
                }
                _ => {}
            }
        }
        served
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

/// Reads `conn` until its end, on a thread of its own, serving page
/// requests with `server` while it is armed.
pub(super) fn spawn_reader(conn: Connection, server: Arc<Server>) -> io::Result<Reader> {
    let (tx, events) = mpsc::channel();
    let tid = Arc::new(AtomicI32::new(0));
    let own_tid = Arc::clone(&tid);
    let mut requests = Requests {
        server,
        decoder: RpDecoder::new(PAGE_SIZE as u32).ok(),
        last_block: None,
    };
    let handle = thread::Builder::new()
        .name("livemig-rp".into())
        .spawn(move || {
            own_tid.store(priority::current_tid(), Ordering::Release);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let event = match conn.read(&mut buf) {
                    Ok(0) => RpEvent::Eof,
                    Ok(n) => {
                        let read_ns = clock::monotonic_ns();
                        let served = requests.serve(&buf[..n]);
                        RpEvent::Bytes(buf[..n].to_vec(), read_ns, served)
                    }
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
