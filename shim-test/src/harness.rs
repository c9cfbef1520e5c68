//! Whole migrations in simulated time: [`run_migration`] drives a
//! [`SourceEngine`] and a [`DestinationEngine`] against each other over a
//! simulated duplex link, with a dirtying guest on the source, and reports
//! the final statistics and the integrity verdict.
//!
//! The harness is the simulated counterpart of the KVM shim: it carries out
//! every [`SourceAction`] the way a VMM would (the dirty log is fetched
//! without clearing and cleared with the fetched bits as the mask, pages are
//! read from guest memory after their chunk was cleared, the guest stops
//! when asked and runs again when a migration fails), so a bug in the
//! engines shows up here as a digest mismatch, deterministically.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

use livemig_core::capabilities::Capabilities;
use livemig_core::config::MigrationConfig;
use livemig_core::destination::{
    ChannelTotals, ChannelsHost, DestinationEngine, DestinationHost, PostcopyHost,
    PostcopyTracking, RequiredSection, SectionDue,
};
use livemig_core::digest::{DigestBooks, DigestKey, Verification};
use livemig_core::return_path::RpDecoder;
use livemig_core::source::{BlockTracking, EndReason, PageReader, SourceAction, SourceEngine};
use livemig_core::stats::MigrationStats;
use livemig_core::status::{MigrationStatus, StatusChange};
use livemig_core::time::Instant;
use livemig_core::wire::{self, BlockId, BlockInfo, DeviceState, PageRange};

use crate::inject::Injector;
use crate::{
    BlockSpec, Burst, ChannelError, FirstDifference, InjectedFault, LinkConfig, LinkError,
    MemoryError, SimChannels, SimDirtyLog, SimLink, SimRam, WorkingSet, Workload, duplex, fill,
};

/// The migration id the simulated source announces for its channels.
pub const MIGRATION_ID: u64 = 0x6c69_7665_6d69_6721;

/// The id of the simulated vCPU's device-state record.
pub const CPU_DEVICE_ID: &str = "cpu";

/// The id of the simulated compatibility record (the CPU model), which
/// the source writes at setup, before any RAM, and the destination
/// refuses when it differs from its own.
pub const MODEL_DEVICE_ID: &str = "cpu-model";

/// The sections the simulated destination requires: a stream without the
/// vCPU state is refused rather than started from reset.
const REQUIRED: &[RequiredSection] = &[RequiredSection {
    id: CPU_DEVICE_ID,
    instance: 0,
    due: SectionDue::Switchover,
}];

/// A dirtying guest.
#[derive(Clone, Copy, Debug)]
pub struct GuestSpec {
    /// Pages the guest keeps writing.
    pub working_set: WorkingSet,
    /// Writes per simulated second, before any throttle.
    pub rate_pages_per_sec: u64,
    /// Seed of the guest's page choices.
    pub seed: u64,
    /// Writes in bursts instead of at a steady rate.
    pub burst: Option<Burst>,
}

/// When the harness cancels the migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelWhen {
    /// As soon as the source reaches this state.
    State(MigrationStatus),
    /// Once the source has handed this many bytes to the link.
    AfterBytes(u64),
}

/// Everything one simulated migration needs.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The guest's RAM blocks.
    pub blocks: Vec<BlockSpec>,
    /// Pages filled with nonzero data before the migration (spread over all
    /// blocks), so the guest is not all zero pages.
    pub fill_pages: u64,
    /// The running guest, if any (none: an idle guest).
    pub guest: Option<GuestSpec>,
    /// Source-to-destination link (main stream).
    pub forward: LinkConfig,
    /// Destination-to-source link (return path).
    pub back: LinkConfig,
    /// With multifd: each channel's link, by channel index; a channel
    /// without an entry gets the main link's bandwidth and latency,
    /// without its faults, and a send buffer of
    /// [`SimChannels::SEND_BUFFER`].
    pub channel_links: Vec<LinkConfig>,
    /// With postcopy-preempt: the preempt channel's link (none: the main
    /// link's bandwidth and latency, without its faults or send buffer).
    pub preempt_link: Option<LinkConfig>,
    /// Capabilities, parameters and limits.
    pub config: MigrationConfig,
    /// Cancel the migration at this point.
    pub cancel: Option<CancelWhen>,
    /// With pause-before-switchover, how long the operator waits in
    /// pre-switchover before continuing.
    pub continue_after_ns: u64,
    /// How long the destination guest runs after the switchover, to show
    /// that it continues.
    pub run_after_ns: u64,
    /// The operator's `migrate-start-postcopy`, at this simulated time
    /// (needs the postcopy-ram capability).
    pub start_postcopy_at_ns: Option<u64>,
    /// Simulated time after which the harness gives up (a hang is a bug).
    pub watchdog_ns: u64,
    /// The fixed cost of stopping: after stopping the vCPUs the harness
    /// lets this much simulated time pass before the final sync (what
    /// stopping vCPUs and saving devices take on a real host). It reports
    /// this plus the main link's latency (the last byte's trip) to the
    /// engine as its stop cost.
    pub stop_cost_ns: u64,
    /// The source host's CPU model, sent as the setup-time
    /// [`MODEL_DEVICE_ID`] record.
    pub source_cpu_model: u32,
    /// The destination host's CPU model: a source record naming another
    /// one is refused, before any RAM moves.
    pub destination_cpu_model: u32,
    /// Both ends keep digest books and the destination compares the
    /// source's digest before its guest may start (see
    /// `livemig_core::digest`). On by default.
    pub verify: bool,
    /// The source audits its memory against its books at the stop (needs
    /// `verify`).
    pub audit: bool,
    /// A fault the self-check must catch.
    pub fault: Option<InjectedFault>,
    /// Postcopy recovery: the links (main stream, return path) of the
    /// connections after the first, in order; connections beyond the list
    /// get the first connection's links without their faults.
    pub recovery_links: Vec<(LinkConfig, LinkConfig)>,
    /// Postcopy recovery with postcopy-preempt: the source opens the
    /// preempt channel again with each new connection (its link: the
    /// first channel's without its faults). Off: it resumes without one,
    /// and requested pages take the main stream.
    pub reopen_preempt: bool,
    /// Postcopy recovery: how long after both sides paused the operator
    /// connects again.
    pub reconnect_after_ns: u64,
    /// Postcopy recovery: how long the operator keeps trying after the
    /// first pause of a run of pauses before it gives up on both sides.
    pub recover_timeout_ns: u64,
}

impl Scenario {
    /// An idle guest with the given blocks on an ideal 1 GB/s link.
    pub fn new(blocks: Vec<BlockSpec>) -> Self {
        Scenario {
            blocks,
            fill_pages: 0,
            guest: None,
            forward: LinkConfig::new(1_000_000_000, 50_000),
            back: LinkConfig::new(1_000_000_000, 50_000),
            channel_links: Vec::new(),
            preempt_link: None,
            config: MigrationConfig::default(),
            cancel: None,
            continue_after_ns: 1_000_000,
            run_after_ns: 10_000_000,
            start_postcopy_at_ns: None,
            watchdog_ns: 3_600 * 1_000_000_000,
            stop_cost_ns: 0,
            source_cpu_model: 1,
            destination_cpu_model: 1,
            verify: true,
            audit: false,
            fault: None,
            recovery_links: Vec::new(),
            reopen_preempt: true,
            reconnect_after_ns: 1_000_000,
            recover_timeout_ns: 600 * 1_000_000_000,
        }
    }
}

/// What happened.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The source's final statistics.
    pub source: MigrationStats,
    /// The destination's final statistics.
    pub destination: MigrationStats,
    /// Digest of source memory at the moment its vCPUs stopped.
    pub stop_digest: Option<u64>,
    /// Digest of destination memory when it completed.
    pub destination_digest: Option<u64>,
    /// First difference between destination and source-at-stop, if any.
    pub first_difference: Option<FirstDifference>,
    /// The source guest is running at the end (always true unless the
    /// guest moved to the destination, or the source committed to it).
    pub source_running: bool,
    /// The destination started the guest (at the commit or the end of the
    /// stream in precopy, at the run command in postcopy).
    pub destination_running: bool,
    /// The source's memory at the end still equals its image at the stop:
    /// with its vCPUs stopped, the source holds a complete copy.
    pub source_has_copy: bool,
    /// The destination loaded a complete copy: its memory, before its guest
    /// ran, equals the source's at the stop, and so does its CPU state.
    /// (Precopy only: a postcopy guest runs while its memory arrives.)
    pub destination_has_copy: bool,
    /// The source guest kept writing after the migration ended.
    pub source_continued: bool,
    /// The destination guest ran after the switchover, its CPU state
    /// matched the source's at stop, and every page it checked held the
    /// stamp it expected.
    pub guest_continued: bool,
    /// Simulated nanoseconds from the source's vCPU stop to the
    /// destination's vCPU start.
    pub downtime_ns: Option<u64>,
    /// Simulated time at the end.
    pub end_ns: u64,
    /// Bytes the source put on the link.
    pub bytes_sent: u64,
    /// Bytes the destination put on the return path.
    pub return_path_bytes: u64,
    /// KVM-style clear calls made on the simulated dirty log.
    pub dirty_log_clears: u64,
    /// Pages cleared by those calls.
    pub cleared_pages: u64,
    /// Simulated time at which the source's vCPUs stopped.
    pub stop_ns: Option<u64>,
    /// Bytes the source had put on the link when its vCPUs stopped.
    pub bytes_at_stop: Option<u64>,
    /// With multifd: bytes the source put on each channel.
    pub channel_bytes: Vec<u64>,
    /// With multifd: bytes on each channel when the first pass ended.
    pub channel_bytes_after_first_pass: Option<Vec<u64>>,
    /// With multifd: bytes on each channel when the vCPUs stopped.
    pub channel_bytes_at_stop: Option<Vec<u64>>,
    /// Breaches of the dirty-chunk clearing protocol seen by the harness:
    /// a page read while its chunk's log was still uncleared, a chunk
    /// cleared twice in one sync, a misaligned chunk.
    pub clear_violations: Vec<String>,
    /// Postcopy, when the guest was started on the destination before all
    /// its memory had arrived.
    pub postcopy: Option<PostcopyOutcome>,
    /// Destination memory equals what the guest would hold had it kept
    /// running on the source: for precopy, the source image at stop time;
    /// for postcopy, that image plus the destination guest's own writes
    /// replayed onto it.
    pub memory_identical: bool,
    /// The watchdog fired.
    pub timed_out: bool,
    /// Why the source's migration ended, as its engine reported it.
    pub end_reason: Option<EndReason>,
    /// The scenario's injected fault happened.
    pub fault_injected: bool,
    /// The pages (block index, page index) whose data the injected fault
    /// changed on their way to the destination.
    pub injected_pages: Vec<(u16, u64)>,
    /// Every throttle the source set on its guest, in order.
    pub throttle_changes: Vec<ThrottleChange>,
    /// The source guest's throttle when the migration ended (zero: lifted).
    pub final_throttle: u8,
    /// Every status change the source engine made, in order.
    pub source_changes: Vec<StatusChange>,
    /// Every status change the destination engine made, in order.
    pub destination_changes: Vec<StatusChange>,
    /// Connections after the first one (postcopy recoveries attempted).
    pub reconnects: u64,
    /// Both sides gave up recovering at the scenario's deadline.
    pub gave_up: bool,
}

/// One [`SourceAction::SetThrottle`] the harness carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThrottleChange {
    /// Simulated time.
    pub at_ns: u64,
    /// Passes the source had completed (`stats.iterations`).
    pub iterations: u64,
    /// Bytes the source had put on the link.
    pub bytes_sent: u64,
    /// The new throttle.
    pub percent: u8,
}

/// What happened in postcopy.
#[derive(Clone, Debug, Default)]
pub struct PostcopyOutcome {
    /// Times the destination guest touched a page that had not arrived.
    pub faults: u64,
    /// Page requests the destination sent.
    pub requests: u64,
    /// Pages the destination dropped on the source's discard ranges.
    pub discarded_pages: u64,
    /// Writes the destination guest made.
    pub guest_writes: u64,
    /// Longest time from a page request to the page's arrival.
    pub max_request_latency_ns: u64,
    /// Bytes the postcopy preempt channels carried (hellos included),
    /// the ones reopened in recoveries too.
    pub preempt_bytes: u64,
    /// Bytes the last preempt channel carried, when a recovery reopened
    /// one (0 otherwise).
    pub reopened_preempt_bytes: u64,
    /// Pages the destination guest faulted on while postcopy was paused
    /// or recovering: their requests went out after the recovery.
    pub requests_while_paused: u64,
}

impl Outcome {
    /// A completed migration whose destination memory equals the source's at
    /// stop time, and whose guest continued.
    pub fn verified(&self) -> bool {
        self.source.status == MigrationStatus::Completed
            && self.destination.status == MigrationStatus::Completed
            && self.memory_identical
            && self.first_difference.is_none()
            && self.guest_continued
            // A migration that verified itself found its digests equal.
            && (self.source.verification == Verification::Off
                || self.destination.verification.is_verified())
    }
}

/// A scenario that could not even be set up.
#[derive(Debug)]
pub struct HarnessError(pub String);

impl fmt::Display for HarnessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HarnessError {}

fn setup_err(what: &str, e: impl fmt::Display) -> HarnessError {
    HarnessError(format!("{what}: {e}"))
}

/// A page-sending action's bytes, as the wire carries them: `header`, then
/// each page of `pages` of `block` read from `ram` (each read shown to the
/// clear audit), into `buf`.
fn gather(
    buf: &mut Vec<u8>,
    header: &[u8],
    block: u16,
    pages: &[u64],
    ram: &SimRam,
    audit: &mut ClearAudit,
    guest_running: bool,
) -> Result<(), HarnessError> {
    buf.clear();
    buf.extend_from_slice(header);
    for &p in pages {
        audit.read(usize::from(block), p, guest_running);
        let data = ram
            .page(usize::from(block), p)
            .map_err(|e| setup_err("engine asked for a page outside RAM", e))?;
        buf.extend_from_slice(data);
    }
    Ok(())
}

/// Watches the dirty-chunk clearing protocol from the outside: after each
/// sync, every chunk with a fetched dirty bit must be cleared exactly once
/// before any of its pages is read while the guest runs.
struct ClearAudit {
    shift: u8,
    /// (block, chunk) pairs fetched dirty and not cleared since.
    pending: HashSet<(usize, u64)>,
    violations: Vec<String>,
}

/// Violations kept verbatim; a broken engine repeats its mistake on every
/// page, and the first few say what went wrong.
const MAX_VIOLATIONS: usize = 16;

impl ClearAudit {
    fn violation(&mut self, what: String) {
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(what);
        }
    }

    fn synced(&mut self, block: usize, fetched: &[u64]) {
        let words_per_chunk = 1usize << (self.shift - 6);
        for (chunk, words) in fetched.chunks(words_per_chunk).enumerate() {
            if words.iter().any(|&w| w != 0) {
                self.pending.insert((block, chunk as u64));
            }
        }
    }

    fn cleared(&mut self, block: usize, first: u64, count: u64, block_pages: u64) {
        let chunk_pages = 1u64 << self.shift;
        let expected = chunk_pages.min(block_pages.saturating_sub(first));
        if !first.is_multiple_of(chunk_pages) || count != expected {
            self.violation(format!(
                "block {block}: clear of {count} pages at {first} is not one aligned, clipped chunk"
            ));
        }
        if !self.pending.remove(&(block, first >> self.shift)) {
            self.violation(format!(
                "block {block}: chunk at page {first} cleared twice, or with nothing fetched"
            ));
        }
    }

    /// A populated query over `pages` pages from `first`: the answer must
    /// not predate a clear still owed by one of their chunks.
    fn asked(&mut self, block: usize, first: u64, pages: u64, guest_running: bool) {
        let chunks = first >> self.shift..=(first + pages - 1) >> self.shift;
        if guest_running && chunks.clone().any(|c| self.pending.contains(&(block, c))) {
            self.violation(format!(
                "block {block}: populated pages {first}..{} asked before their chunk's dirty \
                 log was cleared",
                first + pages
            ));
        }
    }

    fn read(&mut self, block: usize, page: u64, guest_running: bool) {
        if guest_running && self.pending.contains(&(block, page >> self.shift)) {
            self.violation(format!(
                "block {block}: page {page} read before its chunk's dirty log was cleared"
            ));
        }
    }
}

/// Source memory as the engine reads it.
struct Pages<'a> {
    ram: &'a SimRam,
    audit: &'a RefCell<ClearAudit>,
    guest_running: bool,
}

impl PageReader for Pages<'_> {
    fn is_zero_page(&self, block: u16, page: u64) -> bool {
        self.audit
            .borrow_mut()
            .read(usize::from(block), page, self.guest_running);
        self.ram.is_zero(usize::from(block), page).unwrap_or(false)
    }

    fn page_term(&self, block: u16, page: u64, key: &DigestKey) -> u64 {
        self.audit
            .borrow_mut()
            .read(usize::from(block), page, self.guest_running);
        let data = self.ram.page(usize::from(block), page).unwrap_or(&[]);
        key.page_term(block, page, data)
    }

    fn populated(&self, block: u16, first: u64, mask: &mut [u64]) {
        let block = usize::from(block);
        let pages = mask.len() as u64 * 64;
        self.audit
            .borrow_mut()
            .asked(block, first, pages, self.guest_running);
        self.ram.populated(block, first, mask);
    }
}

/// Destination memory and devices as the engine writes them.
struct Host<'a> {
    ram: &'a mut SimRam,
    /// The multifd channels and the layout their packets are checked
    /// against.
    channels: &'a mut SimChannels,
    layout: &'a [BlockInfo<'a>],
    cpu: Option<Vec<u8>>,
    /// The package's run command arrived: start the guest.
    run: bool,
    /// The main stream announced the preempt channel: its bytes may be
    /// taken from now on.
    preempt_opened: bool,
    discarded: u64,
    /// This host's CPU model (see [`Scenario::destination_cpu_model`]).
    cpu_model: u32,
}

impl<'a> Host<'a> {
    /// A host for one delivery: nothing loaded, run or discarded yet.
    fn new(
        ram: &'a mut SimRam,
        channels: &'a mut SimChannels,
        layout: &'a [BlockInfo<'a>],
        cpu_model: u32,
    ) -> Self {
        Self {
            ram,
            channels,
            layout,
            cpu: None,
            run: false,
            preempt_opened: false,
            discarded: 0,
            cpu_model,
        }
    }
}

/// Why the simulated destination refused something.
#[derive(Debug)]
enum SimHostError {
    /// Simulated RAM refused the write.
    Ram(MemoryError),
    /// The source's CPU model is not this host's.
    CpuModel {
        /// The source's model.
        source: u32,
        /// This host's model.
        destination: u32,
    },
    /// A device record this host does not know.
    UnknownDevice,
    /// A multifd channel failed.
    Channel(ChannelError),
}

impl fmt::Display for SimHostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimHostError::Ram(e) => write!(f, "simulated RAM write: {e}"),
            SimHostError::CpuModel {
                source,
                destination,
            } => write!(
                f,
                "the source's CPU model {source} differs from this host's, {destination}"
            ),
            SimHostError::UnknownDevice => f.write_str("unknown device"),
            SimHostError::Channel(e) => e.fmt(f),
        }
    }
}

impl DestinationHost for Host<'_> {
    type Error = SimHostError;

    fn place_pages(
        &mut self,
        block: u16,
        first_page: u64,
        data: &[u8],
    ) -> Result<(), SimHostError> {
        let block = usize::from(block);
        let page_size = self
            .ram
            .blocks()
            .get(block)
            .ok_or(SimHostError::Ram(MemoryError::UnknownBlock {
                block,
                blocks: self.ram.blocks().len(),
            }))?
            .page_size;
        for (i, page) in data.chunks(page_size).enumerate() {
            self.ram
                .write_page(block, first_page + i as u64, page)
                .map_err(SimHostError::Ram)?;
        }
        Ok(())
    }

    fn place_zero_pages(
        &mut self,
        block: u16,
        first_page: u64,
        count: u64,
    ) -> Result<(), SimHostError> {
        for page in first_page..first_page + count {
            self.ram
                .zero_page(usize::from(block), page)
                .map_err(SimHostError::Ram)?;
        }
        Ok(())
    }

    fn load_device(&mut self, device: &DeviceState<'_>) -> Result<(), SimHostError> {
        if device.id.as_str() == MODEL_DEVICE_ID && device.instance == 0 && device.version == 1 {
            let source = <[u8; 4]>::try_from(device.data)
                .map(u32::from_be_bytes)
                .map_err(|_| SimHostError::UnknownDevice)?;
            if source != self.cpu_model {
                return Err(SimHostError::CpuModel {
                    source,
                    destination: self.cpu_model,
                });
            }
            return Ok(());
        }
        if device.id.as_str() != CPU_DEVICE_ID || device.instance != 0 || device.version != 1 {
            return Err(SimHostError::UnknownDevice);
        }
        self.cpu = Some(device.data.to_vec());
        Ok(())
    }

    fn postcopy(&mut self) -> Option<&mut dyn PostcopyHost<Error = SimHostError>> {
        Some(self)
    }

    fn channels(&mut self) -> Option<&mut dyn ChannelsHost<Error = SimHostError>> {
        Some(self)
    }
}

impl ChannelsHost for Host<'_> {
    type Error = SimHostError;

    fn open_channels(
        &mut self,
        channels: u16,
        migration_id: u64,
        key: Option<DigestKey>,
    ) -> Result<(), SimHostError> {
        self.channels
            .open(channels, migration_id, key, self.layout)
            .map_err(SimHostError::Channel)
    }

    fn sync_channels(&mut self, generation: u32) -> Result<ChannelTotals, SimHostError> {
        self.channels
            .sync(generation, self.ram, self.layout)
            .map_err(SimHostError::Channel)
    }

    fn take_channel_digest(&mut self, block: u16) -> u64 {
        self.channels.take_digest(block)
    }

    fn seal_channels(&mut self) -> Result<(), SimHostError> {
        self.channels
            .seal(self.ram, self.layout)
            .map_err(SimHostError::Channel)
    }

    fn end_channels(&mut self, placed: &mut dyn FnMut(u16, u64, u64)) -> Result<(), SimHostError> {
        self.channels
            .end(self.ram, self.layout, placed)
            .map_err(SimHostError::Channel)
    }
}

impl PostcopyHost for Host<'_> {
    type Error = SimHostError;

    fn postcopy_advise(
        &mut self,
        _host_page_size: u64,
        _target_page_size: u64,
    ) -> Result<(), SimHostError> {
        Ok(())
    }

    fn discard(&mut self, block: u16, range: PageRange) -> Result<(), SimHostError> {
        for page in range.first..range.end() {
            self.ram
                .zero_page(usize::from(block), page)
                .map_err(SimHostError::Ram)?;
        }
        self.discarded += range.count;
        Ok(())
    }

    fn postcopy_listen(&mut self) -> Result<(), SimHostError> {
        Ok(())
    }

    fn postcopy_run(&mut self) -> Result<(), SimHostError> {
        self.run = true;
        Ok(())
    }

    fn open_preempt(&mut self, _migration_id: u64) -> Result<(), SimHostError> {
        self.preempt_opened = true;
        Ok(())
    }
}

/// The simulated vCPU's state: how many writes the guest has made. The
/// destination's guest must resume with exactly this count.
fn cpu_state(guest: Option<&Workload>) -> Vec<u8> {
    guest.map_or(0, Workload::writes).to_be_bytes().to_vec()
}

/// The guest side of the simulation: the workload, whether its vCPUs run,
/// and the auto-converge throttle.
struct Guest {
    workload: Option<Workload>,
    running: bool,
    throttle: u8,
    /// Simulated time up to which the guest has run.
    ran_to: u64,
    /// Guest time consumed (excludes stops and throttling).
    guest_ns: u64,
}

impl Guest {
    fn run_until(
        &mut self,
        ram: &mut SimRam,
        log: &mut SimDirtyLog,
        now: u64,
    ) -> Result<(), HarnessError> {
        if now <= self.ran_to {
            return Ok(());
        }
        let elapsed = now - self.ran_to;
        self.ran_to = now;
        if !self.running {
            return Ok(());
        }
        let Some(w) = self.workload.as_mut() else {
            return Ok(());
        };
        let slice = elapsed * u64::from(100 - self.throttle.min(99)) / 100;
        w.advance(ram, log, self.guest_ns, self.guest_ns + slice)
            .map_err(|e| setup_err("guest", e))?;
        self.guest_ns += slice;
        Ok(())
    }
}

/// Runs one migration to its end and reports what happened.
///
/// The KVM shim's source driver (`livemig-kvm`, `migrate/source/driver.rs`,
/// `SourceDriver`) carries out the same actions against a real guest and
/// socket, one method per action: read the two side by side.
pub fn run_migration(scenario: &Scenario) -> Result<Outcome, HarnessError> {
    // ---- the world --------------------------------------------------------
    let mut src_ram =
        SimRam::new(scenario.blocks.clone()).map_err(|e| setup_err("source RAM", e))?;
    let mut dst_ram =
        SimRam::new(scenario.blocks.clone()).map_err(|e| setup_err("destination RAM", e))?;
    let mut log = SimDirtyLog::new(src_ram.blocks());
    fill(&mut src_ram, &mut log, scenario.fill_pages, 7).map_err(|e| setup_err("fill", e))?;
    let workload = scenario
        .guest
        .map(|g| {
            let w = Workload::new(&src_ram, g.working_set, g.rate_pages_per_sec, g.seed)?;
            match g.burst {
                Some(b) => w.with_burst(b),
                None => Ok(w),
            }
        })
        .transpose()
        .map_err(|e| setup_err("guest", e))?;
    let mut guest = Guest {
        workload,
        running: true,
        throttle: 0,
        ran_to: 0,
        guest_ns: 0,
    };
    let (mut fwd, mut back) = duplex(scenario.forward, scenario.back);
    let channel_count = if scenario.config.capabilities.contains(Capabilities::MULTIFD) {
        usize::from(scenario.config.parameters.multifd_channels)
    } else {
        0
    };
    let plain = LinkConfig {
        send_buffer_bytes: SimChannels::SEND_BUFFER,
        ..LinkConfig::new(
            scenario.forward.bandwidth_bytes_per_sec,
            scenario.forward.latency_ns,
        )
    };
    let mut chans = SimChannels::new(
        (0..channel_count)
            .map(|i| SimLink::new(scenario.channel_links.get(i).copied().unwrap_or(plain)))
            .collect(),
    );
    let mut pre = scenario
        .config
        .capabilities
        .contains(Capabilities::POSTCOPY_PREEMPT)
        .then(|| {
            SimLink::new(scenario.preempt_link.unwrap_or(LinkConfig::new(
                scenario.forward.bandwidth_bytes_per_sec,
                scenario.forward.latency_ns,
            )))
        });
    // The destination takes the preempt channel once the main stream has
    // announced it (a VMM accepts its connection then).
    let mut preempt_opened = false;
    let mut preempt_failed = false;
    // Bytes of the preempt channels a recovery replaced.
    let mut replaced_preempt_bytes = 0;
    let mut preempt_reopened = false;
    let channel_bytes = |chans: &SimChannels| {
        chans
            .links
            .iter()
            .map(SimLink::bytes_sent)
            .collect::<Vec<_>>()
    };
    let mut channel_bytes_after_first_pass = None;
    let mut channel_bytes_at_stop = None;

    // ---- the engines ------------------------------------------------------
    let layout = scenario
        .blocks
        .iter()
        .map(|b| {
            let id = BlockId::new(&b.id).map_err(|e| setup_err("block id", e))?;
            BlockInfo::new(id, b.bytes(), b.page_size as u32).map_err(|e| setup_err("block", e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let config = scenario
        .config
        .validate()
        .map_err(|e| setup_err("configuration", e))?;
    let shift = config.parameters.clear_bitmap_shift;
    let mut dirty_words: Vec<Vec<u64>> = layout
        .iter()
        .map(|b| vec![0; BlockTracking::dirty_words(b)])
        .collect();
    let mut clear_words: Vec<Vec<u64>> = layout
        .iter()
        .map(|b| vec![0; BlockTracking::clear_words(b, shift)])
        .collect();
    let mut tracking = layout
        .iter()
        .zip(dirty_words.iter_mut().zip(clear_words.iter_mut()))
        .map(|(b, (d, c))| BlockTracking::new(b, shift, d, c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setup_err("tracking", e))?;
    let mut src_scratch = vec![0u8; 64 * 1024];
    let mut src = SourceEngine::new(&config, &layout, &mut tracking, &mut src_scratch)
        .map_err(|e| setup_err("source engine", e))?;
    let mut dst_scratch = vec![0u8; wire::MAX_RECORD_BODY + wire::RECORD_HEADER_LEN];
    let postcopy = config.capabilities.contains(Capabilities::POSTCOPY_RAM);
    let mut received_words: Vec<Vec<u64>> = layout
        .iter()
        .map(|b| vec![0; PostcopyTracking::words(b.length / u64::from(b.page_size))])
        .collect();
    let mut requested_words = received_words.clone();
    let mut dst_tracking = layout
        .iter()
        .zip(received_words.iter_mut().zip(requested_words.iter_mut()))
        .map(|(b, (r, q))| PostcopyTracking::new(r, q, b.length / u64::from(b.page_size)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setup_err("postcopy tracking", e))?;
    let mut preempt_scratch = vec![0u8; wire::MAX_RECORD_BODY + wire::RECORD_HEADER_LEN];
    let mut dst = if postcopy {
        DestinationEngine::with_postcopy(&layout, &mut dst_scratch, &mut dst_tracking)
            .map_err(|e| setup_err("destination engine", e))?
    } else {
        DestinationEngine::new(&layout, &mut dst_scratch)
    };
    dst.take_preempt(&mut preempt_scratch);
    dst.require_sections(REQUIRED)
        .map_err(|e| setup_err("destination engine", e))?;
    // The self-check's books, 8 bytes a page on each end.
    let mut src_terms: Vec<Vec<u64>> = layout
        .iter()
        .map(|b| vec![0; DigestBooks::words(b)])
        .collect();
    let mut dst_terms = src_terms.clone();
    let mut src_books = books(&layout, &mut src_terms)?;
    let mut dst_books = books(&layout, &mut dst_terms)?;
    if scenario.verify {
        // Any seed: the simulation is deterministic.
        src.verify_with(
            DigestKey::new(0x5eed_0000 ^ scenario.fill_pages),
            &mut src_books,
        )
        .map_err(|e| setup_err("source verification", e))?;
        src.audit_at_stop(scenario.audit)
            .map_err(|e| setup_err("source audit", e))?;
        dst.verify_with(&mut dst_books)
            .map_err(|e| setup_err("destination verification", e))?;
    }
    let mut injector = Injector::new(scenario.fault);
    // The guest once it runs on the destination (postcopy), and the state
    // it started from, to replay its writes onto the source image.
    let mut dest_guest: Option<Workload> = None;
    let mut guest_at_stop: Option<Workload> = None;
    let mut dest_ran_to = 0u64;
    let mut dest_log = SimDirtyLog::new_initially_clear(dst_ram.blocks());
    let mut pc = PostcopyOutcome::default();
    // Requested pages not yet arrived, with the time of the request.
    let mut awaited: Vec<(u16, u64, u64)> = Vec::new();
    let page_size = scenario
        .blocks
        .iter()
        .map(|b| b.page_size)
        .min()
        .unwrap_or(4096) as u32;
    let mut rp = RpDecoder::new(page_size).map_err(|e| setup_err("return path", e))?;

    // The last fetched log of each block: the mask of every clear.
    let mut fetched: Vec<Vec<u64>> = (0..layout.len())
        .map(|b| vec![0; log.bitmap_words(b).unwrap_or(0)])
        .collect();

    let mut now: u64 = 0;
    let mut stop_at: Option<u64> = None;
    let mut stop_digest = None;
    let mut continue_at: Option<u64> = None;
    let mut dest_started_at: Option<u64> = None;
    let mut cpu_at_stop: Option<Vec<u8>> = None;
    let mut dest_cpu: Option<Vec<u8>> = None;
    let mut dst_eof_handled = false;
    // The destination has dropped the connection it paused on.
    let mut dst_dropped = false;
    // Postcopy recovery: when the current run of pauses began, when the
    // operator connects again, and how many connections came after the
    // first.
    let mut paused_since: Option<u64> = None;
    let mut reconnect_at: Option<u64> = None;
    let mut reconnects = 0u64;
    let mut gave_up = false;
    let mut source_changes = Vec::new();
    let mut destination_changes = Vec::new();
    let mut back_closed = false;
    let mut src_saw_close = false;
    let mut timed_out = false;
    let mut cancelled = false;
    let mut postcopy_asked = false;
    let mut bytes_at_stop = None;
    let mut throttle_changes = Vec::new();
    let audit = RefCell::new(ClearAudit {
        shift,
        pending: HashSet::new(),
        violations: Vec::new(),
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut page_buf: Vec<u8> = Vec::with_capacity(1 << 20);

    src.set_migration_id(MIGRATION_ID)
        .map_err(|e| setup_err("migration id", e))?;
    src.start(Instant::from_nanos(now))
        .map_err(|e| setup_err("start", e))?;
    src.handle_stop_cost(std::time::Duration::from_nanos(
        scenario.stop_cost_ns + scenario.forward.latency_ns,
    ));
    loop {
        if now > scenario.watchdog_ns {
            timed_out = true;
            break;
        }
        guest.run_until(&mut src_ram, &mut log, now)?;
        if !cancelled {
            let due = match scenario.cancel {
                Some(CancelWhen::State(s)) => src.status() == s,
                Some(CancelWhen::AfterBytes(n)) => fwd.bytes_sent() >= n,
                None => false,
            };
            if due {
                cancelled = true;
                // Refused once the guest runs on the destination (postcopy).
                let _ = src.cancel(Instant::from_nanos(now));
            }
        }
        if let Some(at) = scenario.start_postcopy_at_ns
            && now >= at
            && src.status() == MigrationStatus::Active
            && !postcopy_asked
        {
            postcopy_asked = true;
            src.start_postcopy(Instant::from_nanos(now))
                .map_err(|e| setup_err("start-postcopy", e))?;
        }
        if continue_at.is_some_and(|t| now >= t) {
            continue_at = None;
            src.continue_switchover(Instant::from_nanos(now))
                .map_err(|e| setup_err("continue", e))?;
        }

        // ---- carry out the source's actions ---------------------------
        let t = Instant::from_nanos(now);
        // What a VMM reads with SIOCOUTQ before polling.
        let unsent_on_channels: u64 = chans.links.iter().map(|l| l.unsent_at(now)).sum();
        src.handle_unsent(t, fwd.unsent_at(now) + unsent_on_channels);
        if channel_bytes_after_first_pass.is_none() && src.stats().iterations > 0 {
            channel_bytes_after_first_pass = Some(channel_bytes(&chans));
        }
        let mut progressed = false;
        let reader = Pages {
            ram: &src_ram,
            audit: &audit,
            guest_running: guest.running,
        };
        if let Some(action) = src.poll_action(t, &reader) {
            progressed = true;
            let sent: Result<Option<u64>, LinkError> = match action {
                SourceAction::Send(bytes) => fwd.send(now, bytes).map(Some),
                SourceAction::SendPages {
                    header,
                    block,
                    pages,
                } => {
                    gather(
                        &mut page_buf,
                        header,
                        block,
                        pages,
                        &src_ram,
                        &mut audit.borrow_mut(),
                        guest.running,
                    )?;
                    injector.batch(&mut page_buf, pages.len());
                    fwd.send(now, &page_buf).map(Some)
                }
                SourceAction::SendPreempt(bytes) => pre
                    .as_mut()
                    .ok_or_else(|| HarnessError("a preempt send without preempt".into()))?
                    .send(now, bytes)
                    .map(Some),
                SourceAction::SendPreemptPages {
                    header,
                    block,
                    pages,
                } => {
                    gather(
                        &mut page_buf,
                        header,
                        block,
                        pages,
                        &src_ram,
                        &mut audit.borrow_mut(),
                        guest.running,
                    )?;
                    pre.as_mut()
                        .ok_or_else(|| HarnessError("a preempt send without preempt".into()))?
                        .send(now, &page_buf)
                        .map(Some)
                }
                SourceAction::SendChannel { channel, bytes } => {
                    injector.channel_sent(channel, bytes);
                    chans
                        .links
                        .get_mut(usize::from(channel))
                        .ok_or_else(|| HarnessError(format!("no channel {channel}")))?
                        .send(now, bytes)
                        .map(Some)
                }
                SourceAction::SendChannelPages {
                    channel,
                    header,
                    block,
                    pages,
                } => {
                    gather(
                        &mut page_buf,
                        header,
                        block,
                        pages,
                        &src_ram,
                        &mut audit.borrow_mut(),
                        guest.running,
                    )?;
                    injector.channel_packet(&mut page_buf, header.len(), block, pages);
                    injector.channel_sent(channel, header);
                    chans
                        .links
                        .get_mut(usize::from(channel))
                        .ok_or_else(|| HarnessError(format!("no channel {channel}")))?
                        .send(now, &page_buf)
                        .map(Some)
                }
                SourceAction::SyncDirtyLog => {
                    for (b, words) in fetched.iter_mut().enumerate() {
                        log.get(b, words)
                            .map_err(|e| setup_err("dirty log get", e))?;
                        if let Some(lost) = injector.sync(b, words) {
                            let pages = scenario.blocks.get(b).map_or(0, |spec| spec.pages);
                            log.clear(b, 0, pages, &lost)
                                .map_err(|e| setup_err("injected dirty-log loss", e))?;
                        }
                        if guest.running {
                            audit.borrow_mut().synced(b, words);
                        }
                        src.handle_dirty_log(b as u16, words)
                            .map_err(|e| setup_err("dirty log", e))?;
                    }
                    src.handle_sync_done(t).map_err(|e| setup_err("sync", e))?;
                    Ok(None)
                }
                SourceAction::ClearDirtyLog { block, chunk } => {
                    let b = usize::from(block);
                    let mask = fetched
                        .get(b)
                        .and_then(|w| w.get((chunk.first / 64) as usize..))
                        .ok_or_else(|| HarnessError(format!("clear outside block {b}")))?;
                    let block_pages = scenario.blocks.get(b).map_or(0, |spec| spec.pages);
                    audit
                        .borrow_mut()
                        .cleared(b, chunk.first, chunk.count, block_pages);
                    log.clear(b, chunk.first, chunk.count, mask)
                        .map_err(|e| setup_err("engine asked for an invalid clear", e))?;
                    Ok(None)
                }
                SourceAction::SetThrottle { percent } => {
                    guest.throttle = percent;
                    throttle_changes.push(ThrottleChange {
                        at_ns: now,
                        iterations: src.stats().iterations,
                        bytes_sent: fwd.bytes_sent(),
                        percent,
                    });
                    Ok(None)
                }
                SourceAction::StopVcpus => {
                    guest.running = false;
                    stop_at = Some(now);
                    bytes_at_stop = Some(fwd.bytes_sent());
                    channel_bytes_at_stop = Some(channel_bytes(&chans));
                    stop_digest = Some(src_ram.digest());
                    cpu_at_stop = Some(cpu_state(guest.workload.as_ref()));
                    guest_at_stop = guest.workload.clone();
                    now += scenario.stop_cost_ns;
                    src.handle_vcpus_stopped(Instant::from_nanos(now))
                        .map_err(|e| setup_err("stop", e))?;
                    if src.status() == MigrationStatus::PreSwitchover {
                        continue_at = Some(now + scenario.continue_after_ns);
                    }
                    Ok(None)
                }
                SourceAction::SaveSetupDevices => {
                    let id =
                        BlockId::new(MODEL_DEVICE_ID).map_err(|e| setup_err("device id", e))?;
                    let model = scenario.source_cpu_model.to_be_bytes();
                    let mut header = [0u8; 64];
                    let n = wire::encode_device_header(&mut header, id, 0, 1, model.len())
                        .map_err(|e| setup_err("device header", e))?;
                    page_buf.clear();
                    page_buf.extend_from_slice(&header[..n]);
                    page_buf.extend_from_slice(&model);
                    match fwd.send(now, &page_buf) {
                        Ok(done) => {
                            src.handle_setup_devices_sent(
                                Instant::from_nanos(done),
                                page_buf.len() as u64,
                            )
                            .map_err(|e| setup_err("setup devices", e))?;
                            Ok(Some(done))
                        }
                        Err(e) => Err(e),
                    }
                }
                SourceAction::SaveDevices => {
                    if let (Some(packet), Some(link)) =
                        (injector.late_channel_packet(), chans.links.first_mut())
                    {
                        // Cannot fail but by a cut, which the channel's
                        // own checks report.
                        let _ = link.send(now, &packet);
                    }
                    let cpu = cpu_state(guest.workload.as_ref());
                    let id = BlockId::new(CPU_DEVICE_ID).map_err(|e| setup_err("device id", e))?;
                    let mut header = [0u8; 64];
                    let n = wire::encode_device_header(&mut header, id, 0, 1, cpu.len())
                        .map_err(|e| setup_err("device header", e))?;
                    page_buf.clear();
                    page_buf.extend_from_slice(&header[..n]);
                    page_buf.extend_from_slice(&cpu);
                    match fwd.send(now, &page_buf) {
                        Ok(done) => {
                            src.handle_devices_sent(
                                Instant::from_nanos(done),
                                page_buf.len() as u64,
                            )
                            .map_err(|e| setup_err("devices", e))?;
                            Ok(Some(done))
                        }
                        Err(e) => Err(e),
                    }
                }
                SourceAction::PackageDevices => {
                    let cpu = cpu_state(guest.workload.as_ref());
                    let id = BlockId::new(CPU_DEVICE_ID).map_err(|e| setup_err("device id", e))?;
                    let mut records = vec![0u8; 64];
                    let n = wire::encode_device_header(&mut records, id, 0, 1, cpu.len())
                        .map_err(|e| setup_err("device header", e))?;
                    records.truncate(n);
                    records.extend_from_slice(&cpu);
                    let framing = src
                        .package_devices(t, records.len())
                        .map_err(|e| setup_err("package", e))?;
                    page_buf.clear();
                    page_buf.extend_from_slice(framing.head);
                    page_buf.extend_from_slice(&records);
                    page_buf.extend_from_slice(framing.tail);
                    let sent = fwd.send(now, &page_buf);
                    if let Ok(done) = sent {
                        src.handle_package_sent(Instant::from_nanos(done))
                            .map_err(|e| setup_err("package sent", e))?;
                    }
                    sent.map(Some)
                }
                SourceAction::ResumeVcpus => {
                    guest.running = true;
                    Ok(None)
                }
                SourceAction::Paused => {
                    // What a VMM does: drop every connection of the
                    // migration and keep the guest stopped.
                    fwd.cut_now(now);
                    back.cut_now(now);
                    if let Some(link) = pre.as_mut() {
                        link.cut_now(now);
                    }
                    Ok(None)
                }
                SourceAction::Finished(_) => {
                    fwd.close(now);
                    for link in chans.links.iter_mut().chain(pre.as_mut()) {
                        link.close(now);
                    }
                    Ok(None)
                }
            };
            match sent {
                Ok(Some(done)) => now = now.max(done),
                Ok(None) => {}
                Err(e) => {
                    let why = match e {
                        LinkError::Cut { at_byte } => {
                            format!("connection cut after {at_byte} bytes")
                        }
                        LinkError::Closed => "connection closed".to_string(),
                    };
                    src.handle_io_error(
                        Instant::from_nanos(now),
                        format_args!("send failed: {why}"),
                    );
                    fwd.close(now);
                    for link in chans.links.iter_mut().chain(pre.as_mut()) {
                        link.close(now);
                    }
                }
            }
        }

        // ---- deliver what arrived ---------------------------------------
        let t = Instant::from_nanos(now);
        loop {
            let n = fwd.recv(now, &mut buf);
            if n == 0 {
                break;
            }
            progressed = true;
            let mut host = Host::new(
                &mut dst_ram,
                &mut chans,
                &layout,
                scenario.destination_cpu_model,
            );
            let _ = dst.handle_input(t, &buf[..n], &mut host);
            preempt_opened |= host.preempt_opened;
            pc.discarded_pages += host.discarded;
            let start_guest = host.run;
            if host.cpu.is_some() {
                dest_cpu = host.cpu;
            }
            if start_guest {
                // Postcopy: the guest runs on the destination from now on,
                // from the state it had when the source stopped it.
                dest_guest = guest_at_stop.clone();
                dest_ran_to = now;
                dest_started_at = Some(now);
            }
        }
        if let Some(link) = pre.as_mut().filter(|_| preempt_opened) {
            loop {
                let n = link.recv(now, &mut buf);
                if n == 0 {
                    break;
                }
                progressed = true;
                let mut host = Host::new(
                    &mut dst_ram,
                    &mut chans,
                    &layout,
                    scenario.destination_cpu_model,
                );
                let _ = dst.handle_preempt_input(t, &buf[..n], &mut host);
            }
            if !preempt_failed && (link.is_eof(now) || link.is_reset(now)) {
                preempt_failed = true;
                progressed = true;
                dst.handle_preempt_failure(t, format_args!("the preempt channel closed"));
            }
        }
        if chans.pump(now, &mut dst_ram, &layout) {
            progressed = true;
        }
        if let Some(e) = chans.take_failure() {
            progressed = true;
            dst.handle_channel_failure(t, format_args!("{e}"));
        }
        if !dst_eof_handled && (fwd.is_eof(now) || fwd.is_reset(now)) {
            dst_eof_handled = true;
            progressed = true;
            let _ = dst.handle_eof(t);
        }
        awaited.retain(|&(b, p, asked)| {
            let arrived = dst.is_received(b, p);
            if arrived {
                pc.max_request_latency_ns = pc.max_request_latency_ns.max(now - asked);
            }
            !arrived
        });
        if let Some(g) = dest_guest.as_mut()
            && now > dest_ran_to
            && dst.status() != MigrationStatus::Failed
        {
            let adv = g
                .advance_until_fault(&mut dst_ram, &mut dest_log, dest_ran_to, now, |b, p| {
                    dst.is_completed() || dst.is_received(b as u16, p)
                })
                .map_err(|e| setup_err("destination guest", e))?;
            dest_ran_to = now;
            if let Some(fault) = adv.fault {
                pc.faults += 1;
                let paused = matches!(
                    dst.status(),
                    MigrationStatus::PostcopyPaused | MigrationStatus::PostcopyRecover
                );
                if let Ok(true) = dst.handle_page_fault(t, fault.block as u16, fault.page) {
                    pc.requests += 1;
                    pc.requests_while_paused += u64::from(paused);
                    awaited.push((fault.block as u16, fault.page, now));
                }
                progressed = true;
            }
        }
        let _ = dst.handle_timeout(t);
        if dst.is_completed() && dest_started_at.is_none() {
            dest_started_at = Some(now);
        }
        loop {
            let n = dst.poll_return_path(&mut buf);
            if n == 0 {
                break;
            }
            progressed = true;
            if let Err(e) = back.send(now, &buf[..n]) {
                dst.handle_io_error(t, format_args!("return path write failed: {e}"));
                break;
            }
        }
        if dst.is_paused() && !dst_dropped {
            // The destination VMM drops the connection it paused on.
            dst_dropped = true;
            progressed = true;
            fwd.cut_now(now);
            back.cut_now(now);
            if let Some(link) = pre.as_mut() {
                link.cut_now(now);
            }
        }
        if dst.status() == MigrationStatus::Failed && !back_closed {
            // A VMM closes the connection when the incoming migration fails,
            // after writing its SHUT(1); a source that never opened the
            // return path learns it this way.
            back_closed = true;
            back.close(now);
        }
        loop {
            let n = back.recv(now, &mut buf);
            if n == 0 {
                break;
            }
            progressed = true;
            let mut input = &buf[..n];
            while !input.is_empty() {
                match rp.decode(input) {
                    Ok((used, msg)) => {
                        if let Some(msg) = msg {
                            let _ = src.handle_return_path(t, &msg);
                        }
                        input = &input[used..];
                    }
                    Err(e) => {
                        src.handle_io_error(t, format_args!("invalid return path: {e}"));
                        break;
                    }
                }
            }
        }

        if !src_saw_close && (back.is_eof(now) || back.is_reset(now)) {
            src_saw_close = true;
            progressed = true;
            src.handle_peer_closed(t, format_args!("the destination closed the connection"));
        }
        source_changes.extend(std::iter::from_fn(|| src.poll_status_change()));
        destination_changes.extend(std::iter::from_fn(|| dst.poll_status_change()));
        // ---- postcopy recovery: the operator connects again ---------------
        let src_waits = src.is_paused();
        let dst_waits = dst.is_paused() || dst.is_completed();
        if src_waits && dst_waits {
            let since = *paused_since.get_or_insert(now);
            if now >= since + scenario.recover_timeout_ns {
                let _ = src.give_up(t);
                let _ = dst.give_up(t);
                gave_up = true;
                progressed = true;
                reconnect_at = None;
            } else {
                let at = *reconnect_at.get_or_insert(now + scenario.reconnect_after_ns);
                if now >= at {
                    reconnect_at = None;
                    let (f, b) = scenario
                        .recovery_links
                        .get(reconnects as usize)
                        .copied()
                        .unwrap_or((scenario.forward.healthy(), scenario.back.healthy()));
                    (fwd, back) = duplex(f, b);
                    reconnects += 1;
                    rp = RpDecoder::new(page_size).map_err(|e| setup_err("return path", e))?;
                    dst_eof_handled = false;
                    dst_dropped = false;
                    src_saw_close = false;
                    back_closed = false;
                    dst.recover(t).map_err(|e| setup_err("recover", e))?;
                    let reopen = scenario.reopen_preempt && pre.is_some();
                    if reopen {
                        // The VMM connects a new preempt channel after the
                        // new main connection, under a fresh id.
                        replaced_preempt_bytes += pre.as_ref().map_or(0, SimLink::bytes_sent);
                        pre = Some(SimLink::new(
                            scenario
                                .preempt_link
                                .unwrap_or(LinkConfig::new(
                                    scenario.forward.bandwidth_bytes_per_sec,
                                    scenario.forward.latency_ns,
                                ))
                                .healthy(),
                        ));
                        preempt_opened = false;
                        preempt_failed = false;
                        preempt_reopened = true;
                        src.resume_with_preempt(t, MIGRATION_ID + reconnects)
                            .map_err(|e| setup_err("resume", e))?;
                    } else {
                        src.resume(t).map_err(|e| setup_err("resume", e))?;
                    }
                    progressed = true;
                }
            }
        } else if src.status() == MigrationStatus::PostcopyActive {
            paused_since = None;
        }
        let dst_done = matches!(
            dst.status(),
            MigrationStatus::Completed | MigrationStatus::Failed
        );
        if src.is_finished() && (dst_done || dst_eof_handled) && back.bytes_in_flight() == 0 {
            break;
        }
        if progressed {
            continue;
        }
        // ---- nothing to do now: jump to the next event -------------------
        let next = [
            src.poll_timeout().map(Instant::as_nanos),
            fwd.next_arrival_ns(),
            fwd.end_at_ns(),
            back.next_arrival_ns(),
            back.end_at_ns(),
            dst.poll_timeout().map(Instant::as_nanos),
            continue_at,
            reconnect_at,
        ]
        .into_iter()
        .chain(
            chans
                .links
                .iter()
                .chain(pre.as_ref())
                .flat_map(|l| [l.next_arrival_ns(), l.end_at_ns()]),
        )
        .flatten()
        .filter(|&t| t > now)
        .min();
        match next {
            Some(t) => now = t,
            None => {
                // Waiting on nothing that will ever happen: a hang.
                timed_out = true;
                break;
            }
        }
    }

    // ---- verdicts -----------------------------------------------------------
    // Before any guest runs on the destination or is replayed here.
    let source_has_copy = stop_digest.is_some() && stop_digest == Some(src_ram.digest());
    let destination_has_copy = stop_digest.is_some()
        && stop_digest == Some(dst_ram.digest())
        && dest_cpu.is_some()
        && dest_cpu == cpu_at_stop;
    // A failed postcopy stops the destination guest it had started.
    let destination_running =
        dst.is_completed() || (dest_guest.is_some() && dst.status() != MigrationStatus::Failed);
    let completed = dst.is_completed() && src.status() == MigrationStatus::Completed;
    let destination_digest = dst.is_completed().then(|| dst_ram.digest());
    let mut first_difference = None;
    let mut memory_identical = false;
    let mut guest_continued = false;
    let ran_on_destination = dest_guest.is_some();
    if completed {
        guest_continued = dest_cpu.is_some() && dest_cpu == cpu_at_stop;
        // The source's vCPUs have not run since the stop, so its memory is
        // still the stop image. The guest then runs on the destination: in
        // postcopy it has been running since the switchover; either way it
        // runs a while longer, and its writes are replayed onto the source
        // image. A destination that resumed with the right memory and CPU
        // state ends byte-identical to that replay.
        let at_stop = guest_at_stop.take().or_else(|| guest.workload.clone());
        let on_dst = match dest_guest.take() {
            Some(g) => Some(g),
            None => {
                first_difference = dst_ram.diff(&src_ram);
                memory_identical = stop_digest.is_some() && stop_digest == destination_digest;
                at_stop.clone()
            }
        };
        if let (Some(mut on_dst), Some(mut replay)) = (on_dst, at_stop) {
            let before = replay.writes();
            let from = dest_ran_to;
            on_dst
                .advance(
                    &mut dst_ram,
                    &mut dest_log,
                    from,
                    from + scenario.run_after_ns,
                )
                .map_err(|e| setup_err("destination guest", e))?;
            let writes = on_dst.writes() - before;
            replay
                .replay_writes(&mut src_ram, &mut log, writes)
                .map_err(|e| setup_err("source replay", e))?;
            let ran = on_dst.rate_pages_per_sec() == 0 || writes > 0;
            let difference = dst_ram.diff(&src_ram);
            if ran_on_destination {
                pc.guest_writes = writes;
                memory_identical = difference.is_none();
                first_difference = difference;
            } else {
                guest_continued &= difference.is_none();
            }
            guest_continued &= ran;
        } else if ran_on_destination {
            first_difference = dst_ram.diff(&src_ram);
            memory_identical = first_difference.is_none();
        }
    }
    let last_preempt_bytes = pre.as_ref().map_or(0, SimLink::bytes_sent);
    pc.preempt_bytes = replaced_preempt_bytes + last_preempt_bytes;
    if preempt_reopened {
        pc.reopened_preempt_bytes = last_preempt_bytes;
    }
    let source_running = guest.running;
    let mut source_continued = false;
    if !completed && source_running {
        let before = guest.workload.as_ref().map_or(0, Workload::writes);
        guest.run_until(&mut src_ram, &mut log, now + scenario.run_after_ns)?;
        let after = guest.workload.as_ref().map_or(0, Workload::writes);
        source_continued = guest.throttle == 0
            && (after > before
                || guest
                    .workload
                    .as_ref()
                    .is_none_or(|w| w.rate_pages_per_sec() == 0));
    }

    Ok(Outcome {
        end_reason: src.end_reason(),
        source: src.stats().clone(),
        destination: dst.stats().clone(),
        stop_digest,
        destination_digest,
        first_difference,
        source_running,
        destination_running,
        source_has_copy,
        destination_has_copy,
        source_continued,
        guest_continued,
        downtime_ns: stop_at.zip(dest_started_at).map(|(s, d)| d - s),
        end_ns: now,
        bytes_sent: fwd.bytes_sent(),
        return_path_bytes: back.bytes_sent(),
        dirty_log_clears: log.clear_calls(),
        cleared_pages: log.cleared_pages(),
        stop_ns: stop_at,
        bytes_at_stop,
        throttle_changes,
        final_throttle: guest.throttle,
        channel_bytes: channel_bytes(&chans),
        channel_bytes_after_first_pass,
        channel_bytes_at_stop,
        clear_violations: audit.into_inner().violations,
        postcopy: ran_on_destination.then_some(pc),
        memory_identical,
        timed_out,
        fault_injected: injector.fired,
        injected_pages: injector.pages,
        source_changes,
        destination_changes,
        reconnects,
        gave_up,
    })
}

/// One block's digest books over each of `terms`.
fn books<'a>(
    layout: &[BlockInfo<'_>],
    terms: &'a mut [Vec<u64>],
) -> Result<Vec<DigestBooks<'a>>, HarnessError> {
    layout
        .iter()
        .zip(terms.iter_mut())
        .map(|(b, t)| DigestBooks::new(b, t).map_err(|e| setup_err("digest books", e)))
        .collect()
}
