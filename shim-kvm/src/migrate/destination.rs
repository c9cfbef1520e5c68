//! The destination side: loads an incoming stream into a fresh KVM guest
//! and starts it.
//!
//! The connection is read into a buffer and handed to a
//! [`DestinationEngine`], which validates everything before it touches guest
//! memory and calls back into [`KvmHost`] to place pages and load the vCPU
//! state; the return-path bytes it queues (the final SHUT) go back on the
//! same connection. Once the stream is complete, [`start_guest`] resumes
//! the vCPU and watches the guest run on.

use std::time::Duration;

use livemig_core::destination::{DestError, DestinationEngine, DestinationHost, HostError};
use livemig_core::state::MigrationStatus;
use livemig_core::stats::MigrationStats;
use livemig_core::wire::{self, DecodeError, DeviceState};

use super::{CPU_DEVICE_ID, CPU_STATE_VERSION, MigrateError, ram_layout};
use crate::clock;
use crate::memory::{GuestRam, PAGE_SIZE};
use crate::transport::Connection;
use crate::vcpu::Vcpu;
use crate::vm::Vm;

const ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// What the destination loaded.
#[derive(Debug, Clone)]
pub struct DestinationReport {
    /// The engine's final statistics.
    pub stats: MigrationStats,
    /// Why the migration failed, in words for an operator (the engine's
    /// error mapped to the cause: size mismatch, not a livemig peer...).
    pub error: Option<String>,
    /// Digest of guest memory once the stream was loaded, before the vCPU
    /// ran (compare with the source's digest at its stop).
    pub digest: Option<u64>,
    /// `CLOCK_MONOTONIC` nanoseconds when the stream was fully loaded.
    pub loaded_ns: Option<u64>,
    /// Milliseconds spent computing `digest` (part of the downtime).
    pub digest_ms: f64,
}

/// Guest RAM and the vCPU as the engine writes them.
pub struct KvmHost<'a> {
    ram: &'a GuestRam,
    vcpu: &'a Vcpu,
    /// Pages written during this migration and not zeroed since: fresh
    /// memory reads as zero, so only these need zeroing for a zero page.
    placed: Vec<u64>,
    /// The last host failure, in full (HostError carries a static text).
    error: Option<String>,
}

impl<'a> KvmHost<'a> {
    /// A host over fresh (all-zero) `ram` and a parked `vcpu`.
    pub fn new(ram: &'a GuestRam, vcpu: &'a Vcpu) -> Self {
        let pages = ram.size() / PAGE_SIZE as u64;
        KvmHost {
            ram,
            vcpu,
            placed: vec![0; pages.div_ceil(64) as usize],
            error: None,
        }
    }

    fn mark(&mut self, page: u64, placed: bool) {
        if let Some(w) = self.placed.get_mut((page / 64) as usize) {
            let bit = 1u64 << (page % 64);
            if placed {
                *w |= bit;
            } else {
                *w &= !bit;
            }
        }
    }

    fn is_placed(&self, page: u64) -> bool {
        self.placed
            .get((page / 64) as usize)
            .is_some_and(|w| w >> (page % 64) & 1 == 1)
    }

    /// Guest page numbers written during the load and not zeroed since:
    /// every other page of the fresh RAM is still zero.
    pub fn placed_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.placed.iter().enumerate().flat_map(|(w, &bits)| {
            (0..64u64)
                .filter(move |b| bits >> b & 1 == 1)
                .map(move |b| w as u64 * 64 + b)
        })
    }

    fn ram_error(&mut self, e: impl std::fmt::Display) -> HostError {
        self.error = Some(format!("writing guest RAM: {e}"));
        HostError {
            what: "guest RAM write",
            code: 0,
        }
    }
}

impl DestinationHost for KvmHost<'_> {
    fn place_pages(&mut self, _block: u16, first_page: u64, data: &[u8]) -> Result<(), HostError> {
        let page = PAGE_SIZE as u64;
        for (i, chunk) in data.chunks(PAGE_SIZE).enumerate() {
            let p = first_page + i as u64;
            if let Err(e) = self.ram.write(p * page, chunk) {
                return Err(self.ram_error(e));
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
    ) -> Result<(), HostError> {
        for p in first_page..first_page.saturating_add(count) {
            if self.is_placed(p) {
                if let Err(e) = self.ram.write(p * PAGE_SIZE as u64, &ZERO_PAGE) {
                    return Err(self.ram_error(e));
                }
                self.mark(p, false);
            }
        }
        Ok(())
    }

    fn load_device(&mut self, device: &DeviceState<'_>) -> Result<(), HostError> {
        if device.id.as_str() != CPU_DEVICE_ID || device.instance != 0 {
            self.error = Some(format!(
                "unknown device '{}' instance {} in the stream",
                device.id.as_str(),
                device.instance
            ));
            return Err(HostError {
                what: "unknown device",
                code: 0,
            });
        }
        if device.version != CPU_STATE_VERSION {
            self.error = Some(format!(
                "vCPU state version {} is not supported (this side loads version {CPU_STATE_VERSION})",
                device.version
            ));
            return Err(HostError {
                what: "vCPU state version",
                code: 0,
            });
        }
        self.vcpu.load_state(device.data).map_err(|e| {
            self.error = Some(format!("loading the vCPU state failed: {e}"));
            HostError {
                what: "vCPU state",
                code: 0,
            }
        })
    }
}

/// An engine error in an operator's words.
pub fn describe(err: &DestError, peer: &str, host_error: Option<&str>) -> String {
    const MIB: u64 = 1 << 20;
    match err {
        DestError::BlockLengthMismatch {
            source,
            destination,
            ..
        } => format!(
            "RAM size mismatch: the source has {} MiB, this destination {} MiB",
            source / MIB,
            destination / MIB
        ),
        DestError::Decode(DecodeError::BadMagic { .. }) => format!(
            "the peer {peer} is not a livemig source: its stream does not start with the livemig header"
        ),
        DestError::Decode(DecodeError::UnsupportedVersion { found, supported }) => format!(
            "livemig version mismatch: the source speaks stream version {found}, this destination {supported}"
        ),
        DestError::Host(_) => match host_error {
            Some(e) => format!("the destination failed: {e}"),
            None => err.to_string(),
        },
        DestError::UnexpectedEof(_) => format!("connection from {peer} lost: {err}"),
        _ => err.to_string(),
    }
}

/// Loads the stream arriving on `conn` into `vm` and its parked `vcpu`.
/// The vCPU is left parked: start it with [`start_guest`].
///
/// Returns the report of a migration that ran, whatever its outcome; `Err`
/// means it could not even be set up.
pub fn receive(
    vm: &Vm,
    vcpu: &Vcpu,
    conn: &Connection,
    progress: &mut dyn FnMut(&MigrationStats),
) -> Result<DestinationReport, MigrateError> {
    let layout = [ram_layout(vm.ram()).map_err(MigrateError::Layout)?];
    let mut scratch = vec![0u8; wire::MAX_RECORD_BODY + wire::RECORD_HEADER_LEN];
    let mut engine = DestinationEngine::new(&layout, &mut scratch);
    let mut host = KvmHost::new(vm.ram(), vcpu);
    let mut buf = vec![0u8; 1 << 20];
    let mut out = vec![0u8; 4096];
    let mut error = None;
    let mut last_progress = 0;
    loop {
        let now = clock::now();
        let mut eof = false;
        let result = match conn.read(&mut buf) {
            Ok(0) => {
                eof = true;
                engine.handle_eof(now)
            }
            Ok(n) => engine.handle_input(now, &buf[..n], &mut host).map(|_| ()),
            Err(e) => {
                eof = true;
                error = Some(format!("connection lost: {e}"));
                engine.handle_eof(now)
            }
        };
        if let Err(e) = result {
            if error.is_none() && e != DestError::AlreadyFailed {
                error = Some(describe(&e, conn.peer(), host.error.as_deref()));
            }
        }
        loop {
            let n = engine.poll_return_path(&mut out);
            if n == 0 {
                break;
            }
            if let Err(e) = conn.write_all(&out[..n]) {
                error.get_or_insert_with(|| format!("return path lost: {e}"));
                break;
            }
        }
        if clock::monotonic_ns() - last_progress > 50_000_000 {
            last_progress = clock::monotonic_ns();
            progress(engine.stats());
        }
        if eof || engine.is_completed() || engine.state() == MigrationStatus::Failed {
            break;
        }
    }
    let mut report = DestinationReport {
        stats: engine.stats().clone(),
        error: None,
        digest: None,
        loaded_ns: None,
        digest_ms: 0.0,
    };
    if engine.is_completed() {
        let loaded = clock::monotonic_ns();
        report.loaded_ns = Some(loaded);
        // Only pages written during the load can be non-zero: the rest of
        // the fresh RAM was never touched, so this equals the full digest.
        report.digest = Some(
            vm.ram()
                .digest_of(host.placed_pages())
                .map_err(|e| MigrateError::Engine(format!("digest: {e}")))?,
        );
        report.digest_ms = (clock::monotonic_ns() - loaded) as f64 / 1e6;
    } else {
        report.error = Some(error.unwrap_or_else(|| {
            let desc = engine.stats().error_desc.as_str();
            if desc.is_empty() {
                "the migration failed".to_string()
            } else {
                desc.to_string()
            }
        }));
    }
    progress(&report.stats);
    Ok(report)
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
}

impl GuestAfter {
    /// The guest ran on (generations or idle progress) without reporting a
    /// mismatch and without its vCPU stopping.
    pub fn continued(&self, generation_at_stop: Option<u64>) -> bool {
        guest_continued(
            generation_at_stop,
            self.generation,
            self.progress_exits,
            self.mismatches.is_empty() && self.stopped.is_none(),
        )
    }
}

/// The verdict on a guest after the switchover: it got past the
/// generation it had reached at the stop (an idle guest, which has no
/// generations, made progress exits), and it was `healthy` (no mismatch,
/// vCPU still running).
pub fn guest_continued(
    generation_at_stop: Option<u64>,
    generation: u64,
    progress_exits: u64,
    healthy: bool,
) -> bool {
    let ran = match generation_at_stop {
        Some(g) if g > 0 => generation > g,
        _ => progress_exits > 0,
    };
    ran && healthy
}

/// Resumes the vCPU and lets the guest run for `run_for`.
pub fn start_guest(vcpu: &Vcpu, run_for: Duration) -> Result<GuestAfter, MigrateError> {
    let started_ns = clock::monotonic_ns();
    vcpu.resume().map_err(MigrateError::Vcpu)?;
    std::thread::sleep(run_for);
    let s = vcpu.stats();
    Ok(GuestAfter {
        started_ns,
        generation: s.generation,
        progress_exits: s.progress_exits,
        mismatches: s.mismatches,
        stopped: vcpu
            .stopped()
            .map(|e| e.map_or("the guest halted".to_string(), |e| e.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_become_operator_sentences() {
        let e = DestError::BlockLengthMismatch {
            index: 0,
            source: 512 << 20,
            destination: 256 << 20,
        };
        assert_eq!(
            describe(&e, "tcp:x:1", None),
            "RAM size mismatch: the source has 512 MiB, this destination 256 MiB"
        );
        let e = DestError::Decode(DecodeError::BadMagic { found: *b"GET " });
        assert!(describe(&e, "tcp:x:1", None).contains("not a livemig source"));
        let e = DestError::Decode(DecodeError::UnsupportedVersion {
            found: 9,
            supported: 1,
        });
        assert!(describe(&e, "tcp:x:1", None).contains("version mismatch"));
        let e = DestError::Host(HostError {
            what: "vCPU state",
            code: 0,
        });
        assert!(describe(&e, "p", Some("loading the vCPU state failed: bad")).contains("bad"));
    }
}
