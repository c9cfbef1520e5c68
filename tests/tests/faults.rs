//! A migration that does not complete must leave the guest running and
//! intact on the source: cancel in every phase, a connection cut at bytes
//! drawn from every phase, a destination that rejects the stream, and one
//! that stops answering.

use livemig_core::capabilities::Capabilities;
use livemig_core::source::{EndReason, Wait};
use livemig_core::status::MigrationStatus;
use livemig_sim::{CancelWhen, Outcome, Scenario, run_migration};
use livemig_tests::{COMMIT_LEN, assert_source_kept_guest, assert_verified, dirtying, guest_gib};

/// A 1 GiB guest dirtying 8 MiB, with a return path so the source hears the
/// destination's verdict.
fn scenario() -> Scenario {
    let mut s = guest_gib(1);
    s.guest = Some(dirtying(8, 3_000, 21));
    s.config.capabilities |= Capabilities::RETURN_PATH;
    s.config.parameters.max_bandwidth = 0;
    s
}

fn assert_cancelled(o: &Outcome) {
    assert_eq!(
        o.source.status,
        MigrationStatus::Cancelled,
        "{:?}",
        o.source.error_desc
    );
    assert_eq!(o.end_reason, Some(EndReason::Cancelled));
    assert_source_kept_guest(o);
}

#[test]
fn cancel_in_setup() {
    let mut s = scenario();
    s.cancel = Some(CancelWhen::State(MigrationStatus::Setup));
    let o = run_migration(&s).expect("scenario");
    assert_cancelled(&o);
    assert_eq!(o.stop_digest, None);
}

#[test]
fn cancel_in_the_first_pass() {
    let mut s = scenario();
    s.cancel = Some(CancelWhen::State(MigrationStatus::Active));
    assert_cancelled(&run_migration(&s).expect("scenario"));
}

#[test]
fn cancel_in_a_later_pass() {
    let clean = run_migration(&scenario()).expect("scenario");
    assert_verified(&clean);
    let mut s = scenario();
    s.cancel = Some(CancelWhen::AfterBytes(
        clean.bytes_at_stop.expect("stopped") * 9 / 10,
    ));
    assert_cancelled(&run_migration(&s).expect("scenario"));
}

#[test]
fn cancel_with_the_guest_stopped_before_switchover() {
    let mut s = scenario();
    s.config.capabilities |= Capabilities::PAUSE_BEFORE_SWITCHOVER;
    s.cancel = Some(CancelWhen::State(MigrationStatus::PreSwitchover));
    let o = run_migration(&s).expect("scenario");
    assert!(
        o.stop_digest.is_some(),
        "the vCPUs were stopped before the cancel"
    );
    assert_cancelled(&o);
}

#[test]
fn cancel_during_the_stop_and_copy() {
    let mut s = scenario();
    s.config.capabilities |= Capabilities::PAUSE_BEFORE_SWITCHOVER;
    s.cancel = Some(CancelWhen::State(MigrationStatus::Device));
    let o = run_migration(&s).expect("scenario");
    assert!(o.stop_digest.is_some());
    assert_cancelled(&o);
}

/// Tiny deterministic generator for cut offsets.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn a_cut_at_a_random_byte_in_every_phase_fails_cleanly() {
    let clean = run_migration(&scenario()).expect("scenario");
    assert_verified(&clean);
    let at_stop = clean.bytes_at_stop.expect("stopped");
    // The stream up to its end: what follows is the COMMIT, after which
    // the source never takes the guest back (tests/tests/handshake.rs).
    let end = clean.bytes_sent - COMMIT_LEN;
    // Stream header and block list, precopy passes, stop-and-copy with the
    // device state, and the last byte of the end of stream.
    let phases = [(0, 40), (40, at_stop), (at_stop, end - 1), (end - 1, end)];
    let mut rng = 0x5eed;
    for (phase, &(from, to)) in phases.iter().enumerate() {
        for _ in 0..4 {
            let cut = from + splitmix(&mut rng) % (to - from);
            let mut s = scenario();
            s.forward.cut_after = Some(cut);
            let o = run_migration(&s).expect("scenario");
            let why = o.source.error_desc.as_str();
            assert_eq!(
                o.source.status,
                MigrationStatus::Failed,
                "phase {phase}, cut at {cut}: {why}"
            );
            assert!(
                why.contains("cut after"),
                "phase {phase}, cut at {cut}: {why}"
            );
            assert_source_kept_guest(&o);
            assert_eq!(
                o.destination.status,
                MigrationStatus::Failed,
                "phase {phase}, cut at {cut}"
            );
            assert!(!o.destination.error_desc.is_empty());
        }
    }
}

#[test]
fn a_corrupted_stream_is_refused_and_the_source_is_told() {
    // The magic, the first record's kind, a byte of the digest key (every
    // page's term then differs: caught by the verification), a byte of the
    // block id.
    for (offset, expected) in [
        (0u64, "invalid migration stream"),
        (9, "invalid migration stream"),
        (30, "verification failed"),
        (48, "RAM layout mismatch"),
    ] {
        let mut s = scenario();
        s.forward.corrupt_at = Some((offset, 0x40));
        let o = run_migration(&s).expect("scenario");
        assert_eq!(o.destination.status, MigrationStatus::Failed);
        assert!(
            o.destination.error_desc.as_str().contains(expected),
            "offset {offset}: {}",
            o.destination.error_desc
        );
        assert_eq!(o.source.status, MigrationStatus::Failed);
        let why = o.source.error_desc.as_str();
        assert!(
            why.contains("destination failed")
                || why.contains("destination closed")
                // A corrupted digest key: the source hears which page.
                || why.contains("verification failed at the destination"),
            "offset {offset}: {why}"
        );
        assert_source_kept_guest(&o);
    }
}

#[test]
fn a_destination_that_stops_answering_times_out() {
    let clean = run_migration(&scenario()).expect("scenario");
    let mut s = scenario();
    s.forward.stall_after = Some(clean.bytes_at_stop.expect("stopped") / 2);
    s.config.limits.confirm_timeout_ms = 2_000;
    let o = run_migration(&s).expect("scenario");
    assert_eq!(o.source.status, MigrationStatus::Failed);
    assert!(
        o.source
            .error_desc
            .as_str()
            .contains("did not report the stream loaded"),
        "{}",
        o.source.error_desc
    );
    assert_eq!(o.end_reason, Some(EndReason::Timeout(Wait::Loaded)));
    assert_source_kept_guest(&o);
}
