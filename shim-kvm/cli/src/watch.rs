//! What the demo VMM's guest shows at the stop and after the switchover:
//! the readings [`continuity`](crate::continuity) and `verified` are
//! decided from.
//!
//! The source reads [`GuestAtStop`] from its stopped guest (its vCPUs stay
//! paused after a completed migration, postcopy included); the destination
//! lets the guest run, pauses it, and reads [`GuestAfter`]: each vCPU's
//! stamp counter and reports, the timer ticks, the serial output since it
//! started, and every working-set page checked against the counters
//! ([`guest::check_stamps`]).

use std::fmt;
use std::time::Duration;

use crate::guest::{self, GuestError, StampCheck, WorkingSet};
use livemig_kvm::memory::MemoryError;

use crate::continuity::{GuestContinuity, serial_continued, vcpu_continued};
use crate::vmm::DemoVmm;
use crate::vmm::vcpus::{VcpuError, VcpuReport};

/// Why the guest could not be read.
#[derive(Debug)]
pub enum WatchError {
    /// A stamp counter could not be read (vCPU index).
    Stamps(u32, GuestError),
    /// The tick counter could not be read.
    Ticks(MemoryError),
    /// The working set could not be checked.
    Check(GuestError),
    /// Pausing, resuming or asking a vCPU failed.
    Vcpu(VcpuError),
}

impl fmt::Display for WatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WatchError::Stamps(v, e) => write!(f, "reading vCPU {v}'s stamp counter: {e}"),
            WatchError::Ticks(e) => write!(f, "reading the guest's tick counter: {e}"),
            WatchError::Check(e) => write!(f, "checking the working set's stamps: {e}"),
            WatchError::Vcpu(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for WatchError {}

/// Every vCPU's stamp counter, by index.
fn stamp_counters(vmm: &DemoVmm) -> Result<Vec<u64>, WatchError> {
    (0..vmm.vcpu_count())
        .map(|v| guest::stamped_by(vmm.guest_memory(), v).map_err(|e| WatchError::Stamps(v, e)))
        .collect()
}

/// The guest as the source's stopped VMM holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAtStop {
    /// Each vCPU's stamp counter.
    pub stamped: Vec<u64>,
    /// vCPU 0's timer ticks.
    pub ticks: u64,
    /// Everything the guest wrote to COM1 since it booted.
    pub serial: Vec<u8>,
}

impl GuestAtStop {
    /// Reads the stopped guest (its vCPUs paused; the serial output is
    /// taken, so this is read once).
    pub fn read(vmm: &DemoVmm) -> Result<GuestAtStop, WatchError> {
        Ok(GuestAtStop {
            stamped: stamp_counters(vmm)?,
            ticks: vmm.ticks().map_err(WatchError::Ticks)?,
            serial: vmm.serial().take_output(),
        })
    }
}

/// The guest on the destination at the end of its watch.
#[derive(Debug, Clone)]
pub struct GuestAfter {
    /// What each vCPU reported through its ports during the watch.
    pub vcpus: Vec<VcpuReport>,
    /// Each vCPU's stamp counter at the end of the watch.
    pub stamped: Vec<u64>,
    /// vCPU 0's timer ticks at the end of the watch.
    pub ticks: u64,
    /// What the guest wrote to COM1 on this host.
    pub serial: Vec<u8>,
    /// Why a vCPU stopped, if one did.
    pub stopped: Option<String>,
    /// The working set checked against the counters, with the vCPUs paused.
    pub stamps: StampCheck,
    /// The working set, as the guest's parameter block says.
    pub working_set: WorkingSet,
}

impl GuestAfter {
    /// Lets the running guest run for `run_for`, pauses it, reads it and
    /// (unless a vCPU stopped) resumes it.
    pub fn watch(vmm: &DemoVmm, run_for: Duration) -> Result<GuestAfter, WatchError> {
        Ok(GuestAfter::watch_then(vmm, run_for, || ())?.0)
    }

    /// [`GuestAfter::watch`], calling `paused` too while the guest is
    /// paused (after it was read).
    pub fn watch_then<T>(
        vmm: &DemoVmm,
        run_for: Duration,
        paused: impl FnOnce() -> T,
    ) -> Result<(GuestAfter, T), WatchError> {
        std::thread::sleep(run_for);
        let stopped = vmm.vcpus().stopped();
        if stopped.is_none() {
            vmm.vcpus().pause().map_err(WatchError::Vcpu)?;
        }
        let after = GuestAfter::read(vmm, stopped.map(|e| e.to_string()))?;
        let t = paused();
        if after.stopped.is_none() {
            vmm.vcpus().resume().map_err(WatchError::Vcpu)?;
        }
        Ok((after, t))
    }

    /// Reads the paused guest (`stopped`: why a vCPU stopped, if one did).
    pub fn read(vmm: &DemoVmm, stopped: Option<String>) -> Result<GuestAfter, WatchError> {
        let vcpus = (0..vmm.vcpu_count() as usize)
            .map(|i| vmm.vcpus().report(i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(WatchError::Vcpu)?;
        Ok(GuestAfter {
            vcpus,
            stamped: stamp_counters(vmm)?,
            ticks: vmm.ticks().map_err(WatchError::Ticks)?,
            serial: vmm.serial().take_output(),
            stopped,
            stamps: guest::check_stamps(vmm.guest_memory()).map_err(WatchError::Check)?,
            working_set: guest::working_set(vmm.guest_memory()).map_err(WatchError::Check)?,
        })
    }

    /// Whether vCPU `index` owns pages of the working set (one that owns
    /// none stamps nothing: its progress exits show it runs).
    pub fn owns_pages(&self, index: usize) -> bool {
        guest::owned_pages(self.working_set.pages, self.working_set.vcpus, index as u32) > 0
    }

    /// No vCPU stopped or reported a mismatch, and every page holds the
    /// stamp its counter implies.
    pub fn healthy(&self) -> bool {
        self.stopped.is_none()
            && self.vcpus.iter().all(|v| v.mismatches.is_empty())
            && self.stamps.ok()
    }

    /// How the guest went on from `at_stop`.
    pub fn continuity(&self, at_stop: &GuestAtStop) -> GuestContinuity {
        GuestContinuity {
            vcpus: self.stamped.len() as u32,
            vcpus_continued: (0..self.stamped.len())
                .filter(|&i| {
                    let owns = guest::owned_pages(
                        self.working_set.pages,
                        self.working_set.vcpus,
                        i as u32,
                    ) > 0;
                    vcpu_continued(
                        at_stop.stamped.get(i).copied().unwrap_or(u64::MAX),
                        self.stamped[i],
                        owns,
                        self.vcpus.get(i).map_or(0, |r| r.progress_exits),
                    )
                })
                .count() as u32,
            ticks_at_stop: at_stop.ticks,
            ticks_after: self.ticks,
            serial_continued: serial_continued(&at_stop.serial, &self.serial),
        }
    }

    /// The guest continued: healthy, and every vCPU, the timer and the
    /// serial sequence moved on from `at_stop`.
    pub fn continued(&self, at_stop: &GuestAtStop) -> bool {
        self.healthy()
            && at_stop.stamped.len() == self.stamped.len()
            && self.continuity(at_stop).ok()
    }
}
