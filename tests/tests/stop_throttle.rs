//! The shortest-stop rule's throttle (`MigrationConfig::stop_throttle`,
//! on by default): when passes stop shrinking a stop that still has more
//! than `SWITCH_AT_ONCE` to send, the guest is slowed so that the final
//! set shrinks. Each migration is verified byte for byte with the guest
//! continuing on the destination; the throttle never lets a stop exceed
//! the limit, the migration ends within a bounded number of passes, the
//! throttle engages at once, from the rates a pass measured, once passes
//! would not shrink the stop soon enough on their own, and it is lifted
//! whatever the end: completed, failed or cancelled.

use livemig_core::source::shortest_stop::MAX_FITTING_PASSES;
use livemig_core::status::MigrationStatus;
use livemig_sim::{CancelWhen, Outcome, Scenario, run_migration};
use livemig_tests::{
    FAST, GIGABYTE, assert_source_kept_guest, assert_verified, dirtying, policy_guest,
};

/// A 1 GiB guest with 64 MiB of data rewriting `ws_mib` MiB at `rate`
/// pages per second over `bytes_per_sec`, a 300 ms limit, no bandwidth
/// cap and a 2 ms fixed cost of stopping.
fn scenario(bytes_per_sec: u64, ws_mib: u64, rate: u64, seed: u64) -> Scenario {
    let mut s = policy_guest(bytes_per_sec);
    s.guest = Some(dirtying(ws_mib, rate, seed));
    s
}

/// 64 MiB rewritten at 2 GB/s over 1 GB/s: every pass leaves the whole
/// set dirty, a 67 ms transfer at the plateau.
fn plateau() -> Scenario {
    scenario(GIGABYTE, 64, 500_000, 34)
}

fn run(s: &Scenario, throttle: bool) -> Outcome {
    let mut s = s.clone();
    s.config.stop_throttle = throttle;
    run_migration(&s).unwrap_or_else(|e| panic!("stop_throttle={throttle}: {e}"))
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

#[test]
fn a_plateau_is_throttled_into_a_short_stop_within_the_limit_and_bounded_passes() {
    let s = plateau();
    let off = run(&s, false);
    let on = run(&s, true);
    for o in [&off, &on] {
        assert_verified(o);
        assert_eq!(o.final_throttle, 0, "the throttle outlived the migration");
    }
    let (stop_off, stop_on) = (off.downtime_ns.unwrap(), on.downtime_ns.unwrap());
    let t = &on.source.throttle;
    eprintln!(
        "without: {} passes, stop {:.2} ms | with: {} passes, stop {:.2} ms, throttled {:.1} ms \
         up to {} %, {:.1} ms of vCPU time taken; changes {:?}",
        off.source.iterations,
        ms(stop_off),
        on.source.iterations,
        ms(stop_on),
        t.throttled_ms,
        t.peak_percent,
        t.taken_ms,
        on.throttle_changes
    );
    let limit_ns = s.config.parameters.downtime_limit_ms * 1_000_000;
    assert!(stop_on <= limit_ns, "stop of {} ms", ms(stop_on));
    // The transfer shrinks to a few ms: a tenth of the unthrottled stop.
    assert!(
        10 * stop_on <= stop_off,
        "throttled stop {} ms against {} ms",
        ms(stop_on),
        ms(stop_off)
    );
    assert_eq!(off.source.throttle.peak_percent, 0);
    assert!(off.throttle_changes.is_empty());
    // Bounded: a fitting pass at most MAX_FITTING_PASSES times, plus the
    // first pass, which does not fit before the link is measured.
    assert!(
        on.source.iterations <= u64::from(MAX_FITTING_PASSES) + 2,
        "{} passes",
        on.source.iterations
    );
    // The cost is reported, and consistent.
    assert!(t.peak_percent >= 50 && t.peak_percent <= 99, "{t:?}");
    assert!(t.throttled_ms > 0.0 && t.taken_ms > 0.0, "{t:?}");
    assert!(t.taken_ms <= t.throttled_ms * f64::from(t.peak_percent) / 100.0 + 1e-6);
    // The throttle in force ends at zero and was lifted exactly once.
    assert_eq!(on.source.throttle.percent, 0);
    assert_eq!(on.throttle_changes.last().map(|c| c.percent), Some(0));
    assert_eq!(
        on.throttle_changes
            .iter()
            .filter(|c| c.percent == 0)
            .count(),
        1
    );
}

#[test]
fn the_throttle_rises_at_once_from_the_rates_a_pass_measured() {
    let on = run(&plateau(), true);
    assert_verified(&on);
    let raises: Vec<_> = on
        .throttle_changes
        .iter()
        .filter(|c| c.percent > 0)
        .collect();
    assert!(!raises.is_empty(), "never throttled");
    // The rates are measured by a pass: not before the first ended. The
    // first, which fits, shows a guest dirtying about as fast as the link
    // carries (SHRINK_PASSES more would not shrink the stop to its
    // target), and that is when it rises: at once, not at a plateau
    // passes later.
    assert_eq!(raises[0].iterations, 1, "{raises:?}");
    // It only rises, until the lift; and at once, from the measured
    // dirty and link rates, hard enough for a short stop (the whole set
    // is rewritten each pass: far past a ramp's first steps of 50 and
    // 75 %), not one step a pass.
    for pair in raises.windows(2) {
        assert!(pair[0].percent < pair[1].percent, "{raises:?}");
    }
    assert!(raises[0].percent > 75, "{raises:?}");
    assert!(raises.len() <= 2, "ramped: {raises:?}");
}

#[test]
fn guests_whose_passes_shrink_the_stop_to_nothing_are_never_throttled() {
    // Passes shrink these stops geometrically until the transfer takes
    // less than SWITCH_AT_ONCE: no plateau, no throttle. (A slower guest
    // on a slow link may still meet a plateau on the way and be throttled
    // for a pass: that is the rule, not a breach of it.)
    for (name, s) in [
        // 64 MiB rewritten at 2 GB/s, half the 4 GB/s link.
        ("busy-1g", scenario(FAST, 64, 500_000, 32)),
        // 4 MiB rewritten at 800 MB/s over 4 GB/s.
        ("small hot set", scenario(FAST, 4, 200_000, 31)),
    ] {
        let o = run(&s, true);
        assert_verified(&o);
        assert!(
            o.throttle_changes.is_empty(),
            "{name}: throttled {:?}",
            o.throttle_changes
        );
        assert_eq!(o.source.throttle.peak_percent, 0, "{name}");
        assert_eq!(o.source.throttle.throttled_ms, 0.0, "{name}");
    }
}

/// Bytes the plateau migration had sent when its throttle first rose.
fn bytes_at_first_raise() -> u64 {
    let on = run(&plateau(), true);
    on.throttle_changes
        .iter()
        .find(|c| c.percent > 0)
        .map(|c| c.bytes_sent)
        .expect("the plateau is throttled")
}

#[test]
fn a_cancel_while_throttled_leaves_the_source_guest_running_unthrottled() {
    let at = bytes_at_first_raise();
    let mut s = plateau();
    // A little after the throttle rose: the next pass is under way.
    s.cancel = Some(CancelWhen::AfterBytes(at + (4 << 20)));
    let o = run(&s, true);
    assert_eq!(o.source.status, MigrationStatus::Cancelled);
    assert!(
        o.throttle_changes.iter().any(|c| c.percent > 0),
        "cancelled before the throttle: {:?}",
        o.throttle_changes
    );
    assert_eq!(o.final_throttle, 0, "the guest stayed throttled");
    assert_eq!(o.source.throttle.percent, 0);
    assert_source_kept_guest(&o);
}

#[test]
fn a_link_cut_while_throttled_leaves_the_source_guest_running_unthrottled() {
    let at = bytes_at_first_raise();
    let mut s = plateau();
    s.forward.cut_after = Some(at + (4 << 20));
    let o = run(&s, true);
    assert_eq!(o.source.status, MigrationStatus::Failed);
    assert!(
        o.throttle_changes.iter().any(|c| c.percent > 0),
        "cut before the throttle: {:?}",
        o.throttle_changes
    );
    assert_eq!(o.final_throttle, 0, "the guest stayed throttled");
    assert_source_kept_guest(&o);
}
