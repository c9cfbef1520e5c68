//! The end-of-migration handshake (LOADED on the return path, COMMIT on the
//! main stream, SHUT(0) to confirm), cut, stalled and corrupted at every
//! byte of the final exchange in each direction. Whatever happens, at most
//! one host runs the guest, and when neither does, both say the end is
//! ambiguous and each holds what the operator needs to start exactly one
//! copy: the source's complete, paused copy, and the destination's complete,
//! loaded and paused copy, whose advice says to start it because the
//! source says "committed".

use livemig_core::capabilities::Capabilities;
use livemig_core::stats::AmbiguousEnd;
use livemig_core::status::MigrationStatus;
use livemig_sim::{BlockSpec, LinkConfig, Outcome, Scenario, run_migration};
use livemig_tests::{COMMIT_LEN, MIB_PAGES, assert_verified, dirtying};

/// A 32 MiB guest dirtying 4 MiB, with the return path, and a short
/// confirm timeout so stalls end quickly in simulated time.
fn scenario() -> Scenario {
    let mut s = Scenario::new(vec![BlockSpec::new("pc.ram", 32 * MIB_PAGES, 4096)]);
    s.fill_pages = MIB_PAGES;
    s.guest = Some(dirtying(4, 3_000, 5));
    s.config.capabilities |= Capabilities::RETURN_PATH;
    s.config.parameters.max_bandwidth = 0;
    s.config.limits.confirm_timeout_ms = 2_000;
    s
}

/// Bytes of the stream's tail that belong to the final exchange: the
/// device record (8 + 1 + 3 + 4 + 4 + 8 bytes of simulated vCPU state),
/// END_OF_STREAM (8) and COMMIT (10), plus the end of the last page batch.
const FINAL_EXCHANGE: u64 = 28 + 8 + COMMIT_LEN + 16;

/// What an operator can always do: run exactly one copy of the guest.
fn assert_recoverable(o: &Outcome, what: &str) {
    assert!(!o.timed_out, "{what}: the harness watchdog fired: {o:#?}");
    let (src, dst) = (&o.source, &o.destination);
    let ctx = || {
        format!(
            "{what}: source {} {:?} '{}', destination {} {:?} '{}'",
            src.status,
            src.ambiguous_end,
            src.error_desc,
            dst.status,
            dst.ambiguous_end,
            dst.error_desc
        )
    };
    match (o.source_running, o.destination_running) {
        (true, true) => panic!("both hosts run the guest: {}", ctx()),
        (false, true) => {
            // The guest moved: the destination completed on the COMMIT,
            // with the whole guest; the source knows it, or says it cannot.
            assert_eq!(dst.status, MigrationStatus::Completed, "{}", ctx());
            assert!(o.destination_has_copy, "{}", ctx());
            match src.status {
                MigrationStatus::Completed => assert_verified(o),
                MigrationStatus::Failed => {
                    assert_eq!(
                        src.ambiguous_end,
                        Some(AmbiguousEnd::SourceCommitted),
                        "{}",
                        ctx()
                    );
                }
                other => panic!("source ended {other}: {}", ctx()),
            }
        }
        (true, false) => {
            // The source never committed: it failed cleanly and its guest
            // runs on; the destination never started and may have loaded
            // a copy it will be told to discard (the source says "failed").
            assert_eq!(src.status, MigrationStatus::Failed, "{}", ctx());
            assert_eq!(src.ambiguous_end, None, "{}", ctx());
            assert!(o.source_continued, "{}", ctx());
            assert_eq!(dst.status, MigrationStatus::Failed, "{}", ctx());
        }
        (false, false) => {
            // The source committed and heard nothing back; the destination
            // loaded and did not get (or could not trust) the COMMIT. Both
            // say so, both hold the whole guest, paused.
            assert_eq!(
                src.ambiguous_end,
                Some(AmbiguousEnd::SourceCommitted),
                "{}",
                ctx()
            );
            assert!(o.source_has_copy, "{}", ctx());
            assert_eq!(
                dst.ambiguous_end,
                Some(AmbiguousEnd::DestinationLoaded),
                "{}",
                ctx()
            );
            assert!(o.destination_has_copy, "{}", ctx());
        }
    }
    for stats in [src, dst] {
        if stats.ambiguous_end.is_some() {
            assert_eq!(stats.status, MigrationStatus::Failed, "{}", ctx());
        }
    }
}

/// The clean run the faults are placed in.
fn clean() -> Outcome {
    let o = run_migration(&scenario()).expect("scenario");
    assert_verified(&o);
    assert!(o.destination_running && !o.source_running);
    o
}

/// Runs the scenario with `fault` applied to the main stream or the
/// return path, and checks the outcome.
fn faulted(label: &str, at: u64, fault: impl Fn(&mut LinkConfig)) -> Outcome {
    let mut s = scenario();
    fault(if label.starts_with("main") {
        &mut s.forward
    } else {
        &mut s.back
    });
    let o = run_migration(&s).expect("scenario");
    assert_recoverable(&o, &format!("{label} at byte {at}"));
    o
}

/// Counts how each cut ended, so the suite shows it covered every case.
#[derive(Default, Debug)]
struct Tally {
    completed: u32,
    source_kept: u32,
    destination_runs_source_unsure: u32,
    both_paused: u32,
}

impl Tally {
    fn add(&mut self, o: &Outcome) {
        match (o.source_running, o.destination_running) {
            (true, _) => self.source_kept += 1,
            (false, true) if o.source.status == MigrationStatus::Completed => self.completed += 1,
            (false, true) => self.destination_runs_source_unsure += 1,
            (false, false) => self.both_paused += 1,
        }
    }
}

#[test]
fn a_cut_at_every_byte_of_the_final_exchange_leaves_one_guest_to_run() {
    let clean = clean();
    let total = clean.bytes_sent;
    let mut tally = Tally::default();
    // The main stream: from the device state through END_OF_STREAM and
    // every byte of the COMMIT (a cut at `total` delivers everything).
    for cut in total - FINAL_EXCHANGE..=total {
        tally.add(&faulted("main stream cut", cut, |l| {
            l.cut_after = Some(cut)
        }));
    }
    // The return path: PONG to the setup check, SWITCHOVER_ACK, PONG to
    // the catch-up before the stop, LOADED, SHUT(0).
    let rp = clean.return_path_bytes;
    assert_eq!(
        rp,
        8 + 4 + 8 + 4 + 8,
        "PONG(setup check), SWITCHOVER_ACK, PONG(catch-up), LOADED, SHUT(0)"
    );
    for cut in 0..=rp {
        tally.add(&faulted("return path cut", cut, |l| {
            l.cut_after = Some(cut)
        }));
    }
    // Every outcome of the handshake was reached: a cut before the commit
    // (the source keeps the guest), within the COMMIT (both paused), in
    // the confirmation (the destination runs, the source cannot know), and
    // after everything (completed).
    assert!(tally.source_kept > 0, "{tally:?}");
    assert!(tally.both_paused > 0, "{tally:?}");
    assert!(tally.destination_runs_source_unsure > 0, "{tally:?}");
    assert!(tally.completed > 0, "{tally:?}");
}

#[test]
fn a_peer_that_stops_answering_at_any_byte_of_the_final_exchange_leaves_one_guest_to_run() {
    let clean = clean();
    let total = clean.bytes_sent;
    for at in total - FINAL_EXCHANGE..total {
        faulted("main stream stall", at, |l| l.stall_after = Some(at));
    }
    for at in 0..clean.return_path_bytes {
        faulted("return path stall", at, |l| l.stall_after = Some(at));
    }
}

/// Framing bytes only: a flipped bit in page data or in the vCPU blob is
/// not detectable by the stream (it has no checksum; TLS would be).
#[test]
fn a_corrupted_byte_in_the_final_exchange_leaves_one_guest_to_run() {
    let clean = clean();
    let total = clean.bytes_sent;
    for at in total - 8 - COMMIT_LEN..total {
        faulted("main stream corruption", at, |l| {
            l.corrupt_at = Some((at, 0x40))
        });
    }
    for at in 0..clean.return_path_bytes {
        faulted("return path corruption", at, |l| {
            l.corrupt_at = Some((at, 0x40))
        });
    }
}

/// The ambiguous reports carry the words an operator acts on.
#[test]
fn an_ambiguous_end_says_what_to_do_on_both_sides() {
    let clean = clean();
    // Cut in the middle of the COMMIT: both paused.
    let cut = clean.bytes_sent - COMMIT_LEN / 2;
    let o = faulted("main stream cut", cut, |l| l.cut_after = Some(cut));
    let (src, dst) = (
        o.source.ambiguous_end.expect("source ambiguous"),
        o.destination.ambiguous_end.expect("destination ambiguous"),
    );
    assert_eq!(src.name(), "committed");
    assert_eq!(dst.name(), "loaded");
    assert!(src.advice().contains("will not resume it"));
    assert!(dst.advice().contains("it says 'committed'"));
    assert!(dst.advice().contains("start it here"));
    assert!(
        o.source.error_desc.as_str().contains("after the commit"),
        "{}",
        o.source.error_desc
    );
}

/// Without the return path there is no handshake: the old behaviour, and
/// its window, documented in docs/architecture.md: the source stops for
/// good once the end of the stream is written, so an end of stream that
/// is written but never arrives leaves neither running and only the
/// source's paused copy.
#[test]
fn without_the_return_path_the_source_keeps_a_paused_copy_when_the_end_is_lost() {
    let mut s = scenario();
    s.config.capabilities.remove(Capabilities::RETURN_PATH);
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    assert_eq!(o.return_path_bytes, 0);
    let mut s = scenario();
    s.config.capabilities.remove(Capabilities::RETURN_PATH);
    s.forward.stall_after = Some(o.bytes_sent - 1);
    let cut = run_migration(&s).expect("scenario");
    assert!(!cut.timed_out);
    assert!(!cut.source_running && !cut.destination_running);
    assert_eq!(cut.source.status, MigrationStatus::Completed);
    assert!(cut.source_has_copy);
    assert_eq!(cut.destination.status, MigrationStatus::Failed);
}
