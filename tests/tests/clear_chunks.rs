//! The dirty-chunk clearing protocol, end to end: the harness audits every
//! action of the source engine against a model of KVM's manual-protect dirty
//! log (no page read from a chunk whose log was not cleared since the last
//! sync, no chunk cleared twice per sync, chunks aligned and clipped), and a
//! write that lands after a clear must still reach the destination — checked
//! by byte-identical memory at stop time.

use livemig_core::params::Parameters;
use livemig_sim::{BlockSpec, GuestSpec, Scenario, WorkingSet, run_migration};
use livemig_tests::assert_verified;

/// Two blocks whose sizes are not multiples of any chunk size, and a guest
/// dirtying both ends of the first (so chunks straddle the working set and
/// the block end).
fn scenario(shift: u8, seed: u64) -> Scenario {
    let mut s = Scenario::new(vec![
        BlockSpec::new("pc.ram", 70_000, 4096),
        BlockSpec::new("vga.ram", 1_000, 4096),
    ]);
    s.fill_pages = 5_000;
    s.guest = Some(GuestSpec {
        working_set: WorkingSet {
            block: 0,
            first_page: 60_000,
            pages: 10_000,
        },
        rate_pages_per_sec: 40_000,
        seed,
        burst: None,
    });
    s.forward = livemig_tests::link(300_000_000);
    // A protocol bug shows up as a never-converging guest: bound the run.
    s.config.limits.max_iterations = Some(50);
    s.watchdog_ns = 60_000_000_000;
    s.config.parameters = Parameters {
        clear_bitmap_shift: shift,
        max_bandwidth: 0,
        // A tight downtime limit forces several passes before the switchover.
        downtime_limit_ms: 30,
        ..Parameters::default()
    };
    s
}

fn check(shift: u8) {
    for seed in 1..=4 {
        let o = run_migration(&scenario(shift, seed)).expect("scenario");
        assert_verified(&o);
        assert!(
            o.dirty_log_clears > 0,
            "shift {shift}: no chunk was ever cleared"
        );
        assert_eq!(
            o.dirty_log_clears, o.source.dirty_log_clears,
            "every clear the engine counted reached the dirty log"
        );
        // Setup, at least one sync while the guest runs, and the final one.
        assert!(
            o.source.ram.dirty_sync_count >= 3,
            "shift {shift}: the guest forced re-syncs ({} syncs)",
            o.source.ram.dirty_sync_count
        );
    }
}

#[test]
fn clear_bitmap_shift_6() {
    check(6);
}

#[test]
fn clear_bitmap_shift_10() {
    check(10);
}

#[test]
fn clear_bitmap_shift_18() {
    check(18);
}
