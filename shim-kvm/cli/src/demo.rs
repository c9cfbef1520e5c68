//! The `livemig` tool's commands: `send`, `receive` and the self-contained
//! `demo`, plus the simulated fallback `demo` uses when there is no KVM.
//!
//! The workload is always the demo guest (see `guest/README.md`): it stamps
//! a working set of `dirty_mib` MiB generation after generation and checks
//! each stamp of the previous generation, so a page lost or torn by the
//! migration is reported by the guest itself after the switchover.
//!
//! `demo` runs the destination as a child process (`livemig receive` on
//! `tcp:127.0.0.1:0`) so that the two ends share nothing but the socket, as
//! on two machines; both read the same `CLOCK_MONOTONIC`, which is how the
//! downtime from the source's vCPU stop to the destination's vCPU start is
//! measured across the two processes.
//!
//! `--mode postcopy` switches to postcopy after the first precopy pass: the
//! guest then runs on the destination while its memory is still arriving.
//! Since the destination guest runs during the migration, "destination
//! memory equals the source's at the stop" no longer holds at the end, so
//! the check becomes: the destination logs its guest's own writes with
//! KVM's dirty log from before the stream arrives ([`crate::guest_writes`]),
//! pauses its guest after the watch and digests every page the guest did
//! not write; `demo`'s source, whose vCPUs stay stopped after the
//! switchover, digests the same pages of its stop image. The pages the
//! guest wrote are checked by its stamps. `send` alone cannot make that
//! comparison (it does not know the destination's written pages): it
//! prints the digest of its whole stop image.
//!
//! `send` cannot see when the destination started the guest; after a
//! postcopy its downtime runs from the vCPU stop to the destination's PONG
//! to the ping that follows the switchover package (the destination runs
//! the guest before it answers; the source sends nothing until the PONG,
//! so it is not delayed behind pages), and its `downtime-span` says so.
//! `demo`, which sees both ends on one clock, reports the true gap.
//!
//! Either way the migration is `verified` when the digests are equal and
//! the guest continued: its own stamp checks reported no mismatch, and it
//! stamped pages past where it stood at the stop. The source reads the
//! guest's stamp counters (one per vCPU, [`guest::stamped_addr`]), timer
//! ticks and serial output from its stopped guest; the destination reads
//! them at the end of its watch, with the vCPUs paused, and checks every
//! page of the working set against the counters ([`guest::check_stamps`]);
//! the summary's `guest` object says how each went on. No whole generation is needed: a working set
//! too large to be rewritten within the watch still shows the guest going
//! on.

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use livemig_core::capabilities::Capabilities;
use livemig_core::config::MigrationConfig;
use livemig_core::digest::Verification;
use livemig_core::stats::MigrationStats;
use livemig_core::status::MigrationStatus;
use livemig_sim::{BlockSpec, GuestSpec, Scenario, WorkingSet, run_migration};
use serde_json::{Value, json};

use crate::breakdown;
use crate::events::{self, EventLog};
use crate::guest::{self, GuestParams};
use crate::interrupt::{self, Cancel, Decision};
use livemig_kvm::clock;
use livemig_kvm::dirty_log::DirtyLogMode;
use livemig_kvm::memory::{PAGE_SIZE, VmMemoryDirtyLog};
use livemig_kvm::migrate::destination;
use livemig_kvm::transport::{Connection, Listener, MigrationUri, TransportError};
use livemig_kvm::vmm::{DeviceSection, Vcpus};
use livemig_kvm::{
    CancelRefused, DestinationVm, MigrateError, ReceiveOptions, SourceOptions, SourceReport,
    SourceVm,
};

use crate::continuity::{GuestContinuity, serial_continued, serial_sequence, vcpu_continued};
use crate::guest_writes::{WriteLog, WritesError, digest_outside};
use crate::report::{Progress, Summary};
use crate::timeline::Chart;
use crate::vmm::ram::{LOW_RAM_MAX, RamLayout};
use crate::vmm::vcpus::VcpuError;
use crate::vmm::{BootError, DemoVmm};
use crate::watch::{GuestAfter, GuestAtStop, WatchError};

const MIB: u64 = 1 << 20;
/// How often the progress line is redrawn (and a Ctrl-C passed on) while
/// the migration thread runs.
const PROGRESS_EVERY: Duration = Duration::from_millis(50);

/// Where the working set starts: 2 MiB, clear of the image, the page
/// tables and the parameter block (see `guest/README.md`).
pub const WORKING_SET_START: u64 = 2 * MIB;

/// Why a command could not do its job. Each is one line for the operator.
#[derive(Debug)]
pub enum DemoError {
    /// Connecting, listening or accepting failed.
    Transport(TransportError),
    /// The demo VMM could not be built or its guest booted.
    Boot(BootError),
    /// A vCPU could not be paused, resumed or asked.
    Vcpu(VcpuError),
    /// The guest booted but did not reach its workload.
    NotBooted(String),
    /// The guest could not be read at the stop or after the watch.
    Watch(WatchError),
    /// The destination guest's writes could not be logged or the rest
    /// digested.
    Writes(WritesError),
    /// The guest parameters do not fit the RAM.
    Guest(String),
    /// The migration could not be set up.
    Migrate(MigrateError),
    /// The migration ran and did not complete.
    Failed(String),
    /// The destination process misbehaved (demo only).
    Child(String),
    /// A mode other than precopy or postcopy was asked for.
    UnsupportedMode(String),
    /// The SIGINT / SIGTERM handlers could not be installed.
    Signals(String),
}

impl fmt::Display for DemoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DemoError::Transport(e) => e.fmt(f),
            DemoError::Boot(e) => write!(f, "{e}"),
            DemoError::Vcpu(e) => write!(f, "{e}"),
            DemoError::NotBooted(e) => write!(f, "the demo guest {e}"),
            DemoError::Watch(e) => write!(f, "{e}"),
            DemoError::Writes(e) => write!(f, "{e}"),
            DemoError::Guest(e) => write!(f, "demo guest: {e}"),
            DemoError::Migrate(e) => e.fmt(f),
            DemoError::Failed(e) => write!(f, "migration failed: {e}"),
            DemoError::Child(e) => write!(f, "destination process: {e}"),
            DemoError::UnsupportedMode(m) => write!(
                f,
                "migration mode '{m}' is not supported (precopy or postcopy)"
            ),
            DemoError::Signals(e) => write!(f, "installing the Ctrl-C handler: {e}"),
        }
    }
}

impl std::error::Error for DemoError {}

impl From<TransportError> for DemoError {
    fn from(e: TransportError) -> Self {
        DemoError::Transport(e)
    }
}

impl From<MigrateError> for DemoError {
    fn from(e: MigrateError) -> Self {
        DemoError::Migrate(e)
    }
}

/// Checks the `--mode` flag: precopy or postcopy.
pub fn check_mode(mode: &str) -> Result<(), DemoError> {
    match mode {
        "precopy" | "postcopy" => Ok(()),
        other => Err(DemoError::UnsupportedMode(other.to_string())),
    }
}

/// Background bandwidth of the postcopy phase of `demo` and `send
/// --mode postcopy` without `postcopy-preempt`, unless
/// `max-postcopy-bandwidth` is given: 256 MiB/s. Requested pages then
/// travel on the same stream as the background pass; an unlimited pass
/// fills the socket and a request waits behind milliseconds of queued
/// pages, a limited one leaves room and requests take a round trip. With
/// `postcopy-preempt` they have a channel of their own and the pass runs
/// unlimited.
pub const DEMO_POSTCOPY_BANDWIDTH: u64 = 256 * MIB;

/// Makes `config` a postcopy migration: the postcopy-ram capability and the
/// switch after the first precopy pass. Parameters the operator did not set
/// (`given(name)` is false) get demo defaults: `downtime-limit` becomes 0
/// (the engine completes in precopy whenever the rest fits the downtime
/// limit, and `--mode postcopy` asks for postcopy whenever anything is left
/// to send), and `max-postcopy-bandwidth` [`DEMO_POSTCOPY_BANDWIDTH`], or
/// 0 (unlimited) with `postcopy-preempt`.
pub fn postcopy_config(config: &mut MigrationConfig, given: impl Fn(&str) -> bool) {
    config.capabilities.insert(Capabilities::POSTCOPY_RAM);
    config.limits.postcopy_after_iterations = Some(1);
    if !given("downtime-limit") {
        config.parameters.downtime_limit_ms = 0;
    }
    if !given("max-postcopy-bandwidth") {
        config.parameters.max_postcopy_bandwidth =
            if config.capabilities.contains(Capabilities::POSTCOPY_PREEMPT) {
                0
            } else {
                DEMO_POSTCOPY_BANDWIDTH
            };
    }
}

/// The demo guest's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestShape {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Working set the guest keeps rewriting, in MiB (0 = idle guest).
    pub dirty_mib: u64,
    /// The dirty-log mode to ask KVM for (manual protect falls back to
    /// get-and-clear by itself where KVM lacks it).
    pub dirty_log: DirtyLogMode,
    /// vCPUs (1 ..= [`guest::MAX_VCPUS`]), sharing the working set.
    pub vcpus: u32,
    /// Before boot, fill the RAM past the working set (from
    /// [`FILL_START`] on, or the working set's end if that is higher) with
    /// non-zero data, so that a pass carries whole pages rather than zero
    /// entries (the multifd bench).
    pub fill: bool,
}

/// Where [`GuestShape::fill`] starts: above the image, the guest's fixed
/// addresses and its default working-set start.
pub const FILL_START: u64 = 4 * MIB;

impl GuestShape {
    /// The parameter block of a guest of this shape booted by the demo VMM.
    pub fn params(&self) -> Result<GuestParams, DemoError> {
        let ws_pages = self.dirty_mib * MIB / PAGE_SIZE as u64;
        let ws_pages = u32::try_from(ws_pages).map_err(|_| {
            DemoError::Guest(format!("{} MiB working set is too large", self.dirty_mib))
        })?;
        // The working set stays in the RAM below the 32-bit hole (the
        // guest maps only 0 .. 4 GiB), as the demo VMM and QEMU lay it out.
        let low = self.mem_mib.saturating_mul(MIB).min(LOW_RAM_MAX);
        if WORKING_SET_START + self.dirty_mib * MIB > low {
            return Err(DemoError::Guest(format!(
                "a {} MiB working set at 2 MiB does not fit in the {} MiB of RAM below the 32-bit hole",
                self.dirty_mib,
                low / MIB
            )));
        }
        Ok(GuestParams {
            ws_start: WORKING_SET_START,
            ws_pages,
            idle_wakes: 1,
            vcpus: self.vcpus,
            devices: true,
            ..GuestParams::default()
        })
    }
}

/// A demo VMM of `mem_mib` MiB with `vcpus` parked vCPUs and nothing
/// loaded: a destination.
pub fn empty_vmm(mem_mib: u64, vcpus: u32) -> Result<DemoVmm, DemoError> {
    DemoVmm::new(mem_mib.saturating_mul(MIB), vcpus).map_err(DemoError::Boot)
}

/// Writes non-zero, incompressible data into the guest RAM from `from` to
/// its end (no page of it all zero).
fn fill_ram(vmm: &DemoVmm, from: u64) -> Result<(), DemoError> {
    let ram = vmm.guest_memory();
    let chunk = crate::bench::guest_like_data(4 * MIB as usize);
    for region in ram.regions() {
        let end = region.guest_phys() + region.len();
        let mut at = from.max(region.guest_phys());
        while at < end {
            let len = (end - at).min(chunk.len() as u64) as usize;
            ram.write(at, &chunk[..len])
                .map_err(|e| DemoError::Guest(format!("filling guest RAM: {e}")))?;
            at += len as u64;
        }
    }
    Ok(())
}

/// Boots the demo guest on every vCPU and lets it run for `warmup` (and at
/// least until every vCPU reached ring 3 and, with a working set, each
/// vCPU that owns pages finished a generation).
pub fn boot_guest(shape: GuestShape, warmup: Duration) -> Result<DemoVmm, DemoError> {
    let params = shape.params()?;
    let vmm = empty_vmm(shape.mem_mib, shape.vcpus)?;
    if shape.fill {
        fill_ram(
            &vmm,
            FILL_START.max(WORKING_SET_START + shape.dirty_mib * MIB),
        )?;
    }
    vmm.boot(&params).map_err(DemoError::Boot)?;
    vmm.vcpus().resume().map_err(DemoError::Vcpu)?;
    let start = clock::monotonic_ns();
    let deadline = start + 30_000_000_000;
    loop {
        let mut ready = true;
        for v in 0..shape.vcpus {
            let r = vmm.vcpus().report(v as usize).map_err(DemoError::Vcpu)?;
            let owns = guest::owned_pages(params.ws_pages, shape.vcpus, v) > 0;
            ready &= r.booted.is_some() && (!owns || r.generation >= 1);
        }
        let elapsed = clock::monotonic_ns() - start;
        if ready && elapsed >= warmup.as_nanos() as u64 {
            break;
        }
        if let Some(err) = vmm.vcpus().stopped() {
            return Err(DemoError::NotBooted(format!(
                "stopped while booting: {err}"
            )));
        }
        if clock::monotonic_ns() > deadline {
            return Err(DemoError::NotBooted("did not boot within 30 s".into()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(vmm)
}

/// The name of a dirty-log mode in the statistics and on the command line.
pub fn mode_name(mode: DirtyLogMode) -> &'static str {
    match mode {
        DirtyLogMode::ManualProtect => "manual-protect",
        DirtyLogMode::Legacy => "get-and-clear",
    }
}

/// The dirty-log mode called `name` by [`mode_name`].
pub fn mode_from_name(name: &str) -> Option<DirtyLogMode> {
    [DirtyLogMode::ManualProtect, DirtyLogMode::Legacy]
        .into_iter()
        .find(|&m| mode_name(m) == name)
}

/// The default configuration of the tool: QEMU's defaults plus the return
/// path, so the source learns that the destination loaded everything.
pub fn base_config() -> MigrationConfig {
    let mut c = MigrationConfig::default();
    c.capabilities.insert(Capabilities::RETURN_PATH);
    c
}

/// What `send` did.
#[derive(Debug)]
pub struct SendOutcome {
    /// The engine's view and the stop instant.
    pub report: SourceReport,
    /// Digest of the source's memory at stop (the vCPUs stay paused after
    /// a completed migration, postcopy included, so it is taken
    /// afterwards): the destination's `digest` must equal it.
    pub digest: Option<u64>,
    /// The guest at the stop (each vCPU's stamp counter, the ticks, its
    /// serial output), read from the stopped source after a completed
    /// migration.
    pub at_stop: Option<GuestAtStop>,
    /// After a failed migration: the guest's generations (summed over its
    /// vCPUs) when it failed and half a second later (it must keep running
    /// on the source).
    pub generation_after_failure: Option<(u64, u64)>,
    /// Progress exits in that half second (an idle guest has no
    /// generations).
    pub progress_after_failure: u64,
    /// After a failed migration: whether the source guest is intact (its
    /// own stamp checks found no mismatch and no vCPU stopped).
    pub intact_after_failure: bool,
}

/// The main connection to a destination and the extra connections its
/// configuration asks for (the preempt channel, then the multifd
/// channels: [`livemig_kvm::extra_connections`]), made after it to the
/// same address (the destination accepts them on the same listener).
pub struct Connections {
    /// The main stream and return path.
    pub main: Connection,
    /// The preempt channel and the multifd channels (none without either).
    pub channels: Vec<Connection>,
}

impl Connections {
    /// Connects to `to`, then the channels `config` asks for.
    pub fn connect(to: &MigrationUri, config: &MigrationConfig) -> Result<Self, DemoError> {
        let main = Connection::connect(to)?;
        let count = livemig_kvm::extra_connections(config);
        let channels = (0..count)
            .map(|_| Connection::connect(to))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Connections { main, channels })
    }
}

/// The demo VMM's guest as livemig's source takes it: its VM, RAM (with
/// vm-memory's bitmap of the VMM's own writes), vCPUs and COM1 section.
pub fn source_vm(vmm: &DemoVmm) -> SourceVm {
    let vcpus: Arc<dyn Vcpus> = Arc::clone(vmm.vcpus()) as Arc<dyn Vcpus>;
    let serial: Box<dyn DeviceSection> = Box::new(vmm.serial().section());
    SourceVm {
        vm: Arc::clone(vmm.vm()),
        memory: vmm.guest_memory().clone(),
        vcpus,
        devices: vec![serial],
        device_dirty: Some(Box::new(VmMemoryDirtyLog::new(vmm.memory()))),
        running: true,
    }
}

/// Migrates the running guest in `vmm` over `conn` on the migration
/// thread, drawing its progress from here, telling its events and passing
/// a `cancel` (Ctrl-C) on to it. With `cut_after`, the connection is shut
/// down that long after the postcopy switchover (the migration pauses and
/// recovers over a new one).
#[allow(clippy::too_many_arguments)]
pub fn send_guest(
    vmm: &DemoVmm,
    conns: Connections,
    config: &MigrationConfig,
    options: SourceOptions,
    cancel: &Cancel,
    progress: &mut Progress,
    events: EventLog,
    cut_after: Option<Duration>,
) -> Result<SendOutcome, DemoError> {
    let mut cut = cut_after
        .map(|after| conns.main.try_clone().map(|c| Cut::new(c, after)))
        .transpose()?;
    let handle = livemig_kvm::migrate_with_channels(
        source_vm(vmm),
        conns.main,
        conns.channels,
        config,
        options,
    )?;
    let mut refusal = Refusal::default();
    while !handle.wait_timeout(PROGRESS_EVERY) {
        if cancel.is_cancelled() {
            handle.cancel();
        }
        let stats = handle.stats();
        refusal.say(handle.cancel_refused(), &stats);
        while let Some(e) = handle.poll_event() {
            events.say(&e);
        }
        if let Some(c) = cut.as_mut() {
            c.watch(stats.status);
        }
        progress.update(&stats);
    }
    while let Some(e) = handle.poll_event() {
        events.say(&e);
    }
    if cut.is_some_and(|c| !c.done) {
        eprintln!("livemig: demo: the migration ended before --cut-after-ms: nothing was cut");
    }
    refusal.say(handle.cancel_refused(), &handle.stats());
    let report = handle.join()?;
    progress.update(&report.stats);
    progress.finish();
    let mut out = SendOutcome {
        digest: None,
        at_stop: None,
        generation_after_failure: None,
        progress_after_failure: 0,
        intact_after_failure: false,
        report,
    };
    if out.report.stats.status == MigrationStatus::Completed {
        // The vCPUs stay paused after a completed migration, postcopy
        // included: this memory is the stop image, and cannot change.
        out.at_stop = Some(GuestAtStop::read(vmm).map_err(DemoError::Watch)?);
        out.digest = Some(vmm.guest_memory().digest());
    } else {
        watch_source_guest(vmm, &mut out)?;
    }
    Ok(out)
}

/// Tells the operator, once, that the migration refused their Ctrl-C.
#[derive(Default)]
struct Refusal {
    said: bool,
}

impl Refusal {
    /// `stats` says where the migration stands: a paused postcopy is told
    /// why the process stays (its pages would be lost with it).
    fn say(&mut self, refused: Option<CancelRefused>, stats: &MigrationStats) {
        let Some(r) = refused.filter(|_| !self.said) else {
            return;
        };
        self.said = true;
        if is_paused(stats.status) {
            eprintln!(
                "livemig: {r}. The postcopy migration is paused: the guest's pages are split \
                 between the two hosts, so this process keeps its part and waits for the \
                 recovery until its deadline (--recover-timeout-s); ending it by force \
                 (SIGKILL) loses the guest"
            );
        } else {
            eprintln!("livemig: {r}");
        }
    }
}

/// Whether `status` is a paused postcopy or its recovery handshake.
fn is_paused(status: MigrationStatus) -> bool {
    matches!(
        status,
        MigrationStatus::PostcopyPaused
            | MigrationStatus::PostcopyRecoverSetup
            | MigrationStatus::PostcopyRecover
    )
}

/// `demo --cut-after-ms`: shuts the main connection down a while after the
/// postcopy switchover, once, as a cut link would end it.
struct Cut {
    conn: Connection,
    after: Duration,
    switched: Option<std::time::Instant>,
    done: bool,
}

impl Cut {
    fn new(conn: Connection, after: Duration) -> Self {
        Cut {
            conn,
            after,
            switched: None,
            done: false,
        }
    }

    /// Called with the migration's status as it goes.
    fn watch(&mut self, status: MigrationStatus) {
        if self.done {
            return;
        }
        if status == MigrationStatus::PostcopyActive {
            self.switched.get_or_insert_with(std::time::Instant::now);
        }
        if self.switched.is_some_and(|at| at.elapsed() >= self.after) {
            self.done = true;
            eprintln!(
                "livemig: demo: cutting the connection {} ms after the switchover (--cut-after-ms)",
                self.after.as_millis()
            );
            // Gone already is as good as cut.
            let _ = self.conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The guest's generations and progress exits, summed over its vCPUs,
/// and whether it is intact (no mismatch reported, no vCPU stopped).
fn source_progress(vmm: &DemoVmm) -> Result<(u64, u64, bool), DemoError> {
    let (mut generation, mut exits, mut intact) = (0, 0, vmm.vcpus().stopped().is_none());
    for v in 0..vmm.vcpu_count() as usize {
        let r = vmm.vcpus().report(v).map_err(DemoError::Vcpu)?;
        generation += r.generation;
        exits += r.progress_exits;
        intact &= r.mismatches.is_empty();
    }
    Ok((generation, exits, intact))
}

/// Watches the source guest for half a second after a failed migration:
/// whether it runs on (or, after an ambiguous end, stays paused) and is
/// intact.
fn watch_source_guest(vmm: &DemoVmm, out: &mut SendOutcome) -> Result<(), DemoError> {
    let (before, exits_before, _) = source_progress(vmm)?;
    std::thread::sleep(Duration::from_millis(500));
    let (after, exits_after, intact) = source_progress(vmm)?;
    out.generation_after_failure = Some((before, after));
    out.progress_after_failure = exits_after - exits_before;
    out.intact_after_failure = intact;
    Ok(())
}

/// Asked, after an ambiguous end, with the summary so far: tells the
/// operator how to decide and waits for the [`Decision`].
pub type HoldFn<'a> = &'a mut dyn FnMut(&Summary) -> Result<Decision, DemoError>;

/// What the summary says about a hold (`hold-decision`).
fn decision_name(d: Decision) -> &'static str {
    match d {
        Decision::Run => "run-here",
        Decision::Discard(_) => "discarded",
        Decision::TimedOut => "discarded-after-timeout",
    }
}

fn send_summary(out: &SendOutcome) -> Summary {
    let r = &out.report;
    let mut extra = serde_json::Map::new();
    if let Some(a) = &out.at_stop {
        extra.insert("guest-stamped-at-stop".into(), json!(a.stamped));
        extra.insert("guest-ticks-at-stop".into(), json!(a.ticks));
        extra.insert(
            "guest-serial-lines-at-stop".into(),
            json!(serial_sequence(&a.serial).0),
        );
    }
    if let Some((before, after)) = out.generation_after_failure {
        extra.insert("guest-generation-before".into(), json!(before));
        extra.insert("guest-generation-after".into(), json!(after));
        extra.insert(
            "guest-progress-after".into(),
            json!(out.progress_after_failure),
        );
        extra.insert(
            "guest-intact-on-source".into(),
            json!(out.intact_after_failure),
        );
        extra.insert(
            "guest-continued-on-source".into(),
            json!((after > before || out.progress_after_failure > 0) && out.intact_after_failure),
        );
    }
    let completed = r.stats.status == MigrationStatus::Completed;
    // Postcopy: the destination starts the guest when it reads the
    // package, which the source cannot see; what it sees is the PONG to
    // the ping that follows the package, answered once the guest runs.
    let (downtime_ms, source_downtime_ms) = match (completed, r.postcopy) {
        (false, _) => (None, None),
        (true, false) => (r.source_downtime_ms(), r.source_downtime_ms()),
        (true, true) => (r.postcopy_downtime_ms(), None),
    };
    if r.postcopy {
        extra.insert("postcopy".into(), json!(true));
        if let (Some(stop), Some(sent)) = (r.stop.requested_ns, r.package_sent_ns) {
            extra.insert(
                "postcopy-package-sent".into(),
                json!((sent.saturating_sub(stop) as f64 / 1e3).round() / 1e3),
            );
        }
        if downtime_ms.is_some() {
            extra.insert("downtime-span".into(), json!(POSTCOPY_DOWNTIME_SPAN));
        }
    }
    if r.stop.requested_ns.is_some() {
        extra.insert("downtime-breakdown".into(), breakdown::source(&r.stop));
    }
    let desc = r.stats.error_desc.as_str();
    let error = desc.starts_with("the destination failed").then(|| {
        format!(
            "{desc} (its own error line names the cause, for example a RAM size or version mismatch)"
        )
    });
    Summary {
        stats: r.stats.clone(),
        downtime_ms,
        source_downtime_ms,
        vcpu_stopped_ns: r.stop.requested_ns,
        vcpu_started_ns: None,
        // The destination compared the digest and told so.
        verified: completed && r.stats.verification.is_verified(),
        dirty_log_clears: r.dirty_log_clears,
        dirty_log_mode: mode_name(r.dirty_log_mode).to_string(),
        backend: "kvm".into(),
        digest: out.digest,
        error,
        guest: None,
        extra,
        timeline: Some(Chart {
            timeline: r.timeline.clone(),
            stop: r.stop.clone(),
        }),
    }
}

/// What `send`'s downtime spans after a postcopy (the `downtime-span` of
/// its summary).
pub const POSTCOPY_DOWNTIME_SPAN: &str = "source vCPU stop to the destination's answer to the ping after the switchover package (it runs the guest by then)";

/// `livemig send`: connects to `to`, boots the demo guest, lets it run for
/// `warmup`, migrates it, and returns the summary (with the source's
/// digest, to compare with the destination's). A failed or cancelled
/// migration is `Ok` with that status: the caller prints the summary and
/// fails. After an ambiguous end the paused guest is held: `hold` decides
/// whether it resumes here (watched for half a second again) or is
/// discarded with the process.
#[allow(clippy::too_many_arguments)]
pub fn run_send(
    to: &MigrationUri,
    shape: GuestShape,
    config: &MigrationConfig,
    options: SourceOptions,
    warmup: Duration,
    cancel: &Cancel,
    progress: &mut Progress,
    events: EventLog,
    hold: HoldFn<'_>,
) -> Result<Summary, DemoError> {
    // The guest runs before the migration starts, as a VMM's does: booted
    // and warmed up before the connection, so that its boot is not silence
    // on the wire (a destination's idle timeout counted it, and under load
    // gave up before the first byte).
    let vmm = boot_guest(shape, warmup)?;
    let conns = Connections::connect(to, config)?;
    let options = SourceOptions {
        dirty_log: shape.dirty_log,
        ..options
    };
    let mut out = send_guest(&vmm, conns, config, options, cancel, progress, events, None)?;
    let mut summary = send_summary(&out);
    summary.extra.insert("guest-ram".into(), ram_regions(&vmm));
    if summary.stats.ambiguous_end.is_none() {
        return Ok(summary);
    }
    let decision = hold(&summary)?;
    if decision == Decision::Run {
        vmm.vcpus().resume().map_err(DemoError::Vcpu)?;
        watch_source_guest(&vmm, &mut out)?;
    }
    let mut summary = send_summary(&out);
    summary.extra.insert("guest-ram".into(), ram_regions(&vmm));
    summary
        .extra
        .insert("hold-decision".into(), json!(decision_name(decision)));
    Ok(summary)
}

/// The source's RAM as `guest-ram` in a summary: `[start, bytes]` per
/// region (and memslot) in guest-physical order, so a reader sees the
/// split around the 32-bit hole.
fn ram_regions(vmm: &DemoVmm) -> Value {
    let regions = vmm.guest_memory().regions().iter();
    json!(
        regions
            .map(|r| [r.guest_phys(), r.len()])
            .collect::<Vec<_>>()
    )
}

/// Milliseconds with three decimals.
fn ms(d: Duration) -> Value {
    json!((d.as_secs_f64() * 1e6).round() / 1000.0)
}

/// The postcopy figures of a destination: fault latency (request sent →
/// page installed), fault counters and, when `blocktime` gives the vCPU
/// threads' ids, the
/// time each vCPU spent blocked on missing pages (QEMU's
/// `postcopy-blocktime` and `postcopy-vcpu-blocktime`, in ms).
fn postcopy_fields(
    extra: &mut serde_json::Map<String, Value>,
    p: &destination::PostcopyReport,
    blocktime: Option<&[i32]>,
) {
    let us = |v: Option<f64>| v.map(|x| (x * 10.0).round() / 10.0);
    extra.insert("postcopy".into(), json!(true));
    extra.insert(
        "postcopy-fault-latency".into(),
        json!({
            "median-us": us(p.latency_median_us),
            "p99-us": us(p.latency_p99_us),
            "samples": p.latency_samples,
            // Each request's own, so that a bench pools its rounds.
            "samples-ns": p.faults.latencies_ns,
        }),
    );
    let f = &p.faults;
    extra.insert(
        "postcopy-faults".into(),
        json!({
            "read": f.faults_read,
            "forwarded": f.faults_forwarded,
            "duplicate": f.faults_duplicate,
            "stale": f.faults_stale,
            "local-zero-fills": p.local_zero_fills,
            "pages-copied": f.pages_copied,
            "pages-zeroed": f.pages_zeroed,
            "already-present": f.already_present,
            "pages-discarded": f.pages_discarded,
        }),
    );
    if let Some(tids) = blocktime {
        // Each vCPU thread's wait, matched by thread id; a vCPU that never
        // faulted waited 0 ms.
        let per_vcpu: Vec<Duration> = tids
            .iter()
            .map(|tid| {
                f.blocktime
                    .iter()
                    .filter(|b| b.0 == *tid)
                    .map(|b| b.1)
                    .sum()
            })
            .collect();
        extra.insert("postcopy-blocktime".into(), ms(per_vcpu.iter().sum()));
        extra.insert(
            "postcopy-vcpu-blocktime".into(),
            Value::Array(per_vcpu.into_iter().map(ms).collect()),
        );
    }
}

/// What the destination did, as `receive` reports it. `prealloc` is the
/// milliseconds the VMM's start-up spent preallocating its RAM, when it
/// did; `after` is the guest at the end of the watch, when it ran here.
fn receive_summary(
    report: &destination::DestinationReport,
    prealloc: Option<f64>,
    after: Option<&GuestAfter>,
    started_ns: Option<u64>,
    blocktime: Option<&[i32]>,
) -> Summary {
    let mut extra = serde_json::Map::new();
    if let Some(p) = &report.postcopy {
        postcopy_fields(&mut extra, p, blocktime);
    }
    if let Some(b) = breakdown::destination(report) {
        extra.insert("downtime-breakdown".into(), b);
    }
    if let Some(t) = report.loaded_ns {
        extra.insert("loaded-ns".into(), json!(t));
        // Only when asked for (`--digest`): no digest, no time for it.
        if report.digest.is_some() {
            extra.insert(
                "digest-time".into(),
                json!((report.digest_ms * 1000.0).round() / 1000.0),
            );
        }
    }
    extra.insert("guest-started".into(), json!(report.started));
    extra.insert("populated-pages".into(), json!(report.populated_pages));
    extra.insert("mem-prealloc".into(), json!(report.preallocated));
    // Where its time went: the VMM's start-up, before the listening
    // address was announced (no source could have been waiting), or
    // receive's own, with the source already connected.
    let prealloc_ms = prealloc.map_or(report.prealloc_ms, |ms| ms + report.prealloc_ms);
    if report.preallocated {
        extra.insert(
            "mem-prealloc-ms".into(),
            json!((prealloc_ms * 1000.0).round() / 1000.0),
        );
        extra.insert(
            "mem-prealloc-when".into(),
            json!(if prealloc.is_some() {
                "start-up"
            } else {
                "migration"
            }),
        );
    }
    if let Some(errno) = report.populate_refused {
        extra.insert("populate-refused-errno".into(), json!(errno));
    }
    extra.insert(
        "stop-priority-threads".into(),
        json!(report.priority_raised),
    );
    if let Some(errno) = report.priority_refused {
        extra.insert("stop-priority-refused-errno".into(), json!(errno));
    }
    if let Some(a) = after {
        let sum = |f: fn(&crate::vmm::vcpus::VcpuReport) -> u64| a.vcpus.iter().map(f).sum::<u64>();
        extra.insert("guest-generation".into(), json!(sum(|r| r.generation)));
        extra.insert(
            "guest-progress-exits".into(),
            json!(sum(|r| r.progress_exits)),
        );
        let mismatches: Vec<u32> = a
            .vcpus
            .iter()
            .flat_map(|r| r.mismatches.iter().copied())
            .collect();
        extra.insert("guest-mismatches".into(), json!(mismatches));
        extra.insert("guest-stamped".into(), json!(a.stamped));
        extra.insert(
            "guest-vcpus".into(),
            Value::Array(
                a.vcpus
                    .iter()
                    .zip(&a.stamped)
                    .enumerate()
                    .map(|(i, (r, stamped))| {
                        json!({
                            "stamped": stamped,
                            "owns-pages": a.owns_pages(i),
                            "progress-exits": r.progress_exits,
                        })
                    })
                    .collect(),
            ),
        );
        let c = &a.stamps;
        extra.insert(
            "guest-stamps".into(),
            json!({"checked": c.checked, "wrong": c.wrong, "first-wrong": c.first_wrong}),
        );
        extra.insert("guest-ticks".into(), json!(a.ticks));
        extra.insert(
            "guest-serial".into(),
            json!(String::from_utf8_lossy(&a.serial)),
        );
        if let Some(s) = &a.stopped {
            extra.insert("guest-stopped".into(), json!(s));
        }
    }
    Summary {
        stats: report.stats.clone(),
        vcpu_started_ns: started_ns,
        // This side compared the source's digest before it started the guest.
        verified: report.error.is_none()
            && report.stats.status == MigrationStatus::Completed
            && report.stats.verification.is_verified(),
        dirty_log_mode: "none".into(),
        backend: "kvm".into(),
        digest: report.digest,
        error: report.error.as_ref().map(ToString::to_string),
        extra,
        ..Summary::default()
    }
}

/// The demo VMM's empty guest as livemig's destination fills it. It has
/// no network device to announce, so no start hook: the report says when
/// the guest started.
pub fn destination_vm(vmm: &DemoVmm) -> DestinationVm {
    let vcpus: Arc<dyn Vcpus> = Arc::clone(vmm.vcpus()) as Arc<dyn Vcpus>;
    let serial: Box<dyn DeviceSection> = Box::new(vmm.serial().section());
    DestinationVm {
        vm: Arc::clone(vmm.vm()),
        memory: vmm.guest_memory().clone(),
        vcpus,
        devices: vec![serial],
        on_started: None,
    }
}

/// `livemig receive`: listens on `listen`, prints `listening on URI` on
/// `announce` (the real port when 0 was asked for), loads one incoming
/// migration into a fresh demo VMM of `mem_mib` MiB and `vcpus` vCPUs
/// (livemig refuses a source whose CPU model or vCPU count differs),
/// lets livemig start the guest (a guest paused on the source arrives
/// paused) and watches it run for `run_for`. `blocktime` (the
/// postcopy-blocktime capability) adds per-vCPU blocktime to a postcopy
/// report. `digest` digests the loaded memory inside the stop;
/// `digest_unwritten` has a precopy's report carry, like a postcopy's, the
/// pages the guest wrote here and the digest of the others, taken after
/// the watch ([`MemoryCheck::Unwritten`]). After an ambiguous end the loaded guest is held paused: `hold`
/// decides whether it starts here (as after a completed migration) or is
/// discarded with the process.
#[allow(clippy::too_many_arguments)]
pub fn run_receive(
    listen: &MigrationUri,
    mem_mib: u64,
    vcpus: u32,
    run_for: Duration,
    options: ReceiveOptions,
    blocktime: bool,
    digest_unwritten: bool,
    announce: &mut dyn Write,
    progress: &mut Progress,
    events: EventLog,
    hold: HoldFn<'_>,
) -> Result<Summary, DemoError> {
    let listener = Listener::bind(listen)?;
    let vmm = empty_vmm(mem_mib, vcpus)?;
    // `-mem-prealloc`: part of this VMM's start-up, done before the
    // address is announced, so no source waits for it and it is not in
    // the migration's time (receive then finds the RAM preallocated).
    let prealloc = options
        .mem_prealloc
        .then(|| vmm.prealloc())
        .transpose()
        .map_err(DemoError::Boot)?;
    let uri = listener.local_uri()?;
    // The announcement is how a parent process finds the port: a failed
    // write means nobody listens, which the migration itself will show.
    let _ = writeln!(announce, "listening on {uri}");
    let _ = announce.flush();
    let conn = listener.accept()?;
    // Only now: until a migration arrives, Ctrl-C simply ends the process.
    let interrupt = Cancel::new();
    interrupt::cancel_on_signals(&interrupt).map_err(|e| DemoError::Signals(e.to_string()))?;
    // After the handlers: from this line on, a signal is the migration's
    // to answer (a script waits for it before it may interrupt one).
    events.arrived(conn.peer());
    // From before the first page: after a postcopy it says which pages
    // the guest wrote here.
    let log = WriteLog::start(Arc::clone(vmm.vm()), vmm.guest_memory().clone())
        .map_err(DemoError::Writes)?;
    let handle = livemig_kvm::receive_with_channels(destination_vm(&vmm), conn, listener, options)?;
    let mut refusal = Refusal::default();
    while !handle.wait_timeout(PROGRESS_EVERY) {
        match interrupt.signal() {
            Some(signal) => handle.interrupt(signal),
            None if interrupt.is_cancelled() => handle.cancel(),
            None => {}
        }
        let stats = handle.stats();
        refusal.say(handle.cancel_refused(), &stats);
        while let Some(e) = handle.poll_event() {
            events.say(&e);
        }
        progress.update(&stats);
    }
    refusal.say(handle.cancel_refused(), &handle.stats());
    while let Some(e) = handle.poll_event() {
        events.say(&e);
    }
    let report = handle.join()?;
    progress.update(&report.stats);
    progress.finish();
    let tids = vmm.vcpus().thread_ids();
    let blocktime = blocktime.then_some(&tids[..]);
    if report.stats.ambiguous_end.is_some() {
        let decision = hold(&receive_summary(&report, prealloc, None, None, blocktime))?;
        let after = match decision {
            Decision::Run => {
                let at = clock::monotonic_ns();
                vmm.vcpus().resume().map_err(DemoError::Vcpu)?;
                Some((
                    GuestAfter::watch(&vmm, run_for).map_err(DemoError::Watch)?,
                    at,
                ))
            }
            Decision::Discard(_) | Decision::TimedOut => None,
        };
        let mut summary = receive_summary(
            &report,
            prealloc,
            after.as_ref().map(|a| &a.0),
            after.as_ref().map(|a| a.1),
            blocktime,
        );
        summary
            .extra
            .insert("hold-decision".into(), json!(decision_name(decision)));
        if let Some((a, _)) = &after {
            // Nothing at the stop is known here: health only.
            summary
                .extra
                .insert("guest-continued".into(), json!(a.healthy()));
        }
        return Ok(summary);
    }
    if report.error.is_some() || !report.started {
        return Ok(receive_summary(&report, prealloc, None, None, blocktime));
    }
    if report.postcopy.is_none() && !digest_unwritten {
        log.stop().map_err(DemoError::Writes)?;
        let after = GuestAfter::watch(&vmm, run_for).map_err(DemoError::Watch)?;
        return Ok(receive_summary(
            &report,
            prealloc,
            Some(&after),
            report.started_ns,
            blocktime,
        ));
    }
    let (after, writes) =
        GuestAfter::watch_then(&vmm, run_for, || log.finish()).map_err(DemoError::Watch)?;
    let writes = writes.map_err(DemoError::Writes)?;
    let mut summary = receive_summary(
        &report,
        prealloc,
        Some(&after),
        report.started_ns,
        blocktime,
    );
    summary
        .extra
        .insert("guest-written-pages".into(), json!(writes.pages));
    summary
        .extra
        .insert("guest-written-ranges".into(), json!(writes.ranges));
    summary.extra.insert(
        "digest-unwritten".into(),
        json!(format!("{:#018x}", writes.digest)),
    );
    Ok(summary)
}

/// What the destination wrote on stderr (its error line, if any).
fn child_stderr(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(err) = child.stderr.as_mut() {
        // A child whose stderr cannot be read has nothing more to say.
        let _ = err.read_to_string(&mut text);
    }
    text
}

/// Parses the destination's final JSON line; also returns its stderr.
fn child_report(child: &mut Child) -> Result<(Value, String), DemoError> {
    let mut text = String::new();
    if let Some(out) = child.stdout.as_mut() {
        out.read_to_string(&mut text)
            .map_err(|e| DemoError::Child(format!("reading its report: {e}")))?;
    }
    let stderr = child_stderr(child);
    let status = child
        .wait()
        .map_err(|e| DemoError::Child(format!("waiting for it: {e}")))?;
    let line = text.lines().rev().find(|l| l.starts_with('{'));
    match line {
        Some(l) => serde_json::from_str(l)
            .map(|v| (v, stderr))
            .map_err(|e| DemoError::Child(format!("its report is not JSON ({e}): {l}"))),
        None => Err(DemoError::Child(format!(
            "it exited ({status}) without a report{}",
            last_line(&stderr).map_or(String::new(), |l| format!(" ({l})"))
        ))),
    }
}

/// Kills the destination child if the demo gives up early.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `livemig demo` on KVM: a destination child process, the guest booted
/// here, a migration over TCP on 127.0.0.1, and the verdict.
pub fn run_demo(
    shape: GuestShape,
    config: &MigrationConfig,
    warmup: Duration,
    run_for: Duration,
    cancel: &Cancel,
    progress: &mut Progress,
) -> Result<Summary, DemoError> {
    let options = SourceOptions::default();
    run_demo_with(
        shape,
        config,
        options,
        MemoryCheck::Digest,
        false,
        warmup,
        run_for,
        None,
        cancel,
        progress,
    )
}

/// How `demo` judges that the destination's memory equals the source's,
/// besides the guest's own stamp checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryCheck {
    /// The destination also digests all of its memory once loaded (inside
    /// the stop) and the source compares it with its own: an opinion
    /// independent of the in-protocol verification, which also sees what
    /// happens to a page after the engine placed it. `demo`'s.
    Digest,
    /// The in-protocol verification alone (Verified on both ends), which
    /// adds nothing to the stop but the hashing of the final pass's pages:
    /// `bench`'s, which measures the stop. Needs the source to verify.
    InProtocol,
    /// The check a postcopy always gets, after a precopy too: the
    /// destination logs its guest's writes, digests the pages it did not
    /// write at the end of its watch (outside the stop), and the source
    /// digests the same pages of its stop image; the pages the guest
    /// wrote are checked by its stamps. `bench`'s for runs with
    /// verification off, so that their stop holds no digest either and
    /// compares with a verified run's.
    Unwritten,
}

/// [`run_demo`] with the source driver's `options` (the pre-switchover
/// pause, verification), how the destination's memory is checked, and
/// whether the destination preallocates its RAM at start-up
/// (`receive --mem-prealloc`, before it announces its address).
#[allow(clippy::too_many_arguments)]
pub fn run_demo_with(
    shape: GuestShape,
    config: &MigrationConfig,
    options: SourceOptions,
    check: MemoryCheck,
    mem_prealloc: bool,
    warmup: Duration,
    run_for: Duration,
    cut_after: Option<Duration>,
    cancel: &Cancel,
    progress: &mut Progress,
) -> Result<Summary, DemoError> {
    // Refused here in one line, not as the destination's failure to start.
    RamLayout::new(shape.mem_mib.saturating_mul(MIB)).map_err(DemoError::Boot)?;
    let exe = std::env::current_exe()
        .map_err(|e| DemoError::Child(format!("finding this program: {e}")))?;
    let child = Command::new(exe)
        .args([
            "receive",
            "--listen",
            "tcp:127.0.0.1:0",
            "--json",
            "--quiet",
        ])
        .args(["--mem-mib", &shape.mem_mib.to_string()])
        .args(["--vcpus", &shape.vcpus.to_string()])
        .args(["--run-ms", &run_for.as_millis().to_string()])
        // `demo` owns both sides and holds neither: after an ambiguous end
        // the child reports and exits at once, as the source does here.
        .args(["--hold-timeout-s", "0"])
        // The demo's own check, independent of the in-protocol one: the
        // destination's digest of what it loaded, compared here.
        .args((check == MemoryCheck::Digest).then_some("--digest"))
        .args((check == MemoryCheck::Unwritten).then_some("--digest-unwritten"))
        .args(mem_prealloc.then_some("--mem-prealloc"))
        // Both sides raise their threads for the stop, or neither.
        .args(
            options
                .stop_priority
                .is_none()
                .then_some("--no-stop-priority"),
        )
        .args(
            config
                .capabilities
                .contains(Capabilities::POSTCOPY_BLOCKTIME)
                .then_some(["--cap", "postcopy-blocktime=on"])
                .into_iter()
                .flatten(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Piped: when the source fails for its own reason (a precopy that
        // does not converge), the destination's "connection closed" line
        // would only blur the one line that says why.
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| DemoError::Child(format!("starting it: {e}")))?;
    let mut guard = ChildGuard(Some(child));
    let Some(child) = guard.0.as_mut() else {
        return Err(DemoError::Child("lost track of it".into()));
    };
    let Some(stdout) = child.stdout.take() else {
        return Err(DemoError::Child("no stdout".into()));
    };
    let mut reader = BufReader::new(stdout);
    let mut first = String::new();
    reader
        .read_line(&mut first)
        .map_err(|e| DemoError::Child(format!("reading its address: {e}")))?;
    let Some(addr) = first.trim().strip_prefix("listening on ") else {
        let stderr = child_stderr(child);
        let _ = child.wait();
        return Err(DemoError::Child(format!(
            "it did not announce an address (said {:?}{})",
            first.trim(),
            last_line(&stderr).map_or(String::new(), |l| format!(", then {l:?}"))
        )));
    };
    let uri: MigrationUri = addr
        .parse()
        .map_err(|e| DemoError::Child(format!("it announced a bad address {addr}: {e}")))?;
    child.stdout = Some(reader.into_inner());

    let vmm = boot_guest(shape, warmup)?;
    let conns = Connections::connect(&uri, config)?;
    let options = SourceOptions {
        dirty_log: shape.dirty_log,
        ..options
    };
    let out = send_guest(
        &vmm,
        conns,
        config,
        options,
        cancel,
        progress,
        EventLog::new(false),
        cut_after,
    )?;
    let Some(mut child) = guard.0.take() else {
        return Err(DemoError::Child("lost track of it".into()));
    };
    let (dest, dest_stderr) = child_report(&mut child)?;
    let own_failure = out.report.stats.status != MigrationStatus::Completed
        && !out
            .report
            .stats
            .error_desc
            .as_str()
            .starts_with("the destination failed");
    if !own_failure {
        // The demo owns both sides: that the migration arrived is no news.
        for line in dest_stderr
            .lines()
            .filter(|l| !l.contains(events::ARRIVED_LINE))
        {
            eprintln!("{line}");
        }
    }
    let postcopy = out.report.postcopy && dest.get("postcopy") == Some(&json!(true));
    let mut summary = send_summary(&out);
    if postcopy {
        for key in [
            "postcopy-fault-latency",
            "postcopy-blocktime",
            "postcopy-vcpu-blocktime",
            "guest-written-pages",
        ] {
            if let Some(v) = dest.get(key) {
                summary.extra.insert(key.into(), v.clone());
            }
        }
    }
    let started = dest.get("vcpu-started-ns").and_then(Value::as_u64);
    summary.vcpu_started_ns = started;
    if let (Some(Value::Object(ours)), Some(theirs)) = (
        summary.extra.get_mut("downtime-breakdown"),
        dest.get("downtime-breakdown"),
    ) {
        ours.insert("destination".into(), theirs.clone());
    }
    if let (Some(stop), Some(start)) = (out.report.stop.requested_ns, started) {
        // Both ends read this host's CLOCK_MONOTONIC: the true gap.
        summary.downtime_ms = Some(start.saturating_sub(stop) as f64 / 1e6);
        summary.extra.remove("downtime-span");
    }
    let dest_digest = dest
        .get("digest")
        .and_then(Value::as_str)
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok());
    let stamps_ok = dest
        .get("guest-stamps")
        .and_then(|c| c.get("wrong"))
        .and_then(Value::as_u64)
        == Some(0);
    let mismatches = dest
        .get("guest-mismatches")
        .and_then(Value::as_array)
        .map_or(1, Vec::len);
    let stopped = dest.get("guest-stopped").is_some();
    let guest = out
        .at_stop
        .as_ref()
        .and_then(|at_stop| continuity(at_stop, &dest));
    let continued =
        stamps_ok && mismatches == 0 && !stopped && guest.as_ref().is_some_and(GuestContinuity::ok);
    summary.guest = guest;
    // After a postcopy the destination guest ran while its memory came:
    // the pages it did not write are compared (the ones it wrote, by its
    // own stamp checks).
    let check = if postcopy {
        MemoryCheck::Unwritten
    } else {
        check
    };
    let memory_equal = match check {
        MemoryCheck::Unwritten => {
            let written: Option<Vec<(u64, u64)>> = dest
                .get("guest-written-ranges")
                .and_then(|r| serde_json::from_value(r.clone()).ok());
            let theirs = dest
                .get("digest-unwritten")
                .and_then(Value::as_str)
                .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok());
            let ours = written
                .filter(|_| out.at_stop.is_some())
                .and_then(|w| digest_outside(vmm.guest_memory(), &w).ok());
            if let Some(d) = ours {
                summary
                    .extra
                    .insert("digest-unwritten".into(), json!(format!("{d:#018x}")));
            }
            ours.is_some() && ours == theirs
        }
        MemoryCheck::Digest => out.digest.is_some() && out.digest == dest_digest,
        MemoryCheck::InProtocol => {
            out.report.stats.verification.is_verified()
                && dest.get("verification").and_then(Value::as_str) == Some("verified")
        }
    };
    // The in-protocol verdict, unless verification was turned off.
    let self_check = matches!(out.report.stats.verification, Verification::Off)
        || out.report.stats.verification.is_verified();
    summary.verified = out.report.stats.status == MigrationStatus::Completed
        && dest.get("status").and_then(Value::as_str) == Some("completed")
        && memory_equal
        && continued
        && self_check;
    summary.extra.insert("destination".into(), dest.clone());
    summary.extra.insert("guest-ram".into(), ram_regions(&vmm));
    if out.report.stats.status == MigrationStatus::Completed {
        // On the destination; after a failure the source's own fields
        // (`guest-continued-on-source`) tell how the guest is.
        summary
            .extra
            .insert("guest-continued".into(), json!(continued));
    }
    if summary.error.is_none()
        && out.report.stats.error_desc.is_empty()
        && let Some(e) = dest.get("error-desc").and_then(Value::as_str)
    {
        summary.error = Some(format!("the destination said: {e}"));
    }
    Ok(summary)
}

/// How the guest went on from `at_stop` (the source's stopped guest) to
/// what the destination reported after its watch (`dest`, its JSON
/// summary); `None` when the destination did not report the guest (it did
/// not run there).
fn continuity(at_stop: &GuestAtStop, dest: &Value) -> Option<GuestContinuity> {
    let vcpus = dest.get("guest-vcpus")?.as_array()?;
    let ticks_after = dest.get("guest-ticks")?.as_u64()?;
    let serial = dest.get("guest-serial")?.as_str()?;
    let mut continued = 0;
    for (i, v) in vcpus.iter().enumerate() {
        let moved = vcpu_continued(
            at_stop.stamped.get(i).copied().unwrap_or(u64::MAX),
            v.get("stamped")?.as_u64()?,
            v.get("owns-pages")?.as_bool()?,
            v.get("progress-exits")?.as_u64()?,
        );
        continued += u32::from(moved);
    }
    Some(GuestContinuity {
        vcpus: at_stop.stamped.len() as u32,
        vcpus_continued: if vcpus.len() == at_stop.stamped.len() {
            continued
        } else {
            0
        },
        ticks_at_stop: at_stop.ticks,
        ticks_after,
        serial_continued: serial_continued(&at_stop.serial, serial.as_bytes()),
    })
}

/// The last non-empty line of `text`.
fn last_line(text: &str) -> Option<&str> {
    text.lines().rev().map(str::trim).find(|l| !l.is_empty())
}

/// The line `demo` prints when it falls back to the simulation because
/// opening `/dev/kvm` failed with `e`.
pub fn no_kvm_line(e: &std::io::Error) -> String {
    format!(
        "{}: running the migration on the simulated backend",
        no_kvm_reason(e)
    )
}

/// Why `/dev/kvm` could not be used, from the error opening it: a missing
/// device and one this user may not open are different problems with
/// different fixes.
pub fn no_kvm_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no /dev/kvm on this machine".into(),
        std::io::ErrorKind::PermissionDenied => "/dev/kvm exists but cannot be opened: \
             permission denied (run as root or join the kvm group)"
            .into(),
        _ => format!("/dev/kvm cannot be opened ({e})"),
    }
}

/// Opens `/dev/kvm` for reading and writing, to learn whether KVM can be
/// used (and if not, why).
pub fn open_kvm() -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
}

/// Whether `/dev/kvm` can be opened for reading and writing.
pub fn kvm_available() -> bool {
    open_kvm().is_ok()
}

/// The simulated guest's one RAM block, named as the demo VMM's first
/// region is.
const SIMULATED_BLOCK_ID: &str = "ram0";

/// `livemig demo` without KVM: the same shape of guest and migration on
/// `livemig-sim`'s simulated memory, link (loopback-like, 2.4 GB/s) and
/// clock.
pub fn run_simulated(shape: GuestShape, config: &MigrationConfig) -> Result<Summary, DemoError> {
    let page = PAGE_SIZE as u64;
    let pages = shape.mem_mib * MIB / page;
    let mut scenario = Scenario::new(vec![BlockSpec::new(SIMULATED_BLOCK_ID, pages, PAGE_SIZE)]);
    scenario.config = config.clone();
    scenario.fill_pages = (pages / 64).max(1);
    scenario.forward = livemig_sim::LinkConfig::new(2_400_000_000, 20_000);
    scenario.back = livemig_sim::LinkConfig::new(2_400_000_000, 20_000);
    scenario.run_after_ns = 1_000_000_000;
    if shape.dirty_mib > 0 {
        scenario.guest = Some(GuestSpec {
            working_set: WorkingSet {
                block: 0,
                first_page: WORKING_SET_START / page,
                pages: (shape.dirty_mib * MIB / page).min(pages - WORKING_SET_START / page),
            },
            // What the KVM demo guest sustains right after a clear.
            rate_pages_per_sec: 300_000,
            seed: 1,
            burst: None,
        });
    }
    let out = run_migration(&scenario)
        .map_err(|e| DemoError::Failed(format!("simulation could not run: {e}")))?;
    let mut extra = serde_json::Map::new();
    extra.insert("guest-continued".into(), json!(out.guest_continued));
    Ok(Summary {
        stats: out.source.clone(),
        downtime_ms: out.downtime_ns.map(|d| d as f64 / 1e6),
        source_downtime_ms: None,
        vcpu_stopped_ns: out.stop_ns,
        vcpu_started_ns: out.stop_ns.zip(out.downtime_ns).map(|(s, d)| s + d),
        verified: out.verified(),
        dirty_log_clears: out.dirty_log_clears,
        dirty_log_mode: "simulated".into(),
        backend: "simulated".into(),
        digest: out.stop_digest,
        error: None,
        guest: None,
        extra,
        timeline: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 8 item 9: why the demo falls back is said, with its fix.
    #[test]
    fn the_fallback_line_says_why_kvm_cannot_be_used() {
        use std::io::{Error, ErrorKind};
        let line = no_kvm_line(&Error::from_raw_os_error(libc::EACCES));
        assert!(
            line.contains("/dev/kvm exists but cannot be opened"),
            "{line}"
        );
        assert!(line.contains("run as root or join the kvm group"), "{line}");
        assert!(line.ends_with("running the migration on the simulated backend"));
        let line = no_kvm_line(&Error::from(ErrorKind::NotFound));
        assert!(line.starts_with("no /dev/kvm on this machine"), "{line}");
        let line = no_kvm_line(&Error::from_raw_os_error(libc::ENXIO));
        assert!(
            line.contains("cannot be opened (No such device or address"),
            "{line}"
        );
    }

    #[test]
    fn simulated_fallback_completes_and_verifies() {
        let shape = GuestShape {
            mem_mib: 64,
            dirty_mib: 4,
            dirty_log: DirtyLogMode::ManualProtect,
            vcpus: 2,
            fill: false,
        };
        let mut config = base_config();
        config.parameters.max_bandwidth = 0;
        let s = run_simulated(shape, &config).unwrap();
        assert_eq!(s.stats.status, MigrationStatus::Completed);
        assert!(s.verified, "{}", s.to_text());
        assert_eq!(s.backend, "simulated");
        assert!(s.dirty_log_clears > 0);
        assert_eq!(s.to_json()["ram"]["total"], 64u64 << 20);
    }

    #[test]
    fn guest_shapes_are_checked_and_modes_named() {
        let shape = |mem_mib, dirty_mib| GuestShape {
            mem_mib,
            dirty_mib,
            dirty_log: DirtyLogMode::ManualProtect,
            vcpus: 2,
            fill: false,
        };
        let p = shape(1024, 64).params().unwrap();
        assert_eq!((p.ws_start, p.ws_pages), (WORKING_SET_START, 64 * 256));
        assert_eq!(shape(64, 0).params().unwrap().ws_pages, 0);
        let e = shape(64, 64).params().unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        assert!(check_mode("precopy").is_ok());
        assert!(check_mode("postcopy").is_ok());
        assert!(
            check_mode("hybrid")
                .unwrap_err()
                .to_string()
                .contains("'hybrid' is not supported")
        );
        let mut c = base_config();
        postcopy_config(&mut c, |_| false);
        assert!(c.capabilities.contains(Capabilities::POSTCOPY_RAM));
        assert_eq!(c.limits.postcopy_after_iterations, Some(1));
        assert_eq!(c.parameters.downtime_limit_ms, 0);
        assert_eq!(c.parameters.max_postcopy_bandwidth, DEMO_POSTCOPY_BANDWIDTH);
        let mut c = base_config();
        c.parameters.downtime_limit_ms = 50;
        c.parameters.max_postcopy_bandwidth = 7;
        postcopy_config(&mut c, |_| true);
        assert_eq!(c.parameters.downtime_limit_ms, 50);
        assert_eq!(c.parameters.max_postcopy_bandwidth, 7);
        // With the preempt channel the background pass runs unlimited.
        let mut c = base_config();
        c.capabilities |= Capabilities::POSTCOPY_RAM | Capabilities::POSTCOPY_PREEMPT;
        postcopy_config(&mut c, |_| false);
        assert_eq!(c.parameters.max_postcopy_bandwidth, 0);
        for m in [DirtyLogMode::ManualProtect, DirtyLogMode::Legacy] {
            assert_eq!(mode_from_name(mode_name(m)), Some(m));
        }
        assert_eq!(mode_from_name("rings"), None);
    }
}
