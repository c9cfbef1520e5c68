//! livemig-cli: the `livemig` tool, the first user of livemig-kvm.
//!
//! - [`options`], [`report`] and [`demo`]: the tool's flags, progress line
//!   and summaries, `send` / `receive`, and its self-contained demo (with a
//!   simulated fallback over livemig-sim when there is no `/dev/kvm`);
//!   [`bench`](mod@bench) times that demo against a raw TCP copy measured in the same
//!   run; [`fault_bench`] times postcopy's faults against the bare
//!   userfaultfd round trip (`--case postcopy`); [`touch_bench`] times a
//!   page's first write into fresh memory, with the ways around its fault
//!   (`--case first-touch`).
//! - [`qemu`] and [`qmp`]: the same guest under QEMU, migrated by QEMU over
//!   QMP; [`vs_qemu`] alternates those runs with `bench`'s (`--vs-qemu`);
//!   [`verify_cost`] alternates verified runs with unverified ones
//!   (`--verify-cost`).
//! - [`continuity`]: whether the guest went on after a migration (every
//!   vCPU's stamp counter, the timer, the serial sequence across hosts).
//! - [`watch`]: the guest read at the stop and after the switchover, that
//!   continuity is decided from.
//! - [`guest`]: the demo guest (a multiboot image whose vCPUs each stamp
//!   and re-check their share of a working set from ring 3, with a timer
//!   and a serial line when the VMM has them; sources in `guest/`), its
//!   parameter block and ports, and the stamp checks.
//! - [`guest_writes`]: the destination guest's writes after a postcopy
//!   (KVM's dirty log), and the digest of every other page both hosts
//!   compare.
//! - [`interrupt`]: Ctrl-C and SIGTERM as a cancel passed to the
//!   migration's handle, and the operator's decision after an ambiguous
//!   end (the hold).
//! - [`vmm`]: the demo VMM, built like an outside VMM on rust-vmm crates
//!   (its own KVM VM, vm-memory RAM, in-kernel irqchip and PIT, a
//!   vm-superio serial port, `--vcpus N` vCPU threads), which implements
//!   livemig-kvm's VMM traits; [`run`] boots the demo guest in it
//!   (`livemig run --vcpus N`).
//!
//! The tool drives the library only through its public API. Its `unsafe`
//! blocks are in `vmm` (memslots, the vCPU kick, its thread id),
//! `interrupt` (the signal handlers) and `touch_bench` (its own mappings),
//! each with a `// SAFETY:` line.

pub mod bench;
pub mod breakdown;
pub mod continuity;
pub mod demo;
pub mod events;
pub mod fault_bench;
pub mod guest;
pub mod guest_writes;
pub mod interrupt;
pub mod options;
pub mod qemu;
pub mod qmp;
pub mod report;
pub mod run;
pub mod timeline;
pub mod touch_bench;
pub mod verify_cost;
pub mod vmm;
pub mod vs_qemu;
pub mod watch;
