//! Postcopy on simulated memory: the guest starts on the destination after a
//! short stop and pulls the pages it touches before they arrive. Every test
//! checks that destination memory equals the source's image at stop time
//! with the destination guest's own writes replayed onto it.

use livemig_core::capabilities::Capabilities;
use livemig_core::status::MigrationStatus;
use livemig_sim::{Outcome, Scenario, run_migration};
use livemig_tests::{assert_verified, dirtying, guest_gib, link};

/// A 1 GiB guest keeping 64 MiB dirty far faster than a 125 MB/s link:
/// precopy alone never converges.
fn unconvergeable() -> Scenario {
    let mut s = guest_gib(1);
    s.guest = Some(dirtying(64, 300_000, 31));
    s.forward = link(125_000_000);
    s.config.parameters.max_bandwidth = 0;
    s.config.capabilities |= Capabilities::POSTCOPY_RAM;
    s
}

fn postcopy_of(o: &Outcome) -> &livemig_sim::PostcopyOutcome {
    o.postcopy
        .as_ref()
        .expect("the guest ran on the destination in postcopy")
}

#[test]
fn postcopy_moves_a_guest_precopy_cannot() {
    let mut s = unconvergeable();
    s.config.limits.postcopy_after_iterations = Some(1);
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    let pc = postcopy_of(&o);
    assert!(pc.faults > 0 && pc.requests > 0, "{pc:?}");
    assert!(pc.guest_writes > 0, "the guest ran on the destination");
    assert!(
        pc.discarded_pages > 0,
        "pages dirtied after being sent were discarded"
    );
    assert_eq!(o.source.ram.postcopy_requests, pc.requests);
    assert_eq!(o.destination.ram.postcopy_requests, pc.requests);
    let downtime = o.downtime_ns.expect("stopped and started");
    assert!(downtime < 50_000_000, "postcopy downtime {downtime} ns");
    assert!(o.source.downtime_ms.is_some());

    // The same guest in precopy, unthrottled, gives up and stays on the
    // source (the shortest-stop rule's throttle would slow it into a
    // stop that fits).
    let mut p = s.clone();
    p.config.capabilities = Capabilities::ZERO_PAGE_DETECTION;
    p.config.stop_throttle = false;
    p.config.limits.max_iterations = Some(10);
    let o = run_migration(&p).expect("scenario");
    assert_eq!(o.source.status, MigrationStatus::Failed);
    assert!(o.source.error_desc.as_str().contains("did not converge"));
    livemig_tests::assert_source_kept_guest(&o);
}

#[test]
fn the_operator_starts_postcopy() {
    let mut s = unconvergeable();
    s.start_postcopy_at_ns = Some(300_000_000);
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    let stopped = o.stop_ns.expect("stopped");
    assert!(
        (300_000_000..320_000_000).contains(&stopped),
        "switched at {stopped} ns"
    );
    assert!(postcopy_of(&o).requests > 0);
}

#[test]
fn requests_are_served_ahead_of_the_background_pass() {
    // Lots of data still to send at the switch over a slow link: the
    // background pass takes seconds, a request must take about a round trip.
    let mut s = unconvergeable();
    s.fill_pages = 256 * 256; // 256 MiB of data
    s.forward = link(50_000_000);
    s.back = link(50_000_000);
    s.start_postcopy_at_ns = Some(50_000_000);
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    let pc = postcopy_of(&o);
    assert!(pc.requests > 10, "{pc:?}");
    // The switch came early in the first pass: pages it never reached were
    // never sent, so they need no discard.
    assert!(
        pc.discarded_pages < livemig_tests::GIB_PAGES / 10,
        "{} pages discarded",
        pc.discarded_pages
    );
    let background_ns = o.end_ns - o.stop_ns.expect("stopped");
    assert!(
        background_ns > 2_000_000_000,
        "the background pass took {background_ns} ns"
    );
    // Round trip 200 us, plus a 1 MiB batch already on the wire (21 ms at
    // 50 MB/s) and the requested batch itself.
    assert!(
        pc.max_request_latency_ns < 60_000_000,
        "a request waited {} ns",
        pc.max_request_latency_ns
    );
}

#[test]
fn no_page_is_requested_twice() {
    let mut s = unconvergeable();
    s.config.limits.postcopy_after_iterations = Some(1);
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    let pc = postcopy_of(&o);
    // The guest retries a blocked write on every step of the simulation, so
    // it faults on the same page many times; each page is asked for once.
    assert!(pc.faults > pc.requests, "{pc:?}");
    assert_eq!(o.source.ram.postcopy_requests, pc.requests);
}

#[test]
fn a_page_that_never_comes_fails_the_migration() {
    let clean = {
        let mut s = unconvergeable();
        s.config.limits.postcopy_after_iterations = Some(1);
        run_migration(&s).expect("scenario")
    };
    let mut s = unconvergeable();
    s.config.limits.postcopy_after_iterations = Some(1);
    // The main stream stalls shortly after the switchover.
    s.forward.stall_after = Some(clean.bytes_at_stop.expect("stopped") + 2_000_000);
    let o = run_migration(&s).expect("scenario");
    assert!(!o.timed_out, "nothing may wait forever");
    assert_eq!(o.destination.status, MigrationStatus::Failed);
    let why = o.destination.error_desc.as_str();
    assert!(
        why.contains("did not arrive") || why.contains("sent nothing"),
        "{why}"
    );
}

#[test]
fn a_switch_in_the_first_pass_discards_only_pages_already_sent() {
    // The first pass reaches the middle of the working set (pages
    // 4096..20480) after about 250 ms on this link: pages before that were
    // sent and re-dirtied and must be discarded, pages after it were never
    // sent and need nothing.
    let mut s = unconvergeable();
    s.fill_pages = 256 * 256;
    s.forward = link(50_000_000);
    s.back = link(50_000_000);
    s.start_postcopy_at_ns = Some(250_000_000);
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    let pc = postcopy_of(&o);
    assert!(pc.discarded_pages > 0, "{pc:?}");
    assert!(pc.discarded_pages < 16 * 1024, "{pc:?}");
}

/// A run of the unconvergeable guest switching after one pass, and where
/// its stream stood when the guest stopped.
fn switching_after_one_pass() -> (Scenario, u64) {
    let mut s = unconvergeable();
    s.config.limits.postcopy_after_iterations = Some(1);
    let clean = run_migration(&s).expect("scenario");
    assert_verified(&clean);
    (s, clean.bytes_at_stop.expect("stopped"))
}

/// A postcopy cut that paused both ends and recovered over a new
/// connection, `times` times, into a verified migration.
fn assert_recovered(o: &Outcome, times: u64) {
    assert_verified(o);
    assert_eq!(o.source.postcopy_recoveries, times, "{o:#?}");
    assert_eq!(o.destination.postcopy_recoveries, times);
    assert_eq!(o.reconnects, times);
}

#[test]
fn a_cut_after_the_switchover_pauses_and_recovers() {
    let (mut s, at_stop) = switching_after_one_pass();
    // Well into the background pass: the guest already runs on the
    // destination, which cannot go on without the source's pages.
    s.forward.cut_after = Some(at_stop + 3_000_000);
    let o = run_migration(&s).expect("scenario");
    assert_recovered(&o, 1);
}

#[test]
fn a_cut_before_the_switchover_resumes_the_source_guest() {
    let (mut s, at_stop) = switching_after_one_pass();
    // Between the stop and the package: the destination never ran it.
    s.forward.cut_after = Some(at_stop + 10);
    let o = run_migration(&s).expect("scenario");
    assert_eq!(o.source.status, MigrationStatus::Failed);
    livemig_tests::assert_source_kept_guest(&o);
}

#[test]
fn postcopy_cannot_be_cancelled_once_the_guest_runs_on_the_destination() {
    let (mut s, at_stop) = switching_after_one_pass();
    s.cancel = Some(livemig_sim::CancelWhen::AfterBytes(at_stop + 3_000_000));
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
}

/// The unconvergeable guest switching to postcopy early over a slow link
/// whose socket holds 4 MiB (80 ms at 50 MB/s) of background pages: a
/// page requested on the main stream waits behind them.
fn with_a_full_socket() -> Scenario {
    let mut s = unconvergeable();
    s.fill_pages = 256 * 256;
    s.forward = link(50_000_000);
    s.forward.send_buffer_bytes = 4 << 20;
    s.back = link(50_000_000);
    s.start_postcopy_at_ns = Some(50_000_000);
    s
}

#[test]
fn preempt_requests_skip_the_background_pages_queued_in_the_socket() {
    let off = run_migration(&with_a_full_socket()).expect("scenario");
    assert_verified(&off);
    let off = postcopy_of(&off);
    assert!(
        off.max_request_latency_ns > 80_000_000,
        "without preempt a request waits behind the queued 4 MiB: {off:?}"
    );
    assert_eq!(off.preempt_bytes, 0);

    let mut s = with_a_full_socket();
    s.config.capabilities |= Capabilities::POSTCOPY_PREEMPT;
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    let pc = postcopy_of(&o);
    assert!(pc.requests > 10, "{pc:?}");
    // Round trip 200 us, the page itself (82 us at 50 MB/s), and at most
    // the other requests' pages ahead of it on the preempt channel.
    assert!(
        pc.max_request_latency_ns < 5_000_000,
        "a request waited {} ns on the preempt channel",
        pc.max_request_latency_ns
    );
    // The hello, then at least a record header and a page entry per
    // request (zero pages carry no data).
    assert!(
        pc.preempt_bytes >= 16 + pc.requests * 16,
        "{} preempt bytes for {} requests",
        pc.preempt_bytes,
        pc.requests
    );
    // The main stream still carried every page: the destination dropped
    // the copies that came second.
    assert!(
        o.destination.ram.normal < o.source.ram.normal,
        "destination placed {} normal pages of the {} sent",
        o.destination.ram.normal,
        o.source.ram.normal
    );
}

#[test]
fn preempt_with_an_unlimited_background_pass_verifies() {
    let mut s = unconvergeable();
    s.config.limits.postcopy_after_iterations = Some(1);
    s.config.capabilities |= Capabilities::POSTCOPY_PREEMPT;
    s.config.parameters.max_postcopy_bandwidth = 0;
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    let pc = postcopy_of(&o);
    assert!(
        pc.faults > 0 && pc.requests > 0 && pc.guest_writes > 0,
        "{pc:?}"
    );
    assert_eq!(o.source.ram.postcopy_requests, pc.requests);
    assert!(pc.preempt_bytes > 16, "{pc:?}");
}

#[test]
fn a_cut_preempt_channel_pauses_postcopy_like_a_cut_main_stream() {
    let mut s = with_a_full_socket();
    s.config.capabilities |= Capabilities::POSTCOPY_PREEMPT;
    // The hello, then part of the first requested page.
    let mut preempt = link(50_000_000);
    preempt.cut_after = Some(16 + 1000);
    s.preempt_link = Some(preempt);
    let o = run_migration(&s).expect("scenario");
    assert_recovered(&o, 1);
    // The recovery opened the channel again, and requested pages came
    // over it: its hello and at least a page.
    let pc = postcopy_of(&o);
    assert!(pc.reopened_preempt_bytes > 16 + 4096, "{pc:?}");
    assert!(o.destination.postcopy_preempt_pages > 0, "{o:#?}");

    // A source that cannot connect a new channel recovers without one:
    // requested pages take the main stream.
    s.reopen_preempt = false;
    let o = run_migration(&s).expect("scenario");
    assert_recovered(&o, 1);
    assert_eq!(postcopy_of(&o).reopened_preempt_bytes, 0);
    assert_eq!(o.destination.postcopy_preempt_pages, 0);
}

#[test]
fn a_cut_preempt_channel_before_the_switchover_resumes_the_source_guest() {
    let mut s = with_a_full_socket();
    s.config.capabilities |= Capabilities::POSTCOPY_PREEMPT;
    // In the hello: found at setup, the guest never left.
    let mut preempt = link(50_000_000);
    preempt.cut_after = Some(8);
    s.preempt_link = Some(preempt);
    let o = run_migration(&s).expect("scenario");
    assert!(!o.timed_out);
    assert_eq!(o.source.status, MigrationStatus::Failed);
    livemig_tests::assert_source_kept_guest(&o);
}
