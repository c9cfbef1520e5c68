//! livemig-cli: the `livemig` tool, the first user of livemig-kvm.
//!
//! - [`options`], [`report`] and [`demo`]: the tool's flags, progress line
//!   and summaries, `send` / `receive`, and its self-contained demo (with a
//!   simulated fallback over livemig-sim when there is no `/dev/kvm`);
//!   [`bench`] times that demo against a raw TCP copy measured in the same
//!   run.
//!
//! The tool drives the library only through its public API; this crate has
//! no `unsafe` code.

#![forbid(unsafe_code)]

// The library modules the tool builds on, under the crate-root names the
// tool's modules use (`crate::vm`, `crate::transport`, ...).
use livemig_kvm::{clock, dirty_log, guest, interrupt, memory, migrate, transport, vcpu, vm};

pub mod bench;
pub mod demo;
pub mod options;
pub mod report;
