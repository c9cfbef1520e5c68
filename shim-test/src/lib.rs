//! livemig-sim: simulated guest memory, dirty log, link and clock.
pub mod clock;
pub mod dirty_log;
pub mod link;
pub mod memory;
pub mod workload;
