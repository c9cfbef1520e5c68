//! The destination side: loads an incoming stream into the VMM's fresh
//! guest and starts it.
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
//! tracking), which validates everything before it touches guest memory
//! and calls back into [`KvmHost`] to place pages and load sections; the
//! return-path bytes it queues (LOADED, SHUT, page requests) go back on
//! the same connection.
//!
//! # Sections
//!
//! At setup, before any RAM, the source's CPU model is compared with this
//! guest's own (read from its vCPU 0 before it ever ran): a mismatch in
//! CPUID, TSC frequency or vCPU count is refused, naming it, and the
//! source keeps running. After the stop, every section must be one this
//! destination registered (livemig's own: one per vCPU and the VM-wide
//! devices; the VMM's [`DeviceSection`]s) at a version within its
//! `oldest_loadable ..= version`, and every registered section must have
//! arrived: otherwise the stream is refused before LOADED, and the guest
//! never runs.
//!
//! With the return path, a precopy ends with the commit handshake: the end
//! of the stream is answered with LOADED and the vCPUs stay paused until
//! the source's COMMIT. Then, if the source guest was running, the vCPUs
//! are resumed ([`Vcpus::resume_all`]) and [`DestinationVm::on_started`]
//! is called; a guest that was paused on the source arrives paused. If the
//! stream ends any other way after LOADED, the end is ambiguous (the source
//! may have committed): the guest is left loaded and paused, and the
//! report's `stats.ambiguous_end` says what the operator must do.
//!
//! # Postcopy
//!
//! When the source advises postcopy, the host checks that a full
//! userfaultfd can be created. At the first discard (or at listen) guest
//! RAM is registered with userfaultfd ([`PostcopyRam`]) and a fault thread
//! started; from then on pages are installed atomically (`UFFDIO_COPY` /
//! `UFFDIO_ZEROPAGE`). The postcopy run command resumes the VMM's vCPUs
//! and calls `on_started`: each vCPU thread (or device thread) that
//! touches a missing page blocks in the kernel until the fault thread's
//! request is answered. A fault becomes
//! [`DestinationEngine::handle_page_fault`], whose request goes back on the
//! return path, except for a page that already arrived as a zero page in
//! precopy: fresh memory was left untouched for it, so it is filled with
//! zeros here without asking the source. At the end of the stream the RAM
//! is unregistered (which also wakes any thread still waiting) and the
//! fault latency and per-thread blocktime are reported.
//!
//! # Zero pages
//!
//! Fresh RAM reads as zero, so before the RAM is registered a zero page is
//! not touched at all (unless this migration wrote the page earlier, then
//! it is zeroed): the page stays unpopulated, and costs neither a fault
//! nor memory. Once registered, a zero page is installed with
//! `UFFDIO_ZEROPAGE`, which maps the kernel's shared zero page (no page is
//! allocated, none counts in the RSS, but `mincore` calls it resident):
//! a vCPU may be waiting for exactly that page, and leaving it missing
//! would make it wait on. That costs about 0.75 us a page here (a
//! postcopy's background pass over an idle GiB: ~0.2 s of this thread).

mod channels;
mod failure;
mod incoming;
mod populate;
mod preempt;
mod requests;
mod required;

use std::net::Shutdown;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use kvm_ioctls::{Kvm, VmFd};
use livemig_core::bitmap::{DirtyBitmap, words_for};
use livemig_core::destination::{
    ChannelTotals, ChannelsHost, DEFAULT_IDLE_TIMEOUT_MS, DestError, DestinationEngine,
    DestinationHost, HandleError, PostcopyHost as EnginePostcopyHost, PostcopyTracking,
};
use livemig_core::digest::{DigestBooks, DigestKey};
use livemig_core::stats::MigrationStats;
use livemig_core::status::MigrationStatus;
use livemig_core::wire::{self, DeviceState, PageRange};

use super::handle::{CancelRefused, MigrationEvent, Shared};
use super::sections::{
    CPU_MODEL_SECTION, CPU_MODEL_VERSION, CPU_SECTION, CPU_STATE_VERSION, RUNSTATE_SECTION,
    RUNSTATE_VERSION, VM_SECTION, VM_STATE_VERSION,
};
use super::vcpu_access::on_vcpu;
use super::{MigrateError, ReceiveHandle, Recovery, ram_layout};
use crate::clock;
use crate::memory::{GuestMemory, PAGE_SIZE, RegionLayout, slice_page_term};
use crate::postcopy::{FaultThread, PostcopyRam, PostcopyStats};
use crate::priority::{self, StopPriority, StopThreads};
use crate::transport::{Connection, Listener, TransportError};
use crate::vmm::{DeviceSection, Vcpus};
use crate::x86::{CpuModel, VcpuCaps, VcpuState, VmState};
pub use channels::ChannelFailure;
use channels::ChannelReceivers;
pub use failure::{HostFailure, ReceiveFailure};
use incoming::{Awaited, Incoming, Pause};
use populate::Populate;
use preempt::PreemptReader;
use requests::{REQUEST_LEN, ReturnPathWriter};

const ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
const PAGE: u64 = PAGE_SIZE as u64;

/// Size of each of the reader's buffers.
const READ_BUFFER: usize = 1 << 20;
/// Buffers the reader may fill before the migration thread hands one back:
/// at most this many MiB of stream wait in the queue.
const READ_BUFFERS: usize = 4;
/// Longest the migration thread waits before reporting progress.
const MAX_WAIT: Duration = Duration::from_millis(50);
/// In postcopy, the main stream's buffers go to the engine in pieces of
/// this size, with the preempt channel's pages and the faults' requests
/// handled between two pieces: a requested page waits for at most this
/// much placing (tens of us) rather than a whole buffer's.
const POSTCOPY_PIECE: usize = 64 * 1024;

/// The most the main stream's reader reads at once in postcopy.
///
/// A TCP read holds the socket's lock for its whole copy out of the
/// kernel, and the fault thread writes its requests on the same socket
/// (the return path is its other direction), so a request waits for the
/// read in progress: with the background pass streaming, a full
/// [`READ_BUFFER`] is 100-200 us of copying. Traced on this 2-core host
/// (docs/benchmarks.md, 2026-12-03 08:20-08:50): the request's `write`
/// took 77-183 us at p90 and 659-715 us at p99 with 1 MiB reads, 46-115
/// and 286-415 us with reads of this size; the median (7-10 us) did not
/// move.
const POSTCOPY_READ: usize = 64 * 1024;

/// How much of its buffer the main stream's reader fills in `status`:
/// [`POSTCOPY_READ`] while a vCPU may wait for a page, else all of it.
fn read_size(status: MigrationStatus) -> usize {
    if is_postcopy(status) {
        POSTCOPY_READ
    } else {
        READ_BUFFER
    }
}

/// The VMM's fresh guest, lent to livemig to receive a migration into.
pub struct DestinationVm {
    /// The VMM's VM.
    pub vm: Arc<VmFd>,
    /// Guest RAM, freshly mapped (all zero: pages the stream sends as zero
    /// are not written) and registered as the VMM's memslots; its regions
    /// must match the source's in number, name and size.
    pub memory: GuestMemory,
    /// The VMM's vCPUs, created and configured (CPUID set) but never run:
    /// livemig resumes them once the guest is loaded.
    pub vcpus: Arc<dyn Vcpus>,
    /// The VMM's device sections; each must arrive in the stream.
    pub devices: Vec<Box<dyn DeviceSection>>,
    /// Called once, on the migration thread, right after the guest started
    /// here (after the COMMIT, or at the postcopy switchover): where a VMM
    /// announces the guest (a gratuitous ARP). Not called for a guest that
    /// arrives paused.
    pub on_started: Option<Box<dyn FnOnce() + Send>>,
}

/// How the destination receives, beyond what the stream says.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// How long the source may stay silent before the destination gives
    /// up.
    pub idle_timeout: Duration,
    /// Whether to compute [`DestinationReport::digest`] of the loaded
    /// memory before the guest starts (it lengthens the downtime by
    /// [`DestinationReport::digest_ms`]).
    pub digest: bool,
    /// After the postcopy switchover, a cut connection pauses the
    /// migration: where to listen for the source's new connection and for
    /// how long (see [`Recovery`]). Without an address the listener of
    /// [`receive_with_channels`] is kept for it; [`receive`], which has
    /// none, needs an address to recover.
    pub recovery: Recovery,
    /// Populate each run of received pages with `MADV_POPULATE_WRITE`
    /// just before writing it, instead of faulting its pages in one by
    /// one (on by default): the first write of fresh RAM is most of what a
    /// destination pays per page. Only pages that arrive are populated, so
    /// pages never sent stay untouched. A kernel that refuses (before
    /// 5.14) turns it off for the migration, and
    /// [`DestinationReport::populate_refused`] says so. Not used once
    /// postcopy registers the RAM (pages are installed by userfaultfd).
    /// Nothing to do over preallocated RAM ([`ReceiveOptions::mem_prealloc`]).
    pub populate: bool,
    /// Preallocate all of guest RAM ([`GuestMemory::prealloc`], QEMU's
    /// `-mem-prealloc`) before the stream is read, unless it already is:
    /// the pages' first write then happens here, once, instead of page by
    /// page under the stream (off by default). [`receive`] is given a
    /// connection the source already writes to, so this time counts in
    /// the migration ([`DestinationReport::prealloc_ms`]); a VMM that
    /// preallocates at its start-up, before it accepts the migration,
    /// keeps it out. Either way a source that advises postcopy is refused
    /// ([`HostFailure::PostcopyPreallocated`]).
    pub mem_prealloc: bool,
    /// The priority the migration thread and the stream's reader take
    /// from the source's announcement of its stop (SwitchoverStart, before
    /// the final pages of a precopy or the postcopy switchover) until the
    /// guest starts here (`None`: left as
    /// they are): in that span every wake-up that waits for a CPU is
    /// downtime (see [`crate::priority`]).
    /// [`DestinationReport::priority_refused`] says when the host did not
    /// allow it.
    pub stop_priority: Option<StopPriority>,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            idle_timeout: Duration::from_millis(DEFAULT_IDLE_TIMEOUT_MS),
            digest: false,
            recovery: Recovery::default(),
            populate: true,
            mem_prealloc: false,
            stop_priority: Some(StopPriority::Realtime),
        }
    }
}

/// What a postcopy destination measured.
#[derive(Debug, Clone, Default)]
pub struct PostcopyReport {
    /// `CLOCK_MONOTONIC` nanoseconds when the postcopy run command started
    /// the guest (the end of the downtime).
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
    /// The userfaultfd counters (faults read, duplicates, pages placed,
    /// each faulting thread's blocktime...).
    pub faults: PostcopyStats,
}

/// What the destination loaded.
#[derive(Debug)]
pub struct DestinationReport {
    /// The engine's final statistics.
    pub stats: MigrationStats,
    /// Why the migration failed, in words for an operator (the engine's
    /// error mapped to the cause: size mismatch, not a livemig peer...).
    /// When `stats.ambiguous_end` is set as well, the VM holds the whole
    /// loaded guest with its vCPUs paused: keep it until the operator
    /// decides (its advice says how).
    pub error: Option<ReceiveFailure>,
    /// Whether the guest was started here; `false` after a success means
    /// the guest was paused on the source and arrived paused.
    pub started: bool,
    /// [`GuestMemory::digest`] of guest memory once the stream was loaded,
    /// before the vCPUs ran (compare with the source's digest at its stop),
    /// when [`ReceiveOptions::digest`] asked for it. `None` after postcopy,
    /// where the guest ran during the load.
    pub digest: Option<u64>,
    /// `CLOCK_MONOTONIC` nanoseconds when the end of the stream had been
    /// read and loaded (with the return path, LOADED answered): the
    /// destination's part of the stop begins.
    pub end_received_ns: Option<u64>,
    /// `CLOCK_MONOTONIC` nanoseconds when the stream was fully loaded (the
    /// source's COMMIT received and answered; the connection's reader is
    /// stopped after the guest started, unless a digest is taken first).
    pub loaded_ns: Option<u64>,
    /// `CLOCK_MONOTONIC` nanoseconds when the guest was started here.
    pub started_ns: Option<u64>,
    /// Milliseconds spent computing `digest` (part of the downtime).
    pub digest_ms: f64,
    /// Set when the migration switched to postcopy (the guest already runs).
    pub postcopy: Option<PostcopyReport>,
    /// Guest pages populated ahead of their write
    /// ([`ReceiveOptions::populate`]); 0 with it off.
    pub populated_pages: u64,
    /// The errno with which the kernel refused to populate, turning
    /// [`ReceiveOptions::populate`] off for the rest of the migration.
    pub populate_refused: Option<i32>,
    /// Whether guest RAM was preallocated when the stream was first read
    /// ([`ReceiveOptions::mem_prealloc`], or by the VMM before).
    pub preallocated: bool,
    /// Milliseconds [`receive`] spent preallocating guest RAM before
    /// reading the stream (0 when it was preallocated before, or not at
    /// all): time the source waited.
    pub prealloc_ms: f64,
    /// The OS error (errno) with which raising the migration's threads
    /// for the stop was refused ([`ReceiveOptions::stop_priority`]).
    pub priority_refused: Option<i32>,
    /// Threads raised for the stop (the stream reader and the migration
    /// thread; 0 without [`ReceiveOptions::stop_priority`] or before a
    /// SwitchoverStart arrived).
    pub priority_raised: usize,
}

/// The postcopy side of [`KvmHost`].
#[derive(Default)]
struct PostcopyHost {
    /// Guest RAM under userfaultfd, from the first discard or the listen.
    ram: Option<Arc<PostcopyRam>>,
    fault_thread: Option<FaultThread>,
    local_zero_fills: u64,
}

/// Faults forwarded by the fault thread (guest-physical address, and
/// whether the fault thread wrote its request itself), waiting for the
/// migration thread.
type FaultQueue = Arc<Mutex<Vec<(u64, bool)>>>;

/// The VMM's guest as the engine writes it: RAM by block (= region), the
/// sections it registered, and how to start it.
pub struct KvmHost {
    vm: DestinationVm,
    caps: VcpuCaps,
    /// This guest's own CPU model, read before it ran.
    model: CpuModel,
    /// Whether the source's guest was running (its runstate section).
    source_running: Option<bool>,
    /// Pages written during this migration and not zeroed since, by guest
    /// page number: fresh memory reads as zero, so only these need zeroing
    /// for a zero page. One bit per guest page, in the core's layout.
    placed: Vec<u64>,
    /// Guest pages up to the end of the last region.
    pages: u64,
    /// Set by the postcopy advise.
    postcopy: Option<PostcopyHost>,
    /// Where the fault thread wakes the migration thread.
    events: Sender<Event>,
    faults: FaultQueue,
    /// The return path's writes, the fault thread's requests among them.
    writer: Arc<ReturnPathWriter>,
    /// When the guest was started here.
    started_ns: Option<u64>,
    /// Where multifd channels are accepted (none: the VMM gave only the
    /// main connection, and a source that announces channels is refused).
    listener: Option<Listener>,
    /// The multifd receivers, once the source announced them.
    channels: Option<ChannelReceivers>,
    /// The postcopy preempt channel's reader, once the source announced it.
    preempt: Option<PreemptReader>,
    /// Where a paused postcopy takes the source's new connection when
    /// [`Recovery::address`] names one (else on `listener`).
    recover_listener: Option<Listener>,
    /// How long an accept, a hello or a sync may wait.
    channel_deadline: Duration,
    /// When the engine had read the end of the stream.
    end_received_ns: Option<u64>,
    /// Received pages' memory populated before their write.
    populate: Arc<Populate>,
    /// Milliseconds spent preallocating RAM before the stream was read.
    prealloc_ms: f64,
    /// This thread and the stream reader, raised from the source's
    /// SwitchoverStart to the start ([`ReceiveOptions::stop_priority`]).
    stop: StopThreads,
}

impl KvmHost {
    /// Pages the channels placed count as placed (for zero pages and the
    /// digest).
    fn merge_channel_pages(&mut self) {
        if let Some(rx) = &self.channels {
            for (word, theirs) in self.placed.iter_mut().zip(rx.placed.words()) {
                *word |= theirs;
            }
        }
    }

    /// A channel failure reported outside a sync.
    fn channel_failure(&mut self) -> Option<ChannelFailure> {
        self.channels.as_mut()?.failure()
    }

    /// The placed pages, as the core's bitmap over this host's words.
    fn placed(&mut self) -> Option<DirtyBitmap<'_>> {
        DirtyBitmap::new(&mut self.placed, self.pages).ok()
    }

    fn mark(&mut self, gfn: u64, placed: bool) {
        if let Some(mut bitmap) = self.placed() {
            // A page outside guest RAM has no bit: the write was refused.
            let _ = if placed {
                bitmap.set(gfn)
            } else {
                bitmap.clear(gfn)
            };
        }
    }

    /// Populates the pages of `first .. first + count` (guest page
    /// numbers) not placed before, a run at a time: a page written before
    /// is populated, and asking again costs the kernel's walk of it
    /// (0.3-0.6 us a page here) for nothing.
    fn populate_fresh(&mut self, first: u64, count: u64) {
        let mut at = 0;
        while at < count {
            let fresh = (at..count)
                .take_while(|&i| !self.is_placed(first + i))
                .count() as u64;
            self.populate
                .run(&self.vm.memory, (first + at) * PAGE, fresh);
            at += fresh;
            at += (at..count)
                .take_while(|&i| self.is_placed(first + i))
                .count() as u64;
        }
    }

    fn is_placed(&mut self, gfn: u64) -> bool {
        self.placed().is_some_and(|bitmap| bitmap.test(gfn))
    }

    /// Guest page numbers written during the load and not zeroed since:
    /// every other page of the fresh RAM is still zero.
    fn placed_pages(&mut self) -> impl Iterator<Item = u64> + '_ {
        let bitmap = self.placed();
        let mut next = 0;
        std::iter::from_fn(move || {
            let page = bitmap.as_ref()?.find_next_set(next)?;
            next = page + 1;
            Some(page)
        })
    }

    /// The guest-physical address of page `page` of block `block`, with
    /// `count` pages from there inside the block.
    fn gpa(&self, block: u16, page: u64, count: u64) -> Result<u64, HostFailure> {
        let region = self
            .vm
            .memory
            .region(usize::from(block))
            .map_err(HostFailure::WriteRam)?;
        match page.checked_add(count) {
            Some(end) if end <= region.pages() => Ok(region.guest_phys() + page * PAGE),
            _ => Err(HostFailure::OutsideBlock { block, page, count }),
        }
    }

    /// The block and block page of guest-physical address `gpa`.
    fn block_page(&self, gpa: u64) -> Result<(u16, u64), ReceiveFailure> {
        let (index, region) = self
            .vm
            .memory
            .locate(gpa)
            .ok_or(ReceiveFailure::FaultOutsideRam(gpa))?;
        let block = u16::try_from(index).map_err(|_| ReceiveFailure::FaultOutsideRam(gpa))?;
        Ok((block, (gpa - region.guest_phys()) / PAGE))
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
        self.populate.stop();
        let ram = match PostcopyRam::register(self.vm.memory.clone()) {
            Ok(r) => Arc::new(r),
            Err(e) => return Err(HostFailure::Register(e)),
        };
        let (events, faults) = (self.events.clone(), Arc::clone(&self.faults));
        let (writer, memory) = (Arc::clone(&self.writer), self.vm.memory.clone());
        let mut buf = [0u8; REQUEST_LEN];
        let thread = ram.start_fault_thread(move |f| {
            // The request first: the source may answer before the
            // migration thread has even woken.
            let sent = writer.request(&memory, f.gpa, &mut buf);
            if let Ok(mut q) = faults.lock() {
                q.push((f.gpa, sent));
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

    /// A fault on the page at `gpa`, which arrived as a zero page in
    /// precopy and was never written here: fills it with zeros (an
    /// `EEXIST` means it was installed meanwhile, which is as good).
    fn fill_zero(&mut self, gpa: u64) -> Result<(), ReceiveFailure> {
        let Some(ram) = self.registered() else {
            return Err(ReceiveFailure::FaultBeforeRegister);
        };
        let placed = ram
            .place_zero(gpa, PAGE)
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
            started_ns: self.started_ns,
            local_zero_fills: pc.local_zero_fills,
            ..PostcopyReport::default()
        };
        if let Some(ram) = pc.ram.take() {
            ram.unregister().map_err(ReceiveFailure::EndPostcopy)?;
            if let Some(t) = pc.fault_thread.take() {
                t.stop().map_err(ReceiveFailure::FaultThread)?;
            }
            report.faults = ram.stats();
        }
        // The fault latencies are the userfaultfd layer's books (fault
        // read → page placed), with the core's nearest-rank percentile.
        report.latency_samples = report.faults.latency_samples;
        report.latency_median_us = report.faults.latency_median_us;
        report.latency_p99_us = report.faults.latency_p99_us;
        Ok(report)
    }

    /// Starts the loaded guest if the source's was running (else it stays
    /// paused, as it was there), then calls the VMM's `on_started`.
    /// Returns whether it started.
    fn start_guest(&mut self) -> Result<bool, HostFailure> {
        if self.source_running != Some(true) {
            return Ok(false);
        }
        self.vm
            .vcpus
            .resume_all()
            .map_err(HostFailure::StartVcpus)?;
        self.started_ns = Some(clock::monotonic_ns());
        if let Some(hook) = self.vm.on_started.take() {
            hook();
        }
        Ok(true)
    }

    /// Refuses a section `version` outside `oldest ..= newest`.
    fn check_version(
        device: &DeviceState<'_>,
        oldest: u32,
        newest: u32,
    ) -> Result<(), HostFailure> {
        if (oldest..=newest).contains(&device.version) {
            return Ok(());
        }
        Err(HostFailure::SectionVersion {
            id: device.id.as_str().to_string(),
            instance: device.instance,
            version: device.version,
            oldest,
            newest,
        })
    }

    /// The setup-time CPU model: the source's must be this guest's.
    fn load_cpu_model(&mut self, device: &DeviceState<'_>) -> Result<(), HostFailure> {
        Self::check_version(device, CPU_MODEL_VERSION, CPU_MODEL_VERSION)?;
        let source = CpuModel::decode(device.data).map_err(HostFailure::DecodeCpuModel)?;
        self.model.check(&source).map_err(HostFailure::CpuMismatch)
    }

    /// The setup-time runstate: whether to start the guest at the end.
    fn load_runstate(&mut self, device: &DeviceState<'_>) -> Result<(), HostFailure> {
        Self::check_version(device, RUNSTATE_VERSION, RUNSTATE_VERSION)?;
        self.source_running = Some(match device.data {
            [0] => false,
            [1] => true,
            other => return Err(HostFailure::Runstate(other.to_vec())),
        });
        Ok(())
    }

    /// One vCPU's state, through the VMM's `with_vcpu`.
    fn load_vcpu(&mut self, device: &DeviceState<'_>) -> Result<(), HostFailure> {
        Self::check_version(device, CPU_STATE_VERSION, CPU_STATE_VERSION)?;
        let index = device.instance as usize;
        if index >= self.vm.vcpus.count() {
            return Err(HostFailure::UnknownSection {
                id: CPU_SECTION.to_string(),
                instance: device.instance,
            });
        }
        let state = VcpuState::decode(device.data).map_err(HostFailure::DecodeVcpu)?;
        let caps = &self.caps;
        on_vcpu(self.vm.vcpus.as_ref(), index, |fd| state.restore(fd, caps))
            .map_err(HostFailure::LoadVcpu)
    }
}

impl DestinationHost for KvmHost {
    type Error = HostFailure;

    fn page_term(&self, key: &DigestKey, block: u16, page: u64, data: &[u8]) -> u64 {
        slice_page_term(key, block, page, data)
    }

    fn place_pages(&mut self, block: u16, first_page: u64, data: &[u8]) -> Result<(), HostFailure> {
        let count = (data.len() / PAGE_SIZE) as u64;
        let gpa = self.gpa(block, first_page, count)?;
        if let Some(ram) = self.registered() {
            return ram.place(gpa, data).map(drop).map_err(HostFailure::Copy);
        }
        self.populate_fresh(gpa / PAGE, count);
        for (i, chunk) in data.chunks(PAGE_SIZE).enumerate() {
            let at = gpa + i as u64 * PAGE;
            self.vm
                .memory
                .write(at, chunk)
                .map_err(HostFailure::WriteRam)?;
            self.mark(at / PAGE, true);
        }
        Ok(())
    }

    /// Copies each page into guest memory and hashes it in one read of
    /// the received bytes ([`GuestMemory::write_page_term`]); under
    /// userfaultfd (postcopy) the pages are hashed, then installed by one
    /// `UFFDIO_COPY`, as the default does.
    fn place_hashed_pages(
        &mut self,
        key: &DigestKey,
        block: u16,
        first_page: u64,
        data: &[u8],
        terms: &mut [u64],
    ) -> Result<(), HostFailure> {
        let count = (data.len() / PAGE_SIZE) as u64;
        let gpa = self.gpa(block, first_page, count)?;
        let pages = (first_page..).zip(data.as_chunks::<PAGE_SIZE>().0);
        if let Some(ram) = self.registered() {
            for ((page, bytes), term) in pages.zip(terms.iter_mut()) {
                *term = slice_page_term(key, block, page, bytes);
            }
            return ram.place(gpa, data).map(drop).map_err(HostFailure::Copy);
        }
        self.populate_fresh(gpa / PAGE, count);
        for ((page, bytes), term) in pages.zip(terms.iter_mut()) {
            *term = self
                .vm
                .memory
                .write_page_term(usize::from(block), page, bytes, key)
                .map_err(HostFailure::WriteRam)?;
        }
        for gfn in gpa / PAGE..gpa / PAGE + count {
            self.mark(gfn, true);
        }
        Ok(())
    }

    fn place_zero_pages(
        &mut self,
        block: u16,
        first_page: u64,
        count: u64,
    ) -> Result<(), HostFailure> {
        let gpa = self.gpa(block, first_page, count)?;
        if let Some(ram) = self.registered() {
            // Under userfaultfd a page never written is missing, not zero:
            // every zero page is installed.
            return ram
                .place_zero(gpa, count * PAGE)
                .map(drop)
                .map_err(HostFailure::ZeroPage);
        }
        for i in 0..count {
            let gfn = gpa / PAGE + i;
            if self.is_placed(gfn) {
                self.vm
                    .memory
                    .write(gfn * PAGE, &ZERO_PAGE)
                    .map_err(HostFailure::WriteRam)?;
                self.mark(gfn, false);
            }
        }
        Ok(())
    }

    fn load_device(&mut self, device: &DeviceState<'_>) -> Result<(), HostFailure> {
        match (device.id.as_str(), device.instance) {
            (CPU_MODEL_SECTION, 0) => return self.load_cpu_model(device),
            (RUNSTATE_SECTION, 0) => return self.load_runstate(device),
            (CPU_SECTION, _) => return self.load_vcpu(device),
            (VM_SECTION, 0) => {
                Self::check_version(device, VM_STATE_VERSION, VM_STATE_VERSION)?;
                let state = VmState::decode(device.data).map_err(HostFailure::DecodeVmState)?;
                return state.restore(&self.vm.vm).map_err(HostFailure::LoadVmState);
            }
            _ => {}
        }
        let Some(section) = self
            .vm
            .devices
            .iter_mut()
            .find(|d| d.id() == device.id.as_str() && d.instance() == device.instance)
        else {
            return Err(HostFailure::UnknownSection {
                id: device.id.as_str().to_string(),
                instance: device.instance,
            });
        };
        Self::check_version(device, section.oldest_loadable(), section.version())?;
        section
            .load(device.version, device.data)
            .map_err(|error| HostFailure::LoadDevice {
                id: device.id.as_str().to_string(),
                instance: device.instance,
                error,
            })
    }

    fn postcopy(&mut self) -> Option<&mut dyn EnginePostcopyHost<Error = HostFailure>> {
        Some(self)
    }

    fn stop_starting(&mut self) {
        self.stop.raise();
    }

    fn channels(&mut self) -> Option<&mut dyn ChannelsHost<Error = HostFailure>> {
        Some(self)
    }
}

impl ChannelsHost for KvmHost {
    type Error = HostFailure;

    fn open_channels(
        &mut self,
        channels: u16,
        migration_id: u64,
        key: Option<DigestKey>,
    ) -> Result<(), HostFailure> {
        let listener = self
            .listener
            .as_ref()
            .ok_or(HostFailure::Channel(ChannelFailure::NoListener))?;
        let rx = ChannelReceivers::open(
            listener,
            channels,
            migration_id,
            key,
            &self.vm.memory,
            self.channel_deadline,
            &self.events,
            &self.populate,
        )
        .map_err(HostFailure::Channel)?;
        self.channels = Some(rx);
        Ok(())
    }

    fn sync_channels(&mut self, generation: u32) -> Result<ChannelTotals, HostFailure> {
        let rx = self
            .channels
            .as_mut()
            .ok_or(HostFailure::Channel(ChannelFailure::NoListener))?;
        let totals = rx.sync(generation).map_err(HostFailure::Channel)?;
        self.merge_channel_pages();
        Ok(totals)
    }

    fn take_channel_digest(&mut self, block: u16) -> u64 {
        self.channels.as_mut().map_or(0, |rx| rx.take_digest(block))
    }

    fn seal_channels(&mut self) -> Result<(), HostFailure> {
        match self.channels.as_mut() {
            Some(rx) => rx.seal().map_err(HostFailure::Channel),
            None => Ok(()),
        }
    }

    fn end_channels(&mut self, placed: &mut dyn FnMut(u16, u64, u64)) -> Result<(), HostFailure> {
        self.merge_channel_pages();
        // No receivers, no page they placed.
        let Some(rx) = self.channels.take() else {
            return Ok(());
        };
        rx.end(&self.vm.memory, placed)
            .map_err(HostFailure::Channel)
    }
}

impl EnginePostcopyHost for KvmHost {
    type Error = HostFailure;

    fn postcopy_advise(
        &mut self,
        host_page_size: u64,
        target_page_size: u64,
    ) -> Result<(), HostFailure> {
        if self.vm.memory.is_preallocated() {
            return Err(HostFailure::PostcopyPreallocated);
        }
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
        self.postcopy = Some(PostcopyHost::default());
        Ok(())
    }

    fn discard(&mut self, block: u16, range: PageRange) -> Result<(), HostFailure> {
        let gpa = self.gpa(block, range.first, range.count)?;
        let ram = self.postcopy_ram()?;
        ram.discard(gpa, range.count * PAGE)
            .map_err(HostFailure::Discard)
    }

    fn postcopy_listen(&mut self) -> Result<(), HostFailure> {
        self.postcopy_ram().map(drop)
    }

    fn postcopy_run(&mut self) -> Result<(), HostFailure> {
        self.start_guest().map(drop)
    }

    fn open_preempt(&mut self, migration_id: u64) -> Result<(), HostFailure> {
        // The engine checks the hello against the id; the reader too,
        // before it places any page itself. At setup the channel comes
        // before any page, so before the guest starts here; once it runs,
        // this is a recovery's new channel, which comes where the
        // recovery's connection came from.
        let listener = if self.started_ns.is_some() {
            self.recover_listener.as_ref().or(self.listener.as_ref())
        } else {
            self.listener.as_ref()
        };
        let listener = listener.ok_or(HostFailure::NoPreemptListener)?;
        let reader = PreemptReader::open(
            listener,
            self.channel_deadline,
            &self.events,
            self.vm.memory.clone(),
            migration_id,
        )?;
        self.preempt = Some(reader);
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
    /// A multifd receiver failed.
    Channel,
    /// The preempt channel's reader queued bytes.
    Preempt,
    /// The source closed the preempt channel.
    PreemptEof,
    /// Reading the preempt channel failed.
    PreemptReadError(TransportError),
}

/// Reads the connection into buffers taken from `pool` until the end.
fn spawn_reader(
    conn: Connection,
    events: Sender<Event>,
    pool: Receiver<Vec<u8>>,
    tid: Arc<AtomicI32>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("livemig-stream".into())
        .spawn(move || {
            tid.store(priority::current_tid(), Ordering::Release);
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

/// Starts loading the stream arriving on `conn` into the VMM's fresh
/// guest `vm` on a migration thread of its own, and returns its handle at
/// once. [`ReceiveHandle::join`] gives the report of a migration that ran,
/// whatever its outcome: after a completed migration the guest runs here
/// (or stays paused if it was paused on the source:
/// [`DestinationReport::started`] says which).
///
/// [`ReceiveHandle::interrupt`] or [`ReceiveHandle::cancel`] stops the load
/// and tells the source, which resumes its guest, unless the guest already
/// runs here (postcopy): that is refused, and the load goes on.
///
/// `Err` means it could not even be set up: a RAM layout that cannot be
/// described, devices with a reserved or repeated section id, vCPUs that cannot be read, more sections than the engine
/// can require, a connection that cannot be duplicated, or RAM the kernel
/// would not preallocate ([`ReceiveOptions::mem_prealloc`]).
pub fn receive(
    vm: DestinationVm,
    conn: Connection,
    options: ReceiveOptions,
) -> Result<ReceiveHandle, MigrateError> {
    start_receive(vm, conn, None, options)
}

/// [`receive`] from a source that may send pages on multifd channels:
/// when the stream announces them, they are accepted on `listener` (the
/// one that gave `conn`), each within the idle timeout, checked by their
/// hellos and read on a thread each, straight into guest memory. Without
/// a listener ([`receive`]) such a source is refused before any page.
pub fn receive_with_channels(
    vm: DestinationVm,
    conn: Connection,
    listener: Listener,
    options: ReceiveOptions,
) -> Result<ReceiveHandle, MigrateError> {
    start_receive(vm, conn, Some(listener), options)
}

fn start_receive(
    vm: DestinationVm,
    conn: Connection,
    listener: Option<Listener>,
    options: ReceiveOptions,
) -> Result<ReceiveHandle, MigrateError> {
    ram_layout(&vm.memory).map_err(MigrateError::Layout)?;
    super::sections::check_devices(&vm.devices)?;
    let count = vm.vcpus.count();
    let vcpus = u32::try_from(count).map_err(|_| MigrateError::TooManyVcpus(count))?;
    let kvm = Kvm::new().map_err(MigrateError::OpenKvm)?;
    // The vCPUs have not run: they may be read without a pause.
    let (caps, model) = on_vcpu(vm.vcpus.as_ref(), 0, |fd| {
        Ok((
            VcpuCaps::probe(&kvm, &vm.vm, fd)?,
            CpuModel::capture(fd, vcpus)?,
        ))
    })
    .map_err(MigrateError::Vcpu)?;
    let required = required::sections(vcpus, &vm.devices).map_err(MigrateError::Destination)?;
    // Bound now, so that a busy address is refused before the migration.
    let recover_listener = options
        .recovery
        .address
        .as_ref()
        .map(Listener::bind)
        .transpose()?;
    let mut prealloc_ms = 0.0;
    if options.mem_prealloc && !vm.memory.is_preallocated() {
        let started = clock::monotonic_ns();
        let threads = thread::available_parallelism().unwrap_or(std::num::NonZeroUsize::MIN);
        vm.memory.prealloc(threads).map_err(MigrateError::Memory)?;
        prealloc_ms = (clock::monotonic_ns() - started) as f64 / 1e6;
    }
    let preallocated = vm.memory.is_preallocated();
    let (tx, events) = mpsc::channel();
    let host = KvmHost {
        pages: vm.memory.guest_end() / PAGE,
        placed: vec![0; words_for(vm.memory.guest_end() / PAGE)],
        vm,
        caps,
        model,
        source_running: None,
        postcopy: None,
        events: tx,
        faults: Arc::new(Mutex::new(Vec::new())),
        writer: Arc::default(),
        started_ns: None,
        listener,
        recover_listener,
        channels: None,
        preempt: None,
        channel_deadline: options.idle_timeout,
        end_received_ns: None,
        populate: Arc::new(Populate::new(options.populate && !preallocated)),
        prealloc_ms,
        stop: StopThreads::new(options.stop_priority, Arc::default()),
    };
    ReceiveHandle::spawn(Arc::new(Shared::default()), move |shared| {
        run(host, events, required, conn, options, shared)
    })
}

/// The migration thread's body: the engine over this thread's own storage,
/// fed until the stream ends.
fn run(
    mut host: KvmHost,
    events: Receiver<Event>,
    required: &'static [livemig_core::destination::RequiredSection],
    conn: Connection,
    options: ReceiveOptions,
    shared: &Shared,
) -> Result<DestinationReport, MigrateError> {
    let memory = host.vm.memory.clone();
    let layout = ram_layout(&memory).map_err(MigrateError::Layout)?;
    let mut received: Vec<Vec<u64>> = memory
        .regions()
        .iter()
        .map(|r| vec![0u64; PostcopyTracking::words(r.pages())])
        .collect();
    let mut requested = received.clone();
    let mut tracking = memory
        .regions()
        .iter()
        .zip(received.iter_mut().zip(requested.iter_mut()))
        .map(|(r, (rx, rq))| PostcopyTracking::new(rx, rq, r.pages()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(MigrateError::PostcopyTracking)?;
    let mut scratch = vec![0u8; wire::MAX_RECORD_BODY + wire::RECORD_HEADER_LEN];
    let mut engine = DestinationEngine::with_postcopy(&layout, &mut scratch, &mut tracking)
        .map_err(MigrateError::Destination)?;
    // The preempt channel comes from the listener; without one a source
    // that announces it is refused at setup.
    let mut preempt_scratch = match host.listener {
        Some(_) => vec![0u8; wire::MAX_RECORD_BODY + wire::RECORD_HEADER_LEN],
        None => Vec::new(),
    };
    if !preempt_scratch.is_empty() {
        engine.take_preempt(&mut preempt_scratch);
    }
    // The connection is up: a source that never sends is given up on too.
    engine.set_idle_timeout(options.idle_timeout);
    engine
        .require_sections(required)
        .map_err(MigrateError::Destination)?;
    // The self-check's books, 8 bytes a page: a source that verifies has
    // every page booked as it is placed, and its digest compared before
    // the guest may start here.
    let mut terms: Vec<Vec<u64>> = layout
        .iter()
        .map(|b| vec![0u64; DigestBooks::words(b)])
        .collect();
    let mut books = layout
        .iter()
        .zip(terms.iter_mut())
        .map(|(b, t)| DigestBooks::new(b, t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(MigrateError::DigestBooks)?;
    engine
        .verify_with(&mut books)
        .map_err(MigrateError::Destination)?;
    engine.begin(clock::now());
    let incoming = Incoming::open(conn, &host.events, host.stop.reader_tid())?;
    let (mut error, incoming) = run_receive_loop(
        &mut engine,
        &mut host,
        incoming,
        &events,
        &options.recovery,
        shared,
    );
    // A completed precopy starts its guest before anything else: what
    // follows (the reader's end, the channels' end) waits for other
    // threads to wake, which on a loaded 2-core host took a millisecond
    // and more, all of it inside the downtime. Nothing after it writes
    // guest memory (the channels were synced before the end of the
    // stream). The demo's digest, when asked for, must see memory before
    // the guest runs, so it keeps the late start.
    let early_start = (engine.is_completed()
        && error.is_none()
        && host.registered().is_none()
        && !options.digest)
        .then(|| (clock::monotonic_ns(), host.start_guest()));
    // The confirmation went out in the loop; with the guest started (or
    // the load over) nothing here is downtime any more.
    host.stop.end();
    // Free a reader still blocked in read (a failed migration) and let it
    // end: without buffers it stops at its next one.
    if let Some(incoming) = incoming {
        incoming.close(Shutdown::Read);
    }
    drop(events);
    host.merge_channel_pages();
    if let Some(rx) = host.channels.take() {
        rx.finish();
    }
    if let Some(rx) = host.preempt.take() {
        rx.finish();
    }

    let mut report = DestinationReport {
        stats: engine.stats().clone(),
        error: None,
        started: false,
        digest: None,
        end_received_ns: host.end_received_ns,
        loaded_ns: None,
        started_ns: None,
        digest_ms: 0.0,
        postcopy: None,
        populated_pages: host.populate.populated_pages(),
        populate_refused: host.populate.refused(),
        preallocated: host.vm.memory.is_preallocated(),
        prealloc_ms: host.prealloc_ms,
        priority_refused: host.stop.refused(),
        priority_raised: host.stop.count(),
    };
    let in_postcopy = host.registered().is_some();
    if in_postcopy {
        let mut postcopy = host.finish_postcopy().unwrap_or_else(|e| {
            error.get_or_insert(e);
            PostcopyReport::default()
        });
        postcopy.requests = report.stats.ram.postcopy_requests;
        report.postcopy = Some(postcopy);
        if (!engine.is_completed() || error.is_some()) && host.started_ns.is_some() {
            // A failed postcopy leaves a guest whose missing pages now read
            // as zero: stop it (only possible once no page is awaited, that
            // is after the unregister above).
            if let Err(e) = host.vm.vcpus.pause_all() {
                error.get_or_insert(ReceiveFailure::PauseAfterFailure(e));
            }
        }
    }
    if engine.is_completed() && error.is_none() {
        let (loaded, started) = match early_start {
            Some((at, started)) => (at, Some(started)),
            None => (clock::monotonic_ns(), None),
        };
        report.loaded_ns = Some(loaded);
        if !in_postcopy && options.digest {
            // Only pages written during the load can be non-zero: the rest
            // of the fresh RAM was never touched, so this equals the full
            // digest.
            report.digest = Some(
                memory
                    .digest_of(host.placed_pages())
                    .map_err(MigrateError::Memory)?,
            );
            report.digest_ms = (clock::monotonic_ns() - loaded) as f64 / 1e6;
        }
        if !in_postcopy {
            match started.unwrap_or_else(|| host.start_guest()) {
                Ok(started) => report.started = started,
                Err(e) => report.error = Some(ReceiveFailure::StartGuest(e)),
            }
        } else {
            report.started = host.started_ns.is_some();
        }
    } else {
        report.error = Some(error.unwrap_or_else(|| {
            ReceiveFailure::Failed(Box::new(engine.stats().error_desc.clone()))
        }));
    }
    report.started_ns = host.started_ns;
    shared.publish(&report.stats);
    Ok(report)
}

/// How long a paused destination waits on its events before it looks at
/// the recovery listener again.
const PAUSED_WAIT: Duration = Duration::from_millis(10);

/// The destination's event loop: stream bytes, faults and timeouts into the
/// engine, return-path bytes out. Returns what failed (`None`: the
/// engine's state tells), and the connection it ended with (none when it
/// ended paused: the engine then gave up).
///
/// After the postcopy switchover a cut connection (its end, a read or
/// write error, a silent source) pauses the engine instead of failing it:
/// the connection is closed, the guest runs on, faults are still recorded
/// (and pages that arrived as zero pages still filled here), and the
/// source's new connection is awaited on the recovery listener until the
/// [`Recovery::timeout`]; a new connection starts the engine's recovery.
fn run_receive_loop(
    engine: &mut DestinationEngine<'_>,
    host: &mut KvmHost,
    incoming: Incoming,
    events: &Receiver<Event>,
    recovery: &Recovery,
    shared: &Shared,
) -> (Option<ReceiveFailure>, Option<Incoming>) {
    let interrupt = &shared.cancel;
    let mut out = vec![0u8; 4096];
    let mut error: Option<ReceiveFailure> = None;
    let mut last_progress = 0;
    // An interrupt already dealt with (refused, or nothing to interrupt).
    let mut interrupt_seen = false;
    let mut link = Some(incoming);
    let mut pause: Option<Pause> = None;
    // What broke the connection, told with the pause it causes.
    let mut cut: Option<String> = None;
    let mut recovering = false;
    loop {
        if interrupt.is_cancelled() && !interrupt_seen {
            interrupt_seen = true;
            let signal = interrupt
                .signal()
                .and_then(|s| u32::try_from(s).ok())
                .unwrap_or(0);
            // A paused or recovering postcopy runs the guest here as much
            // as an active one does.
            let result = if is_postcopy(engine.status()) {
                Err(DestError::PostcopyCannotBeInterrupted)
            } else {
                engine.interrupt(clock::now(), signal)
            };
            match result {
                Ok(true) => {
                    // The source hears why before the connection closes.
                    let untold = link.as_ref().and_then(|l| {
                        flush_return_path(engine, &l.conn, &host.writer, &mut out).err()
                    });
                    return (Some(ReceiveFailure::Interrupted { signal, untold }), link);
                }
                Err(
                    e @ (DestError::PostcopyCannotBeInterrupted | DestError::InterruptAfterLoaded),
                ) => shared.refuse(CancelRefused::Destination(e)),
                // Completed or failed already: the loop ends by itself.
                Ok(false) | Err(_) => {}
            }
        }
        let now = clock::now();
        let wait = if pause.is_some() {
            PAUSED_WAIT
        } else {
            engine
                .poll_timeout()
                .map_or(MAX_WAIT, |t| t.saturating_since(now).min(MAX_WAIT))
        };
        let event = events.recv_timeout(wait);
        // Faults first, and their requests out at once: a vCPU waits for
        // each of them.
        if let Err(e) = serve_faults(engine, host) {
            error.get_or_insert(e);
        }
        send_return_path(engine, host, link.as_ref(), &mut out, &mut error, &mut cut);
        if host.fault_thread_died() {
            error.get_or_insert(ReceiveFailure::FaultThreadStopped);
        }
        let mut result = feed_preempt(engine, host, &mut error);
        let now = clock::now();
        let mut eof = false;
        let outcome = match event {
            // What the old connection's reader said after a pause is of
            // no use to anyone.
            Ok(Event::Bytes(..) | Event::Eof | Event::ReadError(_)) if link.is_none() => Ok(()),
            Ok(Event::Bytes(buf, n)) => {
                let bytes = buf.get(..n).unwrap_or_default();
                // In postcopy a vCPU may wait on a page: the preempt
                // channel and the faults get a turn between pieces.
                let piece = if is_postcopy(engine.status()) {
                    POSTCOPY_PIECE
                } else {
                    bytes.len().max(1)
                };
                let mut r = Ok(());
                for (i, part) in bytes.chunks(piece).enumerate() {
                    if i > 0 {
                        r = r.and(feed_preempt(engine, host, &mut error));
                        if let Err(e) = serve_faults(engine, host) {
                            error.get_or_insert(e);
                        }
                        send_return_path(
                            engine,
                            host,
                            link.as_ref(),
                            &mut out,
                            &mut error,
                            &mut cut,
                        );
                    }
                    r = r.and(match engine.handle_input(clock::now(), part, host) {
                        Ok(_) => Ok(()),
                        Err(HandleError::Dest(e)) => Err(e),
                        Err(HandleError::Host { op, error: e }) => {
                            error.get_or_insert(ReceiveFailure::Host { op, error: e });
                            Err(DestError::Host(op))
                        }
                    });
                    // A recovery's connection refused (or its preempt
                    // channel missing) pauses: the rest is the old
                    // connection's.
                    if r.is_err() || engine.is_paused() {
                        break;
                    }
                }
                if (engine.is_loaded() || engine.is_completed()) && host.end_received_ns.is_none() {
                    host.end_received_ns = Some(clock::monotonic_ns());
                }
                if let Some(l) = &link {
                    // The reader is gone if this fails; the loop learns it
                    // from the end of the stream.
                    // The buffer's length is what the reader's next read
                    // may fill (its capacity stays, so growing it back
                    // after postcopy allocates nothing).
                    let mut buf = buf;
                    buf.resize(read_size(engine.status()), 0);
                    let _ = l.pool.send(buf);
                }
                r
            }
            Ok(Event::Fault | Event::Preempt) | Err(RecvTimeoutError::Timeout) => Ok(()),
            Ok(Event::Channel) => {
                if let Some(f) = host.channel_failure() {
                    engine.handle_channel_failure(now, format_args!("{f}"));
                    error.get_or_insert(ReceiveFailure::Channel(f));
                }
                Ok(())
            }
            Ok(Event::Eof) | Err(RecvTimeoutError::Disconnected) => {
                eof = true;
                cut.get_or_insert_with(|| "the source closed the connection".into());
                engine.handle_eof(now)
            }
            Ok(Event::ReadError(e)) => {
                eof = true;
                let r = if is_postcopy(engine.status()) {
                    engine.handle_io_error(now, format_args!("connection lost: {e}"));
                    Ok(())
                } else {
                    engine.handle_eof(now)
                };
                if engine.is_paused() {
                    cut.get_or_insert_with(|| format!("connection lost: {e}"));
                } else {
                    error.get_or_insert(ReceiveFailure::ConnectionLost(e));
                }
                r
            }
            // A preempt channel closed at a pause (before a recovery's
            // stream announces a new one) has nothing left to say.
            Ok(Event::PreemptEof | Event::PreemptReadError(_)) if host.preempt.is_none() => Ok(()),
            // The preempt channel fails the migration as the main
            // connection does (its bytes before the failure were taken
            // above); after the switchover it pauses it. After the end it
            // has nothing left to carry.
            Ok(Event::PreemptEof) => {
                if !engine.is_completed() {
                    let failure = ReceiveFailure::PreemptClosed;
                    engine.handle_preempt_failure(now, format_args!("{failure}"));
                    keep_failure(engine, failure, &mut error, &mut cut);
                }
                Ok(())
            }
            Ok(Event::PreemptReadError(e)) => {
                if !engine.is_completed() {
                    let failure = ReceiveFailure::PreemptLost(e);
                    engine.handle_preempt_failure(now, format_args!("{failure}"));
                    keep_failure(engine, failure, &mut error, &mut cut);
                }
                Ok(())
            }
        };
        result = result.and(outcome);
        let result = result.and_then(|()| match engine.poll_timeout() {
            Some(t) if t <= now => engine.handle_timeout(now),
            _ => Ok(()),
        });
        if let Err(e) = result
            && error.is_none()
            && e != DestError::AlreadyFailed
        {
            error = Some(ReceiveFailure::Engine {
                error: e,
                peer: link
                    .as_ref()
                    .map_or_else(String::new, |l| l.conn.peer().to_string()),
            });
        }
        send_return_path(engine, host, link.as_ref(), &mut out, &mut error, &mut cut);
        if host.started_ns.is_some() {
            // A postcopy guest runs here, and what the source waits for
            // (the PONG after the switchover) is out: the stop is over.
            host.stop.end();
        }
        if engine.is_paused() {
            // Requests wait for the recovery, with the engine.
            host.writer.close();
            if let Some(l) = link.take() {
                // The guest runs on; the old connection is of no more use.
                l.close(Shutdown::Both);
                if let Some(rx) = host.preempt.take() {
                    rx.finish();
                }
                let reason = cut
                    .take()
                    .unwrap_or_else(|| "the source fell silent".into());
                shared.emit(MigrationEvent::PostcopyPaused { reason });
                shared.publish(engine.stats());
                pause = Some(Pause::new(recovery.timeout));
                recovering = false;
            }
            let listener = host.recover_listener.as_ref().or(host.listener.as_ref());
            match pause.as_mut().map(|p| p.poll(listener, shared)) {
                Some(Awaited::Connection(conn)) => {
                    // What the old connection's reader queued before it
                    // ended must not be taken for the new one's (its end
                    // would pause again). The rest are wake-ups only: the
                    // faults wait in their queue, and no channel runs in
                    // postcopy.
                    while events.try_recv().is_ok() {}
                    // A connection that cannot be read leaves the engine
                    // paused: the source tries again.
                    if let Ok(l) = Incoming::open(conn, &host.events, host.stop.reader_tid()) {
                        let peer = l.conn.peer().to_string();
                        link = Some(l);
                        pause = None;
                        // The end this pass saw was the old connection's;
                        // the source often waits in the listener's backlog
                        // already, and taken for the new one's it would
                        // end the load below.
                        eof = false;
                        match engine.recover(clock::now()) {
                            Ok(()) => {
                                recovering = true;
                                shared.emit(MigrationEvent::RecoveryStarted { peer });
                            }
                            Err(e) => {
                                error.get_or_insert(ReceiveFailure::Engine { error: e, peer });
                            }
                        }
                    }
                }
                Some(Awaited::GiveUp(why)) => {
                    if let Err(e) = engine.give_up(clock::now()) {
                        error.get_or_insert(ReceiveFailure::Engine {
                            error: e,
                            peer: String::new(),
                        });
                    }
                    shared.emit(MigrationEvent::RecoveryAbandoned {
                        reason: why.to_string(),
                        pages: engine.stats().error_desc.as_str().to_string(),
                    });
                    return (error, None);
                }
                Some(Awaited::Nothing) | None => {}
            }
        } else if recovering && engine.status() == MigrationStatus::PostcopyActive {
            recovering = false;
            shared.emit(MigrationEvent::Recovered {
                recoveries: engine.stats().postcopy_recoveries,
            });
        }
        if clock::monotonic_ns() - last_progress > 50_000_000 {
            last_progress = clock::monotonic_ns();
            shared.publish(engine.stats());
        }
        if (eof && !engine.is_paused() && pause.is_none())
            || engine.is_completed()
            || engine.status() == MigrationStatus::Failed
            || error.is_some()
        {
            return (error, link);
        }
    }
}

/// Whether the guest runs here in postcopy: active, paused or recovering.
fn is_postcopy(status: MigrationStatus) -> bool {
    matches!(
        status,
        MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyPaused
            | MigrationStatus::PostcopyRecoverSetup
            | MigrationStatus::PostcopyRecover
    )
}

/// A failure the engine was told about: the migration's error, unless it
/// only paused the engine (then it is what the pause is told with).
fn keep_failure(
    engine: &DestinationEngine<'_>,
    failure: ReceiveFailure,
    error: &mut Option<ReceiveFailure>,
    cut: &mut Option<String>,
) {
    if engine.is_paused() {
        cut.get_or_insert_with(|| failure.to_string());
    } else {
        error.get_or_insert(failure);
    }
}

/// Writes what the engine queued for the return path on `link`, if there
/// is one (a paused engine queues nothing). A failed write after the
/// switchover is a cut connection like a failed read: the engine pauses.
///
/// Once postcopy runs the guest here, the fault thread is let write its
/// own requests on the same connection (see [`requests`]).
fn send_return_path(
    engine: &mut DestinationEngine<'_>,
    host: &KvmHost,
    link: Option<&Incoming>,
    out: &mut [u8],
    error: &mut Option<ReceiveFailure>,
    cut: &mut Option<String>,
) {
    let Some(link) = link else {
        return;
    };
    if let Err(e) = flush_return_path(engine, &link.conn, &host.writer, out) {
        if is_postcopy(engine.status()) {
            engine.handle_io_error(clock::now(), format_args!("return path lost: {e}"));
        }
        keep_failure(engine, ReceiveFailure::ReturnPathLost(e), error, cut);
        return;
    }
    if engine.status() == MigrationStatus::PostcopyActive
        && host.registered().is_some()
        && !host.writer.is_open()
    {
        // Everything queued so far is out: from here on the engine names
        // the block of each request it queues, as the fault thread's come
        // in between.
        engine.set_host_requests();
        host.writer.open(&link.conn);
    }
    if engine.status() == MigrationStatus::PostcopyActive
        && let (Some(ram), Some(preempt)) = (host.registered(), &host.preempt)
        && !preempt.is_armed()
    {
        preempt.arm(ram, engine.page_term_key());
    }
}

/// Hands the bytes the preempt channel's reader queued to the engine;
/// a host failure is kept in `error`, like the main stream's.
fn feed_preempt(
    engine: &mut DestinationEngine<'_>,
    host: &mut KvmHost,
    error: &mut Option<ReceiveFailure>,
) -> Result<(), DestError> {
    let Some(reader) = &host.preempt else {
        return Ok(());
    };
    let bufs: Vec<Vec<u8>> = reader.take().collect();
    for buf in bufs {
        match engine.handle_preempt_input(clock::now(), &buf, host) {
            Ok(_) => {}
            Err(HandleError::Dest(e)) => return Err(e),
            Err(HandleError::Host { op, error: e }) => {
                error.get_or_insert(ReceiveFailure::Host { op, error: e });
                return Err(DestError::Host(op));
            }
        }
    }
    Ok(())
}

/// Writes whatever the engine queued for the return path, under the
/// writer's lock (a fault thread's request never cuts a message). Outside
/// active postcopy the fault thread's writes end first, under the same
/// lock: none may follow what the engine says from then on (its SHUT).
fn flush_return_path(
    engine: &mut DestinationEngine<'_>,
    conn: &Connection,
    writer: &ReturnPathWriter,
    out: &mut [u8],
) -> Result<(), TransportError> {
    let mut direct = writer.lock();
    if engine.status() != MigrationStatus::PostcopyActive {
        *direct = None;
    }
    loop {
        let n = engine.poll_return_path(out);
        if n == 0 {
            return Ok(());
        }
        conn.write_all(out.get(..n).unwrap_or_default())?;
    }
}

/// Hands the queued faults to the engine (a request each on the return
/// path, or booked if the fault thread wrote it) or, for a page that
/// arrived as a zero page in precopy and so was never written here, fills
/// it with zeros.
fn serve_faults(
    engine: &mut DestinationEngine<'_>,
    host: &mut KvmHost,
) -> Result<(), ReceiveFailure> {
    let pages = match host.faults.lock() {
        Ok(mut q) if !q.is_empty() => std::mem::take(&mut *q),
        _ => return Ok(()),
    };
    if !is_postcopy(engine.status()) {
        // Completed (or failed): the RAM is about to be unregistered,
        // which wakes them.
        return Ok(());
    }
    let now = clock::now();
    for (gpa, sent) in pages {
        let (block, page) = host.block_page(gpa)?;
        if engine.is_received(block, page) {
            // A request the fault thread sent for it is answered with a
            // copy the engine drops (the page is here): this fill is what
            // wakes the vCPU.
            host.fill_zero(gpa)?;
            continue;
        }
        let booked = if sent {
            engine.handle_page_fault_sent(now, block, page)
        } else {
            engine.handle_page_fault(now, block, page)
        };
        match booked {
            Ok(_) => {}
            Err(e) => return Err(ReceiveFailure::PageFault(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While a vCPU may wait for a page, a request never waits behind a
    /// read of more than 64 KiB on the socket it shares with the stream;
    /// elsewhere the reader fills its whole buffer.
    #[test]
    fn the_main_reader_reads_small_pieces_only_in_postcopy() {
        for status in [
            MigrationStatus::PostcopyActive,
            MigrationStatus::PostcopyPaused,
            MigrationStatus::PostcopyRecoverSetup,
            MigrationStatus::PostcopyRecover,
        ] {
            assert_eq!(read_size(status), POSTCOPY_READ, "{status:?}");
        }
        for status in [
            MigrationStatus::Setup,
            MigrationStatus::Active,
            MigrationStatus::Completed,
        ] {
            assert_eq!(read_size(status), READ_BUFFER, "{status:?}");
        }
        const { assert!(POSTCOPY_READ < READ_BUFFER) };
    }
}
