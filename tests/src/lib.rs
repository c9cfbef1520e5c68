//! Shared helpers for the cross-crate end-to-end tests: the guests and
//! links the scenarios are built from, named for what they model.

use livemig_sim::{BlockSpec, GuestSpec, LinkConfig, Outcome, Scenario, WorkingSet};

/// Pages in one GiB of 4 KiB pages.
pub const GIB_PAGES: u64 = 1 << 18;

/// Pages in one MiB of 4 KiB pages.
pub const MIB_PAGES: u64 = 1 << 8;

/// A guest of `gib` GiB with a little nonzero data (so it is not all zero
/// pages) on a 1 GB/s link with 50 us latency.
pub fn guest_gib(gib: u64) -> Scenario {
    let mut s = Scenario::new(vec![BlockSpec::new("pc.ram", gib * GIB_PAGES, 4096)]);
    s.fill_pages = 4 * MIB_PAGES;
    s
}

/// A guest dirtying `ws_mib` MiB (starting at 16 MiB) at `rate` pages per
/// simulated second.
pub fn dirtying(ws_mib: u64, rate: u64, seed: u64) -> GuestSpec {
    GuestSpec {
        working_set: WorkingSet {
            block: 0,
            first_page: 16 * MIB_PAGES,
            pages: ws_mib * MIB_PAGES,
        },
        rate_pages_per_sec: rate,
        seed,
        burst: None,
    }
}

/// Bytes of the COMMIT record, the last thing a precopy source with the
/// return path sends.
pub const COMMIT_LEN: u64 = 10;

/// A link of `bytes_per_sec` with 100 us latency, no faults.
pub fn link(bytes_per_sec: u64) -> LinkConfig {
    LinkConfig::new(bytes_per_sec, 100_000)
}

/// 1 GB/s.
pub const GIGABYTE: u64 = 1_000_000_000;

/// 4 GB/s: loopback TCP on the development VM.
pub const FAST: u64 = 4_000_000_000;

/// The switchover policies' guest: 1 GiB with 64 MiB of data, over
/// `bytes_per_sec`, a 300 ms limit, no bandwidth cap and a 2 ms fixed cost
/// of stopping; no workload yet.
pub fn policy_guest(bytes_per_sec: u64) -> Scenario {
    let mut s = guest_gib(1);
    s.fill_pages = 64 * MIB_PAGES;
    s.forward = link(bytes_per_sec);
    s.back = link(bytes_per_sec);
    s.config.parameters.max_bandwidth = 0;
    s.config.parameters.downtime_limit_ms = 300;
    s.stop_cost_ns = 2_000_000;
    s
}

/// Fails with a readable account when an outcome is not a verified
/// migration.
pub fn assert_verified(o: &Outcome) {
    assert!(!o.timed_out, "the harness watchdog fired: {o:#?}");
    assert!(
        o.clear_violations.is_empty(),
        "dirty-chunk clearing protocol broken: {:?}",
        o.clear_violations
    );
    assert!(
        o.verified(),
        "migration not verified (source {} '{}', destination {} '{}', first difference {:?}, guest continued {})",
        o.source.status,
        o.source.error_desc,
        o.destination.status,
        o.destination.error_desc,
        o.first_difference,
        o.guest_continued
    );
}

/// Fails unless the migration ended without moving the guest and the guest
/// is running, unthrottled and making progress on the source.
pub fn assert_source_kept_guest(o: &Outcome) {
    assert!(!o.timed_out, "the harness watchdog fired: {o:#?}");
    assert!(o.source_running, "source vCPUs left stopped: {o:#?}");
    assert!(o.source_continued, "source guest did not continue: {o:#?}");
    assert!(o.clear_violations.is_empty(), "{:?}", o.clear_violations);
    assert_ne!(
        o.destination.status,
        livemig_core::status::MigrationStatus::Completed,
        "the destination must not consider itself complete"
    );
}

/// A postcopy that failed after the switchover: both ends failed, in
/// bounded time, and the source's stale copy of the guest does not run.
pub fn assert_failed_after_the_switchover(o: &Outcome) {
    assert!(!o.timed_out, "nothing may wait forever");
    assert_eq!(
        o.source.status,
        livemig_core::status::MigrationStatus::Failed
    );
    let why = o.source.error_desc.as_str();
    assert!(
        why.contains("postcopy failed after the switchover"),
        "{why}"
    );
    assert!(
        !o.source_running,
        "the source's stale copy of the guest must not run"
    );
    assert_eq!(
        o.destination.status,
        livemig_core::status::MigrationStatus::Failed
    );
}
