//! The source side: runs a [`SourceEngine`] against a live KVM guest.
//!
//! [`migrate`] starts the migration thread and hands the caller a
//! [`MigrationHandle`]. On that thread the driver (`driver.rs`, one method
//! per engine action) polls the engine and carries out each action before
//! polling again, exactly as the simulated harness of `livemig-sim` does
//! (`run_migration`, written to be read beside it): the dirty log is fetched without clearing
//! and each chunk is cleared with the fetched bits as the mask before its
//! pages are read; page batches go out in one vectored write straight from
//! guest RAM; the vCPU is paused for the stop-and-copy, its state saved after
//! the stop, and resumed if the migration does not complete.
//!
//! A second thread reads the return path on a clone of the same connection
//! and forwards the bytes over a channel; the migration thread waits on that
//! channel (never longer than the engine's next deadline) when the engine
//! has nothing to do, for example while the rate limit holds it back.
//!
//! Before each action the engine learns what the socket knows: the bytes
//! written that the destination has not taken yet (`SIOCOUTQ`), and the
//! round-trip time (`TCP_INFO`), which with [`SourceOptions::stop_cost`]
//! makes the fixed cost of a stop. The switchover then waits until the
//! whole stop, queue included, fits the downtime limit.
//!
//! When KVM lacks manual dirty-log protection, the log falls back to
//! get-and-clear: every fetch re-protects the whole slot, so the engine's
//! clears have nothing left to do and are skipped, and the first fetch is
//! reported as all dirty (what manual mode's initially-set bits give).

mod channels;
mod dirty_log;
mod driver;
mod failure;
mod gate;
mod guest;
mod pacing;
mod return_path;
mod stop;
mod timeline;

use std::collections::VecDeque;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

use livemig_core::config::MigrationConfig;
use livemig_core::digest::{DigestBooks, DigestKey};
use livemig_core::return_path::RpDecoder;
use livemig_core::source::{BlockTracking, SourceEngine};
use livemig_core::stats::MigrationStats;

use super::handle::{MigrationHandle, Shared};
use super::sections;
use super::vcpu_access::on_vcpu;
use super::{MigrateError, Recovery, ram_layout};
use crate::clock;
use crate::dirty_log::DirtyLogMode;
use crate::memory::GuestMemory;
use crate::memory::PAGE_SIZE;
use crate::priority::{StopPriority, StopThreads};
use crate::transport::Connection;
use crate::vmm::{DeviceDirtyLog, DeviceSection, Vcpus};
use crate::x86::{CpuModel, VcpuCaps};
pub use channels::ChannelLost;
use channels::{ChannelKind, ChannelSenders};
use dirty_log::DirtyLog;
use driver::{Link, SourceDriver};
pub use failure::SourceFailure;
pub(crate) use gate::CancelGate;
use guest::SourceGuest;
use kvm_ioctls::{Kvm, VmFd};
use livemig_core::capabilities::Capabilities;
pub use stop::{SourceStop, StopPart};
pub use timeline::{
    DEFAULT_SLICE_MS, MAX_SLICES, MAX_SYNCS, MAX_THROTTLE_CHANGES, Slice, SyncMark, ThrottleMark,
    Timeline,
};

/// Longest the migration thread waits for input before polling again (so
/// the progress line stays fresh and a stuck peer is noticed).
const MAX_WAIT: Duration = Duration::from_millis(50);
/// Longest the migration thread carries out actions before looking at the
/// return path and reporting progress.
const MAX_BURST: Duration = Duration::from_millis(50);
/// How long a failed write waits for the destination's explanation on the
/// return path.
const HEAR_OUT: Duration = Duration::from_millis(200);
/// Longest the source waits after the postcopy switchover package for the
/// PONG that says the destination runs the guest, before it starts the
/// background pass anyway (the downtime is then not known).
const RUN_ACK_WAIT: Duration = Duration::from_secs(1);

/// How the tool drives a source migration, beyond the engine's
/// configuration.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// With the `pause-before-switchover` capability: how long the stopped
    /// guest stays in pre-switchover before the switchover continues on its
    /// own (what an operator's `migrate-continue` would do).
    pub switchover_pause: Duration,
    /// How long the socket may accept no byte of the stream (`None`:
    /// forever), see [`Connection::set_write_timeout`]. A destination that
    /// stops reading, or a dead link, fills the socket buffers; the bound
    /// turns that into a failed migration with the guest running again on
    /// the source.
    pub write_timeout: Option<Duration>,
    /// Called once, on the migration thread, right after the postcopy
    /// package (with its run command) was handed to the socket: from then
    /// on the guest belongs to the destination and a cancel is refused. The
    /// `livemig` tool prints a line there.
    pub on_switchover: Option<fn()>,
    /// The fixed part of a stop besides the network round trips, which
    /// the downtime limit must cover on top of the RAM still to send:
    /// pausing the vCPU, the last dirty-log sync, saving its state, and the
    /// destination loading it and starting the guest (plus anything the
    /// VMM's destination does before it starts the guest). Two measured
    /// round-trip times are added for the end-of-stream exchange.
    pub stop_cost: Duration,
    /// How KVM's dirty log is read: `ManualProtect` is a preference (the
    /// legacy mode when KVM lacks it), `Legacy` forces the get-and-clear
    /// fallback so it can be exercised on any host.
    pub dirty_log: DirtyLogMode,
    /// Whether the migration verifies itself (on by default): every page
    /// sent is hashed and booked, the digest goes after the last page, and
    /// the destination compares it before its guest may start (see
    /// `livemig_core::digest`). Off saves the hashing (one read of each
    /// page sent) and claims nothing.
    pub verify: bool,
    /// With `verify`: the source also reads all of its memory again at the
    /// stop and compares it with its books, catching a dirty log that
    /// missed a write. It lengthens the stop by a hash of all RAM (tens of
    /// ms a GiB), so it is off by default.
    pub audit: bool,
    /// After the postcopy switchover, a cut connection pauses the
    /// migration: where to connect again and for how long to try (see
    /// [`Recovery`]).
    pub recovery: Recovery,
    /// The priority the migration thread and the return-path reader take
    /// from the vCPU stop until the guest runs again on either host, and
    /// the vCPU threads until they are parked (`None`: left as they are).
    /// While the guest is stopped those threads are all that runs for it,
    /// and a wake-up that waits for a CPU is downtime (see
    /// [`crate::priority`]); see `SourceStop::priority_refused` for a host
    /// that does not allow it.
    pub stop_priority: Option<StopPriority>,
    /// Width of the report's [`Timeline`] slices, ms: 100
    /// ([`DEFAULT_SLICE_MS`]) suits migrations of seconds; a migration of
    /// a fraction of a second needs finer ones to show its passes. The
    /// slices kept are capped at [`MAX_SLICES`] (the latest), so a finer
    /// slice keeps a shorter past.
    pub timeline_slice_ms: NonZeroU16,
}

/// Default for [`SourceOptions::write_timeout`].
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Default for [`SourceOptions::stop_cost`]: pausing the vCPU, saving and
/// loading its state and starting it again took 1 to 11 ms on the 2-core
/// development VM (idle `demo`, loopback).
pub const DEFAULT_STOP_COST: Duration = Duration::from_millis(5);

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            switchover_pause: Duration::ZERO,
            write_timeout: Some(DEFAULT_WRITE_TIMEOUT),
            on_switchover: None,
            stop_cost: DEFAULT_STOP_COST,
            dirty_log: DirtyLogMode::ManualProtect,
            verify: true,
            audit: false,
            recovery: Recovery::default(),
            stop_priority: Some(StopPriority::Realtime),
            timeline_slice_ms: DEFAULT_SLICE_MS,
        }
    }
}

/// What a source-side migration did.
#[derive(Debug)]
pub struct SourceReport {
    /// The engine's final statistics (status, times, RAM counters, error).
    pub stats: MigrationStats,
    /// Where the stop went: from the vCPU stop requested to the
    /// destination's confirmation of the whole stream.
    pub stop: SourceStop,
    /// The migration per slice ([`SourceOptions::timeline_slice_ms`]),
    /// its dirty-log syncs and throttle changes.
    pub timeline: Timeline,
    /// `KVM_CLEAR_DIRTY_LOG` calls made.
    pub dirty_log_clears: u64,
    /// How the dirty log was read.
    pub dirty_log_mode: DirtyLogMode,
    /// Whether the migration switched to postcopy (the guest was started on
    /// the destination before all of its memory had been sent).
    pub postcopy: bool,
    /// `CLOCK_MONOTONIC` nanoseconds when the postcopy switchover package
    /// had been written.
    pub package_sent_ns: Option<u64>,
    /// `CLOCK_MONOTONIC` nanoseconds when the destination's PONG to the
    /// [`livemig_core::source::POSTCOPY_RUN_PING`] after the package arrived: the destination had
    /// started the guest by then.
    pub run_acked_ns: Option<u64>,
    /// What the driver saw fail, when that is what ended the migration
    /// (its sentence is `stats.error_desc`). The engine's own reasons, such
    /// as a timeout or the destination's refusal, are only in the stats.
    pub failure: Option<SourceFailure>,
}

impl SourceReport {
    /// The guest's downtime as the source sees it: from the vCPU stop to
    /// the destination's confirmation, in milliseconds.
    pub fn source_downtime_ms(&self) -> Option<f64> {
        Some(self.stop.downtime_ns()? as f64 / 1e6)
    }

    /// The postcopy downtime as the source can know it, in milliseconds:
    /// from the vCPU stop to the destination's PONG after the switchover
    /// package. The destination started the guest before it answered, so
    /// this exceeds the true stop-to-start gap by at most one return trip.
    pub fn postcopy_downtime_ms(&self) -> Option<f64> {
        let (a, b) = (self.stop.requested_ns?, self.run_acked_ns?);
        Some(b.saturating_sub(a) as f64 / 1e6)
    }
}

/// The VMM's guest as a source lends it to livemig for one migration. The
/// VMM keeps running its vCPU threads and devices; livemig pauses and
/// resumes them through [`Vcpus`], reads RAM through `memory` and turns
/// dirty logging on for the memslots of `memory`'s regions on `vm` (and
/// off again when the migration ends, whatever its outcome).
pub struct SourceVm {
    /// The VMM's VM.
    pub vm: Arc<VmFd>,
    /// Guest RAM: each region is one RAM block of the stream (block id =
    /// region name, block index = region index), registered by the VMM as
    /// memslot `region.slot()` without flags.
    pub memory: GuestMemory,
    /// The VMM's vCPUs.
    pub vcpus: Arc<dyn Vcpus>,
    /// The VMM's device sections, saved after the vCPUs stopped, in this
    /// order.
    pub devices: Vec<Box<dyn DeviceSection>>,
    /// Pages the VMM's devices write behind KVM's back, merged into every
    /// dirty-log sync.
    pub device_dirty: Option<Box<dyn DeviceDirtyLog>>,
    /// Whether the guest runs: a paused guest is neither paused nor
    /// resumed by livemig and arrives paused on the destination.
    pub running: bool,
}

/// Starts migrating the guest of `vm` over `conn` on a migration thread of
/// its own, and returns its handle at once. The handle's
/// [`stats`](MigrationHandle::stats) follow the migration, its
/// [`cancel`](MigrationHandle::cancel) shuts the connection down and ends
/// it as cancelled, and [`join`](MigrationHandle::join) returns the report
/// of a migration that ran, whatever its outcome: a failed migration leaves
/// the guest running on the source and says why in `stats.error_desc`; a
/// completed one leaves it paused (it runs on the destination now).
///
/// Before returning, a running guest is paused for a moment while the
/// CPU model is read from vCPU 0 (what the destination checks before any
/// RAM) and the vCPU state KVM can save is probed.
///
/// `Err` here means the migration could not start: an invalid
/// configuration, `auto-converge` asked of a VMM that cannot throttle, a
/// RAM layout that cannot be described, devices with a reserved or
/// repeated section id, vCPUs that cannot be read, dirty
/// logging that KVM refused, or a connection that cannot be set up.
pub fn migrate(
    vm: SourceVm,
    conn: Connection,
    config: &MigrationConfig,
    options: SourceOptions,
) -> Result<MigrationHandle, MigrateError> {
    migrate_with_channels(vm, conn, Vec::new(), config, options)
}

/// How many connections besides the main one a migration with `config`
/// takes ([`migrate_with_channels`]): one for the postcopy preempt channel,
/// plus `multifd-channels` with multifd.
pub fn extra_connections(config: &MigrationConfig) -> usize {
    let caps = config.capabilities;
    let multifd = if caps.contains(Capabilities::MULTIFD) {
        usize::from(config.parameters.multifd_channels)
    } else {
        0
    };
    multifd + usize::from(caps.contains(Capabilities::POSTCOPY_PREEMPT))
}

/// [`migrate`] with extra connections to the same destination, made after
/// `conn` and in this order (the destination accepts them on the listener
/// that gave it `conn`, see
/// [`receive_with_channels`](super::receive_with_channels), in the order
/// the stream announces them): with `postcopy-preempt` the preempt
/// channel, then with the `multifd` capability the `multifd-channels`
/// channels ([`extra_connections`] says how many in all). Each multifd
/// channel gets a sender thread that writes pages straight from guest
/// memory (precopy only: after a switch to postcopy they carry nothing);
/// the preempt channel is written by the migration thread, as requests
/// come. Another number of connections is refused with
/// [`MigrateError::ChannelCount`].
pub fn migrate_with_channels(
    vm: SourceVm,
    conn: Connection,
    channels: Vec<Connection>,
    config: &MigrationConfig,
    options: SourceOptions,
) -> Result<MigrationHandle, MigrateError> {
    let mut config = config.validate().map_err(MigrateError::Config)?;
    // The shortest-stop rule's throttle is a default, not a request: a
    // VMM that cannot throttle keeps the stop its guest's dirty rate allows.
    config.stop_throttle &= vm.vcpus.can_throttle();
    let preempt = config.capabilities.contains(Capabilities::POSTCOPY_PREEMPT);
    let expected = extra_connections(&config);
    if channels.len() != expected {
        return Err(MigrateError::ChannelCount {
            expected,
            given: channels.len(),
        });
    }
    for c in &channels {
        c.set_write_timeout(options.write_timeout)?;
    }
    if config.capabilities.contains(Capabilities::AUTO_CONVERGE) && !vm.vcpus.can_throttle() {
        return Err(MigrateError::ThrottleUnsupported);
    }
    ram_layout(&vm.memory).map_err(MigrateError::Layout)?;
    sections::check_devices(&vm.devices)?;
    let (caps, model) = probe_vcpus(&vm)?;
    conn.set_write_timeout(options.write_timeout)?;
    let rp_conn = conn.try_clone()?;
    let gate = Arc::new(CancelGate::new(conn.try_clone()?));
    let shared = Arc::new(Shared::default());
    let theirs = Arc::clone(&gate);
    let guest = SourceGuest { vm, caps, model };
    // The preempt channel is written by the migration thread; multifd
    // channels get a sender thread each.
    let mut channels = channels.into_iter();
    let preempt = preempt.then(|| channels.next()).flatten();
    let channels: Vec<Connection> = channels.collect();
    let channels = (!channels.is_empty())
        .then(|| ChannelSenders::start(ChannelKind::Multifd, channels, &guest.vm.memory))
        .transpose()?;
    let server = Arc::new(return_path::Server::new(guest.vm.memory.clone()));
    MigrationHandle::spawn(shared, gate, move |shared| {
        run(
            guest,
            Link {
                conn,
                channels,
                preempt,
                server,
                gfns: Vec::new(),
                held: Vec::new(),
                wrote: false,
            },
            rp_conn,
            &config,
            options,
            &theirs,
            shared,
        )
    })
}

/// What livemig can save of the VMM's vCPUs, and the CPU model of vCPU 0,
/// read with a running guest paused for the moment it takes.
fn probe_vcpus(vm: &SourceVm) -> Result<(VcpuCaps, CpuModel), MigrateError> {
    let count = vm.vcpus.count();
    let vcpus = u32::try_from(count).map_err(|_| MigrateError::TooManyVcpus(count))?;
    let kvm = Kvm::new().map_err(MigrateError::OpenKvm)?;
    if vm.running {
        vm.vcpus.pause_all().map_err(MigrateError::Vmm)?;
    }
    let probed = on_vcpu(vm.vcpus.as_ref(), 0, |fd| {
        Ok((
            VcpuCaps::probe(&kvm, &vm.vm, fd)?,
            CpuModel::capture(fd, vcpus)?,
        ))
    });
    if vm.running {
        vm.vcpus.resume_all().map_err(MigrateError::Vmm)?;
    }
    probed.map_err(MigrateError::Vcpu)
}

/// A seed for the migration's digest key, from the OS's randomness (as
/// std's hash maps seed theirs), so that a page left over from another
/// migration does not match by chance.
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// The migration thread's body: the engine over this thread's own storage,
/// driven to its end.
#[allow(clippy::too_many_arguments)]
fn run(
    guest: SourceGuest,
    link: Link,
    rp_conn: Connection,
    config: &MigrationConfig,
    options: SourceOptions,
    gate: &CancelGate,
    shared: &Shared,
) -> Result<SourceReport, MigrateError> {
    let memory = guest.vm.memory.clone();
    let layout = ram_layout(&memory).map_err(MigrateError::Layout)?;
    let shift = config.parameters.clear_bitmap_shift;
    let mut dirty_words: Vec<Vec<u64>> = layout
        .iter()
        .map(|b| vec![0u64; BlockTracking::dirty_words(b)])
        .collect();
    let mut clear_words: Vec<Vec<u64>> = layout
        .iter()
        .map(|b| vec![0u64; BlockTracking::clear_words(b, shift)])
        .collect();
    let mut tracking = layout
        .iter()
        .zip(dirty_words.iter_mut().zip(clear_words.iter_mut()))
        .map(|(b, (d, c))| BlockTracking::new(b, shift, d, c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(MigrateError::Tracking)?;
    let mut scratch = vec![0u8; 64 * 1024];
    let mut engine = SourceEngine::new(config, &layout, &mut tracking, &mut scratch)
        .map_err(MigrateError::Source)?;
    engine
        .set_migration_id(migration_id())
        .map_err(MigrateError::Source)?;
    // The self-check's books, 8 bytes a page (none when it is off).
    let mut terms: Vec<Vec<u64>> = layout
        .iter()
        .filter(|_| options.verify)
        .map(|b| vec![0u64; DigestBooks::words(b)])
        .collect();
    let mut books = layout
        .iter()
        .zip(terms.iter_mut())
        .map(|(b, t)| DigestBooks::new(b, t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(MigrateError::DigestBooks)?;
    if options.verify {
        engine
            .verify_with(DigestKey::new(random_seed()), &mut books)
            .map_err(MigrateError::Source)?;
        engine
            .audit_at_stop(options.audit)
            .map_err(MigrateError::Source)?;
    }
    let rp = RpDecoder::new(PAGE_SIZE as u32).map_err(MigrateError::ReturnPath)?;
    let mut guest = guest;
    let reader = return_path::spawn_reader(rp_conn, Arc::clone(&link.server)).map_err(|error| {
        MigrateError::Spawn {
            thread: "return-path reader",
            error,
        }
    })?;
    let started = DirtyLog::start(
        Arc::clone(&guest.vm.vm),
        &memory,
        options.dirty_log,
        guest.vm.device_dirty.take(),
    )
    .map_err(MigrateError::DirtyLog)
    .and_then(|log| {
        let start = clock::now();
        engine.start(start).map_err(MigrateError::Source)?;
        Ok((log, start))
    });
    let slice_ms = options.timeline_slice_ms;
    let (log, start) = match started {
        Ok(started) => started,
        Err(e) => {
            // The reader ends with the connection.
            let _ = link.conn.shutdown(std::net::Shutdown::Both);
            let _ = reader.handle.join();
            return Err(e);
        }
    };
    // No early return from here on: the reader ends with the connection.
    let resume_to = options.recovery.resume_address(link.conn.peer());
    let mode = log.mode();
    let mut driver = SourceDriver {
        engine,
        guest,
        peer: link.conn.peer().to_string(),
        link,
        log,
        rp,
        events: reader.events,
        reader: Some(reader.handle),
        served: VecDeque::new(),
        stop_threads: StopThreads::new(options.stop_priority, reader.tid),
        reader_done: false,
        resume_to,
        recovering: false,
        paused_by: None,
        gate,
        shared,
        options,
        report: SourceReport {
            stats: MigrationStats::default(),
            stop: SourceStop::default(),
            timeline: Timeline::new(start.as_nanos(), slice_ms),
            dirty_log_clears: 0,
            dirty_log_mode: mode,
            postcopy: false,
            package_sent_ns: None,
            run_acked_ns: None,
            failure: None,
        },
        resume_error: None,
        paused_at: None,
        sent_at_sync: (0, 0),
    };
    driver.drive();
    driver.end_return_path();
    if let Some(senders) = driver.link.channels.take() {
        senders.finish();
    }
    *driver.link.server.lock() = None;
    if let Some(preempt) = driver.link.preempt.take() {
        let _ = preempt.shutdown(std::net::Shutdown::Both);
    }
    let mut report = driver.report;
    report.stats = driver.engine.stats().clone();
    report.dirty_log_clears = driver.log.clear_calls();
    let stopped = driver.log.stop();
    if let Some(e) = driver.resume_error {
        return Err(MigrateError::Vmm(e));
    }
    stopped.map_err(MigrateError::DirtyLog)?;
    Ok(report)
}

/// A migration id for the multifd and preempt hellos, unlikely to repeat:
/// std's per-process random hash keys, mixed with the time and the process
/// id (a preempt channel reopened in a recovery takes a new one).
pub(super) fn migration_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(clock::monotonic_ns());
    h.write_u32(std::process::id());
    h.finish()
}
