//! Every migration verifies itself: the destination compares the source's
//! digest before its guest may start. Each fault below leaves a stream
//! every decoder accepts; the digest (or, for a dirty log that missed a
//! write, the source's audit at the stop) catches it, the destination
//! guest does not start, and the source guest runs on.

use livemig_core::capabilities::Capabilities;
use livemig_core::digest::Verification;
use livemig_core::source::EndReason;
use livemig_core::status::MigrationStatus;
use livemig_sim::{InjectedFault, Outcome, Scenario, run_migration};
use livemig_tests::{
    MIB_PAGES, assert_failed_after_the_switchover, assert_source_kept_guest, assert_verified,
    dirtying, guest_gib, link,
};

/// A 1 GiB guest dirtying 8 MiB, with the return path (so that the
/// destination's refusal reaches the source, which then resumes).
fn busy() -> Scenario {
    let mut s = guest_gib(1);
    s.guest = Some(dirtying(8, 20_000, 5));
    s.forward = link(1_000_000_000);
    s.config.parameters.max_bandwidth = 0;
    s.config.capabilities |= Capabilities::RETURN_PATH;
    s
}

/// The destination refused the guest for a digest mismatch, and the
/// source guest runs on. Both ends name the first mismatching block and
/// `page` (`None`: the page is not located, as over multifd).
fn assert_caught_by_destination(o: &Outcome, page: Option<u64>) {
    assert!(o.fault_injected, "the fault never happened: {o:#?}");
    let named = Verification::Mismatch { block: 0, page };
    assert_eq!(
        o.destination.verification, named,
        "destination verdict ({})",
        o.destination.error_desc
    );
    assert_eq!(
        o.source.verification, named,
        "source verdict ({})",
        o.source.error_desc
    );
    let words = match page {
        Some(p) => format!("verification failed: page {p} of RAM block 0 differs"),
        None => "verification failed: the memory received for RAM block 0".into(),
    };
    assert!(
        o.destination.error_desc.as_str().contains(&words),
        "{}",
        o.destination.error_desc
    );
    assert!(
        o.source
            .error_desc
            .as_str()
            .contains("verification failed at the destination"),
        "{}",
        o.source.error_desc
    );
    assert!(!o.destination_running, "the destination started the guest");
    assert_eq!(o.end_reason, Some(EndReason::DestinationFailed));
    assert_source_kept_guest(o);
}

/// The page the fault hit first (lowest index): the one the digest must
/// name, since every other page arrived intact.
fn first_hit(o: &Outcome) -> Option<u64> {
    o.injected_pages
        .iter()
        .map(|&(b, p)| {
            assert_eq!(b, 0, "one block");
            p
        })
        .min()
}

#[test]
fn a_normal_migration_verifies_itself_on_both_ends() {
    let o = run_migration(&busy()).expect("scenario");
    assert_verified(&o);
    assert_eq!(o.source.verification, Verification::Verified);
    assert_eq!(o.destination.verification, Verification::Verified);
}

/// [`busy`] switching to postcopy after one pass, with a working set
/// larger than a pass can send while it is rewritten.
fn busy_postcopy() -> Scenario {
    let mut s = busy();
    s.guest = Some(dirtying(64, 300_000, 31));
    s.forward = link(125_000_000);
    s.config.capabilities |= Capabilities::POSTCOPY_RAM;
    s.config.limits.postcopy_after_iterations = Some(1);
    s
}

#[test]
fn postcopy_verifies_itself_at_the_end() {
    let o = run_migration(&busy_postcopy()).expect("scenario");
    assert_verified(&o);
    assert!(o.postcopy.is_some(), "the guest ran on the destination");
    assert_eq!(o.source.verification, Verification::Verified);
    assert_eq!(o.destination.verification, Verification::Verified);
}

/// A page whose postcopy copy fails its term is not installed and is
/// asked for again (RESEND_PAGE); the copy that checks out is installed,
/// and the migration completes verified. With the preempt channel the
/// second copy travels there.
#[test]
fn a_byte_flipped_in_postcopy_is_refused_and_the_page_sent_again() {
    for preempt in [false, true] {
        let mut s = busy_postcopy();
        if preempt {
            s.config.capabilities |= Capabilities::POSTCOPY_PREEMPT;
        }
        s.fault = Some(InjectedFault::FlippedByteInPostcopy);
        let o = run_migration(&s).expect("scenario");
        assert!(o.fault_injected, "the fault never happened: {o:#?}");
        assert!(o.postcopy.is_some(), "the guest ran on the destination");
        assert_eq!(o.injected_pages.len(), 1);
        assert_verified(&o);
        assert_eq!(o.destination.verification, Verification::Verified);
        assert_eq!(o.source.verification, Verification::Verified);
        assert_eq!(o.destination.postcopy_refetched, 1, "preempt {preempt}");
    }
}

/// The same page damaged again: a link that damages what it carries. The
/// migration fails with block and page named on both ends, the failure
/// any broken postcopy has.
#[test]
fn a_page_damaged_twice_in_postcopy_fails_naming_it() {
    let mut s = busy_postcopy();
    s.fault = Some(InjectedFault::FlippedByteInPostcopyTwice);
    let o = run_migration(&s).expect("scenario");
    assert!(o.fault_injected, "the fault never happened: {o:#?}");
    assert!(o.postcopy.is_some(), "the guest ran on the destination");
    assert_eq!(o.injected_pages.len(), 1);
    assert_eq!(o.destination.postcopy_refetched, 1);
    let (block, page) = o.injected_pages[0];
    let named = Verification::Mismatch {
        block,
        page: Some(page),
    };
    assert_eq!(
        o.destination.verification, named,
        "destination verdict ({})",
        o.destination.error_desc
    );
    assert_eq!(
        o.source.verification, named,
        "the source heard block and page ({})",
        o.source.error_desc
    );
    let words = format!(
        "verification failed: page {page} of RAM block {block} arrived in postcopy with other \
         contents than the source sent; it was not installed"
    );
    assert!(
        o.destination.error_desc.as_str().contains(&words),
        "{}",
        o.destination.error_desc
    );
    assert_failed_after_the_switchover(&o);
}

#[test]
fn without_books_nothing_is_claimed() {
    let mut s = busy();
    s.verify = false;
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    assert_eq!(o.source.verification, Verification::Off);
    assert_eq!(o.destination.verification, Verification::Off);
}

#[test]
fn a_page_placed_at_the_wrong_offset_is_caught() {
    let mut s = busy();
    s.fault = Some(InjectedFault::MisplacedPage { after: 100 });
    let o = run_migration(&s).expect("scenario");
    assert_eq!(o.injected_pages.len(), 2, "two pages trade places");
    assert_caught_by_destination(&o, first_hit(&o));
}

#[test]
fn a_dropped_page_is_caught() {
    let mut s = busy();
    s.fault = Some(InjectedFault::DroppedPage { after: 100 });
    let o = run_migration(&s).expect("scenario");
    assert_caught_by_destination(&o, first_hit(&o));
}

#[test]
fn a_byte_flipped_after_the_transport_is_caught() {
    let mut s = busy();
    // Late, in a re-sent page of the working set: the flip must be caught
    // even when the page is replaced in the books, not only on first send.
    s.fault = Some(InjectedFault::FlippedByte {
        after: 4 * MIB_PAGES + 100,
    });
    let o = run_migration(&s).expect("scenario");
    assert_eq!(o.injected_pages.len(), 1);
    assert_caught_by_destination(&o, first_hit(&o));
}

#[test]
fn a_dirty_log_that_misses_pages_is_caught_by_the_audit() {
    let mut s = busy();
    s.audit = true;
    s.fault = Some(InjectedFault::MissedDirtyPages);
    let o = run_migration(&s).expect("scenario");
    assert!(o.fault_injected, "the final sync had no dirty page: {o:#?}");
    let Verification::AuditFailed { block: 0, page } = o.source.verification else {
        panic!(
            "source verdict {:?} ({})",
            o.source.verification, o.source.error_desc
        );
    };
    assert!(
        o.source
            .error_desc
            .as_str()
            .contains(&format!("page {page} of RAM block 0")),
        "{}",
        o.source.error_desc
    );
    assert_eq!(o.end_reason, Some(EndReason::LocalFailure));
    assert!(!o.destination_running, "the destination started the guest");
    assert_ne!(o.destination.status, MigrationStatus::Completed);
    assert_source_kept_guest(&o);

    // Without the audit the same fault goes through unseen by the digest
    // (both ends book the stale page) — and the harness's own comparison
    // of the memories sees it: the reason the audit exists.
    s.audit = false;
    let o = run_migration(&s).expect("scenario");
    assert!(o.fault_injected);
    assert_eq!(o.destination.verification, Verification::Verified);
    assert!(!o.memory_identical, "the missed page differs");
}

#[test]
fn the_audit_passes_a_sound_migration() {
    let mut s = busy();
    s.audit = true;
    let o = run_migration(&s).expect("scenario");
    assert_verified(&o);
    assert_eq!(o.source.verification, Verification::Verified);
}

/// `busy` over two multifd channels: every page travels on a channel, placed
/// by the destination's receivers without the engine.
fn busy_multifd() -> Scenario {
    let mut s = busy();
    s.config.capabilities |= Capabilities::MULTIFD;
    s.config.parameters.multifd_channels = 2;
    s
}

#[test]
fn a_multifd_migration_verifies_itself_on_both_ends() {
    let o = run_migration(&busy_multifd()).expect("scenario");
    assert_verified(&o);
    assert!(
        o.destination.ram.multifd_bytes > 0,
        "pages went on channels"
    );
    assert_eq!(o.source.verification, Verification::Verified);
    assert_eq!(o.destination.verification, Verification::Verified);
}

#[test]
fn a_byte_flipped_in_a_channel_packet_is_caught() {
    let mut s = busy_multifd();
    // In a re-sent page of the working set, as on the main stream: the
    // receivers' books must replace the page's earlier term.
    s.fault = Some(InjectedFault::FlippedByte {
        after: 4 * MIB_PAGES + 100,
    });
    let o = run_migration(&s).expect("scenario");
    assert_eq!(o.injected_pages.len(), 1);
    // The channels' receivers keep their pages' terms; at the mismatch the
    // engine's books adopt them, and the page is located.
    let (block, page) = o.injected_pages[0];
    assert_eq!(block, 0);
    assert_caught_by_destination(&o, Some(page));
}
