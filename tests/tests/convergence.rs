//! The stop fits the downtime limit, or precopy gives up: the switchover
//! counts what the stop really waits for (bytes still queued in send
//! buffers, the fixed cost of stopping), and a limit that cannot be met
//! ends in "did not converge" with the guest running on the source, never
//! in a longer stop.

use livemig_core::source::shortest_stop::MAX_FITTING_PASSES;
use livemig_core::source::{ConvergenceLimit, EndReason};
use livemig_core::status::MigrationStatus;
use livemig_sim::{LinkConfig, Scenario, run_migration};
use livemig_tests::{MIB_PAGES, assert_source_kept_guest, assert_verified, dirtying, guest_gib};

/// 1 Gbit/s with 1 ms latency and a 32 MiB send buffer: a socket's send
/// queue plus a rate limiter's queue in front of a slow link, which alone
/// holds 270 ms of data.
fn slow_deep_link() -> LinkConfig {
    LinkConfig {
        send_buffer_bytes: 32 << 20,
        ..LinkConfig::new(125_000_000, 1_000_000)
    }
}

/// A 1 GiB guest holding 256 MiB of data (two seconds of link time, so
/// the send buffer is full when the first pass ends) and rewriting a
/// 64 MiB working set, over [`slow_deep_link`], with a 20 ms fixed cost of
/// stopping.
fn busy_guest_on_a_slow_deep_link(limit_ms: u64) -> Scenario {
    let mut s = guest_gib(1);
    s.fill_pages = 256 * MIB_PAGES;
    s.guest = Some(dirtying(64, 3_000, 21));
    s.forward = slow_deep_link();
    s.back = LinkConfig::new(125_000_000, 1_000_000);
    s.config.parameters.max_bandwidth = 0;
    s.config.parameters.downtime_limit_ms = limit_ms;
    s.stop_cost_ns = 20_000_000;
    s
}

#[test]
fn a_deep_send_buffer_on_a_slow_link_does_not_stretch_the_stop() {
    let s = busy_guest_on_a_slow_deep_link(300);
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    let downtime = o.downtime_ns.expect("the guest stopped and started");
    assert!(
        downtime <= 300_000_000,
        "stop of {} ms over the 300 ms limit (expected-downtime said {} ms)",
        downtime / 1_000_000,
        o.source.expected_downtime_ms
    );
    assert!(
        o.source.expected_downtime_ms <= 300,
        "expected downtime {} ms",
        o.source.expected_downtime_ms
    );
}

#[test]
fn a_limit_below_the_fixed_cost_of_stopping_does_not_converge() {
    // 20 ms to stop the guest at all: a 10 ms limit can never be met.
    let mut s = busy_guest_on_a_slow_deep_link(10);
    s.guest = Some(dirtying(8, 500, 22));
    let o = run_migration(&s).expect("scenario");
    assert_eq!(o.source.status, MigrationStatus::Failed);
    let why = o.source.error_desc.as_str();
    assert!(
        why.contains("did not converge") && why.contains("21 ms fixed cost"),
        "{why}"
    );
    assert!(
        matches!(o.end_reason, Some(EndReason::NotConverged(_))),
        "{:?}",
        o.end_reason
    );
    assert_eq!(
        o.stop_digest, None,
        "the guest must never have been stopped"
    );
    assert_source_kept_guest(&o);
}

/// 256 MiB of data, rewritten at 400 MB/s over a 125 MB/s link, no
/// iteration or time limit: no stop ever fits unless the guest is slowed.
fn faster_than_the_link() -> Scenario {
    let mut s = busy_guest_on_a_slow_deep_link(300);
    s.guest = Some(dirtying(256, 100_000, 23));
    s.config.limits.max_iterations = None;
    s.config.limits.max_time_ms = None;
    s
}

#[test]
fn a_guest_dirtying_faster_than_the_link_is_given_up_on_without_progress() {
    // Without the shortest-stop rule's throttle (or under QEMU's rule,
    // which has none), the no-progress rule alone ends it.
    let mut s = faster_than_the_link();
    s.config.stop_throttle = false;
    let o = run_migration(&s).expect("scenario");
    assert_eq!(o.source.status, MigrationStatus::Failed);
    let why = o.source.error_desc.as_str();
    assert!(
        why.contains("did not converge") && why.contains("(no progress in 10)"),
        "{why}"
    );
    assert_eq!(
        o.end_reason,
        Some(EndReason::NotConverged(ConvergenceLimit::Stalled {
            passes: 10
        }))
    );
    assert!(why.ends_with("or postcopy"), "cut short: {why}");
    assert_eq!(
        o.stop_digest, None,
        "the guest must never have been stopped"
    );
    assert_source_kept_guest(&o);
}

#[test]
fn a_guest_dirtying_faster_than_the_link_is_throttled_at_once_into_a_stop_within_the_limit() {
    // With the throttle (the default), the first pass measured that does
    // not fit and whose guest outran the link throttles it at once, hard
    // enough from the measured rates: the migration completes, within
    // the limit, in a few passes, without ramping one step at a time.
    let s = faster_than_the_link();
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    let stop = o.downtime_ns.expect("stopped and started");
    assert!(stop <= 300_000_000, "stop of {} ns", stop);
    let raises: Vec<_> = o
        .throttle_changes
        .iter()
        .filter(|c| c.percent > 0)
        .collect();
    eprintln!(
        "{} passes, stop {:.1} ms, throttle changes {:?}",
        o.source.iterations,
        stop as f64 / 1e6,
        o.throttle_changes
    );
    assert!(!raises.is_empty(), "never throttled");
    // The first raise goes past the first steps of a ramp (50, 75).
    assert!(raises[0].percent > 75, "{raises:?}");
    assert!(raises.len() <= 3, "ramped: {raises:?}");
    // Bounded: once throttled the passes fit, and the shortest-stop rule
    // takes a fitting stop after MAX_FITTING_PASSES at the latest.
    assert!(
        o.source.iterations <= u64::from(MAX_FITTING_PASSES) + 2,
        "{} passes",
        o.source.iterations
    );
    assert_eq!(o.final_throttle, 0, "the throttle outlived the migration");
}

#[test]
fn an_idle_guest_within_a_reachable_limit_still_converges_at_once() {
    let mut s = guest_gib(1);
    s.forward = slow_deep_link();
    s.stop_cost_ns = 5_000_000;
    s.config.parameters.downtime_limit_ms = 30;
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    assert!(o.downtime_ns.expect("stopped") <= 30_000_000);
}
