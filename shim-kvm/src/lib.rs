//! livemig-kvm: binds livemig-core to KVM, userfaultfd and sockets.
//!
//! This layer is the KVM foundation the migration engine drives:
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
//!
//! The `livemig` tool that drives these pieces is its own package,
//! livemig-cli (`shim-kvm/cli/`).
//!
//! Every `unsafe` block is in `memory`, `dirty_log`, `transport`, `clock`,
//! `postcopy` and `x86`, each with a `// SAFETY:` line.

pub mod clock;
pub mod dirty_log;
pub mod memory;
pub mod migrate;
pub mod postcopy;
pub mod transport;
pub mod vmm;
pub mod x86;

pub use migrate::{
    CancelRefused, DestinationReport, DestinationVm, MigrateError, MigrationHandle, ReceiveHandle,
    ReceiveOptions, SourceOptions, SourceReport, SourceVm, migrate, receive,
};
pub use transport::Connection;
pub use vmm::{DeviceDirtyLog, DeviceSection, Vcpus, VmmError};
