//! livemig-sim: simulated guest memory, dirty log, link and clock.
