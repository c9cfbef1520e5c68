#![no_std]
#![deny(unsafe_code)]
#![warn(missing_docs)]
//! livemig-core: the live-migration protocol without I/O, clocks, threads or a heap.
//!
//! (Crate documentation is written in the architecture pass; see `docs/architecture.md`.)

#[cfg(test)]
extern crate std;

pub mod bitmap;
pub mod capabilities;
pub mod clear_map;
pub mod config;
pub mod destination;
pub mod params;
pub mod return_path;
pub mod source;
pub mod state;
pub mod stats;
pub mod time;
pub mod wire;
