//! livemig-kvm: live migration for a VMM on KVM, built on livemig-core's
//! engines.
//!
//! A VMM keeps everything it owns (its `Kvm`, `VmFd`, vCPU threads,
//! memslots, guest RAM and devices) and lends livemig views of them: a
//! [`SourceVm`] given to [`migrate()`] on the source host, a
//! [`DestinationVm`] given to [`receive`] on the destination. Each
//! migration runs on a thread livemig owns behind a [`MigrationHandle`] /
//! [`ReceiveHandle`] (statistics, cancel, the report). livemig never runs
//! `KVM_RUN`: it pauses and resumes the VMM's vCPUs through [`Vcpus`], and
//! saves and restores itself each vCPU's x86 state, the in-kernel irqchip,
//! PIT and kvmclock, the CPU model the destination checks before any RAM,
//! and the runstate; the VMM's own device state travels as
//! [`DeviceSection`]s, and the pages its devices write come from a
//! [`DeviceDirtyLog`]. `examples/vmm.rs` is a minimal VMM wired this way;
//! `docs/integration.md` is the contract (threads and fds, failure, device
//! sections, what is not there yet).
//!
//! The modules:
//!
//! - [`memory`]: the VMM's guest memory as regions livemig holds raw views
//!   of (or maps itself, or takes from vm-memory), read and written only
//!   through raw-pointer copies so it is sound while the guest runs;
//!   zero-page checks, a whole-RAM digest for integrity checks, the device
//!   dirty logs, and pages gathered for vectored sends.
//! - [`dirty_log`]: dirty logging turned on for the VMM's memslots, in
//!   manual-protect mode (fetch without re-protecting, then clear
//!   64-page-aligned chunks with the fetched mask), legacy mode as fallback.
//! - [`vmm`]: what a VMM lends livemig — its vCPUs, its device sections,
//!   the guest pages its devices write — as traits it implements over the
//!   objects it already has.
//! - [`x86`]: the x86 state KVM keeps outside guest RAM — each vCPU's
//!   registers, LAPIC and MSRs, the VM's irqchip, PIT and kvmclock — with
//!   byte encodings, and the CPU model record a destination checks.
//! - [`transport`]: `tcp:` / `unix:` / `fd:` migration addresses, socket
//!   set-up, inherited descriptors, the connection carrying the stream and
//!   its return path, and page batches written with one vectored `sendmsg`
//!   straight from guest RAM.
//! - [`postcopy`]: the destination's postcopy RAM, registered with
//!   userfaultfd so missing pages block their first toucher until placed,
//!   and the fault thread that forwards those faults as page requests.
//! - [`migrate`](mod@migrate): the source and destination drivers of the engines over
//!   the VMM's guest ([`SourceVm`] into [`migrate()`], [`DestinationVm`]
//!   into [`receive`]), each on a migration thread of its own behind a
//!   handle (live statistics, cancel, join); [`clock`] is the monotonic
//!   clock they share.
//! - [`priority`]: a thread's nice value lowered for the few milliseconds
//!   of a stop and put back after, for the migration's threads (and a
//!   VMM's vCPU threads while they leave `KVM_RUN`).
//!
//! The `livemig` tool that drives these pieces is its own package,
//! livemig-cli (`shim-kvm/cli/`).
//!
//! Every `unsafe` block is in `memory`, `dirty_log`, `transport`, `clock`,
//! `postcopy`, `priority` and `x86` (and, in `examples/vmm.rs`, the memslot
//! registration), each with a `// SAFETY:` line.

pub mod clock;
pub mod dirty_log;
pub mod memory;
pub mod migrate;
pub mod postcopy;
pub mod priority;
pub mod transport;
pub mod vmm;
pub mod x86;

pub use migrate::{
    CancelRefused, DestinationReport, DestinationVm, MigrateError, MigrationEvent, MigrationHandle,
    ReceiveHandle, ReceiveOptions, Recovery, SourceOptions, SourceReport, SourceVm,
    extra_connections, migrate, migrate_with_channels, receive, receive_with_channels,
};
pub use transport::Connection;
pub use vmm::{DeviceDirtyLog, DeviceSection, Vcpus, VmmError};
