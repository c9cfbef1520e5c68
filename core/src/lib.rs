#![no_std]
#![deny(unsafe_code)]
#![warn(missing_docs)]
//! livemig-core: the live-migration protocol without I/O, clocks, threads or
//! a heap.
//!
//! livemig moves a running virtual machine's memory and device state from a
//! source host to a destination host while the guest keeps running, with a
//! stop of milliseconds at the end: what QEMU's `migration/` subsystem does,
//! as a library for VMMs written in Rust. This crate is the part that
//! *decides*: the stream format, the state machine, dirty-page bookkeeping,
//! convergence and rate limiting. It is `#![no_std]`, allocates nothing, and
//! never touches a socket, a file descriptor, a thread or a clock, so the same
//! code runs inside a rust-vmm style hypervisor (see the `livemig-kvm` crate),
//! inside a deterministic simulation (`livemig-sim`), and inside firmware.
//!
//! # The sans-IO contract
//!
//! The two engines, [`source::SourceEngine`] and
//! [`destination::DestinationEngine`], are state machines in the style of
//! quinn-proto's `Connection`:
//!
//! * every input is a `handle_*` call: bytes arrived, a dirty log was
//!   fetched, the vCPUs stopped, a return-path message arrived, an I/O error,
//!   a cancel;
//! * the engine answers through `poll_*` calls the caller drains: the source's
//!   [`poll_action`](source::SourceEngine::poll_action) returns one
//!   [`SourceAction`](source::SourceAction) at a time (send these bytes, send
//!   these pages from guest memory, fetch the dirty log, clear this chunk of
//!   it, stop the vCPUs, save the devices, ...), and
//!   [`poll_timeout`](source::SourceEngine::poll_timeout) says when it next
//!   needs to be woken even if nothing happens;
//! * time is an argument: every call that can make a decision takes `now` as
//!   a [`time::Instant`], which the caller reads from whatever clock it has.
//!
//! Two rules follow. The caller carries out each action *before* polling
//! again (a dirty-log clear must reach the kernel before the next pages are
//! read, and bytes handed out count as sent when they are handed out). And
//! storage is the caller's: bitmaps, scratch buffers and the RAM layout are
//! borrowed slices ([`source::BlockTracking::dirty_words`] and
//! [`source::BlockTracking::clear_words`] say how many words to provide),
//! and everything else is fixed-capacity.
//!
//! # The modules a user touches
//!
//! | module | holds | who uses it |
//! |---|---|---|
//! | [`source`] | the source engine, its actions, per-block tracking storage | the VMM's migration thread on the sending host |
//! | [`destination`] | the destination engine and the [`DestinationHost`](destination::DestinationHost) trait that places pages and loads devices | the VMM on the receiving host |
//! | [`config`], [`capabilities`], [`params`] | what a migration is asked to do: capability flags and their compatibility rules, parameters with QEMU's defaults and ranges, convergence limits; validated once, together | the VMM's management interface (QMP-like commands, CLI flags) |
//! | [`status`] | the fifteen migration statuses, the table of legal transitions, and predicates | monitoring, the engines |
//! | [`stats`] | counters in the shape of QEMU's `query-migrate` | progress display, dashboards |
//! | [`wire`] | the main stream: a zerocopy "packet" level (fixed headers) and a validated "representation" level ([`Record`](wire::Record)), and a decoder for arbitrarily chunked input | engines; tools that read or write captures |
//! | [`return_path`] | the destination-to-source messages, byte-compatible with QEMU's | engines; the source's return-path reader |
//! | [`bitmap`], [`clear_map`] | dirty bitmaps over caller memory (KVM's layout) and the per-chunk "still needs a dirty-log clear" map | engines; a VMM that merges dirty logs itself |
//! | [`digest`] | the self-check: page terms, per-block books over caller storage, the verdict | engines; a shim's page hashing |
//! | [`time`] | the caller-supplied [`Instant`](time::Instant) | everyone |
//!
//! The stream and return-path formats are specified byte by byte in
//! `docs/wire-format.md`; the engines' design, the
//! state diagram and the convergence rules are in `docs/architecture.md`,
//! and `docs/integration.md` is the guide for embedding this crate in a VMM.
//!
//! # Encoding and decoding a record
//!
//! Records are built from validated values and read back equal:
//!
//! ```
//! # #[derive(Debug)] struct Error(String);
//! # impl<E: core::fmt::Display> From<E> for Error {
//! #     fn from(e: E) -> Self { Error(e.to_string()) }
//! # }
//! # fn main() -> Result<(), Error> {
//! use livemig_core::wire::{self, Command, Record, StreamDecoder};
//!
//! let mut stream = [0u8; 64];
//! let mut len = wire::encode_stream_header(&mut stream)?;
//! len += Record::Command(Command::Ping(7)).encode(&mut stream[len..])?;
//!
//! let mut scratch = [0u8; 64];
//! let mut decoder = StreamDecoder::new(&mut scratch);
//! let decoded = decoder.decode(&stream[..len])?;
//! assert_eq!(decoded.record, Some(Record::Command(Command::Ping(7))));
//! assert_eq!(decoded.consumed, len);
//! # Ok(())
//! # }
//! ```
//!
//! # A whole migration, in memory
//!
//! The source and destination engines driven against each other over a
//! `Vec` standing in for the socket, with a guest that does not run (so its
//! dirty log is all-set once, as KVM's initially-set log is, and clean
//! afterwards). A real VMM's loop has the same shape; `livemig-sim`'s
//! harness and `livemig-kvm`'s `migrate::source` are complete ones.
//!
//! ```
//! # #[derive(Debug)] struct Error(String);
//! # impl<E: core::fmt::Display> From<E> for Error {
//! #     fn from(e: E) -> Self { Error(e.to_string()) }
//! # }
//! # fn main() -> Result<(), Error> {
//! use livemig_core::config::MigrationConfig;
//! use livemig_core::destination::{DestinationEngine, DestinationHost};
//! use livemig_core::digest::{DigestBooks, DigestKey};
//! use livemig_core::source::{
//!     BlockTracking, EndReason, PageReader, SourceAction, SourceEngine, MIN_SCRATCH,
//! };
//! use livemig_core::status::MigrationStatus;
//! use livemig_core::time::Instant;
//! use livemig_core::wire::{self, BlockId, BlockInfo, DeviceId, DeviceState};
//!
//! const PAGE: usize = 4096;
//! const PAGES: usize = 256;
//!
//! /// Source memory as the engine reads it (for zero-page detection).
//! struct Ram<'r>(&'r [u8]);
//! impl PageReader for Ram<'_> {
//!     fn is_zero_page(&self, _block: u16, page: u64) -> bool {
//!         let at = page as usize * PAGE;
//!         self.0[at..at + PAGE].iter().all(|&b| b == 0)
//!     }
//!     fn page_term(&self, block: u16, page: u64, key: &DigestKey) -> u64 {
//!         let at = page as usize * PAGE;
//!         key.page_term(block, page, &self.0[at..at + PAGE])
//!     }
//! }
//!
//! /// Destination memory and devices as the engine writes them. The engine
//! /// has checked every page range against the block before calling.
//! struct Host { ram: Vec<u8>, cpu: Vec<u8> }
//! impl DestinationHost for Host {
//!     // This host cannot fail; a real one names its errno or device error.
//!     type Error = core::convert::Infallible;
//!     fn place_pages(&mut self, _block: u16, first: u64, data: &[u8]) -> Result<(), Self::Error> {
//!         let at = first as usize * PAGE;
//!         self.ram[at..at + data.len()].copy_from_slice(data);
//!         Ok(())
//!     }
//!     fn place_zero_pages(&mut self, _block: u16, first: u64, count: u64) -> Result<(), Self::Error> {
//!         let at = first as usize * PAGE;
//!         self.ram[at..at + count as usize * PAGE].fill(0);
//!         Ok(())
//!     }
//!     fn load_device(&mut self, device: &DeviceState<'_>) -> Result<(), Self::Error> {
//!         self.cpu = device.data.to_vec();
//!         Ok(())
//!     }
//! }
//!
//! let mut guest = vec![0u8; PAGES * PAGE];
//! guest[5 * PAGE..6 * PAGE].fill(0xab);
//! let cpu_state = [1u8, 2, 3, 4];
//!
//! // Both ends describe the same RAM layout.
//! let layout = [BlockInfo::new(BlockId::new("pc.ram")?, (PAGES * PAGE) as u64, PAGE as u32)?];
//!
//! // Source: tracking storage, scratch, engine.
//! let mut config = MigrationConfig::default();
//! config.parameters.max_bandwidth = 0; // unlimited, so no waiting for credit here
//! let shift = config.parameters.clear_bitmap_shift;
//! let mut dirty = vec![0u64; BlockTracking::dirty_words(&layout[0])];
//! let mut clear = vec![0u64; BlockTracking::clear_words(&layout[0], shift)];
//! let mut tracking = [BlockTracking::new(&layout[0], shift, &mut dirty, &mut clear)?];
//! let mut scratch = vec![0u8; MIN_SCRATCH];
//! let mut source = SourceEngine::new(&config, &layout, &mut tracking, &mut scratch)?;
//! // The migration verifies itself: 8 bytes of books a page on each end,
//! // and a key the source picks at random per migration.
//! let mut src_terms = vec![0u64; DigestBooks::words(&layout[0])];
//! let mut src_books = [DigestBooks::new(&layout[0], &mut src_terms)?];
//! source.verify_with(DigestKey::new(0x5eed), &mut src_books)?;
//!
//! // Destination: a reassembly buffer big enough for any record.
//! let mut dst_scratch = vec![0u8; wire::RECORD_HEADER_LEN + wire::MAX_RECORD_BODY];
//! let mut destination = DestinationEngine::new(&layout, &mut dst_scratch);
//! let mut dst_terms = vec![0u64; DigestBooks::words(&layout[0])];
//! let mut dst_books = [DigestBooks::new(&layout[0], &mut dst_terms)?];
//! destination.verify_with(&mut dst_books)?;
//! let mut host = Host { ram: vec![0; PAGES * PAGE], cpu: Vec::new() };
//!
//! let now = Instant::ZERO; // a real caller passes its monotonic clock
//! let mut socket = Vec::new();
//! let mut first_fetch = true;
//! source.start(now)?;
//! while let Some(action) = source.poll_action(now, &Ram(&guest)) {
//!     match action {
//!         SourceAction::Send(bytes) => socket.extend_from_slice(bytes),
//!         SourceAction::SendPages { header, block: _, pages } => {
//!             socket.extend_from_slice(header);
//!             for &p in pages {
//!                 socket.extend_from_slice(&guest[p as usize * PAGE..][..PAGE]);
//!             }
//!         }
//!         SourceAction::SyncDirtyLog => {
//!             // KVM_GET_DIRTY_LOG without clearing; keep it as the mask of
//!             // the clears that follow.
//!             let fill = if first_fetch { u64::MAX } else { 0 };
//!             first_fetch = false;
//!             source.handle_dirty_log(0, &[fill; PAGES / 64])?;
//!             source.handle_sync_done(now)?;
//!         }
//!         // KVM_CLEAR_DIRTY_LOG for the range, masked with the fetched log.
//!         SourceAction::ClearDirtyLog { .. } => {}
//!         SourceAction::SetThrottle { .. } => {}
//!         SourceAction::StopVcpus => source.handle_vcpus_stopped(now)?,
//!         // The compatibility record (CPU model, TSC, vCPU count) would go
//!         // here, before any RAM; this example has none.
//!         SourceAction::SaveSetupDevices => source.handle_setup_devices_sent(now, 0)?,
//!         SourceAction::SaveDevices => {
//!             let mut header = [0u8; 64];
//!             let n = wire::encode_device_header(
//!                 &mut header, DeviceId::new("cpu0")?, 0, 1, cpu_state.len())?;
//!             socket.extend_from_slice(&header[..n]);
//!             socket.extend_from_slice(&cpu_state);
//!             source.handle_devices_sent(now, (n + cpu_state.len()) as u64)?;
//!         }
//!         // Postcopy only (this example's configuration has it off).
//!         SourceAction::PackageDevices
//!         | SourceAction::SendPreempt(_)
//!         | SourceAction::SendPreemptPages { .. }
//!         | SourceAction::Paused => unreachable!("postcopy is off"),
//!         SourceAction::SendChannel { .. } | SourceAction::SendChannelPages { .. } => {
//!             unreachable!("multifd is off")
//!         }
//!         SourceAction::ResumeVcpus => {} // a failed migration: restart the guest here
//!         SourceAction::Finished(end) => assert_eq!(end, EndReason::Completed),
//!     }
//!     // The other end of the socket.
//!     destination.handle_input(now, &socket, &mut host)?;
//!     socket.clear();
//! }
//! assert!(destination.is_completed());
//! // The destination compared the source's digest before completing.
//! assert!(destination.stats().verification.is_verified());
//! assert_eq!(host.ram, guest);
//! assert_eq!(host.cpu, cpu_state);
//! assert_eq!(source.stats().ram.normal, 1); // one page of data, 255 zero pages
//! # Ok(())
//! # }
//! ```

#[cfg(test)]
extern crate std;

pub mod bitmap;
pub mod capabilities;
pub mod clear_map;
pub mod config;
pub mod destination;
pub mod digest;
pub mod params;
pub mod return_path;
pub mod source;
pub mod stats;
pub mod status;
pub mod time;
pub mod wire;
