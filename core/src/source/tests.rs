//! The source refuses inconsistent set-ups and inputs out of order with
//! typed errors, and turns bad page requests into a failed migration.

use std::vec;

use super::*;
use crate::capabilities::Capabilities;
use crate::stats::AmbiguousEnd;
use crate::status::TransitionError;
use crate::wire::BlockId;

struct AllZero;

impl PageReader for AllZero {
    fn is_zero_page(&self, _block: u16, _page: u64) -> bool {
        true
    }
    fn page_term(&self, _block: u16, _page: u64, _key: &crate::digest::DigestKey) -> u64 {
        0
    }
}

/// Runs `f` on a fresh engine over a 1024-page block with the default
/// configuration.
fn with_engine(f: impl FnOnce(&mut SourceEngine<'_>)) {
    with_config(&MigrationConfig::default(), f);
}

/// Runs `f` on a fresh engine over [`layout`]'s 1024-page block with
/// `config`.
fn with_config(config: &MigrationConfig, f: impl FnOnce(&mut SourceEngine<'_>)) {
    with_books(config, None, f);
}

/// Runs `f` on a fresh engine over [`layout`]'s 1024-page block with
/// `config`, verifying with `key` into books of its own when given one.
fn with_books(
    config: &MigrationConfig,
    key: Option<crate::digest::DigestKey>,
    f: impl FnOnce(&mut SourceEngine<'_>),
) {
    let l = layout();
    let shift = config.parameters.clear_bitmap_shift;
    let mut d = vec![0; BlockTracking::dirty_words(&l[0])];
    let mut c = vec![0; BlockTracking::clear_words(&l[0], shift)];
    let mut tracking = [BlockTracking::new(&l[0], shift, &mut d, &mut c).unwrap()];
    let mut scratch = vec![0u8; MIN_SCRATCH];
    let mut terms = vec![0u64; 1024];
    let mut books = [crate::digest::DigestBooks::new(&l[0], &mut terms).unwrap()];
    let mut s = SourceEngine::new(config, &l, &mut tracking, &mut scratch).unwrap();
    if let Some(key) = key {
        s.verify_with(key, &mut books).unwrap();
    }
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
            Some(SourceAction::SaveSetupDevices)
        );
        assert!(matches!(
            s.handle_dirty_log(0, &[0; 16]),
            Err(SourceError::UnexpectedEvent { .. })
        ));
        s.handle_setup_devices_sent(now, 0).unwrap();
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
        assert_eq!(s.status(), MigrationStatus::Failed);
        assert!(
            s.stats()
                .error_desc
                .as_str()
                .contains("postcopy is not active")
        );
        assert_eq!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::Finished(EndReason::Protocol(
                Violation::RequestOutsidePostcopy
            )))
        );
        assert_eq!(
            s.end_reason(),
            Some(EndReason::Protocol(Violation::RequestOutsidePostcopy))
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
        assert_eq!(s.status(), MigrationStatus::Failed);
        assert_eq!(
            s.stats().error_desc.as_str(),
            "the destination was interrupted (SIGINT) and stopped loading the stream; \
             the guest keeps running on the source"
        );
    });

    let mut config = MigrationConfig::default();
    config.capabilities |= Capabilities::POSTCOPY_RAM;
    config.parameters.downtime_limit_ms = 0;
    with_config(&config, |s| {
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
                Some(SourceAction::SaveSetupDevices) => {
                    s.handle_setup_devices_sent(now, 0).unwrap()
                }
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
            Some(SourceAction::Finished(EndReason::DestinationInterrupted {
                signal: 15
            }))
        );
        assert!(
            s.stats().error_desc.as_str().contains("SIGTERM"),
            "{}",
            s.stats().error_desc.as_str()
        );
    });
}

/// A precopy stop is announced: the write just before the vCPU stop is a
/// SwitchoverStart, sent once, so the destination knows the downtime has
/// begun before the final pages reach it.
#[test]
fn the_stop_is_announced_by_a_switchover_start() {
    let mut config = MigrationConfig::default();
    config.parameters.max_bandwidth = 0;
    with_config(&config, |s| {
        let now = Instant::ZERO;
        s.start(now).unwrap();
        let announce = switchover_start();
        let (mut announced, mut last_sent, mut stops) = (0, vec::Vec::new(), 0);
        while let Some(action) = s.poll_action(now, &AllZero) {
            match action {
                SourceAction::SyncDirtyLog => {
                    s.handle_dirty_log(0, &[0; 16]).unwrap();
                    s.handle_sync_done(now).unwrap();
                }
                SourceAction::StopVcpus => {
                    stops += 1;
                    assert_eq!(last_sent, announce, "the stop follows its announcement");
                    s.handle_vcpus_stopped(now).unwrap();
                }
                SourceAction::SaveSetupDevices => s.handle_setup_devices_sent(now, 0).unwrap(),
                SourceAction::SaveDevices => s.handle_devices_sent(now, 16).unwrap(),
                SourceAction::Send(bytes) => {
                    announced += usize::from(bytes == &announce[..]);
                    last_sent = bytes.to_vec();
                }
                SourceAction::Finished(status) => {
                    assert_eq!(status, EndReason::Completed);
                    break;
                }
                _ => {}
            }
        }
        assert_eq!((stops, announced), (1, 1));
    });
}

/// Drives a return-path precopy of an idle 1024-page guest up to the end
/// of the stream (the engine then waits for LOADED), and hands the engine
/// to `f` with the time it got there.
fn at_the_end_of_the_stream(f: impl FnOnce(&mut SourceEngine<'_>, Instant)) {
    let mut config = MigrationConfig::default();
    config.capabilities |= Capabilities::RETURN_PATH;
    config.limits.confirm_timeout_ms = 1_000;
    config.parameters.max_bandwidth = 0;
    with_config(&config, |s| {
        let now = Instant::ZERO;
        s.start(now).unwrap();
        let mut syncs = 0;
        let mut sent_end = false;
        while let Some(action) = s.poll_action(now, &AllZero) {
            match action {
                SourceAction::SyncDirtyLog => {
                    // The initially-set log first, then nothing dirty.
                    let word = if syncs == 0 { u64::MAX } else { 0 };
                    syncs += 1;
                    s.handle_dirty_log(0, &[word; 16]).unwrap();
                    s.handle_sync_done(now).unwrap();
                }
                SourceAction::StopVcpus => s.handle_vcpus_stopped(now).unwrap(),
                SourceAction::SaveSetupDevices => s.handle_setup_devices_sent(now, 0).unwrap(),
                SourceAction::SaveDevices => s.handle_devices_sent(now, 16).unwrap(),
                SourceAction::Send(bytes) if bytes == &catch_up_ping()[..] => {
                    s.handle_return_path(now, &RpMessage::Pong(CATCH_UP_PING))
                        .unwrap();
                }
                SourceAction::Send(bytes) => sent_end = bytes == [0, 6, 0, 0, 0, 0, 0, 0],
                SourceAction::ResumeVcpus | SourceAction::Finished(_) => {
                    panic!("the migration ended early")
                }
                _ => {}
            }
        }
        assert!(sent_end, "the last write is END_OF_STREAM");
        assert!(!s.is_committed());
        f(s, now);
    });
}

/// Polls to the end, returning every action's kind.
fn drain(s: &mut SourceEngine<'_>, now: Instant) -> std::vec::Vec<&'static str> {
    let mut seen = std::vec::Vec::new();
    while let Some(action) = s.poll_action(now, &AllZero) {
        seen.push(match action {
            SourceAction::ResumeVcpus => "resume",
            SourceAction::Finished(EndReason::Completed) => "completed",
            SourceAction::Finished(_) => "failed",
            SourceAction::Send(_) => "send",
            _ => "other",
        });
    }
    seen
}

#[test]
fn after_the_commit_the_source_never_resumes_nor_cancels() {
    // LOADED: the next write is the COMMIT, and the source is committed.
    at_the_end_of_the_stream(|s, now| {
        s.handle_return_path(now, &RpMessage::Loaded).unwrap();
        assert_eq!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::Send(&[0, 1, 0, 0, 0, 0, 0, 2, 0, 10]))
        );
        assert!(s.is_committed());
        assert_eq!(s.cancel(now), Err(SourceError::AlreadyCommitted));
        // The connection closes before the confirmation: ambiguous, and
        // the guest stays paused.
        s.handle_io_error(now, format_args!("the destination closed the connection"));
        assert_eq!(drain(s, now), ["failed"]);
        assert_eq!(s.stats().ambiguous_end, Some(AmbiguousEnd::SourceCommitted));
    });
    // No confirmation within the confirm timeout: the same.
    at_the_end_of_the_stream(|s, now| {
        s.handle_return_path(now, &RpMessage::Loaded).unwrap();
        drain(s, now);
        let late = now + Duration::from_millis(1_000);
        assert_eq!(s.poll_timeout(), Some(late));
        assert_eq!(drain(s, late), ["failed"]);
        assert!(
            s.stats()
                .error_desc
                .as_str()
                .contains("did not confirm the commit within 1000 ms")
        );
        assert_eq!(
            s.end_reason(),
            Some(EndReason::Timeout(Wait::CommitConfirmation))
        );
        assert_eq!(s.stats().ambiguous_end, Some(AmbiguousEnd::SourceCommitted));
    });
    // Confirmed: a close right after SHUT(0) does not undo the completion.
    at_the_end_of_the_stream(|s, now| {
        s.handle_return_path(now, &RpMessage::Loaded).unwrap();
        drain(s, now);
        s.handle_return_path(now, &RpMessage::Shut { error: false })
            .unwrap();
        s.handle_io_error(now, format_args!("the destination closed the connection"));
        assert_eq!(drain(s, now), ["completed"]);
        assert_eq!(s.stats().ambiguous_end, None);
    });
}

#[test]
fn before_the_commit_a_failure_resumes_the_guest() {
    // Waiting for LOADED: a close or a timeout resumes the guest, cleanly.
    at_the_end_of_the_stream(|s, now| {
        s.handle_io_error(now, format_args!("the destination closed the connection"));
        assert_eq!(drain(s, now), ["resume", "failed"]);
        assert_eq!(s.stats().ambiguous_end, None);
    });
    at_the_end_of_the_stream(|s, now| {
        let late = now + Duration::from_millis(1_000);
        assert_eq!(drain(s, late), ["resume", "failed"]);
        assert!(
            s.stats()
                .error_desc
                .as_str()
                .contains("did not report the stream loaded")
        );
    });
    // LOADED received but the COMMIT not handed out yet: still clean.
    at_the_end_of_the_stream(|s, now| {
        s.handle_return_path(now, &RpMessage::Loaded).unwrap();
        s.cancel(now).unwrap();
        assert_eq!(drain(s, now), ["resume", "failed"]);
        assert_eq!(s.status(), MigrationStatus::Cancelled);
    });
}

/// A return-path source with one 1024-page block, started and past its
/// preamble: the next poll asks for the setup-time device sections.
fn at_the_setup_devices(f: impl FnOnce(&mut SourceEngine<'_>, Instant)) {
    let mut config = MigrationConfig::default();
    config.capabilities |= Capabilities::RETURN_PATH;
    config.limits.confirm_timeout_ms = 1_000;
    with_config(&config, |s| {
        let now = Instant::ZERO;
        s.start(now).unwrap();
        assert!(matches!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::Send(_))
        ));
        assert_eq!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::SaveSetupDevices)
        );
        f(s, now);
    });
}

fn setup_check_ping() -> std::vec::Vec<u8> {
    let mut buf = vec![0u8; 64];
    let len = Record::Command(Command::Ping(SETUP_CHECK_PING))
        .encode(&mut buf)
        .unwrap();
    buf.truncate(len);
    buf
}

/// The setup-time sections are checked before any RAM: the engine sends
/// the check ping and waits; a refusal (SHUT(1)) ends the migration with
/// the destination's error, no page sent and the guest never stopped.
#[test]
fn a_destination_refusing_the_setup_sections_fails_before_any_ram() {
    at_the_setup_devices(|s, now| {
        s.handle_setup_devices_sent(now, 64).unwrap();
        let ping = setup_check_ping();
        assert_eq!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::Send(&ping[..]))
        );
        // Waiting: nothing to do until the verdict or the confirm timeout.
        assert_eq!(s.poll_action(now, &AllZero), None);
        assert_eq!(s.poll_timeout(), Some(now + Duration::from_millis(1_000)));
        s.handle_return_path(now, &RpMessage::Shut { error: true })
            .unwrap();
        assert_eq!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::Finished(EndReason::DestinationFailed))
        );
        assert!(
            s.stats()
                .error_desc
                .as_str()
                .contains("refused the setup-time device state"),
            "{}",
            s.stats().error_desc.as_str()
        );
        assert_eq!(s.stats().ram.normal + s.stats().ram.duplicate, 0);
    });
}

#[test]
fn an_accepted_setup_check_goes_on_to_ram_and_a_silent_one_times_out() {
    at_the_setup_devices(|s, now| {
        s.handle_setup_devices_sent(now, 64).unwrap();
        assert!(matches!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::Send(_))
        ));
        // Another ping's answer is not the verdict.
        s.handle_return_path(now, &RpMessage::Pong(POSTCOPY_RUN_PING))
            .unwrap();
        assert_eq!(s.poll_action(now, &AllZero), None);
        s.handle_return_path(now, &RpMessage::Pong(SETUP_CHECK_PING))
            .unwrap();
        assert_eq!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::SyncDirtyLog)
        );
    });
    at_the_setup_devices(|s, now| {
        s.handle_setup_devices_sent(now, 64).unwrap();
        assert!(matches!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::Send(_))
        ));
        let late = now + Duration::from_millis(1_000);
        assert_eq!(
            s.poll_action(late, &AllZero),
            Some(SourceAction::Finished(EndReason::Timeout(
                Wait::SetupVerdict
            )))
        );
    });
    // Nothing to send: no check, straight on to the setup sync.
    at_the_setup_devices(|s, now| {
        s.handle_setup_devices_sent(now, 0).unwrap();
        assert_eq!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::SyncDirtyLog)
        );
    });
}

/// A record that does not fit the scratch buffer ends the migration with
/// a typed reason instead of a zero-length write (the scratch is checked
/// against the preamble up front, so the failure is injected here).
#[test]
fn an_unencodable_record_fails_the_migration() {
    let mut config = MigrationConfig::default();
    config.capabilities |= Capabilities::RETURN_PATH;
    with_config(&config, |s| {
        s.start(Instant::ZERO).unwrap();
        let e = wire::EncodeError::BufferTooSmall {
            needed: 2,
            available: 1,
        };
        let action = s.encode_failed(e);
        assert_eq!(action, SourceAction::Finished(EndReason::Encode(e)));
        assert_eq!(s.status(), MigrationStatus::Failed);
    });
}

#[test]
fn the_switchover_threshold_is_published_in_the_stats() {
    let mut config = MigrationConfig::default();
    config.parameters.avail_switchover_bandwidth = 1_000_000;
    config.parameters.downtime_limit_ms = 300;
    with_config(&config, |s| {
        assert_eq!(s.stats().threshold_bytes, 0, "nothing measured yet");
        // 1000 bytes per ms for the 200 ms the stop cost leaves of the limit.
        s.handle_stop_cost(Duration::from_millis(100));
        assert_eq!(s.stats().threshold_bytes, 200_000);
        assert_eq!(s.stats().threshold_bytes, s.threshold_bytes());
        s.handle_stop_cost(Duration::from_millis(400));
        assert_eq!(s.stats().threshold_bytes, 0, "a stop cost over the limit");
    });
}

#[test]
fn digest_books_must_match_the_layout_and_come_before_the_start() {
    use crate::digest::{DigestBooks, DigestKey};
    let l = layout();
    let config = MigrationConfig::default();
    let shift = config.parameters.clear_bitmap_shift;
    let (mut d, mut c) = (vec![0; 16], vec![0; 1]);
    let mut tracking = [BlockTracking::new(&l[0], shift, &mut d, &mut c).unwrap()];
    let mut scratch = vec![0u8; MIN_SCRATCH];
    let other = [BlockInfo::new(BlockId::new("pc.ram").unwrap(), 8 * 4096, 4096).unwrap()];
    let mut terms = [0u64; 8];
    let mut wrong = [DigestBooks::new(&other[0], &mut terms).unwrap()];
    let mut s = SourceEngine::new(&config, &l, &mut tracking, &mut scratch).unwrap();
    assert_eq!(
        s.verify_with(DigestKey::new(1), &mut wrong),
        Err(SourceError::DigestBooksMismatch)
    );
    assert!(matches!(
        s.audit_at_stop(true),
        Err(SourceError::UnexpectedEvent { .. })
    ));
}

/// What a reader was asked, in order, with the clears the driver carried
/// out between the questions.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Clear(u64),
    Populated(u64),
    Read(u64),
    Hashed(u64),
    Sent(u64),
}

/// Pages below `populated_below` hold the byte `fill` (which a test
/// changes, as a guest writes), the rest were never populated; every
/// question the engine asks is logged.
struct Guest {
    populated_below: core::cell::Cell<u64>,
    fill: core::cell::Cell<u8>,
    log: core::cell::RefCell<vec::Vec<Asked>>,
}

impl Guest {
    fn new(populated_below: u64, fill: u8) -> Self {
        Guest {
            populated_below: core::cell::Cell::new(populated_below),
            fill: core::cell::Cell::new(fill),
            log: core::cell::RefCell::default(),
        }
    }
}

impl PageReader for Guest {
    fn is_zero_page(&self, _block: u16, page: u64) -> bool {
        self.log.borrow_mut().push(Asked::Read(page));
        page >= self.populated_below.get()
    }

    fn page_term(&self, block: u16, page: u64, key: &crate::digest::DigestKey) -> u64 {
        self.log.borrow_mut().push(Asked::Hashed(page));
        let populated = page < self.populated_below.get();
        let byte = if populated { self.fill.get() } else { 0 };
        key.page_term(block, page, &[byte; 4096])
    }

    fn populated(&self, _block: u16, first: u64, mask: &mut [u64]) {
        self.log.borrow_mut().push(Asked::Populated(first));
        let below = self.populated_below.get();
        for (w, word) in mask.iter_mut().enumerate() {
            *word = (0..64)
                .filter(|b| first + 64 * w as u64 + b < below)
                .fold(0, |acc, b| acc | 1 << b);
        }
    }
}

/// Never-populated pages go out as zero pages without a read, counted in
/// `ram.unpopulated`; each window is asked only after its chunk's clear,
/// and a page populated after the question is dirty at the next sync,
/// whose pass reads it without asking (the first pass asks, no other).
#[test]
fn unpopulated_pages_are_sent_as_zero_unread_and_asked_after_their_clear() {
    let mut config = MigrationConfig::default();
    config.parameters.max_bandwidth = 0;
    config.parameters.clear_bitmap_shift = 8;
    with_config(&config, |s| {
        let ram = Guest::new(300, 1);
        let now = Instant::ZERO;
        s.start(now).unwrap();
        let mut syncs = 0;
        let mut log = vec::Vec::new();
        loop {
            let Some(action) = s.poll_action(now, &ram) else {
                panic!("the engine stalled in {}", s.status());
            };
            match action {
                SourceAction::SaveSetupDevices => s.handle_setup_devices_sent(now, 0).unwrap(),
                SourceAction::SyncDirtyLog => {
                    syncs += 1;
                    log.push(ram.log.take());
                    if syncs == 3 {
                        break;
                    }
                    // First the initially-set log; then page 900, which the
                    // guest wrote (populating it) after it was asked.
                    let mut fetched = [0u64; 16];
                    if syncs == 1 {
                        fetched.fill(u64::MAX);
                    } else {
                        fetched[900 / 64] = 1 << (900 % 64);
                        ram.populated_below.set(1024);
                    }
                    s.handle_dirty_log(0, &fetched).unwrap();
                    s.handle_sync_done(now).unwrap();
                }
                SourceAction::ClearDirtyLog { chunk, .. } => {
                    ram.log.borrow_mut().push(Asked::Clear(chunk.first))
                }
                _ => {}
            }
        }
        let reads = |pass: &[Asked]| {
            pass.iter()
                .filter_map(|a| match a {
                    Asked::Read(p) => Some(*p),
                    _ => None,
                })
                .collect::<vec::Vec<_>>()
        };
        fn order(pass: &[Asked]) -> vec::Vec<&Asked> {
            pass.iter()
                .filter(|a| !matches!(a, Asked::Read(_)))
                .collect()
        }
        let (c, p) = (Asked::Clear, Asked::Populated);
        let first = &log[1];
        assert_eq!(
            order(first),
            [
                &c(0),
                &p(0),
                &c(256),
                &p(256),
                &c(512),
                &p(512),
                &c(768),
                &p(768)
            ]
        );
        assert_eq!(reads(first), (0..300).collect::<vec::Vec<_>>());
        let second = &log[2];
        assert_eq!(order(second), [&c(768)]);
        assert_eq!(reads(second), [900]);
        let ram = &s.stats().ram;
        assert_eq!(
            (ram.normal, ram.unpopulated, ram.duplicate),
            (301, 724, 724)
        );
    });
}

/// The first pass sends each window's never-populated pages as one
/// ZeroRun record (a run shorter than `MIN_ZERO_RUN` as ZERO entries),
/// after the batch of populated pages before it; the runs and the entries
/// together cover every page once, and only the runs' record bytes count
/// as sent.
#[test]
fn never_populated_pages_go_as_zero_runs() {
    let mut config = MigrationConfig::default();
    config.parameters.max_bandwidth = 0;
    config.parameters.clear_bitmap_shift = 8;
    with_config(&config, |s| {
        // Pages 0..300 populated, except 260..264 (a run of 4: entries).
        struct Holes(Guest);
        impl PageReader for Holes {
            fn is_zero_page(&self, block: u16, page: u64) -> bool {
                (260..264).contains(&page) || self.0.is_zero_page(block, page)
            }
            fn page_term(&self, block: u16, page: u64, key: &crate::digest::DigestKey) -> u64 {
                self.0.page_term(block, page, key)
            }
            fn populated(&self, block: u16, first: u64, mask: &mut [u64]) {
                self.0.populated(block, first, mask);
                for page in 260..264u64 {
                    if let Some(w) = page
                        .checked_sub(first)
                        .and_then(|b| mask.get_mut((b / 64) as usize))
                    {
                        *w &= !(1 << ((page - first) % 64));
                    }
                }
            }
        }
        let ram = Holes(Guest::new(300, 1));
        let now = Instant::ZERO;
        s.start(now).unwrap();
        let mut runs = vec::Vec::new();
        let mut entries = vec::Vec::new();
        let mut syncs = 0;
        loop {
            let Some(action) = s.poll_action(now, &ram) else {
                panic!("the engine stalled in {}", s.status());
            };
            match action {
                SourceAction::SaveSetupDevices => s.handle_setup_devices_sent(now, 0).unwrap(),
                SourceAction::SyncDirtyLog => {
                    syncs += 1;
                    if syncs == 2 {
                        break;
                    }
                    s.handle_dirty_log(0, &[u64::MAX; 16]).unwrap();
                    s.handle_sync_done(now).unwrap();
                }
                SourceAction::Send(bytes) if bytes.get(..2) == Some(&[0, 9]) => {
                    let mut dec_buf = [0u8; 64];
                    let mut dec = crate::wire::StreamDecoder::new(&mut dec_buf);
                    let mut stream = [0u8; 8];
                    crate::wire::encode_stream_header(&mut stream).unwrap();
                    dec.decode(&stream).unwrap();
                    let Some(Record::ZeroRun(run)) = dec.decode(bytes).unwrap().record else {
                        panic!("a kind 9 record is a ZeroRun");
                    };
                    assert_eq!((run.block, run.page_shift), (0, 12));
                    runs.push((run.range.first, run.range.count, entries.len()));
                }
                SourceAction::SendPages { header, .. } => {
                    let count = u32::from_be_bytes(header[12..16].try_into().unwrap());
                    for i in 0..count as usize {
                        let at = 16 + 8 * i;
                        let e = u64::from_be_bytes(header[at..at + 8].try_into().unwrap());
                        entries.push((e & ((1 << 56) - 1), e >> 63 == 1));
                    }
                }
                _ => {}
            }
        }
        // The batch of pages 0..300 (256 pages are a full batch) goes
        // before the first run.
        assert_eq!(
            runs.iter().map(|r| (r.0, r.1)).collect::<vec::Vec<_>>(),
            [(300, 212), (512, 256), (768, 256)]
        );
        assert_eq!(runs[0].2, 300, "the pages before the first run went first");
        let mut pages: vec::Vec<u64> = entries.iter().map(|e| e.0).collect();
        for &(first, count, _) in &runs {
            pages.extend(first..first + count);
        }
        pages.sort_unstable();
        assert_eq!(pages, (0..1024).collect::<vec::Vec<_>>(), "every page once");
        let zero: vec::Vec<u64> = entries.iter().filter(|e| e.1).map(|e| e.0).collect();
        assert_eq!(zero, [260, 261, 262, 263], "a short run goes as entries");
        let ram = &s.stats().ram;
        assert_eq!((ram.normal, ram.unpopulated), (296, 728));
    });
}

/// A verifying scan reads each page once, for its term, which is also its
/// zero check: `is_zero_page` is never asked, a never-populated page is
/// neither read nor hashed, every populated page is hashed exactly once
/// and before its batch is handed out, and nothing is read again after
/// the caller wrote a batch (the guest writing the pages meanwhile does
/// not make the engine read them).
#[test]
fn a_verifying_scan_hashes_each_page_once_in_its_read_before_the_send() {
    use crate::digest::DigestKey;
    let mut config = MigrationConfig::default();
    config.parameters.max_bandwidth = 0;
    config.parameters.clear_bitmap_shift = 8;
    with_books(&config, Some(DigestKey::new(0x5eed)), |s| {
        let ram = Guest::new(300, 1);
        let now = Instant::ZERO;
        s.start(now).unwrap();
        let mut syncs = 0;
        loop {
            let Some(action) = s.poll_action(now, &ram) else {
                panic!("the engine stalled in {}", s.status());
            };
            match action {
                SourceAction::SaveSetupDevices => s.handle_setup_devices_sent(now, 0).unwrap(),
                SourceAction::SyncDirtyLog => {
                    syncs += 1;
                    if syncs == 2 {
                        break;
                    }
                    s.handle_dirty_log(0, &[u64::MAX; 16]).unwrap();
                    s.handle_sync_done(now).unwrap();
                }
                SourceAction::SendPages { pages, .. } => {
                    ram.log
                        .borrow_mut()
                        .extend(pages.iter().map(|&p| Asked::Sent(p)));
                    // The guest writes every page after the send.
                    ram.fill.set(ram.fill.get() % 250 + 1);
                }
                _ => {}
            }
        }
        let log = ram.log.take();
        assert!(!log.iter().any(|a| matches!(a, Asked::Read(_))));
        let hashed: vec::Vec<u64> = log
            .iter()
            .filter_map(|a| match a {
                Asked::Hashed(p) => Some(*p),
                _ => None,
            })
            .collect();
        assert_eq!(hashed, (0..300).collect::<vec::Vec<_>>());
        // Each sent page was hashed before it was handed out.
        for (i, a) in log.iter().enumerate() {
            if let Asked::Sent(p) = a {
                let at = log.iter().position(|b| *b == Asked::Hashed(*p));
                assert!(at.is_some_and(|h| h < i), "page {p} hashed after its send");
            }
        }
        let ram = &s.stats().ram;
        assert_eq!((ram.normal, ram.unpopulated), (300, 724));
    });
}

/// What a batch books: the terms the scan handed with it, without reading
/// the page again; a batch without them (postcopy's requested pages) is
/// hashed from memory as it is booked. A zero entry books 0.
#[test]
fn batches_book_the_scan_terms_and_hash_only_pages_without_one() {
    use super::verify::{Verify, book_batch, book_zero};
    use crate::digest::{DigestBooks, DigestKey};
    let l = layout();
    let mut terms = vec![0u64; 1024];
    let mut books = [DigestBooks::new(&l[0], &mut terms).unwrap()];
    let mut verify = Some(Verify {
        key: DigestKey::new(3),
        books: &mut books,
        audit: false,
    });
    let ram = Guest::new(300, 7);
    book_batch(&mut verify, &ram, 0, &[4, 9], Some(&[11, 12]));
    assert!(ram.log.borrow().is_empty(), "terms given: nothing read");
    book_batch(&mut verify, &ram, 0, &[5], None);
    assert_eq!(ram.log.take(), [Asked::Hashed(5)]);
    book_zero(&mut verify, 0, 9);
    // Outside the layout: nothing booked, nothing read.
    book_batch(&mut verify, &ram, 1, &[5], None);
    assert!(ram.log.borrow().is_empty());
    let b = verify.as_ref().map(|v| &v.books[0]).unwrap();
    let five = DigestKey::new(3).page_term(0, 5, &[7; 4096]);
    assert_eq!(
        (b.term(4), b.term(5), b.term(9)),
        (Some(11), Some(five), Some(0))
    );
    assert_eq!(b.sum(), 11u64.wrapping_add(five));
}

#[test]
fn the_stop_throttle_takes_half_the_remaining_run_time_per_step_up_to_99() {
    let mut percent = 0;
    let mut steps = std::vec::Vec::new();
    while percent < 99 {
        percent = super::convergence::stop_throttle_step(percent).min(99);
        steps.push(percent);
    }
    assert_eq!(steps, [50, 75, 88, 94, 97, 99]);
    assert_eq!(super::convergence::stop_throttle_step(99).min(99), 99);
}

/// Drives a postcopy of the 1024-page block past the switchover and hands
/// the engine, with the guest on the destination, to `f`.
fn after_the_switchover(f: impl FnOnce(&mut SourceEngine<'_>, Instant)) {
    after_the_switchover_with(Capabilities::empty(), f);
}

/// [`after_the_switchover`] with `caps` on as well.
fn after_the_switchover_with(caps: Capabilities, f: impl FnOnce(&mut SourceEngine<'_>, Instant)) {
    let mut config = MigrationConfig::default();
    config.capabilities |= Capabilities::POSTCOPY_RAM | caps;
    config.parameters.downtime_limit_ms = 0;
    with_config(&config, |s| {
        let now = to_the_switchover(s);
        f(s, now);
    });
}

/// Drives `s` (postcopy configured, all-zero RAM) until the guest runs on
/// the destination; returns the time then.
fn to_the_switchover(s: &mut SourceEngine<'_>) -> Instant {
    let mut now = Instant::ZERO;
    s.start(now).unwrap();
    s.start_postcopy(now).unwrap();
    let dirty = [u64::MAX; 16];
    while !s.guest_on_destination() {
        match s.poll_action(now, &AllZero) {
            Some(SourceAction::SyncDirtyLog) => {
                s.handle_dirty_log(0, &dirty).unwrap();
                s.handle_sync_done(now).unwrap();
            }
            Some(SourceAction::StopVcpus) => s.handle_vcpus_stopped(now).unwrap(),
            Some(SourceAction::SaveSetupDevices) => s.handle_setup_devices_sent(now, 0).unwrap(),
            Some(SourceAction::PackageDevices) => {
                s.package_devices(now, 16).unwrap();
                s.handle_package_sent(now).unwrap();
            }
            Some(SourceAction::Finished(end)) => panic!("finished early: {end:?}"),
            Some(_) => {}
            None => now = s.poll_timeout().expect("stalled before the switchover"),
        }
    }
    now
}

/// A verifying migration books the terms of the pages a host served
/// itself: a recovery may learn the destination has them and never send
/// them again, and the digest must still be of what was sent. A request
/// served without one term a page is served by the engine instead.
#[test]
fn a_request_the_host_served_books_its_terms() {
    use crate::digest::DigestKey;
    let mut config = MigrationConfig::default();
    config.capabilities |= Capabilities::POSTCOPY_RAM | Capabilities::POSTCOPY_PREEMPT;
    config.parameters.downtime_limit_ms = 0;
    with_books(&config, Some(DigestKey::new(3)), |s| {
        let now = to_the_switchover(s);
        let two = |first: u64| RpMessage::ReqPagesId {
            block: "pc.ram",
            start: first * 4096,
            len: 2 * 4096,
        };
        s.handle_served_request(now, &two(3), 8300, &[11, 12])
            .unwrap();
        assert!(!s.has_page_requests(), "served and booked");
        s.handle_served_request(now, &two(7), 8300, &[13]).unwrap();
        assert!(
            s.has_page_requests(),
            "one term short: the engine serves it"
        );
        let booked = &s.verify.as_ref().expect("verifying").books[0];
        assert_eq!(booked.term(3), Some(11));
        assert_eq!(booked.term(4), Some(12));
        assert_ne!(booked.term(7), Some(13));
    });
}

/// The bitmap parts of a 1024-page block whose pages `received` arrived.
fn bitmap_of(received: core::ops::Range<u64>) -> vec::Vec<u8> {
    let mut words = [0u64; 16];
    for p in received {
        words[(p / 64) as usize] |= 1 << (p % 64);
    }
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn send_bitmap(s: &mut SourceEngine<'_>, now: Instant, size: u64, bytes: &[u8]) {
    for msg in [
        RpMessage::RecvBitmap { block: "pc.ram" },
        RpMessage::RecvBitmapSize { size },
        RpMessage::RecvBitmapBytes { offset: 0, bytes },
        RpMessage::RecvBitmapEnd,
    ] {
        s.handle_return_path(now, &msg).unwrap();
    }
}

#[test]
fn a_cut_after_the_switchover_pauses_and_a_checked_bitmap_resumes() {
    after_the_switchover(|s, now| {
        // Resuming an active postcopy is not a move of the table.
        assert_eq!(
            s.resume(now),
            Err(SourceError::Transition(TransitionError {
                from: MigrationStatus::PostcopyActive,
                to: MigrationStatus::PostcopyRecoverSetup
            }))
        );
        s.handle_io_error(now, format_args!("connection reset"));
        assert!(s.is_paused());
        assert_eq!(s.poll_action(now, &AllZero), Some(SourceAction::Paused));
        assert_eq!(s.poll_action(now, &AllZero), None);
        assert_eq!(s.poll_timeout(), None, "a pause waits for the caller");
        assert!(s.stats().error_desc.as_str().contains("connection reset"));

        // A lying size pauses again, before any bit is used.
        s.resume(now).unwrap();
        let Some(SourceAction::Send(start)) = s.poll_action(now, &AllZero) else {
            panic!("the new stream's header and bitmap request");
        };
        assert_eq!(start.len(), wire::STREAM_HEADER_LEN + 8 + 3 + 6);
        let bitmap = bitmap_of(0..1000);
        send_bitmap(s, now, 64, &bitmap[..64]);
        assert!(s.is_paused(), "size 64 for 1024 pages");
        assert_eq!(s.poll_action(now, &AllZero), Some(SourceAction::Paused));

        // A bit past the block's end pauses again.
        s.resume(now).unwrap();
        s.poll_action(now, &AllZero);
        let mut past = bitmap.clone();
        past.push(1);
        s.handle_return_path(now, &RpMessage::RecvBitmap { block: "pc.ram" })
            .unwrap();
        s.handle_return_path(now, &RpMessage::RecvBitmapSize { size: 128 })
            .unwrap();
        s.handle_return_path(
            now,
            &RpMessage::RecvBitmapBytes {
                offset: 0,
                bytes: &past,
            },
        )
        .unwrap();
        assert!(s.is_paused(), "129 bytes for a 128-byte bitmap");
        s.poll_action(now, &AllZero);

        // A true bitmap: the 24 pages not received are what is left.
        s.resume(now).unwrap();
        s.poll_action(now, &AllZero);
        send_bitmap(s, now, 128, &bitmap);
        assert_eq!(s.status(), MigrationStatus::PostcopyRecoverSetup);
        let Some(SourceAction::Send(resume)) = s.poll_action(now, &AllZero) else {
            panic!("POSTCOPY_RESUME");
        };
        let command = Record::Command(Command::PostcopyResume);
        let mut expected = vec![0u8; command.encoded_len()];
        command.encode(&mut expected).unwrap();
        assert_eq!(resume, &expected[..]);
        assert_eq!(s.status(), MigrationStatus::PostcopyRecover);
        assert_eq!(s.stats().ram.remaining, 24 * 4096);
        s.handle_return_path(now, &RpMessage::ResumeAck).unwrap();
        assert_eq!(s.status(), MigrationStatus::PostcopyActive);
        assert_eq!(s.stats().postcopy_recoveries, 1);
        assert!(s.stats().error_desc.is_empty());
        let changes: vec::Vec<_> = core::iter::from_fn(|| s.poll_status_change())
            .map(|c| (c.from, c.to))
            .filter(|(f, t)| f.in_postcopy() && t.in_postcopy())
            .collect();
        use MigrationStatus as M;
        assert_eq!(
            changes,
            [
                (M::PostcopyActive, M::PostcopyPaused),
                (M::PostcopyPaused, M::PostcopyRecoverSetup),
                (M::PostcopyRecoverSetup, M::PostcopyPaused),
                (M::PostcopyPaused, M::PostcopyRecoverSetup),
                (M::PostcopyRecoverSetup, M::PostcopyPaused),
                (M::PostcopyPaused, M::PostcopyRecoverSetup),
                (M::PostcopyRecoverSetup, M::PostcopyRecover),
                (M::PostcopyRecover, M::PostcopyActive),
            ]
        );
    });
}

#[test]
fn giving_up_a_pause_fails_and_keeps_the_guest_stopped() {
    after_the_switchover(|s, now| {
        assert!(s.give_up(now).is_err(), "nothing to give up while active");
        s.handle_peer_closed(now, format_args!("closed"));
        assert_eq!(s.poll_action(now, &AllZero), Some(SourceAction::Paused));
        s.give_up(now).unwrap();
        assert_eq!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::Finished(EndReason::RecoveryAbandoned))
        );
        assert_eq!(s.status(), MigrationStatus::Failed);
        assert!(
            s.stats()
                .error_desc
                .as_str()
                .contains("exist only on this source"),
            "{}",
            s.stats().error_desc.as_str()
        );
    });
}

/// Drives a return-path postcopy of a 1024-page guest whose first 64
/// pages are dirty again after the first pass, up to the decision to
/// switch, and hands `f` the engine, the time and the writes since the
/// decision's sync, up to (not including) the engine's first `None`.
fn at_the_postcopy_decision(f: impl FnOnce(&mut SourceEngine<'_>, Instant, &[vec::Vec<u8>])) {
    let mut config = MigrationConfig::default();
    config.capabilities |= Capabilities::RETURN_PATH | Capabilities::POSTCOPY_RAM;
    config.limits.postcopy_after_iterations = Some(1);
    config.parameters.downtime_limit_ms = 0;
    config.parameters.max_bandwidth = 0;
    with_config(&config, |s| {
        let now = Instant::ZERO;
        s.start(now).unwrap();
        let mut syncs = 0;
        let mut since_decision = vec::Vec::new();
        while let Some(action) = s.poll_action(now, &AllZero) {
            match action {
                SourceAction::SyncDirtyLog => {
                    let mut log = [0u64; 16];
                    log[0] = u64::MAX;
                    if syncs == 0 {
                        log = [u64::MAX; 16];
                    }
                    syncs += 1;
                    s.handle_dirty_log(0, &log).unwrap();
                    s.handle_sync_done(now).unwrap();
                }
                SourceAction::SaveSetupDevices => s.handle_setup_devices_sent(now, 0).unwrap(),
                SourceAction::Send(bytes) if syncs >= 2 => since_decision.push(bytes.to_vec()),
                SourceAction::StopVcpus => {
                    panic!("stopped before the early discards were answered")
                }
                SourceAction::ResumeVcpus | SourceAction::Finished(_) => {
                    panic!("the migration ended early")
                }
                _ => {}
            }
        }
        assert_eq!(syncs, 2, "the switch is decided at the second sync");
        f(s, now, &since_decision);
    });
}

/// The SwitchoverStart record that goes out just before the vCPU stop.
fn switchover_start() -> vec::Vec<u8> {
    let mut rec = vec![0u8; 16];
    let n = Record::Command(Command::SwitchoverStart)
        .encode(&mut rec)
        .unwrap();
    rec.truncate(n);
    rec
}

/// The next action is the SwitchoverStart record, and the one after it
/// the vCPU stop.
fn assert_announced_stop(s: &mut SourceEngine<'_>, now: Instant) {
    match s.poll_action(now, &AllZero) {
        Some(SourceAction::Send(b)) => assert_eq!(b, &switchover_start()[..]),
        other => panic!("expected the SwitchoverStart, got {other:?}"),
    }
    assert_eq!(s.poll_action(now, &AllZero), Some(SourceAction::StopVcpus));
}

fn catch_up_ping() -> vec::Vec<u8> {
    let mut ping = vec![0u8; 64];
    let n = Record::Command(Command::Ping(CATCH_UP_PING))
        .encode(&mut ping)
        .unwrap();
    ping.truncate(n);
    ping
}

/// The postcopy stop is shortened by discarding what is dirty before it:
/// the discards and a ping go out while the guest runs, and the guest
/// stops only once the destination answered that ping.
#[test]
fn postcopy_discards_early_and_stops_after_the_destination_answered() {
    at_the_postcopy_decision(|s, now, sent| {
        let ping = catch_up_ping();
        assert_eq!(sent.last(), Some(&ping), "the ping ends the early writes");
        assert!(
            sent[..sent.len() - 1].iter().any(|b| !b.is_empty()),
            "a discard record went out before it"
        );
        assert_eq!(s.status(), MigrationStatus::Active, "the guest still runs");
        assert_eq!(s.poll_action(now, &AllZero), None);
        assert_eq!(s.poll_timeout(), Some(now + CATCH_UP_WAIT));
        s.handle_return_path(now, &RpMessage::Pong(CATCH_UP_PING))
            .unwrap();
        assert_announced_stop(s, now);
    });
}

/// A destination that does not answer the early discards' ping delays the
/// stop by at most [`CATCH_UP_WAIT`].
#[test]
fn an_unanswered_early_discard_ping_stops_the_guest_anyway() {
    at_the_postcopy_decision(|s, now, _| {
        assert_announced_stop(s, now + CATCH_UP_WAIT);
    });
}

/// Drives a return-path precopy of an idle 1024-page guest to its decided
/// stop, and hands the engine to `f` with the time and every write since
/// the last sync.
fn at_the_precopy_stop(f: impl FnOnce(&mut SourceEngine<'_>, Instant, &[vec::Vec<u8>])) {
    let mut config = MigrationConfig::default();
    config.capabilities |= Capabilities::RETURN_PATH;
    config.parameters.max_bandwidth = 0;
    with_config(&config, |s| {
        let now = Instant::ZERO;
        s.start(now).unwrap();
        let mut since_sync = vec::Vec::new();
        while let Some(action) = s.poll_action(now, &AllZero) {
            match action {
                SourceAction::SyncDirtyLog => {
                    since_sync.clear();
                    s.handle_dirty_log(0, &[0; 16]).unwrap();
                    s.handle_sync_done(now).unwrap();
                }
                SourceAction::SaveSetupDevices => s.handle_setup_devices_sent(now, 0).unwrap(),
                SourceAction::Send(bytes) => {
                    let ping = bytes == &setup_check_ping()[..];
                    since_sync.push(bytes.to_vec());
                    if ping {
                        s.handle_return_path(now, &RpMessage::Pong(SETUP_CHECK_PING))
                            .unwrap();
                    }
                }
                SourceAction::StopVcpus => panic!("stopped before the destination caught up"),
                SourceAction::ResumeVcpus | SourceAction::Finished(_) => {
                    panic!("the migration ended early")
                }
                _ => {}
            }
        }
        f(s, now, &since_sync);
    });
}

/// Once a precopy stop is decided, the guest runs on until the
/// destination has applied everything sent before (its PONG to the
/// catch-up ping), so the stop's records do not queue behind pages.
#[test]
fn the_precopy_stop_waits_for_the_destination_to_catch_up() {
    at_the_precopy_stop(|s, now, sent| {
        assert_eq!(
            sent.last(),
            Some(&catch_up_ping()),
            "the ping is the last write"
        );
        assert_eq!(s.status(), MigrationStatus::Active, "the guest still runs");
        assert_eq!(s.poll_timeout(), Some(now + CATCH_UP_WAIT));
        // Another ping's answer is not this one's.
        s.handle_return_path(now, &RpMessage::Pong(POSTCOPY_RUN_PING))
            .unwrap();
        assert_eq!(s.poll_action(now, &AllZero), None);
        assert_eq!(s.stats().catch_up_ms, None);
        let answered = now + Duration::from_millis(2);
        s.handle_return_path(answered, &RpMessage::Pong(CATCH_UP_PING))
            .unwrap();
        assert_announced_stop(s, answered);
        assert_eq!(s.stats().catch_up_ms, Some(2.0), "the wait is reported");
    });
}

/// A cancel while the destination catches up ends the migration with the
/// guest never stopped: nothing to resume, and a late PONG changes
/// nothing.
#[test]
fn a_cancel_during_the_catch_up_leaves_the_guest_running() {
    at_the_precopy_stop(|s, now, _| {
        s.cancel(now).unwrap();
        s.handle_return_path(now, &RpMessage::Pong(CATCH_UP_PING))
            .unwrap();
        let mut seen = vec::Vec::new();
        while let Some(action) = s.poll_action(now, &AllZero) {
            assert!(
                !matches!(action, SourceAction::StopVcpus | SourceAction::ResumeVcpus),
                "{action:?}"
            );
            let done = matches!(action, SourceAction::Finished(_));
            seen.push(std::format!("{action:?}"));
            if done {
                break;
            }
        }
        assert!(
            seen.last().is_some_and(|a| a.contains("Cancelled")),
            "{seen:?}"
        );
        assert_eq!(s.status(), MigrationStatus::Cancelled);
    });
}

/// A destination that does not answer the catch-up ping delays the
/// precopy stop by [`CATCH_UP_WAIT`], no more.
#[test]
fn an_unanswered_catch_up_ping_stops_the_guest_anyway() {
    at_the_precopy_stop(|s, now, _| {
        let early = now + (CATCH_UP_WAIT - Duration::from_millis(1));
        assert_eq!(s.poll_action(early, &AllZero), None);
        assert_announced_stop(s, now + CATCH_UP_WAIT);
        assert_eq!(s.stats().catch_up_ms, Some(1000.0));
    });
}

/// Issue 12: a resume with a new preempt channel announces it in the new
/// stream under a fresh id, hands out its hello before the first bitmap
/// request, and after RESUME_ACK serves requests on it again; a resume
/// without one leaves them to the main stream.
#[test]
fn a_resume_with_preempt_opens_the_channel_again_under_a_fresh_id() {
    after_the_switchover_with(Capabilities::POSTCOPY_PREEMPT, |s, now| {
        // Page 1005: one the bitmaps below say the destination lacks.
        let request = RpMessage::ReqPagesId {
            block: "pc.ram",
            start: 1005 * 4096,
            len: 4096,
        };
        let recover = |s: &mut SourceEngine<'_>| {
            send_bitmap(s, now, 128, &bitmap_of(0..1000));
            assert!(matches!(
                s.poll_action(now, &AllZero),
                Some(SourceAction::Send(_))
            ));
            s.handle_return_path(now, &RpMessage::ResumeAck).unwrap();
            assert_eq!(s.status(), MigrationStatus::PostcopyActive);
            s.handle_return_path(now, &request).unwrap();
        };
        // Without a new channel: requested pages take the main stream.
        s.handle_io_error(now, format_args!("connection reset"));
        assert_eq!(s.poll_action(now, &AllZero), Some(SourceAction::Paused));
        s.resume(now).unwrap();
        assert!(matches!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::Send(_))
        ));
        recover(s);
        assert!(
            matches!(
                s.poll_action(now, &AllZero),
                Some(SourceAction::SendPages { .. })
            ),
            "on the main stream"
        );

        s.handle_io_error(now, format_args!("connection reset"));
        assert_eq!(s.poll_action(now, &AllZero), Some(SourceAction::Paused));
        // The old channel's id would let a stale connection through.
        assert_eq!(
            s.resume_with_preempt(now, 0),
            Err(SourceError::PreemptIdReused(0))
        );
        assert!(s.is_paused(), "a refusal changes nothing");
        s.resume_with_preempt(now, 0x55).unwrap();
        let Some(SourceAction::Send(start)) = s.poll_action(now, &AllZero) else {
            panic!("the new stream's header and announcement");
        };
        let announce = Record::Command(Command::PostcopyPreempt { migration_id: 0x55 });
        let mut expected = vec![0u8; wire::STREAM_HEADER_LEN + announce.encoded_len()];
        let at = wire::encode_stream_header(&mut expected).unwrap();
        announce.encode(&mut expected[at..]).unwrap();
        assert_eq!(start, &expected[..]);
        let Some(SourceAction::SendPreempt(hello)) = s.poll_action(now, &AllZero) else {
            panic!("the new channel's hello");
        };
        assert_eq!(
            wire::PreemptHello::decode(hello).unwrap().migration_id,
            0x55
        );
        let Some(SourceAction::Send(ask)) = s.poll_action(now, &AllZero) else {
            panic!("the bitmap request");
        };
        assert_eq!(ask.len(), 8 + 3 + 6, "RecvBitmap pc.ram");
        recover(s);
        assert!(
            matches!(
                s.poll_action(now, &AllZero),
                Some(SourceAction::SendPreemptPages { .. })
            ),
            "on the new preempt channel"
        );
        assert_eq!(s.stats().postcopy_recoveries, 2);
    });
}

/// Without postcopy-preempt there is no channel to open again.
#[test]
fn a_resume_with_preempt_needs_the_capability() {
    after_the_switchover(|s, now| {
        s.handle_io_error(now, format_args!("connection reset"));
        s.poll_action(now, &AllZero);
        assert!(matches!(
            s.resume_with_preempt(now, 9),
            Err(SourceError::UnexpectedEvent { .. })
        ));
        assert!(s.is_paused());
    });
}

/// A request the host served itself (from its return-path reader, on the
/// preempt channel) is validated and counted, never served again; one it
/// did not serve is queued as ever.
#[test]
fn a_request_the_host_served_is_counted_not_served_again() {
    after_the_switchover_with(Capabilities::POSTCOPY_PREEMPT, |s, now| {
        let sent = s.stats().ram.transferred;
        let served = RpMessage::ReqPagesId {
            block: "pc.ram",
            start: 3 * 4096,
            len: 4096,
        };
        s.handle_served_request(now, &served, 4200, &[]).unwrap();
        assert_eq!(s.stats().ram.postcopy_requests, 1);
        assert!(!s.has_page_requests(), "not queued");
        assert_eq!(s.stats().ram.transferred, sent + 4200);
        let unserved = RpMessage::ReqPages {
            start: 5 * 4096,
            len: 4096,
        };
        s.handle_return_path(now, &unserved).unwrap();
        assert!(s.has_page_requests());
        assert!(matches!(
            s.poll_action(now, &AllZero),
            Some(SourceAction::SendPreemptPages { .. })
        ));
        let crooked = RpMessage::ReqPages {
            start: 1,
            len: 4096,
        };
        s.handle_served_request(now, &crooked, 0, &[]).unwrap();
        assert_eq!(s.status(), MigrationStatus::Failed, "refused as any");
    });
}

/// A dirty rate is measured over at least `MIN_DIRTY_INTERVAL` since the
/// last sync: one page dirtied between back-to-back syncs (nanoseconds
/// apart) keeps the last rate instead of reading as gigabytes a
/// millisecond.
#[test]
fn back_to_back_syncs_keep_the_last_dirty_rate() {
    with_config(&MigrationConfig::default(), |s| {
        s.stats.ram.page_size = 4096;
        s.convergence.synced_at = Instant::from_millis(10);
        s.now = Instant::from_millis(20);
        s.convergence.newly_dirty_this_sync = 250;
        s.measure_dirty_rate();
        // 250 pages of 4 KiB in 10 ms.
        assert_eq!(s.convergence.dirty_bytes_per_ms, Some(102_400.0));
        s.convergence.synced_at = s.now;
        s.now = s.now + core::time::Duration::from_nanos(4);
        s.convergence.newly_dirty_this_sync = 1;
        s.measure_dirty_rate();
        assert_eq!(s.convergence.dirty_bytes_per_ms, Some(102_400.0));
        // From 1 ms on, the interval is measured.
        s.now = s.convergence.synced_at + convergence::MIN_DIRTY_INTERVAL;
        s.measure_dirty_rate();
        assert_eq!(s.convergence.dirty_bytes_per_ms, Some(4_096.0));
    });
}

/// The encoded Ping record with `value`.
fn ping(value: u32) -> vec::Vec<u8> {
    let mut buf = vec![0u8; 64];
    let len = Record::Command(Command::Ping(value))
        .encode(&mut buf)
        .unwrap();
    buf.truncate(len);
    buf
}

/// Polls `s` until it waits, handing back whether it sent `bytes` and
/// whether it sent a Pages record (a batch) on the way.
fn until_waiting(s: &mut SourceEngine<'_>, now: Instant, bytes: &[u8]) -> (bool, bool) {
    let (mut sent, mut pages) = (false, false);
    while let Some(action) = s.poll_action(now, &AllZero) {
        match action {
            SourceAction::Send(b) if b == bytes => sent = true,
            SourceAction::Send(b) if b.len() >= 2 && b[..2] == [0, 3] => pages = true,
            SourceAction::SendPages { .. } => pages = true,
            SourceAction::Finished(end) => panic!("finished: {end:?}"),
            _ => {}
        }
    }
    (sent, pages)
}

/// A verifying postcopy source with the return path holds the end of its
/// stream until the PONG to a ping sent after its last page: a
/// RESEND_PAGE before it has the page sent again and another ping (whose
/// value the stale PONG does not match), and only that ping's PONG lets
/// the Digest and EndOfStream out.
#[test]
fn a_verifying_postcopy_ends_only_at_the_pong_to_its_end_ping() {
    use crate::digest::DigestKey;
    let mut config = MigrationConfig::default();
    config.capabilities |= Capabilities::POSTCOPY_RAM | Capabilities::RETURN_PATH;
    config.parameters.downtime_limit_ms = 0;
    with_books(&config, Some(DigestKey::new(3)), |s| {
        let now = to_the_switchover(s);
        s.handle_return_path(now, &RpMessage::Pong(POSTCOPY_RUN_PING))
            .unwrap();
        let first = ping(POSTCOPY_END_PING);
        assert!(until_waiting(s, now, &first).0, "the first end ping");
        assert_eq!(s.status(), MigrationStatus::PostcopyActive);
        s.handle_return_path(now, &RpMessage::ResendPage { block: 0, page: 5 })
            .unwrap();
        let second = ping(POSTCOPY_END_PING + 1);
        let (pinged, resent) = until_waiting(s, now, &second);
        assert!(resent, "page 5 went again");
        assert!(pinged, "then the next end ping");
        // The first ping's PONG is stale: nothing more goes out.
        s.handle_return_path(now, &RpMessage::Pong(POSTCOPY_END_PING))
            .unwrap();
        assert_eq!(s.poll_action(now, &AllZero), None);
        s.handle_return_path(now, &RpMessage::Pong(POSTCOPY_END_PING + 1))
            .unwrap();
        let Some(SourceAction::Send(end)) = s.poll_action(now, &AllZero) else {
            panic!("the end of the stream did not follow the PONG");
        };
        let eos = {
            let mut buf = vec![0u8; 16];
            let n = Record::EndOfStream.encode(&mut buf).unwrap();
            buf.truncate(n);
            buf
        };
        assert!(end.ends_with(&eos), "Digest and EndOfStream");
    });
}
