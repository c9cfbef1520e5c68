//! The setup-time compatibility record: an incompatible destination
//! refuses the source before any RAM moves, and the source's guest never
//! stops; a compatible one migrates as before.

use livemig_core::capabilities::Capabilities;
use livemig_core::source::EndReason;
use livemig_core::status::MigrationStatus;
use livemig_sim::{BlockSpec, GuestSpec, Scenario, WorkingSet, run_migration};

const MIB_PAGES: u64 = 256;

fn scenario(return_path: bool) -> Scenario {
    let mut s = Scenario::new(vec![BlockSpec::new("pc.ram", 16 * MIB_PAGES, 4096)]);
    s.fill_pages = MIB_PAGES;
    s.guest = Some(GuestSpec {
        working_set: WorkingSet {
            block: 0,
            first_page: 0,
            pages: MIB_PAGES,
        },
        rate_pages_per_sec: 2_000,
        seed: 9,
        burst: None,
    });
    if return_path {
        s.config.capabilities |= Capabilities::RETURN_PATH;
    }
    s
}

#[test]
fn an_incompatible_destination_refuses_before_any_page_and_the_guest_never_stops() {
    let mut s = scenario(true);
    s.destination_cpu_model = 2;
    let o = run_migration(&s).expect("the scenario runs");
    assert!(!o.timed_out, "{o:#?}");
    assert_eq!(o.source.status, MigrationStatus::Failed);
    assert_eq!(o.end_reason, Some(EndReason::DestinationFailed));
    assert_eq!(o.destination.status, MigrationStatus::Failed);
    assert!(
        o.destination.error_desc.as_str().contains("CPU model"),
        "{}",
        o.destination.error_desc
    );
    assert!(
        o.source
            .error_desc
            .as_str()
            .contains("refused the setup-time device state"),
        "{}",
        o.source.error_desc
    );
    // Not a page left the source, and its guest was never stopped.
    assert_eq!(o.source.ram.normal + o.source.ram.duplicate, 0);
    assert_eq!(o.destination.ram.normal + o.destination.ram.duplicate, 0);
    assert_eq!(o.stop_ns, None);
    assert!(o.source_running && o.source_continued);
    assert!(!o.destination_running);
}

#[test]
fn a_compatible_destination_checks_the_record_and_migrates() {
    let o = run_migration(&scenario(true)).expect("the scenario runs");
    assert!(o.verified(), "{o:#?}");
    assert_eq!(o.end_reason, Some(EndReason::Completed));
}

/// Without the return path the destination cannot answer: the record is
/// still checked there, and the refusal fails the migration on arrival.
#[test]
fn without_the_return_path_the_destination_still_refuses_the_record() {
    let mut s = scenario(false);
    s.destination_cpu_model = 2;
    let o = run_migration(&s).expect("the scenario runs");
    assert_eq!(o.destination.status, MigrationStatus::Failed);
    assert_eq!(o.destination.ram.normal + o.destination.ram.duplicate, 0);
    assert!(!o.destination_running);
}
