//! Postcopy that survives cut links, on simulated memory: a cut in either
//! direction at any byte of any phase either fails a precopy with the
//! guest intact on the source, or, once the guest runs on the
//! destination, pauses both ends, which recover over a new connection
//! (again and again if the recovery handshake is cut too) and complete
//! with destination memory equal to the source's image plus the
//! destination guest's own writes.

use std::collections::HashSet;

use livemig_core::capabilities::Capabilities;
use livemig_core::status::MigrationStatus::{
    self, Cancelling, Completed, Failed, PostcopyActive, PostcopyPaused, PostcopyRecover,
    PostcopyRecoverSetup,
};
use livemig_sim::{BlockSpec, GuestSpec, LinkConfig, Outcome, Scenario, WorkingSet, run_migration};
use livemig_tests::{assert_source_kept_guest, assert_verified, link};

/// Pages of the small guest the sweeps migrate (8 MiB).
const PAGES: u64 = 2048;

/// An 8 MiB guest with 4 MiB of data, dirtying 2 MiB faster than its
/// 50 MB/s link carries, switched to postcopy after one pass.
fn small_postcopy(seed: u64) -> Scenario {
    let mut s = Scenario::new(vec![BlockSpec::new("pc.ram", PAGES, 4096)]);
    s.fill_pages = PAGES / 2;
    s.guest = Some(GuestSpec {
        working_set: WorkingSet {
            block: 0,
            first_page: 256,
            pages: 512,
        },
        rate_pages_per_sec: 20_000,
        seed,
        burst: None,
    });
    s.forward = link(50_000_000);
    s.back = link(50_000_000);
    s.config.parameters.max_bandwidth = 0;
    s.config.capabilities |= Capabilities::POSTCOPY_RAM;
    s.config.limits.postcopy_after_iterations = Some(1);
    s.run_after_ns = 2_000_000;
    s
}

/// Tiny deterministic generator for cut offsets.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Checks one cut run: a guest that ran on the destination recovered into
/// a verified migration; one that never left failed with the source intact.
fn check_cut(o: &Outcome, what: &str) {
    assert!(!o.timed_out, "{what}: the watchdog fired");
    assert!(!o.gave_up, "{what}: gave up recovering");
    if o.postcopy.is_some() {
        assert_verified(o);
        // Each side counts its own recover -> active moves: a RESUME_ACK
        // lost in a cut counts on the destination only.
        let resumed = |changes: &[livemig_core::status::StatusChange]| {
            changes
                .iter()
                .filter(|c| (c.from, c.to) == (PostcopyRecover, PostcopyActive))
                .count() as u64
        };
        assert_eq!(o.source.postcopy_recoveries, resumed(&o.source_changes));
        assert_eq!(
            o.destination.postcopy_recoveries,
            resumed(&o.destination_changes)
        );
        assert!(
            o.destination.postcopy_recoveries >= o.source.postcopy_recoveries,
            "{what}"
        );
        // Every pause of the source was recovered from or completed.
        let pauses = o
            .source_changes
            .iter()
            .filter(|c| c.to == PostcopyPaused)
            .count() as u64;
        assert_eq!(
            pauses, o.reconnects,
            "{what}: one reconnect per pause: source {:?}, destination {:?}",
            o.source_changes, o.destination_changes
        );
    } else {
        assert_eq!(o.source.status, MigrationStatus::Failed, "{what}");
        assert_source_kept_guest(o);
        assert_eq!(o.reconnects, 0, "{what}: no recovery before the switchover");
    }
}

/// Cuts `runs` migrations, seed by seed: one direction or the other at a
/// byte drawn from the whole stream (every phase), and on every fourth run
/// the first recovery connection is cut too, in its handshake.
fn sweep(runs: u64) {
    let clean = run_migration(&small_postcopy(0)).expect("scenario");
    assert_verified(&clean);
    let fwd_total = clean.bytes_sent;
    let back_total = clean.return_path_bytes;
    let at_stop = clean.bytes_at_stop.expect("stopped");
    let mut rng = 0x5eed_0012;
    let mut recovered = 0;
    let mut twice = 0;
    for seed in 0..runs {
        let mut s = small_postcopy(seed % 7);
        let r = splitmix(&mut rng);
        let (dir, cut) = if seed % 2 == 0 {
            // Half the forward cuts after the stop, where postcopy runs.
            let from = if seed % 4 == 0 { at_stop } else { 0 };
            ("forward", from + r % (fwd_total - from))
        } else {
            ("back", r % back_total)
        };
        match dir {
            "forward" => s.forward.cut_after = Some(cut),
            _ => s.back.cut_after = Some(cut),
        }
        if seed % 4 == 1 {
            // The new stream: header, bitmap request, resume command; the
            // new return path: RECV_BITMAP, the 272-byte bitmap, RESUME_ACK.
            let k = splitmix(&mut rng);
            let mut f = s.forward.healthy();
            let mut b = s.back.healthy();
            if k.is_multiple_of(2) {
                f.cut_after = Some(k % 60);
            } else {
                b.cut_after = Some(k % 300);
            }
            s.recovery_links = vec![(f, b)];
        }
        let o = run_migration(&s).expect("scenario");
        check_cut(&o, &format!("seed {seed}, {dir} cut at {cut}"));
        recovered += u64::from(o.source.postcopy_recoveries > 0);
        twice += u64::from(o.reconnects > 1);
    }
    // The sweep did reach postcopy, and cut recoveries.
    assert!(recovered > runs / 4, "{recovered} of {runs} recovered");
    assert!(twice > runs / 20, "{twice} of {runs} recovered twice");
}

#[test]
fn cuts_in_every_phase_either_fail_precopy_or_recover_postcopy() {
    sweep(1_000);
}

#[test]
#[ignore = "long: cargo test --release -- --ignored"]
fn cuts_in_every_phase_over_twenty_thousand_seeds() {
    sweep(20_000);
}

/// Issue 12, item 4: with postcopy-preempt, a cut of the main stream
/// after the stop or of the preempt channel at any byte; every recovery
/// opens the channel again, requested pages come over the new one, and
/// the migration verifies.
#[test]
fn cuts_with_the_preempt_channel_recover_over_a_new_channel() {
    let with_preempt = |seed| {
        let mut s = small_postcopy(seed);
        s.config.capabilities |= Capabilities::POSTCOPY_PREEMPT;
        s.preempt_link = Some(link(50_000_000));
        s
    };
    let clean = run_migration(&with_preempt(0)).expect("scenario");
    assert_verified(&clean);
    let fwd_total = clean.bytes_sent;
    let at_stop = clean.bytes_at_stop.expect("stopped");
    let preempt_total = clean.postcopy.as_ref().expect("postcopy").preempt_bytes;
    assert!(preempt_total > 16, "requests went over the channel");
    let mut rng = 0x5eed_0124;
    let (runs, mut reopened) = (200, 0);
    for seed in 0..runs {
        let mut s = with_preempt(seed % 7);
        let r = splitmix(&mut rng);
        let what = if seed % 2 == 0 {
            let cut = at_stop + r % (fwd_total - at_stop);
            s.forward.cut_after = Some(cut);
            format!("seed {seed}, forward cut at {cut}")
        } else {
            let cut = r % preempt_total;
            if let Some(p) = s.preempt_link.as_mut() {
                p.cut_after = Some(cut);
            }
            format!("seed {seed}, preempt cut at {cut}")
        };
        let o = run_migration(&s).expect("scenario");
        check_cut(&o, &what);
        // A cut in the setup's hello fails the precopy (checked above).
        if let Some(pc) = o.postcopy.as_ref().filter(|_| o.reconnects > 0)
            && o.destination.postcopy_preempt_pages > 0
        {
            assert!(pc.reopened_preempt_bytes > 16, "{what}: {pc:?}");
            reopened += 1;
        }
    }
    assert!(
        reopened > runs / 4,
        "{reopened} of {runs} brought pages over a reopened channel"
    );
}

#[test]
fn a_vcpu_waiting_on_a_missing_page_while_paused_gets_it_after_recovery() {
    let clean = run_migration(&small_postcopy(3)).expect("scenario");
    let at_stop = clean.bytes_at_stop.expect("stopped");
    let mut s = small_postcopy(3);
    s.forward.cut_after = Some(at_stop + 200_000);
    // The operator takes 50 ms: the destination guest faults meanwhile.
    s.reconnect_after_ns = 50_000_000;
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    let pc = o.postcopy.as_ref().expect("postcopy ran");
    assert!(pc.requests_while_paused > 0, "{pc:?}");
    assert_eq!(o.source.postcopy_recoveries, 1);
}

#[test]
fn a_completed_destination_whose_shut_was_lost_completes_the_source_on_recovery() {
    let clean = run_migration(&small_postcopy(1)).expect("scenario");
    let mut s = small_postcopy(1);
    // The return path's last message, SHUT(0), is cut.
    s.back.cut_after = Some(clean.return_path_bytes - 8);
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    assert_eq!(o.reconnects, 1);
    assert!(
        o.source_changes
            .iter()
            .any(|c| (c.from, c.to) == (PostcopyRecoverSetup, Completed)),
        "{:?}",
        o.source_changes
    );
}

#[test]
fn the_operator_gives_up_after_its_deadline_and_says_where_the_pages_are() {
    let clean = run_migration(&small_postcopy(2)).expect("scenario");
    let mut s = small_postcopy(2);
    s.forward.cut_after = Some(clean.bytes_at_stop.expect("stopped") + 100_000);
    let dead = LinkConfig {
        cut_after: Some(0),
        ..link(50_000_000)
    };
    s.recovery_links = vec![(dead, dead); 64];
    s.recover_timeout_ns = 20_000_000;
    let o = run_migration(&s).expect("scenario");
    assert!(o.gave_up && !o.timed_out);
    assert_eq!(o.source.status, Failed);
    assert_eq!(o.destination.status, Failed);
    assert!(!o.source_running, "the stale source copy never runs");
    assert!(
        o.source
            .error_desc
            .as_str()
            .contains("exist only on this source"),
        "{}",
        o.source.error_desc
    );
    assert!(
        o.destination
            .error_desc
            .as_str()
            .contains("exist only on the source"),
        "{}",
        o.destination.error_desc
    );
}

/// Every transition of the table into, out of or between the recovery
/// states, taken by a real simulated migration (either engine). Moves to
/// `cancelling` are the exception: a cancel after the switchover is
/// refused (the guest runs on the destination), which is asserted instead.
#[test]
fn every_recovery_transition_of_the_table_is_exercised() {
    let recovery = [PostcopyPaused, PostcopyRecoverSetup, PostcopyRecover];
    let listed: Vec<(MigrationStatus, MigrationStatus)> = MigrationStatus::ALL
        .into_iter()
        .flat_map(|from| MigrationStatus::ALL.into_iter().map(move |to| (from, to)))
        .filter(|&(from, to)| from.can_transition_to(to))
        .filter(|(from, to)| recovery.contains(from) || recovery.contains(to))
        .collect();
    let (cancels, moves): (Vec<_>, Vec<_>) =
        listed.into_iter().partition(|&(_, to)| to == Cancelling);
    assert_eq!(
        moves,
        [
            (PostcopyActive, PostcopyPaused),
            (PostcopyPaused, PostcopyRecoverSetup),
            (PostcopyPaused, PostcopyRecover),
            (PostcopyPaused, Failed),
            (PostcopyRecoverSetup, PostcopyPaused),
            (PostcopyRecoverSetup, PostcopyRecover),
            (PostcopyRecoverSetup, Completed),
            (PostcopyRecover, PostcopyActive),
            (PostcopyRecover, PostcopyPaused),
        ]
    );
    assert_eq!(cancels.len(), 3);

    let clean = run_migration(&small_postcopy(4)).expect("scenario");
    let at_stop = clean.bytes_at_stop.expect("stopped");
    let mut scenarios = Vec::new();
    // A cut in the background pass, and recovery handshakes cut on the
    // new stream (source in recover-setup) and after the bitmap (source in
    // recover, destination in recover).
    for (f, b) in [(None, None), (Some(10), None), (None, Some(283))] {
        let mut s = small_postcopy(4);
        s.forward.cut_after = Some(at_stop + 300_000);
        let mut fwd = s.forward.healthy();
        let mut back = s.back.healthy();
        fwd.cut_after = f;
        back.cut_after = b;
        s.recovery_links = vec![(fwd, back)];
        scenarios.push(s);
    }
    // The SHUT(0) lost: the source completes from recover-setup.
    let mut s = small_postcopy(4);
    s.back.cut_after = Some(clean.return_path_bytes - 8);
    scenarios.push(s);
    // No connection ever comes back: both give up.
    let mut s = small_postcopy(4);
    s.forward.cut_after = Some(at_stop + 300_000);
    let dead = LinkConfig {
        cut_after: Some(0),
        ..link(50_000_000)
    };
    s.recovery_links = vec![(dead, dead); 64];
    s.recover_timeout_ns = 20_000_000;
    scenarios.push(s);

    let mut taken = HashSet::new();
    for s in &scenarios {
        let o = run_migration(s).expect("scenario");
        assert!(!o.timed_out);
        if !o.gave_up {
            assert_verified(&o);
        }
        for c in o.source_changes.iter().chain(&o.destination_changes) {
            taken.insert((c.from, c.to));
        }
    }
    for m in &moves {
        assert!(
            taken.contains(m),
            "{} -> {} never taken: {taken:?}",
            m.0,
            m.1
        );
    }

    // Cancel after the switchover: refused in every recovery state.
    for &(from, _) in &cancels {
        assert!(recovery.contains(&from));
    }
    let mut s = small_postcopy(4);
    s.forward.cut_after = Some(at_stop + 300_000);
    s.cancel = Some(livemig_sim::CancelWhen::State(PostcopyPaused));
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    assert!(
        !o.source_changes.iter().any(|c| c.to == Cancelling),
        "a cancel after the switchover is refused"
    );
}
