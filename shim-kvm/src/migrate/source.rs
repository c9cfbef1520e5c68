//! The source side: runs a [`SourceEngine`] against a live KVM guest.
//!
//! The migration thread (the caller of [`migrate`]) polls the engine and
//! carries out each action before polling again, exactly as the simulated
//! harness of `livemig-sim` does: the dirty log is fetched without clearing
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

use std::io::IoSlice;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use livemig_core::clear_map::PageRange;
use livemig_core::config::MigrationConfig;
use livemig_core::return_path::{RpDecodeError, RpDecoder, RpMessage};
use livemig_core::source::{
    BlockTracking, POSTCOPY_RUN_PING, PageReader, SourceAction, SourceEngine,
};
use livemig_core::state::MigrationStatus;
use livemig_core::stats::MigrationStats;
use livemig_core::wire::{self, DeviceId};

use super::{CPU_DEVICE_ID, CPU_STATE_VERSION, MigrateError, SlotMap, ram_layout};
use crate::clock;
use crate::dirty_log::{DirtyLogError, DirtyLogMode};
use crate::interrupt::Cancel;
use crate::memory::{GuestMemory, PAGE_SIZE, PageIovecs};
use crate::transport::{Connection, TransportError};
use crate::vcpu::Vcpu;
use crate::vm::Vm;

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
#[derive(Debug, Clone)]
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
    /// [`POSTCOPY_RUN_PING`] after the package arrived: the destination had
    /// started the guest by then.
    pub run_acked_ns: Option<u64>,
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

/// Guest memory as the engine reads it: zero-page checks through the slot
/// map, with volatile-safe reads (sound while the guest runs).
struct KvmPages<'r> {
    ram: &'r GuestMemory,
    map: &'r SlotMap,
}

impl PageReader for KvmPages<'_> {
    fn is_zero_page(&self, _block: u16, page: u64) -> bool {
        self.map
            .locate(page)
            .and_then(|(slot, p)| self.ram.is_zero_page(slot, p).ok())
            .unwrap_or(false)
    }
}

/// The dirty log of the one RAM block, fetched slot by slot into one
/// bitmap that is kept as the mask of the following clears.
struct DirtyLog<'v> {
    vm: &'v Vm,
    map: SlotMap,
    fetched: Vec<u64>,
    legacy: bool,
    first: bool,
}

impl<'v> DirtyLog<'v> {
    fn new(vm: &'v Vm) -> Self {
        let map = SlotMap::new(vm.ram());
        let pages: u64 = map.slots().iter().map(|s| s.2).sum();
        DirtyLog {
            vm,
            map,
            fetched: vec![0; pages.div_ceil(64) as usize],
            legacy: vm.dirty_log_mode() == DirtyLogMode::Legacy,
            first: true,
        }
    }

    /// Fetches every slot's log into `fetched`.
    fn fetch(&mut self) -> Result<&[u64], DirtyLogError> {
        for &(slot, first, pages) in self.map.slots() {
            let from = (first / 64) as usize;
            let to = from + pages.div_ceil(64) as usize;
            let words = self
                .fetched
                .get_mut(from..to)
                .ok_or(DirtyLogError::NoSuchRegion(slot))?;
            self.vm.get_dirty_log(slot, words)?;
        }
        if self.legacy && self.first {
            // Legacy logs start clean; the engine expects initially-set bits
            // (for the block's pages only, not the tail of the last word).
            self.fetched.fill(u64::MAX);
            let pages: u64 = self.map.slots().iter().map(|s| s.2).sum();
            if let (Some(last), tail @ 1..) = (self.fetched.last_mut(), pages % 64) {
                *last = (1u64 << tail) - 1;
            }
        }
        self.first = false;
        Ok(&self.fetched)
    }

    /// Clears `range` with the fetched bits as the mask (split per slot).
    /// In legacy mode the fetch already re-protected everything.
    fn clear(&self, range: PageRange) -> Result<(), DirtyLogError> {
        if self.legacy {
            return Ok(());
        }
        for (slot, first, count, block_page) in self.map.split(range.first, range.count) {
            let mask = self
                .fetched
                .get((block_page / 64) as usize..)
                .ok_or(DirtyLogError::NoSuchRegion(slot))?;
            self.vm.clear_dirty_log(slot, first, count, mask)?;
        }
        Ok(())
    }
}

enum RpEvent {
    /// Bytes read, and `CLOCK_MONOTONIC` nanoseconds when the read returned.
    Bytes(Vec<u8>, u64),
    Eof,
    Error(String),
}

fn spawn_return_path_reader(conn: Connection) -> (Receiver<RpEvent>, thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let event = match conn.read(&mut buf) {
                Ok(0) => RpEvent::Eof,
                Ok(n) => RpEvent::Bytes(buf[..n].to_vec(), clock::monotonic_ns()),
                Err(e) => RpEvent::Error(e.to_string()),
            };
            let last = !matches!(event, RpEvent::Bytes(..));
            if tx.send(event).is_err() || last {
                break;
            }
        }
    });
    (rx, handle)
}

/// Tells the engine what the socket knows: bytes written that the
/// destination has not taken (a stop waits for them, and they are not yet
/// bandwidth), and the round trip, which with `fixed` is the stop's fixed
/// cost. A socket that cannot say (it always can, short of a kernel
/// without these calls) leaves the last figures in place.
fn report_link(engine: &mut SourceEngine<'_>, conn: &Connection, fixed: Duration) {
    if let Ok(unsent) = conn.unsent_bytes() {
        engine.handle_unsent(clock::now(), unsent);
    }
    if let Ok(rtt) = conn.round_trip() {
        engine.handle_stop_cost(fixed + 2 * rtt);
    }
}

/// Hands one return-path event to the engine. Returns when it was read if
/// it carried the PONG to [`POSTCOPY_RUN_PING`].
fn on_return_path(
    engine: &mut SourceEngine<'_>,
    rp: &mut RpDecoder,
    event: RpEvent,
    peer: &str,
    cancel: &Cancel,
) -> Option<u64> {
    let mut run_acked = None;
    let now = clock::now();
    if cancel.is_cancelled() {
        // The connection broke because we shut it down: a cancel, not a
        // failure (refused, and the connection left alone, once the guest
        // runs on the destination).
        let _ = engine.cancel(now);
    }
    match event {
        RpEvent::Bytes(bytes, read_ns) => {
            let mut input = &bytes[..];
            while !input.is_empty() {
                match rp.decode(input) {
                    Ok((used, msg)) => {
                        if let Some(msg) = msg {
                            if msg == RpMessage::Pong(POSTCOPY_RUN_PING) {
                                run_acked = Some(read_ns);
                            }
                            // Only a finished engine refuses input, and it
                            // has nothing left to learn from it.
                            let _ = engine.handle_return_path(now, &msg);
                        }
                        input = input.get(used..).unwrap_or_default();
                    }
                    Err(e) => {
                        engine.handle_io_error(now, format_args!("{}", rp_error_words(peer, &e)));
                        break;
                    }
                }
            }
        }
        RpEvent::Eof => engine.handle_io_error(now, format_args!("{}", rp_closed_words(peer, rp))),
        RpEvent::Error(e) => engine.handle_io_error(now, format_args!("connection lost: {e}")),
    }
    run_acked
}

/// After the postcopy switchover package: waits (at most [`RUN_ACK_WAIT`])
/// for the destination's PONG to the ping that follows it, handing every
/// return-path event to the engine meanwhile, and returns when it was read.
/// Nothing is sent meanwhile, so the destination answers as soon as it has
/// run the guest instead of after the background pages that would
/// otherwise follow the package.
fn await_run_ack(
    engine: &mut SourceEngine<'_>,
    rp: &mut RpDecoder,
    events: &Receiver<RpEvent>,
    reader_done: &mut bool,
    peer: &str,
    cancel: &Cancel,
) -> Option<u64> {
    let deadline = clock::monotonic_ns() + RUN_ACK_WAIT.as_nanos() as u64;
    while !*reader_done && !engine.is_finished() {
        let left = deadline.saturating_sub(clock::monotonic_ns());
        let ev = events.recv_timeout(Duration::from_nanos(left)).ok()?;
        *reader_done |= !matches!(ev, RpEvent::Bytes(..));
        if let Some(at) = on_return_path(engine, rp, ev, peer, cancel) {
            return Some(at);
        }
    }
    None
}

/// A return-path decoding failure in an operator's words: a bad header
/// means the peer does not speak the return path at all; a well-framed
/// message with invalid content, or one cut off by the close, is named as
/// such.
fn rp_error_words(peer: &str, e: &RpDecodeError) -> String {
    if e.is_framing() {
        format!(
            "the peer {peer} is not a livemig destination: its reply is not a return-path message ({e})"
        )
    } else if matches!(e, RpDecodeError::Truncated { .. }) {
        format!("the destination {peer} closed the connection in the middle of a message ({e})")
    } else {
        format!("the destination {peer} sent an invalid return-path message ({e})")
    }
}

/// The end of the return path in words: cut off mid-message, or a close.
fn rp_closed_words(peer: &str, rp: &RpDecoder) -> String {
    match rp.finish() {
        Err(e) => rp_error_words(peer, &e),
        Ok(()) => format!("connection to {peer} closed by the destination"),
    }
}

/// Migrates the guest of `vm` (its one vCPU `vcpu`) over `conn`, calling
/// `progress` with the statistics every few tens of milliseconds. Setting
/// `cancel` shuts the connection down (`shutdown(2)`, which also frees a
/// write blocked on a stuck peer) and ends the migration as cancelled.
///
/// Returns the report of a migration that ran, whatever its outcome: a
/// failed migration leaves the guest running on the source and says why in
/// `stats.error_desc`. `Err` means the migration could not start.
pub fn migrate(
    vm: &Vm,
    vcpu: &Vcpu,
    conn: Connection,
    config: &MigrationConfig,
    options: SourceOptions,
    cancel: &Cancel,
    progress: &mut dyn FnMut(&MigrationStats),
) -> Result<SourceReport, MigrateError> {
    let layout = [ram_layout(vm.ram()).map_err(MigrateError::Layout)?];
    let config = config
        .validate()
        .map_err(|e| MigrateError::Engine(e.to_string()))?;
    let shift = config.parameters.clear_bitmap_shift;
    let mut dirty_words = vec![0u64; BlockTracking::dirty_words(&layout[0])];
    let mut clear_words = vec![0u64; BlockTracking::clear_words(&layout[0], shift)];
    let mut tracking = [
        BlockTracking::new(&layout[0], shift, &mut dirty_words, &mut clear_words)
            .map_err(|e| MigrateError::Engine(e.to_string()))?,
    ];
    let mut scratch = vec![0u8; 64 * 1024];
    let mut engine = SourceEngine::new(&config, &layout, &mut tracking, &mut scratch)
        .map_err(|e| MigrateError::Engine(e.to_string()))?;
    let mut rp =
        RpDecoder::new(PAGE_SIZE as u32).map_err(|e| MigrateError::Engine(e.to_string()))?;
    conn.set_write_timeout(options.write_timeout)?;
    let (rp_conn, cancel_conn) = (conn.try_clone()?, conn.try_clone()?);
    engine
        .start(clock::now())
        .map_err(|e| MigrateError::Engine(e.to_string()))?;
    // No early return from here on: the threads end with the connection.
    let (events, reader) = spawn_return_path_reader(rp_conn);
    let peer = conn.peer().to_string();
    let done = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(CancelGate::new(cancel_conn));
    let watcher = spawn_cancel_watcher(Arc::clone(&gate), cancel.clone(), Arc::clone(&done));
    let mut log = DirtyLog::new(vm);
    let map = SlotMap::new(vm.ram());
    let pages = KvmPages {
        ram: vm.ram(),
        map: &map,
    };
    let mut report = SourceReport {
        stats: MigrationStats::default(),
        vcpu_stopped_ns: None,
        completed_ns: None,
        generation_at_stop: None,
        dirty_log_clears: 0,
        dirty_log_mode: vm.dirty_log_mode(),
        postcopy: false,
        package_sent_ns: None,
        run_acked_ns: None,
    };
    let clears_before = vm.clear_calls();
    let mut reader_done = false;
    // A guest that could not be restarted after a failed migration is an
    // error of its own, reported once everything is cleaned up.
    let mut resume_error = None;
    // When the engine entered pre-switchover (monotonic ns).
    let mut paused_at: Option<u64> = None;

    // A cancel asked for after the postcopy switchover, already reported.
    let mut cancel_refused = false;
    let status = 'run: loop {
        if cancel.is_cancelled() {
            if let Err(e) = engine.cancel(clock::now()) {
                if !cancel_refused {
                    cancel_refused = true;
                    eprintln!("livemig: {e}; the migration goes on to completion");
                }
            }
        }
        while let Ok(ev) = events.try_recv() {
            reader_done |= !matches!(ev, RpEvent::Bytes(..));
            on_return_path(&mut engine, &mut rp, ev, &peer, cancel);
        }
        let burst = clock::monotonic_ns();
        let mut lost: Option<String> = None;
        loop {
            // Only precopy decides on them; after the stop (or the postcopy
            // switchover) the two system calls per action would be waste.
            if matches!(
                engine.state(),
                MigrationStatus::Setup | MigrationStatus::Active
            ) {
                report_link(&mut engine, &conn, options.stop_cost);
            }
            let Some(action) = engine.poll_action(clock::now(), &pages) else {
                break;
            };
            match action {
                SourceAction::Send(bytes) => {
                    if let Err(e) = conn.write_all(bytes) {
                        lost = Some(format!("connection lost: {e}"));
                    }
                }
                SourceAction::SendPages { header, pages, .. } => {
                    let sent = PageIovecs::new(vm.ram(), header, pages)
                        .map_err(TransportError::from)
                        .and_then(|p| conn.write_page_iovecs(p));
                    if let Err(e) = sent {
                        lost = Some(format!("connection lost: {e}"));
                    }
                }
                SourceAction::SyncDirtyLog => match log.fetch() {
                    Ok(words) => {
                        let fed = engine
                            .handle_dirty_log(0, words)
                            .and_then(|()| engine.handle_sync_done(clock::now()));
                        if let Err(e) = fed {
                            engine.handle_io_error(
                                clock::now(),
                                format_args!("migration engine: {e}"),
                            );
                        }
                    }
                    Err(e) => engine.handle_io_error(
                        clock::now(),
                        format_args!("KVM_GET_DIRTY_LOG failed: {e}"),
                    ),
                },
                SourceAction::ClearDirtyLog { range, .. } => {
                    if let Err(e) = log.clear(range) {
                        engine.handle_io_error(
                            clock::now(),
                            format_args!("KVM_CLEAR_DIRTY_LOG failed: {e}"),
                        );
                    }
                }
                SourceAction::SetThrottle { percent } => {
                    let rate = engine.stats().ram.dirty_pages_rate;
                    let limit = if percent == 0 {
                        0
                    } else {
                        (rate * u64::from(100 - percent.min(99)) / 100).max(1)
                    };
                    vcpu.set_dirty_rate_limit(limit);
                }
                SourceAction::StopVcpus => {
                    report.vcpu_stopped_ns = Some(clock::monotonic_ns());
                    match vcpu.pause() {
                        Ok(_) => {
                            report.generation_at_stop = Some(vcpu.stats().generation);
                            if let Err(e) = engine.handle_vcpus_stopped(clock::now()) {
                                // The engine does not know the guest is
                                // stopped, so it would not restart it.
                                if let Err(e) = vcpu.resume() {
                                    resume_error = Some(e);
                                }
                                engine.handle_io_error(
                                    clock::now(),
                                    format_args!("migration engine: {e}"),
                                );
                            }
                        }
                        Err(e) => engine.handle_io_error(
                            clock::now(),
                            format_args!("stopping the vCPU failed: {e}"),
                        ),
                    }
                }
                SourceAction::SaveDevices => match save_devices(vcpu, &conn) {
                    Ok(bytes) => {
                        if let Err(e) = engine.handle_devices_sent(clock::now(), bytes) {
                            engine.handle_io_error(
                                clock::now(),
                                format_args!("migration engine: {e}"),
                            );
                        }
                    }
                    Err(reason) => lost = Some(reason),
                },
                SourceAction::PackageDevices => {
                    // The last moment a cancel can be carried out: decided
                    // under the gate's lock, so that no shutdown can follow
                    // the package (the destination would start the guest,
                    // then lose its connection).
                    if !gate.commit(cancel) {
                        let _ = engine.cancel(clock::now());
                        continue;
                    }
                    report.postcopy = true;
                    match package_devices(&mut engine, vcpu, &conn) {
                        Ok(()) => {
                            report.package_sent_ns = Some(clock::monotonic_ns());
                            if let Some(announce) = options.on_switchover {
                                announce();
                            }
                            report.run_acked_ns = await_run_ack(
                                &mut engine,
                                &mut rp,
                                &events,
                                &mut reader_done,
                                &peer,
                                cancel,
                            );
                        }
                        Err(reason) => lost = Some(reason),
                    }
                }
                SourceAction::ResumeVcpus => {
                    if let Err(e) = vcpu.resume() {
                        resume_error = Some(e);
                    }
                }
                SourceAction::Finished(status) => break 'run status,
            }
            // From the commit on, as after the postcopy switchover, the
            // destination needs the connection to confirm: close the gate
            // to cancels (the COMMIT just handed to the socket is delivered
            // even if a cancel shut it down a moment before; the end is
            // then reported ambiguous, never resumed here).
            if engine.is_committed() {
                gate.hold();
            }
            if let Some(reason) = lost.take() {
                if cancel.is_cancelled() {
                    let _ = engine.cancel(clock::now());
                }
                // A destination that refused the stream says why on the
                // return path before it closes: hear it before blaming the
                // broken connection. A plain end of the return path says
                // nothing more than the failed write does, so the write's
                // reason stands then.
                let deadline = clock::monotonic_ns() + HEAR_OUT.as_nanos() as u64;
                while !reader_done {
                    let left = deadline.saturating_sub(clock::monotonic_ns());
                    match events.recv_timeout(Duration::from_nanos(left)) {
                        Ok(ev @ RpEvent::Bytes(..)) => {
                            on_return_path(&mut engine, &mut rp, ev, &peer, cancel);
                        }
                        Ok(ev @ RpEvent::Error(_)) => {
                            // Perhaps the kernel's own verdict (a timeout
                            // on a dead link), which then ends both ways.
                            reader_done = true;
                            on_return_path(&mut engine, &mut rp, ev, &peer, cancel);
                        }
                        Ok(RpEvent::Eof) => {
                            reader_done = true;
                            // Cut off mid-message says more than the write.
                            if rp.finish().is_err() {
                                on_return_path(&mut engine, &mut rp, RpEvent::Eof, &peer, cancel);
                            }
                        }
                        Err(_) => break,
                    }
                }
                engine.handle_io_error(clock::now(), format_args!("{reason}"));
            }
            // Page requests are served ahead of the background pass only
            // once the engine has them. (Precopy has nothing urgent on the
            // return path, and draining there measurably slowed the first
            // pass of an idle 4 GiB guest: 90 -> 140 ms.)
            while engine.state() == MigrationStatus::PostcopyActive
                && let Ok(ev) = events.try_recv()
            {
                reader_done |= !matches!(ev, RpEvent::Bytes(..));
                on_return_path(&mut engine, &mut rp, ev, &peer, cancel);
            }
            if clock::monotonic_ns() - burst > MAX_BURST.as_nanos() as u64 {
                break;
            }
        }
        progress(engine.stats());
        if engine.is_finished() {
            break engine.state();
        }
        let mut wait = engine
            .poll_timeout()
            .map_or(MAX_WAIT, |t| t.saturating_since(clock::now()).min(MAX_WAIT));
        if engine.state() == MigrationStatus::PreSwitchover {
            let since = *paused_at.get_or_insert_with(clock::monotonic_ns);
            let paused = Duration::from_nanos(clock::monotonic_ns() - since);
            match options.switchover_pause.checked_sub(paused) {
                Some(left) if !left.is_zero() => wait = wait.min(left),
                _ => {
                    if let Err(e) = engine.continue_switchover(clock::now()) {
                        engine.handle_io_error(clock::now(), format_args!("migration engine: {e}"));
                    }
                    continue;
                }
            }
        }
        if reader_done {
            thread::sleep(wait);
            continue;
        }
        match events.recv_timeout(wait) {
            Ok(ev) => {
                reader_done |= !matches!(ev, RpEvent::Bytes(..));
                on_return_path(&mut engine, &mut rp, ev, &peer, cancel);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => reader_done = true,
        }
    };
    if status == MigrationStatus::Completed {
        report.completed_ns = Some(clock::monotonic_ns());
    }
    // Wake the return-path reader (it may be blocked in read) and let it end.
    done.store(true, Ordering::SeqCst);
    let _ = conn.shutdown(Shutdown::Both);
    let _ = reader.join();
    let _ = watcher.join();
    if let Some(e) = resume_error {
        return Err(MigrateError::Vcpu(e));
    }
    report.stats = engine.stats().clone();
    report.dirty_log_clears = vm.clear_calls() - clears_before;
    Ok(report)
}

/// Where a cancel and the postcopy switchover meet. A cancel shuts the
/// connection down (which also frees a write blocked on a stuck peer); the
/// switchover hands the guest to the destination, after which a shutdown
/// would leave the guest nowhere. One lock decides which came first.
struct CancelGate {
    conn: Connection,
    state: Mutex<GateState>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum GateState {
    /// Neither has happened.
    Open,
    /// The connection was shut down for a cancel.
    Shut,
    /// The switchover began: the connection must stay up.
    Committed,
}

impl CancelGate {
    fn new(conn: Connection) -> Self {
        CancelGate {
            conn,
            state: Mutex::new(GateState::Open),
        }
    }

    /// Carries out a cancel, unless the switchover began (it is refused
    /// then).
    fn shut(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if *state == GateState::Open {
            // Already shut down or gone: either way it is closed.
            let _ = self.conn.shutdown(Shutdown::Both);
            *state = GateState::Shut;
        }
    }

    /// Called just before the postcopy package is written: `true` if the
    /// switchover may go ahead (no cancel was asked for), after which
    /// every cancel is refused; `false` if a cancel came first (the
    /// connection is then shut down).
    fn commit(&self, cancel: &Cancel) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if *state == GateState::Open && cancel.is_cancelled() {
            let _ = self.conn.shutdown(Shutdown::Both);
            *state = GateState::Shut;
        }
        if *state == GateState::Open {
            *state = GateState::Committed;
        }
        *state == GateState::Committed
    }

    /// The precopy COMMIT was handed out: the engine refuses every cancel
    /// from now on, so no shutdown may cut the confirmation either (a
    /// cancel that already shut the connection stays carried out).
    fn hold(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if *state == GateState::Open {
            *state = GateState::Committed;
        }
    }
}

/// Carries out a cancel through `gate` when `cancel` is set, until `done`.
fn spawn_cancel_watcher(
    gate: Arc<CancelGate>,
    cancel: Cancel,
    done: Arc<AtomicBool>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        while !done.load(Ordering::SeqCst) {
            if cancel.is_cancelled() {
                gate.shut();
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
    })
}

/// Writes the vCPU's state as one device record; returns the bytes written.
fn save_devices(vcpu: &Vcpu, conn: &Connection) -> Result<u64, String> {
    let records = device_records(vcpu)?;
    conn.write_all(&records)
        .map_err(|e| format!("connection lost: {e}"))?;
    Ok(records.len() as u64)
}

/// The device state as `Device` records: the vCPU's registers.
fn device_records(vcpu: &Vcpu) -> Result<Vec<u8>, String> {
    let blob = vcpu
        .save_state()
        .map_err(|e| format!("saving the vCPU state failed: {e}"))?;
    let id = DeviceId::new(CPU_DEVICE_ID).map_err(|e| format!("device id: {e}"))?;
    let mut records = vec![0u8; 64];
    let n = wire::encode_device_header(&mut records, id, 0, CPU_STATE_VERSION, blob.len())
        .map_err(|e| format!("device header: {e}"))?;
    records.truncate(n);
    records.extend_from_slice(&blob);
    Ok(records)
}

/// The postcopy switchover: the device records inside the package that
/// carries the listen and run commands.
fn package_devices(
    engine: &mut SourceEngine<'_>,
    vcpu: &Vcpu,
    conn: &Connection,
) -> Result<(), String> {
    let records = device_records(vcpu)?;
    let framing = engine
        .package_devices(clock::now(), records.len())
        .map_err(|e| format!("migration engine: {e}"))?;
    conn.write_vectored_all(&mut [
        IoSlice::new(framing.head),
        IoSlice::new(&records),
        IoSlice::new(framing.tail),
    ])
    .map_err(|e| format!("connection lost: {e}"))?;
    engine
        .handle_package_sent(clock::now())
        .map_err(|e| format!("migration engine: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{Listener, MigrationUri};

    /// A connected pair over a Unix socket: (this end, the peer's end).
    fn pair(tag: &str) -> (Connection, Connection) {
        let path =
            std::env::temp_dir().join(format!("livemig-gate-{tag}-{}.sock", std::process::id()));
        let uri = MigrationUri::Unix(path);
        let listener = Listener::bind(&uri).unwrap();
        let ours = Connection::connect(&uri).unwrap();
        (ours, listener.accept().unwrap())
    }

    /// Issue 8 item 9: what the source says about bad return-path bytes.
    #[test]
    fn return_path_errors_name_the_real_cause() {
        let words = |bytes: &[u8]| {
            let mut rp = RpDecoder::new(4096).unwrap();
            match rp.decode(bytes) {
                Err(e) => rp_error_words("tcp:d:1", &e),
                Ok(_) => rp_closed_words("tcp:d:1", &rp),
            }
        };
        assert!(words(b"HTTP/1.1 400").contains("is not a livemig destination"));
        // Well framed, invalid content: a RESUME_ACK of 2, a misaligned
        // page request.
        let w = words(&[0, 6, 0, 4, 0, 0, 0, 2]);
        assert!(w.contains("sent an invalid return-path message"), "{w}");
        assert!(w.contains("RESUME_ACK value 2"), "{w}");
        let w = words(&[0, 4, 0, 12, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0x10, 0]);
        assert!(w.contains("sent an invalid return-path message"), "{w}");
        assert!(w.contains("misaligned page request"), "{w}");
        assert!(!w.contains("not a livemig"), "{w}");
        // Cut off: the close came in the middle of a PONG.
        let w = words(&[0, 2, 0, 4, 0]);
        assert!(
            w.contains("closed the connection in the middle of a message"),
            "{w}"
        );
        assert!(w.contains("PONG"), "{w}");
        assert_eq!(
            words(&[]),
            "connection to tcp:d:1 closed by the destination"
        );
    }

    #[test]
    fn a_cancel_before_the_switchover_wins_and_shuts_the_connection() {
        let (ours, peer) = pair("before");
        let gate = CancelGate::new(ours.try_clone().unwrap());
        let cancel = Cancel::new();
        // Asked for, not yet carried out by the watcher: the switchover
        // must not go ahead, and the connection is shut at once.
        cancel.cancel();
        assert!(!gate.commit(&cancel));
        assert_eq!(peer.read(&mut [0u8; 8]).unwrap(), 0);
        // The watcher arriving late changes nothing.
        gate.shut();
        assert!(!gate.commit(&cancel));
    }

    #[test]
    fn a_cancel_after_the_switchover_leaves_the_connection_up() {
        let (ours, peer) = pair("after");
        let gate = CancelGate::new(ours.try_clone().unwrap());
        let cancel = Cancel::new();
        assert!(gate.commit(&cancel));
        cancel.cancel();
        gate.shut();
        // Still connected both ways: the rest of postcopy can flow.
        ours.write_all(b"pages").unwrap();
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pages");
        peer.write_all(b"req").unwrap();
        ours.read_exact(&mut got[..3]).unwrap();
        assert!(gate.commit(&cancel));
    }
}
