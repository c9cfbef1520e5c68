//! `livemig run`: the demo guest in the demo VMM ([`crate::vmm`]) on
//! `--vcpus` vCPUs, without a migration: boot it, let it run, pause it and
//! report what each vCPU stamped, the timer ticks it counted and the serial
//! lines it wrote, with a verdict. (Migrating this VMM comes with the
//! library's VMM-facing `migrate`; `demo`, `send` and `receive` still run
//! their own one-vCPU VM.)

use std::fmt;
use std::time::{Duration, Instant};

use crate::guest::{self, GuestParams};
use livemig_kvm::memory::PAGE_SIZE;
use serde_json::{Value, json};

use crate::continuity::serial_sequence;
use crate::vmm::vcpus::VcpuError;
use crate::vmm::{BootError, DemoVmm};

const MIB: u64 = 1 << 20;

/// What `livemig run` boots and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOptions {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Working set in MiB, at 2 MiB (0: an idle guest).
    pub dirty_mib: u64,
    /// How long the guest runs.
    pub run: Duration,
}

/// Why `livemig run` could not run the guest.
#[derive(Debug)]
pub enum RunError {
    /// The working set has more pages than the guest can count (its MiB).
    WorkingSet(u64),
    /// Building the VMM or booting the guest failed.
    Boot(BootError),
    /// Running, pausing or reading the guest failed.
    Vcpu(VcpuError),
    /// Reading a counter from guest memory failed.
    Memory(livemig_kvm::memory::MemoryError),
    /// Reading a stamp counter failed.
    Stamps(crate::guest::GuestError),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::WorkingSet(ws) => write!(f, "a {ws} MiB working set is too large"),
            RunError::Boot(e) => write!(f, "{e}"),
            RunError::Vcpu(e) => write!(f, "{e}"),
            RunError::Memory(e) => write!(f, "reading the guest's counters: {e}"),
            RunError::Stamps(e) => write!(f, "reading the guest's stamp counters: {e}"),
        }
    }
}

impl std::error::Error for RunError {}

/// One vCPU's part of a [`RunReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuRun {
    /// Pages it stamped (its counter in guest memory).
    pub stamped: u64,
    /// Generations of its pages it completed.
    pub generation: u64,
    /// PROGRESS exits it made.
    pub progress_exits: u64,
    /// Pages it found with a wrong stamp.
    pub mismatches: usize,
}

/// What the guest did in a `livemig run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// Milliseconds from resume to pause.
    pub ran_ms: u64,
    /// Per vCPU, by index.
    pub vcpus: Vec<VcpuRun>,
    /// Timer ticks vCPU 0 counted.
    pub ticks: u64,
    /// Complete serial lines.
    pub serial_lines: u64,
    /// Whether they were `0, 1, 2, ...` without a gap.
    pub serial_in_sequence: bool,
    /// Why a vCPU stopped, if one did.
    pub stopped: Option<String>,
}

impl RunReport {
    /// Every vCPU made progress without a mismatch, none stopped, the
    /// timer ticked and the serial lines came in sequence.
    pub fn ok(&self) -> bool {
        self.stopped.is_none()
            && self
                .vcpus
                .iter()
                .all(|v| v.progress_exits > 0 && v.mismatches == 0)
            && self.ticks > 0
            && self.serial_lines > 0
            && self.serial_in_sequence
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "ok": self.ok(),
            "ran-ms": self.ran_ms,
            "vcpus": self.vcpus.iter().map(|v| json!({
                "stamped": v.stamped,
                "generation": v.generation,
                "progress-exits": v.progress_exits,
                "mismatches": v.mismatches,
            })).collect::<Vec<_>>(),
            "ticks": self.ticks,
            "serial-lines": self.serial_lines,
            "serial-in-sequence": self.serial_in_sequence,
            "stopped": self.stopped,
        })
    }
}

impl fmt::Display for RunReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "ran {} ms on {} vCPUs", self.ran_ms, self.vcpus.len())?;
        for (i, v) in self.vcpus.iter().enumerate() {
            writeln!(
                f,
                "  vCPU {i}: {} pages stamped, generation {}, {} progress exits, {} mismatches",
                v.stamped, v.generation, v.progress_exits, v.mismatches
            )?;
        }
        writeln!(f, "timer ticks: {}", self.ticks)?;
        writeln!(
            f,
            "serial lines: {} ({})",
            self.serial_lines,
            if self.serial_in_sequence {
                "in sequence"
            } else {
                "OUT OF SEQUENCE"
            }
        )?;
        if let Some(why) = &self.stopped {
            writeln!(f, "stopped: {why}")?;
        }
        write!(f, "{}", if self.ok() { "ok" } else { "FAILED" })
    }
}

/// Boots the demo guest in the demo VMM, runs it for `opts.run`, pauses
/// it and reads what it did.
pub fn run(opts: &RunOptions) -> Result<RunReport, RunError> {
    let vmm = DemoVmm::new(opts.mem_mib.saturating_mul(MIB), opts.vcpus).map_err(RunError::Boot)?;
    let params = GuestParams {
        ws_start: 2 * MIB,
        ws_pages: u32::try_from(opts.dirty_mib * MIB / PAGE_SIZE as u64)
            .map_err(|_| RunError::WorkingSet(opts.dirty_mib))?,
        idle_wakes: 1,
        vcpus: opts.vcpus,
        devices: true,
        ..GuestParams::default()
    };
    vmm.boot(&params).map_err(RunError::Boot)?;
    let started = Instant::now();
    vmm.vcpus().resume().map_err(RunError::Vcpu)?;
    std::thread::sleep(opts.run);
    let stopped = vmm.vcpus().stopped();
    if stopped.is_none() {
        vmm.vcpus().pause().map_err(RunError::Vcpu)?;
    }
    let ran_ms = started.elapsed().as_millis() as u64;
    let mut vcpus = Vec::new();
    for i in 0..opts.vcpus {
        let r = vmm.vcpus().report(i as usize).map_err(RunError::Vcpu)?;
        vcpus.push(VcpuRun {
            stamped: guest::stamped_by(vmm.guest_memory(), i).map_err(RunError::Stamps)?,
            generation: r.generation,
            progress_exits: r.progress_exits,
            mismatches: r.mismatches.len(),
        });
    }
    let (serial_lines, serial_in_sequence) = serial_sequence(&vmm.serial().take_output());
    Ok(RunReport {
        ran_ms,
        vcpus,
        ticks: vmm.ticks().map_err(RunError::Memory)?,
        serial_lines,
        serial_in_sequence,
        stopped: stopped.map(|e| e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_ok_only_when_everything_moved_in_order() {
        let good = RunReport {
            ran_ms: 1000,
            vcpus: vec![
                VcpuRun {
                    stamped: 10,
                    generation: 1,
                    progress_exits: 2,
                    mismatches: 0,
                };
                2
            ],
            ticks: 900,
            serial_lines: 180,
            serial_in_sequence: true,
            stopped: None,
        };
        assert!(good.ok());
        assert_eq!(good.to_json()["ok"], true);
        let mut bad = good.clone();
        bad.vcpus[1].mismatches = 1;
        assert!(!bad.ok());
        let mut bad = good.clone();
        bad.vcpus[0].progress_exits = 0;
        assert!(!bad.ok());
        let bad = RunReport {
            ticks: 0,
            ..good.clone()
        };
        assert!(!bad.ok());
        let bad = RunReport {
            serial_in_sequence: false,
            ..good.clone()
        };
        assert!(!bad.ok() && bad.to_string().ends_with("FAILED"));
        let bad = RunReport {
            stopped: Some("guest halted".into()),
            ..good
        };
        assert!(!bad.ok());
    }
}
