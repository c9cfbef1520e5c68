//! The destination side: loads an incoming stream into a fresh KVM guest
//! and starts it.
//!
//! Everything the destination hears arrives on one channel: bytes of the
//! stream from a reader thread (on a clone of the connection), and wake-ups
//! from the postcopy fault thread. The migration thread waits on it no
//! longer than the engine's next deadline, so a source that falls silent
//! fails the migration after the engine's idle timeout instead of leaving
//! the destination blocked in `read` forever. The reader works with a small
//! pool of buffers, which bounds what is queued and keeps a page fault from
//! waiting behind more than a few MiB of stream.
//!
//! The stream goes to a [`DestinationEngine`] (always built with postcopy
//! tracking: two bitmaps), which validates everything before it touches
//! guest memory and calls back into [`KvmHost`] to place pages and load the
//! vCPU state; the return-path bytes it queues (LOADED, SHUT, page
//! requests) go back on the same connection.
//!
//! The vCPU section ([`CPU_DEVICE_ID`]) is required: a stream that ends
//! without it is refused, and the guest never starts from reset. With the
//! return path, a precopy ends with the commit handshake: the end of the
//! stream is answered with LOADED and the vCPU stays parked until the
//! source's COMMIT arrives. If the stream ends any other way after LOADED,
//! the end is ambiguous (the source may have committed): [`receive`]
//! returns with the VM loaded and the vCPU parked, and the report's
//! `stats.ambiguous_end` says what the operator must do.
//!
//! # Postcopy
//!
//! When the source advises postcopy, the host checks that a full
//! userfaultfd can be created and resets KVM's dirty log, so that from then
//! on a dirty bit means "written by the guest on this destination". At the
//! first discard (or at listen) guest RAM is registered with userfaultfd
//! ([`PostcopyRam`]) and a fault thread started; from then on pages are
//! installed atomically (`UFFDIO_COPY` / `UFFDIO_ZEROPAGE`). The postcopy
//! run command starts the vCPU. A fault becomes
//! [`DestinationEngine::handle_page_fault`], whose request goes back on the
//! return path, except for a page that already arrived as a zero page in
//! precopy: fresh memory was left untouched for it, so it is filled with
//! zeros here without asking the source. At the end of the stream the RAM
//! is unregistered (which also wakes any thread still waiting) and the
//! fault latency (request sent → page installed) and per-thread blocktime
//! are reported.

mod failure;

use std::net::Shutdown;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use livemig_core::bitmap::{DirtyBitmap, words_for};
use livemig_core::destination::{
    DestError, DestinationEngine, DestinationHost, HandleError, PostcopyHost as EnginePostcopyHost,
    PostcopyTracking, RequiredSection,
};
use livemig_core::stats::MigrationStats;
use livemig_core::status::MigrationStatus;
use livemig_core::wire::{self, DeviceState, PageRange};

use super::handle::{CancelRefused, Shared};
use super::{
    CPU_DEVICE_ID, CPU_STATE_VERSION, MigrateError, ReceiveHandle, SlotMap, digest_outside,
    ram_layout, written_ranges,
};
use crate::clock;
use crate::dirty_log::{DirtyLogError, DirtyLogMode};
use crate::guest::{self, StampCheck};
use crate::interrupt::Cancel;
use crate::memory::{GuestMemory, PAGE_SIZE, RegionLayout, page_digest};
use crate::postcopy::{FaultThread, PostcopyRam, PostcopyStats};
use crate::transport::{Connection, TransportError};
use crate::vcpu::Vcpu;
use crate::vm::Vm;
pub use failure::{HostFailure, ReceiveFailure};

const ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
const PAGE: u64 = PAGE_SIZE as u64;

/// The sections a guest cannot start without: its vCPU state.
const REQUIRED: &[RequiredSection] = &[RequiredSection {
    id: CPU_DEVICE_ID,
    instance: 0,
}];

/// Size of each of the reader's buffers.
const READ_BUFFER: usize = 1 << 20;
/// Buffers the reader may fill before the migration thread hands one back:
/// at most this many MiB of stream wait in the queue.
const READ_BUFFERS: usize = 4;
/// Longest the migration thread waits before reporting progress.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// What a postcopy destination measured.
#[derive(Debug, Clone, Default)]
pub struct PostcopyReport {
    /// `CLOCK_MONOTONIC` nanoseconds when the postcopy run command resumed
    /// the vCPU (the end of the downtime).
    pub started_ns: Option<u64>,
    /// Page requests sent to the source.
    pub requests: u64,
    /// Requests answered, each one a latency sample.
    pub latency_samples: usize,
    /// Median time from a request sent to its page installed, microseconds.
    pub latency_median_us: Option<f64>,
    /// 99th percentile of the same, microseconds.
    pub latency_p99_us: Option<f64>,
    /// Faults on pages that had arrived as zero pages in precopy, filled
    /// here without a request.
    pub local_zero_fills: u64,
    /// Time spent blocked on missing pages by each vCPU thread (by thread
    /// id, sorted): QEMU's per-vCPU postcopy blocktime.
    pub vcpu_blocktime: Vec<(i32, Duration)>,
    /// The userfaultfd counters (faults read, duplicates, pages placed...).
    pub faults: PostcopyStats,
    /// Why the vCPU stopped during postcopy, if it did (a fault KVM could
    /// not deliver to userfaultfd is named as such).
    pub vcpu_error: Option<String>,
    /// The [`page_digest`] of every guest page as it was installed here
    /// (0 for zero pages and pages never placed), indexed by page: what a
    /// page the guest then wrote held at the source's stop.
    pub installed: Vec<u64>,
}

/// What the destination loaded.
#[derive(Debug)]
pub struct DestinationReport {
    /// The engine's final statistics.
    pub stats: MigrationStats,
    /// Why the migration failed, in words for an operator (the engine's
    /// error mapped to the cause: size mismatch, not a livemig peer...).
    /// When `stats.ambiguous_end` is set as well, the VM holds the whole
    /// loaded guest with its vCPU parked: keep it until the operator
    /// decides (its advice says how).
    pub error: Option<ReceiveFailure>,
    /// Digest of guest memory once the stream was loaded, before the vCPU
    /// ran (compare with the source's digest at its stop). `None` after
    /// postcopy, where the guest ran during the load: see
    /// [`watch_postcopy_guest`].
    pub digest: Option<u64>,
    /// `CLOCK_MONOTONIC` nanoseconds when the stream was fully loaded.
    pub loaded_ns: Option<u64>,
    /// Milliseconds spent computing `digest` (part of the downtime).
    pub digest_ms: f64,
    /// Set when the migration switched to postcopy (the guest already runs).
    pub postcopy: Option<PostcopyReport>,
}

/// The postcopy side of [`KvmHost`].
#[derive(Default)]
struct PostcopyHost {
    /// [`PostcopyReport::installed`], kept from the advise on (which comes
    /// before any page).
    installed: Vec<u64>,
    /// Guest RAM under userfaultfd, from the first discard or the listen.
    ram: Option<Arc<PostcopyRam>>,
    fault_thread: Option<FaultThread>,
    local_zero_fills: u64,
    started_ns: Option<u64>,
}

/// Faults forwarded by the fault thread, waiting for the migration thread.
type FaultQueue = Arc<Mutex<Vec<u64>>>;

/// Guest RAM and the vCPU as the engine writes them.
pub struct KvmHost<'a> {
    vm: &'a Vm,
    ram: &'a GuestMemory,
    vcpu: &'a Vcpu,
    /// Pages written during this migration and not zeroed since: fresh
    /// memory reads as zero, so only these need zeroing for a zero page.
    /// One bit per guest page, in the core's bitmap layout.
    placed: Vec<u64>,
    /// Guest pages.
    pages: u64,
    /// Set by the postcopy advise.
    postcopy: Option<PostcopyHost>,
    /// Where the fault thread wakes the migration thread.
    events: Sender<Event>,
    faults: FaultQueue,
}

impl<'a> KvmHost<'a> {
    /// A host over the fresh (all-zero) RAM of `vm` and its parked `vcpu`;
    /// a postcopy fault thread wakes the caller through `events`.
    fn new(vm: &'a Vm, vcpu: &'a Vcpu, events: Sender<Event>) -> Self {
        let ram = vm.ram();
        let pages = ram.size() / PAGE;
        KvmHost {
            vm,
            ram,
            vcpu,
            placed: vec![0; words_for(pages)],
            pages,
            postcopy: None,
            events,
            faults: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The placed pages, as the core's bitmap over this host's words.
    fn placed(&mut self) -> Option<DirtyBitmap<'_>> {
        DirtyBitmap::new(&mut self.placed, self.pages).ok()
    }

    fn mark(&mut self, page: u64, placed: bool) {
        if let Some(mut bitmap) = self.placed() {
            // A page outside guest RAM has no bit: the write was refused.
            let _ = if placed {
                bitmap.set(page)
            } else {
                bitmap.clear(page)
            };
        }
    }

    fn is_placed(&mut self, page: u64) -> bool {
        self.placed().is_some_and(|bitmap| bitmap.test(page))
    }

    /// Notes the digest of pages `first ..` installed from `data` (whole
    /// pages), once postcopy was advised.
    fn note_installed(&mut self, first: u64, data: &[u8]) {
        let Some(pc) = self.postcopy.as_mut() else {
            return;
        };
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let p = first + i as u64;
            if let (Some(d), Ok(page)) = (pc.installed.get_mut(p as usize), page.try_into()) {
                *d = page_digest(p, page);
            }
        }
    }

    /// Notes pages `first .. first + count` as zero (installed as zero
    /// pages, or discarded: missing pages read as zero at the end).
    fn note_zero(&mut self, first: u64, count: u64) {
        if let Some(pc) = self.postcopy.as_mut() {
            let end = first.saturating_add(count).min(pc.installed.len() as u64);
            if let Some(d) = pc.installed.get_mut(first as usize..end as usize) {
                d.fill(0);
            }
        }
    }

    /// Guest page numbers written during the load and not zeroed since:
    /// every other page of the fresh RAM is still zero.
    pub fn placed_pages(&mut self) -> impl Iterator<Item = u64> + '_ {
        let bitmap = self.placed();
        let mut next = 0;
        std::iter::from_fn(move || {
            let page = bitmap.as_ref()?.find_next_set(next)?;
            next = page + 1;
            Some(page)
        })
    }

    /// Guest RAM under userfaultfd, registering it (and starting the fault
    /// thread) on first use.
    fn postcopy_ram(&mut self) -> Result<Arc<PostcopyRam>, HostFailure> {
        let Some(pc) = self.postcopy.as_mut() else {
            return Err(HostFailure::PostcopyBeforeAdvise);
        };
        if let Some(ram) = &pc.ram {
            return Ok(Arc::clone(ram));
        }
        let ram = match PostcopyRam::register(self.vm.ram().clone()) {
            Ok(r) => Arc::new(r),
            Err(e) => return Err(HostFailure::Register(e)),
        };
        let (events, faults) = (self.events.clone(), Arc::clone(&self.faults));
        let thread = ram.start_fault_thread(move |f| {
            if let Ok(mut q) = faults.lock() {
                q.push(f.gpa / PAGE);
            }
            // The migration thread gone means the migration is over.
            let _ = events.send(Event::Fault);
        });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => return Err(HostFailure::StartFaultThread(e)),
        };
        if let Some(pc) = self.postcopy.as_mut() {
            pc.ram = Some(Arc::clone(&ram));
            pc.fault_thread = Some(thread);
        }
        Ok(ram)
    }

    /// Guest RAM under userfaultfd, once registered: from then on every
    /// placement must be atomic.
    fn registered(&self) -> Option<Arc<PostcopyRam>> {
        self.postcopy.as_ref()?.ram.clone()
    }

    /// A fault on `page`, which arrived as a zero page in precopy and was
    /// never written here: fills it with zeros (an `EEXIST` means it was
    /// installed meanwhile, which is as good).
    fn fill_zero(&mut self, page: u64) -> Result<(), ReceiveFailure> {
        let Some(ram) = self.registered() else {
            return Err(ReceiveFailure::FaultBeforeRegister);
        };
        let placed = ram
            .place_zero(page * PAGE, PAGE)
            .map_err(ReceiveFailure::ZeroFill)?;
        if let Some(pc) = self.postcopy.as_mut() {
            pc.local_zero_fills += placed.installed;
        }
        Ok(())
    }

    /// Whether the fault thread ended by itself (on an error) while guest
    /// RAM is registered: faults would no longer be served.
    fn fault_thread_died(&self) -> bool {
        self.postcopy
            .as_ref()
            .and_then(|pc| pc.fault_thread.as_ref())
            .is_some_and(FaultThread::is_finished)
    }

    /// The end of postcopy: unregisters guest RAM (waking any thread still
    /// waiting: every page not present now arrived as a zero page), stops
    /// the fault thread and gathers the figures.
    fn finish_postcopy(&mut self) -> Result<PostcopyReport, ReceiveFailure> {
        let Some(mut pc) = self.postcopy.take() else {
            return Ok(PostcopyReport::default());
        };
        let mut report = PostcopyReport {
            started_ns: pc.started_ns,
            local_zero_fills: pc.local_zero_fills,
            installed: std::mem::take(&mut pc.installed),
            ..PostcopyReport::default()
        };
        if let Some(ram) = pc.ram.take() {
            if let Some(Some(e)) = self.vcpu.stopped() {
                report.vcpu_error = Some(
                    ram.explain_vcpu_error(&e)
                        .map_or_else(|| e.to_string(), |p| p.to_string()),
                );
            }
            ram.unregister().map_err(ReceiveFailure::EndPostcopy)?;
            if let Some(t) = pc.fault_thread.take() {
                t.stop().map_err(ReceiveFailure::FaultThread)?;
            }
            report.faults = ram.stats();
            report.vcpu_blocktime = report
                .faults
                .blocktime
                .iter()
                .filter(|&&(tid, _)| is_vcpu_thread(tid))
                .copied()
                .collect();
        }
        // The fault latencies are the userfaultfd layer's books (fault
        // read → page placed), with the core's nearest-rank percentile.
        report.latency_samples = report.faults.latency_samples;
        report.latency_median_us = report.faults.latency_median_us;
        report.latency_p99_us = report.faults.latency_p99_us;
        Ok(report)
    }
}

/// Whether thread `tid` of this process is a vCPU thread (by its name).
fn is_vcpu_thread(tid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .is_ok_and(|name| name.starts_with("livemig-vcpu"))
}

/// Reads every slot's dirty log into `words` (one bit per guest page).
fn fetch_dirty_log(vm: &Vm, map: &SlotMap, words: &mut [u64]) -> Result<(), DirtyLogError> {
    for &(slot, first, pages) in map.slots() {
        let from = (first / 64) as usize;
        let to = from + pages.div_ceil(64) as usize;
        let part = words
            .get_mut(from..to)
            .ok_or(DirtyLogError::NoSuchRegion(slot))?;
        vm.get_dirty_log(slot, part)?;
    }
    Ok(())
}

/// Forgets every dirty bit so far (manual mode starts with all bits set;
/// get-and-clear mode clears by fetching): from now on a dirty bit means
/// the guest wrote the page here. Pages written by this process (placed
/// pages) never set a bit.
fn reset_dirty_log(vm: &Vm) -> Result<(), DirtyLogError> {
    let map = SlotMap::new(vm.ram());
    let pages: u64 = map.slots().iter().map(|s| s.2).sum();
    let mut words = vec![0u64; pages.div_ceil(64) as usize];
    fetch_dirty_log(vm, &map, &mut words)?;
    if vm.dirty_log_mode() == DirtyLogMode::ManualProtect {
        for &(slot, first, pages) in map.slots() {
            let from = (first / 64) as usize;
            let mask = words.get(from..).ok_or(DirtyLogError::NoSuchRegion(slot))?;
            vm.clear_dirty_log(slot, 0, pages, mask)?;
        }
    }
    Ok(())
}

impl DestinationHost for KvmHost<'_> {
    type Error = HostFailure;

    fn place_pages(
        &mut self,
        _block: u16,
        first_page: u64,
        data: &[u8],
    ) -> Result<(), HostFailure> {
        if let Some(ram) = self.registered() {
            if let Err(e) = ram.place(first_page * PAGE, data) {
                return Err(HostFailure::Copy(e));
            }
            self.note_installed(first_page, data);
            return Ok(());
        }
        self.note_installed(first_page, data);
        for (i, chunk) in data.chunks(PAGE_SIZE).enumerate() {
            let p = first_page + i as u64;
            if let Err(e) = self.ram.write(p * PAGE, chunk) {
                return Err(HostFailure::WriteRam(e));
            }
            self.mark(p, true);
        }
        Ok(())
    }

    fn place_zero_pages(
        &mut self,
        _block: u16,
        first_page: u64,
        count: u64,
    ) -> Result<(), HostFailure> {
        if let Some(ram) = self.registered() {
            // Under userfaultfd a page never written is missing, not zero:
            // every zero page is installed.
            if let Err(e) = ram.place_zero(first_page * PAGE, count * PAGE) {
                return Err(HostFailure::ZeroPage(e));
            }
            self.note_zero(first_page, count);
            return Ok(());
        }
        self.note_zero(first_page, count);
        for p in first_page..first_page.saturating_add(count) {
            if self.is_placed(p) {
                if let Err(e) = self.ram.write(p * PAGE, &ZERO_PAGE) {
                    return Err(HostFailure::WriteRam(e));
                }
                self.mark(p, false);
            }
        }
        Ok(())
    }

    fn load_device(&mut self, device: &DeviceState<'_>) -> Result<(), HostFailure> {
        if device.id.as_str() != CPU_DEVICE_ID || device.instance != 0 {
            return Err(HostFailure::UnknownDevice {
                id: device.id.as_str().to_string(),
                instance: device.instance,
            });
        }
        if device.version != CPU_STATE_VERSION {
            return Err(HostFailure::DeviceVersion(device.version));
        }
        self.vcpu
            .load_state(device.data)
            .map_err(HostFailure::LoadVcpu)
    }

    fn postcopy(&mut self) -> Option<&mut dyn EnginePostcopyHost<Error = HostFailure>> {
        Some(self)
    }
}

impl EnginePostcopyHost for KvmHost<'_> {
    type Error = HostFailure;

    fn postcopy_advise(
        &mut self,
        host_page_size: u64,
        target_page_size: u64,
    ) -> Result<(), HostFailure> {
        if host_page_size != PAGE || target_page_size != PAGE {
            return Err(HostFailure::PageSize {
                host: host_page_size,
                target: target_page_size,
            });
        }
        // A one-page probe: the same userfaultfd the guest RAM will get, so
        // a missing permission fails here, before anything is transferred.
        let probe = RegionLayout::contiguous("probe", PAGE, PAGE)
            .and_then(|layout| GuestMemory::anonymous(&layout))
            .map_err(HostFailure::ProbeMemory)
            .and_then(|r| PostcopyRam::register(r).map_err(HostFailure::NoUserfaultfd));
        probe?;
        if let Err(e) = reset_dirty_log(self.vm) {
            return Err(HostFailure::ResetDirtyLog(e));
        }
        self.postcopy = Some(PostcopyHost {
            installed: vec![0; (self.ram.size() / PAGE) as usize],
            ..PostcopyHost::default()
        });
        Ok(())
    }

    fn discard(&mut self, _block: u16, range: PageRange) -> Result<(), HostFailure> {
        let ram = self.postcopy_ram()?;
        ram.discard(range.first * PAGE, range.count * PAGE)
            .map_err(HostFailure::Discard)?;
        self.note_zero(range.first, range.count);
        Ok(())
    }

    fn postcopy_listen(&mut self) -> Result<(), HostFailure> {
        self.postcopy_ram().map(drop)
    }

    fn postcopy_run(&mut self) -> Result<(), HostFailure> {
        let now = clock::monotonic_ns();
        if let Err(e) = self.vcpu.resume() {
            return Err(HostFailure::StartVcpu(e));
        }
        if let Some(pc) = self.postcopy.as_mut() {
            pc.started_ns = Some(now);
        }
        Ok(())
    }
}

/// What the migration thread waits for.
enum Event {
    /// A buffer of stream bytes (the buffer, bytes used).
    Bytes(Vec<u8>, usize),
    /// The source closed the connection.
    Eof,
    /// Reading the connection failed.
    ReadError(TransportError),
    /// The fault thread queued a fault.
    Fault,
}

/// Reads the connection into buffers taken from `pool` until the end.
fn spawn_reader(
    conn: Connection,
    events: Sender<Event>,
    pool: Receiver<Vec<u8>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        // No buffer back means the migration thread is done.
        while let Ok(mut buf) = pool.recv() {
            let event = match conn.read(&mut buf) {
                Ok(0) => Event::Eof,
                Ok(n) => Event::Bytes(buf, n),
                Err(e) => Event::ReadError(e),
            };
            let last = !matches!(event, Event::Bytes(..));
            if events.send(event).is_err() || last {
                break;
            }
        }
    })
}

/// Starts loading the stream arriving on `conn` into `vm` and its parked
/// `vcpu` on a migration thread of its own, and returns its handle at
/// once. [`ReceiveHandle::join`] gives the report of a migration that ran,
/// whatever its outcome. After a precopy the vCPU is left parked: start it
/// with [`start_guest`]. After a postcopy it already runs (see
/// [`DestinationReport::postcopy`]): watch it with [`watch_postcopy_guest`].
///
/// [`ReceiveHandle::interrupt`] (Ctrl-C, SIGTERM) or
/// [`ReceiveHandle::cancel`] stops the load and tells the source, which
/// resumes its guest, unless the guest already runs here (postcopy): that
/// is refused with a line on stderr, and the load goes on.
///
/// `Err` means it could not even be set up. The caller keeps its own
/// `Arc`s of `vm` and `vcpu`; the thread drops its clones when it ends.
pub fn receive(
    vm: Arc<Vm>,
    vcpu: Arc<Vcpu>,
    conn: Connection,
    idle_timeout: Duration,
) -> Result<ReceiveHandle, MigrateError> {
    ram_layout(vm.ram()).map_err(MigrateError::Layout)?;
    let reader_conn = conn.try_clone()?;
    ReceiveHandle::spawn(Arc::new(Shared::default()), move |shared| {
        run(&vm, &vcpu, &conn, reader_conn, idle_timeout, shared)
    })
}

/// The migration thread's body: the engine over this thread's own storage,
/// fed until the stream ends.
fn run(
    vm: &Vm,
    vcpu: &Vcpu,
    conn: &Connection,
    reader_conn: Connection,
    idle_timeout: Duration,
    shared: &Shared,
) -> Result<DestinationReport, MigrateError> {
    let layout = [ram_layout(vm.ram()).map_err(MigrateError::Layout)?];
    let pages = vm.ram().size() / PAGE;
    let mut received = vec![0u64; PostcopyTracking::words(pages)];
    let mut requested = vec![0u64; PostcopyTracking::words(pages)];
    let mut tracking = [PostcopyTracking::new(&mut received, &mut requested, pages)
        .map_err(MigrateError::PostcopyTracking)?];
    let mut scratch = vec![0u8; wire::MAX_RECORD_BODY + wire::RECORD_HEADER_LEN];
    let mut engine = DestinationEngine::with_postcopy(&layout, &mut scratch, &mut tracking)
        .map_err(MigrateError::Destination)?;
    // The connection is up: a source that never sends is given up on too.
    engine.set_idle_timeout(idle_timeout);
    engine
        .require_sections(REQUIRED)
        .map_err(MigrateError::Destination)?;
    engine.begin(clock::now());
    let (tx, events) = mpsc::channel();
    let (pool_tx, pool) = mpsc::channel();
    for _ in 0..READ_BUFFERS {
        // The receiver is alive: it is `pool`, moved into the reader below.
        let _ = pool_tx.send(vec![0u8; READ_BUFFER]);
    }
    let reader = spawn_reader(reader_conn, tx.clone(), pool);
    let mut host = KvmHost::new(vm, vcpu, tx);
    let mut error = run_receive_loop(&mut engine, &mut host, conn, &events, &pool_tx, shared);
    // Free a reader still blocked in read (a failed migration) and let it
    // end: without buffers it stops at its next one.
    drop(pool_tx);
    let _ = conn.shutdown(Shutdown::Read);
    drop(events);
    let _ = reader.join();

    let mut report = DestinationReport {
        stats: engine.stats().clone(),
        error: None,
        digest: None,
        loaded_ns: None,
        digest_ms: 0.0,
        postcopy: None,
    };
    let in_postcopy = host.registered().is_some();
    if in_postcopy {
        let mut postcopy = host.finish_postcopy().unwrap_or_else(|e| {
            error.get_or_insert(e);
            PostcopyReport::default()
        });
        postcopy.requests = report.stats.ram.postcopy_requests;
        report.postcopy = Some(postcopy);
        if !engine.is_completed() || error.is_some() {
            // A failed postcopy leaves a guest whose missing pages now read
            // as zero: stop it (only possible once no page is awaited, that
            // is after the unregister above). A vCPU that already stopped
            // has nothing to pause.
            let _ = vcpu.pause();
        }
    }
    if engine.is_completed() && error.is_none() {
        let loaded = clock::monotonic_ns();
        report.loaded_ns = Some(loaded);
        if !in_postcopy {
            // Only pages written during the load can be non-zero: the rest
            // of the fresh RAM was never touched, so this equals the full
            // digest.
            report.digest = Some(
                vm.ram()
                    .digest_of(host.placed_pages())
                    .map_err(MigrateError::Memory)?,
            );
            report.digest_ms = (clock::monotonic_ns() - loaded) as f64 / 1e6;
        }
    } else {
        report.error = Some(error.unwrap_or_else(|| {
            ReceiveFailure::Failed(Box::new(engine.stats().error_desc.clone()))
        }));
    }
    shared.publish(&report.stats);
    Ok(report)
}

/// The destination's event loop: stream bytes, faults and timeouts into the
/// engine, return-path bytes out. Returns what failed (`None`: the
/// engine's state tells).
fn run_receive_loop(
    engine: &mut DestinationEngine<'_>,
    host: &mut KvmHost<'_>,
    conn: &Connection,
    events: &Receiver<Event>,
    pool: &Sender<Vec<u8>>,
    shared: &Shared,
) -> Option<ReceiveFailure> {
    let interrupt: &Cancel = &shared.cancel;
    let mut out = vec![0u8; 4096];
    let mut error: Option<ReceiveFailure> = None;
    let mut last_progress = 0;
    // An interrupt already dealt with (refused, or nothing to interrupt).
    let mut interrupt_seen = false;
    loop {
        if interrupt.is_cancelled() && !interrupt_seen {
            interrupt_seen = true;
            let signal = interrupt
                .signal()
                .and_then(|s| u32::try_from(s).ok())
                .unwrap_or(0);
            match engine.interrupt(clock::now(), signal) {
                Ok(true) => {
                    // The source hears why before the connection closes.
                    let untold = flush_return_path(engine, conn, &mut out).err();
                    return Some(ReceiveFailure::Interrupted { signal, untold });
                }
                Err(
                    e @ (DestError::PostcopyCannotBeInterrupted | DestError::InterruptAfterLoaded),
                ) => shared.refuse(CancelRefused::Destination(e)),
                // Completed or failed already: the loop ends by itself.
                Ok(false) | Err(_) => {}
            }
        }
        let now = clock::now();
        let wait = engine
            .poll_timeout()
            .map_or(MAX_WAIT, |t| t.saturating_since(now).min(MAX_WAIT));
        let event = events.recv_timeout(wait);
        // Faults first, and their requests out at once: a vCPU waits for
        // each of them.
        if let Err(e) = serve_faults(engine, host) {
            error.get_or_insert(e);
        }
        if let Err(e) = flush_return_path(engine, conn, &mut out) {
            error.get_or_insert(ReceiveFailure::ReturnPathLost(e));
        }
        if host.fault_thread_died() {
            error.get_or_insert(ReceiveFailure::FaultThreadStopped);
        }
        let now = clock::now();
        let mut eof = false;
        let result = match event {
            Ok(Event::Bytes(buf, n)) => {
                let r = match engine.handle_input(now, buf.get(..n).unwrap_or_default(), host) {
                    Ok(_) => Ok(()),
                    Err(HandleError::Dest(e)) => Err(e),
                    Err(HandleError::Host { op, error: e }) => {
                        error.get_or_insert(ReceiveFailure::Host { op, error: e });
                        Err(DestError::Host(op))
                    }
                };
                // The reader is gone if this fails; the loop learns it from
                // the end of the stream.
                let _ = pool.send(buf);
                r
            }
            Ok(Event::Fault) | Err(RecvTimeoutError::Timeout) => Ok(()),
            Ok(Event::Eof) | Err(RecvTimeoutError::Disconnected) => {
                eof = true;
                engine.handle_eof(now)
            }
            Ok(Event::ReadError(e)) => {
                eof = true;
                error.get_or_insert(ReceiveFailure::ConnectionLost(e));
                engine.handle_eof(now)
            }
        };
        let result = result.and_then(|()| match engine.poll_timeout() {
            Some(t) if t <= now => engine.handle_timeout(now),
            _ => Ok(()),
        });
        if let Err(e) = result {
            if error.is_none() && e != DestError::AlreadyFailed {
                error = Some(ReceiveFailure::Engine {
                    error: e,
                    peer: conn.peer().to_string(),
                });
            }
        }
        if let Err(e) = flush_return_path(engine, conn, &mut out) {
            error.get_or_insert(ReceiveFailure::ReturnPathLost(e));
        }
        if clock::monotonic_ns() - last_progress > 50_000_000 {
            last_progress = clock::monotonic_ns();
            shared.publish(engine.stats());
        }
        if eof
            || engine.is_completed()
            || engine.status() == MigrationStatus::Failed
            || error.is_some()
        {
            return error;
        }
    }
}

/// Writes whatever the engine queued for the return path.
fn flush_return_path(
    engine: &mut DestinationEngine<'_>,
    conn: &Connection,
    out: &mut [u8],
) -> Result<(), TransportError> {
    loop {
        let n = engine.poll_return_path(out);
        if n == 0 {
            return Ok(());
        }
        conn.write_all(out.get(..n).unwrap_or_default())?;
    }
}

/// Hands the queued faults to the engine (a request each, on the return
/// path) or, for a page that arrived as a zero page in precopy and so was
/// never written here, fills it with zeros.
fn serve_faults(
    engine: &mut DestinationEngine<'_>,
    host: &mut KvmHost<'_>,
) -> Result<(), ReceiveFailure> {
    let pages = match host.faults.lock() {
        Ok(mut q) if !q.is_empty() => std::mem::take(&mut *q),
        _ => return Ok(()),
    };
    if engine.status() != MigrationStatus::PostcopyActive {
        // Completed: the RAM is about to be unregistered, which wakes them.
        return Ok(());
    }
    let now = clock::now();
    for page in pages {
        if engine.is_received(0, page) {
            host.fill_zero(page)?;
            continue;
        }
        match engine.handle_page_fault(now, 0, page) {
            Ok(_) => {}
            Err(e) => return Err(ReceiveFailure::PageFault(e)),
        }
    }
    Ok(())
}

/// How the guest did after the switchover.
#[derive(Debug, Clone)]
pub struct GuestAfter {
    /// `CLOCK_MONOTONIC` nanoseconds when the vCPU was resumed.
    pub started_ns: u64,
    /// Generation reported at the end of the watch (0 = none yet).
    pub generation: u64,
    /// Progress exits seen during the watch (an idle guest only has these).
    pub progress_exits: u64,
    /// Pages the guest found with a wrong stamp.
    pub mismatches: Vec<u32>,
    /// Why the vCPU stopped, if it did.
    pub stopped: Option<String>,
    /// The working set's stamps at the end of the watch, checked with the
    /// vCPU stopped (`None` if guest memory could not be read).
    pub stamps: Option<StampCheck>,
}

impl GuestAfter {
    /// The guest ran on from where it stopped on the source (which had
    /// stamped `stamped_at_stop` pages) without a mismatch, a wrong stamp
    /// or its vCPU stopping: see [`guest_continued`].
    pub fn continued(&self, stamped_at_stop: Option<u64>) -> bool {
        guest_continued(
            stamped_at_stop,
            self.stamps.as_ref().map(|c| c.stamped),
            self.stamps.as_ref().is_some_and(StampCheck::ok),
            self.progress_exits,
            self.mismatches.is_empty() && self.stopped.is_none(),
        )
    }
}

/// The verdict on a guest after the switchover. A guest with a working set
/// (`stamped_at_stop` > 0 pages stamped on the source by the stop) must
/// have stamped more pages since (`stamped`, the destination's counter at
/// the end of the watch), whether or not a whole generation completed; an
/// idle guest, which stamps nothing, must have made progress exits. Either
/// way its stamps must be right (`stamps_ok`) and it must be `healthy` (no
/// mismatch reported, vCPU still running).
pub fn guest_continued(
    stamped_at_stop: Option<u64>,
    stamped: Option<u64>,
    stamps_ok: bool,
    progress_exits: u64,
    healthy: bool,
) -> bool {
    let ran = match stamped_at_stop {
        Some(s) if s > 0 => stamped.is_some_and(|now| now > s),
        _ => progress_exits > 0,
    };
    ran && stamps_ok && healthy
}

/// Resumes the vCPU and lets the guest run for `run_for`; then checks its
/// stamps with the vCPU paused for the check and resumed after it.
pub fn start_guest(vm: &Vm, vcpu: &Vcpu, run_for: Duration) -> Result<GuestAfter, MigrateError> {
    let started_ns = clock::monotonic_ns();
    vcpu.resume().map_err(MigrateError::Vcpu)?;
    std::thread::sleep(run_for);
    let running = vcpu.stopped().is_none();
    if running {
        vcpu.pause().map_err(MigrateError::Vcpu)?;
    }
    let after = guest_after(vm, vcpu, started_ns, None);
    if running {
        vcpu.resume().map_err(MigrateError::Vcpu)?;
    }
    Ok(after)
}

/// The guest's reports and, read from its (stopped) memory, its stamps.
fn guest_after(vm: &Vm, vcpu: &Vcpu, started_ns: u64, explained: Option<&str>) -> GuestAfter {
    let s = vcpu.stats();
    GuestAfter {
        started_ns,
        generation: s.generation,
        progress_exits: s.progress_exits,
        mismatches: s.mismatches,
        stopped: vcpu.stopped().map(|e| match (explained, e) {
            (Some(why), _) => why.to_string(),
            (None, e) => e.map_or("the guest halted".to_string(), |e| e.to_string()),
        }),
        stamps: guest::check_stamps(vm.ram()).ok(),
    }
}

/// What the guest wrote on the destination after a postcopy, and the digest
/// of everything else.
#[derive(Debug, Clone)]
pub struct GuestWrites {
    /// Runs of guest pages (first, count) the destination guest wrote, from
    /// KVM's dirty log (reset at the postcopy advise).
    pub ranges: Vec<(u64, u64)>,
    /// Pages in `ranges`.
    pub pages: u64,
    /// The digest of the source's memory at the stop as it arrived here:
    /// every page the guest did not write read back from memory, every page
    /// it wrote as it was installed ([`PostcopyReport::installed`]). It
    /// must equal the source's [`GuestMemory::digest`] of its stopped memory.
    pub digest: u64,
}

/// After a postcopy: lets the (already running) guest run for `run_for`,
/// pauses it and reads which pages it wrote here. Every page it did not
/// write must hold what the source's page held at the stop, whether it
/// arrived before the switchover, on request or in the background pass:
/// that is what the digest lets the source check; a page it did write is
/// counted as it was installed (`postcopy.installed`). `postcopy` is what
/// the migration reported; its `vcpu_error` explains a vCPU that stopped
/// during the migration.
pub fn watch_postcopy_guest(
    vm: &Vm,
    vcpu: &Vcpu,
    started_ns: u64,
    run_for: Duration,
    postcopy: &PostcopyReport,
) -> Result<(GuestAfter, GuestWrites), MigrateError> {
    let vcpu_error = postcopy.vcpu_error.as_deref();
    std::thread::sleep(run_for);
    if vcpu.stopped().is_none() {
        vcpu.pause().map_err(MigrateError::Vcpu)?;
    }
    let after = guest_after(vm, vcpu, started_ns, vcpu_error);
    let map = SlotMap::new(vm.ram());
    let pages: u64 = map.slots().iter().map(|s| s.2).sum();
    let mut words = vec![0u64; pages.div_ceil(64) as usize];
    fetch_dirty_log(vm, &map, &mut words).map_err(MigrateError::DirtyLog)?;
    let ranges = written_ranges(&words, pages);
    let unwritten = digest_outside(vm.ram(), &ranges).map_err(MigrateError::Memory)?;
    let mut digest = unwritten;
    for p in ranges
        .iter()
        .flat_map(|&(first, count)| first..first + count)
    {
        let d = postcopy
            .installed
            .get(p as usize)
            .ok_or(MigrateError::UntrackedPage(p))?;
        digest = digest.wrapping_add(*d);
    }
    let writes = GuestWrites {
        pages: ranges.iter().map(|r| r.1).sum(),
        ranges,
        digest,
    };
    Ok((after, writes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_thread_is_not_a_vcpu_thread() {
        // SAFETY: gettid has no arguments and cannot fail.
        assert!(!is_vcpu_thread(unsafe { libc::gettid() }));
    }

    #[test]
    fn the_guest_continued_only_if_it_stamped_on_with_right_stamps() {
        // A working-set guest is judged by its stamp counter: one more page
        // is enough, no whole generation is needed.
        assert!(guest_continued(Some(1000), Some(1001), true, 0, true));
        // Nothing stamped since the stop, or a counter behind the source's
        // (the destination runs an older image), or no counter at all.
        assert!(!guest_continued(Some(1000), Some(1000), true, 50, true));
        assert!(!guest_continued(Some(1000), Some(900), true, 50, true));
        assert!(!guest_continued(Some(1000), None, true, 50, true));
        // Stamped on, but a stamp is wrong, or the guest reported a
        // mismatch or its vCPU stopped.
        assert!(!guest_continued(Some(1000), Some(5000), false, 50, true));
        assert!(!guest_continued(Some(1000), Some(5000), true, 50, false));
        // An idle guest stamps nothing: its progress exits count.
        assert!(guest_continued(Some(0), Some(0), true, 3, true));
        assert!(!guest_continued(Some(0), Some(0), true, 0, true));
        let after = GuestAfter {
            started_ns: 0,
            generation: 0,
            progress_exits: 9,
            mismatches: Vec::new(),
            stopped: None,
            stamps: Some(StampCheck {
                stamped: 1200,
                checked: 511,
                wrong: 1,
                first_wrong: Some(7),
            }),
        };
        assert!(!after.continued(Some(1000)));
        let right = GuestAfter {
            stamps: after.stamps.clone().map(|c| StampCheck {
                wrong: 0,
                first_wrong: None,
                ..c
            }),
            ..after
        };
        assert!(right.continued(Some(1000)));
        assert!(!right.continued(Some(1200)));
    }
}
