//! The source refuses inconsistent set-ups and inputs out of order with
//! typed errors, and turns bad page requests into a failed migration.

use std::vec;

use super::*;
use crate::wire::BlockId;

struct AllZero;

impl PageReader for AllZero {
    fn is_zero_page(&self, _block: u16, _page: u64) -> bool {
        true
    }
}

/// Runs `f` on a fresh engine over a 1024-page block with the default
/// configuration.
fn with_engine(f: impl FnOnce(&mut SourceEngine<'_>)) {
    let l = layout();
    let config = MigrationConfig::default();
    let shift = config.parameters.clear_bitmap_shift;
    let (mut d, mut c) = (vec![0; 16], vec![0; 1]);
    let mut tracking = [BlockTracking::new(&l[0], shift, &mut d, &mut c).unwrap()];
    let mut scratch = vec![0u8; MIN_SCRATCH];
    let mut s = SourceEngine::new(&config, &l, &mut tracking, &mut scratch).unwrap();
    f(&mut s);
}

fn layout() -> [BlockInfo<'static>; 1] {
    [BlockInfo::new(BlockId::new("pc.ram").unwrap(), 1024 * 4096, 4096).unwrap()]
}

#[test]
fn inconsistent_setups_are_refused() {
    let l = layout();
    let config = MigrationConfig::default();
    let shift = config.parameters.clear_bitmap_shift;
    let (mut d, mut c) = (vec![0; 16], vec![0; 1]);
    let mut tracking = [BlockTracking::new(&l[0], shift, &mut d, &mut c).unwrap()];
    let mut small = vec![0u8; 100];
    assert!(matches!(
        SourceEngine::new(&config, &l, &mut tracking, &mut small),
        Err(SourceError::ScratchTooSmall { .. })
    ));
    let mut scratch = vec![0u8; MIN_SCRATCH];
    assert!(matches!(
        SourceEngine::new(&config, &l, &mut [], &mut scratch),
        Err(SourceError::BlockCountMismatch {
            layout: 1,
            tracking: 0
        })
    ));
    let (mut d, mut c) = (vec![0; 16], vec![0; 1]);
    let mut other_shift = [BlockTracking::new(&l[0], 10, &mut d, &mut c).unwrap()];
    assert!(matches!(
        SourceEngine::new(&config, &l, &mut other_shift, &mut scratch),
        Err(SourceError::TrackingMismatch { block: 0 })
    ));
    let mut bad = config.clone();
    bad.parameters.clear_bitmap_shift = 40;
    let (mut d, mut c) = (vec![0; 16], vec![0; 1]);
    let mut fresh = [BlockTracking::new(&l[0], shift, &mut d, &mut c).unwrap()];
    assert!(matches!(
        SourceEngine::new(&bad, &l, &mut fresh, &mut scratch),
        Err(SourceError::Config(_))
    ));
}

#[test]
fn inputs_out_of_order_are_errors_not_panics() {
    with_engine(|s| {
        let now = Instant::ZERO;
        assert!(matches!(
            s.handle_dirty_log(0, &[0; 16]),
            Err(SourceError::UnexpectedEvent { .. })
        ));
        assert!(matches!(
            s.handle_vcpus_stopped(now),
            Err(SourceError::UnexpectedEvent { .. })
        ));
        assert_eq!(s.start_postcopy(now), Err(SourceError::PostcopyNotEnabled));
        s.start(now).unwrap();
        assert!(matches!(
            s.start(now),
            Err(SourceError::UnexpectedEvent { .. })
        ));
        assert!(matches!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::Send(_))
        ));
        assert_eq!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::SyncDirtyLog)
        );
        assert_eq!(
            s.handle_dirty_log(7, &[0; 16]),
            Err(SourceError::NoSuchBlock(7))
        );
    });
}

#[test]
fn a_page_request_outside_postcopy_fails_the_migration() {
    with_engine(|s| {
        let now = Instant::ZERO;
        s.start(now).unwrap();
        let msg = RpMessage::ReqPagesId {
            block: "pc.ram",
            start: 0,
            len: 4096,
        };
        s.handle_return_path(now, &msg).unwrap();
        assert_eq!(s.state(), MigrationStatus::Failed);
        assert!(
            s.stats()
                .error_desc
                .as_str()
                .contains("postcopy is not active")
        );
        assert_eq!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::Finished(MigrationStatus::Failed))
        );
        assert_eq!(s.poll_action(now, &AllZero), None);
    });
}

/// Issue 8 item 7: a destination interrupted by a signal fails the
/// migration with words naming the signal, and, since it sends this only
/// before its guest ran, the source resumes its guest even after the
/// postcopy package went out.
#[test]
fn an_interrupted_destination_fails_the_migration_and_the_guest_resumes_here() {
    with_engine(|s| {
        let now = Instant::ZERO;
        s.start(now).unwrap();
        s.handle_return_path(now, &RpMessage::Interrupted { signal: 2 })
            .unwrap();
        assert_eq!(s.state(), MigrationStatus::Failed);
        assert_eq!(
            s.stats().error_desc.as_str(),
            "the destination was interrupted (SIGINT) and stopped loading the stream; \
             the guest keeps running on the source"
        );
    });

    let l = layout();
    let mut config = MigrationConfig::default();
    config.capabilities |= Capabilities::POSTCOPY_RAM;
    config.parameters.downtime_limit_ms = 0;
    let shift = config.parameters.clear_bitmap_shift;
    let (mut d, mut c) = (vec![0; 16], vec![0; 1]);
    let mut tracking = [BlockTracking::new(&l[0], shift, &mut d, &mut c).unwrap()];
    let mut scratch = vec![0u8; MIN_SCRATCH];
    let mut s = SourceEngine::new(&config, &l, &mut tracking, &mut scratch).unwrap();
    let mut now = Instant::ZERO;
    s.start(now).unwrap();
    s.start_postcopy(now).unwrap();
    let dirty = [u64::MAX; 16];
    let mut packaged = false;
    for _ in 0..10_000 {
        match s.poll_action(now, &AllZero) {
            Some(SourceAction::SyncDirtyLog) => {
                s.handle_dirty_log(0, &dirty).unwrap();
                s.handle_sync_done(now).unwrap();
            }
            Some(SourceAction::StopVcpus) => s.handle_vcpus_stopped(now).unwrap(),
            Some(SourceAction::PackageDevices) => {
                s.package_devices(now, 16).unwrap();
                s.handle_package_sent(now).unwrap();
                packaged = true;
                break;
            }
            Some(SourceAction::Finished(status)) => panic!("finished early: {status:?}"),
            Some(_) => {}
            // Held back by the rate limit: on to the next slice.
            None => now = s.poll_timeout().expect("stalled before the switchover"),
        }
    }
    assert!(packaged && s.guest_on_destination());
    assert!(s.cancel(now).is_err(), "a cancel is refused now");
    s.handle_return_path(now, &RpMessage::Interrupted { signal: 15 })
        .unwrap();
    assert_eq!(
        s.poll_action(now, &AllZero),
        Some(SourceAction::ResumeVcpus)
    );
    assert_eq!(
        s.poll_action(now, &AllZero),
        Some(SourceAction::Finished(MigrationStatus::Failed))
    );
    assert!(
        s.stats().error_desc.as_str().contains("SIGTERM"),
        "{}",
        s.stats().error_desc.as_str()
    );
}
