//! The source driver: one method per [`SourceAction`], carried out against
//! the KVM guest, the connection and the return path.
//!
//! Read it beside the simulator's reference loop, `livemig_sim::harness`
//! `run_migration`: both poll the engine, carry out each action, tell the
//! engine how it went and poll again. The simulator does it against
//! simulated RAM, a simulated dirty log and a simulated link in virtual
//! time; this driver against KVM's dirty log, guest RAM mapped in this
//! process and a socket, in real time, with the return path read on a
//! second thread.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use livemig_core::capabilities::Capabilities;
use livemig_core::clear_map::Chunk;
use livemig_core::return_path::{RpDecoder, RpMessage};
use livemig_core::source::{POSTCOPY_RUN_PING, SourceAction, SourceEngine};
use livemig_core::stats::MigrationStats;
use livemig_core::status::MigrationStatus;

use super::super::handle::{CancelRefused, MigrationEvent, Shared};
use super::super::recovery::{self, Attempt};
use super::channels::{ChannelKind, ChannelLost, ChannelSenders};
use super::dirty_log::{DirtyLog, KvmPages};
use super::failure::SourceFailure;
use super::gate::CancelGate;
use super::guest::SourceGuest;
use super::return_path::{RpEvent, Served, Server, Serving};
use super::{HEAR_OUT, MAX_BURST, MAX_WAIT, RUN_ACK_WAIT, SourceOptions, SourceReport};
use crate::clock;
use crate::memory::{GuestMemory, PageIovecs};
use crate::migrate::MigrateError;
use crate::priority::StopThreads;
use crate::transport::{Connection, MigrationUri, TransportError};
use crate::vmm::VmmError;

/// Most main-stream bytes held back to share one write: records without
/// page data (zero-page batches, commands) are small, 2 KiB for a batch of
/// 256 zero pages, and one `sendmsg` each made the system calls, not the
/// bytes, the cost of a sparse guest's first pass (an idle 4 GiB guest:
/// 4096 writes, each also followed by the two calls of a link report).
const HOLD_BYTES: usize = 64 << 10;

/// The connection as the page-sending actions use it. Kept apart from the
/// driver's other parts because those actions borrow the engine's buffers
/// while they write.
///
/// Small main-stream records are held back (at most [`HOLD_BYTES`]) and go
/// out with the next write that carries pages, or at a [`flush`]
/// (Link::flush): the driver flushes before every action that is not a
/// main-stream send and whenever it stops to wait, so nothing the
/// destination must answer stays held.
pub(super) struct Link {
    pub(super) conn: Connection,
    /// With multifd: the channels' sender threads.
    pub(super) channels: Option<ChannelSenders>,
    /// With postcopy-preempt: the preempt channel, written by the
    /// migration thread (see [`Link::send_preempt_pages`]) and, for the
    /// requests it serves itself, by the return-path reader.
    pub(super) preempt: Option<Connection>,
    /// The preempt channel's write lock, and the reader's serving.
    pub(super) server: Arc<Server>,
    /// The guest page numbers of the batch being sent (reused).
    pub(super) gfns: Vec<u64>,
    /// Stream bytes handed over by the engine and not yet written.
    pub(super) held: Vec<u8>,
    /// Whether a write reached the socket since the last
    /// [`take_wrote`](Link::take_wrote).
    pub(super) wrote: bool,
}

impl Link {
    /// [`SourceAction::Send`]: stream bytes the engine encoded, held back
    /// while they fit [`HOLD_BYTES`], else written with what was held.
    fn send(&mut self, bytes: &[u8]) -> Result<(), SourceFailure> {
        if self.held.len() + bytes.len() <= HOLD_BYTES {
            self.held.extend_from_slice(bytes);
            return Ok(());
        }
        self.wrote = true;
        let written = self
            .conn
            .write_vectored_all(&mut [IoSlice::new(&self.held), IoSlice::new(bytes)]);
        self.held.clear();
        written.map_err(SourceFailure::ConnectionLost)
    }

    /// [`SourceAction::SendPages`]: a record header and guest pages, in one
    /// vectored write straight from guest RAM, after the bytes held; a
    /// batch of zero pages only (no page data) is held like any record.
    fn send_pages(
        &mut self,
        ram: &GuestMemory,
        block: u16,
        header: &[u8],
        pages: &[u64],
    ) -> Result<(), SourceFailure> {
        if pages.is_empty() {
            return self.send(header);
        }
        self.set_gfns(ram, block, pages)?;
        self.held.extend_from_slice(header);
        self.wrote = true;
        let written = PageIovecs::new(ram, &self.held, &self.gfns)
            .map_err(TransportError::from)
            .and_then(|p| self.conn.write_page_iovecs(p));
        self.held.clear();
        written.map_err(SourceFailure::ConnectionLost)
    }

    /// Writes the bytes held back, if any.
    pub(super) fn flush(&mut self) -> Result<(), SourceFailure> {
        if self.held.is_empty() {
            return Ok(());
        }
        self.wrote = true;
        let written = self.conn.write_all(&self.held);
        self.held.clear();
        written.map_err(SourceFailure::ConnectionLost)
    }

    /// Whether a write reached the socket since the last call.
    fn take_wrote(&mut self) -> bool {
        std::mem::take(&mut self.wrote)
    }

    /// The engine numbers pages within the block (= region); the gather
    /// wants guest page numbers.
    fn set_gfns(
        &mut self,
        ram: &GuestMemory,
        block: u16,
        pages: &[u64],
    ) -> Result<(), SourceFailure> {
        let first = ram
            .region(usize::from(block))
            .map_err(|e| SourceFailure::ConnectionLost(TransportError::from(e)))?
            .guest_phys()
            / crate::memory::PAGE_SIZE as u64;
        self.gfns.clear();
        self.gfns.extend(pages.iter().map(|&p| first + p));
        Ok(())
    }

    /// The multifd channels (the engine hands out channel actions only
    /// with multifd on, and the migration starts only with its channels).
    fn channels(&self, channel: u16) -> Result<&ChannelSenders, SourceFailure> {
        self.channels
            .as_ref()
            .ok_or(SourceFailure::ChannelLost(ChannelLost {
                kind: ChannelKind::Multifd,
                channel,
                error: None,
            }))
    }

    /// The preempt channel (the engine hands out preempt actions only with
    /// postcopy-preempt on, and the migration starts only with it).
    fn preempt(&self) -> Result<&Connection, SourceFailure> {
        self.preempt.as_ref().ok_or(preempt_lost(None))
    }

    /// [`SourceAction::SendPreempt`]: the preempt channel's hello.
    fn send_preempt(&self, bytes: &[u8]) -> Result<(), SourceFailure> {
        let _lock = self.server.lock();
        self.preempt()?
            .write_all(bytes)
            .map_err(|e| preempt_lost(Some(e)))
    }

    /// [`SourceAction::SendPreemptPages`]: requested pages, written at once
    /// straight from guest RAM. The channel carries nothing else, so its
    /// socket is as good as empty and the write does not wait; a sender
    /// thread would put one more wake-up on every request's path
    /// (measured: 65 us median, milliseconds under load).
    fn send_preempt_pages(
        &mut self,
        ram: &GuestMemory,
        block: u16,
        header: &[u8],
        pages: &[u64],
    ) -> Result<(), SourceFailure> {
        self.set_gfns(ram, block, pages)?;
        let conn = self.preempt()?;
        let _lock = self.server.lock();
        PageIovecs::new(ram, header, &self.gfns)
            .map_err(TransportError::from)
            .and_then(|p| conn.write_page_iovecs(p))
            .map_err(|e| preempt_lost(Some(e)))
    }

    /// The first failure a multifd sender thread reported.
    fn lost_channel(&self) -> Option<ChannelLost> {
        self.channels.as_ref().and_then(ChannelSenders::failure)
    }

    /// [`SourceAction::SendChannel`]: a hello or SYNC packet, queued for
    /// the channel's sender thread.
    fn send_channel(&self, channel: u16, bytes: &[u8]) -> Result<(), SourceFailure> {
        self.channels(channel)?
            .send(channel, bytes)
            .map_err(SourceFailure::ChannelLost)
    }

    /// [`SourceAction::SendChannelPages`]: a packet header and guest pages,
    /// queued for the channel's sender thread, which writes them straight
    /// from guest RAM.
    fn send_channel_pages(
        &mut self,
        ram: &GuestMemory,
        channel: u16,
        block: u16,
        header: &[u8],
        pages: &[u64],
    ) -> Result<(), SourceFailure> {
        self.set_gfns(ram, block, pages)?;
        self.channels(channel)?
            .send_pages(channel, header, &self.gfns)
            .map_err(SourceFailure::ChannelLost)
    }
}

/// The preempt channel's failure: its write's error, or none when there
/// is no channel.
fn preempt_lost(error: Option<TransportError>) -> SourceFailure {
    SourceFailure::ChannelLost(ChannelLost {
        kind: ChannelKind::Preempt,
        channel: 0,
        error,
    })
}

/// A running source migration: the engine and everything its actions are
/// carried out on.
pub(super) struct SourceDriver<'e> {
    pub(super) engine: SourceEngine<'e>,
    pub(super) guest: SourceGuest,
    pub(super) link: Link,
    pub(super) log: DirtyLog,
    /// The return path's decoder and the reader thread's events.
    pub(super) rp: RpDecoder,
    pub(super) events: Receiver<RpEvent>,
    /// The reader thread of the current connection.
    pub(super) reader: Option<JoinHandle<()>>,
    /// What the reader did with each page request it read and the engine
    /// has not yet been given, in order: how it served it, or `None`.
    pub(super) served: VecDeque<Option<Served>>,
    /// This thread and the current reader, raised for the stop
    /// ([`SourceOptions::stop_priority`]) until the guest runs again on
    /// either host.
    pub(super) stop_threads: StopThreads,
    /// The reader thread sent its last event.
    pub(super) reader_done: bool,
    pub(super) peer: String,
    /// Where a paused postcopy connects again (`None`: nowhere known, so
    /// a pause can only be given up).
    pub(super) resume_to: Option<MigrationUri>,
    /// A recovery handshake is under way: its end (back in
    /// postcopy-active) is told to the handle.
    pub(super) recovering: bool,
    /// What the driver last saw break, told with the pause it caused.
    pub(super) paused_by: Option<String>,
    pub(super) gate: &'e CancelGate,
    /// The handle's side: the cancel request and the published statistics.
    pub(super) shared: &'e Shared,
    pub(super) options: SourceOptions,
    pub(super) report: SourceReport,
    /// A guest that could not be restarted after a failed migration is an
    /// error of its own, reported once everything is cleaned up.
    pub(super) resume_error: Option<VmmError>,
    /// When the engine entered pre-switchover (monotonic ns).
    pub(super) paused_at: Option<u64>,
    /// Stream bytes and pages sent when the last sync with the vCPUs
    /// stopped was done: the final pages are counted from there.
    pub(super) sent_at_sync: (u64, u64),
}

impl SourceDriver<'_> {
    /// Runs the migration to its end.
    pub(super) fn drive(&mut self) {
        'run: loop {
            self.check_cancel();
            while let Ok(ev) = self.events.try_recv() {
                self.on_return_path(ev);
            }
            let burst = clock::monotonic_ns();
            // Whether the engine ran out of actions (rather than the burst
            // running out of time): only then is there anything to wait
            // for.
            let mut idle = false;
            // The socket's figures change only with a write (or with time,
            // which the next burst's first report sees).
            let mut report_due = true;
            loop {
                // Only precopy decides on them; after the stop (or the
                // postcopy switchover) the two system calls per action
                // would be waste.
                if report_due
                    && matches!(
                        self.engine.status(),
                        MigrationStatus::Setup | MigrationStatus::Active
                    )
                {
                    self.report_link();
                }
                if let Some(lost) = self.link.lost_channel() {
                    self.connection_lost(SourceFailure::ChannelLost(lost));
                }
                self.await_main_room();
                let pages = KvmPages {
                    ram: self.guest.ram(),
                };
                let Some(action) = self.engine.poll_action(clock::now(), &pages) else {
                    idle = true;
                    break;
                };
                // Held records go out before anything else happens: a
                // channel's packet, a sync, the stop or the device state
                // may be what the destination waits on them for.
                let mut held = match action {
                    SourceAction::Send(_) | SourceAction::SendPages { .. } => None,
                    _ => self.link.flush().err(),
                };
                // A failed write is `lost`: the destination may say why on
                // the return path, heard before the write's reason stands.
                // (A failed flush is this action's failed write.)
                let lost = match action {
                    SourceAction::Finished(end) => {
                        self.finished(end.status());
                        break 'run;
                    }
                    SourceAction::Paused => {
                        self.pause();
                        continue 'run;
                    }
                    _ if held.is_some() => held.take(),
                    SourceAction::Send(bytes) => self.link.send(bytes).err(),
                    SourceAction::SendPages {
                        block,
                        header,
                        pages,
                        ..
                    } => self
                        .link
                        .send_pages(self.guest.ram(), block, header, pages)
                        .err(),
                    SourceAction::SendPreempt(bytes) => self.link.send_preempt(bytes).err(),
                    SourceAction::SendPreemptPages {
                        header,
                        block,
                        pages,
                    } => self
                        .link
                        .send_preempt_pages(self.guest.ram(), block, header, pages)
                        .err(),
                    SourceAction::SendChannel { channel, bytes } => {
                        self.link.send_channel(channel, bytes).err()
                    }
                    SourceAction::SendChannelPages {
                        channel,
                        header,
                        block,
                        pages,
                    } => self
                        .link
                        .send_channel_pages(self.guest.ram(), channel, block, header, pages)
                        .err(),
                    SourceAction::SyncDirtyLog => {
                        self.sync_dirty_log();
                        None
                    }
                    SourceAction::ClearDirtyLog { block, chunk } => {
                        self.clear_dirty_log(block, chunk);
                        None
                    }
                    SourceAction::SetThrottle { percent } => {
                        self.set_throttle(percent);
                        None
                    }
                    SourceAction::StopVcpus => {
                        self.stop_vcpus();
                        None
                    }
                    SourceAction::SaveSetupDevices => self.save_setup_devices().err(),
                    SourceAction::SaveDevices => self.save_devices().err(),
                    SourceAction::PackageDevices => self.package_devices().err(),
                    SourceAction::ResumeVcpus => {
                        self.resume_vcpus();
                        None
                    }
                };
                report_due = self.link.take_wrote();
                // A slice narrower than a burst gets its own sample.
                let now = clock::monotonic_ns();
                if self.report.timeline.wants_sample(now) {
                    self.report.timeline.sample(now, self.engine.stats());
                }
                self.note_recovered();
                self.arm_server();
                // From the commit on, as after the postcopy switchover, the
                // destination needs the connection to confirm: close the
                // gate to cancels (the COMMIT just handed to the socket is
                // delivered even if a cancel shut it down a moment before;
                // the end is then reported ambiguous, never resumed here).
                if self.engine.is_committed() {
                    self.gate.hold();
                }
                if let Some(failure) = lost {
                    self.connection_lost(failure);
                }
                // Page requests are served ahead of the background pass
                // only once the engine has them. (Precopy has nothing
                // urgent on the return path, and draining there measurably
                // slowed the first pass of an idle 4 GiB guest: 90 -> 140
                // ms.)
                while self.engine.status() == MigrationStatus::PostcopyActive
                    && let Ok(ev) = self.events.try_recv()
                {
                    self.on_return_path(ev);
                }
                if clock::monotonic_ns() - burst > MAX_BURST.as_nanos() as u64 {
                    break;
                }
            }
            // Nothing stays held while the thread looks elsewhere or waits.
            if let Err(failure) = self.link.flush() {
                self.connection_lost(failure);
            }
            self.publish();
            if self.engine.is_finished() {
                self.finished(self.engine.status());
                break;
            }
            // A burst that ran out of time has actions left: waiting here
            // for a return-path event (up to MAX_WAIT) would idle the link
            // and, after a switchover decision, let the running guest dirty
            // memory the stop then has to send.
            if !idle {
                continue;
            }
            let Some(wait) = self.wait_or_continue() else {
                continue;
            };
            if self.reader_done {
                thread::sleep(wait);
                continue;
            }
            match self.events.recv_timeout(wait) {
                Ok(ev) => {
                    self.on_return_path(ev);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => self.reader_done = true,
            }
        }
        self.publish();
    }

    /// Publishes the statistics to the handle and samples them into the
    /// timeline.
    fn publish(&mut self) {
        let stats = self.engine.stats();
        self.shared.publish(stats);
        self.report.timeline.sample(clock::monotonic_ns(), stats);
    }

    /// Carries out a cancel the handle asked for; after the switchover the
    /// engine refuses it, which the handle then tells.
    fn check_cancel(&mut self) {
        if !self.shared.cancel.is_cancelled() {
            return;
        }
        if let Err(e) = self.engine.cancel(clock::now()) {
            self.shared.refuse(CancelRefused::Source(e));
        }
    }

    /// Tells the engine what the socket knows: bytes written that the
    /// destination has not taken (a stop waits for them, and they are not
    /// yet bandwidth), and the round trip, which with the configured fixed
    /// part is the stop's cost. A socket that cannot say (it always can,
    /// short of a kernel without these calls) leaves the last figures in
    /// place.
    fn report_link(&mut self) {
        let conn = &self.link.conn;
        let on_channels = self
            .link
            .channels
            .as_ref()
            .map_or(0, ChannelSenders::unsent_bytes);
        let held = self.link.held.len() as u64;
        if let Ok(unsent) = conn.unsent_bytes() {
            self.engine
                .handle_unsent(clock::now(), unsent + on_channels + held);
        }
        if let Ok(rtt) = conn.round_trip() {
            self.engine
                .handle_stop_cost(self.options.stop_cost + 2 * rtt);
        }
    }

    /// Fails the migration for `failure`, keeping it in the report when it
    /// is what ended the migration.
    fn fail(&mut self, failure: SourceFailure) {
        self.paused_by.get_or_insert_with(|| failure.to_string());
        let was_finished = self.engine.is_finished();
        self.engine
            .handle_io_error(clock::now(), format_args!("{failure}"));
        if !was_finished && self.engine.status() == MigrationStatus::Failed {
            self.report.failure.get_or_insert(failure);
        }
    }

    /// [`SourceAction::SyncDirtyLog`]: fetches KVM's log of every block
    /// (without clearing it), merges the device's pages in and hands each
    /// to the engine.
    fn sync_dirty_log(&mut self) {
        let engine = &mut self.engine;
        let fed = self
            .log
            .sync(|block, words| {
                engine
                    .handle_dirty_log(block, words)
                    .map_err(SourceFailure::Engine)
            })
            .and_then(|()| {
                engine
                    .handle_sync_done(clock::now())
                    .map_err(SourceFailure::Engine)
            });
        if let Err(e) = fed {
            self.fail(e);
            return;
        }
        let now = clock::monotonic_ns();
        let stats = self.engine.stats();
        let stopped = self.report.stop.paused_ns.is_some();
        self.report.timeline.sync(now, stats.iterations, stopped);
        if stopped {
            self.report.stop.synced_ns = Some(now);
            self.sent_at_sync = (stats.ram.transferred, pages_sent(stats));
        }
    }

    /// [`SourceAction::ClearDirtyLog`]: re-protects `chunk` of `block`
    /// with KVM's fetched bits as the mask, before its pages are read.
    fn clear_dirty_log(&mut self, block: u16, chunk: Chunk) {
        if let Err(e) = self.log.clear(block, chunk) {
            self.fail(e);
        }
    }

    /// [`SourceAction::SetThrottle`]: holds the vCPUs back for `percent` %
    /// of their time (0: no limit).
    fn set_throttle(&mut self, percent: u8) {
        match self.guest.throttle(percent) {
            Ok(()) => self
                .report
                .timeline
                .throttle(clock::monotonic_ns(), percent),
            Err(e) => self.fail(SourceFailure::Throttle(e)),
        }
    }

    /// [`SourceAction::StopVcpus`]: pauses the vCPUs for the stop-and-copy.
    fn stop_vcpus(&mut self) {
        // The SwitchoverStart the engine just wrote goes out before the
        // stop, so the destination raises its threads while this one
        // pauses the vCPUs. A link that fails here fails the next write
        // too, in the stop, where the engine resumes the guest as after
        // any write that fails there.
        let _ = self.link.flush();
        self.report.stop.requested_ns = Some(clock::monotonic_ns());
        self.stop_threads.raise();
        // The vCPU threads only until they are parked.
        let vcpus = self.stop_threads.raise_also(&self.guest.vcpu_threads());
        let paused = self.guest.pause();
        drop(vcpus);
        self.report.stop.priority_refused = self.stop_threads.refused();
        match paused {
            Ok(()) => {
                let quiesced = self.guest.quiesce_devices();
                self.report.stop.paused_ns = Some(clock::monotonic_ns());
                if let Err(failure) = quiesced {
                    // The engine resumes the guest when it fails.
                    let _ = self.engine.handle_vcpus_stopped(clock::now());
                    self.fail(failure);
                    return;
                }
                if let Err(e) = self.engine.handle_vcpus_stopped(clock::now()) {
                    // The engine does not know the guest is stopped, so it
                    // would not restart it.
                    if let Err(e) = self.guest.resume() {
                        self.resume_error = Some(e);
                    }
                    self.fail(SourceFailure::Engine(e));
                }
            }
            Err(e) => self.fail(SourceFailure::StopVcpus(e)),
        }
    }

    /// [`SourceAction::SaveSetupDevices`]: the CPU model and the runstate,
    /// before any RAM; the engine then waits for the destination's verdict.
    fn save_setup_devices(&mut self) -> Result<(), SourceFailure> {
        let records = self.guest.setup_records()?;
        self.link
            .conn
            .write_all(&records)
            .map_err(SourceFailure::ConnectionLost)?;
        if let Err(e) = self
            .engine
            .handle_setup_devices_sent(clock::now(), records.len() as u64)
        {
            self.fail(SourceFailure::Engine(e));
        }
        Ok(())
    }

    /// [`SourceAction::SaveDevices`]: writes the stopped guest's state
    /// (vCPUs, VM-wide devices, the VMM's devices) as Device records.
    fn save_devices(&mut self) -> Result<(), SourceFailure> {
        let stop = &mut self.report.stop;
        stop.pages_sent_ns = Some(clock::monotonic_ns());
        let stats = self.engine.stats();
        let (bytes, pages) = self.sent_at_sync;
        stop.final_page_bytes = stats.ram.transferred.saturating_sub(bytes);
        stop.final_pages = pages_sent(stats).saturating_sub(pages);
        let records = self.guest.device_records()?;
        self.link
            .conn
            .write_all(&records)
            .map_err(SourceFailure::ConnectionLost)?;
        self.report.stop.devices_sent_ns = Some(clock::monotonic_ns());
        self.report.stop.device_bytes = records.len() as u64;
        if let Err(e) = self
            .engine
            .handle_devices_sent(clock::now(), records.len() as u64)
        {
            self.fail(SourceFailure::Engine(e));
        }
        Ok(())
    }

    /// [`SourceAction::PackageDevices`]: the postcopy switchover, the
    /// device records inside the package that carries the listen and run
    /// commands; then the wait for the destination to say it runs the guest.
    fn package_devices(&mut self) -> Result<(), SourceFailure> {
        // The last moment a cancel can be carried out: decided under the
        // gate's lock, so that no shutdown can follow the package (the
        // destination would start the guest, then lose its connection).
        if !self.gate.commit(&self.shared.cancel) {
            let _ = self.engine.cancel(clock::now());
            return Ok(());
        }
        self.report.postcopy = true;
        let records = self.guest.device_records()?;
        let framing = self
            .engine
            .package_devices(clock::now(), records.len())
            .map_err(SourceFailure::Engine)?;
        self.link
            .conn
            .write_vectored_all(&mut [
                IoSlice::new(framing.head),
                IoSlice::new(&records),
                IoSlice::new(framing.tail),
            ])
            .map_err(SourceFailure::ConnectionLost)?;
        self.engine
            .handle_package_sent(clock::now())
            .map_err(SourceFailure::Engine)?;
        self.report.package_sent_ns = Some(clock::monotonic_ns());
        if let Some(announce) = self.options.on_switchover {
            announce();
        }
        self.report.run_acked_ns = self.await_run_ack();
        // The guest runs on the destination: the stop is over.
        self.stop_threads.end();
        Ok(())
    }

    /// [`SourceAction::ResumeVcpus`]: the migration did not complete, the
    /// guest runs on here.
    fn resume_vcpus(&mut self) {
        self.stop_threads.end();
        if let Err(e) = self.guest.resume() {
            self.resume_error = Some(e);
        }
    }

    /// [`SourceAction::Finished`]: notes when a migration completed.
    fn finished(&mut self, status: MigrationStatus) {
        if status == MigrationStatus::Completed {
            self.report.stop.confirmed_ns = Some(clock::monotonic_ns());
        }
        self.stop_threads.end();
    }

    /// How long to wait for the return path before polling again; `None`
    /// when a pre-switchover pause has run out and the switchover was
    /// continued (poll at once).
    fn wait_or_continue(&mut self) -> Option<Duration> {
        let wait = self
            .engine
            .poll_timeout()
            .map_or(MAX_WAIT, |t| t.saturating_since(clock::now()).min(MAX_WAIT));
        if self.engine.status() != MigrationStatus::PreSwitchover {
            return Some(wait);
        }
        let since = *self.paused_at.get_or_insert_with(clock::monotonic_ns);
        let paused = Duration::from_nanos(clock::monotonic_ns() - since);
        match self.options.switchover_pause.checked_sub(paused) {
            Some(left) if !left.is_zero() => Some(wait.min(left)),
            _ => {
                if let Err(e) = self.engine.continue_switchover(clock::now()) {
                    self.fail(SourceFailure::Engine(e));
                }
                None
            }
        }
    }

    /// A write failed. A destination that refused the stream says why on
    /// the return path before it closes: hear it before blaming the broken
    /// connection. A plain end of the return path says nothing more than
    /// the failed write does, so the write's reason stands then.
    fn connection_lost(&mut self, failure: SourceFailure) {
        if self.shared.cancel.is_cancelled() {
            let _ = self.engine.cancel(clock::now());
        }
        let deadline = clock::monotonic_ns() + HEAR_OUT.as_nanos() as u64;
        while !self.reader_done {
            let left = deadline.saturating_sub(clock::monotonic_ns());
            match self.events.recv_timeout(Duration::from_nanos(left)) {
                Ok(RpEvent::Eof) => {
                    self.reader_done = true;
                    // Cut off mid-message says more than the write.
                    if self.rp.finish().is_err() {
                        self.on_return_path(RpEvent::Eof);
                    }
                }
                // Bytes, or perhaps the kernel's own verdict (a timeout on
                // a dead link), which then ends both ways.
                Ok(ev) => {
                    self.on_return_path(ev);
                }
                Err(_) => break,
            }
        }
        self.fail(failure);
    }

    /// Hands one return-path event to the engine. Returns when it was read
    /// if it carried the PONG to [`POSTCOPY_RUN_PING`].
    pub(super) fn on_return_path(&mut self, event: RpEvent) -> Option<u64> {
        self.reader_done |= event.is_last();
        let mut run_acked = None;
        let now = clock::now();
        if self.shared.cancel.is_cancelled() {
            // The connection broke because we shut it down: a cancel, not a
            // failure (refused, and the connection left alone, once the
            // guest runs on the destination).
            let _ = self.engine.cancel(now);
        }
        match event {
            RpEvent::Bytes(bytes, read_ns, served) => {
                self.served.extend(served);
                let mut input = &bytes[..];
                while !input.is_empty() {
                    match self.rp.decode(input) {
                        Ok((used, msg)) => {
                            if let Some(msg) = msg {
                                if msg == RpMessage::Pong(POSTCOPY_RUN_PING) {
                                    run_acked = Some(read_ns);
                                }
                                // The reader said what it did with each
                                // request, in the same order.
                                let served = match msg {
                                    RpMessage::ReqPages { .. } | RpMessage::ReqPagesId { .. } => {
                                        self.served.pop_front().flatten()
                                    }
                                    _ => None,
                                };
                                // Only a finished engine refuses input, and
                                // it has nothing left to learn from it.
                                let _ = match served {
                                    Some(s) => self
                                        .engine
                                        .handle_served_request(now, &msg, s.bytes, &s.terms),
                                    None => self.engine.handle_return_path(now, &msg),
                                };
                            }
                            input = input.get(used..).unwrap_or_default();
                        }
                        Err(error) => {
                            let peer = self.peer.clone();
                            self.fail(SourceFailure::ReturnPath { peer, error });
                            break;
                        }
                    }
                }
            }
            RpEvent::Eof => {
                let peer = self.peer.clone();
                match self.rp.finish() {
                    Err(error) => self.fail(SourceFailure::ReturnPath { peer, error }),
                    Ok(()) => {
                        let failure = SourceFailure::ReturnPathClosed { peer };
                        self.paused_by.get_or_insert_with(|| failure.to_string());
                        self.engine
                            .handle_peer_closed(clock::now(), format_args!("{failure}"));
                    }
                }
            }
            RpEvent::Error(e) => self.fail(SourceFailure::ConnectionLost(e)),
        }
        run_acked
    }

    /// After the postcopy switchover package: waits (at most
    /// [`RUN_ACK_WAIT`]) for the destination's PONG to the ping that
    /// follows it, handing every return-path event to the engine meanwhile,
    /// and returns when it was read. Nothing is sent meanwhile, so the
    /// destination answers as soon as it has run the guest instead of after
    /// the background pages that would otherwise follow the package.
    fn await_run_ack(&mut self) -> Option<u64> {
        let deadline = clock::monotonic_ns() + RUN_ACK_WAIT.as_nanos() as u64;
        while !self.reader_done && !self.engine.is_finished() {
            let left = deadline.saturating_sub(clock::monotonic_ns());
            let ev = self.events.recv_timeout(Duration::from_nanos(left)).ok()?;
            if let Some(at) = self.on_return_path(ev) {
                return Some(at);
            }
        }
        None
    }
}

/// How often a paused source tells the handle it is still trying.
const AWAITING_EVERY: Duration = Duration::from_secs(5);

impl SourceDriver<'_> {
    /// Stops the current connection's return-path reader (shutting the
    /// connection down wakes it from its read) and waits for it.
    pub(super) fn end_return_path(&mut self) {
        let _ = self.link.conn.shutdown(Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    /// [`SourceAction::Paused`]: postcopy lost its connection with the
    /// guest on the destination. The stopped guest and the engine stay as
    /// they are; the old connection (and the preempt channel, which a
    /// resume replaces with a new one) are closed, and a new connection is
    /// sought at [`SourceDriver::resume_to`] until the recovery deadline.
    /// With one, the engine resumes (its handshake then runs in the
    /// driver's loop); without one in time, the engine gives up and says
    /// where the guest's pages are.
    fn pause(&mut self) {
        let reason = self
            .paused_by
            .take()
            .unwrap_or_else(|| "the connection went silent".into());
        self.shared.emit(MigrationEvent::PostcopyPaused { reason });
        self.recovering = false;
        self.link.held.clear();
        // Requests wait for the recovery, with the engine.
        *self.link.server.lock() = None;
        self.end_return_path();
        if let Some(preempt) = self.link.preempt.take() {
            let _ = preempt.shutdown(Shutdown::Both);
        }
        self.publish();
        let deadline = Instant::now() + self.options.recovery.timeout;
        let Some(to) = self.resume_to.clone() else {
            self.give_up("no address to reconnect to (the connection came from fd:)");
            return;
        };
        let mut told = None::<Instant>;
        loop {
            let conn = recovery::reconnect(&to, deadline, |attempt: &Attempt| {
                // A cancel is refused (the guest is on the destination),
                // and said so; the retries go on.
                self.check_cancel();
                if told.is_none_or(|t| t.elapsed() >= AWAITING_EVERY) {
                    told = Some(Instant::now());
                    self.shared.emit(MigrationEvent::AwaitingRecovery {
                        address: to.to_string(),
                        seconds_left: deadline.saturating_duration_since(Instant::now()).as_secs(),
                        last_error: Some(attempt.error.to_string()),
                    });
                }
                true
            });
            match conn
                .map_err(|a| (a.count, MigrateError::from(a.error)))
                .and_then(|c| self.resume(c, &to).map_err(|e| (0, e)))
            {
                Ok(()) => return,
                Err(_) if Instant::now() < deadline => {
                    thread::sleep(recovery::RECONNECT_EVERY);
                }
                Err((count, error)) => {
                    self.give_up(&format!(
                        "no new connection to {to} within {} s ({count} attempts, the last: {error})",
                        self.options.recovery.timeout.as_secs()
                    ));
                    return;
                }
            }
        }
    }

    /// A new connection for a paused postcopy: a new return-path reader
    /// and decoder on it, and the engine's recovery handshake. With
    /// postcopy-preempt a new preempt channel is connected to `to` right
    /// after it, under a fresh migration id (QEMU, too, sets its preempt
    /// channel up again on resume); if that connection fails, the recovery
    /// goes on without one and requested pages take the main stream.
    /// `Err`: the connection could not be set up, or its reader not
    /// started (the engine is still paused).
    fn resume(&mut self, conn: Connection, to: &MigrationUri) -> Result<(), MigrateError> {
        conn.set_write_timeout(self.options.write_timeout)?;
        let rp_conn = conn.try_clone()?;
        let reader = super::return_path::spawn_reader(rp_conn, Arc::clone(&self.link.server))
            .map_err(|error| MigrateError::Spawn {
                thread: "return-path reader",
                error,
            })?;
        self.peer = conn.peer().to_string();
        self.link.conn = conn;
        self.events = reader.events;
        self.reader = Some(reader.handle);
        // A stop priority raised now covers the new reader's thread.
        self.stop_threads.set_reader(reader.tid);
        self.reader_done = false;
        // The old reader's word on the old stream's requests is void.
        self.served.clear();
        if let Ok(rp) = RpDecoder::new(crate::memory::PAGE_SIZE as u32) {
            // The old decoder may hold half a message of the old stream.
            self.rp = rp;
        }
        let preempt = self
            .engine
            .config()
            .capabilities
            .contains(Capabilities::POSTCOPY_PREEMPT)
            .then(|| self.connect_preempt(to))
            .and_then(|connected| {
                connected
                    .map_err(|e| {
                        self.shared.emit(MigrationEvent::PreemptNotReopened {
                            reason: e.to_string(),
                        })
                    })
                    .ok()
            });
        let resumed = match preempt {
            Some(preempt) => {
                self.link.preempt = Some(preempt);
                self.engine
                    .resume_with_preempt(clock::now(), super::migration_id())
            }
            None => self.engine.resume(clock::now()),
        };
        match resumed {
            Ok(()) => {
                self.recovering = true;
                self.shared.emit(MigrationEvent::RecoveryStarted {
                    peer: self.peer.clone(),
                });
            }
            Err(e) => self.fail(SourceFailure::Engine(e)),
        }
        Ok(())
    }

    /// A new preempt channel's connection to `to`, with the main one's
    /// write timeout.
    fn connect_preempt(&self, to: &MigrationUri) -> Result<Connection, TransportError> {
        let conn = Connection::connect(to)?;
        conn.set_write_timeout(self.options.write_timeout)?;
        Ok(conn)
    }

    /// The recovery deadline passed (or there is nowhere to reconnect):
    /// the engine fails the migration and its error says where the
    /// guest's pages are, which the handle hears too.
    fn give_up(&mut self, why: &str) {
        if let Err(e) = self.engine.give_up(clock::now()) {
            self.fail(SourceFailure::Engine(e));
        }
        self.shared.emit(MigrationEvent::RecoveryAbandoned {
            reason: why.to_string(),
            pages: self.engine.stats().error_desc.as_str().to_string(),
        });
    }

    /// Lets the return-path reader serve page requests itself while
    /// postcopy is active with the preempt channel (see
    /// [`return_path`](super::return_path)), and stops it otherwise.
    fn arm_server(&mut self) {
        let active = self.engine.status() == MigrationStatus::PostcopyActive;
        let mut serving = self.link.server.lock();
        match (&self.link.preempt, serving.is_some()) {
            (Some(preempt), false) if active => {
                // A channel that cannot be duplicated leaves the requests
                // to the engine.
                if let Ok(conn) = preempt.try_clone() {
                    *serving = Some(Serving {
                        conn,
                        key: self.engine.page_term_key(),
                        zero_detection: self
                            .engine
                            .config()
                            .capabilities
                            .contains(Capabilities::ZERO_PAGE_DETECTION),
                    });
                }
            }
            (_, true) if !active => *serving = None,
            _ => {}
        }
    }

    /// Tells the handle once a recovery handshake has brought the engine
    /// back to postcopy-active.
    fn note_recovered(&mut self) {
        if self.recovering && self.engine.status() == MigrationStatus::PostcopyActive {
            self.recovering = false;
            self.shared.emit(MigrationEvent::Recovered {
                recoveries: self.engine.stats().postcopy_recoveries,
            });
        }
    }
}

/// Pages sent so far, zero or normal.
fn pages_sent(stats: &MigrationStats) -> u64 {
    stats.ram.duplicate.saturating_add(stats.ram.normal)
}
