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

mod dirty_log;
mod driver;
mod failure;
mod gate;
mod guest;
mod return_path;

use std::sync::Arc;
use std::time::Duration;

use livemig_core::config::MigrationConfig;
use livemig_core::return_path::RpDecoder;
use livemig_core::source::{BlockTracking, SourceEngine};
use livemig_core::stats::MigrationStats;

use super::handle::{MigrationHandle, Shared};
use super::{MigrateError, ram_layout};
use crate::clock;
use crate::dirty_log::DirtyLogMode;
use crate::memory::PAGE_SIZE;
use crate::transport::Connection;
use crate::vcpu::Vcpu;
use crate::vm::Vm;
use dirty_log::DirtyLog;
use driver::{Link, SourceDriver};
pub use failure::SourceFailure;
pub(crate) use gate::CancelGate;
use guest::SourceGuest;

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
#[derive(Debug, Clone, Copy)]
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
        }
    }
}

/// What a source-side migration did.
#[derive(Debug)]
pub struct SourceReport {
    /// The engine's final statistics (status, times, RAM counters, error).
    pub stats: MigrationStats,
    /// `CLOCK_MONOTONIC` nanoseconds when the vCPU stop was requested.
    pub vcpu_stopped_ns: Option<u64>,
    /// `CLOCK_MONOTONIC` nanoseconds when the migration completed (the
    /// destination confirmed the whole stream).
    pub completed_ns: Option<u64>,
    /// The guest generation the vCPU had reported when it stopped.
    pub generation_at_stop: Option<u64>,
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
        let (a, b) = (self.vcpu_stopped_ns?, self.completed_ns?);
        Some(b.saturating_sub(a) as f64 / 1e6)
    }

    /// The postcopy downtime as the source can know it, in milliseconds:
    /// from the vCPU stop to the destination's PONG after the switchover
    /// package. The destination started the guest before it answered, so
    /// this exceeds the true stop-to-start gap by at most one return trip.
    pub fn postcopy_downtime_ms(&self) -> Option<f64> {
        let (a, b) = (self.vcpu_stopped_ns?, self.run_acked_ns?);
        Some(b.saturating_sub(a) as f64 / 1e6)
    }
}

/// Starts migrating the guest of `vm` (its one vCPU `vcpu`) over `conn`
/// on a migration thread of its own, and returns its handle at once. The
/// handle's [`stats`](MigrationHandle::stats) follow the migration, its
/// [`cancel`](MigrationHandle::cancel) shuts the connection down and ends
/// it as cancelled, and [`join`](MigrationHandle::join) returns the report
/// of a migration that ran, whatever its outcome: a failed migration leaves
/// the guest running on the source and says why in `stats.error_desc`.
///
/// `Err` here means the migration could not start: an invalid
/// configuration, a RAM layout that cannot be described, or a connection
/// that cannot be set up. The caller keeps its own `Arc`s of `vm` and
/// `vcpu`; the thread drops its clones when it ends.
pub fn migrate(
    vm: Arc<Vm>,
    vcpu: Arc<Vcpu>,
    conn: Connection,
    config: &MigrationConfig,
    options: SourceOptions,
) -> Result<MigrationHandle, MigrateError> {
    let config = config.validate().map_err(MigrateError::Config)?;
    ram_layout(vm.ram()).map_err(MigrateError::Layout)?;
    conn.set_write_timeout(options.write_timeout)?;
    let rp_conn = conn.try_clone()?;
    let gate = Arc::new(CancelGate::new(conn.try_clone()?));
    let shared = Arc::new(Shared::default());
    let theirs = Arc::clone(&gate);
    MigrationHandle::spawn(shared, gate, move |shared| {
        run(&vm, &vcpu, conn, rp_conn, &config, options, &theirs, shared)
    })
}

/// The migration thread's body: the engine over this thread's own storage,
/// driven to its end.
#[allow(clippy::too_many_arguments)]
fn run(
    vm: &Vm,
    vcpu: &Vcpu,
    conn: Connection,
    rp_conn: Connection,
    config: &MigrationConfig,
    options: SourceOptions,
    gate: &CancelGate,
    shared: &Shared,
) -> Result<SourceReport, MigrateError> {
    let layout = [ram_layout(vm.ram()).map_err(MigrateError::Layout)?];
    let shift = config.parameters.clear_bitmap_shift;
    let mut dirty_words = vec![0u64; BlockTracking::dirty_words(&layout[0])];
    let mut clear_words = vec![0u64; BlockTracking::clear_words(&layout[0], shift)];
    let mut tracking = [
        BlockTracking::new(&layout[0], shift, &mut dirty_words, &mut clear_words)
            .map_err(MigrateError::Tracking)?,
    ];
    let mut scratch = vec![0u8; 64 * 1024];
    let mut engine = SourceEngine::new(config, &layout, &mut tracking, &mut scratch)
        .map_err(MigrateError::Source)?;
    let rp = RpDecoder::new(PAGE_SIZE as u32).map_err(MigrateError::ReturnPath)?;
    engine.start(clock::now()).map_err(MigrateError::Source)?;
    // No early return from here on: the reader ends with the connection.
    let (events, reader) = return_path::spawn_reader(rp_conn);
    let clears_before = vm.clear_calls();
    let mut driver = SourceDriver {
        engine,
        guest: SourceGuest { vm, vcpu },
        peer: conn.peer().to_string(),
        link: Link { conn },
        log: DirtyLog::new(vm),
        rp,
        events,
        reader_done: false,
        gate,
        shared,
        options,
        report: SourceReport {
            stats: MigrationStats::default(),
            vcpu_stopped_ns: None,
            completed_ns: None,
            generation_at_stop: None,
            dirty_log_clears: 0,
            dirty_log_mode: vm.dirty_log_mode(),
            postcopy: false,
            package_sent_ns: None,
            run_acked_ns: None,
            failure: None,
        },
        resume_error: None,
        paused_at: None,
    };
    driver.drive();
    // Wake the return-path reader (it may be blocked in read) and let it end.
    let _ = driver.link.conn.shutdown(std::net::Shutdown::Both);
    let _ = reader.join();
    if let Some(e) = driver.resume_error {
        return Err(MigrateError::Vcpu(e));
    }
    let mut report = driver.report;
    report.stats = driver.engine.stats().clone();
    report.dirty_log_clears = vm.clear_calls() - clears_before;
    Ok(report)
}
