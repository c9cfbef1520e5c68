//! The source engine under fuzzing: the destination (through the return
//! path), the clock and the operator are adversaries. Whatever they do, the
//! engine must not panic, must only ask for clears and pages inside guest
//! RAM, must never ask to send a page while the dirty-log chunk holding it
//! still waits for its clear, and must always reach a final state once its
//! inputs stop.

use livemig_core::capabilities::Capabilities;
use livemig_core::config::MigrationConfig;
use livemig_core::digest::{DigestBooks, DigestKey};
use livemig_core::return_path::RpMessage;
use livemig_core::source::{BlockTracking, EndReason, PageReader, SourceAction, SourceEngine};
use livemig_core::status::MigrationStatus;
use livemig_core::time::Instant;
use livemig_core::wire::{BlockId, BlockInfo};

const PAGES: u64 = 256;
const PAGE: u32 = 4096;

struct Pages<'a>(&'a [u8]);

impl PageReader for Pages<'_> {
    fn is_zero_page(&self, block: u16, page: u64) -> bool {
        assert_eq!(block, 0);
        assert!(page < PAGES, "zero check of page {page} outside RAM");
        self.0.get(page as usize).is_some_and(|b| b & 1 == 0)
    }
    fn page_term(&self, block: u16, page: u64, key: &DigestKey) -> u64 {
        assert_eq!(block, 0);
        assert!(page < PAGES, "digest of page {page} outside RAM");
        let byte = self.0.get(page as usize).copied().unwrap_or(0);
        key.page_term(block, page, &[byte; PAGE as usize])
    }

    /// Bit 1 of the page's script byte: clear for a page never populated.
    fn populated(&self, block: u16, first: u64, mask: &mut [u64]) {
        assert_eq!(block, 0);
        assert!(
            first < PAGES && first.is_multiple_of(64),
            "populated query at page {first}"
        );
        for (i, word) in mask.iter_mut().enumerate() {
            *word = (0..64u64)
                .filter(|b| {
                    let page = first + 64 * i as u64 + b;
                    self.0.get(page as usize).is_none_or(|byte| byte & 2 != 0)
                })
                .fold(0, |acc, b| acc | 1 << b);
        }
    }
}

/// libFuzzer entry point; see [`source_accepts`].
pub fn source(data: &[u8]) {
    source_accepts(data);
}

/// Plays `data` as a script of adversarial inputs against a postcopy-capable
/// source; returns whether the migration completed.
pub fn source_accepts(data: &[u8]) -> bool {
    let id = BlockId::new("pc.ram").expect("valid id");
    let layout = [BlockInfo::new(id, PAGES * u64::from(PAGE), PAGE).expect("valid block")];
    let mut config = MigrationConfig::default();
    config.capabilities |= Capabilities::POSTCOPY_RAM | Capabilities::AUTO_CONVERGE;
    config.parameters.clear_bitmap_shift = 6;
    config.limits.max_iterations = Some(20);
    // The preempt channel on inputs whose first byte has bit 1 set.
    if data.first().is_some_and(|b| b & 2 == 2) {
        config.capabilities |= Capabilities::POSTCOPY_PREEMPT;
    }
    let shift = config.parameters.clear_bitmap_shift;
    let mut dirty = vec![0u64; BlockTracking::dirty_words(&layout[0])];
    let mut clear = vec![0u64; BlockTracking::clear_words(&layout[0], shift)];
    let mut tracking =
        [BlockTracking::new(&layout[0], shift, &mut dirty, &mut clear).expect("storage sized")];
    let mut scratch = vec![0u8; 64 * 1024];
    let mut engine =
        SourceEngine::new(&config, &layout, &mut tracking, &mut scratch).expect("valid set-up");
    // Verifying, and auditing at the stop on odd first bytes: the books
    // and the audit are under fuzzing too.
    let mut terms = vec![0u64; DigestBooks::words(&layout[0])];
    let mut books = [DigestBooks::new(&layout[0], &mut terms).expect("storage sized")];
    engine
        .verify_with(DigestKey::new(0x5eed), &mut books)
        .expect("matching books");
    engine
        .audit_at_stop(data.first().is_some_and(|b| b & 1 == 1))
        .expect("before the start");
    let ram = Pages(data);
    let mut script = data.iter().copied();
    let mut now = 0u64;
    let mut log = [0u64; (PAGES / 64) as usize];
    // Chunks fetched dirty and not yet cleared, one bit per 64-page chunk.
    let mut pending: u8 = 0;
    let mut guest_running = true;
    engine
        .start(Instant::from_nanos(now))
        .expect("fresh engine");
    for _ in 0..10_000 {
        let Some(op) = script.next() else { break };
        now += u64::from(op) * 1_000_000;
        let t = Instant::from_nanos(now);
        match op % 8 {
            0..=3 => match engine.poll_action(t, &ram) {
                Some(SourceAction::SyncDirtyLog) => {
                    for w in log.iter_mut() {
                        *w = u64::from(script.next().unwrap_or(0))
                            .wrapping_mul(0x0101_0101_0101_0101);
                    }
                    if guest_running {
                        for (i, w) in log.iter().enumerate() {
                            if *w != 0 {
                                pending |= 1 << i;
                            }
                        }
                    }
                    engine
                        .handle_dirty_log(0, &log)
                        .expect("sync was asked for");
                    engine.handle_sync_done(t).expect("sync was asked for");
                }
                Some(SourceAction::ClearDirtyLog { block, chunk }) => {
                    assert_eq!(block, 0);
                    assert!(chunk.end() <= PAGES && chunk.first % 64 == 0, "{chunk:?}");
                    pending &= !(1 << (chunk.first / 64));
                }
                Some(
                    SourceAction::SendPages { block, pages, .. }
                    | SourceAction::SendChannelPages { block, pages, .. }
                    | SourceAction::SendPreemptPages { block, pages, .. },
                ) => {
                    assert_eq!(block, 0);
                    for &p in pages {
                        assert!(p < PAGES);
                        assert!(
                            !guest_running || pending & (1 << (p / 64)) == 0,
                            "page {p} sent before its chunk was cleared"
                        );
                    }
                }
                Some(SourceAction::StopVcpus) => {
                    guest_running = false;
                    engine.handle_vcpus_stopped(t).expect("stop was asked for");
                }
                Some(SourceAction::SaveSetupDevices) => {
                    engine
                        .handle_setup_devices_sent(t, u64::from(op & 1) * 100)
                        .expect("setup devices were asked for");
                }
                Some(SourceAction::SaveDevices) => {
                    engine
                        .handle_devices_sent(t, 100)
                        .expect("devices were asked for");
                }
                Some(SourceAction::PackageDevices) => {
                    engine
                        .package_devices(t, 100)
                        .expect("package was asked for");
                    if op & 0x80 == 0 {
                        engine.handle_package_sent(t).expect("package was framed");
                    } else {
                        engine.handle_io_error(t, format_args!("cut inside the package"));
                        assert!(!engine.guest_on_destination());
                    }
                }
                Some(SourceAction::ResumeVcpus) => {
                    assert!(
                        !engine.is_committed(),
                        "the vCPUs are never resumed after the commit"
                    );
                    guest_running = true;
                }
                Some(
                    SourceAction::Send(_)
                    | SourceAction::SendPreempt(_)
                    | SourceAction::SendChannel { .. }
                    | SourceAction::SetThrottle { .. },
                )
                | None => {}
                Some(SourceAction::Paused) => {
                    assert!(engine.is_paused() && engine.guest_on_destination());
                    // Resume on some inputs: the recovery handshake is
                    // fuzzed too, with the bitmap parts below.
                    if op & 0x40 != 0 {
                        engine.resume(t).expect("paused");
                    }
                }
                Some(SourceAction::Finished(_)) => break,
            },
            4 => {
                let start = u64::from(script.next().unwrap_or(0)) * 4096;
                let len = u32::from(script.next().unwrap_or(1)) * 4096;
                let bitmap_at = usize::from(script.next().unwrap_or(0));
                let bitmap = data.get(bitmap_at..).unwrap_or_default();
                let bitmap = &bitmap[..bitmap.len().min(usize::from(op))];
                let msg = match script.next().unwrap_or(0) % 13 {
                    0 => RpMessage::ReqPagesId {
                        block: "pc.ram",
                        start,
                        len,
                    },
                    1 => RpMessage::ReqPagesId {
                        block: "other",
                        start,
                        len,
                    },
                    2 => RpMessage::ReqPages { start, len },
                    3 => RpMessage::Shut { error: false },
                    4 => RpMessage::Shut { error: true },
                    5 => RpMessage::SwitchoverAck,
                    6 => RpMessage::ResumeAck,
                    7 => RpMessage::Loaded,
                    9 => RpMessage::RecvBitmap { block: "pc.ram" },
                    // The block's 256 pages take a 32-byte bitmap.
                    10 => RpMessage::RecvBitmapSize {
                        size: if op & 1 == 0 { 32 } else { u64::from(op) * 8 },
                    },
                    11 => RpMessage::RecvBitmapBytes {
                        offset: start / 4096 * 8,
                        bytes: bitmap,
                    },
                    12 => RpMessage::RecvBitmapEnd,
                    // Reaches SETUP_CHECK_PING (1) and POSTCOPY_RUN_PING (4).
                    _ => RpMessage::Pong(u32::from(op) % 5),
                };
                engine
                    .handle_return_path(t, &msg)
                    .expect("messages never misuse the API");
            }
            5 => {
                let _ = engine.start_postcopy(t);
            }
            6 if op == 6 => {
                let _ = engine.cancel(t);
            }
            _ => {
                if let Some(deadline) = engine.poll_timeout() {
                    now = now.max(deadline.as_nanos());
                }
            }
        }
    }
    // The adversary stops: a pause is given up (no new connection comes),
    // then cancel, then drain to the end.
    if engine.status().in_postcopy() && engine.status() != MigrationStatus::PostcopyActive {
        engine
            .give_up(Instant::from_nanos(now))
            .expect("paused or recovering");
    }
    if engine.cancel(Instant::from_nanos(now)).is_err() {
        assert!(
            engine.guest_on_destination() || engine.is_committed(),
            "a cancel is refused only once the guest runs on the destination, or after the commit"
        );
    }
    for _ in 0..100 {
        match engine.poll_action(Instant::from_nanos(now), &ram) {
            Some(SourceAction::Finished(end)) => {
                assert_eq!(Some(end), engine.end_reason());
                assert_eq!(end.status(), engine.status());
                return end == EndReason::Completed;
            }
            // A pause while draining (a silent destination): no new
            // connection comes.
            Some(SourceAction::Paused) => {
                engine
                    .give_up(Instant::from_nanos(now))
                    .expect("just paused");
            }
            Some(_) => {}
            None => {
                if engine.is_finished() {
                    break;
                }
                now += 1_000_000_000;
            }
        }
    }
    assert!(
        engine.is_finished() || !engine.status().is_running(),
        "stuck in {}",
        engine.status()
    );
    false
}

/// Scripts that drive the engine through setup, passes and a postcopy
/// switch.
pub fn source_corpus() -> Vec<Vec<u8>> {
    vec![
        vec![0, 1, 0, 255, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        vec![
            8, 0, 1, 1, 2, 3, 5, 13, 0, 0, 4, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
        vec![
            0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 5, 0, 0, 0, 12, 3, 1, 0, 0, 0, 0, 0, 0,
        ],
    ]
}
