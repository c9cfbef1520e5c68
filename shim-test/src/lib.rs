#![deny(unsafe_code)]
#![warn(missing_docs)]
//! livemig-sim: a simulated world in which whole live migrations run in
//! milliseconds, deterministically, with injected faults.
//!
//! livemig's core is sans-IO: it never touches memory, sockets or clocks
//! itself, it is fed events and answers with actions. This crate provides
//! the things those actions act on when no real VM is involved:
//!
//! | module | stands in for | real counterpart (livemig-kvm) |
//! |---|---|---|
//! | [`clock`] | time | `CLOCK_MONOTONIC` |
//! | [`memory`] | guest RAM, source and destination | mmap'd KVM memslots, userfaultfd-placed pages |
//! | [`dirty_log`] | KVM's per-slot dirty bitmap | `KVM_GET_DIRTY_LOG` / `KVM_CLEAR_DIRTY_LOG` (manual protect) |
//! | [`workload`] | the running guest's stores | vCPUs running the demo guest |
//! | [`link`] | a connection, one direction per link | TCP / Unix sockets, with `tc` limits |
//! | [`channels`] | multifd channels, one link each, and their receivers | one socket and receiver thread per channel |
//!
//! Everything is driven by the test harness in simulated time: the harness
//! owns a [`SimClock`], lets the [`Workload`] run over each interval the
//! vCPUs are running, moves bytes with [`SimLink::send`] / [`SimLink::recv`]
//! at the current simulated time, and jumps the clock to the next event
//! ([`SimLink::next_arrival_ns`], an engine's next deadline). No wall clock
//! and no threads are involved, and every random choice is seeded, so a
//! failing run replays exactly.
//!
//! Memory is sparse ([`SimRam`] stores only written pages), so a 4 GiB
//! guest costs what it dirties, and [`SimRam::digest`] / [`SimRam::diff`]
//! check the central invariant: after a completed migration the destination
//! is byte-identical to the source at the moment it stopped.
//!
//! # Example
//!
//! A guest dirtying 64 pages for 10 ms, copied once to a destination over a
//! 1 GB/s link:
//!
//! ```
//! use livemig_sim::{duplex, BlockSpec, LinkConfig, SimClock, SimDirtyLog, SimRam, WorkingSet, Workload};
//!
//! let layout = vec![BlockSpec::new("pc.ram", 1024, 4096)];
//! let mut src = SimRam::new(layout.clone()).unwrap();
//! let mut dst = SimRam::new(layout).unwrap();
//! let mut log = SimDirtyLog::new_initially_clear(src.blocks());
//! let set = WorkingSet { block: 0, first_page: 0, pages: 64 };
//! let mut guest = Workload::new(&src, set, 10_000, 42).unwrap();
//! let mut clock = SimClock::new();
//! guest.advance(&mut src, &mut log, 0, clock.advance(10_000_000)).unwrap();
//! assert_eq!(guest.writes(), 100);
//!
//! let (mut wire, _return_path) = duplex(LinkConfig::new(1_000_000_000, 50_000), LinkConfig::default());
//! let mut bitmap = vec![0u64; log.bitmap_words(0).unwrap()];
//! log.get(0, &mut bitmap).unwrap();
//! log.clear(0, 0, 1024, &bitmap).unwrap();
//! for page in (0..1024).filter(|&p| bitmap[p as usize / 64] & (1 << (p % 64)) != 0) {
//!     let done = wire.send(clock.now_ns(), src.page(0, page).unwrap()).unwrap();
//!     clock.advance_to(done);
//!     clock.advance_to(wire.next_arrival_ns().unwrap());
//!     let mut buf = [0u8; 4096];
//!     assert_eq!(wire.recv(clock.now_ns(), &mut buf), 4096);
//!     dst.write_page(0, page, &buf).unwrap();
//! }
//! assert_eq!(src.diff(&dst), None);
//! assert_eq!(src.digest(), dst.digest());
//! ```

pub mod channels;
pub mod clock;
pub mod dirty_log;
pub mod harness;
pub mod inject;
pub mod link;
pub mod memory;
pub mod workload;

pub use channels::{ChannelError, SimChannels};
pub use clock::SimClock;
pub use dirty_log::{DirtyLogError, SimDirtyLog};
pub use harness::{
    CancelWhen, GuestSpec, Outcome, PostcopyOutcome, Scenario, ThrottleChange, run_migration,
};
pub use inject::InjectedFault;
pub use link::{LinkConfig, LinkError, SimLink, duplex};
pub use memory::{BlockSpec, FirstDifference, MAX_PAGE_SIZE, MIN_PAGE_SIZE, MemoryError, SimRam};
pub use workload::{Advance, Burst, Fault, Stamp, WorkingSet, Workload, WorkloadError, fill};
